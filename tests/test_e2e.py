"""End to end, in-process: simulator -> relay (real SQLite) -> receiver, nothing mocked.

Each test starts the simulator and the receiver on port 0, runs a real :class:`Relay` in the
test's event loop against a store in ``tmp_path``, and checks what the receiver got against
what the simulator sent (see the README) and what the admin port shows.
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import (
    expected_event_id,
    new_key,
    query,
    sent_tokens,
    store_files,
    store_path,
    wire_body,
)
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from prometheus_client.parser import text_string_to_metric_families
from standardwebhooks.webhooks import Webhook

from relay import __version__
from relay.errors import StoreUnavailableError
from relay.receiver import Received, Receiver, Response
from relay.simulator import FAKE_TOKEN, Faults, Simulator
from relay.store.base import Claimed
from relay.store.sqlite import SQLiteStore

# -- helpers ------------------------------------------------------------------------------


def readme_decrypt(user_token: dict[str, Any], key: str, webhook_id: str) -> str:
    """The receiver's side of the ``encrypt`` policy, as the README shows it."""
    nonce = base64.b64decode(user_token["nonce"])
    ciphertext = base64.b64decode(user_token["ciphertext"])
    plain = AESGCM(base64.b64decode(key)).decrypt(nonce, ciphertext, webhook_id.encode())
    return plain.decode()


def by_id(sim: Simulator) -> dict[str, dict[str, Any]]:
    """The simulator's messages by the event id the contract gives them."""
    return {expected_event_id(m): m for m in sim.sent}


