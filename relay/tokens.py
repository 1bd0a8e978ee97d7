"""User tokens: sealed at rest, and transformed per endpoint policy at delivery.

A ``user_token`` lets whoever holds it act as the user, so it is never stored in plaintext:
either stripped before storage, or sealed with AES-GCM under ``RELAY_TOKEN_KEY``. At delivery
the endpoint's policy decides: ``strip`` removes it, ``forward`` sends it as received,
``encrypt`` sends it AES-GCM-encrypted under the endpoint's ``token_key`` with the
``webhook-id`` as associated data. An expired token is never sent. :func:`render` builds
each endpoint's body: the token policy, then the endpoint's payload ``fields``, in one parse.
"""

from __future__ import annotations

import base64
import binascii
import os
from datetime import datetime
from functools import cache
from typing import TYPE_CHECKING, Any, Literal

from relay.codec import compact_json, loads
from relay.fields import FieldTree, select

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = ["Policy", "decrypt", "encrypt", "is_expired", "render", "seal", "unseal"]

Policy = Literal["strip", "forward", "encrypt"]

_SEALED = "$sealed"
_AT_REST_AAD = b"sfox-relay/user_token/v1"


@cache
def _aead() -> type[AESGCM]:
    """AES-GCM, imported on first use: most relays strip tokens and never need it, and
    cryptography's bindings are ~7 MB of resident memory."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    return AESGCM


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def seal(token: Any, key: bytes, *, nonce: bytes | None = None) -> dict[str, str]:
    """The at-rest form of a token: AES-GCM of its compact JSON under ``RELAY_TOKEN_KEY``."""
    nonce = nonce or os.urandom(12)
    plain = compact_json(token)
    return {_SEALED: _b64(nonce + _aead()(key).encrypt(nonce, plain, _AT_REST_AAD))}


def unseal(sealed: Any, key: bytes) -> Any:
    """The token a :func:`seal` result holds; ValueError if it is not ours or the key is wrong."""
    if not isinstance(sealed, dict) or not isinstance(sealed.get(_SEALED), str):
        raise ValueError("not a sealed token")
    try:
        blob = base64.b64decode(sealed[_SEALED], validate=True)
        plain = _open_sealed(key, blob)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("sealed token does not open with this key") from exc
    return loads(plain)


def _open_sealed(key: bytes, blob: bytes) -> bytes:
    from cryptography.exceptions import InvalidTag

    try:
        return _aead()(key).decrypt(blob[:12], blob[12:], _AT_REST_AAD)
    except InvalidTag as exc:
        raise ValueError("wrong key or altered data") from exc


def is_expired(token: Any, now: float) -> bool:
    """True when the token's ``expires`` has passed, or cannot be read (never send a doubt)."""
    if not isinstance(token, dict) or not isinstance(token.get("expires"), str):
        return True
    try:
        expires = datetime.fromisoformat(token["expires"])
    except ValueError:
        return True
    if expires.tzinfo is None:
        return True
    return expires.timestamp() <= now


def encrypt(
    token: dict[str, Any], key: bytes, webhook_id: str, *, nonce: bytes | None = None
) -> dict[str, Any]:
    """The ``encrypt`` policy's replacement for ``payload.user_token``."""
    nonce = nonce or os.urandom(12)
    secret = str(token.get("token", "")).encode()
    return {
        "alg": "A256GCM",
        "nonce": _b64(nonce),
        "ciphertext": _b64(_aead()(key).encrypt(nonce, secret, webhook_id.encode())),
        "expires": token.get("expires"),
        "partner_user_id": token.get("partner_user_id"),
    }


def decrypt(value: dict[str, Any], key: bytes, webhook_id: str) -> str:
    """What a receiver does with an ``encrypt``-policy token (the README shows it inline)."""
    nonce = base64.b64decode(value["nonce"])
    ciphertext = base64.b64decode(value["ciphertext"])
    return _aead()(key).decrypt(nonce, ciphertext, webhook_id.encode()).decode()


def render(
    body: bytes,
    policy: Policy,
    *,
    has_token: bool,
    seal_key: bytes | None,
    endpoint_key: bytes | None,
    webhook_id: str,
    now: float,
    fields: FieldTree | None = None,
) -> bytes:
    """The exact bytes to send (and sign) to one endpoint, from the stored body.

    A stored body without a sealed token, for an endpoint without ``fields``, is sent
    unchanged (the hot path: no parsing). A token that is expired, cannot be unsealed (key
    rotated away), or that the policy does not want is stripped. ``fields`` then keeps only
    the payload keys the endpoint lists (:func:`relay.fields.select`).
    """
    if not has_token and fields is None:
        return body
    message = loads(body)
    payload = message.get("payload")
    if not isinstance(payload, dict):
        return body
    if has_token and "user_token" in payload:
        _apply_policy(payload, policy, seal_key, endpoint_key, webhook_id, now)
    elif fields is None:
        return body
    if fields is not None:
        message["payload"] = select(payload, fields)
    return compact_json(message)


def _apply_policy(
    payload: dict[str, Any],
    policy: Policy,
    seal_key: bytes | None,
    endpoint_key: bytes | None,
    webhook_id: str,
    now: float,
) -> None:
    """Replace or remove ``payload["user_token"]`` (sealed at rest) as ``policy`` says."""
    token: Any = None
    if policy != "strip" and seal_key is not None:
        try:
            token = unseal(payload["user_token"], seal_key)
        except ValueError:
            token = None
    if token is None or is_expired(token, now):
        del payload["user_token"]
    elif policy == "forward":
        payload["user_token"] = token
    elif endpoint_key is not None and isinstance(token, dict):
        payload["user_token"] = encrypt(token, endpoint_key, webhook_id)
    else:
        del payload["user_token"]
