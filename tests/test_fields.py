"""Payload field allowlists (CONTRACT.md 4c): parsing, selection, rendering, configuration."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import expected_event_id
from hypothesis import given, settings
from hypothesis import strategies as st

from relay import fields, tokens
from relay.codec import compact_json, loads
from relay.config import describe, load_settings
from relay.errors import ConfigError
from relay.events import Message, parse_frame, prepare, reconcile_event

SECRET = "whsec_" + "A" * 43 + "="
SEAL_KEY = bytes(range(32))
WEBHOOK_ID = "evt_" + "cd" * 32
TOKEN = {
    "token": "2000611e" + "7" * 48 + "3979",
    "expires": "2099-05-30T17:55:27.981Z",
    "partner_user_id": "client_09e4",
}

# The docs' example event (shared/sfox/FEED.md), as sFOX sends it.
DOCS_EVENT = (
    '{"sequence":5,"recipient":"private.enterprise.users","timestamp":1717005327995988841,'
    '"payload":{"user_id":"client_09e487c9-9b75-4ef5-be06-b3e5661f68e5",'
    '"first_name":"Brando","last_name":"Marks","email":"brando@example.com",'
    '"phone_number":"+12223334444","account_role":"Client","account_type":"individual",'
    '"status":"PENDING","user_token":' + json.dumps(TOKEN, separators=(",", ":")) + ","
    '"requirements":{"sms":true,"email":true}}}'
)
# What an analytics endpoint with "fields": ["user_id", "status"] receives, byte for byte.
DOCS_ANALYTICS = (
    b'{"sequence":5,"recipient":"private.enterprise.users","timestamp":1717005327995988841,'
    b'"payload":{"user_id":"client_09e487c9-9b75-4ef5-be06-b3e5661f68e5","status":"PENDING"}}'
)


def stored(frame: str = DOCS_EVENT, seal_key: bytes | None = SEAL_KEY) -> tuple[bytes, bool]:
    message = parse_frame(frame)
    assert isinstance(message, Message)
    event = prepare(message, seal_key=seal_key)
    return event.body, event.has_token


def render(
    paths: list[str] | None,
    policy: tokens.Policy = "strip",
    *,
    body: bytes | None = None,
    has_token: bool = True,
) -> bytes:
    if body is None:
        body, has_token = stored()
    return tokens.render(
        body,
        policy,
        has_token=has_token,
        seal_key=SEAL_KEY,
        endpoint_key=bytes(range(100, 132)),
        webhook_id=WEBHOOK_ID,
        now=1_800_000_000.0,
        fields=None if paths is None else fields.parse(paths),
    )


# -- parse ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("paths", "tree"),
    [
        (["user_id", "status"], {"user_id": None, "status": None}),
        (["requirements.sms"], {"requirements": {"sms": None}}),
        (["requirements", "requirements.sms"], {"requirements": None}),
        (["requirements.sms", "requirements"], {"requirements": None}),
        (["a.b.c", "a.b", "a.d"], {"a": {"b": None, "d": None}}),
        (["a.b", "a.b"], {"a": {"b": None}}),
    ],
)
def test_parse(paths: list[str], tree: fields.FieldTree) -> None:
    assert fields.parse(paths) == tree


@pytest.mark.parametrize(
    ("paths", "reason"),
    [
        ([], "empty"),
        (["user_token"], "field 1: user_token follows the endpoint's user_token policy"),
        (["status", "user_token.token"], "field 2: user_token"),
        (["a..b"], "field 1: an empty key"),
        ([".a"], "an empty key"),
        (["a."], "an empty key"),
        ([""], "an empty key"),
    ],
)
def test_parse_refuses(paths: list[str], reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        fields.parse(paths)


# -- select ---------------------------------------------------------------------------------------

PAYLOAD = {
    "user_id": "u1",
    "email": "a@b.c",
    "status": "PENDING",
    "user_token": {"sealed": "x"},
    "requirements": {"sms": True, "email": False, "new": {"x": 1}},
    "tags": ["a", {"b": 1}],
    "n": None,
}


@pytest.mark.parametrize(
    ("paths", "expected"),
    [
        pytest.param(
            ["status", "user_id"],
            {"user_id": "u1", "status": "PENDING", "user_token": {"sealed": "x"}},
            id="order received, not order listed; user_token left to the policy",
        ),
        pytest.param(
            ["requirements.sms"],
            {"user_token": {"sealed": "x"}, "requirements": {"sms": True}},
            id="nested",
        ),
        pytest.param(
            ["requirements.sms", "requirements"],
            {"user_token": {"sealed": "x"}, "requirements": PAYLOAD["requirements"]},
            id="key and nested key keep the whole key",
        ),
        pytest.param(
            ["requirements.new.x", "requirements.email"],
            {"user_token": {"sealed": "x"}, "requirements": {"email": False, "new": {"x": 1}}},
            id="two levels, order received",
        ),
        pytest.param(["absent", "n"], {"user_token": {"sealed": "x"}, "n": None}, id="absent"),
        pytest.param(
            ["requirements.absent", "status.x", "tags.b", "n.x"],
            {"user_token": {"sealed": "x"}},
            id="nested keys that are absent, or under a non-object, are absent with their parent",
        ),
        pytest.param(
            ["tags"], {"user_token": {"sealed": "x"}, "tags": ["a", {"b": 1}]}, id="list whole"
        ),
    ],
)
def test_select(paths: list[str], expected: dict[str, Any]) -> None:
    selected = fields.select(PAYLOAD, fields.parse(paths))
    assert selected == expected
    assert list(selected) == list(expected)
    assert PAYLOAD["email"] == "a@b.c"  # the input is not changed


def test_select_leaves_the_input_unchanged() -> None:
    payload = json.loads(json.dumps(PAYLOAD))
    fields.select(payload, fields.parse(["requirements.sms"]))
    assert payload == PAYLOAD


# -- render: the bytes sent -------------------------------------------------------------------


def test_docs_example_to_an_analytics_endpoint_byte_for_byte() -> None:
    assert render(["user_id", "status"]) == DOCS_ANALYTICS
    assert render(["status", "user_id"]) == DOCS_ANALYTICS


def test_docs_example_without_fields_is_the_whole_payload() -> None:
    out = loads(render(None))
    assert list(out["payload"]) == [
        "user_id",
        "first_name",
        "last_name",
        "email",
        "phone_number",
        "account_role",
        "account_type",
        "status",
        "requirements",
    ]


@pytest.mark.parametrize(
    ("policy", "token_shape"),
    [("strip", None), ("forward", set(TOKEN)), ("encrypt", {"alg", "nonce", "ciphertext"})],
)
def test_user_token_follows_the_policy_alone(
    policy: tokens.Policy, token_shape: set[str] | None
) -> None:
    out = render(["user_id", "requirements.email"], policy)
    payload = loads(out)["payload"]
    if token_shape is None:
        assert list(payload) == ["user_id", "requirements"]
    else:
        assert list(payload) == ["user_id", "user_token", "requirements"]
        assert token_shape <= set(payload["user_token"])
    assert payload["requirements"] == {"email": True}
    for gone in (b"Brando", b"Marks", b"brando@example.com", b"+12223334444", b"sms"):
        assert gone not in out


def test_top_level_keys_are_always_kept_unknown_ones_included() -> None:
    frame = DOCS_EVENT.replace('"payload":', '"x_top":{"email":"kept"},"payload":', 1)
    body, has_token = stored(frame)
    out = render(["status"], body=body, has_token=has_token)
    assert out == (
        b'{"sequence":5,"recipient":"private.enterprise.users","timestamp":1717005327995988841,'
        b'"x_top":{"email":"kept"},"payload":{"status":"PENDING"}}'
    )


def test_a_body_without_a_token_is_not_parsed_without_fields() -> None:
    body = b'{"payload": {"a": 1}}'  # not compact: rendering it would change it
    assert render(None, body=body, has_token=False) is body
    assert render(["a"], body=body, has_token=False) == b'{"payload":{"a":1}}'


def test_reconciled_events_are_shaped_the_same_way() -> None:
    user = {
        "account_type": "individual",
        "user_id": "client_1",
        "advisor_user_id": None,
        "email": "x@example.com",
        "first_name": "X",
        "status": "VERIFIED",
        "requirements": {"sms": False, "email": False},
    }
    event = reconcile_event(user, after=None, now_ns=1_717_005_327_995_988_841)
    out = render(["user_id", "status", "requirements.sms"], body=event.body, has_token=False)
    assert out == (
        b'{"sequence":null,"recipient":"private.enterprise.users",'
        b'"timestamp":1717005327995988841,"payload":{"user_id":"client_1",'
        b'"status":"VERIFIED","requirements":{"sms":false}}}'
    )


# -- the property: nothing outside the list, nothing lost inside it ------------------------------

_KEYS = st.sampled_from(["a", "b", "c", "user_id", "x.y", "é"])
_PATHS = st.lists(_KEYS, min_size=1, max_size=3).map(".".join)
_SCALARS = st.none() | st.booleans() | st.integers() | st.just("v")
_TREES = st.recursive(
    _SCALARS,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(_KEYS, children, max_size=4),
    max_leaves=20,
)


def _label(value: Any, counter: Iterator[int]) -> Any:
    """Every scalar leaf replaced by a unique marker, so its bytes can be looked for."""
    if isinstance(value, dict):
        return {key: _label(item, counter) for key, item in value.items()}
    if isinstance(value, list):
        return [_label(item, counter) for item in value]
    return f"leaf-{next(counter):04d}-"


def _leaves(value: Any, path: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], str]]:
    """(object path, marker) of every leaf; all inside a list belong to the list's path."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _leaves(item, (*path, key))
    elif isinstance(value, list):
        for item in value:
            yield from ((path, marker) for _, marker in _leaves(item, path))
    else:
        yield path, value


