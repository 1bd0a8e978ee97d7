"""End to end through brokers: simulator -> relay (real SQLite) -> broker -> a consumer
written with the broker's own client (CONTRACT 4b with sections 4 and 5).

The relay reaches each broker through a TCP proxy the test can cut, which is how a broker
restart looks from the relay's side (the services themselves cannot be restarted here).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import signal
import sqlite3
import ssl
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import expected_event_id, query, store_path
from standardwebhooks.webhooks import Webhook
from test_brokers import NATS, RABBIT, REDIS, require, unique

from relay.brokers.consume import Consumed, Tap
from relay.simulator import Simulator

pytestmark = pytest.mark.slow

FAST_RETRIES = "0s," + ",".join(["100ms"] * 40)


class CuttableProxy:
    """A TCP proxy to ``port`` whose connections the test can cut at once (both sides)."""

    def __init__(
        self, port: int, *, reply_delay: float = 0.0, tls: ssl.SSLContext | None = None
    ) -> None:
        self._target = port
        self._tls = tls  # terminate TLS here: the broker behind it speaks plaintext
        self._reply_delay = reply_delay  # holds the broker's replies (confirms) this long
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0
        self.cuts = 0
        self.accepted = 0

    async def __aenter__(self) -> CuttableProxy:
        await self.up()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.down()

    async def up(self) -> None:
        """Listen (again, on the same port once it has one)."""
        self._server = await asyncio.start_server(
            self._accept, "127.0.0.1", self.port, ssl=self._tls
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def down(self) -> None:
        """Stop listening and cut every connection: the broker is down."""
        if self._server is not None:
            self._server.close()
            self.cut()
            if self._tasks:
                await asyncio.wait(set(self._tasks))
            await self._server.wait_closed()
            self._server = None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._target)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}
        for src, dst, delay in ((reader, up_writer, 0.0), (up_reader, writer, self._reply_delay)):
            task = asyncio.create_task(self._pipe(src, dst, delay))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, delay: float
    ) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await src.read(65536):
                if delay:
                    await asyncio.sleep(delay)
                dst.write(data)
                await dst.drain()
        dst.transport.abort()
        self._writers.discard(dst)

    def cut(self) -> None:
        """Drop every connection through the proxy, as a broker restart would."""
        self.cuts += 1
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/")[0])


def destination(broker: str, proxy_port: int | None = None) -> tuple[str, str]:
    """(the URL the relay publishes to, through the proxy when given; the consumer's URL)."""
    name = unique("relay-e2e")
    if broker == "amqp":
        direct = f"{RABBIT}?routing_key={name}"
        base = RABBIT.replace(f":{_port(RABBIT)}", f":{proxy_port}") if proxy_port else RABBIT
        return f"{base}?routing_key={name}", direct
    if broker == "nats":
        subject = name.replace("-", "_").replace("relay_e2e", "relay.e2e")
        base = NATS.replace(f":{_port(NATS)}", f":{proxy_port}") if proxy_port else NATS
        return f"{base}/{subject}", f"{NATS}/{subject}"
    base = REDIS.replace(f":{_port(REDIS)}", f":{proxy_port}") if proxy_port else REDIS
    return f"{base}?stream={name}", f"{REDIS}?stream={name}"


BROKER_PORTS = {"amqp": _port(RABBIT), "nats": _port(NATS), "redis": _port(REDIS)}


def check_messages(
    consumed: list[Consumed],
    sim: Simulator,
    secret: str,
    *,
    duplicates_allowed: int,
    stored: set[str] | None = None,
) -> None:
    """Every event (of those ``stored``, when given) once or more (at most
    ``duplicates_allowed`` extra), per-user order, each verified with standardwebhooks, no
    user token anywhere."""
    official = Webhook(secret)
    expected = [expected_event_id(m) for m in sim.sent]
    if stored is not None:
        expected = [event_id for event_id in expected if event_id in stored]
    users = {expected_event_id(m): m["payload"]["user_id"] for m in sim.sent}
    ids = [c.header("webhook-id") for c in consumed]
    assert set(ids) == set(expected), "nothing lost"
    assert len(ids) - len(set(ids)) <= duplicates_allowed
    first_seen: dict[str, list[str]] = defaultdict(list)
    for event_id in dict.fromkeys(ids):
        assert event_id is not None
        first_seen[users[event_id]].append(event_id)
    sent_lanes: dict[str, list[str]] = defaultdict(list)
    for event_id in expected:
        sent_lanes[users[event_id]].append(event_id)
    assert first_seen == sent_lanes, "per-user order"
    assert any(len(lane) > 1 for lane in sent_lanes.values())
    for message in consumed:
        official.verify(message.body, dict(message.headers))  # raises unless it verifies
        assert message.header("content-type") == "application/json"
        assert message.header("relay-source") == "feed"
        assert message.header("user-agent") is None  # HTTP-only
        assert b"user_token" not in message.body
        for token in (m["payload"].get("user_token", {}).get("token") for m in sim.sent):
            assert token is None or token.encode() not in message.body


def failed_attempts(db: Path) -> int:
    rows = query(db, "SELECT COUNT(*) AS n FROM attempts WHERE status IS NULL")
    return int(rows[0]["n"])


@pytest.fixture
def fast_env(relay_env: Callable[..., dict[str, str]]) -> Callable[..., dict[str, str]]:
    def build(url: str, **more: str | None) -> dict[str, str]:
        settings: dict[str, str | None] = {
            "RELAY_ENDPOINTS": json.dumps([{"url": url, "headers": {"x-tenant": "acme"}}]),
            "RELAY_RETRY_SCHEDULE": FAST_RETRIES,
            "RELAY_DELIVERY_TIMEOUT": "2s",
            # These tests watch retries; the breaker (which would hold them for its cooldown
            # once the broker fails for several users) is endpoint health's, tested there.
            "RELAY_BREAKER_THRESHOLD": "1000000",
        }
        return relay_env(**{**settings, **more})

    return build


@pytest.mark.parametrize("broker", ["amqp", "nats", "redis"])
@pytest.mark.parametrize("sim", [{"count": 80, "users": 8, "rate": 200.0}], indirect=True)
async def test_a_connection_cut_mid_stream_loses_nothing(
    broker: str, sim: Simulator, fast_env: Any, run_relay: Any, signing_secret: str
) -> None:
    require(broker)
    async with CuttableProxy(BROKER_PORTS[broker]) as proxy:
        relay_url, tap_url = destination(broker, proxy.port)
        env = fast_env(relay_url)
        async with Tap(tap_url) as tap, run_relay(env):
            consumed = await tap.read(25, timeout=20)
            assert len(consumed) == 25
            proxy.cut()
            consumed += await tap.read(10, timeout=20)
            proxy.cut()  # twice, the second time on a connection the relay just reopened
            deadline = time.monotonic() + 30
            while {c.header("webhook-id") for c in consumed} != {
                expected_event_id(m) for m in sim.sent
            } and time.monotonic() < deadline:
                consumed += await tap.read(1000, timeout=0.5)
            consumed += await tap.settle(0.5)
        db = store_path(env)
        states = query(db, "SELECT state, COUNT(*) AS n FROM deliveries GROUP BY state")
        assert {row["state"]: row["n"] for row in states} == {"delivered": 80}
        assert proxy.accepted >= 2, "the relay reconnected after a cut"
    # Duplicates only for publishes whose confirmation was lost; JetStream removes those.
    allowed = 0 if broker == "nats" else failed_attempts(db)
    check_messages(consumed, sim, signing_secret, duplicates_allowed=allowed)


# -- a destination missing: retried, never silently dropped --------------------------------------


def last_errors(db: Path) -> dict[str, int]:
    """Last errors of the deliveries tried so far (the heads of the user lanes)."""
    rows = query(db, "SELECT last_error, state, last_status FROM deliveries WHERE attempts > 0")
    found: dict[str, int] = defaultdict(int)
    for row in rows:
        assert row["state"] in ("pending", "inflight") and row["last_status"] is None
        found[row["last_error"] or ""] += 1
    return dict(found)


@pytest.mark.parametrize(
    ("broker", "error"), [("amqp", "unroutable"), ("nats", "no stream for the subject")]
)
@pytest.mark.parametrize("sim", [{"count": 12, "users": 4}], indirect=True)
async def test_a_missing_queue_or_stream_is_retried_until_the_operator_creates_it(
    broker: str,
    error: str,
    sim: Simulator,
    fast_env: Any,
    run_relay: Any,
    eventually: Any,
    signing_secret: str,
) -> None:
    require(broker)
    relay_url, tap_url = destination(broker)
    env = fast_env(relay_url, RELAY_RETRY_SCHEDULE="0s," + ",".join(["200ms"] * 200))
    db = store_path(env)
    async with run_relay(env):

        def failing() -> bool:
            rows = query(db, "SELECT COUNT(*) AS n FROM attempts WHERE status IS NULL")
            return len(query(db, "SELECT id FROM deliveries")) == 12 and rows[0]["n"] >= 12

        await eventually(failing, 10)
        errors = last_errors(db)
        assert all(error in text for text in errors), errors
        async with Tap(tap_url) as tap:  # the operator binds a queue / creates the stream
            consumed = await tap.read(12, timeout=20)
            consumed += await tap.settle(0.3)
    check_messages(consumed, sim, signing_secret, duplicates_allowed=0)


# -- kill -9 of the relay mid-publish -----------------------------------------------------------


@pytest.mark.parametrize("broker", ["nats", "amqp", "redis"])
@pytest.mark.parametrize("sim", [{"count": 60, "users": 20, "rate": 200.0}], indirect=True)
async def test_kill_9_mid_publish_then_restart_loses_nothing(
    broker: str, sim: Simulator, fast_env: Any, eventually: Any, signing_secret: str
) -> None:
    require(broker)
    # Replies (confirms) held 0.15 s each, so publishes are in flight at the kill; the AMQP
    # handshake's round trips then take about a second, within the 5 s timeout.
    async with CuttableProxy(BROKER_PORTS[broker], reply_delay=0.15) as proxy:
        relay_url, tap_url = destination(broker, proxy.port)
        env = fast_env(relay_url, RELAY_DELIVERY_TIMEOUT="5s")
        db = store_path(env)
        child = {
            **{k: v for k, v in os.environ.items() if not k.startswith("RELAY_")},
            **env,
            "PYTHONUNBUFFERED": "1",
        }
        async with Tap(tap_url) as tap:
            consumed: list[Consumed] = []

            async def start() -> asyncio.subprocess.Process:
                return await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "relay", "run", env=child,
                    stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.DEVNULL,
                )  # fmt: skip

            first = await start()
            try:

                def in_flight() -> bool:
                    try:
                        rows = query(db, "SELECT COUNT(*) FROM deliveries WHERE state='inflight'")
                    except sqlite3.OperationalError:
                        return False  # not created yet
                    return int(rows[0][0]) >= 5

                await eventually(in_flight, 15)
                first.send_signal(signal.SIGKILL)
                assert await first.wait() == -signal.SIGKILL
            finally:
                if first.returncode is None:
                    first.kill()
                    await first.wait()
            committed = {row["event_id"] for row in query(db, "SELECT event_id FROM events")}
            in_flight = {
                row["event_id"]
                for row in query(
                    db,
                    "SELECT e.event_id FROM deliveries d JOIN events e ON e.seq = d.event_seq "
                    "WHERE d.state = 'inflight'",
                )
            }
            second = await start()
            try:

                def all_delivered() -> bool:
                    rows = query(db, "SELECT state FROM deliveries")
                    return {row["state"] for row in rows} == {"delivered"}

                await eventually(all_delivered, 30)
                stored = {row["event_id"] for row in query(db, "SELECT event_id FROM events")}
                consumed = await tap.read(len(stored), timeout=10)
                consumed += await tap.settle(0.5)
            finally:
                second.send_signal(signal.SIGTERM)
                assert await second.wait() == 0
    ids = [c.header("webhook-id") for c in consumed]
    assert committed <= set(ids), "an event committed before kill -9 was never delivered"
    # A publish unconfirmed at the kill, or one whose attempt failed (a timeout waiting for
    # the reply), may have been stored by the broker all the same.
    unconfirmed = in_flight | {
        row["event_id"]
        for row in query(
            db,
            "SELECT e.event_id FROM attempts a JOIN deliveries d ON d.id = a.delivery_id "
            "JOIN events e ON e.seq = d.event_seq WHERE a.status IS NULL",
        )
    }
    twice = {i for i in ids if ids.count(i) > 1}
    assert twice <= unconfirmed, "only unconfirmed publishes may arrive twice"
    # JetStream drops the re-published ones by Nats-Msg-Id; RabbitMQ and Redis may hold them
    # twice.
    allowed = 0 if broker == "nats" else len(stored)
    check_messages(consumed, sim, signing_secret, duplicates_allowed=allowed, stored=stored)


