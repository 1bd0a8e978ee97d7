"""Shared fixtures for end-to-end tests with real parts.

A real simulator (sFOX feed + REST) and a real webhook receiver listen on port 0 in the test's
event loop; the relay under test runs either in-process (:func:`run_relay`) or as a real
``relay run`` subprocess, against a real SQLite file in ``tmp_path``. Nothing is mocked.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import sqlite3
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from relay.app import Relay
from relay.receiver import Behaviour, Receiver
from relay.signing import decode_secret
from relay.simulator import Faults, Simulator

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the helpers tests and bench share live in bench/
    sys.path.insert(0, str(ROOT))

from bench.audit import expected_event_id  # noqa: E402
from bench.procs import PG_URL, eventually, in_process, new_key, new_whsec  # noqa: E402

__all__ = ["eventually", "expected_event_id", "new_key", "new_whsec"]

#: CONTRACT.md section 6: the metrics /metrics exposes (at least), counters with the
#: ``_total`` Prometheus gives them.
CONTRACT_METRICS = (
    "relay_feed_connected",
    "relay_feed_state",
    "relay_feed_last_message_age_seconds",
    "relay_feed_messages_total",
    "relay_feed_reconnects_total",
    "relay_feed_sequence_gaps_total",
    "relay_feed_bad_frames_total",
    "relay_events_stored_total",
    "relay_events_duplicate_total",
    "relay_deliveries_total",
    "relay_delivery_duration_seconds",
    "relay_outbox_pending",
    "relay_outbox_oldest_age_seconds",
    "relay_reconcile_runs_total",
    "relay_reconcile_events_total",
    "relay_reconcile_last_success_timestamp_seconds",
    "relay_endpoint_state",
    "relay_alerts_total",
    "relay_outbox_dead",
    "relay_build_info",
)

# Shared suites imported by several test files get pytest's assertion messages everywhere.
pytest.register_assert_rewrite("store_suite")

SimFactory = Callable[..., Awaitable[Simulator]]
ReceiverFactory = Callable[..., Awaitable[Receiver]]
EnvBuilder = Callable[..., dict[str, str]]


def wire_body(message: Mapping[str, Any], *, token: bool) -> bytes:
    """The body a delivery should carry: the message as received, compact, token kept or not."""
    shown = dict(message)
    if not token:
        shown["payload"] = {k: v for k, v in message["payload"].items() if k != "user_token"}
    return json.dumps(shown, separators=(",", ":"), ensure_ascii=False).encode()


def sent_tokens(sim: Simulator) -> list[str]:
    """Every plaintext user token the simulator sent."""
    return [m["payload"]["user_token"]["token"] for m in sim.sent if "user_token" in m["payload"]]


def store_path(env: Mapping[str, str]) -> Path:
    """The SQLite file a relay env points at."""
    url = env["RELAY_STORE"]
    assert url.startswith("sqlite:///"), url
    return Path(url.removeprefix("sqlite:///"))


def query(db: Path, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
    """Read the store directly (a read-only connection; WAL lets it run beside the daemon)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5.0)
    try:
        conn.row_factory = sqlite3.Row
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def store_files(db: Path) -> dict[str, bytes]:
    """Raw bytes of the SQLite file and its companions (WAL, shared memory, lock)."""
    found = {}
    for path in db.parent.iterdir():
        if path.name.startswith(db.name):
            found[path.name] = path.read_bytes()
    return found


@pytest.fixture(name="eventually")
def eventually_fixture() -> Callable[..., Awaitable[Any]]:
    """:func:`eventually`, as a fixture."""
    return eventually


@pytest.fixture(name="run_relay")
def run_relay_fixture() -> Callable[..., contextlib.AbstractAsyncContextManager[Relay]]:
    """:func:`run_relay`, as a fixture."""
    return run_relay


@pytest.fixture
async def closing() -> AsyncIterator[Callable[[Any], Any]]:
    """``closing(thing)``: closed (``await thing.close()``) after the test; returns it."""
    opened: list[Any] = []

    def track(thing: Any) -> Any:
        opened.append(thing)
        return thing

    yield track
    for thing in opened:
        await thing.close()


@pytest.fixture
def whsec() -> Callable[[], str]:
    """Factory of fresh ``whsec_`` secrets."""
    return new_whsec