def _key_paths(value: Any, path: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], Any]]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield (*path, key), item
            yield from _key_paths(item, (*path, key))


@settings(max_examples=300, deadline=None)
@given(
    payload=st.dictionaries(_KEYS, _TREES, max_size=6),
    listed=st.lists(_PATHS, min_size=1, max_size=4),
)
def test_no_key_or_value_outside_the_list_is_sent(
    payload: dict[str, Any], listed: list[str]
) -> None:
    payload = _label(payload, itertools.count())
    message = {"sequence": 1, "recipient": "r", "timestamp": 2**62, "payload": payload}
    out = render(listed, body=compact_json(message), has_token=False)
    sent = loads(out)
    assert list(sent) == list(message)
    assert {k: v for k, v in sent.items() if k != "payload"} == {
        k: v for k, v in message.items() if k != "payload"
    }

    allowed = [tuple(path.split(".")) for path in listed]

    def under_a_listed_key(path: tuple[str, ...]) -> bool:
        return any(path[: len(a)] == a for a in allowed)

    def above_a_listed_key(path: tuple[str, ...]) -> bool:
        return any(a[: len(path)] == path for a in allowed)

    for path, value in _key_paths(sent["payload"], ()):
        assert under_a_listed_key(path) or (above_a_listed_key(path) and isinstance(value, dict))
    for path, marker in _leaves(payload, ()):
        # A listed leaf is sent; any other leaf's value appears nowhere in the bytes.
        assert (marker.encode() in out) == under_a_listed_key(path)
    # Kept keys stay in the order received, at every level.
    for path, value in _key_paths(sent["payload"], ()):
        if isinstance(value, dict):
            original = payload
            for key in path:
                original = original[key]
            assert list(value) == [k for k in original if k in value]