def per_user(ids: list[str], messages: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
    """Event ids grouped by user, keeping the order of ``ids``."""
    lanes: dict[str, list[str]] = defaultdict(list)
    for event_id in ids:
        lanes[messages[event_id]["payload"]["user_id"]].append(event_id)
    return dict(lanes)


def delivery_states(db: Path) -> dict[str, int]:
    rows = query(db, "SELECT state, COUNT(*) AS n FROM deliveries GROUP BY state")
    return {row["state"]: row["n"] for row in rows}


def all_delivered(db: Path, expected: int) -> bool:
    return delivery_states(db) == {"delivered": expected}


def assert_no_plaintext_tokens(db: Path, tokens: list[str]) -> None:
    """No file of the store holds a user token the simulator sent, as text or as bytes."""
    files = store_files(db)
    assert db.name in files
    assert tokens
    for name, data in files.items():
        for token in tokens:
            assert token.encode() not in data, f"a plaintext user token is in {name}"
            assert bytes.fromhex(token) not in data, f"a raw user token is in {name}"


def metric_values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text as {(sample name, sorted labels): value}."""
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def closed_port() -> int:
    """A local port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- delivery -----------------------------------------------------------------------------


@pytest.mark.parametrize("sim", [{"count": 60, "users": 8}], indirect=True)
async def test_every_event_arrives_signed_exact_and_in_order_per_user(
    sim: Simulator, receiver: Receiver, relay_env, run_relay, eventually, signing_secret: str
) -> None:
    env = relay_env()
    db = store_path(env)
    async with run_relay(env):
        await receiver.wait_for(60, timeout=10)
        await eventually(lambda: all_delivered(db, 60), 5, message=lambda: delivery_states(db))
        assert_no_plaintext_tokens(db, sent_tokens(sim))
    assert len(sim.sent) == 60
    messages = by_id(sim)
    assert len(messages) == 60
    received = receiver.received
    assert sorted(r.webhook_id for r in received) == sorted(messages), "each event exactly once"

    official = Webhook(signing_secret)
    for r in received:
        assert r.verified is True
        official.verify(r.body, r.headers)  # raises unless it verifies
        assert r.method == "POST"
        assert r.path == "/webhooks/sfox"
        assert r.source == "feed"
        assert r.headers["content-type"] == "application/json"
        assert r.headers["user-agent"] == f"sfox-relay/{__version__}"
        # Strip policy: the message as received, byte for byte, minus the user token.
        assert r.body == wire_body(messages[r.webhook_id], token=False)
        assert "user_token" not in r.json["payload"]
        assert len(str(r.json["timestamp"])) == 19

    sent_order = per_user([expected_event_id(m) for m in sim.sent], messages)
    stored = [row["event_id"] for row in query(db, "SELECT event_id FROM events ORDER BY seq")]
    assert per_user(stored, messages) == sent_order, "store order is the simulator's, per user"
    arrived = per_user([r.webhook_id for r in received], messages)
    assert arrived == sent_order, "per-user delivery order is the store's"
    assert any(len(lane) > 1 for lane in sent_order.values()), "the test needs multi-event lanes"
    assert_no_plaintext_tokens(db, sent_tokens(sim))


async def test_forward_policy_delivers_the_exact_token(
    sim: Simulator, receiver: Receiver, relay_env, run_relay, eventually
) -> None:
    endpoints = [{"url": receiver.url + "/forward", "user_token": "forward"}]
    env = relay_env(RELAY_TOKEN_KEY=new_key(), RELAY_ENDPOINTS=json.dumps(endpoints))
    db = store_path(env)
    async with run_relay(env):
        await receiver.wait_for(40, timeout=10)
        await eventually(lambda: all_delivered(db, 40), 5, message=lambda: delivery_states(db))
        assert_no_plaintext_tokens(db, sent_tokens(sim))
    messages = by_id(sim)
    assert sorted(r.webhook_id for r in receiver.received) == sorted(messages)
    for r in receiver.received:
        sent = messages[r.webhook_id]
        assert r.verified is True
        assert r.json["payload"]["user_token"] == sent["payload"]["user_token"]
        assert r.body == wire_body(sent, token=True)
    # Meaningful only if the tokens were kept (sealed) at rest.
    assert query(db, "SELECT COUNT(*) AS n FROM events WHERE has_token = 1")[0]["n"] == 40
    assert_no_plaintext_tokens(db, sent_tokens(sim))


async def test_encrypt_policy_decrypts_with_the_readme_snippet(
    sim: Simulator, receiver: Receiver, relay_env, run_relay, eventually
) -> None:
    endpoint_key = new_key()
    endpoints = [
        {"url": receiver.url + "/sealed", "user_token": "encrypt", "token_key": endpoint_key}
    ]
    env = relay_env(RELAY_TOKEN_KEY=new_key(), RELAY_ENDPOINTS=json.dumps(endpoints))
    db = store_path(env)
    async with run_relay(env):
        await receiver.wait_for(40, timeout=10)
        await eventually(lambda: all_delivered(db, 40), 5, message=lambda: delivery_states(db))
        assert_no_plaintext_tokens(db, sent_tokens(sim))
    messages = by_id(sim)
    assert sorted(r.webhook_id for r in receiver.received) == sorted(messages)
    for r in receiver.received:
        sent_token = messages[r.webhook_id]["payload"]["user_token"]
        box = r.json["payload"]["user_token"]
        assert r.verified is True
        assert box["alg"] == "A256GCM"
        assert sent_token["token"] not in r.body.decode()
        assert readme_decrypt(box, endpoint_key, r.webhook_id) == sent_token["token"]
        assert box["expires"] == sent_token["expires"]
        assert box["partner_user_id"] == sent_token["partner_user_id"]
        with pytest.raises(InvalidTag):  # the webhook-id is the associated data
            readme_decrypt(box, endpoint_key, "evt_someone_else")
        rest = {k: v for k, v in r.json["payload"].items() if k != "user_token"}
        assert json.dumps(rest) == json.dumps(
            {k: v for k, v in messages[r.webhook_id]["payload"].items() if k != "user_token"}
        )
    assert_no_plaintext_tokens(db, sent_tokens(sim))


async def test_status_filter_sends_only_matching_events(
    sim: Simulator, receiver: Receiver, relay_env, run_relay, eventually
) -> None:
    endpoints = [
        {"name": "everything", "url": receiver.url + "/all"},
        {"name": "verified", "url": receiver.url + "/verified", "statuses": ["VERIFIED"]},
    ]
    env = relay_env(RELAY_ENDPOINTS=json.dumps(endpoints))
    db = store_path(env)
    messages: dict[str, dict[str, Any]] = {}
    async with run_relay(env):
        await eventually(lambda: len(sim.sent) == 40, 10)
        messages = by_id(sim)
        verified = {i for i, m in messages.items() if m["payload"]["status"] == "VERIFIED"}
        assert 0 < len(verified) < 40
        await receiver.wait_for(40 + len(verified), timeout=10)
        await eventually(
            lambda: all_delivered(db, 40 + len(verified)), 5, message=lambda: delivery_states(db)
        )
    paths: dict[str, list[str]] = defaultdict(list)
    for r in receiver.received:
        paths[r.path].append(r.webhook_id)
    assert sorted(paths["/all"]) == sorted(messages)
    assert sorted(paths["/verified"]) == sorted(verified)
    assert set(paths) == {"/all", "/verified"}


@pytest.mark.parametrize("failure", ["503", "hangs"])
async def test_a_down_endpoint_does_not_delay_a_healthy_one(
    failure: str,
    sim: Simulator,
    receiver: Receiver,
    make_receiver,
    relay_env,
    run_relay,
    eventually,
) -> None:
    if failure == "503":
        down = await make_receiver(behaviour=lambda r: Response(503, body=b"maintenance"))
    else:
        down = await make_receiver(behaviour=lambda r: Response(204, delay=30))
    endpoints = [
        {"name": "down", "url": down.url + "/down", "timeout": "10s"},
        {"name": "healthy", "url": receiver.url + "/healthy"},
    ]
    env = relay_env(RELAY_ENDPOINTS=json.dumps(endpoints), RELAY_SHUTDOWN_GRACE="200ms")
    db = store_path(env)
    async with run_relay(env):
        # Promptly: well before the down endpoint's 10 s timeout could have held anything up.
        await receiver.wait_for(40, timeout=5)
        await eventually(lambda: down.count > 0, 3)

        def states() -> dict[tuple[str, str], int]:
            rows = query(
                db,
                "SELECT endpoint, state, COUNT(*) AS n FROM deliveries GROUP BY endpoint, state",
            )
            return {(row["endpoint"], row["state"]): row["n"] for row in rows}

        await eventually(lambda: states().get(("healthy", "delivered")) == 40, 2, message=states)
        assert not any(ep == "down" and state == "delivered" for ep, state in states())
    assert sorted(r.webhook_id for r in receiver.received) == sorted(by_id(sim))


async def test_a_retry_resumes_after_a_restart_with_the_same_webhook_id(
    sim: Simulator, receiver: Receiver, relay_env, run_relay, eventually
) -> None:
    failing = True

    def flaky(r: Received) -> Response:
        return Response(500, body=b"try again later") if failing else Response(204)

    receiver.behaviour = flaky
    # Every user fails, so the endpoint's breaker opens (5b) and stays open across the
    # restart: its first probe comes after the cooldown, then the backlog drains.
    env = relay_env(RELAY_RETRY_SCHEDULE="0s,1s,200ms", RELAY_BREAKER_COOLDOWN="200ms")
    db = store_path(env)

    def first_attempts_done() -> bool:
        stored = query(db, "SELECT COUNT(*) AS n FROM events")[0]["n"]
        untried = query(
            db, "SELECT COUNT(*) AS n FROM deliveries WHERE state = 'pending' AND attempts = 0"
        )[0]["n"]
        return stored == 40 and untried == 0 and receiver.count > 0

    async with run_relay(env):
        await eventually(first_attempts_done, 10)
    tried = {
        row["event_id"]: row["attempts"]
        for row in query(
            db,
            "SELECT e.event_id, d.attempts FROM deliveries d JOIN events e "
            "ON e.seq = d.event_seq WHERE d.state = 'pending'",
        )
    }
    assert tried and set(tried.values()) == {1}, "the first attempts failed, none retried yet"
    assert "delivered" not in delivery_states(db)
    assert {r.webhook_id for r in receiver.received} == set(tried)

    failing = False
    restart_at = len(receiver.received)
    async with run_relay(env):
        await eventually(lambda: all_delivered(db, 40), 10, message=lambda: delivery_states(db))

    messages = by_id(sim)
    assert sorted({r.webhook_id for r in receiver.received}) == sorted(messages)
    bodies: dict[bytes, list[Received]] = defaultdict(list)
    for r in receiver.received:
        assert r.verified is True
        bodies[r.body].append(r)
    for body, arrivals in bodies.items():
        # Same event (same bytes), same webhook-id on every attempt, across the restart.
        assert {r.webhook_id for r in arrivals} == {expected_event_id(json.loads(body))}
        if arrivals[0].webhook_id in tried:
            assert len(arrivals) == 2
            assert receiver.received.index(arrivals[1]) >= restart_at
        else:
            assert len(arrivals) == 1
    attempts = {
        row["event_id"]: (row["attempts"], row["statuses"])
        for row in query(
            db,
            "SELECT e.event_id, d.attempts, (SELECT group_concat(status) FROM "
            "(SELECT status FROM attempts a WHERE a.delivery_id = d.id ORDER BY n)) AS statuses "
            "FROM deliveries d JOIN events e ON e.seq = d.event_seq",
        )
    }
    for event_id, (count, statuses) in attempts.items():
        assert (count, statuses) == ((2, "500,204") if event_id in tried else (1, "204"))


@pytest.mark.parametrize("sim", [{"count": 30, "faults": Faults(bad_every=5)}], indirect=True)
async def test_bad_frames_are_counted_kept_and_skipped(
    sim: Simulator, receiver: Receiver, relay_env, run_relay, eventually
) -> None:
    env = relay_env()
    db = store_path(env)
    async with run_relay(env) as relay:
        await receiver.wait_for(30, timeout=10)
        await eventually(lambda: all_delivered(db, 30), 5, message=lambda: delivery_states(db))
        registry = relay.metrics.registry
        await eventually(lambda: registry.get_sample_value("relay_feed_bad_frames_total") == 6, 5)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{relay.admin.port}") as admin:
            text = (await admin.get("/metrics")).text
    values = metric_values(text)
    assert values[("relay_feed_bad_frames_total", ())] == 6
    assert values[("relay_feed_messages_total", ())] == 30
    assert values[("relay_events_stored_total", ())] == 30
    assert sorted(r.webhook_id for r in receiver.received) == sorted(by_id(sim))
    quarantined = query(db, "SELECT reason, text FROM bad_frames ORDER BY id")
    assert len(quarantined) == 6
    assert all(row["reason"] for row in quarantined)
    for name, data in store_files(db).items():
        assert FAKE_TOKEN.encode() not in data, f"a bad frame's user token is in {name}"


class GatedStore(SQLiteStore):
    """The real SQLite store, except that a claim waits at a gate the test opens."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.entered = asyncio.Event()
        self.gate = asyncio.Event()

    async def claim(self, endpoint: str, now: float, limit: int) -> Claimed:
        self.entered.set()
        await self.gate.wait()
        return await super().claim(endpoint, time.time(), limit)


@pytest.mark.parametrize("sim", [{"count": 20, "users": 20}], indirect=True)
async def test_stop_during_a_claim_starts_nothing_and_keeps_the_grace(
    sim: Simulator, receiver: Receiver, relay_env, run_relay, eventually
) -> None:
    receiver.behaviour = lambda r: Response(204, delay=30)
    env = relay_env(RELAY_SHUTDOWN_GRACE="200ms", RELAY_DELIVERY_TIMEOUT="3s")
    db = store_path(env)
    store = GatedStore(db)
    async with run_relay(env, store=store) as relay:
        await asyncio.wait_for(store.entered.wait(), 5)
        await eventually(lambda: query(db, "SELECT COUNT(*) AS n FROM events")[0]["n"] == 20, 5)
        relay.request_stop()
        # White-box: the dispatcher has been told to stop while its claim is still running.
        await eventually(lambda: relay.dispatcher._stopping.is_set(), 5)
        store.gate.set()
        stop_started = time.monotonic()
    stopped_in = time.monotonic() - stop_started
    assert receiver.count == 0, "deliveries started after the stop was requested"
    assert stopped_in < 1.2, f"shutdown took {stopped_in:.1f}s with a 200ms grace"
    rows = query(db, "SELECT state, attempts FROM deliveries")
    assert len(rows) == 20
    assert {row["state"] for row in rows} <= {"pending", "waiting"}
    assert {row["attempts"] for row in rows} == {0}, "an attempt was used after the stop"


class FailingAppendStore(SQLiteStore):
    """The real SQLite store, except that appends fail as unavailable while ``down`` is set."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.down = False
        self.refused = 0

    async def append(self, *args: Any, **kwargs: Any) -> Any:
        if self.down:
            self.refused += 1
            raise StoreUnavailableError("sqlite:///test: database or disk is full")
        return await super().append(*args, **kwargs)


@pytest.mark.parametrize("sim", [{"count": None, "users": 20, "rate": 200.0}], indirect=True)
async def test_stop_while_the_store_is_down_ends_within_the_grace(
    sim: Simulator,
    receiver: Receiver,
    relay_env,
    run_relay,
    eventually,
    caplog: pytest.LogCaptureFixture,
) -> None:
    env = relay_env(RELAY_SHUTDOWN_GRACE="300ms")
    store = FailingAppendStore(store_path(env))
    async with run_relay(env, store=store) as relay:
        await eventually(
            lambda: query(store.path, "SELECT COUNT(*) AS n FROM events")[0]["n"] >= 5, 5
        )
        store.down = True
        await eventually(lambda: store.refused >= 1 and not relay.ready["store"], 5)
        stop_started = time.monotonic()
    stopped_in = time.monotonic() - stop_started
    # The feed's batch in hand can never be committed: the stop gives up on it at the grace
    # (it was never acknowledged; reconciliation after the next start recovers it).
    assert stopped_in < 1.5, f"shutdown took {stopped_in:.1f}s with a 300ms grace"
    assert "relay.stop_uncommitted" in {getattr(r, "event", None) for r in caplog.records}


# -- the admin port -----------------------------------------------------------------------


async def test_admin_port_shows_readiness_and_metrics(
    sim: Simulator, receiver: Receiver, relay_env, run_relay, eventually
) -> None:
    env = relay_env()
    db = store_path(env)
    endpoint = f"127.0.0.1:{receiver.port}-webhooks-sfox"
    async with run_relay(env) as relay:
        await receiver.wait_for(40, timeout=10)
        await eventually(lambda: all_delivered(db, 40), 5, message=lambda: delivery_states(db))
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{relay.admin.port}") as admin:
            assert (await admin.get("/healthz")).status_code == 200
            ready = await admin.get("/readyz")
            assert ready.status_code == 200, ready.text
            assert ready.json()["ready"] is True

            values = metric_values((await admin.get("/metrics")).text)
            assert values[("relay_events_stored_total", ())] == 40
            assert values[("relay_feed_messages_total", ())] == 40
            assert values[("relay_events_duplicate_total", ())] == 0
            assert values[("relay_feed_connected", ())] == 1
            assert values[("relay_feed_state", (("state", "subscribed"),))] == 1
            key = ("relay_deliveries_total", (("endpoint", endpoint), ("outcome", "success")))
            assert values[key] == 40
            histogram = ("relay_delivery_duration_seconds_count", (("endpoint", endpoint),))
            assert values[histogram] == 40


async def test_admin_api_lists_deliveries_with_the_admin_token(
    sim: Simulator, receiver: Receiver, relay_env, run_relay, eventually
) -> None:
    admin_token = "adm-" + new_key()
    env = relay_env(RELAY_ADMIN_TOKEN=admin_token)
    db = store_path(env)
    endpoint = f"127.0.0.1:{receiver.port}-webhooks-sfox"
    async with run_relay(env) as relay:
        await receiver.wait_for(40, timeout=10)
        await eventually(lambda: all_delivered(db, 40), 5, message=lambda: delivery_states(db))
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{relay.admin.port}") as admin:
            auth = {"authorization": f"Bearer {admin_token}"}
            page = await admin.get("/api/deliveries", params={"limit": 500}, headers=auth)
            assert page.status_code == 200, page.text
            items = page.json()["items"]
            assert sorted(i["event_id"] for i in items) == sorted(by_id(sim))
            assert {i["state"] for i in items} == {"delivered"}
            assert {i["endpoint"] for i in items} == {endpoint}
            pending = await admin.get("/api/deliveries", params={"state": "pending"}, headers=auth)
            assert pending.status_code == 200, pending.text
            assert pending.json()["items"] == []
            one = await admin.get(f"/api/deliveries/{items[0]['id']}", headers=auth)
            assert one.status_code == 200, one.text
            assert [a["status"] for a in one.json()["attempt_log"]] == [204]
            assert admin_token not in one.text + page.text
            assert (await admin.get("/api/deliveries")).status_code == 401
            wrong = {"authorization": "Bearer not-the-token"}
            assert (await admin.get("/api/deliveries", headers=wrong)).status_code == 401


async def test_readyz_is_503_while_the_feed_is_not_subscribed(
    relay_env, run_relay, eventually
) -> None:
    env = relay_env(RELAY_WS_URL=f"ws://127.0.0.1:{closed_port()}/ws")
    async with (
        run_relay(env) as relay,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{relay.admin.port}") as admin,
    ):
        assert (await admin.get("/healthz")).status_code == 200
        ready = await admin.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["checks"] == {"feed": "failing", "store": "ok"}
