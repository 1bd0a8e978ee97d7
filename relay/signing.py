"""Standard Webhooks signatures (https://www.standardwebhooks.com), pure.

A secret is ``whsec_`` followed by base64 key bytes. Each active secret signs, so a receiver
holding either the old or the new secret verifies during a rotation.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Iterable, Sequence

__all__ = ["SignatureError", "decode_secret", "sign", "verify"]

_PREFIX = "whsec_"


class SignatureError(ValueError):
    """A signature header did not verify (or the secret is malformed)."""


def decode_secret(secret: str) -> bytes:
    """Key bytes of a ``whsec_<base64>`` secret; raises ValueError without echoing it."""
    body = secret[len(_PREFIX) :] if secret.startswith(_PREFIX) else secret
    try:
        key = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not whsec_ followed by base64") from None
    if not key:
        raise ValueError("empty key")
    return key


def _signature(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    signed = b"%s.%d.%s" % (msg_id.encode(), timestamp, body)
    return base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def sign(keys: Sequence[bytes], msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value: ``v1,<sig>`` per key, space-separated."""
    return " ".join(f"v1,{_signature(k, msg_id, timestamp, body)}" for k in keys)


def verify(
    keys: Iterable[bytes],
    msg_id: str,
    timestamp: int,
    body: bytes,
    header: str,
    *,
    now: float,
    tolerance: float = 300.0,
) -> None:
    """Raise :class:`SignatureError` unless one ``v1`` signature matches one key."""
    if abs(now - timestamp) > tolerance:
        raise SignatureError("timestamp outside tolerance")
    offered = [part[3:] for part in header.split() if part.startswith("v1,")]
    for key in keys:
        expected = _signature(key, msg_id, timestamp, body)
        if any(hmac.compare_digest(expected, sig) for sig in offered):
            return
    raise SignatureError("no matching signature")
