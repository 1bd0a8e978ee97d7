"""The chaos harness: what every scenario shares.

Sizes (CI and full), the ``Outcome`` a scenario returns, the real parts it drives (simulator,
receivers as ``Endpoint``, a bare ``RawFeed``, the relay as a ``RelayProcess`` or in this loop
through ``relay_env`` and ``fast_feed``), views of the store it audits (``SqliteView``,
``PostgresView``) and the small probes that wait for it to settle. The scenarios live in the
sibling modules, one theme each; ``bench/chaos/runner.py`` runs them.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import inspect
import json
import os
import random
import signal
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from websockets.asyncio.server import ServerConnection, serve

from bench.audit import (
    Arrival,
    AuditReport,
    expected_event_id,
    in_flight,
    postgres_deliveries,
    sqlite_deliveries,
)
from bench.procs import PG_URL, eventually, relay_cli, start_relay_run
from relay.events import USERS_FEED
from relay.feed import FeedOptions
from relay.receiver import Received, Receiver, Response
from relay.signing import decode_secret
from relay.simulator import Simulator

#: Short enough that a scenario drains in seconds; long enough to see every retry path.
SHORT_SCHEDULE = "0s,100ms,200ms,300ms,500ms,1s"
SCHEDULE_STEPS = 6
DELIVERY_TIMEOUT = 1.0


@dataclass(frozen=True)
class Sizes:
    """How big each scenario runs: CI keeps every test under 20 s."""

    kills: int
    crash_rate: float
    crash_tail: float
    crash_dwell: float
    feed_rejections: int
    feed_phase: float
    feed_drops: float
    endpoint_events: int
    endpoint_rate: float
    store_outage: float
    fuzz_frames: int
    config_examples: int
    broadcast_runs: int
    broadcast_seconds: float


CI = Sizes(
    kills=3,
    crash_rate=200.0,
    crash_tail=1.0,
    crash_dwell=1.2,
    feed_rejections=1,
    feed_phase=0.5,
    feed_drops=1.6,
    endpoint_events=150,
    endpoint_rate=200.0,
    store_outage=1.5,
    fuzz_frames=300,
    config_examples=300,
    broadcast_runs=3,
    broadcast_seconds=3.0,
)
FULL = Sizes(
    kills=20,
    crash_rate=200.0,
    crash_tail=5.0,
    crash_dwell=2.5,
    feed_rejections=2,
    feed_phase=8.0,
    feed_drops=50.0,
    endpoint_events=3000,
    endpoint_rate=200.0,
    store_outage=8.0,
    fuzz_frames=10_000,
    config_examples=5_000,
    broadcast_runs=50,
    broadcast_seconds=3.0,
)


class ScenarioSkipped(Exception):
    """The sandbox cannot simulate this fault; the message says why."""


@dataclass
class Outcome:
    """A scenario's audit (its table row) and the facts a test asserts on."""

    report: AuditReport
    facts: dict[str, Any] = field(default_factory=dict)


# -- small helpers ---------------------------------------------------------------------------------


async def settle(probe: Callable[[], Any], *, timeout: float, quiet: float = 0.5) -> Any:
    """Wait until ``probe()`` (a tuple ending with the number of unfinished deliveries) stops
    changing for ``quiet`` seconds with nothing unfinished: the feed gave all it had and the
    outbox drained."""
    deadline = time.monotonic() + timeout
    last: Any = None
    since = time.monotonic()
    while True:
        state = probe()
        if inspect.isawaitable(state):
            state = await state
        now = time.monotonic()
        if state != last:
            last, since = state, now
        elif state[-1] == 0 and now - since >= quiet:
            return state
        if now > deadline:
            raise AssertionError(f"did not settle within {timeout:g}s: {state}")
        await asyncio.sleep(0.05)


def count(db: Path, sql: str) -> int:
    import sqlite3

    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10.0)
    try:
        return int(conn.execute(sql).fetchone()[0])
    finally:
        conn.close()


