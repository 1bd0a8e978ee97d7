"""Supervision (CONTRACT.md section 5): every long-running task restarts after a failure, with
backoff; /readyz names it while it is down; more than 5 failures in 5 minutes stop the daemon
with exit 1. None dies silently.

The supervisor's clock and sleep are injected: a test decides when a restart happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import EnvBuilder, eventually, query, run_relay, store_path

from relay.app import Relay
from relay.errors import RelayError, StoreError, TaskFailedError
from relay.store import open_store
from relay.supervise import Policy, Supervisor


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Gate:
    """An injected sleep that records each delay and waits until the test opens it."""

    def __init__(self, clock: Clock | None = None) -> None:
        self.delays: list[float] = []
        self.opened = asyncio.Event()
        self.waiting = asyncio.Event()
        self._clock = clock

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        self.waiting.set()
        await self.opened.wait()
        self.opened.clear()
        self.waiting.clear()
        if self._clock is not None:
            self._clock.now += delay

    def open(self) -> None:
        self.opened.set()


class Flaky:
    """A task that fails ``failures`` times (after ``runs_for`` clock seconds), then runs."""

    def __init__(self, clock: Clock, failures: int, *, runs_for: float = 0.0) -> None:
        self.clock = clock
        self.failures = failures
        self.runs_for = runs_for
        self.calls = 0
        self.running = asyncio.Event()
        self.finish = asyncio.Event()

    async def __call__(self) -> None:
        self.calls += 1
        self.clock.now += self.runs_for
        if self.calls <= self.failures:
            raise RuntimeError(f"injected failure {self.calls}")
        self.running.set()
        await self.finish.wait()


def failure_records(caplog: pytest.LogCaptureFixture, event: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) == event]


async def no_sleep(delay: float) -> None:
    await asyncio.sleep(0)


# -- the supervisor alone -------------------------------------------------------------------


async def test_a_failed_task_is_logged_with_its_traceback_named_down_and_restarted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="relay.supervise")
    clock = Clock()
    gate = Gate(clock)
    supervisor = Supervisor(clock=clock, sleep=gate)
    task = Flaky(clock, failures=1)
    supervisor.add("feed", task)

    await asyncio.wait_for(gate.waiting.wait(), 5)
    assert supervisor.down == ["feed"]
    (record,) = failure_records(caplog, "task.failed")
    assert record.task == "feed"  # type: ignore[attr-defined]
    assert record.exc_info is not None
    assert "injected failure 1" in caplog.text and "Traceback" in caplog.text

    gate.open()
    await asyncio.wait_for(task.running.wait(), 5)
    assert supervisor.down == []
    assert task.calls == 2
    assert failure_records(caplog, "task.restarted")
    await supervisor.close()


async def test_backoff_doubles_from_1s_to_60s_and_resets_after_a_healthy_minute() -> None:
    clock = Clock()
    # Failures an hour apart never reach the give-up rule; each run lasts 10 s (not healthy).
    supervisor = Supervisor(
        Policy(window=1.0), clock=clock, sleep=(delays := Recorder(clock, 3600.0))
    )
    task = Flaky(clock, failures=9, runs_for=10.0)
    supervisor.add("dispatch", task)
    await asyncio.wait_for(task.running.wait(), 5)
    assert delays.seen == [1, 2, 4, 8, 16, 32, 60, 60, 60]

    healthy = Supervisor(Policy(window=1.0), clock=clock, sleep=(again := Recorder(clock, 0.0)))
    steady = Flaky(clock, failures=3, runs_for=60.0)
    healthy.add("dispatch", steady)
    await asyncio.wait_for(steady.running.wait(), 5)
    assert again.seen == [1, 1, 1]  # each run was healthy for a minute before it failed
    await supervisor.close()
    await healthy.close()


class Recorder:
    """An injected sleep that records the delay and moves the clock by ``gap`` instead."""

    def __init__(self, clock: Clock, gap: float) -> None:
        self.clock = clock
        self.gap = gap
        self.seen: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.seen.append(delay)
        self.clock.now += self.gap
        await asyncio.sleep(0)


async def test_the_sixth_failure_within_5_minutes_gives_up_naming_the_task(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    supervisor = Supervisor(clock=clock, sleep=Recorder(clock, 10.0))
    task = Flaky(clock, failures=100)
    supervisor.add("recorder", task)

    await asyncio.wait_for(supervisor.failed.wait(), 5)
    assert task.calls == 6
    assert isinstance(supervisor.error, TaskFailedError)
    assert isinstance(supervisor.error, RelayError)  # __main__ maps it to exit 1
    assert supervisor.error.task == "recorder"
    assert str(supervisor.error) == "task recorder failed 6 times within 300s"
    (record,) = failure_records(caplog, "task.gave_up")
    assert record.levelno == logging.CRITICAL and "recorder" in record.getMessage()
    assert supervisor.down == ["recorder"]
    await supervisor.close()


async def test_failures_spread_over_more_than_5_minutes_keep_restarting() -> None:
    clock = Clock()
    supervisor = Supervisor(clock=clock, sleep=Recorder(clock, 61.0))
    task = Flaky(clock, failures=12)
    supervisor.add("stats", task)
    await asyncio.wait_for(task.running.wait(), 5)
    assert not supervisor.failed.is_set()
    await supervisor.close()


async def test_a_task_that_returns_is_done_and_not_restarted() -> None:
    supervisor = Supervisor(sleep=no_sleep)
    calls = []

    async def once() -> None:
        calls.append(1)

    supervisor.add("reconcile", once)
    for _ in range(10):
        await asyncio.sleep(0)
    assert calls == [1] and supervisor.down == []
    await supervisor.close()


async def test_a_task_cancelled_from_inside_counts_as_a_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    gate = Gate()
    supervisor = Supervisor(sleep=gate)

    async def cancels_itself() -> None:
        raise asyncio.CancelledError  # e.g. a library cancelling work it should not

    supervisor.add("retention", cancels_itself)
    await asyncio.wait_for(gate.waiting.wait(), 5)
    assert supervisor.down == ["retention"]
    assert failure_records(caplog, "task.failed")
    await supervisor.close()
    assert supervisor.down == []


async def test_a_task_stopped_while_waiting_to_restart_is_not_restarted() -> None:
    clock = Clock()
    gate = Gate(clock)
    supervisor = Supervisor(clock=clock, sleep=gate)
    task = Flaky(clock, failures=1)
    supervisor.add("feed", task)
    await asyncio.wait_for(gate.waiting.wait(), 5)
    await supervisor.stop("feed")
    assert task.calls == 1 and supervisor.down == []


async def test_one_name_one_task() -> None:
    supervisor = Supervisor()
    supervisor.add("feed", Flaky(Clock(), failures=0))
    with pytest.raises(ValueError, match="feed"):
        supervisor.add("feed", Flaky(Clock(), failures=0))
    await supervisor.close()


# -- every task of a running relay ----------------------------------------------------------

#: The supervised tasks of ``relay run``, and where each one's run lives on the relay.
TASKS: dict[str, Callable[[Relay], tuple[object, str]]] = {
    "admin": lambda r: (r.admin, "serve"),
    "feed": lambda r: (r.feed, "run"),
    "dispatch": lambda r: (r.dispatcher, "deliver"),
    "recorder": lambda r: (r.dispatcher, "record"),
    "store-listener": lambda r: (r.store, "watch"),
    "stats": lambda r: (r, "_stats_loop"),
    "reconcile": lambda r: (r.reconciler, "run"),
    "retention": lambda r: (r, "_retention_loop"),
}


def fail_once(target: object, name: str) -> None:
    """Make ``target.name()`` raise the first time it is called (on this instance only)."""
    original = getattr(target, name)
    calls = []

    async def flaky(*args: Any, **kwargs: Any) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError(f"injected failure of {name}")
        await original(*args, **kwargs)

    setattr(target, name, flaky)


def build_relay(env: dict[str, str], supervisor: Supervisor) -> Relay:
    from relay.config import load_settings

    return Relay(load_settings(env, for_run=True), supervisor=supervisor)


@contextlib.asynccontextmanager
async def running(relay: Relay) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(relay.run())
    started = asyncio.create_task(relay.started.wait())
    await asyncio.wait({task, started}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
    started.cancel()
    if task.done():
        task.result()
    try:
        yield task
    finally:
        relay.request_stop()
        with contextlib.suppress(TaskFailedError):
            await asyncio.wait_for(task, 10)


async def readyz(relay: Relay) -> httpx.Response:
    async with httpx.AsyncClient(trust_env=False, timeout=5) as http:
        return await http.get(f"http://127.0.0.1:{relay.admin.port}/readyz")


@pytest.mark.parametrize("name", sorted(TASKS))
async def test_each_task_of_a_running_relay_is_restarted_and_named_by_readyz_meanwhile(
    name: str, relay_env: EnvBuilder, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="relay.supervise")
    env = relay_env(RELAY_RECONCILE_INTERVAL="1h", RELAY_RETENTION="1s")
    gate = Gate()
    relay = build_relay(env, Supervisor(sleep=gate))
    target, attribute = TASKS[name](relay)
    fail_once(target, attribute)
    async with running(relay):
        await asyncio.wait_for(gate.waiting.wait(), 10)
        assert relay.ready[f"task.{name}"] is False
        if name == "admin":
            # Nobody accepts while the admin task is down: a request waits in the backlog
            # and is answered once it is back.
            asking = asyncio.create_task(readyz(relay))
            await asyncio.sleep(0.2)
            assert not asking.done()
        else:
            response = await readyz(relay)
            assert response.status_code == 503
            assert response.json()["checks"][f"task.{name}"] == "failing"
        (record,) = failure_records(caplog, "task.failed")
        assert record.task == name and record.exc_info is not None  # type: ignore[attr-defined]
        assert f"injected failure of {attribute}" in caplog.text

        gate.open()
        if name == "admin":
            assert (await asyncio.wait_for(asking, 5)).status_code in (200, 503)

        async def ready_again() -> bool:
            return (await readyz(relay)).status_code == 200

        await eventually(ready_again, 10, message=lambda: f"{relay.supervisor.down}")
        assert [r.task for r in failure_records(caplog, "task.restarted")] == [name]  # type: ignore[attr-defined]


async def test_a_recorder_killed_unexpectedly_is_restarted_and_loses_no_verdict(
    relay_env: EnvBuilder, receiver: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The regression: the recorder died, deliveries stayed in flight and /readyz said 200.

    (A store error on one verdict no longer kills it: write_isolating keeps it to that
    verdict, tests/test_boundary.py. What is left is an error no one foresaw.)"""
    import relay.dispatch

    original = relay.dispatch.write_isolating
    failed: list[int] = []

    async def fails_once(items: Any, write: Any, refused: Any) -> Any:
        if not failed:
            failed.append(len(items))
            raise RuntimeError("injected: a bug in the recorder")
        return await original(items, write, refused)

    monkeypatch.setattr(relay.dispatch, "write_isolating", fails_once)
    env = relay_env()
    gate = Gate()
    async with run_relay(env, supervisor=Supervisor(sleep=gate)) as relay_:
        await asyncio.wait_for(gate.waiting.wait(), 10)
        assert (await readyz(relay_)).json()["checks"]["task.recorder"] == "failing"
        gate.open()
        await receiver.wait_for(40, timeout=15)

        def all_delivered() -> bool:
            rows = query(store_path(env), "SELECT state, attempts FROM deliveries")
            return len(rows) == 40 and all(tuple(r) == ("delivered", 1) for r in rows)

        await eventually(all_delivered, 10)
    assert failed and failed[0] >= 1