# -- configuration ------------------------------------------------------------------------------


def _endpoint(**extra: object) -> dict[str, str]:
    return {
        "RELAY_SIGNING_SECRET": SECRET,
        "RELAY_ENDPOINTS": json.dumps([{"url": "https://a.example.com/", **extra}]),
    }


def test_fields_configured_and_shown_by_check() -> None:
    loaded = load_settings(_endpoint(fields=["user_id", " status ", "requirements.sms"]))
    (endpoint,) = loaded.endpoints
    assert endpoint.fields == ("user_id", "status", "requirements.sms")
    assert endpoint.field_tree == {"user_id": None, "status": None, "requirements": {"sms": None}}
    shown = describe(loaded)["endpoints"][0]  # type: ignore[index]
    assert shown["fields"] == ["user_id", "status", "requirements.sms"]
    copy = endpoint.model_copy(update={"fields": ("status",)})
    assert copy.field_tree == {"status": None}  # never a stale tree
    default = load_settings(_endpoint())
    assert default.endpoints[0].fields is None and default.endpoints[0].field_tree is None
    assert describe(default)["endpoints"][0]["fields"] is None  # type: ignore[index]


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ([], "empty"),
        (["user_id", "user_token"], "field 2: user_token follows"),
        (["user_token.token"], "user_token"),
        (["a..b"], "an empty key"),
        ([" "], "an empty key"),
        ("user_id", "expected a list of payload keys"),
        ([1], "expected a list of payload keys"),
    ],
)
def test_fields_errors_name_the_key(value: object, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(_endpoint(fields=value))
    assert info.value.variable == "RELAY_ENDPOINTS[0].fields"
    assert reason in info.value.reason


# -- end to end: simulator -> relay -> receiver ---------------------------------------------------


@pytest.mark.parametrize("sim", [{"count": 30, "users": 6}], indirect=True)
async def test_an_analytics_endpoint_gets_only_its_fields_signed_under_the_same_id(
    sim: Any, receiver: Any, relay_env: Any, run_relay: Any, eventually: Any
) -> None:
    full = {"name": "crm", "url": receiver.url + "/crm"}
    # `status` is not listed, yet the statuses filter still sees it (filters see everything).
    analytics = {
        "name": "analytics",
        "url": receiver.url + "/analytics",
        "fields": ["user_id"],
        "statuses": ["VERIFIED"],
    }
    env = relay_env(RELAY_ENDPOINTS=json.dumps([full, analytics]))
    verified = [m for m in sim.sent if m["payload"].get("status") == "VERIFIED"]
    async with run_relay(env):
        await eventually(lambda: len(sim.sent) == 30, 10)
        verified = [m for m in sim.sent if m["payload"].get("status") == "VERIFIED"]
        await receiver.wait_for(30 + len(verified), timeout=10)
    assert verified
    got = {r.webhook_id: r for r in receiver.received if r.path == "/analytics"}
    assert len(got) == len(verified)
    for message in verified:
        arrived = got[expected_event_id(message)]  # the id of the whole event, unchanged
        shown = {**message, "payload": {"user_id": message["payload"]["user_id"]}}
        assert arrived.body == json.dumps(shown, separators=(",", ":")).encode()
        assert arrived.verified is True  # the bytes signed are the bytes sent
    crm = [r for r in receiver.received if r.path == "/crm"]
    assert len(crm) == 30 and all("email" in r.json["payload"] for r in crm)