def rows(db: Path, sql: str) -> list[tuple[Any, ...]]:
    import sqlite3

    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10.0)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


UNFINISHED = "SELECT COUNT(*) FROM deliveries WHERE state IN ('waiting', 'pending', 'inflight')"


def sqlite_probe(sim: Simulator, db: Path) -> Callable[[], tuple[int, int, int]]:
    def probe() -> tuple[int, int, int]:
        return len(sim.sent), count(db, "SELECT COUNT(*) FROM events"), count(db, UNFINISHED)

    return probe


def store_bytes(directory: Path, prefix: str) -> dict[str, bytes]:
    """Raw bytes of a SQLite store's files (database, WAL, shared memory, lock)."""
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.name.startswith(prefix)}


def sent_ids(sim: Simulator) -> list[str]:
    return [expected_event_id(m) for m in sim.sent]


def sent_tokens(sim: Simulator) -> list[str]:
    return [m["payload"]["user_token"]["token"] for m in sim.sent if "user_token" in m["payload"]]


# -- the parts -------------------------------------------------------------------------------------


OK = Response(204)
Decide = Callable[[Received], Response]


class Endpoint:
    """A real receiver verifying signatures, whose answers ``decide`` picks; each request is
    logged as an :class:`Arrival` (acknowledged if answered 2xx within the relay's timeout)."""

    def __init__(
        self,
        name: str,
        secrets: Sequence[str],
        decide: Decide | None = None,
        *,
        timeout: float = DELIVERY_TIMEOUT,
    ) -> None:
        self.name = name
        self.path = f"/webhooks/{name}"
        self.decide = decide
        self.timeout = timeout
        self.arrivals: list[Arrival] = []
        self.strays: list[str] = []  # requests to any other path (a redirect followed?)
        self.responses: list[Response] = []
        keys = [decode_secret(s) for s in secrets]
        self.receiver = Receiver(keys=keys, behaviour=self._answer, record=False)

    async def start(self) -> None:
        await self.receiver.start()

    async def close(self) -> None:
        await self.receiver.close()

    @property
    def url(self) -> str:
        return self.receiver.url + self.path

    def config(self, **extra: Any) -> dict[str, Any]:
        return {"name": self.name, "url": self.url, **extra}

    def _answer(self, r: Received) -> Response:
        if r.path != self.path:
            self.strays.append(r.path)
        response = self.decide(r) if self.decide is not None else OK
        ok = 200 <= response.status < 300 and not response.close and response.delay < self.timeout
        self.arrivals.append(Arrival(self.name, r.webhook_id, ok, r.arrived_ns))
        if response.body:
            self.responses.append(response)
        return response

    def arrival_times(self) -> dict[str, int]:
        """First acknowledged arrival (ns) of each event."""
        first: dict[str, int] = {}
        for a in self.arrivals:
            if a.ok:
                first.setdefault(a.webhook_id, a.at_ns)
        return first


async def _sim(stack: contextlib.AsyncExitStack, **kwargs: Any) -> Simulator:
    kwargs.setdefault("api_key", "sim-" + base64.b16encode(os.urandom(12)).decode())
    sim = Simulator(**kwargs)
    await sim.start()
    stack.push_async_callback(sim.close)
    return sim


async def _endpoint(
    stack: contextlib.AsyncExitStack,
    name: str,
    secrets: Sequence[str],
    decide: Decide | None = None,
) -> Endpoint:
    endpoint = Endpoint(name, secrets, decide)
    await endpoint.start()
    stack.push_async_callback(endpoint.close)
    return endpoint