@pytest.fixture
def signing_secret() -> str:
    """The secret the relay signs with and the default receiver verifies with."""
    return new_whsec()


@pytest.fixture
async def make_sim() -> AsyncIterator[SimFactory]:
    """Start simulators with custom settings; each is closed at teardown."""
    async with contextlib.AsyncExitStack() as stack:

        async def make(
            *,
            count: int | None = 40,
            users: int = 10,
            rate: float | None = None,
            faults: Faults | None = None,
            seed: int = 0,
        ) -> Simulator:
            sim = Simulator(
                api_key="sim-" + base64.b16encode(os.urandom(12)).decode(),
                users=users,
                count=count,
                rate=rate,
                faults=faults,
                seed=seed,
            )
            await sim.start()
            stack.push_async_callback(sim.close)
            return sim

        yield make


@pytest.fixture
async def sim(request: pytest.FixtureRequest, make_sim: SimFactory) -> Simulator:
    """A started simulator: 40 messages over 10 users, as fast as the relay reads.

    Parametrize indirectly with a dict of :func:`make_sim` arguments to change that.
    """
    return await make_sim(**getattr(request, "param", {}))


@pytest.fixture
async def make_receiver(signing_secret: str) -> AsyncIterator[ReceiverFactory]:
    """Start receivers (verifying ``signing_secret`` unless told otherwise)."""
    async with contextlib.AsyncExitStack() as stack:

        async def make(
            *, secret: str | None = None, behaviour: Behaviour | None = None
        ) -> Receiver:
            receiver = Receiver(keys=[decode_secret(secret or signing_secret)], behaviour=behaviour)
            await receiver.start()
            stack.push_async_callback(receiver.close)
            return receiver

        yield make


@pytest.fixture
async def receiver(make_receiver: ReceiverFactory) -> Receiver:
    """A started receiver that verifies every signature and answers 204."""
    return await make_receiver()


@pytest.fixture
def relay_env(
    sim: Simulator, receiver: Receiver, signing_secret: str, tmp_path: Path
) -> EnvBuilder:
    """Build the environment of a relay pointed at ``sim`` and ``receiver``.

    Keyword arguments are variables to add or replace (full names); ``None`` removes one.
    """

    def build(**overrides: str | None) -> dict[str, str]:
        env = {
            "RELAY_API_KEY": sim.api_key,
            "RELAY_WS_URL": sim.ws_url,
            "RELAY_API_URL": sim.api_url,
            "RELAY_ENDPOINTS": receiver.url + "/webhooks/sfox",
            "RELAY_SIGNING_SECRET": signing_secret,
            "RELAY_STORE": f"sqlite:///{tmp_path}/relay.db",
            "RELAY_ADMIN_ADDR": "127.0.0.1:0",
            "RELAY_RECONCILE_INTERVAL": "off",
            "RELAY_LOG_LEVEL": "WARNING",
            "RELAY_LOG_FORMAT": "console",
        }
        for name, value in overrides.items():
            if value is None:
                env.pop(name, None)
            else:
                env[name] = value
        return env

    return build


@contextlib.asynccontextmanager
async def run_relay(
    env: Mapping[str, str], *, timeout: float = 10.0, **parts: Any
) -> AsyncIterator[Relay]:
    """Run ``Relay(load_settings(env, for_run=True), **parts)`` in this loop; stop it on exit.

    Yields once the relay has started (store open, admin port bound). On exit it asks for the
    phased shutdown and waits for it, re-raising whatever the run raised.
    """
    async with in_process(env, timeout=timeout, **parts) as running:
        yield running.relay


@pytest.fixture
async def database() -> AsyncIterator[str]:
    """A fresh PostgreSQL database for this test (dropped afterwards); its URL. Skips, naming
    the variable to set, when no server answers."""
    import asyncpg

    try:
        admin = await asyncpg.connect(PG_URL, timeout=3)
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.skip(f"PostgreSQL unreachable ({type(exc).__name__}); set SFOX_RELAY_TEST_PG")
    name = f"relay_test_{uuid.uuid4().hex[:10]}"
    await admin.execute(f"CREATE DATABASE {name}")
    base, _, _ = PG_URL.rpartition("/")
    try:
        yield f"{base}/{name}"
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()