# -- relay demo --to URL --------------------------------------------------------------------------


@pytest.mark.parametrize("broker", ["amqp", "nats", "redis"])
async def test_demo_publishes_to_a_broker_and_reads_it_back(broker: str) -> None:
    require(broker)
    from relay.demo import run_demo

    _, url = destination(broker)
    out = io.StringIO()
    assert await run_demo(events=16, to=url, out=out, timeout=20) == 0, out.getvalue()
    assert "16 deliveries received, 16 signatures verified" in out.getvalue()


# -- endpoint keys that are not HTTP-only work for brokers ----------------------------------------


@pytest.mark.parametrize("sim", [{"count": 40, "users": 10}], indirect=True)
async def test_filters_token_policies_and_headers_apply_to_broker_endpoints(
    sim: Simulator, relay_env: Any, run_relay: Any, eventually: Any, signing_secret: str
) -> None:
    require("redis")
    from conftest import new_key

    _, verified_url = destination("redis")
    _, sealed_url = destination("redis")
    receiver_key = new_key()
    endpoints = [
        {
            "url": verified_url,
            "statuses": ["VERIFIED"],
            "user_token": "forward",
            "headers": {"x-tenant": "acme"},
            "max_in_flight": 2,
            "timeout": "3s",
            "retry_schedule": "0s,1s",
        },
        {"url": sealed_url, "user_token": "encrypt", "token_key": receiver_key},
    ]
    env = relay_env(RELAY_TOKEN_KEY=new_key(), RELAY_ENDPOINTS=json.dumps(endpoints))
    db = store_path(env)
    async with Tap(verified_url) as verified, Tap(sealed_url) as sealed, run_relay(env):

        def done() -> bool:
            rows = query(db, "SELECT state FROM deliveries")
            return bool(rows) and {row["state"] for row in rows} == {"delivered"}

        await eventually(done, 15)
        forwarded = await verified.settle(0.3)
        encrypted = await sealed.settle(0.3)
    by_id = {expected_event_id(m): m for m in sim.sent}
    wanted = [i for i, m in by_id.items() if m["payload"]["status"] == "VERIFIED"]
    assert sorted(c.header("webhook-id") or "" for c in forwarded) == sorted(wanted)
    for message in forwarded:
        sent = by_id[message.header("webhook-id") or ""]
        assert json.loads(message.body)["payload"].get("user_token") == sent["payload"].get(
            "user_token"
        )
        assert message.headers[-1] == ("x-tenant", "acme")
    assert len(encrypted) == 40
    for message in encrypted:
        token = json.loads(message.body)["payload"].get("user_token")
        assert token is None or token["alg"] == "A256GCM"
    assert any(json.loads(m.body)["payload"].get("user_token") for m in encrypted)