def relay_env(
    sim: Any,
    endpoints: Sequence[Endpoint | Mapping[str, Any]],
    secret: str,
    store: str,
    **overrides: str,
) -> dict[str, str]:
    """A relay's environment: the simulator's feed, these endpoints, short retries and a short
    breaker cooldown (an endpoint failing for many users opens; probes follow within 0.1 s)."""
    env = {
        "RELAY_API_KEY": sim.api_key,
        "RELAY_WS_URL": sim.ws_url,
        "RELAY_API_URL": getattr(sim, "api_url", "http://127.0.0.1:9"),
        "RELAY_ENDPOINTS": json.dumps(
            [e.config() if isinstance(e, Endpoint) else dict(e) for e in endpoints]
        ),
        "RELAY_SIGNING_SECRET": secret,
        "RELAY_STORE": store,
        "RELAY_ADMIN_ADDR": "127.0.0.1:0",
        "RELAY_RECONCILE_INTERVAL": "off",
        "RELAY_RETRY_SCHEDULE": SHORT_SCHEDULE,
        "RELAY_BREAKER_COOLDOWN": "100ms",
        "RELAY_DELIVERY_TIMEOUT": f"{DELIVERY_TIMEOUT:g}s",
        "RELAY_SHUTDOWN_GRACE": "2s",
        "RELAY_LOG_LEVEL": "WARNING",
        "RELAY_LOG_FORMAT": "console",
    }
    env.update(overrides)
    return env


class RelayProcess:
    """A ``relay run`` subprocess, its output in a file."""

    def __init__(self, proc: asyncio.subprocess.Process, log: Path) -> None:
        self.proc = proc
        self.log = log

    @classmethod
    async def start(cls, env: Mapping[str, str], log: Path) -> RelayProcess:
        return cls(await start_relay_run(env, log), log)

    @property
    def running(self) -> bool:
        return self.proc.returncode is None

    def kill(self) -> None:
        if self.running:
            self.proc.kill()

    def terminate(self) -> None:
        if self.running:
            self.proc.send_signal(signal.SIGTERM)

    async def wait(self, timeout: float = 15.0) -> int:
        try:
            async with asyncio.timeout(timeout):
                return await self.proc.wait()
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
            raise AssertionError(f"relay run did not exit within {timeout:g}s") from None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


async def cli(*args: str, env: Mapping[str, str], timeout: float = 20.0) -> tuple[int, str, str]:
    """Run one ``relay`` command; (exit code, stdout, stderr)."""
    done = await relay_cli(*args, env=env, timeout=timeout)
    return done.code, done.stdout, done.stderr


async def readyz(http: httpx.AsyncClient) -> tuple[int, dict[str, str]]:
    response = await http.get("/readyz")
    return response.status_code, response.json().get("checks", {})


async def seconds_until_ready(http: httpx.AsyncClient, timeout: float, what: str) -> float:
    """How long until /readyz answers 200 again (a store came back), rounded to 10 ms."""
    started = time.monotonic()

    async def up() -> bool:
        return (await readyz(http))[0] == 200

    await eventually(up, timeout, what)
    return round(time.monotonic() - started, 2)


def fast_feed(sim: Any, **overrides: Any) -> FeedOptions:
    """The contract's feed timings divided by 25 to 60, so a stall is seen in a second.

    (``relay run`` has no knob for them; the full run also plays stalls at real timings.) The
    backoff resets after a healthy second instead of a minute, so that drops spaced more than
    a second apart do not push the reconnection delay towards its 60 s cap.
    """
    values: dict[str, Any] = {
        "url": sim.ws_url,
        "api_key": sim.api_key,
        "ping_interval": 0.4,
        "dead_after": 1.2,
        "handshake_timeout": 0.8,
        "auth_retry_after": 1.0,
        "healthy_after": 1.0,
        "close_timeout": 0.5,
    }
    values.update(overrides)
    return FeedOptions(**values)


# -- store views -----------------------------------------------------------------------------------


