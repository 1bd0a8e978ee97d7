"""The pure event core (relay/events.py, relay/codec.py): tables, no I/O, deterministic.

Contract: the README (body, event id, reconciled events); the two example
messages are the ones in sfox/onboarding-feed-docs.txt (same sequence and timestamp, PENDING
then VERIFIED).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tracemalloc
from dataclasses import dataclass
from typing import Any

import pytest

from relay import tokens
from relay.codec import compact_json
from relay.events import (
    USERS_FEED,
    BadFrame,
    Control,
    Message,
    NewEvent,
    event_id,
    parse_frame,
    prepare,
    reconcile_event,
    reconcile_event_id,
    redact,
    routes,
    stored_excerpt,
    user_problem,
    without_controls,
)

TOKEN = "2000611ea497d8ae4832c52166e0a26162cbb74716ab2662c50f8b47cdad3979"
USER_ID = "client_09e487c9-9b75-4ef5-be06-b3e5661f68e5"
TS = 1717005327995988841  # 19 digits, above 2**53
SEAL_KEY = bytes(range(32))

# The docs' two messages, compact, keys in the docs' order.
_DOCS = (
    '{"sequence":5,"recipient":"private.enterprise.users","timestamp":1717005327995988841,'
    '"payload":{"user_id":"client_09e487c9-9b75-4ef5-be06-b3e5661f68e5","first_name":"Brando",'
    '"last_name":"Marks","email":"brando@example.com","phone_number":"+12223334444",'
    '"account_role":"Client","account_type":"individual","status":"%s",'
    '"user_token":{"token":"' + TOKEN + '","expires":"2024-05-30T17:55:27.981Z",'
    '"partner_user_id":"client_09e487c9-9b75-4ef5-be06-b3e5661f68e5"},'
    '"requirements":{"sms":%s,"email":%s}}}'
)
PENDING = _DOCS % ("PENDING", "true", "true")
VERIFIED = _DOCS % ("VERIFIED", "false", "false")
# The same, pretty-printed as in the docs (what a frame might really look like).
PENDING_PRETTY = json.dumps(json.loads(PENDING), indent=2)

# PENDING as stored with the token stripped: the exact bytes the contract wants.
PENDING_STRIPPED = (
    b'{"sequence":5,"recipient":"private.enterprise.users","timestamp":1717005327995988841,'
    b'"payload":{"user_id":"client_09e487c9-9b75-4ef5-be06-b3e5661f68e5","first_name":"Brando",'
    b'"last_name":"Marks","email":"brando@example.com","phone_number":"+12223334444",'
    b'"account_role":"Client","account_type":"individual","status":"PENDING",'
    b'"requirements":{"sms":true,"email":true}}}'
)


def _parse(frame: str | bytes) -> Message:
    result = parse_frame(frame)
    assert isinstance(result, Message), result
    return result


def _reference_id(basis: Any) -> str:
    """The event id computed independently of relay.codec."""
    text = json.dumps(basis, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "evt_" + hashlib.sha256(text.encode()).hexdigest()


def _feed_reference_id(frame: str) -> str:
    obj = json.loads(frame)
    payload = {k: v for k, v in obj["payload"].items() if k != "user_token"}
    return _reference_id(
        {"recipient": obj["recipient"], "timestamp": obj["timestamp"], "payload": payload}
    )


def _users(payload: str, **top: str) -> str:
    """A users-feed frame with the given payload JSON and top-level overrides."""
    fields = {"sequence": "1", "recipient": f'"{USERS_FEED}"', "timestamp": str(TS)}
    fields.update(top)
    inner = ",".join(f'"{k}":{v}' for k, v in fields.items() if v != "<absent>")
    return "{" + inner + (',"payload":' + payload if payload != "<absent>" else "") + "}"


# --- parse_frame: classification -----------------------------------------------------------

MESSAGES = [
    # (id, frame, sequence, recipient, timestamp, user_id, status)
    ("docs pending", PENDING, 5, USERS_FEED, TS, USER_ID, "PENDING"),
    ("docs verified pretty", json.dumps(json.loads(VERIFIED), indent=2), 5, USERS_FEED, TS,
     USER_ID, "VERIFIED"),
    ("docs pending as bytes", PENDING.encode(), 5, USERS_FEED, TS, USER_ID, "PENDING"),
    ("sequence null", _users('{"user_id":"u1"}', sequence="null"), None, USERS_FEED, TS, "u1",
     None),
    ("sequence absent", _users('{"user_id":"u1"}', sequence="<absent>"), None, USERS_FEED, TS,
     "u1", None),
    ("user_token null", _users('{"user_id":"u1","user_token":null}'), 1, USERS_FEED, TS, "u1",
     None),
    ("unknown status is data", _users('{"user_id":"u1","status":"FROZEN"}'), 1, USERS_FEED, TS,
     "u1", "FROZEN"),
    ("other feed needs no user_id", _users('{"balance":"1"}',
     recipient='"private.enterprise.users.balances"'), 1, "private.enterprise.users.balances",
     TS, None, None),
    ("other feed ignores user fields", _users('{"user_id":7,"user_token":"x"}',
     recipient='"private.enterprise.users.trades"'), 1, "private.enterprise.users.trades", TS,
     None, None),
    ("type success with recipient is data", _users('{"user_id":"u1"}', type='"success"'), 1,
     USERS_FEED, TS, "u1", None),
    ("negative sequence", _users('{"user_id":"u1"}', sequence="-3"), -3, USERS_FEED, TS, "u1",
     None),
]  # fmt: skip


@pytest.mark.parametrize(
    ("frame", "sequence", "recipient", "timestamp", "user_id", "status"),
    [pytest.param(*row[1:], id=row[0]) for row in MESSAGES],
)
def test_parse_frame_messages(
    frame: str | bytes,
    sequence: int | None,
    recipient: str,
    timestamp: int,
    user_id: str | None,
    status: str | None,
) -> None:
    result = parse_frame(frame)
    assert result == Message(json.loads(frame), sequence, recipient, timestamp, user_id, status)


CONTROLS = [
    # (id, frame, type, action, message)
    ("auth success", '{"type":"success","sequence":1,"timestamp":2,'
     '"payload":{"action":"authenticate"},"action":"authenticate"}',
     "success", "authenticate", None),
    ("subscribe success, action only in payload", '{"type":"success","sequence":2,"timestamp":3,'
     '"payload":{"action":"subscribe","feeds":["private.enterprise.users"]}}',
     "success", "subscribe", None),
    ("auth error, no message", '{"type":"error","sequence":1,"timestamp":2,'
     '"payload":{"action":"authenticate"}}', "error", "authenticate", None),
    ("auth error, top-level message", '{"type":"error","sequence":1,"timestamp":2,'
     '"payload":{"action":"authenticate"},"message":"invalid api key"}',
     "error", "authenticate", "invalid api key"),
    ("auth error, payload message", '{"type":"error","sequence":1,"timestamp":2,'
     '"payload":{"action":"authenticate","message":"invalid api key"}}',
     "error", "authenticate", "invalid api key"),
    ("error without payload", '{"type":"error"}', "error", None, None),
    ("error, payload not an object", '{"type":"error","payload":"nope","message":7}',
     "error", None, None),
]  # fmt: skip


@pytest.mark.parametrize(
    ("frame", "kind", "action", "message"),
    [pytest.param(*row[1:], id=row[0]) for row in CONTROLS],
)
def test_parse_frame_controls(
    frame: str, kind: str, action: str | None, message: str | None
) -> None:
    assert parse_frame(frame) == Control(kind, action, message, json.loads(frame))


_NEST = 100_000
BAD_FRAMES = [
    # (id, frame, reason)
    ("not JSON", "hello", "not JSON: JSONDecodeError"),
    ("empty", "", "not JSON: JSONDecodeError"),
    ("truncated", PENDING[:-3], "not JSON: JSONDecodeError"),
    ("JSON array", "[1,2]", "not a JSON object: list"),
    ("JSON string", '"x"', "not a JSON object: str"),
    ("JSON number", str(TS), "not a JSON object: int"),
    ("JSON null", "null", "not a JSON object: NoneType"),
    ("NaN", _users('{"user_id":"u1","x":NaN}'), "not JSON: ValueError"),
    ("Infinity", _users('{"user_id":"u1","x":Infinity}'), "not JSON: ValueError"),
    ("-Infinity", _users('{"user_id":"u1"}', timestamp="-Infinity"), "not JSON: ValueError"),
    ("invalid UTF-8", b'{"recipient":"\xff\xfe"}', "not JSON: UnicodeDecodeError"),
    ("deeply nested", "[" * _NEST + "]" * _NEST, "not JSON: RecursionError"),
    ("deeply nested object", '{"a":' * _NEST + "1" + "}" * _NEST, "not JSON: RecursionError"),
    ("payload missing", _users("<absent>"), "payload missing or not an object"),
    ("payload null", _users("null"), "payload missing or not an object"),
    ("payload array", _users("[]"), "payload missing or not an object"),
    ("payload string", _users('"{}"'), "payload missing or not an object"),
    ("recipient missing", _users('{"user_id":"u1"}', recipient="<absent>"),
     "recipient missing or not a string"),
    ("recipient number", _users('{"user_id":"u1"}', recipient="5"),
     "recipient missing or not a string"),
    ("recipient empty", _users('{"user_id":"u1"}', recipient='""'),
     "recipient missing or not a string"),
    ("timestamp missing", _users('{"user_id":"u1"}', timestamp="<absent>"),
     "timestamp missing or not an integer"),
    ("timestamp string", _users('{"user_id":"u1"}', timestamp=f'"{TS}"'),
     "timestamp missing or not an integer"),
    ("timestamp true", _users('{"user_id":"u1"}', timestamp="true"),
     "timestamp missing or not an integer"),
    ("timestamp false", _users('{"user_id":"u1"}', timestamp="false"),
     "timestamp missing or not an integer"),
    ("timestamp float", _users('{"user_id":"u1"}', timestamp="1717005327.995"),
     "timestamp missing or not an integer"),
    ("timestamp null", _users('{"user_id":"u1"}', timestamp="null"),
     "timestamp missing or not an integer"),
    ("sequence string", _users('{"user_id":"u1"}', sequence='"5"'), "sequence not an integer"),
    ("sequence true", _users('{"user_id":"u1"}', sequence="true"), "sequence not an integer"),
    ("sequence float", _users('{"user_id":"u1"}', sequence="5.0"), "sequence not an integer"),
    ("users feed without user_id", _users('{"status":"PENDING"}'),
     "payload.user_id missing or not a string"),
    ("user_id number", _users('{"user_id":5}'), "payload.user_id missing or not a string"),
    ("user_id empty", _users('{"user_id":""}'), "payload.user_id missing or not a string"),
    ("status number", _users('{"user_id":"u1","status":1}'), "payload.status not a string"),
    ("requirements array", _users('{"user_id":"u1","requirements":["sms"]}'),
     "payload.requirements not an object"),
    ("user_token string", _users('{"user_id":"u1","user_token":"' + TOKEN + '"}'),
     "payload.user_token not an object"),
    ("user_token array", _users('{"user_id":"u1","user_token":["' + TOKEN + '"]}'),
     "payload.user_token not an object"),
    ("type error but a data message without recipient", '{"type":"data","payload":{}}',
     "recipient missing or not a string"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("frame", "reason"), [pytest.param(*row[1:], id=row[0]) for row in BAD_FRAMES]
)
def test_parse_frame_bad_frames(frame: str | bytes, reason: str) -> None:
    result = parse_frame(frame)
    assert isinstance(result, BadFrame)
    assert result.reason == reason
    assert len(result.text) <= 64 * 1024


def test_bad_frame_text_is_redacted() -> None:
    frame = _users('{"status":"PENDING","user_token":{"token":"' + TOKEN + '"}}')
    result = parse_frame(frame)
    assert result == BadFrame(
        "payload.user_id missing or not a string",
        '{"sequence":1,"recipient":"private.enterprise.users","timestamp":1717005327995988841,'
        '"payload":{"status":"PENDING","user_token":"[redacted]"}}',
    )


def test_bad_frame_non_json_text_is_redacted() -> None:
    result = parse_frame(PENDING[: PENDING.index(TOKEN) + 40])
    assert isinstance(result, BadFrame)
    assert TOKEN[:40] not in result.text
    assert '"user_token":"[redacted]"' in result.text
    assert result.text.startswith('{"sequence":5,"recipient":"private.enterprise.users"')


def test_parse_frame_rejects_overflowing_float() -> None:
    result = parse_frame(_users('{"user_id":"u1","x":1e400}'))
    assert isinstance(result, BadFrame)
    assert result.reason.startswith("not JSON")


@pytest.mark.parametrize(
    "frame",
    [
        _users('{"user_id":"u1","first_name":"\\ud800"}'),
        _users('{"user_id":"u1","first_name":"x"}').encode().replace(b'"x"', b'"\xed\xa0\x80"'),
    ],
    ids=["escaped", "utf-8 encoded surrogate bytes"],
)
def test_parse_frame_then_prepare_never_raises_on_lone_surrogate(frame: str | bytes) -> None:
    result = parse_frame(frame)
    if isinstance(result, Message):
        event = prepare(result, seal_key=None)
        assert event.event_id.startswith("evt_")
    else:
        assert isinstance(result, BadFrame)


# --- the input boundary (CONTRACT.md section 5: "Bad input never stops the relay") -------------


def _nested(depth: int) -> str:
    """A payload value that takes ``depth`` levels of its own."""
    return "[" * depth + "]" * depth


BOUNDARY = [
    ("NUL in user_id", _users('{"user_id":"u\\u0000x"}'),
     "payload.user_id holds a control character"),
    ("tab in user_id", _users('{"user_id":"u\\tx"}'), "payload.user_id holds a control character"),
    ("C1 control in status", _users('{"user_id":"u1","status":"OK\\u0085"}'),
     "payload.status holds a control character"),
    ("DEL in recipient", _users('{"user_id":"u1"}', recipient='"private.enterprise.users\\u007f"'),
     "recipient holds a control character"),
    ("NUL in another feed's recipient", _users("{}", recipient='"x\\u0000"'),
     "recipient holds a control character"),
    ("user_id of 257", _users('{"user_id":"' + "u" * 257 + '"}'),
     "payload.user_id longer than 256 characters"),
    ("user_id of 5 kB", _users('{"user_id":"' + "é" * 2500 + '"}'),
     "payload.user_id longer than 256 characters"),
    ("status of 257", _users('{"user_id":"u1","status":"' + "S" * 257 + '"}'),
     "payload.status longer than 256 characters"),
    ("recipient of 257", _users("{}", recipient='"' + "r" * 257 + '"'),
     "recipient longer than 256 characters"),
    # message 1, payload 2, the list 63 more: 65 levels.
    ("65 levels", _users('{"user_id":"u1","x":' + _nested(63) + "}"),
     "nested deeper than 64 levels"),
    ("65 levels in another feed", _users('{"x":' + _nested(63) + "}", recipient='"other"'),
     "nested deeper than 64 levels"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("frame", "reason"), [pytest.param(*row[1:], id=row[0]) for row in BOUNDARY]
)
def test_boundary_refuses_what_no_store_or_hash_can_take(frame: str, reason: str) -> None:
    result = parse_frame(frame)
    assert isinstance(result, BadFrame)
    assert result.reason == reason
    assert not any(c in result.text for c in "\x00\t\x7f\x85")


@pytest.mark.parametrize(
    "frame",
    [
        pytest.param(_users('{"user_id":"' + "u" * 256 + '"}'), id="user_id of 256"),
        pytest.param(_users('{"user_id":"u1","x":' + _nested(62) + "}"), id="64 levels"),
        pytest.param(_users('{"user_id":"u1","note":"a\\u0000b"}'), id="NUL in another field"),
    ],
)
def test_boundary_admits_what_is_within_it(frame: str) -> None:
    result = parse_frame(frame)
    assert isinstance(result, Message)
    assert prepare(result, seal_key=None).event_id.startswith("evt_")


def test_nesting_just_under_the_parsers_limit_is_a_bad_frame_not_a_crash() -> None:
    # The deepest frame the parser still takes here (~970 levels): it used to become a
    # Message whose event id then hit the recursion limit, ending `relay run`.
    def frame(depth: int) -> str:
        return _users('{"user_id":"u1","x":' + _nested(depth) + "}")

    depth = 100
    while True:
        try:
            json.loads(frame(depth + 10))
        except RecursionError:
            break
        depth += 10
    result = parse_frame(frame(depth))
    assert isinstance(result, BadFrame)
    assert result.reason == "nested deeper than 64 levels"


def test_a_frame_over_1_mib_is_a_bad_frame_redacted() -> None:
    just = _users('{"user_id":"u1","note":"@"}')
    at_limit = just.replace("@", "n" * (1024 * 1024 - len(just) + 1))
    assert len(at_limit.encode()) == 1024 * 1024
    assert isinstance(parse_frame(at_limit), Message)
    over = _users('{"user_id":"u1","user_token":{"token":"' + TOKEN + '"},"note":"@"}')
    over = over.replace("@", "é" * (512 * 1024))  # fewer characters than bytes
    for frame in (over, over.encode()):
        result = parse_frame(frame)
        assert isinstance(result, BadFrame)
        assert "over the 1,048,576-byte limit" in result.reason
        assert TOKEN not in result.text and len(result.text) <= 64 * 1024


def test_a_deep_bad_frame_is_redacted_by_pattern() -> None:
    frame = _users('{"user_token":{"token":"' + TOKEN + '"},"x":' + _nested(500) + "}")
    result = parse_frame(frame)
    assert isinstance(result, BadFrame)
    assert TOKEN not in result.text


def test_a_non_json_frame_with_a_nul_is_kept_without_it() -> None:
    result = parse_frame('{"user_id":"a\x00b" not json\r\n')
    assert isinstance(result, BadFrame)
    assert result.text == '{"user_id":"a\ufffdb" not json  '


@pytest.mark.parametrize(
    ("user", "problem"),
    [
        ({"user_id": "u1", "status": "VERIFIED", "requirements": {}}, None),
        ({"user_id": "u\x00"}, "payload.user_id holds a control character"),
        ({"user_id": "u" * 300}, "payload.user_id longer than 256 characters"),
        ({"user_id": "u1", "status": "\x00"}, "payload.status holds a control character"),
        ({"user_id": "u1", "status": 3}, "payload.status not a string"),
        ({"user_id": 7}, "payload.user_id missing or not a string"),
        ({"user_id": "u1", "requirements": []}, "payload.requirements not an object"),
        ({"user_id": "u1", "x": "\ud800"}, "not JSON: unencodable string"),
        ("u1", "not a JSON object"),
    ],
)
def test_rest_users_pass_the_same_boundary(user: Any, problem: str | None) -> None:
    assert user_problem(user) == problem


def test_rest_user_depth_counts_from_the_message_it_becomes() -> None:
    def nested(levels: int) -> Any:
        value: Any = []
        for _ in range(levels - 1):
            value = [value]
        return value

    # message 1, the user (its payload) 2, then the list: 62 levels of list make 64.
    assert user_problem({"user_id": "u1", "x": nested(62)}) is None
    assert user_problem({"user_id": "u1", "x": nested(63)}) == "nested deeper than 64 levels"
    event = reconcile_event({"user_id": "u1", "x": nested(62)}, after=None, now_ns=TS)
    assert event.event_id.startswith("evt_")


@pytest.mark.parametrize(
    ("text", "clean"),
    [
        ("plain text", "plain text"),
        ("a\tb\r\nc", "a b  c"),
        ("nul\x00 esc\x1b[31m del\x7f c1\x9f", "nul\ufffd esc\ufffd[31m del\ufffd c1\ufffd"),
        ("é ✓ \u2028", "é ✓ \u2028"),  # not category Cc: kept
    ],
)
def test_without_controls(text: str, clean: str) -> None:
    assert without_controls(text) == clean


def test_stored_excerpt_is_redacted_before_it_is_cut() -> None:
    secret = "s3cr3t-value-" + "k" * 40

    def mask(text: str) -> str:
        return text.replace(secret, "[redacted]")

    # The secret straddles the 1 KiB mark: cut first, its head would escape the redactor.
    body = "x" * 1000 + secret + "\x00" * 2000
    excerpt = stored_excerpt(body, mask)
    assert excerpt is not None
    assert "s3cr3t" not in excerpt and "[redacted]" in excerpt
    assert len(excerpt.encode()) <= 1024
    assert not any(c in excerpt for c in "\x00\n")
    assert stored_excerpt("é" * 600, mask) == "é" * 512  # never half a character
    assert stored_excerpt("", mask) is None and stored_excerpt(None, mask) is None


# --- exact bytes -----------------------------------------------------------------------------


def test_docs_message_body_is_exact() -> None:
    for frame in (PENDING, PENDING_PRETTY):
        assert prepare(_parse(frame), seal_key=None).body == PENDING_STRIPPED


BIG = 1234567890123456789012345  # 25 digits, beyond 64 bits


@pytest.mark.parametrize(
    ("frame", "body"),
    [
        pytest.param(
            '{"sequence":1,"recipient":"private.enterprise.users","timestamp":1717005327995988841,'
            '"payload":{"user_id":"u1","n":1234567890123456789012345}}',
            b'{"sequence":1,"recipient":"private.enterprise.users","timestamp":1717005327995988841,'
            b'"payload":{"user_id":"u1","n":1234567890123456789012345}}',
            id="25-digit payload integer",
        ),
        pytest.param(
            '{"sequence":1234567890123456789012345,"recipient":"x.y",'
            '"timestamp":1234567890123456789012345,"payload":{}}',
            b'{"sequence":1234567890123456789012345,"recipient":"x.y",'
            b'"timestamp":1234567890123456789012345,"payload":{}}',
            id="25-digit timestamp and sequence",
        ),
        pytest.param(
            '{"timestamp":-9223372036854775809,"recipient":"x.y","sequence":18446744073709551616,'
            '"payload":{"a":18446744073709551615}}',
            b'{"timestamp":-9223372036854775809,"recipient":"x.y","sequence":18446744073709551616,'
            b'"payload":{"a":18446744073709551615}}',
            id="64-bit edges",
        ),
        pytest.param(
            '{ "payload" : {"zeta":1, "user_id":"u1", "alpha":{"z":[3,2,1],"a":null}},'
            ' "zz_unknown":[true,false], "timestamp":1717005327995988841,'
            ' "recipient":"private.enterprise.users", "aa_unknown":"k", "sequence":2 }',
            b'{"payload":{"zeta":1,"user_id":"u1","alpha":{"z":[3,2,1],"a":null}},'
            b'"zz_unknown":[true,false],"timestamp":1717005327995988841,'
            b'"recipient":"private.enterprise.users","aa_unknown":"k","sequence":2}',
            id="received key order and unknown fields kept",
        ),
        pytest.param(
            '{"sequence":1,"recipient":"private.enterprise.users","timestamp":1,'
            '"payload":{"user_id":"u1","first_name":"J\\u00f6rg \\u2603","note":"a\\"b\\\\c\\n"}}',
            '{"sequence":1,"recipient":"private.enterprise.users","timestamp":1,'
            '"payload":{"user_id":"u1","first_name":"Jörg ☃","note":"a\\"b\\\\c\\n"}}'.encode(),
            id="unicode as UTF-8",
        ),
    ],
)
def test_body_bytes_exact(frame: str, body: bytes) -> None:
    message = _parse(frame)
    event = prepare(message, seal_key=None)
    assert event.body == body
    assert event.body == prepare(message, seal_key=SEAL_KEY).body  # no token: same either way
    assert json.loads(event.body) == json.loads(frame)


def test_timestamp_parsed_as_exact_int() -> None:
    message = _parse(PENDING)
    assert message.timestamp == 1717005327995988841
    assert type(message.timestamp) is int
    assert b"1717005327995988841" in prepare(message, seal_key=SEAL_KEY).body


# --- event ids ---------------------------------------------------------------------------------


def test_docs_pending_and_verified_are_two_events() -> None:
    pending, verified = _parse(PENDING), _parse(VERIFIED)
    assert pending.sequence == verified.sequence
    assert pending.timestamp == verified.timestamp
    assert prepare(pending, seal_key=None).event_id != prepare(verified, seal_key=None).event_id


def _variant(frame: str, **changes: Any) -> str:
    obj = json.loads(frame)
    for path, value in changes.items():
        *parents, leaf = path.split("__")
        target = obj
        for p in parents:
            target = target[p]
        if value is ...:
            del target[leaf]
        else:
            target[leaf] = value
    return json.dumps(obj)


SAME_EVENT = [
    ("same frame again", PENDING),
    ("pretty-printed", PENDING_PRETTY),
    ("other sequence", _variant(PENDING, sequence=6)),
    ("sequence null", _variant(PENDING, sequence=None)),
    ("no sequence", _variant(PENDING, sequence=...)),
    ("other token", _variant(PENDING, payload__user_token__token="f" * 64)),
    ("other token expiry", _variant(PENDING, payload__user_token__expires="2030-01-01T00:00:00Z")),
    ("no token", _variant(PENDING, payload__user_token=...)),
    ("top-level unknown field", _variant(PENDING, relay_extra=1)),
    ("key order", json.dumps(dict(reversed(list(json.loads(PENDING).items()))))),
]
OTHER_EVENT = [
    ("verified", VERIFIED),
    ("other timestamp", _variant(PENDING, timestamp=TS + 1)),
    ("other recipient", _variant(PENDING, recipient="private.enterprise.users.trades")),
    ("other requirements", _variant(PENDING, payload__requirements__sms=False)),
    ("payload unknown field", _variant(PENDING, payload__extra=None)),
    ("other email", _variant(PENDING, payload__email="b@example.com")),
]


@pytest.mark.parametrize("frame", [pytest.param(f, id=i) for i, f in SAME_EVENT])
def test_event_id_same_message_one_id(frame: str) -> None:
    expected = prepare(_parse(PENDING), seal_key=None).event_id
    assert prepare(_parse(frame), seal_key=None).event_id == expected
    assert prepare(_parse(frame), seal_key=SEAL_KEY).event_id == expected


@pytest.mark.parametrize("frame", [pytest.param(f, id=i) for i, f in OTHER_EVENT])
def test_event_id_different_message_other_id(frame: str) -> None:
    assert prepare(_parse(frame), seal_key=None).event_id != event_id(json.loads(PENDING))


@pytest.mark.parametrize(
    "frame",
    [
        pytest.param(PENDING, id="docs pending"),
        pytest.param(VERIFIED, id="docs verified"),
        pytest.param(_users('{"user_id":"u1","n":' + str(BIG) + "}"), id="25-digit int"),
        pytest.param(_users('{"user_id":"u1","n":-9223372036854775808}'), id="int64 min"),
        pytest.param(
            _users('{"user_id":"u1","name":"J\\u00f6rg \\u2603 \\ud83d\\ude00","c":"\\u001f\\t"}'),
            id="unicode and escapes",
        ),
        pytest.param(
            _users('{"user_id":"u1","\\u00e9":1,"e":2,"E":3,"\\uffff":4,"\\ud800\\udc00":5}'),
            id="non-ascii keys sort by code point",
        ),
        pytest.param(_users('{"user_id":"u1","z":{"b":[{"y":1,"x":2}],"a":{}}}'), id="nested sort"),
        pytest.param(
            _users('{"x":1.5}', recipient='"private.enterprise.users.balances"'), id="plain float"
        ),
        pytest.param(
            _users('{"x":1e-07}', recipient='"private.enterprise.users.balances"'),
            id="float with exponent",
        ),
    ],
)
def test_event_id_equals_independent_reference(frame: str) -> None:
    message = _parse(frame)
    expected = _feed_reference_id(frame)
    assert event_id(message.raw) == expected
    assert prepare(message, seal_key=None).event_id == expected
    assert prepare(message, seal_key=SEAL_KEY).event_id == expected


def test_event_id_docs_value_is_pinned() -> None:
    # Pinned so a change of canonical form (which would re-deliver everything) is noticed.
    basis = (
        '{"payload":{"account_role":"Client","account_type":"individual",'
        '"email":"brando@example.com","first_name":"Brando","last_name":"Marks",'
        '"phone_number":"+12223334444","requirements":{"email":true,"sms":true},'
        '"status":"PENDING","user_id":"client_09e487c9-9b75-4ef5-be06-b3e5661f68e5"},'
        '"recipient":"private.enterprise.users","timestamp":1717005327995988841}'
    )
    expected = "evt_" + hashlib.sha256(basis.encode()).hexdigest()
    assert event_id(json.loads(PENDING)) == expected


RECONCILE_IDS = [
    ("baseline", "u1", "PENDING", {"sms": True, "email": True}, None),
    ("after an event", "u1", "VERIFIED", {"sms": False, "email": False}, "evt_" + "a" * 64),
    ("no requirements", "u1", "PENDING", None, None),
    ("unicode", "üser", "UNSUPPORTED", {"b": 1, "a": BIG}, "evt_x"),
]


@pytest.mark.parametrize(
    ("user_id", "status", "requirements", "after"),
    [pytest.param(*row[1:], id=row[0]) for row in RECONCILE_IDS],
)
def test_reconcile_event_id_equals_independent_reference(
    user_id: str, status: str, requirements: Any, after: str | None
) -> None:
    expected = _reference_id(
        {"user_id": user_id, "status": status, "requirements": requirements, "after": after}
    )
    assert reconcile_event_id(user_id, status, requirements, after) == expected


def test_reconcile_event_id_distinguishes_each_field() -> None:
    base = ("u1", "PENDING", {"sms": True}, None)
    variants = [
        ("u2", "PENDING", {"sms": True}, None),
        ("u1", "VERIFIED", {"sms": True}, None),
        ("u1", "PENDING", {"sms": False}, None),
        ("u1", "PENDING", {"sms": True}, "evt_1"),
        ("u1", "PENDING", {"sms": True}, "evt_2"),
    ]
    ids = {reconcile_event_id(*base)} | {reconcile_event_id(*v) for v in variants}
    assert len(ids) == 1 + len(variants)
    assert reconcile_event_id(*base) == reconcile_event_id("u1", "PENDING", {"sms": True}, None)


# --- reconcile_event -----------------------------------------------------------------------------

REST_USER = {
    "account_type": "individual",
    "account_role": "Client",
    "user_id": USER_ID,
    "advisor_user_id": None,
    "email": "brando@example.com",
    "first_name": "Brando",
    "last_name": "Marks",
    "phone_number": "+12223334444",
    "status": "VERIFIED",
    "requirements": {"sms": False, "email": False},
}


def test_reconcile_event_shape() -> None:
    after = "evt_" + "0" * 64
    event = reconcile_event(REST_USER, after=after, now_ns=TS)
    assert event == NewEvent(
        event_id=_reference_id(
            {
                "user_id": USER_ID,
                "status": "VERIFIED",
                "requirements": {"sms": False, "email": False},
                "after": after,
            }
        ),
        source="reconcile",
        recipient=USERS_FEED,
        user_id=USER_ID,
        status="VERIFIED",
        requirements='{"email":false,"sms":false}',
        body=(
            b'{"sequence":null,"recipient":"private.enterprise.users",'
            b'"timestamp":1717005327995988841,"payload":{"account_type":"individual",'
            b'"account_role":"Client","user_id":"client_09e487c9-9b75-4ef5-be06-b3e5661f68e5",'
            b'"advisor_user_id":null,"email":"brando@example.com","first_name":"Brando",'
            b'"last_name":"Marks","phone_number":"+12223334444","status":"VERIFIED",'
            b'"requirements":{"sms":false,"email":false}}}'
        ),
        has_token=False,
        after=after,
    )


def test_reconcile_event_never_carries_a_token() -> None:
    user = {**REST_USER, "user_token": {"token": TOKEN, "expires": "2099-01-01T00:00:00Z"}}
    event = reconcile_event(user, after=None, now_ns=1)
    body = json.loads(event.body)
    assert "user_token" not in body["payload"]
    assert TOKEN.encode() not in event.body
    assert event.has_token is False
    assert event.event_id == reconcile_event(REST_USER, after=None, now_ns=2).event_id


def test_reconcile_event_id_independent_of_time_and_other_fields() -> None:
    a = reconcile_event(REST_USER, after=None, now_ns=1)
    b = reconcile_event({**REST_USER, "email": "other@example.com"}, after=None, now_ns=2)
    assert a.event_id == b.event_id
    assert a.body != b.body
    c = reconcile_event({**REST_USER, "status": "PENDING"}, after=None, now_ns=1)
    assert c.event_id != a.event_id


# --- prepare -----------------------------------------------------------------------------------


def test_prepare_without_seal_key_strips_the_token() -> None:
    message = _parse(PENDING)
    event = prepare(message, seal_key=None)
    assert event == NewEvent(
        event_id=_feed_reference_id(PENDING),
        source="feed",
        recipient=USERS_FEED,
        user_id=USER_ID,
        status="PENDING",
        requirements='{"email":true,"sms":true}',
        body=PENDING_STRIPPED,
        has_token=False,
        after=None,
    )
    assert TOKEN.encode() not in event.body
    assert b"user_token" not in event.body
    # The message itself is untouched.
    assert message.raw["payload"]["user_token"]["token"] == TOKEN


def test_prepare_with_seal_key_seals_the_token() -> None:
    message = _parse(PENDING)
    event = prepare(message, seal_key=SEAL_KEY)
    assert event.has_token is True
    assert TOKEN.encode() not in event.body
    assert TOKEN[:16].encode() not in event.body
    body = json.loads(event.body)
    original = json.loads(PENDING)
    assert list(body) == list(original)
    assert list(body["payload"]) == list(original["payload"])
    sealed = body["payload"].pop("user_token")
    assert tokens.unseal(sealed, SEAL_KEY) == original["payload"]["user_token"]
    del original["payload"]["user_token"]
    assert body == original
    assert event.event_id == prepare(message, seal_key=None).event_id
    assert message.raw["payload"]["user_token"]["token"] == TOKEN


@pytest.mark.parametrize("seal_key", [None, SEAL_KEY], ids=["no key", "key"])
def test_prepare_message_without_token(seal_key: bytes | None) -> None:
    frame = _variant(PENDING, payload__user_token=...)
    event = prepare(_parse(frame), seal_key=seal_key)
    assert event.has_token is False
    assert event.body == PENDING_STRIPPED


def test_prepare_other_feed() -> None:
    frame = _users('{"currency":"btc","user_token":{"token":"x"}}', recipient='"a.b"')
    event = prepare(_parse(frame), seal_key=None)
    assert (event.recipient, event.user_id, event.status, event.requirements) == (
        "a.b",
        None,
        None,
        None,
    )
    assert event.body == (b'{"sequence":1,"recipient":"a.b","timestamp":1717005327995988841,'
                          b'"payload":{"currency":"btc"}}')  # fmt: skip


# --- routes ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ep:
    name: str
    feeds: frozenset[str] | None = None
    statuses: frozenset[str] | None = None


def _event(recipient: str = USERS_FEED, status: str | None = "PENDING") -> NewEvent:
    return NewEvent("evt_1", "feed", recipient, "u1", status, None, b"{}", False)


ALL = Ep("all")
USERS_ONLY = Ep("users", feeds=frozenset({USERS_FEED}))
TRADES_ONLY = Ep("trades", feeds=frozenset({"private.enterprise.users.trades"}))
VERIFIED_ONLY = Ep("verified", statuses=frozenset({"VERIFIED"}))
PENDING_OR_VERIFIED = Ep("pv", statuses=frozenset({"PENDING", "VERIFIED"}))
USERS_VERIFIED = Ep("uv", feeds=frozenset({USERS_FEED}), statuses=frozenset({"VERIFIED"}))
NOTHING = Ep("none", feeds=frozenset())
ENDPOINTS = [ALL, USERS_ONLY, TRADES_ONLY, VERIFIED_ONLY, PENDING_OR_VERIFIED, USERS_VERIFIED,
             NOTHING]  # fmt: skip

ROUTES = [
    ("users pending", _event(status="PENDING"), ["all", "users", "pv"]),
    ("users verified", _event(status="VERIFIED"), ["all", "users", "verified", "pv", "uv"]),
    ("users unknown status", _event(status="FROZEN"), ["all", "users"]),
    ("users no status", _event(status=None), ["all", "users"]),
    ("trades", _event("private.enterprise.users.trades", None), ["all", "trades"]),
    ("balances", _event("private.enterprise.users.balances", None), ["all"]),
]


@pytest.mark.parametrize(("event", "names"), [pytest.param(*row[1:], id=row[0]) for row in ROUTES])
def test_routes(event: NewEvent, names: list[str]) -> None:
    assert routes(ENDPOINTS, event) == names


def test_routes_keeps_endpoint_order_and_handles_none() -> None:
    assert routes([], _event()) == []
    assert routes([PENDING_OR_VERIFIED, ALL], _event()) == ["pv", "all"]


# --- redact ----------------------------------------------------------------------------------

REDACT = [
    ("auth request", '{"type":"authenticate","apiKey":"k3y-v4lue","enterprise":"true"}',
     '{"type":"authenticate","apiKey":"[redacted]","enterprise":"true"}'),
    ("user_token object", PENDING,
     PENDING.replace(PENDING[PENDING.index('{"token"'):PENDING.index("},") + 1], '"[redacted]"')),
    ("token, api_key, apikey anywhere", '[{"a":{"token":1,"api_key":[2],"apikey":null}},"t"]',
     '[{"a":{"token":"[redacted]","api_key":"[redacted]","apikey":"[redacted]"}},"t"]'),
    ("other keys kept in order", '{"b":1,"a":{"tokens":"x","Token":"y"}}',
     '{"b":1,"a":{"tokens":"x","Token":"y"}}'),
    ("big ints exact", '{"timestamp":1234567890123456789012345,"token":"x"}',
     '{"timestamp":1234567890123456789012345,"token":"[redacted]"}'),
    ("text: truncated user_token object", PENDING[: PENDING.index("2024-05-30") + 5],
     PENDING[: PENDING.index('{"token"')] + '"[redacted]"'),
    ("text: quoted apiKey, unterminated", '{"type":"authenticate","apiKey":"k3y-v4',
     '{"type":"authenticate","apiKey":"[redacted]"'),
    ("text: bare value with spaces", '{"apiKey" :  k3y-v4lue, "x": 1',
     '{"apiKey" :  "[redacted]", "x": 1'),
    ("text: escaped quote inside token", '{"token":"a\\"b" oops',
     '{"token":"[redacted]" oops'),
    ("text: 64-hex token", f"garbage {TOKEN} more", "garbage [redacted] more"),
    ("text: 32-hex", "x " + "A" * 32 + " y", "x [redacted] y"),
    ("text: 31-hex kept", "x " + "a" * 31 + " y", "x " + "a" * 31 + " y"),
    ("text: evt id kept", "bad evt_" + "a" * 64, "bad evt_" + "a" * 64),
    ("text: nothing secret", "hello world", "hello world"),
    ("bytes: invalid UTF-8", b"\xff " + TOKEN.encode() + b"\xfe", "\ufffd [redacted]\ufffd"),
    ("bytes: JSON", b'{"apiKey":"k"}', '{"apiKey":"[redacted]"}'),
]  # fmt: skip


@pytest.mark.parametrize(
    ("data", "expected"), [pytest.param(*row[1:], id=row[0]) for row in REDACT]
)
def test_redact(data: str | bytes, expected: str) -> None:
    assert redact(data) == expected


def test_redact_mapping() -> None:
    frame = json.loads(PENDING)
    text = redact(frame)
    assert TOKEN not in text
    assert json.loads(text)["payload"]["user_token"] == "[redacted]"
    assert frame["payload"]["user_token"]["token"] == TOKEN  # input untouched
    assert redact({"apiKey": "k", "n": BIG}) == '{"apiKey":"[redacted]","n":' + str(BIG) + "}"


@pytest.mark.parametrize(
    "data",
    [
        pytest.param("x" * 200_000, id="text"),
        pytest.param('{"a":"' + "x" * 200_000 + '"}', id="json"),
        pytest.param({"a": "x" * 200_000}, id="mapping"),
        pytest.param(("deadbeef " * 30_000).encode(), id="bytes"),
    ],
)
def test_redact_is_bounded(data: Any) -> None:
    assert len(redact(data)) == 64 * 1024


@pytest.mark.parametrize(
    "frame",
    [f'["{TOKEN}"]', f'"{TOKEN}"', '{"payload":{"userToken":"' + TOKEN + '"}}'],
    ids=["array", "string", "renamed key"],
)
def test_redact_json_hides_hex_tokens_anywhere(frame: str) -> None:
    assert TOKEN not in redact(frame)


# -- footprint ------------------------------------------------------------------------------


def test_compact_json_keeps_no_spare_buffer() -> None:
    # orjson writes into a 4 KiB block and keeps it: a batch of a thousand bodies held that
    # way cost ~8 MB of resident memory.
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        body = compact_json({"payload": {"user_id": "u" * 300}})
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(body) > 300
    assert grown < 2 * len(body), grown


def test_the_daemon_does_not_load_aes_until_a_token_is_sealed() -> None:
    # cryptography's bindings are ~7 MB resident; most relays strip tokens and never use them.
    probe = (
        "import sys, relay.app, relay.__main__\n"
        "assert 'cryptography.hazmat.primitives.ciphers.aead' not in sys.modules\n"
        "from relay import tokens\n"
        "tokens.unseal(tokens.seal({'token': 't'}, bytes(32)), bytes(32))\n"
        "assert 'cryptography.hazmat.primitives.ciphers.aead' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", probe], check=True, timeout=60)