async def test_a_store_error_on_one_verdict_never_stops_the_recorder(
    relay_env: EnvBuilder, receiver: Any
) -> None:
    env = relay_env()
    store = open_store(env["RELAY_STORE"])
    original = store.record
    refused: list[int] = []

    async def record_once_refused(outcomes: Any, now: float) -> None:
        if not refused:
            refused.append(len(outcomes))
            raise StoreError("injected: constraint failed")
        await original(outcomes, now)

    store.record = record_once_refused  # type: ignore[method-assign]
    async with run_relay(env, store=store) as relay_:
        await receiver.wait_for(40, timeout=15)

        def all_delivered() -> bool:
            rows = query(store_path(env), "SELECT state, attempts FROM deliveries")
            return len(rows) == 40 and all(tuple(r) == ("delivered", 1) for r in rows)

        await eventually(all_delivered, 10)
        assert relay_.supervisor.down == []  # nothing had to restart
    assert refused and refused[0] >= 1


async def test_a_task_failing_six_times_in_5_minutes_stops_the_relay_with_task_failed_error(
    relay_env: EnvBuilder, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="relay.app")
    env = relay_env()
    relay = build_relay(env, Supervisor(sleep=no_sleep))

    async def broken() -> None:
        raise RuntimeError("injected: always")

    relay._stats_loop = broken  # type: ignore[method-assign]
    task = asyncio.create_task(relay.run())
    with pytest.raises(TaskFailedError, match="task stats failed 6 times within 300s"):
        await asyncio.wait_for(task, 10)
    assert failure_records(caplog, "task.gave_up")
    assert failure_records(caplog, "relay.stopped")  # after the phased shutdown


_GIVES_UP = """
import sys
from relay.__main__ import main
from relay.app import Relay
from relay.errors import TaskFailedError

async def gives_up(self):
    raise TaskFailedError("feed", 6, 300.0)

Relay.run = gives_up
sys.exit(main(["run"]))
"""


def test_relay_run_exits_1_when_a_task_keeps_failing(tmp_path: Path) -> None:
    """`relay run` (main, in a process of its own) maps the supervisor's verdict to exit 1."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env.update(
        RELAY_API_KEY="key",
        RELAY_ENDPOINTS="http://127.0.0.1:9/hooks",
        RELAY_ALLOW_UNSIGNED="true",
        RELAY_STORE=f"sqlite:///{tmp_path}/relay.db",
    )
    done = subprocess.run(
        [sys.executable, "-c", _GIVES_UP],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    assert "relay: task feed failed 6 times within 300s" in done.stderr