class SqliteView:
    """What the crash loop reads of a SQLite store between and after the daemons."""

    def __init__(self, db: Path) -> None:
        self.db = db
        self.url = f"sqlite:///{db}"
        self.name = "SQLite"

    async def in_flight(self) -> set[tuple[str, str]]:
        return in_flight(self.db) if self.db.exists() else set()

    async def event_ids(self) -> set[str]:
        if not self.db.exists():
            return set()
        return {r[0] for r in rows(self.db, "SELECT event_id FROM events")}

    async def counts(self) -> tuple[int, int]:
        return count(self.db, "SELECT COUNT(*) FROM events"), count(self.db, UNFINISHED)

    async def deliveries(self) -> tuple[list[Any], set[str]]:
        return sqlite_deliveries(self.db)

    async def quarantined(self) -> list[tuple[str, str]]:
        return [(r[0], r[1]) for r in rows(self.db, "SELECT reason, text FROM bad_frames")]

    async def has_event(self, event_id: str) -> bool:
        sql = f"SELECT COUNT(*) FROM events WHERE event_id = '{event_id}'"
        return self.db.exists() and count(self.db, sql) > 0

    async def excerpts(self) -> list[str]:
        return [r[0] for r in rows(self.db, "SELECT excerpt FROM attempts") if r[0] is not None]

    async def files(self) -> dict[str, bytes]:
        """What a leak check reads: the store's files, byte for byte."""
        found = store_bytes(self.db.parent, self.db.name)
        return {f"store file {k}": v for k, v in found.items()}

    async def close(self) -> None:
        return None


