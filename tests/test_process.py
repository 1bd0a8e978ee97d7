"""The relay as a real process: signals, kill -9, the store lock, exit codes, the CLI.

The simulator and the receiver run in the test's event loop; ``relay`` runs as a subprocess
(``python -m relay``) with its configuration in the environment, against a SQLite file in
``tmp_path`` that the test reads directly afterwards.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import pytest
from conftest import expected_event_id, new_key, new_whsec, query, store_path

from bench.procs import relay_cli as cli
from bench.procs import start_relay_run
from relay.receiver import Received, Receiver, Response
from relay.simulator import Simulator
from relay.store.sqlite import SQLiteStore

pytestmark = pytest.mark.slow


class Daemon:
    """A ``relay run`` subprocess, its output going to files in ``tmp_path``."""

    def __init__(self, proc: asyncio.subprocess.Process, log: Path) -> None:
        self.proc = proc
        self.log = log

    @property
    def running(self) -> bool:
        return self.proc.returncode is None

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    async def wait(self, timeout: float = 10.0) -> int:
        try:
            async with asyncio.timeout(timeout):
                return await self.proc.wait()
        except TimeoutError:
            raise AssertionError(
                f"relay run did not exit within {timeout}s; log:\n{self.output()}"
            ) from None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@pytest.fixture
async def daemons(tmp_path: Path) -> AsyncIterator[list[Daemon]]:
    """Started daemons; any still running at teardown is killed (by its own pid)."""
    started: list[Daemon] = []
    yield started
    for daemon in started:
        if daemon.running:
            daemon.proc.kill()
        await daemon.proc.wait()


@pytest.fixture
def start_daemon(daemons: list[Daemon], tmp_path: Path):
    async def start(env: Mapping[str, str]) -> Daemon:
        log = tmp_path / f"relay-run-{len(daemons)}.log"
        daemon = Daemon(await start_relay_run(env, log), log)
        daemons.append(daemon)
        return daemon

    return start


def states_by_event(db: Path) -> dict[str, str]:
    """The (single endpoint's) delivery state of every stored event."""
    rows = query(
        db,
        "SELECT e.event_id, d.state FROM events e JOIN deliveries d ON d.event_seq = e.seq",
    )
    return {row["event_id"]: row["state"] for row in rows}


def table_rows(stdout: str) -> list[list[str]]:
    """The rows of `relay deliveries list` (its header dropped)."""
    lines = [line.split() for line in stdout.splitlines() if line.strip()]
    assert lines and lines[0][:4] == ["ID", "EVENT", "ID", "STATE"], stdout
    return lines[1:]


def one_webhook_id_per_event(received: list[Received]) -> None:
    """Every arrival of the same event (same bytes) carried the same webhook-id: its id."""
    by_body: dict[bytes, set[str]] = defaultdict(set)
    for r in received:
        assert r.verified is True
        by_body[r.body].add(r.webhook_id)
    for body, ids in by_body.items():
        assert ids == {expected_event_id(json.loads(body))}


# -- signals ------------------------------------------------------------------------------


@pytest.mark.parametrize("sim", [{"count": None, "users": 40, "rate": 400.0}], indirect=True)
async def test_sigterm_under_load_exits_0_and_loses_nothing(
    sim: Simulator, receiver: Receiver, relay_env, start_daemon, eventually
) -> None:
    def answer(r: Received) -> Response:
        # One event in eight hangs past the grace period: cut off, it must go back to pending.
        if int(r.webhook_id[-2:], 16) % 8 == 0:
            return Response(204, delay=30)
        return Response(204, delay=0.02)

    receiver.behaviour = answer
    # The delivery timeout bounds how long a delivery started during the stop can run (see
    # test_stop_during_a_claim_starts_nothing_and_keeps_the_grace for that bug).
    env = relay_env(RELAY_SHUTDOWN_GRACE="1s", RELAY_DELIVERY_TIMEOUT="3s")
    db = store_path(env)
    daemon = await start_daemon(env)
    await eventually(lambda: receiver.count >= 100, 12, message=daemon.output)
    assert daemon.running
    daemon.signal(signal.SIGTERM)
    assert await daemon.wait(10) == 0, daemon.output()
    assert "Traceback" not in daemon.output()

    states = states_by_event(db)
    assert states
    assert set(Counter(states.values())) <= {"delivered", "pending", "waiting"}, Counter(
        states.values()
    )
    sent = {expected_event_id(m) for m in sim.sent}
    assert set(states) <= sent
    answered = {r.webhook_id for r in receiver.received if int(r.webhook_id[-2:], 16) % 8}
    delivered = {i for i, s in states.items() if s == "delivered"}
    assert delivered <= answered
    assert answered <= set(states)
    pending = {i for i, s in states.items() if s != "delivered"}
    cut_off = {r.webhook_id for r in receiver.received} - answered
    assert cut_off and cut_off <= pending
    released = query(
        db,
        "SELECT e.event_id FROM deliveries d JOIN events e ON e.seq = d.event_seq "
        "WHERE d.state = 'pending' AND d.attempts = 0",
    )
    assert cut_off & {row["event_id"] for row in released}, "released without using an attempt"

    listed = await cli("deliveries", "list", "--state", "pending", "--limit", "500", env=env)
    assert listed.code == 0, listed.stderr
    rows = table_rows(listed.stdout)
    assert len(rows) == min(len(pending), 500)
    assert {row[2] for row in rows} == {"pending"}


async def test_sigkill_then_restart_delivers_everything_committed(
    make_sim, receiver: Receiver, relay_env, start_daemon, eventually
) -> None:
    sim = await make_sim(count=80, users=20, rate=200.0)
    receiver.behaviour = lambda r: Response(204, delay=0.5)  # slow: deliveries pile up
    env = relay_env(RELAY_API_KEY=sim.api_key, RELAY_WS_URL=sim.ws_url, RELAY_API_URL=sim.api_url)
    db = store_path(env)
    first = await start_daemon(env)

    def busy() -> bool:
        return receiver.count >= 20 and query(db, "SELECT COUNT(*) AS n FROM events")[0]["n"] >= 30

    await eventually(busy, 12, message=first.output)
    first.signal(signal.SIGKILL)
    assert await first.wait(5) == -signal.SIGKILL

    at_kill = states_by_event(db)
    committed = set(at_kill)
    in_flight = {i for i, s in at_kill.items() if s == "inflight"}
    assert in_flight, "the test needs deliveries in flight at the kill"
    assert committed <= {expected_event_id(m) for m in sim.sent}

    receiver.behaviour = None
    second = await start_daemon(env)

    def all_final() -> bool:
        states = states_by_event(db)
        return committed <= set(states) and set(states.values()) == {"delivered"}

    await eventually(all_final, 12, message=lambda: str(Counter(states_by_event(db).values())))
    second.signal(signal.SIGTERM)
    assert await second.wait(8) == 0, second.output()

    seen = Counter(r.webhook_id for r in receiver.received)
    assert committed <= set(seen), "an event committed before kill -9 was never delivered"
    duplicated = {i for i, n in seen.items() if n > 1}
    assert duplicated <= in_flight, "only deliveries in flight at the kill may arrive twice"
    one_webhook_id_per_event(receiver.received)


# -- the store lock -----------------------------------------------------------------------


async def test_a_second_daemon_on_the_same_store_exits_1_naming_the_lock(
    sim: Simulator, receiver: Receiver, relay_env, start_daemon, eventually
) -> None:
    env = relay_env()
    db = store_path(env)
    first = await start_daemon(env)
    await receiver.wait_for(40, timeout=12)
    await eventually(lambda: set(states_by_event(db).values()) == {"delivered"}, 5)

    second = await cli("run", env=env)
    assert second.code == 1, second.stderr
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1, second.stderr
    assert "lock" in lines[0] and f"{db}.lock" in lines[0]
    assert "Traceback" not in second.stderr

    listed = await cli("deliveries", "list", "--limit", "500", env=env)
    assert listed.code == 0, listed.stderr
    rows = table_rows(listed.stdout)
    assert len(rows) == 40
    assert {row[2] for row in rows} == {"delivered"}

    assert first.running
    first.signal(signal.SIGTERM)
    assert await first.wait(8) == 0, first.output()


async def test_deliveries_list_pages_with_the_cursor_it_prints(
    sim: Simulator, receiver: Receiver, relay_env, run_relay, eventually
) -> None:
    env = relay_env()
    db = store_path(env)
    async with run_relay(env):
        await receiver.wait_for(40, timeout=10)
        await eventually(lambda: set(states_by_event(db).values()) == {"delivered"}, 5)
    first = await cli("deliveries", "list", "--limit", "30", env=env)
    assert first.code == 0, first.stderr
    assert len(table_rows(first.stdout)) == 30
    hint = first.stderr.strip().splitlines()[-1]
    assert hint.startswith("(more: --before "), hint
    cursor = hint.removeprefix("(more: --before ").rstrip(")")
    rest = await cli("deliveries", "list", "--limit", "30", "--before", cursor, env=env)
    assert rest.code == 0, rest.stderr
    ids = [row[0] for row in table_rows(first.stdout) + table_rows(rest.stdout)]
    assert len(ids) == len(set(ids)) == 40


@pytest.mark.parametrize("delivery_id", ["dlv_99999999999999999999", "dlv_" + "9" * 5000])
async def test_an_out_of_range_delivery_id_is_one_line_exit_1(
    sim: Simulator, receiver: Receiver, relay_env, run_relay, delivery_id: str
) -> None:
    env = relay_env()
    async with run_relay(env):
        await receiver.wait_for(1, timeout=10)
    done = await cli("deliveries", "show", delivery_id, env=env)
    assert done.code == 1, done.stderr
    assert "Traceback" not in done.stderr
    # One line for the store it opened (masked), one for the error: nothing else.
    store_line, error_line = done.stderr.splitlines()
    assert store_line.startswith("relay: store "), done.stderr
    assert error_line.startswith("relay: no delivery dlv_999"), done.stderr


# -- configuration and the other commands --------------------------------------------------


async def test_bad_config_exits_2_with_one_line_naming_the_variable(relay_env) -> None:
    done = await cli("run", env=relay_env(RELAY_DELIVERY_TIMEOUT="soon"))
    assert done.code == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "RELAY_DELIVERY_TIMEOUT" in lines[0]
    assert "soon" not in lines[0]
    assert "Traceback" not in done.stderr
    assert done.stdout == ""


async def test_check_prints_the_config_with_every_secret_masked(relay_env) -> None:
    signing = new_whsec()
    token_key = new_key()
    admin_token = "adm-" + new_key()
    env = relay_env(
        RELAY_SIGNING_SECRET=signing,
        RELAY_ADMIN_TOKEN=admin_token,
        RELAY_TOKEN_KEY=token_key,
        RELAY_USER_TOKEN="forward",
    )
    store = SQLiteStore(store_path(env))  # check reads a store, never creates one
    await store.open(daemon=False)
    await store.close()
    done = await cli("check", env=env)
    assert done.code == 0, done.stderr
    config = json.loads(done.stdout)
    assert config["api_key"] == "***"
    assert config["admin_token"] == "***"
    assert config["token_key"] == "***"
    assert config["signing_secret"] == ["***"]
    assert config["admin_addr"] == "127.0.0.1:0"
    assert config["reconcile_interval"] == "off"
    printed = done.stdout + done.stderr
    for secret in (
        env["RELAY_API_KEY"],
        signing,
        signing.removeprefix("whsec_"),
        admin_token,
        admin_token.removeprefix("adm-"),
        token_key,
    ):
        assert secret not in printed


async def test_demo_exits_0() -> None:
    done = await cli("demo", "--events", "20", env={}, timeout=20)
    assert done.code == 0, done.stdout + done.stderr
    assert "20 events sent by the simulator, 20 deliveries received" in done.stdout
    assert "per-user order kept" in done.stdout
