"""User tokens (relay/tokens.py): sealing at rest and the per-endpoint policies (see the README)."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from typing import Any

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from relay import tokens
from relay.events import Message, parse_frame, prepare

SEAL_KEY = bytes(range(32))
OTHER_SEAL_KEY = bytes(range(1, 33))
ENDPOINT_KEY = bytes(range(100, 132))
TOKEN_VALUE = "2000611ea497d8ae4832c52166e0a26162cbb74716ab2662c50f8b47cdad3979"
EXPIRES = "2024-05-30T17:55:27.981Z"
EXPIRES_AT = datetime(2024, 5, 30, 17, 55, 27, 981000, tzinfo=UTC).timestamp()
VALID_NOW = EXPIRES_AT - 3600.0
EXPIRED_NOW = EXPIRES_AT + 1.0
TOKEN = {
    "token": TOKEN_VALUE,
    "expires": EXPIRES,
    "partner_user_id": "client_09e487c9-9b75-4ef5-be06-b3e5661f68e5",
    "scope": ["read"],  # unknown token fields are kept by `forward`
}
WEBHOOK_ID = "evt_" + "ab" * 32

# A message whose token is not the last payload key, with unknown fields around it.
FRAME = (
    '{"sequence":7,"recipient":"private.enterprise.users","timestamp":1717005327995988841,'
    '"x_top":{"k":[1,2]},"payload":{"user_id":"client_09e487c9-9b75-4ef5-be06-b3e5661f68e5",'
    '"status":"PENDING","user_token":' + json.dumps(TOKEN, separators=(",", ":")) + ","
    '"requirements":{"sms":true,"email":true},"zz":1234567890123456789012345}}'
)
STRIPPED = (
    b'{"sequence":7,"recipient":"private.enterprise.users","timestamp":1717005327995988841,'
    b'"x_top":{"k":[1,2]},"payload":{"user_id":"client_09e487c9-9b75-4ef5-be06-b3e5661f68e5",'
    b'"status":"PENDING","requirements":{"sms":true,"email":true},'
    b'"zz":1234567890123456789012345}}'
)
TOP_KEYS = ["sequence", "recipient", "timestamp", "x_top", "payload"]
PAYLOAD_KEYS = ["user_id", "status", "user_token", "requirements", "zz"]


def _stored(frame: str = FRAME, seal_key: bytes | None = SEAL_KEY) -> tuple[bytes, bool]:
    message = parse_frame(frame)
    assert isinstance(message, Message)
    event = prepare(message, seal_key=seal_key)
    return event.body, event.has_token


def _render(
    policy: tokens.Policy,
    *,
    body: bytes | None = None,
    has_token: bool = True,
    seal_key: bytes | None = SEAL_KEY,
    endpoint_key: bytes | None = ENDPOINT_KEY,
    webhook_id: str = WEBHOOK_ID,
    now: float = VALID_NOW,
) -> bytes:
    if body is None:
        body, has_token = _stored()
    return tokens.render(
        body,
        policy,
        has_token=has_token,
        seal_key=seal_key,
        endpoint_key=endpoint_key,
        webhook_id=webhook_id,
        now=now,
    )


# --- seal / unseal ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "token",
    [TOKEN, {"token": "x"}, {}, None, "plain", {"n": 1234567890123456789012345, "u": "é☃"}],
    ids=["docs", "minimal", "empty", "null", "string", "big int and unicode"],
)
def test_seal_unseal_round_trip(token: Any) -> None:
    sealed = tokens.seal(token, SEAL_KEY)
    assert list(sealed) == ["$sealed"]
    assert tokens.unseal(sealed, SEAL_KEY) == token


def test_sealed_form_hides_the_token_and_uses_fresh_nonces() -> None:
    a, b = tokens.seal(TOKEN, SEAL_KEY), tokens.seal(TOKEN, SEAL_KEY)
    assert a != b
    assert TOKEN_VALUE not in json.dumps(a)
    fixed = tokens.seal(TOKEN, SEAL_KEY, nonce=b"\x01" * 12)
    assert fixed == tokens.seal(TOKEN, SEAL_KEY, nonce=b"\x01" * 12)
    blob = base64.b64decode(fixed["$sealed"])
    assert blob[:12] == b"\x01" * 12
    plain = AESGCM(SEAL_KEY).decrypt(blob[:12], blob[12:], b"sfox-relay/user_token/v1")
    assert json.loads(plain) == TOKEN


GOOD_SEAL = tokens.seal(TOKEN, SEAL_KEY, nonce=b"\x02" * 12)
_BLOB = base64.b64decode(GOOD_SEAL["$sealed"])
TAMPERED = {"$sealed": base64.b64encode(_BLOB[:-1] + bytes([_BLOB[-1] ^ 1])).decode()}


@pytest.mark.parametrize(
    ("sealed", "key"),
    [
        pytest.param(GOOD_SEAL, OTHER_SEAL_KEY, id="wrong key"),
        pytest.param(GOOD_SEAL, bytes(16), id="wrong key size"),
        pytest.param(TAMPERED, SEAL_KEY, id="tampered"),
        pytest.param({"$sealed": "not base64!"}, SEAL_KEY, id="not base64"),
        pytest.param({"$sealed": ""}, SEAL_KEY, id="empty"),
        pytest.param({"$sealed": base64.b64encode(b"short").decode()}, SEAL_KEY, id="short"),
        pytest.param({"$sealed": 5}, SEAL_KEY, id="not a string"),
        pytest.param(TOKEN, SEAL_KEY, id="plaintext token"),
        pytest.param("x", SEAL_KEY, id="not a dict"),
        pytest.param(None, SEAL_KEY, id="None"),
    ],
)  # fmt: skip
def test_unseal_rejects(sealed: Any, key: bytes) -> None:
    with pytest.raises(ValueError) as info:
        tokens.unseal(sealed, key)
    assert TOKEN_VALUE not in str(info.value)


# --- is_expired ------------------------------------------------------------------------------

EXPIRY = [
    ("future", {"expires": EXPIRES}, VALID_NOW, False),
    ("one ms before", {"expires": EXPIRES}, EXPIRES_AT - 0.001, False),
    ("exactly at expiry", {"expires": "2024-05-30T17:55:27Z"},
     datetime(2024, 5, 30, 17, 55, 27, tzinfo=UTC).timestamp(), True),
    ("past", {"expires": EXPIRES}, EXPIRED_NOW, True),
    ("offset, future", {"expires": "2024-05-30T19:55:27.981+02:00"}, VALID_NOW, False),
    ("offset, past", {"expires": "2024-05-30T19:55:27.981+02:00"}, EXPIRED_NOW, True),
    ("missing", {"token": "x"}, VALID_NOW, True),
    ("null", {"expires": None}, VALID_NOW, True),
    ("number", {"expires": 4102444800}, VALID_NOW, True),
    ("unparseable", {"expires": "tomorrow"}, VALID_NOW, True),
    ("empty", {"expires": ""}, VALID_NOW, True),
    ("naive datetime, future", {"expires": "2099-01-01T00:00:00"}, VALID_NOW, True),
    ("date only", {"expires": "2099-01-01"}, VALID_NOW, True),
    ("token not a dict", "abc", VALID_NOW, True),
    ("token None", None, VALID_NOW, True),
]  # fmt: skip


@pytest.mark.parametrize(
    ("token", "now", "expired"), [pytest.param(*row[1:], id=row[0]) for row in EXPIRY]
)
def test_is_expired(token: Any, now: float, expired: bool) -> None:
    assert tokens.is_expired(token, now) is expired


# --- render ------------------------------------------------------------------------------------


def test_stored_body_is_sealed() -> None:
    body, has_token = _stored()
    assert has_token is True
    assert TOKEN_VALUE.encode() not in body


def test_render_forward_restores_the_exact_token() -> None:
    out = _render("forward")
    assert out == FRAME.encode()  # byte for byte what sFOX sent, compact
    assert json.loads(out)["payload"]["user_token"] == TOKEN


def test_render_strip() -> None:
    assert _render("strip") == STRIPPED
    assert _render("strip", seal_key=None) == STRIPPED


def test_render_encrypt() -> None:
    out = _render("encrypt")
    message = json.loads(out)
    assert list(message) == TOP_KEYS
    assert list(message["payload"]) == PAYLOAD_KEYS
    value = message["payload"]["user_token"]
    assert set(value) == {"alg", "nonce", "ciphertext", "expires", "partner_user_id"}
    assert value["alg"] == "A256GCM"
    assert value["expires"] == EXPIRES
    assert value["partner_user_id"] == TOKEN["partner_user_id"]
    nonce = base64.b64decode(value["nonce"], validate=True)
    ciphertext = base64.b64decode(value["ciphertext"], validate=True)
    assert len(nonce) == 12
    assert AESGCM(ENDPOINT_KEY).decrypt(nonce, ciphertext, WEBHOOK_ID.encode()) == (
        TOKEN_VALUE.encode()
    )
    assert tokens.decrypt(value, ENDPOINT_KEY, WEBHOOK_ID) == TOKEN_VALUE
    with pytest.raises(InvalidTag):
        AESGCM(ENDPOINT_KEY).decrypt(nonce, ciphertext, b"evt_other")
    with pytest.raises(InvalidTag):
        AESGCM(SEAL_KEY).decrypt(nonce, ciphertext, WEBHOOK_ID.encode())
    assert TOKEN_VALUE.encode() not in out
    # Everything but the token is as stored, in order.
    del message["payload"]["user_token"]
    assert message == json.loads(STRIPPED)
    assert out.startswith(STRIPPED[: STRIPPED.index(b'"requirements"')] + b'"user_token":{')
    assert out.endswith(
        b'},"requirements":{"sms":true,"email":true},"zz":1234567890123456789012345}}'
    )


def test_render_encrypt_uses_a_fresh_nonce_per_render() -> None:
    a = json.loads(_render("encrypt"))["payload"]["user_token"]
    b = json.loads(_render("encrypt"))["payload"]["user_token"]
    assert a["nonce"] != b["nonce"]


# policy x state -> expected bytes (None: "see the dedicated test above")
RENDER = [
    # (id, policy, kwargs, expected)
    ("strip, valid", "strip", {}, STRIPPED),
    ("forward, valid", "forward", {}, FRAME.encode()),
    ("strip, expired", "strip", {"now": EXPIRED_NOW}, STRIPPED),
    ("forward, expired", "forward", {"now": EXPIRED_NOW}, STRIPPED),
    ("encrypt, expired", "encrypt", {"now": EXPIRED_NOW}, STRIPPED),
    ("forward, seal key missing", "forward", {"seal_key": None}, STRIPPED),
    ("encrypt, seal key missing", "encrypt", {"seal_key": None}, STRIPPED),
    ("forward, seal key rotated away", "forward", {"seal_key": OTHER_SEAL_KEY}, STRIPPED),
    ("encrypt, seal key rotated away", "encrypt", {"seal_key": OTHER_SEAL_KEY}, STRIPPED),
    ("encrypt, no endpoint key", "encrypt", {"endpoint_key": None}, STRIPPED),
    ("strip, no token", "strip", {"body": STRIPPED, "has_token": False}, STRIPPED),
    ("forward, no token", "forward", {"body": STRIPPED, "has_token": False}, STRIPPED),
    ("encrypt, no token", "encrypt", {"body": STRIPPED, "has_token": False}, STRIPPED),
    ("has_token but body without token", "forward", {"body": STRIPPED, "has_token": True},
     STRIPPED),
]  # fmt: skip


@pytest.mark.parametrize(
    ("policy", "kwargs", "expected"), [pytest.param(*row[1:], id=row[0]) for row in RENDER]
)
def test_render_table(policy: tokens.Policy, kwargs: dict[str, Any], expected: bytes) -> None:
    assert _render(policy, **kwargs) == expected


@pytest.mark.parametrize("policy", ["strip", "forward", "encrypt"])
@pytest.mark.parametrize(
    "token",
    [
        pytest.param({"token": TOKEN_VALUE}, id="no expires"),
        pytest.param({"token": TOKEN_VALUE, "expires": "2099-01-01T00:00:00"}, id="naive"),
        pytest.param({"token": TOKEN_VALUE, "expires": "soon"}, id="unparseable"),
    ],
)
def test_render_doubtful_expiry_is_stripped(policy: tokens.Policy, token: dict[str, Any]) -> None:
    frame = FRAME.replace(json.dumps(TOKEN, separators=(",", ":")), json.dumps(token))
    body, has_token = _stored(frame)
    assert has_token is True
    assert _render(policy, body=body) == STRIPPED


@pytest.mark.parametrize("policy", ["strip", "forward", "encrypt"])
def test_render_without_a_token_at_all_is_unchanged(policy: tokens.Policy) -> None:
    frame = FRAME.replace('"user_token":' + json.dumps(TOKEN, separators=(",", ":")) + ",", "")
    body, has_token = _stored(frame)
    assert has_token is False
    assert body == STRIPPED
    assert _render(policy, body=body, has_token=has_token) == STRIPPED


@pytest.mark.parametrize("policy", ["strip", "forward", "encrypt"])
def test_render_output_never_holds_the_sealed_form(policy: tokens.Policy) -> None:
    assert b"$sealed" not in _render(policy)
    assert b"$sealed" not in _render(policy, now=EXPIRED_NOW)