class PostgresView:
    """The same for a PostgreSQL store in a schema of its own (dropped at close)."""

    def __init__(self, schema: str) -> None:
        self.schema = schema
        joiner = "&" if "?" in PG_URL else "?"
        self.url = f"{PG_URL}{joiner}options=-csearch_path%3D{schema}"
        self.name = "PostgreSQL"

    async def _fetch(self, sql: str) -> list[Any]:
        import asyncpg

        conn = await asyncpg.connect(
            PG_URL, timeout=10, server_settings={"search_path": self.schema}
        )
        try:
            return list(await conn.fetch(sql))
        except asyncpg.UndefinedTableError:  # not migrated yet
            return []
        finally:
            await conn.close()

    async def create(self) -> None:
        import asyncpg

        conn = await asyncpg.connect(PG_URL, timeout=10)
        try:
            await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')
        finally:
            await conn.close()

    async def in_flight(self) -> set[tuple[str, str]]:
        found = await self._fetch(
            "SELECT d.endpoint, e.event_id FROM deliveries d JOIN events e "
            "ON e.seq = d.event_seq WHERE d.state = 'inflight'"
        )
        return {(r[0], r[1]) for r in found}

    async def event_ids(self) -> set[str]:
        return {r[0] for r in await self._fetch("SELECT event_id FROM events")}

    async def counts(self) -> tuple[int, int]:
        events = await self._fetch("SELECT COUNT(*) FROM events")
        active = await self._fetch(UNFINISHED)
        return (events[0][0] if events else 0), (active[0][0] if active else 0)

    async def deliveries(self) -> tuple[list[Any], set[str]]:
        return await postgres_deliveries(PG_URL, self.schema)

    async def quarantined(self) -> list[tuple[str, str]]:
        return [(r[0], r[1]) for r in await self._fetch("SELECT reason, text FROM bad_frames")]

    async def has_event(self, event_id: str) -> bool:
        sql = f"SELECT 1 FROM events WHERE event_id = '{event_id}'"  # evt_ + hex: no quoting
        return bool(await self._fetch(sql))

    async def excerpts(self) -> list[str]:
        found = await self._fetch("SELECT excerpt FROM attempts WHERE excerpt IS NOT NULL")
        return [r[0] for r in found]

    async def files(self) -> dict[str, bytes]:
        """What a leak check reads: every stored body, quarantined text and excerpt."""
        tables = {
            "events.body": "SELECT body FROM events",
            "bad_frames.text": "SELECT text FROM bad_frames",
            "attempts.excerpt": "SELECT excerpt FROM attempts WHERE excerpt IS NOT NULL",
        }
        out: dict[str, bytes] = {}
        for name, sql in tables.items():
            values = [r[0] for r in await self._fetch(sql)]
            out[name] = b"\n".join(v if isinstance(v, bytes) else v.encode() for v in values)
        return out

    async def close(self) -> None:
        import asyncpg

        with contextlib.suppress(Exception):
            conn = await asyncpg.connect(PG_URL, timeout=5)
            try:
                await conn.execute(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')
            finally:
                await conn.close()


async def open_view(workdir: Path, store: str, name: str) -> SqliteView | PostgresView:
    """A fresh store of the kind ``store`` names (``sqlite`` or ``postgres``) and its view;
    ScenarioSkipped when PostgreSQL is not available here."""
    if store == "sqlite":
        return SqliteView(workdir / f"{name}.db")
    reason = await postgres_available()
    if reason is not None:
        raise ScenarioSkipped(reason)
    view = PostgresView(f"chaos_{name.replace('-', '_')}_{uuid.uuid4().hex[:8]}")
    await view.create()
    return view


# -- PostgreSQL, a raw feed, messages (shared by several scenario modules) -------------------------


async def postgres_available() -> str | None:
    """None when PostgreSQL and the PostgreSQL store are usable here, else why not."""
    try:
        import asyncpg

        from relay.store.postgres import PostgresStore  # noqa: F401
    except Exception as exc:  # the store module is another engineer's work in progress
        return f"relay.store.postgres is not importable: {type(exc).__name__}: {exc}"
    try:
        conn = await asyncpg.connect(PG_URL, timeout=3)
        await conn.close()
    except Exception as exc:
        return f"PostgreSQL unreachable at SFOX_RELAY_TEST_PG ({type(exc).__name__})"
    return None


class RawFeed:
    """A bare sFOX look-alike: answers authenticate and subscribe, then sends whatever frames
    it is given, text or binary, verbatim."""

    def __init__(self, api_key: str = "raw-key") -> None:
        self.api_key = api_key
        self.connections = 0
        self.conn: ServerConnection | None = None
        self.subscribed = asyncio.Event()
        self._server: Any = None
        self.port = 0

    async def start(self) -> None:
        self._server = await serve(self._handle, "127.0.0.1", 0, max_size=None, compression=None)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    async def _handle(self, conn: ServerConnection) -> None:
        self.connections += 1
        n = 0
        async for raw in conn:
            request = json.loads(raw)
            n += 1
            action = request.get("type")
            reply = {"type": "success", "sequence": n, "timestamp": time.time_ns()}
            await conn.send(json.dumps({**reply, "payload": {"action": action}, "action": action}))
            if action == "subscribe":
                self.conn = conn
                self.subscribed.set()
        self.conn = None

    async def send(self, frame: str | bytes) -> None:
        assert self.conn is not None, "nobody subscribed"
        await self.conn.send(frame)


def _dumps(obj: Any, ascii_only: bool = False) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=ascii_only)


def _is_control(char: str) -> bool:
    """Unicode category Cc (what the contract keeps out of stored text)."""
    return ord(char) < 0x20 or 0x7F <= ord(char) <= 0x9F


def fresh_message(rng: random.Random, sequence: int) -> dict[str, Any]:
    """A users-feed message like sFOX's, with a new user and a new token."""
    uid = f"client_{uuid.UUID(int=rng.getrandbits(128), version=4)}"
    token = {"token": f"{rng.getrandbits(256):064x}", "expires": "2099-01-01T00:00:00.000Z"}
    payload = {
        "user_id": uid,
        "first_name": "Leak",
        "last_name": "Probe",
        "email": f"leak.probe.{rng.randrange(10**6)}@example.com",
        "phone_number": f"+1555{rng.randrange(10**7):07d}",
        "account_role": "Client",
        "account_type": "individual",
        "status": "PENDING",
        "user_token": {**token, "partner_user_id": uid},
        "requirements": {"sms": True, "email": True},
    }
    return {
        "sequence": sequence,
        "recipient": USERS_FEED,
        "timestamp": time.time_ns(),
        "payload": payload,
    }