# -- broker passwords are secrets everywhere -------------------------------------------------------


async def test_broker_passwords_never_reach_logs_store_metrics_or_api(
    sim: Simulator,
    relay_env: Any,
    run_relay: Any,
    eventually: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    require("amqp")
    require("redis")
    import httpx

    password = "brokerpw_" + os.urandom(8).hex()
    endpoints = [  # refused passwords: every attempt fails and is logged, stored, counted
        {"url": f"amqp://guest:{password}@127.0.0.1:{BROKER_PORTS['amqp']}/?routing_key=q"},
        {"url": f"redis://relay:{password}@127.0.0.1:{BROKER_PORTS['redis']}/0?stream=s"},
        {"url": f"nats://relay:{password}@127.0.0.1:1/s"},  # nothing listens on port 1
    ]
    admin_token = "adm_" + os.urandom(12).hex()
    env = relay_env(
        RELAY_ENDPOINTS=json.dumps(endpoints),
        RELAY_ADMIN_TOKEN=admin_token,
        RELAY_LOG_LEVEL="DEBUG",
        RELAY_RETRY_SCHEDULE="0s,200ms,200ms",
    )
    db = store_path(env)
    caplog.set_level("DEBUG")
    async with run_relay(env) as relay:

        def failed_everywhere() -> bool:
            rows = query(db, "SELECT DISTINCT endpoint FROM deliveries WHERE attempts > 0")
            return len(rows) == 3

        await eventually(failed_everywhere, 15)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{relay.admin.port}") as admin:
            auth = {"authorization": f"Bearer {admin_token}"}
            shown = (await admin.get("/metrics")).text
            shown += (await admin.get("/api/endpoints", headers=auth)).text
            shown += (await admin.get("/api/deliveries", headers=auth)).text
    errors = [row["error"] for row in query(db, "SELECT error FROM attempts")]
    assert any("authentication refused" in e for e in errors), errors
    stored = b"".join(
        path.read_bytes() for path in db.parent.iterdir() if path.name.startswith(db.name)
    )
    logged = "\n".join(
        f"{r.getMessage()} {r.__dict__}" for r in caplog.records if r.name.startswith("relay")
    )
    for text in (shown, logged, "\n".join(errors)):
        assert password not in text
    assert password.encode() not in stored


# -- a message larger than the broker accepts: dead at once -------------------------------------


@pytest.mark.parametrize("sim", [{"count": 12, "users": 4}], indirect=True)
async def test_a_message_larger_than_the_stream_accepts_is_dead_after_one_attempt(
    sim: Simulator, fast_env: Any, run_relay: Any, eventually: Any
) -> None:
    require("nats")
    import nats

    relay_url, _ = destination("nats")
    subject = relay_url.rsplit("/", 1)[1]
    client = await nats.connect(servers=[NATS])
    js = client.jetstream()
    stream = subject.replace(".", "_")
    await js.add_stream(name=stream, subjects=[subject], max_msg_size=64)
    try:
        env = fast_env(relay_url)
        db = store_path(env)
        async with run_relay(env):

            def all_dead() -> bool:
                rows = query(db, "SELECT state FROM deliveries")
                return len(rows) == 12 and {row["state"] for row in rows} == {"dead"}

            await eventually(all_dead, 10)
        rows = query(db, "SELECT attempts, last_status, last_error FROM deliveries")
        assert {(r["attempts"], r["last_status"]) for r in rows} == {(1, None)}
        assert all("larger than the stream accepts" in r["last_error"] for r in rows)
    finally:
        await js.delete_stream(stream)
        await client.close()


# -- a broker down at start-up ----------------------------------------------------------------


@pytest.mark.parametrize("sim", [{"count": 6, "users": 3}], indirect=True)
async def test_a_broker_down_at_start_up_never_stops_the_relay(
    sim: Simulator, fast_env: Any, run_relay: Any, eventually: Any, signing_secret: str
) -> None:
    """The relay starts, is ready (feed and store), and its deliveries wait and retry; once
    the broker answers (here: the proxy in front of it), they go out."""
    require("redis")
    import httpx

    async with CuttableProxy(BROKER_PORTS["redis"]) as proxy:
        relay_url, tap_url = destination("redis", proxy.port)
        await proxy.down()  # nothing listens on the broker's port
        env = fast_env(relay_url, RELAY_RETRY_SCHEDULE="0s," + ",".join(["300ms"] * 100))
        db = store_path(env)
        async with run_relay(env) as relay:

            def failing() -> bool:
                rows = query(db, "SELECT last_error FROM deliveries WHERE attempts > 1")
                return bool(rows) and all("connection failed" in r["last_error"] for r in rows)

            await eventually(failing, 10)
            admin = f"http://127.0.0.1:{relay.admin.port}"
            async with httpx.AsyncClient(base_url=admin) as client:
                assert (await client.get("/readyz")).status_code == 200
            async with Tap(tap_url) as tap:
                await proxy.up()  # the broker is back, on the same port
                consumed = await tap.read(6, timeout=15)
                consumed += await tap.settle(0.3)
    check_messages(consumed, sim, signing_secret, duplicates_allowed=0)


# -- TLS schemes with the endpoint's own CA and client certificate ------------------------------


@pytest.mark.parametrize(
    ("broker", "template"),
    [
        ("amqp", "amqps://guest:guest@127.0.0.1:{port}/?routing_key={name}"),
        ("redis", "rediss://127.0.0.1:{port}/0?stream={name}"),
    ],
)
async def test_tls_brokers_verify_with_the_endpoints_ca_and_present_its_certificate(
    broker: str, template: str, tmp_path: Path
) -> None:
    """A TLS-terminating proxy demanding a client certificate sits in front of the broker."""
    require(broker)
    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:  # pytest puts tests/ on sys.path, not the repository root
        sys.path.insert(0, root)
    from bench.certs import make_certs
    from relay.config import EndpointConfig
    from relay.transport import AiohttpSender, sender_for

    pki = make_certs(tmp_path / "pki")
    server = pki.server_context(require_client_cert=True)
    _, tap_url = destination(broker)
    name = tap_url.rsplit("=", 1)[1]
    async with CuttableProxy(BROKER_PORTS[broker], tls=server) as proxy, Tap(tap_url) as tap:
        url = template.format(port=proxy.port, name=name)
        mutual = EndpointConfig.model_validate(
            {
                "url": url,
                "ca_file": str(pki.ca),
                "client_cert": str(pki.client_cert),
                "client_key": str(pki.client_key),
            }
        )
        pool = AiohttpSender()
        sender = sender_for(mutual, pool)
        try:
            result = await sender.post(url, b"{}", {"webhook-id": "evt_tls"}, 5.0)
            assert result.status == 200, result
        finally:
            await sender.close()
        [message] = await tap.read(1)
        assert message.header("webhook-id") == "evt_tls"
        # The system's trust store does not know this CA: refused, and said so.
        plain = sender_for(EndpointConfig.model_validate({"url": url}), pool)
        try:
            result = await plain.post(url, b"{}", {"webhook-id": "evt_no"}, 5.0)
            assert result.status is None and "connection failed" in (result.error or ""), result
        finally:
            await plain.close()
            await pool.close()


# -- endpoint health: a message too large for the broker is not the endpoint's failure ----------


@pytest.mark.parametrize(("permanent", "state"), [(True, "active"), (False, "open")])
async def test_a_too_large_message_never_opens_the_breaker(
    tmp_path: Path, permanent: bool, state: str
) -> None:
    from test_endpoint_health import USERS, Clock, Endpoint, monitors_on_one_store, user_event
    from test_endpoint_health import targets_of_sick as targets

    from relay.transport import SendResult

    clock = Clock()
    alerts = Endpoint(clock)
    store, (monitor, _) = await monitors_on_one_store(
        tmp_path, clock, alerts, subscribed=lambda: True
    )
    try:
        await store.append([user_event(u, 1) for u in USERS[:4]], targets(), clock())
        for claim in await store.claim("sick", clock(), 10):  # four users, threshold two
            result = SendResult(None, 0.1, error="message larger", permanent=permanent)
            monitor.observe("sick", claim, result, probe=False, error=result.error)
        await monitor.step()
        assert monitor.state("sick") == state
    finally:
        await store.close()
        assert alerts.receiver is not None
        await alerts.receiver.close()
