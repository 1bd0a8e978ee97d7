"""Standard Webhooks signatures (relay/signing.py), checked against the official package."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
import traceback
from datetime import UTC, datetime

import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from relay.signing import SignatureError, decode_secret, sign, verify

KEY_A = bytes(range(32))
KEY_B = bytes(range(200, 232))
KEY_C = b"another key, 24 bytes..."
SECRET_A = "whsec_" + base64.b64encode(KEY_A).decode()
SECRET_B = "whsec_" + base64.b64encode(KEY_B).decode()
SECRET_C = "whsec_" + base64.b64encode(KEY_C).decode()
MSG_ID = "evt_" + "0123456789abcdef" * 4
BODY = (
    '{"sequence":5,"recipient":"private.enterprise.users","timestamp":1717005327995988841,'
    '"payload":{"user_id":"u1","first_name":"Jörg","n":1234567890123456789012345}}'
).encode()
TS = 1_717_005_327


def _expected(key: bytes, msg_id: str, ts: int, body: bytes) -> str:
    mac = hmac.new(key, f"{msg_id}.{ts}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def _headers(ts: int, signature: str) -> dict[str, str]:
    return {"webhook-id": MSG_ID, "webhook-timestamp": str(ts), "webhook-signature": signature}


# --- sign --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("keys", "header"),
    [
        pytest.param([KEY_A], _expected(KEY_A, MSG_ID, TS, BODY), id="one"),
        pytest.param(
            [KEY_A, KEY_B],
            _expected(KEY_A, MSG_ID, TS, BODY) + " " + _expected(KEY_B, MSG_ID, TS, BODY),
            id="two, in order",
        ),
        pytest.param([], "", id="none"),
    ],
)
def test_sign_exact_value(keys: list[bytes], header: str) -> None:
    assert sign(keys, MSG_ID, TS, BODY) == header


def test_sign_pinned_value() -> None:
    # Pinned: a change here breaks every receiver.
    assert sign([b"k"], "evt_1", 1, b"{}") == "v1,60GbfQBgVH+cX0KfKb2/xxWKC1dxn3dh0lekPLy43ik="


def test_sign_verifies_with_standardwebhooks_one_secret() -> None:
    now = int(time.time())
    header = sign([decode_secret(SECRET_A)], MSG_ID, now, BODY)
    assert Webhook(SECRET_A).verify(BODY, _headers(now, header)) == {
        "sequence": 5,
        "recipient": "private.enterprise.users",
        "timestamp": 1717005327995988841,
        "payload": {"user_id": "u1", "first_name": "Jörg", "n": 1234567890123456789012345},
    }
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET_B).verify(BODY, _headers(now, header))
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET_A).verify(BODY + b" ", _headers(now, header))
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET_A).verify(BODY, _headers(now + 1, header))


def test_sign_verifies_with_standardwebhooks_during_rotation() -> None:
    now = int(time.time())
    header = sign([decode_secret(SECRET_A), decode_secret(SECRET_B)], MSG_ID, now, BODY)
    assert len(header.split(" ")) == 2
    for secret in (SECRET_A, SECRET_B):
        assert Webhook(secret).verify(BODY, _headers(now, header), json_parse=False) is None
    with pytest.raises(WebhookVerificationError, match="No matching signature"):
        Webhook(SECRET_C).verify(BODY, _headers(now, header))


def test_standardwebhooks_signature_verifies_with_ours() -> None:
    now = int(time.time())
    theirs = Webhook(SECRET_A).sign(MSG_ID, datetime.fromtimestamp(now, UTC), BODY.decode())
    assert theirs == sign([KEY_A], MSG_ID, now, BODY)
    verify([KEY_A], MSG_ID, now, BODY, theirs, now=now)


# --- verify ------------------------------------------------------------------------------------

GOOD = sign([KEY_A], MSG_ID, TS, BODY)
BOTH = sign([KEY_A, KEY_B], MSG_ID, TS, BODY)

VERIFY_OK = [
    ("one key", [KEY_A], GOOD, TS),
    ("rotation: new key only", [KEY_B], BOTH, TS),
    ("rotation: old key only", [KEY_A], BOTH, TS),
    ("receiver holds several keys", [KEY_C, KEY_A], GOOD, TS),
    ("other versions ignored", [KEY_A], "v2,abc " + GOOD + " v1a,xyz", TS),
    ("extra spaces", [KEY_A], "  " + GOOD + "   ", TS),
    ("300 s old", [KEY_A], GOOD, TS + 300),
    ("300 s ahead", [KEY_A], GOOD, TS - 300),
]
VERIFY_BAD = [
    ("tampered body", [KEY_A], GOOD, TS, BODY.replace(b"u1", b"u2"), MSG_ID,
     "no matching signature"),
    ("other id", [KEY_A], GOOD, TS, BODY, "evt_other", "no matching signature"),
    ("wrong key", [KEY_B], GOOD, TS, BODY, MSG_ID, "no matching signature"),
    ("no keys", [], GOOD, TS, BODY, MSG_ID, "no matching signature"),
    ("empty header", [KEY_A], "", TS, BODY, MSG_ID, "no matching signature"),
    ("version missing", [KEY_A], GOOD[3:], TS, BODY, MSG_ID, "no matching signature"),
    ("wrong version", [KEY_A], "v2," + GOOD[3:], TS, BODY, MSG_ID, "no matching signature"),
    ("truncated signature", [KEY_A], GOOD[:-2], TS, BODY, MSG_ID, "no matching signature"),
    ("old timestamp", [KEY_A], GOOD, TS + 301, BODY, MSG_ID, "timestamp outside tolerance"),
    ("future timestamp", [KEY_A], GOOD, TS - 301, BODY, MSG_ID, "timestamp outside tolerance"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("keys", "header", "now"), [pytest.param(*row[1:], id=row[0]) for row in VERIFY_OK]
)
def test_verify_ok(keys: list[bytes], header: str, now: int) -> None:
    verify(keys, MSG_ID, TS, BODY, header, now=now)  # raises SignatureError on failure


@pytest.mark.parametrize(
    ("keys", "header", "now", "body", "msg_id", "error"),
    [pytest.param(*row[1:], id=row[0]) for row in VERIFY_BAD],
)
def test_verify_rejects(
    keys: list[bytes], header: str, now: int, body: bytes, msg_id: str, error: str
) -> None:
    with pytest.raises(SignatureError) as info:
        verify(keys, msg_id, TS, body, header, now=now)
    assert str(info.value) == error
    assert isinstance(info.value, ValueError)


def test_verify_signed_timestamp_is_part_of_the_signature() -> None:
    with pytest.raises(SignatureError, match="no matching signature"):
        verify([KEY_A], MSG_ID, TS + 1, BODY, GOOD, now=TS)


def test_verify_custom_tolerance() -> None:
    verify([KEY_A], MSG_ID, TS, BODY, GOOD, now=TS + 10, tolerance=10)
    with pytest.raises(SignatureError, match="timestamp outside tolerance"):
        verify([KEY_A], MSG_ID, TS, BODY, GOOD, now=TS + 11, tolerance=10)


# --- decode_secret -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("secret", "key"),
    [
        (SECRET_A, KEY_A),
        (SECRET_A.removeprefix("whsec_"), KEY_A),
        (SECRET_C, KEY_C),
        ("whsec_YQ==", b"a"),
    ],
    ids=["prefixed", "bare base64", "24 bytes", "one byte"],
)
def test_decode_secret(secret: str, key: bytes) -> None:
    assert decode_secret(secret) == key


BAD_SECRETS = [
    ("not base64", "whsec_s3cr3tQ9x*!", "not whsec_ followed by base64"),
    ("bad padding", "whsec_s3cr3tQ9x", "not whsec_ followed by base64"),
    ("non-ascii", "whsec_s3cr3tQ9xé=", "not whsec_ followed by base64"),
    ("spaces", "whsec_s3cr3t Q9x", "not whsec_ followed by base64"),
    ("empty", "whsec_", "empty key"),
    ("nothing", "", "empty key"),
]


@pytest.mark.parametrize(
    ("secret", "message"), [pytest.param(*row[1:], id=row[0]) for row in BAD_SECRETS]
)
def test_decode_secret_errors_do_not_echo_the_secret(secret: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        decode_secret(secret)
    assert str(info.value) == message
    assert info.value.__cause__ is None
    text = "".join(traceback.format_exception(info.value))
    assert "s3cr3t" not in text
    assert "Q9x" not in text
