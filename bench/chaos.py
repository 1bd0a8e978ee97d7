"""Chaos: real parts, real faults, then an audit of the store against what the endpoints got.

``python bench/chaos.py`` runs every scenario at full size (a few minutes), prints the table
and writes ``bench/results/chaos.md``; ``--quick`` runs the CI sizes, ``--only NAME`` some.
``tests/test_chaos.py`` runs the same scenarios at CI sizes and asserts on their reports.

Every scenario drives a real simulator (``relay.simulator``), real receivers
(``relay.receiver``), a real store and the relay itself, either as ``relay run`` subprocesses
(where a kill -9 or separate timing matters) or in this event loop (where the scenario needs
short feed timings, the admin port or the metrics registry). Each ends with the audit of
``bench/audit.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import errno
import gzip
import inspect
import io
import json
import logging
import math
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/chaos.py` puts bench/ first, not the repo
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
from websockets.asyncio.server import ServerConnection, serve  # noqa: E402

from bench.audit import (  # noqa: E402
    Arrival,
    AuditReport,
    audit,
    expected_event_id,
    find_leaks,
    in_flight,
    postgres_deliveries,
    sqlite_deliveries,
)
from bench.procs import (  # noqa: E402
    eventually,
    in_process,
    new_key,
    new_whsec,
    relay_cli,
    start_relay_run,
)
from relay.config import load_settings, secret_values  # noqa: E402
from relay.errors import ConfigError  # noqa: E402
from relay.events import USERS_FEED  # noqa: E402
from relay.feed import FeedOptions  # noqa: E402
from relay.logs import Redactor, setup_logging  # noqa: E402
from relay.receiver import Received, Receiver, Response  # noqa: E402
from relay.signing import decode_secret  # noqa: E402
from relay.simulator import FAKE_TOKEN, Faults, Simulator  # noqa: E402

__all__ = [
    "CI",
    "FULL",
    "Outcome",
    "ScenarioSkipped",
    "Sizes",
    "admin_tricks",
    "config_fuzz",
    "crash_loop",
    "endpoint_faults",
    "endpoint_health",
    "excerpt_size",
    "feed_faults",
    "feed_faults_real_timings",
    "gzip_answers",
    "hostile_frames",
    "hostile_retry_after",
    "large_event",
    "leak_audit",
    "postgres_cut",
    "quarantine_while_down",
    "store_full",
]

#: Short enough that a scenario drains in seconds; long enough to see every retry path.
SHORT_SCHEDULE = "0s,100ms,200ms,300ms,500ms,1s"
SCHEDULE_STEPS = 6
DELIVERY_TIMEOUT = 1.0
PG_URL = os.environ.get("SFOX_RELAY_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
RESULTS = ROOT / "bench" / "results" / "chaos.md"


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


# -- small helpers ---------------------------------------------------------------------------


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


# -- the parts ---------------------------------------------------------------------------------

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


# -- 1. crash loop -------------------------------------------------------------------------------


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


KILL_MODES = ["kill", "term, then kill", "term, term"]


async def crash_loop(
    workdir: Path,
    *,
    kills: int,
    rate: float = 200.0,
    tail: float = 1.0,
    users: int = 50,
    seed: int = 1,
    postgres: bool = False,
    dwell: float = 2.5,
) -> Outcome:
    """kill -9 the daemon at random points under a steady feed (some during the phased
    shutdown SIGTERM starts, some by a second SIGTERM, which exits at once), restart it on the
    same store each time; at the end stop the feed, let the last daemon drain, audit.

    ``postgres``: the same on a PostgreSQL store, with a 3 s lease (a killed daemon's claims
    wait for it before the next one takes them over).
    """
    rng = random.Random(seed)
    secret = new_whsec()
    view: SqliteView | PostgresView
    if postgres:
        reason = await postgres_available()
        if reason is not None:
            raise ScenarioSkipped(reason)
        view = PostgresView(f"relay_chaos_{uuid.uuid4().hex[:10]}")
        await view.create()
    else:
        view = SqliteView(workdir / "crash.db")
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(view.close)
        sim = await _sim(stack, rate=rate, users=users, count=None, seed=seed)
        fast = await _endpoint(stack, "fast", [secret])
        slow = await _endpoint(
            stack, "slow", [secret], lambda r: Response(204, delay=rng.uniform(0.0, 0.08))
        )
        env = relay_env(sim, [fast, slow], secret, view.url, RELAY_LEASE="3s")
        crashed: set[tuple[str, str]] = set()
        committed: set[str] = set()
        outputs: list[str] = []
        killed_while_subscribed = 0
        modes: dict[str, int] = {}
        early_terms = 0
        for n in range(kills):
            subscribes = sim.subscribes
            proc = await RelayProcess.start(env, workdir / f"crash-{n}.log")
            # A random point: one kill in four during start-up (imports, migrations, the
            # handshake), the others anywhere in the steady state.
            if n >= len(KILL_MODES) and rng.random() < 0.25:
                await asyncio.sleep(rng.uniform(0.2, 2.0))
            else:
                with contextlib.suppress(AssertionError):
                    await eventually(lambda s=subscribes: sim.subscribes > s, 15)
                await asyncio.sleep(rng.uniform(0.1, dwell))
            killed_while_subscribed += sim.subscribed > 0
            mode = KILL_MODES[n] if n < len(KILL_MODES) else rng.choice(KILL_MODES * 2 + ["kill"])
            modes[mode] = modes.get(mode, 0) + 1
            if mode == "kill":
                proc.kill()
                allowed = {-signal.SIGKILL}
            elif mode == "term, then kill":  # kill -9 during the phased shutdown
                proc.terminate()
                await asyncio.sleep(rng.uniform(0.05, 0.5))
                proc.kill()
                allowed = {0, -signal.SIGKILL, -signal.SIGTERM}
            else:  # a second signal exits at once
                proc.terminate()
                await asyncio.sleep(rng.uniform(0.01, 0.2))
                proc.terminate()
                allowed = {0, 1, -signal.SIGTERM}
            code = await proc.wait()
            outputs.append(proc.output())
            # Python's default action: SIGTERM before the relay installed its handlers (still
            # importing; nothing open yet).
            early_terms += code == -signal.SIGTERM
            if code not in allowed:
                raise AssertionError(f"relay run exited {code} ({mode}):\n{outputs[-1]}")
            crashed |= await view.in_flight()
            committed |= await view.event_ids()
        last = await RelayProcess.start(env, workdir / "crash-final.log")
        await eventually(lambda: sim.subscribed > 0, 20, last.output)
        await asyncio.sleep(tail)
        sim.pause()

        async def probe() -> tuple[int, int, int]:
            return (len(sim.sent), *await view.counts())

        await settle(probe, timeout=60)
        last.terminate()
        code = await last.wait()
        outputs.append(last.output())

        deliveries, events = await view.deliveries()
        report = audit(
            f"crash loop ({view.name}): {kills} kills at {rate:g} events/s",
            deliveries,
            fast.arrivals + slow.arrivals,
            endpoints=[fast.name, slow.name],
            stored_events=events,
            sent=sent_ids(sim),
            crashed_in_flight=crashed,
            committed=committed,
        )
        if code != 0:
            report.problem(f"the last daemon exited {code} on SIGTERM")
        for text in outputs:
            if "Traceback" in text:
                report.problem("a daemon printed a traceback:\n" + text[-2000:])
                break
        per_minute = sim.max_connections_per_minute()
        report.notes.append(
            f"kills by kind {modes} (SIGTERMs that landed during start-up, before the "
            f"handlers, ending the process by Python's default action: {early_terms}); "
            f"{len(crashed)} deliveries in flight at the kills; {killed_while_subscribed} kills "
            f"while subscribed; {sim.connections} feed connections, at most {per_minute} in a "
            "minute (each restart is a new process with a fresh limiter)"
        )
        return Outcome(
            report,
            {
                "exit_code": code,
                "in_flight_at_kills": len(crashed),
                "killed_while_subscribed": killed_while_subscribed,
                "modes": modes,
                "connections_per_minute": per_minute,
            },
        )


# -- 2. feed faults ------------------------------------------------------------------------------


async def feed_faults(
    workdir: Path,
    *,
    phase: float,
    drops: float,
    rejections: int = 2,
    rate: float = 300.0,
    seed: int = 2,
) -> Outcome:
    """One relay, in this loop with fast feed timings, through: rejected keys, drops with
    garbage frames, handshakes slower than the timeout, a stall with no pongs; then audit that
    every well-formed message the simulator sent was stored and delivered."""
    secret = new_whsec()
    facts: dict[str, Any] = {}
    # Long runs reach sFOX's 20 connections a minute: the relay then waits up to a minute.
    wait = 15 if drops < 10 else 75
    async with contextlib.AsyncExitStack() as stack:
        sim = await _sim(
            stack, rate=rate, users=40, count=None, seed=seed, faults=Faults(reject_auth=rejections)
        )
        sink = await _endpoint(stack, "sink", [secret])
        db = workdir / "feed.db"
        env = relay_env(sim, [sink], secret, f"sqlite:///{db}")
        options = fast_feed(sim)
        t0 = time.monotonic()
        timeline: list[tuple[str, float]] = []

        def mark(what: str) -> None:
            timeline.append((what, round(time.monotonic() - t0, 1)))

        async with in_process(env, feed_options=options) as running:
            mark("started")
            # Rejected keys: each retry waits auth_retry_after; then subscribed.
            await eventually(lambda: sim.subscribed > 0, wait, "subscribed after the rejections")
            times = sim.connection_times
            facts["auth_gaps"] = [round(times[i + 1] - times[i], 2) for i in range(rejections)]
            facts["auth_retry_after"] = options.auth_retry_after
            mark("subscribed after rejections")

            # Drops (each connection lives 1.2 s) with garbage frames in between; kept up long
            # enough (full run), the reconnections reach sFOX's limit of 20 a minute.
            sim.faults.drop_every = int(rate * 1.2)
            sim.faults.bad_every = 37
            await asyncio.sleep(drops)

            # Handshakes slower than the relay waits: it gives up, backs off, tries again.
            before = sim.connections
            mark("drops done")
            sim.faults.handshake_delay = options.handshake_timeout * 1.5
            await eventually(lambda: sim.connections >= before + 2, wait, "handshake timeouts")
            mark("handshake timeouts seen")
            sim.faults.handshake_delay = options.handshake_timeout / 4
            await eventually(lambda: sim.subscribed > 0, wait, "subscribed after slow handshakes")
            await asyncio.sleep(phase / 2)

            mark("slow handshakes done")
            # A stall: the server stops sending and answering pings; keepalive must notice.
            sim.faults.drop_every = None
            await eventually(lambda: sim.subscribed > 0, wait, "subscribed before the stall")
            before = sim.connections
            sim.faults.stall_after = 1
            await eventually(lambda: sim.subscribed == 0, 5, "the connection stalled")
            stalled_at = time.monotonic()
            sim.faults.stall_after = None  # that connection stays stalled; the next ones not
            await eventually(lambda: sim.connections > before, wait, "a reconnection after a stall")
            facts["stall_detected_s"] = round(time.monotonic() - stalled_at, 2)
            await eventually(lambda: sim.subscribed > 0, wait, "subscribed after the stall")
            await asyncio.sleep(phase / 2)

            mark("stall done")
            sim.pause()
            await settle(sqlite_probe(sim, db), timeout=30)
            mark("settled")
            facts["alive"] = running.alive()
            facts["bad_frames_counted"] = running.metric("relay_feed_bad_frames_total")
            facts["reconnects"] = running.metric("relay_feed_reconnects_total")
        facts["bad_frames_quarantined"] = count(db, "SELECT COUNT(*) FROM bad_frames")
        facts["connections"] = sim.connections
        facts["timeline"] = timeline
        facts["connections_per_minute"] = sim.max_connections_per_minute()
        facts["requests_per_minute"] = sim.max_requests_per_minute()
        facts["fake_token_stored"] = any(
            FAKE_TOKEN.encode() in data for data in store_bytes(db.parent, db.name).values()
        )
        deliveries, events = sqlite_deliveries(db)
        report = audit(
            "feed faults: rejected key, drops, garbage, slow handshakes, a stall",
            deliveries,
            sink.arrivals,
            endpoints=[sink.name],
            stored_events=events,
            sent=sent_ids(sim),
            must_store_sent=True,
        )
        _feed_checks(report, facts, limit=20)
        report.notes.append(
            f"{facts['connections']} connections (at most {facts['connections_per_minute']} "
            f"a minute), {int(facts['bad_frames_counted'])} bad frames counted and "
            f"{facts['bad_frames_quarantined']} quarantined, stall seen after "
            f"{facts['stall_detected_s']}s (timings /30)"
        )
        return Outcome(report, facts)


def _feed_checks(report: AuditReport, facts: dict[str, Any], *, limit: int) -> None:
    if facts.get("alive") is False:
        report.problem("the relay stopped running")
    if facts["connections_per_minute"] > limit:
        report.problem(f"{facts['connections_per_minute']} connections in a minute (> {limit})")
    if facts["requests_per_minute"] > 2 * limit:
        report.problem(f"{facts['requests_per_minute']} requests in a minute (> {2 * limit})")
    if facts["bad_frames_counted"] != facts["bad_frames_quarantined"]:
        report.problem(
            f"{facts['bad_frames_counted']} bad frames counted, "
            f"{facts['bad_frames_quarantined']} quarantined"
        )
    if facts["fake_token_stored"]:
        report.problem("a bad frame's user token is in the store files")
    for gap in facts.get("auth_gaps", []):
        if gap < facts["auth_retry_after"] - 0.05:
            report.problem(f"retried {gap}s after a rejected key (< {facts['auth_retry_after']}s)")


async def feed_faults_real_timings(workdir: Path, *, rate: float = 100.0) -> Outcome:
    """The same at the contract's own timings, with ``relay run``: one rejected key (the
    retry must wait 60 s) and one stall (noticed after 20-30 s without a pong). Full run only."""
    secret = new_whsec()
    facts: dict[str, Any] = {}
    async with contextlib.AsyncExitStack() as stack:
        sim = await _sim(stack, rate=rate, users=40, count=None, faults=Faults(reject_auth=1))
        sink = await _endpoint(stack, "sink", [secret])
        db = workdir / "feed-real.db"
        env = relay_env(sim, [sink], secret, f"sqlite:///{db}")
        proc = await RelayProcess.start(env, workdir / "feed-real.log")
        try:
            await eventually(lambda: sim.subscribed > 0, 90, "subscribed after a rejected key")
            times = sim.connection_times
            facts["auth_gaps"] = [round(times[1] - times[0], 2)]
            facts["auth_retry_after"] = 60.0
            await asyncio.sleep(3)
            before = sim.connections
            sim.faults.stall_after = 1
            await eventually(lambda: sim.subscribed == 0, 5, "the connection stalled")
            stalled_at = time.monotonic()
            sim.faults.stall_after = None  # that connection stays stalled; the next ones not
            await eventually(lambda: sim.connections > before, 60, "a reconnection after a stall")
            facts["stall_detected_s"] = round(time.monotonic() - stalled_at, 1)
            await eventually(lambda: sim.subscribed > 0, 30, "subscribed after the stall")
            sim.faults.bad_every = 50
            await asyncio.sleep(3)
            sim.pause()
            await settle(sqlite_probe(sim, db), timeout=60)
        finally:
            proc.terminate()
            code = await proc.wait()
        facts["exit_code"] = code
        facts["bad_frames_quarantined"] = count(db, "SELECT COUNT(*) FROM bad_frames")
        facts["bad_frames_counted"] = facts["bad_frames_quarantined"]  # no registry here
        facts["connections_per_minute"] = sim.max_connections_per_minute()
        facts["requests_per_minute"] = sim.max_requests_per_minute()
        facts["fake_token_stored"] = any(
            FAKE_TOKEN.encode() in data for data in store_bytes(db.parent, db.name).values()
        )
        deliveries, events = sqlite_deliveries(db)
        report = audit(
            "feed faults at real timings: rejected key (60 s), stall (30 s)",
            deliveries,
            sink.arrivals,
            endpoints=[sink.name],
            stored_events=events,
            sent=sent_ids(sim),
            must_store_sent=True,
        )
        _feed_checks(report, facts, limit=20)
        if code != 0 or "Traceback" in proc.output():
            report.problem(f"relay run exited {code}:\n{proc.output()[-2000:]}")
        # Seen 20-30 s after the stall (a ping every 10 s, 20 s for its pong), plus the 5 s
        # close timeout and the first backoff (under 2 s) before the new connection.
        if not 19 <= facts["stall_detected_s"] <= 40:
            report.problem(f"reconnected {facts['stall_detected_s']}s after a stall, not 20-37 s")
        report.notes.append(
            f"retried {facts['auth_gaps'][0]}s after the rejected key; reconnected "
            f"{facts['stall_detected_s']}s after a stall"
        )
        return Outcome(report, facts)


# -- 3. endpoint faults --------------------------------------------------------------------------

BIG_TEXT = b"x" * (10 * 1024 * 1024)
BIG_BINARY = b"\xfe\xff" * (5 * 1024 * 1024)
PERMANENT = {301, 410}


def chaos_decider(rng: random.Random, redirect_to: str) -> Decide:
    """A misbehaving endpoint: every answer drawn at random."""

    def decide(r: Received) -> Response:
        x = rng.random()
        if x < 0.30:
            return Response(500, body=b'{"error":"upstream exploded"}')
        if x < 0.37:
            return Response(204, delay=DELIVERY_TIMEOUT + 0.5)  # past the relay's timeout
        if x < 0.44:
            return Response(429, headers={"Retry-After": "1"})
        if x < 0.51:
            return Response(close=True)  # a connection reset
        if x < 0.54:
            return Response(503, body=BIG_TEXT)
        if x < 0.56:
            return Response(200, body=BIG_TEXT)
        if x < 0.59:
            return Response(410, body=b"gone")
        if x < 0.62:
            return Response(301, headers={"Location": redirect_to})
        return OK

    return decide


async def endpoint_faults(
    workdir: Path, *, events: int, rate: float = 200.0, users: int = 40, seed: int = 3
) -> Outcome:
    """``relay run`` with two endpoints: one fails in every way an endpoint can, the other is
    healthy and must get everything promptly regardless."""
    rng = random.Random(seed)
    secret = new_whsec()
    async with contextlib.AsyncExitStack() as stack:
        sim = await _sim(stack, rate=rate, users=users, count=events, seed=seed)
        healthy = await _endpoint(stack, "healthy", [secret])
        chaos = await _endpoint(
            stack, "chaos", [secret], chaos_decider(rng, healthy.receiver.url + "/redirected")
        )
        db = workdir / "endpoints.db"
        env = relay_env(sim, [chaos, healthy], secret, f"sqlite:///{db}")
        proc = await RelayProcess.start(env, workdir / "endpoints.log")
        try:
            await eventually(sim.finished.is_set, 60, "the simulator sent everything")
            await settle(sqlite_probe(sim, db), timeout=90)
        finally:
            proc.terminate()
            code = await proc.wait()

        deliveries, stored = sqlite_deliveries(db)

        def dead_ok(d: Any) -> bool:
            return d.endpoint == chaos.name and (
                d.last_status in PERMANENT or d.attempts >= SCHEDULE_STEPS
            )

        report = audit(
            "endpoint faults: 500, timeout, 429, reset, 10 MB, 410, 301",
            deliveries,
            chaos.arrivals + healthy.arrivals,
            endpoints=[chaos.name, healthy.name],
            stored_events=stored,
            sent=sent_ids(sim),
            must_store_sent=True,
            dead_ok=dead_ok,
        )
        received_at = dict(rows(db, "SELECT event_id, received_at FROM events"))
        latencies = [
            at / 1e9 - received_at[event_id]
            for event_id, at in healthy.arrival_times().items()
            if event_id in received_at
        ]
        excerpt = rows(
            db,
            "SELECT MAX(length(CAST(excerpt AS BLOB))), MAX(length(excerpt)) FROM attempts",
        )[0]
        statuses = dict(
            rows(db, "SELECT COALESCE(status, 0), COUNT(*) FROM attempts GROUP BY status")
        )
        facts = {
            "exit_code": code,
            "healthy_max_latency_s": round(max(latencies), 3) if latencies else math.nan,
            "healthy_p50_latency_s": round(statistics.median(latencies), 3),
            "healthy_strays": list(healthy.strays),
            "excerpt_max_bytes": excerpt[0] or 0,
            "excerpt_max_chars": excerpt[1] or 0,
            "attempt_statuses": statuses,
            "dead_by_status": dict(
                rows(
                    db,
                    "SELECT last_status, COUNT(*) FROM deliveries WHERE state = 'dead' "
                    "GROUP BY last_status",
                )
            ),
        }
        if code != 0 or "Traceback" in proc.output():
            report.problem(f"relay run exited {code}:\n{proc.output()[-2000:]}")
        if healthy.strays:
            report.problem(f"a redirect was followed: {healthy.strays[:3]}")
        if facts["excerpt_max_bytes"] > 1024:
            report.problem(
                f"a stored response excerpt is {facts['excerpt_max_bytes']} bytes (> 1 KiB)"
            )
        report.notes.append(
            f"healthy endpoint latency max {facts['healthy_max_latency_s']}s, "
            f"p50 {facts['healthy_p50_latency_s']}s; {report.dead} dead at the chaos endpoint "
            f"(by last status {facts['dead_by_status']}); largest stored excerpt "
            f"{facts['excerpt_max_bytes']} bytes"
        )
        return Outcome(report, facts)


def busiest_second(times_ns: Sequence[int]) -> int:
    """The most arrivals in any one-second window."""
    times = sorted(times_ns)
    best = j = 0
    for i, start in enumerate(times):
        while j < len(times) and times[j] < start + 1_000_000_000:
            j += 1
        best = max(best, j - i)
    return best


async def endpoint_health(
    workdir: Path, *, events: int, outage: float = 2.0, rate: float = 100.0, limit: int = 40
) -> Outcome:
    """Endpoint health under faults (CONTRACT.md 5b, 5c): ``flaky`` fails every way a
    retried failure can (5xx, 429 with Retry-After, resets, timeouts) for ``outage`` seconds,
    then recovers; ``limited`` is healthy under a rate limit and is paused and resumed by an
    operator mid-run; ``healthy`` must not notice; operational events go to ``alerts``.
    Nothing may go dead or out of order, the flaky endpoint sees only probes while open, the
    limit holds at the receiver, and each transition raises exactly one alert."""
    secret = new_whsec()
    rng = random.Random(11)
    began = {"at": math.inf}

    def flaky_decide(r: Received) -> Response:
        if time.monotonic() - began["at"] >= outage:
            return OK
        x = rng.random()
        if x < 0.4:
            return Response(503)
        if x < 0.6:
            return Response(429, headers={"Retry-After": "0"})
        if x < 0.8:
            return Response(close=True)
        return Response(204, delay=DELIVERY_TIMEOUT + 0.2)

    async with contextlib.AsyncExitStack() as stack:
        sim = await _sim(stack, rate=rate, users=30, count=events, seed=11)
        flaky = await _endpoint(stack, "flaky", [secret], flaky_decide)
        limited = await _endpoint(stack, "limited", [secret])
        healthy = await _endpoint(stack, "healthy", [secret])
        alerts = await _endpoint(stack, "alerts", [secret])
        db = workdir / "health.db"
        env = relay_env(
            sim,
            [flaky.config(), limited.config(rate_limit=limit), healthy.config()],
            secret,
            f"sqlite:///{db}",
            RELAY_ALERT_URL=alerts.url,
            RELAY_ADMIN_TOKEN="chaos-health-admin-token-000000",
            RELAY_RETRY_SCHEDULE="0s,50ms,100ms",  # three attempts: a breaker must save them
        )
        states: list[tuple[float, str]] = []
        async with in_process(env, health_poll=0.05) as running:
            began["at"] = time.monotonic()

            async def watch() -> None:
                while True:
                    state = running.relay.monitor.state("flaky")
                    if not states or states[-1][1] != state:
                        states.append((time.monotonic() - began["at"], state))
                    await asyncio.sleep(0.01)

            watcher = asyncio.create_task(watch())
            headers = {"Authorization": "Bearer chaos-health-admin-token-000000"}
            try:
                async with httpx.AsyncClient(base_url=running.admin, headers=headers) as http:
                    await asyncio.sleep(0.5)
                    paused = (await http.post("/api/endpoints/limited/pause")).json()
                    await asyncio.sleep(1.0)  # attempts in flight finish
                    while_paused = len(limited.arrivals)
                    await asyncio.sleep(0.5)
                    quiet = len(limited.arrivals) - while_paused
                    resumed = (await http.post("/api/endpoints/limited/resume")).json()
                await eventually(sim.finished.is_set, 60, "the simulator sent everything")
                # The limited endpoint takes events / limit seconds at least.
                await settle(sqlite_probe(sim, db), timeout=30 + 1.5 * events / limit)
                await eventually(lambda: len(alerts.arrivals) >= 4, 10, "the alerts")
                await asyncio.sleep(0.3)
            finally:
                watcher.cancel()

        deliveries, stored = sqlite_deliveries(db)
        alert_events = {d.event_id for d in deliveries if d.endpoint == alerts.name}
        report = audit(
            "endpoint health: breaker, probes, pause/resume, rate limit, alerts",
            [d for d in deliveries if d.endpoint != alerts.name],
            flaky.arrivals + limited.arrivals + healthy.arrivals,
            endpoints=[flaky.name, limited.name, healthy.name],
            stored_events=stored - alert_events,
            sent=sent_ids(sim),
            must_store_sent=True,
        )
        types = Counter(
            json.loads(body)["type"]
            for (body,) in rows(
                db,
                "SELECT e.body FROM events e JOIN deliveries d ON d.event_seq = e.seq "
                "WHERE d.endpoint = 'alerts'",
            )
        )
        opened = [t for t, state in states if state == "open"]
        closed = [t for t, state in states if state == "active" and opened and t > opened[0]]
        flaky_times = [a.at_ns / 1e9 for a in flaky.arrivals]
        wall_began = time.time() - (time.monotonic() - began["at"])
        during_open = []
        for start in opened:
            end = min([t for t in closed if t > start] or [math.inf])
            during_open += [t for t in flaky_times if start + 0.05 < t - wall_began < end - 0.05]
        received_at = dict(rows(db, "SELECT event_id, received_at FROM events"))
        latencies = sorted(
            at / 1e9 - received_at[event_id]
            for event_id, at in healthy.arrival_times().items()
            if event_id in received_at
        )
        facts = {
            "healthy_p50_latency_s": round(statistics.median(latencies), 3),
            "healthy_max_latency_s": round(latencies[-1], 3),
            "states": states,
            "alerts": dict(types),
            "attempts_while_open": len(during_open),
            "flaky_attempts": len(flaky.arrivals),
            "limited_busiest_second": busiest_second([a.at_ns for a in limited.arrivals]),
            "paused": paused,
            "resumed": resumed,
            "arrivals_while_paused": quiet,
        }
        if types["endpoint.opened"] < 1 or types["endpoint.recovered"] != types["endpoint.opened"]:
            report.problem(f"alerts do not pair up: {dict(types)}")
        if types["endpoint.paused"] != 1 or types["endpoint.resumed"] != 1:
            report.problem(f"pause/resume alerts: {dict(types)}")
        if quiet:
            report.problem(f"{quiet} attempts reached a paused endpoint")
        if facts["limited_busiest_second"] > limit + 1:
            report.problem(f"rate limit {limit}/s: {facts['limited_busiest_second']} in a second")
        # Probes after 0.1, 0.2, 0.4 ... s, never more than one at a time: few per open spell.
        if len(during_open) > 8 * max(1, len(opened)):
            report.problem(f"{len(during_open)} attempts while open: not only probes")
        report.notes.append(
            f"flaky endpoint: {len(flaky.arrivals)} attempts, {len(during_open)} while open "
            f"({len(opened)} open spells); states {states}; alerts {dict(types)}; limited "
            f"endpoint's busiest second {facts['limited_busiest_second']} (limit {limit}/s), "
            f"{quiet} arrivals while paused; healthy endpoint latency p50 "
            f"{facts['healthy_p50_latency_s']}s, max {facts['healthy_max_latency_s']}s"
        )
        return Outcome(report, facts)


async def excerpt_size(workdir: Path) -> Outcome:
    """An endpoint answering 10 MB that is not UTF-8: every stored response excerpt must stay
    within 1 KiB (the README, "Dead deliveries")."""
    secret = new_whsec()
    async with contextlib.AsyncExitStack() as stack:
        sim = await _sim(stack, count=6, users=6)
        binary = await _endpoint(
            stack, "binary", [secret], lambda r: Response(502, body=BIG_BINARY)
        )
        db = workdir / "excerpt.db"
        # The endpoint fails for good and every delivery must run out of its schedule: an open
        # breaker would hold them instead (probes use no attempt), so it stays out of the way.
        env = relay_env(
            sim,
            [binary],
            secret,
            f"sqlite:///{db}",
            RELAY_RETRY_SCHEDULE="0s,50ms",
            RELAY_BREAKER_THRESHOLD="1000000",
        )
        async with in_process(env):
            await eventually(sim.finished.is_set, 10, "the simulator sent everything")
            await settle(sqlite_probe(sim, db), timeout=20)
        sizes = [r[0] for r in rows(db, "SELECT length(CAST(excerpt AS BLOB)) FROM attempts")]
        deliveries, events = sqlite_deliveries(db)
        report = audit(
            "endpoint answers 10 MB of non-UTF-8 bytes",
            deliveries,
            binary.arrivals,
            endpoints=[binary.name],
            stored_events=events,
            sent=sent_ids(sim),
            must_store_sent=True,
            dead_ok=lambda d: d.attempts >= 2,
        )
    biggest = max(sizes, default=0)
    if biggest > 1024:
        report.problem(f"a stored response excerpt is {biggest} bytes (> 1 KiB)")
    report.notes.append(f"{len(sizes)} attempts; largest stored excerpt {biggest} bytes")
    return Outcome(report, {"excerpt_max_bytes": biggest, "attempts": len(sizes)})


#: A gzip-compressed error page, as a proxy in front of an endpoint may send it whatever the
#: request asked for: binary, NUL bytes and all.
GZIP_ERROR_PAGE = gzip.compress(
    b"<html><body>502 Bad Gateway</body></html>" + bytes(range(256)) * 16
)


async def gzip_answers(workdir: Path, *, store: str = "sqlite", events: int = 20) -> Outcome:
    """An endpoint that answers each event's first attempt 502 with a gzip-compressed body:
    the relay must ask for uncompressed answers, store every excerpt without control
    characters (PostgreSQL refuses NUL: every verdict then failed to record, and every
    delivery stayed in flight), and deliver everything on the retry."""
    view = await open_view(workdir, store, "gzip")
    secret = new_whsec()
    seen: set[str] = set()
    encodings: set[str] = set()

    def decide(r: Received) -> Response:
        encodings.add(r.headers.get("accept-encoding", "(none)"))
        if r.webhook_id in seen:
            return OK
        seen.add(r.webhook_id)
        headers = {"content-encoding": "gzip", "content-type": "text/html"}
        return Response(502, headers=headers, body=GZIP_ERROR_PAGE)

    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(view.close)
        sim = await _sim(stack, count=events, users=5)
        odd = await _endpoint(stack, "gzip", [secret], decide)
        env = relay_env(sim, [odd], secret, view.url, RELAY_RETRY_SCHEDULE="0s,50ms,100ms")
        async with in_process(env) as running:
            await eventually(sim.finished.is_set, 10, "the simulator sent everything")
            with contextlib.suppress(AssertionError):  # the audit says what is left
                await settle(view.counts, timeout=15)
            alive = running.alive()
        deliveries, stored = await view.deliveries()
        excerpts = await view.excerpts()
    report = audit(
        f"endpoint answers gzip-compressed binary ({view.name})",
        deliveries,
        odd.arrivals,
        endpoints=[odd.name],
        stored_events=stored,
        sent=sent_ids(sim),
        must_store_sent=True,
    )
    dirty = sum(any(_is_control(c) for c in e) for e in excerpts)
    if not alive:
        report.problem("the relay stopped running")
    if dirty:
        report.problem(f"{dirty} stored excerpts hold a control character")
    if len(excerpts) < events:
        report.problem(f"{len(excerpts)} excerpts recorded for {events} failed attempts")
    if encodings != {"identity"}:
        report.problem(f"the relay asked for accept-encoding {sorted(encodings)}")
    report.notes.append(f"{len(excerpts)} excerpts, none with a control character: {not dirty}")
    facts = {"excerpts": len(excerpts), "dirty": dirty, "encodings": sorted(encodings)}
    return Outcome(report, facts)


async def large_event(workdir: Path, *, size: int = 1_040_000) -> Outcome:
    """One event just under the 1 MiB frame limit must be delivered, without a warning on the
    way (the project's tests turn warnings into errors, and a warning raised inside a delivery
    is an "internal error"); one just over it is a bad frame: counted, kept, skipped, and the
    connection lives on (CONTRACT.md section 5)."""
    secret = new_whsec()
    rng = random.Random(9)
    message = fresh_message(rng, 1)
    message["payload"]["notes"] = "n" * size
    too_big = fresh_message(rng, 2)
    too_big["payload"]["notes"] = "n" * (1024 * 1024 + 10_000)
    async with contextlib.AsyncExitStack() as stack:
        sim = await _sim(stack, count=0, users=1)
        sink = await _endpoint(stack, "sink", [secret])
        db = workdir / "large.db"
        env = relay_env(sim, [sink], secret, f"sqlite:///{db}")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            async with in_process(env) as running:
                await eventually(lambda: sim.subscribed > 0, 10, "subscribed")
                await sim.publish(too_big)
                await sim.publish(message)
                with contextlib.suppress(AssertionError):  # the audit says what is left
                    await settle(sqlite_probe(sim, db), timeout=10)
                bad = int(running.metric("relay_feed_bad_frames_total"))
        relayed = [w for w in caught if "relay" in w.filename or "aiohttp" in w.filename]
        deliveries, events = sqlite_deliveries(db)
        quarantined = count(db, "SELECT COUNT(*) FROM bad_frames")
        report = audit(
            f"one event of {size / 1e6:g} MB, one over 1 MiB",
            deliveries,
            sink.arrivals,
            endpoints=[sink.name],
            stored_events=events,
            sent=[expected_event_id(message)],
            must_store_sent=True,
        )
    for w in relayed:
        report.problem(f"{w.category.__name__} during the delivery: {w.message}")
    if bad != 1 or quarantined != 1:
        report.problem(f"the frame over 1 MiB: {bad} counted, {quarantined} quarantined")
    if sim.connections != 1:
        report.problem(f"the relay reconnected: {sim.connections} connections")
    facts = {"warnings": [str(w.message) for w in relayed], "bad": bad, "kept": quarantined}
    return Outcome(report, facts)


#: A Retry-After no calendar holds (year 99,999,999,999).
HOSTILE_RETRY_AFTER = "Mon, 01 Jan 99999999999 00:00:00 GMT"


async def hostile_retry_after(workdir: Path, *, patience: float = 8.0) -> Outcome:
    """An endpoint answering 503 with a ``Retry-After`` date beyond any calendar, once per
    event: each delivery must still be retried (then delivered) or die, never hang."""
    secret = new_whsec()
    seen: set[str] = set()

    def decide(r: Received) -> Response:
        if r.webhook_id in seen:
            return OK
        seen.add(r.webhook_id)
        return Response(503, headers={"Retry-After": HOSTILE_RETRY_AFTER})

    async with contextlib.AsyncExitStack() as stack:
        sim = await _sim(stack, count=10, users=5)
        odd = await _endpoint(stack, "odd", [secret], decide)
        db = workdir / "retry-after.db"
        env = relay_env(sim, [odd], secret, f"sqlite:///{db}")
        async with in_process(env) as running:
            await eventually(sim.finished.is_set, 10, "the simulator sent everything")
            with contextlib.suppress(AssertionError):  # the audit says what is left
                await settle(sqlite_probe(sim, db), timeout=patience)
            alive = running.alive()
        deliveries, events = sqlite_deliveries(db)
        report = audit(
            "endpoint answers Retry-After beyond any calendar",
            deliveries,
            odd.arrivals,
            endpoints=[odd.name],
            stored_events=events,
            sent=sent_ids(sim),
            must_store_sent=True,
            dead_ok=lambda d: True,
        )
    if not alive:
        report.problem("the relay stopped running")
    stuck = sum(d.state != "delivered" for d in deliveries)
    report.notes.append(
        f"{stuck} of {len(deliveries)} deliveries not delivered after {patience:g} s"
    )
    return Outcome(report, {"stuck": stuck, "alive": alive})


# -- 4. store faults -----------------------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(directory: Path, size: str) -> Iterable[Path]:
    """A small tmpfs mounted at ``directory`` (root only); ScenarioSkipped if refused."""
    directory.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        raise ScenarioSkipped("mounting a tmpfs needs root and mount(8)")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise ScenarioSkipped(f"this sandbox refuses mount -t tmpfs: {done.stderr.strip()}")
    try:
        yield directory
    finally:
        umount = ["umount", str(directory)]
        if subprocess.run(umount, capture_output=True, check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(directory)], capture_output=True, check=False)


def fill(directory: Path) -> Path:
    """Fill the file system under ``directory`` to the last byte; returns the filler file."""
    filler = directory / "filler"
    chunk = b"\0" * 65536
    with filler.open("wb", buffering=0) as out:
        try:
            while True:
                out.write(chunk)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
        with contextlib.suppress(OSError):
            while True:
                out.write(b"\0" * 512)
    return filler


async def store_full(workdir: Path, *, outage: float, rate: float = 200.0) -> Outcome:
    """The SQLite store's file system fills up under a running relay, then frees up again."""
    secret = new_whsec()
    facts: dict[str, Any] = {}
    with tmpfs(workdir / "tmpfs", "32m") as mount:
        async with contextlib.AsyncExitStack() as stack:
            sim = await _sim(stack, rate=rate, users=40, count=None, faults=Faults(bad_every=40))
            sink = await _endpoint(stack, "sink", [secret])
            db = mount / "relay.db"
            env = relay_env(sim, [sink], secret, f"sqlite:///{db}")
            async with (
                in_process(env) as running,
                httpx.AsyncClient(base_url=running.admin, timeout=5) as http,
            ):
                await eventually(lambda: count(db, "SELECT COUNT(*) FROM events") >= 200, 15)
                filler = fill(mount)

                async def down() -> bool:
                    status, checks = await readyz(http)
                    return status == 503 and checks.get("store") == "failing"

                t0 = time.monotonic()
                await eventually(down, 15, "/readyz 503 naming store after the disk filled")
                facts["readyz_503_after_s"] = round(time.monotonic() - t0, 2)
                facts["store_check_during_outage"] = (await readyz(http))[1]
                # The feed is held: after the buffers fill, the simulator can send no more.
                samples: list[tuple[int, int, float]] = []
                ready_codes: list[int] = []
                end = time.monotonic() + outage
                while time.monotonic() < end:
                    stored_now = count(db, "SELECT COUNT(*) FROM events")
                    taken = running.metric("relay_feed_messages_total")
                    samples.append((len(sim.sent), stored_now, taken))
                    ready_codes.append((await readyz(http))[0])
                    await asyncio.sleep(0.1)
                tail = samples[len(samples) // 2 :]
                facts["sent_growth_in_second_half"] = tail[-1][0] - tail[0][0]
                facts["stored_growth_in_second_half"] = tail[-1][1] - tail[0][1]
                facts["taken_growth_in_second_half"] = tail[-1][2] - tail[0][2]
                facts["readyz_200_during_outage"] = ready_codes.count(200)
                facts["readyz_samples"] = len(ready_codes)
                facts["alive_during_outage"] = running.alive()
                filler.unlink()
                t0 = time.monotonic()

                async def up() -> bool:
                    return (await readyz(http))[0] == 200

                await eventually(up, 20, "/readyz 200 once space returned")
                facts["recovered_after_s"] = round(time.monotonic() - t0, 2)
                await asyncio.sleep(1.0)
                sim.pause()
                await settle(sqlite_probe(sim, db), timeout=30)
                facts["bad_frames_counted"] = running.metric("relay_feed_bad_frames_total")
            facts["bad_frames_quarantined"] = count(db, "SELECT COUNT(*) FROM bad_frames")
            deliveries, events = sqlite_deliveries(db)
            report = audit(
                "store faults: SQLite disk full, then space returns",
                deliveries,
                sink.arrivals,
                endpoints=[sink.name],
                stored_events=events,
                sent=sent_ids(sim),
                must_store_sent=True,
            )
    if facts["stored_growth_in_second_half"]:
        report.problem("events were stored while the disk was full?")
    if facts["taken_growth_in_second_half"]:
        report.problem(
            f"the feed handed {facts['taken_growth_in_second_half']:.0f} more messages to a "
            "store that could not take them"
        )
    if facts["bad_frames_counted"] != facts["bad_frames_quarantined"]:
        report.problem(
            f"{facts['bad_frames_counted']:.0f} bad frames counted, "
            f"{facts['bad_frames_quarantined']} quarantined (kept)"
        )
    if facts["readyz_200_during_outage"]:
        report.problem(
            f"/readyz answered 200 in {facts['readyz_200_during_outage']} of "
            f"{facts['readyz_samples']} samples while the disk was full"
        )
    report.notes.append(
        f"/readyz 503 {facts['readyz_503_after_s']}s after the disk filled, 200 again "
        f"{facts['recovered_after_s']}s after space returned; in the outage's second half the "
        f"feed handed the store {facts['taken_growth_in_second_half']:.0f} more messages (the "
        f"simulator wrote {facts['sent_growth_in_second_half']} more into socket buffers)"
    )
    return Outcome(report, facts)


async def quarantine_while_down(workdir: Path) -> Outcome:
    """A malformed frame that arrives while the SQLite disk is full must still be kept
    (quarantined) once space returns, like the messages around it."""
    secret = new_whsec()
    rng = random.Random(8)
    with tmpfs(workdir / "tmpfs", "16m") as mount:
        async with contextlib.AsyncExitStack() as stack:
            feed = RawFeed()
            await feed.start()
            stack.push_async_callback(feed.close)
            sink = await _endpoint(stack, "sink", [secret])
            db = mount / "relay.db"
            env = relay_env(feed, [sink], secret, f"sqlite:///{db}")
            messages = [fresh_message(rng, n) for n in range(1, 4)]
            async with in_process(env, feed_options=fast_feed(feed)) as running:
                await asyncio.wait_for(feed.subscribed.wait(), 10)
                await feed.send(_dumps(messages[0]))
                await eventually(lambda: count(db, "SELECT COUNT(*) FROM events") == 1, 10)
                filler = fill(mount)
                await feed.send('{"recipient": "private.enterprise.users", "payload": ')
                await feed.send(_dumps(messages[1]))
                await asyncio.sleep(1.5)
                filler.unlink()
                await feed.send(_dumps(messages[2]))
                await eventually(lambda: count(db, "SELECT COUNT(*) FROM events") == 3, 15)
                await settle(
                    lambda: (count(db, "SELECT COUNT(*) FROM events"), count(db, UNFINISHED)),
                    timeout=15,
                )
                counted = running.metric("relay_feed_bad_frames_total")
            quarantined = count(db, "SELECT COUNT(*) FROM bad_frames")
            deliveries, events = sqlite_deliveries(db)
    report = audit(
        "a malformed frame while the disk is full",
        deliveries,
        sink.arrivals,
        endpoints=[sink.name],
        stored_events=events,
        sent=[expected_event_id(m) for m in messages],
        must_store_sent=True,
    )
    if (counted, quarantined) != (1, 1):
        report.problem(f"{counted:.0f} bad frame counted, {quarantined} quarantined (kept)")
    return Outcome(report, {"counted": counted, "quarantined": quarantined})


class CuttableProxy:
    """A TCP proxy the scenario can cut (every connection dropped, new ones refused at once)
    and restore."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.cut = False
        self.port = 0
        self._server: asyncio.Server | None = None
        self._links: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        self.sever()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def sever(self) -> None:
        """Cut: reset every open connection; refuse new ones until :meth:`restore`."""
        self.cut = True
        for writer in list(self._links):
            writer.transport.abort()
        self._links.clear()

    def restore(self) -> None:
        self.cut = False

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.cut:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._links.update((writer, up_writer))
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        except (OSError, ConnectionError):
            pass
        finally:
            self._links.discard(dst)
            dst.transport.abort()


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


async def postgres_cut(workdir: Path, *, outage: float, rate: float = 200.0) -> Outcome:
    """The relay's PostgreSQL connections go through a proxy the scenario cuts and restores."""
    reason = await postgres_available()
    if reason is not None:
        raise ScenarioSkipped(reason)
    import asyncpg

    from relay.store.postgres import PostgresStore

    schema = f"relay_chaos_{uuid.uuid4().hex[:10]}"
    parts = httpx.URL(PG_URL)
    secret = new_whsec()
    facts: dict[str, Any] = {}
    proxy = CuttableProxy(parts.host or "127.0.0.1", parts.port or 5432)
    await proxy.start()
    try:
        async with contextlib.AsyncExitStack() as stack:
            sim = await _sim(stack, rate=rate, users=40, count=None)
            sink = await _endpoint(stack, "sink", [secret])
            proxied = str(parts.copy_with(host="127.0.0.1", port=proxy.port))
            env = relay_env(sim, [sink], secret, proxied)
            store = PostgresStore(proxied, schema=schema, lease=10.0, pool_size=4, timeout=3.0)

            async def probe() -> tuple[int, int, int]:
                conn = await asyncpg.connect(
                    PG_URL, timeout=5, server_settings={"search_path": schema}
                )
                try:
                    stored = await conn.fetchval("SELECT COUNT(*) FROM events")
                    active = await conn.fetchval(
                        "SELECT COUNT(*) FROM deliveries "
                        "WHERE state IN ('waiting', 'pending', 'inflight')"
                    )
                finally:
                    await conn.close()
                return len(sim.sent), int(stored), int(active)

            async with (
                in_process(env, store=store) as running,
                httpx.AsyncClient(base_url=running.admin, timeout=5) as http,
            ):

                async def stored_some() -> bool:
                    return (await probe())[1] >= 200

                await eventually(stored_some, 15, "200 events stored through the proxy")
                proxy.sever()

                async def down() -> bool:
                    status, checks = await readyz(http)
                    return status == 503 and checks.get("store") == "failing"

                t0 = time.monotonic()
                await eventually(down, 15, "/readyz 503 naming store while PostgreSQL is cut")
                facts["readyz_503_after_s"] = round(time.monotonic() - t0, 2)
                codes = []
                taken = []
                end = time.monotonic() + outage
                while time.monotonic() < end:
                    codes.append((await readyz(http))[0])
                    taken.append(running.metric("relay_feed_messages_total"))
                    await asyncio.sleep(0.1)
                facts["readyz_200_during_outage"] = codes.count(200)
                facts["taken_growth_in_second_half"] = taken[-1] - taken[len(taken) // 2]
                facts["alive_during_outage"] = running.alive()
                proxy.restore()
                t0 = time.monotonic()

                async def up() -> bool:
                    return (await readyz(http))[0] == 200

                await eventually(up, 30, "/readyz 200 after PostgreSQL came back")
                facts["recovered_after_s"] = round(time.monotonic() - t0, 2)
                await asyncio.sleep(1.0)
                sim.pause()
                await settle(probe, timeout=30)
            deliveries, events = await postgres_deliveries(PG_URL, schema)
            report = audit(
                "store faults: PostgreSQL connection cut, then restored",
                deliveries,
                sink.arrivals,
                endpoints=[sink.name],
                stored_events=events,
                sent=sent_ids(sim),
                must_store_sent=True,
            )
    finally:
        await proxy.close()
        with contextlib.suppress(Exception):
            conn = await asyncpg.connect(PG_URL, timeout=5)
            try:
                await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            finally:
                await conn.close()
    if facts["readyz_200_during_outage"]:
        report.problem(f"/readyz answered 200 {facts['readyz_200_during_outage']} times while cut")
    if facts["taken_growth_in_second_half"]:
        report.problem("the feed kept handing messages to a store that could not take them")
    report.notes.append(
        f"/readyz 503 {facts['readyz_503_after_s']}s after the cut, 200 again "
        f"{facts['recovered_after_s']}s after the restore"
    )
    return Outcome(report, facts)


async def replicas_broadcast(
    workdir: Path,
    *,
    runs: int,
    seconds: float,
    rate: float = 150.0,
    users: int = 20,
    window: str = "1s",
) -> Outcome:
    """Three ``relay run`` replicas on one PostgreSQL store, one simulator broadcasting each
    message to every subscribed replica (CONTRACT section 7). While the feed runs, the second
    and the third replica each lose their connection once and subscribe again: what they
    receive next includes users' later events, whose earlier ones only the first replica
    has (it stores them a moment later). Repeated ``runs`` times on a fresh schema; each run
    is audited, a lane's order being sFOX's timestamp at the receiver. ``window`` is
    ``RELAY_REORDER_WINDOW``: with a tiny one, the late replicas' events go out before the
    earlier ones are stored, which then arrive too late and are superseded (counted).
    """
    reason = await postgres_available()
    if reason is not None:
        raise ScenarioSkipped(reason)
    total = AuditReport(
        f"replicas: 3 on PostgreSQL, a broadcast feed, resubscriptions ({runs} runs, "
        f"window {window})",
        0,
        0,
    )
    facts: dict[str, Any] = {"runs": runs, "runs_with_violations": 0}
    for run in range(runs):
        report = await _broadcast_once(
            workdir, run, count=int(rate * seconds), rate=rate, users=users, window=window
        )
        for name in ("sent", "stored", "delivered", "dead", "superseded", "lost", "duplicates"):
            setattr(total, name, getattr(total, name) + getattr(report, name))
        total.unexpected_duplicates += report.unexpected_duplicates
        total.order_violations += report.order_violations
        facts["runs_with_violations"] += bool(report.order_violations)
        for problem in report.problems:
            total.problem(f"run {run + 1}: {problem}")
    total.notes.append(
        f"{runs} runs: {total.order_violations} order violations in "
        f"{facts['runs_with_violations']} runs; {total.superseded} deliveries superseded"
    )
    return Outcome(total, facts)


async def _broadcast_once(
    workdir: Path, run: int, *, count: int, rate: float, users: int, window: str
) -> AuditReport:
    rng = random.Random(run)
    secret = new_whsec()
    view = PostgresView(f"relay_chaos_{uuid.uuid4().hex[:10]}")
    await view.create()
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(view.close)
        sim = await _sim(stack, rate=rate, users=users, count=count, seed=run)
        sim.pause()  # until every replica listens
        sink = await _endpoint(stack, "sink", [secret])
        env = relay_env(
            sim, [sink], secret, view.url, RELAY_REPLICAS="3", RELAY_REORDER_WINDOW=window
        )
        procs = [
            await RelayProcess.start(env, workdir / f"broadcast-{run}-{n}.log") for n in range(3)
        ]

        async def probe() -> tuple[int, ...]:
            return (len(sim.sent), *await view.counts())

        try:
            await sim.wait_subscribed(3, timeout=30)
            sim.resume()
            stream = count / rate
            for index in rng.sample([1, 2], 2):  # never the first: it receives everything
                await asyncio.sleep(rng.uniform(0.1, stream / 3))
                sim.disconnect(index)
            await eventually(sim.finished.is_set, stream + 20, "the feed sent everything")
            await settle(probe, timeout=30)
            await eventually(lambda: sim.subscribed == 3, 10, "every replica subscribed again")
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                await proc.wait()
        deliveries, events = await view.deliveries()
    return audit(
        "replicas broadcast",
        deliveries,
        sink.arrivals,
        endpoints=[sink.name],
        stored_events=events,
        sent=sent_ids(sim),
        must_store_sent=True,
    )


# -- 5. hostile input ----------------------------------------------------------------------------


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


@dataclass
class Frame:
    """One generated frame and what the relay must do with it."""

    data: str | bytes
    kind: str  # good, bad, either (the contract leaves it open), control
    why: str
    event_id: str | None = None
    token: str | None = None


def _good_message(uid: str, seq: Any, ts: int, status: Any, extra: dict[str, Any]) -> dict:
    payload = {"user_id": uid, **extra, "status": status, "requirements": {"sms": False}}
    return {"sequence": seq, "recipient": USERS_FEED, "timestamp": ts, "payload": payload}


#: Values of the wrong type for each field a message must have right.
WRONG_TYPES: dict[str, list[Any]] = {
    "recipient": [7, "", None, ["x"]],
    "payload": [[1], "payload", 3, None],
    "timestamp": ["soon", 1.5e18, True, None, "1717005327995988841"],
    "sequence": ["5", 5.5, False, {}],
    "user_id": [7, "", None, ["client_x"]],
    "status": [3, ["VERIFIED"], {"s": 1}],
    "requirements": [["sms"], "none", 1, None],
    "user_token": ["tok", [1], 5],
}


#: The fields the boundary checks for control characters and length, and the characters.
HOSTILE_FIELDS = ["user_id", "status", "recipient"]
HOSTILE_CHARS = ["\x00", "\x1b", "\x7f", "\x85", "\t", "\n"]


def frame_specs() -> Any:
    """Hypothesis strategy of frame specs (the content; tokens and sizes are added after, from
    a seeded generator, so the 1 MB frames stay few)."""
    from hypothesis import strategies as st

    scalars = (
        st.none()
        | st.booleans()
        | st.integers(min_value=-(2**90), max_value=2**90)
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(max_size=20)
    )
    values = st.recursive(
        scalars,
        lambda inner: (
            st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
        ),
        max_leaves=10,
    )
    extra = st.dictionaries(
        st.text(min_size=1, max_size=10).filter(
            lambda k: k not in ("user_id", "status", "requirements", "user_token")
        ),
        values,
        max_size=3,
    )
    good = st.fixed_dictionaries(
        {
            "kind": st.just("good"),
            "seq": st.none() | st.integers(min_value=-(2**70), max_value=2**70),
            "ts": st.integers(min_value=0, max_value=2**72),
            "status": st.sampled_from(["PENDING", "VERIFIED", "UNSUPPORTED"]) | st.text(max_size=6),
            "extra": extra,
            "ascii": st.booleans(),
            "other_feed": st.integers(0, 9).map(lambda n: n == 0),
        }
    )
    bad = st.one_of(
        st.fixed_dictionaries(
            {
                "kind": st.just("wrong-type"),
                "field": st.sampled_from(sorted(WRONG_TYPES)),
                "pick": st.integers(0, 4),
            }
        ),
        st.fixed_dictionaries(
            {
                "kind": st.just("missing"),
                "field": st.sampled_from(["recipient", "payload", "timestamp", "user_id"]),
            }
        ),
        st.fixed_dictionaries(
            {"kind": st.just("not-json"), "text": st.text(max_size=40), "cut": st.integers(1, 30)}
        ),
        st.fixed_dictionaries({"kind": st.just("not-object"), "value": values}),
        st.fixed_dictionaries(
            {"kind": st.just("deep"), "depth": st.sampled_from([50, 62, 63, 400, 3000, 200_000])}
        ),
        # Bytes PostgreSQL refuses or cannot index (CONTRACT.md section 5's boundary).
        st.fixed_dictionaries(
            {
                "kind": st.just("hostile-bytes"),
                "field": st.sampled_from(HOSTILE_FIELDS),
                "char": st.sampled_from(HOSTILE_CHARS),
            }
        ),
        st.fixed_dictionaries(
            {
                "kind": st.just("long-field"),
                "field": st.sampled_from(HOSTILE_FIELDS),
                "length": st.sampled_from([257, 2_000, 5_000]),
            }
        ),
        st.fixed_dictionaries({"kind": st.just("nul-text"), "text": st.text(max_size=20)}),
        st.fixed_dictionaries({"kind": st.just("binary"), "junk": st.binary(max_size=40)}),
        st.fixed_dictionaries({"kind": st.just("binary-json"), "ts": st.integers(0, 2**64)}),
        st.fixed_dictionaries({"kind": st.just("surrogate"), "ts": st.integers(0, 2**64)}),
        st.fixed_dictionaries({"kind": st.just("nan")}),
        st.fixed_dictionaries({"kind": st.just("control"), "text": st.text(max_size=20)}),
    )
    return st.one_of(good, bad)


def generate_specs(n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` frame specs drawn by Hypothesis (generation only: nothing to shrink here)."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed

    drawn: list[dict[str, Any]] = []

    @hseed(seed)
    @settings(
        max_examples=n,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(frame_specs())
    def collect(spec: dict[str, Any]) -> None:
        drawn.append(spec)

    collect()
    return drawn


def _dumps(obj: Any, ascii_only: bool = False) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=ascii_only)


def build_frame(spec: dict[str, Any], rng: random.Random, *, big: bool = False) -> Frame:
    """The frame a spec describes, with a fresh user and token; ``big`` adds a 1 MB string
    (1,000,000 bytes: a webhook body stays under aiohttp's 1 MiB large-body warning, which
    :func:`large_event` is about)."""
    uid = f"client_{uuid.UUID(int=rng.getrandbits(128), version=4)}"
    token = f"{rng.getrandbits(256):064x}"
    user_token = {"token": token, "expires": "2099-01-01T00:00:00.000Z", "partner_user_id": uid}
    kind = spec["kind"]
    if kind == "good":
        extra = dict(spec["extra"])
        if big:
            # 1 MB, within the 1 MiB frame limit whether sent as UTF-8 or as \u escapes.
            extra["blob"] = "é" * (170_000 if spec["ascii"] else 500_000)
        message = _good_message(uid, spec["seq"], spec["ts"], spec["status"], extra)
        if spec["other_feed"]:
            message["recipient"] = f"{USERS_FEED}.balances"
            del message["payload"]["user_id"]
        message["payload"]["user_token"] = user_token
        text = _dumps(message, spec["ascii"])
        if any(_is_control(c) for c in spec["status"]) and not spec["other_feed"]:
            return Frame(text, "bad", "a status with a control character", token=token)
        return Frame(text, "good", "valid message", expected_event_id(message), token)
    base = _good_message(uid, rng.randrange(1, 10**6), rng.randrange(10**18, 2 * 10**18), "X", {})
    base["payload"]["user_token"] = user_token
    if big:
        base["payload"]["blob"] = "x" * 1_000_000
    if kind == "wrong-type":
        name = spec["field"]
        options = WRONG_TYPES[name]
        if name == "user_token":  # a malformed token must be redacted all the same
            options = ["tok" + token, [token], 5]
        value = options[spec["pick"] % len(options)]
        if name in base:
            base[name] = value
        else:
            base["payload"][name] = value
        return Frame(_dumps(base), "bad", f"{name} = {value!r:.20}", token=token)
    if kind == "missing":
        name = spec["field"]
        if name in base:
            del base[name]
        else:
            del base["payload"][name]
        return Frame(_dumps(base), "bad", f"no {name}", token=token)
    if kind == "not-json":
        text = _dumps(base)
        cut = text[: -spec["cut"]] + spec["text"]
        with contextlib.suppress(ValueError):
            json.loads(cut)
            cut = "{" + cut  # it parsed after all: make sure it does not
        return Frame(cut, "bad", "not JSON", token=token)
    if kind == "not-object":
        return Frame(_dumps(spec["value"]), "bad", "JSON, not an object")
    if kind == "deep":
        depth = spec["depth"]
        base["payload"]["nested"] = "@@"
        text = _dumps(base).replace('"@@"', "[" * depth + "]" * depth)
        # The message is level 1 and its payload level 2: over 64 levels is a bad frame.
        expected = "bad" if depth + 2 > 64 else "good"
        return Frame(text, expected, f"nested {depth} deep", _deep_id(base, depth), token)
    if kind in ("hostile-bytes", "long-field"):
        name = spec["field"]
        if kind == "hostile-bytes":
            char = spec["char"]
            value = {"user_id": uid, "status": "PENDING", "recipient": USERS_FEED}[name] + char
        else:
            value = name[0] * spec["length"]
        if name == "recipient":
            base["recipient"] = value
        else:
            base["payload"][name] = value
        return Frame(_dumps(base), "bad", f"{name} = {value!r:.20}", token=token)
    if kind == "nul-text":
        text = _dumps(base)[:-9] + "\x00" + spec["text"]
        return Frame(text, "bad", "not JSON, with a NUL", token=token)
    if kind == "binary":
        data = b'{"recipient":"\xff\xfe' + spec["junk"] + b"\xc3"
        return Frame(data, "bad", "binary, not UTF-8")
    if kind == "binary-json":
        message = _good_message(uid, 1, spec["ts"], "PENDING", {})
        return Frame(
            _dumps(message).encode(),
            "either",
            "valid JSON in a binary frame",
            expected_event_id(message),
        )
    if kind == "surrogate":
        message = _good_message(uid, 1, spec["ts"], "PENDING", {"note": "@@"})
        text = _dumps(message).replace('"@@"', '"\\ud800"')
        return Frame(text, "either", "a lone surrogate", None, None)
    if kind == "nan":
        base["timestamp"] = "@@"
        return Frame(_dumps(base).replace('"@@"', "NaN"), "bad", "NaN timestamp", token=token)
    reply = {"type": "error", "sequence": 1, "payload": {"message": spec["text"]}}
    return Frame(_dumps(reply), "control", "an error reply")


def _deep_id(message: dict[str, Any], depth: int) -> str | None:
    nested: Any = []
    for _ in range(depth - 1):
        nested = [nested]
    try:
        return expected_event_id({**message, "payload": {**message["payload"], "nested": nested}})
    except RecursionError:
        return None


async def hostile_frames(
    workdir: Path, *, frames: int, seed: int = 5, store: str = "sqlite"
) -> Outcome:
    """Hypothesis-generated frames, text and binary, good and hostile (control characters,
    NUL, fields too long to index, nesting past the limits), through a relay in this loop on
    ``store`` (``sqlite`` or ``postgres``): it must not crash, must store every good one, count
    and quarantine (redacted, without control characters) every bad one, and (full run) not
    grow without bound."""
    import psutil

    view = await open_view(workdir, store, "hostile")

    rng = random.Random(seed)
    specs = generate_specs(frames, seed)
    secret = new_whsec()
    facts: dict[str, Any] = {"generated": len(specs)}
    expected = {"good": set(), "either": set()}
    n_bad = n_either_no_id = n_control = 0
    tokens: list[str] = []
    kinds: dict[str, int] = {}
    rss: list[int] = []
    me = psutil.Process()
    quiet = logging.getLogger("relay.feed")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # a warning per bad frame is the relay's job, not the bench's
    try:
        async with contextlib.AsyncExitStack() as stack:
            feed = RawFeed()
            await feed.start()
            stack.push_async_callback(feed.close)
            sink = await _endpoint(stack, "sink", [secret])
            stack.push_async_callback(view.close)
            env = relay_env(feed, [sink], secret, view.url)
            # Keepalive is not what this is about: with PostgreSQL each bad frame is its own
            # durable commit, so a batch rich in them holds reading longer than fast_feed's
            # 1.2 s dead connection.
            options = fast_feed(feed, ping_interval=2.0, dead_after=10.0)
            async with in_process(env, feed_options=options) as running:
                await asyncio.wait_for(feed.subscribed.wait(), 10)

                async def marker() -> None:
                    """A good frame, then wait until stored: everything before it is handled."""
                    uid = f"client_{uuid.UUID(int=rng.getrandbits(128), version=4)}"
                    message = _good_message(uid, 1, time.time_ns(), "PENDING", {"marker": True})
                    expected["good"].add(expected_event_id(message))
                    await feed.send(_dumps(message))
                    want = expected_event_id(message)

                    async def stored() -> bool:
                        return await view.has_event(want)

                    await eventually(stored, 30, "a marker frame stored", interval=0.01)

                every = max(100, frames // 10)
                for i, spec in enumerate(specs):
                    # Two frames in three hundred carry a 1 MB string, good or bad alike.
                    frame = build_frame(spec, rng, big=i % 150 == 75)
                    kinds[frame.kind] = kinds.get(frame.kind, 0) + 1
                    if frame.token:
                        tokens.append(frame.token)
                    if frame.kind == "bad":
                        n_bad += 1
                    elif frame.kind == "control":
                        n_control += 1
                    elif frame.event_id is None:
                        n_either_no_id += 1
                    else:
                        expected[frame.kind].add(frame.event_id)
                    await feed.send(frame.data)
                    if (i + 1) % every == 0:
                        await marker()
                        if not running.alive():
                            break
                        rss.append(me.memory_info().rss)
                await marker()
                rss.append(me.memory_info().rss)
                facts["alive"] = running.alive()
                facts["bad_frames_counted"] = int(running.metric("relay_feed_bad_frames_total"))
                facts["connections"] = feed.connections
                await settle(view.counts, timeout=60)
            quarantined = await view.quarantined()
            deliveries, events = await view.deliveries()
            files = await view.files()
    finally:
        quiet.setLevel(level)

    leaks = find_leaks(
        {f"user token {t[:8]}": t for t in tokens} | {"FAKE_TOKEN": FAKE_TOKEN}, files
    ) + find_leaks({f"user token {t[:8]} (raw)": bytes.fromhex(t) for t in tokens}, files)
    report = audit(
        f"hostile input ({view.name}): {len(specs)} generated frames",
        deliveries,
        sink.arrivals,
        endpoints=[sink.name],
        stored_events=events,
        leaks=leaks,
    )
    report.sent = len(specs)
    either_stored = expected["either"] & events
    either_not_stored = len(expected["either"] - events) + n_either_no_id
    must_count = n_bad + either_not_stored
    missing_good = expected["good"] - events
    unexpected = events - expected["good"] - expected["either"]
    facts.update(
        kinds=kinds,
        must_count=must_count,
        quarantined=len(quarantined),
        either_stored=len(either_stored),
        rss_mb=[round(r / 2**20) for r in rss],
    )
    if missing_good:
        report.lost += len(missing_good)
        report.problem(f"{len(missing_good)} good frames not stored, e.g. {min(missing_good)}")
    if unexpected:
        report.problem(f"{len(unexpected)} stored events no good frame carried")
    if not facts["alive"]:
        report.problem("the relay stopped running")
    if facts["connections"] != 1:
        report.problem(f"the relay reconnected: {facts['connections']} connections")
    if facts["bad_frames_counted"] != must_count:
        report.problem(f"{facts['bad_frames_counted']} bad frames counted, expected {must_count}")
    if len(quarantined) != must_count:
        report.problem(f"{len(quarantined)} bad frames quarantined, expected {must_count}")
    controls = sum(any(_is_control(c) for c in reason + text) for reason, text in quarantined)
    if controls:
        report.problem(f"{controls} quarantined records hold a control character")
    if len(rss) >= 4:
        growth = (rss[-1] - rss[len(rss) // 3]) / 2**20
        facts["rss_growth_mb"] = round(growth)
        if growth > 200:
            report.problem(f"RSS grew {growth:.0f} MB over the last two thirds of the frames")
    report.notes.append(
        f"frames by expectation {kinds}; {len(either_stored)} of the open cases stored, "
        f"{must_count} counted bad and quarantined; RSS samples (MB) {facts['rss_mb']}"
    )
    return Outcome(report, facts)


def _is_control(char: str) -> bool:
    """Unicode category Cc (what the contract keeps out of stored text)."""
    return ord(char) < 0x20 or 0x7F <= ord(char) <= 0x9F


#: Values every variable of the README must refuse (exit 2, naming it).
INVALID_CONFIG: dict[str, list[str]] = {
    "RELAY_API_KEY": [" "],
    "RELAY_WS_URL": ["http://feed.example/ws", "ftp://x", "not a url", "wss://[::1"],
    "RELAY_API_URL": ["ws://api.example", "not a url", "https://"],
    "RELAY_FEEDS": [",", " , "],
    "RELAY_ENDPOINTS": [
        "ftp://hook.example/x",
        "[{]",
        '[{"url": "http://a.example/x", "bogus": 1}]',
        '[{"name": "a", "url": "http://a.example/x"}, {"name": "a", "url": "http://b/x"}]',
        '[{"url": "http://a.example/x", "user_token": "encrypt"}]',
        "{}",
        "[]",
    ],
    "RELAY_SIGNING_SECRET": ["nope-not-whsec", "whsec_", "whsec_!!!"],
    "RELAY_ALLOW_UNSIGNED": ["maybe", "2"],
    "RELAY_USER_TOKEN": ["keep", "plaintext"],
    "RELAY_TOKEN_KEY": ["short", base64.b64encode(b"x" * 16).decode(), "!!!!"],
    "RELAY_STORE": ["mysql://db.example/x", "sqlite://relative.db", "postgresql:/x"],
    "RELAY_RETENTION": ["7 days", "-1d", "0s", "1e999d", "5"],
    "RELAY_ADMIN_ADDR": ["localhost", ":99999", "1.2.3.4:-1", "[::1:80"],
    "RELAY_ADMIN_TOKEN": [" "],
    "RELAY_RETRY_SCHEDULE": ["5s,,5m", "x", "-1s", "5s, soon"],
    "RELAY_DELIVERY_TIMEOUT": ["0s", "soon", "-1s"],
    "RELAY_SHUTDOWN_GRACE": ["soon", "-5s"],
    "RELAY_LEASE": ["soon", "0s"],
    "RELAY_REPLICAS": ["0", "-1", "two", "1.5"],
    "RELAY_RECONCILE_INTERVAL": ["never", "0s", "-1m"],
    "RELAY_LOG_LEVEL": ["LOUD", "trace"],
    "RELAY_LOG_FORMAT": ["xml", "yaml"],
}


def config_base(workdir: Path) -> dict[str, str]:
    return {
        "RELAY_API_KEY": "chaos-api-key-123456",
        "RELAY_ENDPOINTS": "http://127.0.0.1:9/hook",
        "RELAY_SIGNING_SECRET": new_whsec(),
        "RELAY_STORE": f"sqlite:///{workdir}/config.db",
        "RELAY_ADMIN_ADDR": "127.0.0.1:0",
    }


def config_verdict(base: Mapping[str, str], variable: str, value: str) -> str | None:
    """None when ``variable=value`` is accepted or refused properly; else what went wrong."""
    env = {**base, variable: value}
    try:
        load_settings(env, for_run=True)
    except ConfigError as exc:
        text = str(exc)
        if not (exc.variable == variable or exc.variable.startswith((variable + "[", variable))):
            return f"{variable}={value!r}: the error names {exc.variable}"
        if "\n" in text:
            return f"{variable}={value!r}: a multi-line error"
        return None
    except Exception as exc:
        return f"{variable}={value!r}: {type(exc).__name__} instead of a configuration error"
    return None


def config_table_failures(base: Mapping[str, str]) -> list[str]:
    """Every table value must be refused, naming its variable, without echoing the value."""
    failures = []
    for variable, values in INVALID_CONFIG.items():
        for value in values:
            env = {**base, variable: value}
            try:
                load_settings(env, for_run=True)
            except ConfigError as exc:
                wrong = config_verdict(base, variable, value)
                if wrong:
                    failures.append(wrong)
                if len(value) >= 8 and value in str(exc):
                    failures.append(f"{variable}: the error echoes the value")
                continue
            except Exception as exc:
                failures.append(f"{variable}={value!r}: {type(exc).__name__}")
                continue
            failures.append(f"{variable}={value!r} was accepted")
    return failures


def config_fuzz_failures(base: Mapping[str, str], examples: int, seed: int = 7) -> list[str]:
    """Hypothesis text for every variable: accepted, or refused naming that variable; never
    any other exception."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed
    from hypothesis import strategies as st

    failures: list[str] = []
    texts = (
        st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=40)
        | st.from_regex(r"-?[0-9]{1,25}(\.[0-9]+)?(ms|s|m|h|d|)", fullmatch=True)
        | st.sampled_from(
            ['[{"url": 1}]', '[{"url": "http://a", "timeout": -1}]', "[1]", "null", '"x"']
            + ['[{"url": "http://a", "headers": {"Host": "x"}}]', "http://[::1", "9" * 400 + "d"]
        )
    )

    @hseed(seed)
    @settings(
        max_examples=examples,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(st.sampled_from(sorted(INVALID_CONFIG)), texts)
    def check(variable: str, value: str) -> None:
        wrong = config_verdict(base, variable, value)
        if wrong:
            failures.append(wrong)

    check()
    return failures


async def config_fuzz(workdir: Path, *, examples: int) -> Outcome:
    """Configuration: a table of invalid values per variable, hypothesis text, and a few real
    `relay check` / `relay run` processes (exit 2, one stderr line naming the variable)."""
    base = config_base(workdir)
    failures = config_table_failures(base) + config_fuzz_failures(base, examples)
    cases = (
        (("check",), "RELAY_DELIVERY_TIMEOUT", "soon-ish-42"),
        (("check",), "RELAY_ENDPOINTS", '[{"url": "http://a.example/x", "bogus": 1}]'),
        (("run",), "RELAY_TOKEN_KEY", "c2hvcnQta2V5LXZhbHVlLTQy"),
        (("check",), "RELAY_ADMIN_TOKEN_FILE", str(workdir / "missing-token-file")),
        (("run",), "RELAY_REPLICAS", "zero-replicas"),
    )
    processes = len(cases)
    done = await asyncio.gather(
        *(cli(*args, env={**base, variable: value}) for args, variable, value in cases)
    )
    for (args, variable, value), (code, out, err) in zip(cases, done, strict=True):
        lines = err.strip().splitlines()
        if code != 2 or len(lines) != 1 or variable not in lines[0] or "Traceback" in err:
            failures.append(f"relay {args[0]} with bad {variable}: exit {code}, stderr {err!r}")
        elif value in lines[0] and not variable.endswith("_FILE"):
            failures.append(f"relay {args[0]} echoed the bad {variable}")
        if out.strip():
            failures.append(f"relay {args[0]} with bad {variable} printed to stdout")
    report = AuditReport(
        "config fuzz: every RELAY_* variable",
        sent=sum(map(len, INVALID_CONFIG.values())) + examples + processes,
        stored=0,
    )
    for failure in failures:
        report.problem(failure)
    report.notes.append(
        f"{sum(map(len, INVALID_CONFIG.values()))} table values, {examples} hypothesis values, "
        f"{processes} real processes (the 'events sent' column counts these cases)"
    )
    return Outcome(report, {"failures": failures})


TRICKY_PATHS = (
    "/api/endpoints",
    "/api/../api/endpoints",
    "//api/endpoints",
    "/%2Fapi/endpoints",
    "/api%2Fendpoints",
    "/api/%2e%2e/api/endpoints",
    "/./api/endpoints",
    "/api/endpoints/",
    "/api/endpoints%00",
    "/API/endpoints",
    "/api/deliveries?limit=500",
    "/api/deliveries/../endpoints",
    "/api/status",
    "/api/openapi.json/../endpoints",
    "/healthz/../api/endpoints",
    "http://127.0.0.1/api/endpoints",
)


async def raw_get(port: int, target: str, headers: str = "") -> tuple[int, str]:
    """One HTTP/1.1 GET sent byte for byte (no client normalises the path)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        request = f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}Connection: close\r\n\r\n"
        writer.write(request.encode("latin-1"))
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0
    return status, body.decode(errors="replace")


async def admin_tricks(workdir: Path) -> Outcome:
    """The admin API under a relay with data in it: no token, wrong tokens and path tricks
    answer 401, 403 or 404, never data."""
    secret = new_whsec()
    token = "adm-" + new_key()
    failures: list[str] = []
    tried = 0
    async with contextlib.AsyncExitStack() as stack:
        sim = await _sim(stack, count=30, users=10)
        sink = await _endpoint(stack, "sink-secret-name", [secret])
        db = workdir / "admin.db"
        env = relay_env(sim, [sink], secret, f"sqlite:///{db}", RELAY_ADMIN_TOKEN=token)
        async with in_process(env) as running:
            await eventually(lambda: count(db, "SELECT COUNT(*) FROM deliveries") >= 30, 15)
            port = running.relay.admin.port
            data_markers = ["sink-secret-name", "evt_", "client_", '"pending"']
            good = await raw_get(port, "/api/endpoints", f"Authorization: Bearer {token}\r\n")
            if good[0] != 200 or "sink-secret-name" not in good[1]:
                failures.append(f"the real token was refused: {good}")
            wrong_tokens = (
                "",
                "Authorization: Bearer \r\n",
                "Authorization: Bearer wrong-token\r\n",
                f"Authorization: Bearer {token[:-1]}\r\n",
                f"Authorization: Bearer {token}x\r\n",
                f"Authorization: Bearer  {token}\r\n",
                f"Authorization: Basic {base64.b64encode(token.encode()).decode()}\r\n",
                f"Authorization: {token}\r\n",
                f"X-Admin-Token: {token}\r\n",
                f"Cookie: token={token}\r\n",
            )
            for headers in wrong_tokens:
                for target in TRICKY_PATHS:
                    status, body = await raw_get(port, target, headers)
                    tried += 1
                    # 307: the framework's slash redirect, to a route that then asks for the
                    # token (the route list is public anyway, in /api/openapi.json).
                    if status not in (307, 400, 401, 403, 404, 405):
                        failures.append(f"{target} with {headers.strip()!r}: {status}")
                    elif any(marker in body for marker in data_markers):
                        failures.append(f"{target} with {headers.strip()!r} showed data")
            # Authorized, path tricks still never escape to anything but /api itself.
            for target in TRICKY_PATHS:
                status, body = await raw_get(port, target, f"Authorization: Bearer {token}\r\n")
                tried += 1
                if status >= 500:
                    failures.append(f"{target} with the token: {status}")
    report = AuditReport("admin API: no/wrong token, path tricks", sent=tried, stored=0)
    for failure in failures:
        report.problem(failure)
    report.notes.append(f"{tried} requests; the 'events sent' column counts them")
    return Outcome(report, {"failures": failures, "requests": tried})


# -- 6. leak audit -------------------------------------------------------------------------------


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


async def leak_audit(
    workdir: Path, *, log_format: str, echo: bool = False, daemon: bool = True, events: int = 120
) -> Outcome:
    """The whole pipeline with known secrets at DEBUG: auth failures, bad frames carrying a
    token, endpoints answering 500 with bodies; then grep every log line, /metrics, every /api
    response, `relay check` and `relay deliveries list|show` for each secret, and the store
    files for plaintext user tokens.

    ``echo``: the failing endpoint's 500 body echoes the request it got (headers and body),
    as debugging error pages do. ``daemon``: also run ``relay run`` itself at DEBUG for a few
    more events and search its whole stderr. Logs must also never show an email or a phone.
    """
    password = "pw-" + base64.b32encode(os.urandom(10)).decode().rstrip("=")
    header_value = "hdr-" + base64.b32encode(os.urandom(10)).decode().rstrip("=")
    admin_token = "adm-" + base64.b32encode(os.urandom(10)).decode().rstrip("=")
    api_key = "key-" + base64.b32encode(os.urandom(10)).decode().rstrip("=")
    signing = [new_whsec(), new_whsec()]
    token_key = new_key()
    receiver_key = new_key()
    stream = io.StringIO()
    outputs: dict[str, str | bytes] = {}
    async with contextlib.AsyncExitStack() as stack:
        sim = await _sim(
            stack,
            api_key=api_key,
            count=events,
            users=20,
            rate=200.0,
            faults=Faults(reject_auth=1, bad_every=max(2, events // 12)),
        )
        rng = random.Random(6)

        def failing(r: Received) -> Response:
            if rng.random() < 0.7:
                return OK
            body = b'{"error":"upstream exploded","trace_id":"t-1"}'
            if echo:
                shown = {k: v for k, v in r.headers.items() if not k.startswith("webhook-")}
                body = json.dumps({"error": "bad", "you_sent": shown}).encode() + r.body
            return Response(500, body=body)

        crm = await _endpoint(stack, "crm", signing, failing)
        vault = await _endpoint(stack, "vault", signing)
        endpoints = [
            {
                **crm.config(),
                "url": crm.url.replace("://", f"://relay:{password}@"),
                "headers": {"X-Partner-Auth": header_value},
                "user_token": "forward",
            },
            {**vault.config(), "user_token": "encrypt", "token_key": receiver_key},
        ]
        db = workdir / "leak.db"
        env = relay_env(
            sim,
            endpoints,
            " ".join(signing),
            f"sqlite:///{db}",
            RELAY_TOKEN_KEY=token_key,
            RELAY_ADMIN_TOKEN=admin_token,
            RELAY_LOG_LEVEL="DEBUG",
            RELAY_LOG_FORMAT=log_format,
        )
        settings = load_settings(env, for_run=True)
        handler = setup_logging(
            settings.log_level,
            settings.log_format,
            Redactor(secret_values(settings)),
            stream=stream,
        )
        root = logging.getLogger()
        # setup_logging changes these; put them back for whoever runs next in this process.
        touched = ["", "websockets", "aiohttp", "httpx", "httpcore", "uvicorn", "asyncio"]
        levels = {name: logging.getLogger(name).level for name in touched}
        try:
            async with (
                in_process(env, feed_options=fast_feed(sim, auth_retry_after=0.5)) as running,
                httpx.AsyncClient(base_url=running.admin, timeout=10) as http,
            ):
                await eventually(sim.finished.is_set, 20, "the simulator sent everything")
                await settle(sqlite_probe(sim, db), timeout=30)
                auth = {"authorization": f"Bearer {admin_token}"}
                for path in ("/metrics", "/readyz", "/healthz", "/api/openapi.json"):
                    outputs[path] = (await http.get(path, headers=auth)).text
                for path in ("/api/status", "/api/endpoints", "/api/deliveries?limit=500"):
                    outputs[path] = (await http.get(path, headers=auth)).text
                    outputs[path + " (no token)"] = (await http.get(path)).text
                items = json.loads(outputs["/api/deliveries?limit=500"])["items"]
                failed = [i for i in items if i["attempts"] > 1][:10] + items[:5]
                for item in failed:
                    path = f"/api/deliveries/{item['id']}"
                    outputs[path] = (await http.get(path, headers=auth)).text
                outputs["/api/deliveries (bad state)"] = (
                    await http.get("/api/deliveries?state=nope", headers=auth)
                ).text
        finally:
            root.removeHandler(handler)
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)
        outputs["log"] = stream.getvalue()
        if daemon:
            proc = await RelayProcess.start(env, workdir / "leak-daemon.log")
            try:
                await eventually(lambda: sim.subscribed > 0, 20, proc.output)
                before = count(db, "SELECT COUNT(*) FROM events")
                for n in range(6):
                    await sim.publish(fresh_message(rng, 10_000 + n))
                await eventually(lambda: count(db, "SELECT COUNT(*) FROM events") >= before + 6, 10)
                await settle(sqlite_probe(sim, db), timeout=30)
            finally:
                proc.terminate()
                await proc.wait()
            outputs["relay run (stderr)"] = proc.output()
        commands = [
            ("check",),
            ("deliveries", "list", "--limit", "500"),
            *(("deliveries", "show", item["id"]) for item in failed[:3]),
        ]
        bad_env = {**env, "RELAY_TOKEN_KEY": token_key[:10]}
        done = await asyncio.gather(
            *(cli(*args, env=env) for args in commands), cli("check", env=bad_env)
        )
        for args, (_, out, err) in zip(
            [*commands, ("check", "(bad token key)")], done, strict=True
        ):
            outputs[f"relay {' '.join(args)}"] = out + err
        for name, data in store_bytes(db.parent, db.name).items():
            outputs[f"store file {name}"] = data
        tokens = sent_tokens(sim)
        deliveries, events = sqlite_deliveries(db)
        bad_frames = count(db, "SELECT COUNT(*) FROM bad_frames")

    secrets = {
        "API key": api_key,
        "signing secret 1": signing[0],
        "signing secret 1 (base64)": signing[0].removeprefix("whsec_"),
        "signing secret 2": signing[1],
        "signing secret 2 (base64)": signing[1].removeprefix("whsec_"),
        "RELAY_TOKEN_KEY": token_key,
        "endpoint token_key": receiver_key,
        "admin token": admin_token,
        "header value": header_value,
        "URL password": password,
        "FAKE_TOKEN": FAKE_TOKEN,
    }
    secrets |= {f"user token {t[:8]}": t for t in tokens}
    leaks = find_leaks(secrets, outputs)
    store_files = {k: v for k, v in outputs.items() if k.startswith("store file")}
    leaks += find_leaks(
        {f"user token {t[:8]} (raw)": bytes.fromhex(t) for t in tokens}, store_files
    )
    personal = {}
    for message in sim.sent:
        payload = message["payload"]
        for key in ("email", "phone_number"):
            if isinstance(payload.get(key), str):
                personal[f"{key} of {payload['user_id'][:15]}"] = payload[key]
    logs = {k: v for k, v in outputs.items() if k in ("log", "relay run (stderr)")}
    leaks += find_leaks(personal, logs)
    report = audit(
        f"leak audit ({log_format} logs{', endpoint echoes requests' if echo else ''})",
        deliveries,
        crm.arrivals + vault.arrivals,
        endpoints=[crm.name, vault.name],
        stored_events=events,
        sent=sent_ids(sim),
        must_store_sent=True,
        dead_ok=lambda d: d.endpoint == crm.name and d.attempts >= SCHEDULE_STEPS,
        leaks=leaks,
    )
    log_lines = sum(str(text).count("\n") for text in logs.values())
    report.notes.append(
        f"{len(secrets)} secrets (incl. {len(tokens)} user tokens) searched in {log_lines} "
        f"log lines and {len(outputs) - 1} other outputs"
    )
    return Outcome(
        report,
        {
            "leaks": leaks,
            "log_lines": log_lines,
            "tokens": len(tokens),
            "outputs": len(outputs),
            "bad_frames": bad_frames,
        },
    )


# -- the full run --------------------------------------------------------------------------------

COLUMNS = (
    "scenario",
    "events sent",
    "stored",
    "delivered",
    "lost",
    "duplicates",
    "order violations",
    "leaks",
)


NOT_SIMULATED = (
    "the real sFOX: every feed fault is the simulator's (drops, stalls, garbage, rejected keys, "
    "slow handshakes), and its per-IP limits are the simulator's counts of connections and "
    "requests",
    "power loss: kill -9 leaves the page cache to the kernel, so fsync ordering is not tested",
    "disk I/O errors (EIO) and a read-only remount: the SQLite fault is ENOSPC on a 32 MB tmpfs",
    "a PostgreSQL crash, failover or restart: only its TCP connections are cut (by a proxy)",
    "packet loss, latency and partitions below TCP (no netem here): only clean drops, resets "
    "and stalls",
    "frames over the relay's 4 MiB limit (tests/test_feed.py plays one at 10 kB): the relay "
    "closes the connection (1009), counts the frame and quarantines a record of it (not its "
    "text), and reconnects; frames in flight behind it are left to reconciliation",
    "a supervisor restarting a crashing relay faster than sFOX's limits allow: each process "
    "has a fresh connection limiter (the crash loop reports its connections per minute)",
)


def table(reports: Sequence[AuditReport | tuple[str, str]]) -> str:
    """The results table in Markdown (a skipped scenario is a row with its reason)."""
    lines = ["| " + " | ".join(COLUMNS) + " | verdict |", "|" + "---|" * (len(COLUMNS) + 1)]
    for item in reports:
        if isinstance(item, tuple):
            name, reason = item
            lines.append(f"| {name} |" + " |" * (len(COLUMNS) - 1) + f" skipped: {reason} |")
            continue
        row = item.row()
        verdict = "ok" if item.ok else f"FAIL ({len(item.problems)} problems)"
        lines.append("| " + " | ".join(str(row[c]) for c in COLUMNS) + f" | {verdict} |")
    return "\n".join(lines)


def scenarios(sizes: Sizes, *, real_timings: bool) -> dict[str, Callable[[Path], Awaitable[Any]]]:
    s = sizes
    plan: dict[str, Callable[[Path], Awaitable[Any]]] = {
        "crash": lambda w: crash_loop(
            w, kills=s.kills, rate=s.crash_rate, tail=s.crash_tail, dwell=s.crash_dwell
        ),
        "crash-postgres": lambda w: crash_loop(
            w,
            kills=s.kills,
            rate=s.crash_rate,
            tail=s.crash_tail,
            dwell=s.crash_dwell,
            postgres=True,
        ),
        "feed": lambda w: feed_faults(
            w, phase=s.feed_phase, drops=s.feed_drops, rejections=s.feed_rejections
        ),
        "endpoints": lambda w: endpoint_faults(w, events=s.endpoint_events, rate=s.endpoint_rate),
        "endpoint-health": lambda w: endpoint_health(w, events=s.endpoint_events),
        "excerpt": excerpt_size,
        "retry-after": hostile_retry_after,
        "large-event": large_event,
        "store-sqlite": lambda w: store_full(w, outage=s.store_outage),
        "quarantine": quarantine_while_down,
        "store-postgres": lambda w: postgres_cut(w, outage=s.store_outage),
        "replicas-broadcast": lambda w: replicas_broadcast(
            w, runs=s.broadcast_runs, seconds=s.broadcast_seconds
        ),
        "hostile": lambda w: hostile_frames(w, frames=s.fuzz_frames),
        "hostile-postgres": lambda w: hostile_frames(w, frames=s.fuzz_frames, store="postgres"),
        "gzip": gzip_answers,
        "gzip-postgres": lambda w: gzip_answers(w, store="postgres"),
        "config": lambda w: config_fuzz(w, examples=s.config_examples),
        "admin": admin_tricks,
        "leaks-json": lambda w: leak_audit(w, log_format="json"),
        "leaks-console": lambda w: leak_audit(w, log_format="console"),
        "leaks-echo": lambda w: leak_audit(w, log_format="json", echo=True),
    }
    if real_timings:
        plan["feed-real"] = feed_faults_real_timings
    return plan


async def run_all(sizes: Sizes, only: Sequence[str], *, real_timings: bool, write: bool) -> int:
    plan = scenarios(sizes, real_timings=real_timings)
    chosen = [name for name in plan if not only or name in only]
    results: list[AuditReport | tuple[str, str]] = []
    started = time.monotonic()
    for name in chosen:
        t0 = time.monotonic()
        with tempfile.TemporaryDirectory(prefix=f"chaos-{name}-") as tmp:
            try:
                outcome = await plan[name](Path(tmp))
            except ScenarioSkipped as skip:
                print(f"[{name}] skipped: {skip}", flush=True)
                results.append((name, str(skip)))
                continue
            except Exception as exc:  # a scenario that cannot even finish is a failure too
                report = AuditReport(name, sent=0, stored=0)
                report.problem(f"the scenario failed: {type(exc).__name__}: {exc}")
                outcome = Outcome(report)
        outcome.report.notes.append(f"took {time.monotonic() - t0:.1f}s")
        print(outcome.report.explain(), flush=True)
        results.append(outcome.report)
    text = table(results)
    print("\n" + text)
    failed = [r for r in results if isinstance(r, AuditReport) and not r.ok]
    if write:
        write_results(results, text, time.monotonic() - started, sizes)
    return 1 if failed else 0


def write_results(
    results: Sequence[AuditReport | tuple[str, str]], text: str, took: float, sizes: Sizes
) -> None:
    lines = [
        "# Chaos run",
        "",
        f"`python bench/chaos.py` on {socket.gethostname()} ({os.cpu_count()} CPUs), "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {took:.0f}s in all.",
        "Every row ends with the audit of `bench/audit.py`: every stored event delivered to "
        "every matching endpoint (dead only where the scenario refused it for good), per-user "
        "order at the receiver, duplicates only for deliveries in flight at a kill -9, no "
        "secret in any output.",
        "",
        text,
        "",
        "## Details",
        "",
    ]
    for item in results:
        if isinstance(item, tuple):
            lines.append(f"- **{item[0]}**: skipped: {item[1]}")
            continue
        dead = f" {item.dead} dead, each one the scenario meant." if item.dead and item.ok else ""
        lines.append(f"- **{item.scenario}**:{dead}")
        lines += [f"  - {note}" for note in item.notes]
        lines += [f"  - PROBLEM: {p}" for p in item.problems]
    lines += ["", "## Not simulated here", ""]
    lines += [f"- {item}" for item in NOT_SIMULATED]
    lines += ["", f"Sizes: `{sizes}`", ""]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines))
    print(f"\nwrote {RESULTS.relative_to(ROOT)}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/chaos.py", description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="CI sizes, no 90 s real-timing run, no results file"
    )
    parser.add_argument("--only", action="append", default=[], help="run just these scenarios")
    args = parser.parse_args(argv)
    quiet = logging.StreamHandler()
    quiet.setLevel(logging.ERROR)
    logging.getLogger().addHandler(quiet)
    sizes = CI if args.quick else FULL
    full = not args.quick and not args.only  # only a whole full run writes the results
    return asyncio.run(run_all(sizes, args.only, real_timings=not args.quick, write=full))


if __name__ == "__main__":
    sys.exit(main())
