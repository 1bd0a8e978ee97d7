"""Supervision: every long-running task of the daemon runs here, and none dies silently.

A task that fails unexpectedly is logged with its traceback and restarted after a backoff (1 s
doubling to 60 s, back to 1 s after a healthy minute); while it waits to restart, :attr:`down`
names it (``/readyz`` answers 503). More than five failures of one task within five minutes
mean restarting does not help: the supervisor gives up and :attr:`failed` is set, with
:attr:`error` naming the task, so the daemon shuts down and exits 1 (CONTRACT.md section 5).

A task is a coroutine function; it is called afresh for each restart, so it must resume from
what it (or the store) holds. Returning normally means the task is done (it is not restarted).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from relay.errors import TaskFailedError

__all__ = ["Policy", "Supervisor"]

log = logging.getLogger("relay.supervise")


@dataclass(frozen=True)
class Policy:
    """When to restart, and when to stop trying."""

    first_delay: float = 1.0
    max_delay: float = 60.0
    #: More failures than this within ``window`` seconds stop the daemon.
    max_failures: int = 5
    window: float = 300.0
    #: A run that lasted this long before failing starts the backoff over.
    healthy_after: float = 60.0


class _State(enum.Enum):
    RUNNING = "running"
    RESTARTING = "restarting"  # failed; waiting out the backoff
    DONE = "done"
    GAVE_UP = "gave_up"


@dataclass
class _Entry:
    name: str
    run: Callable[[], Awaitable[None]]
    state: _State = _State.RUNNING
    delay: float = 0.0
    failures: deque[float] = field(default_factory=deque)
    stopping: bool = False
    task: asyncio.Task[None] | None = None


class Supervisor:
    """Runs named tasks, restarts the ones that fail, and gives up on one that keeps failing."""

    def __init__(
        self,
        policy: Policy | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.policy = policy or Policy()
        self._clock = clock
        self._sleep = sleep
        self._entries: dict[str, _Entry] = {}
        #: Set when a task failed too often; :attr:`error` says which.
        self.failed = asyncio.Event()
        self.error: TaskFailedError | None = None

    def add(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        """Start ``run()`` now as the task ``name``, under supervision."""
        if name in self._entries:
            raise ValueError(f"a task named {name!r} is already supervised")
        entry = _Entry(name, run, delay=self.policy.first_delay)
        self._entries[name] = entry
        entry.task = asyncio.create_task(self._keep(entry), name=f"relay-{name}")

    @property
    def down(self) -> list[str]:
        """Tasks that failed and are not running now (waiting to restart, or given up on)."""
        return [
            e.name for e in self._entries.values() if e.state in (_State.RESTARTING, _State.GAVE_UP)
        ]

    async def stop(self, name: str, timeout: float | None = None) -> None:
        """Restart ``name`` no more; wait for its current run to return (the caller has asked
        the component to finish), cancelling it after ``timeout``. A task waiting to restart
        is not restarted."""
        entry = self._entries.get(name)
        if entry is None or entry.task is None:
            return
        entry.stopping = True
        if entry.state is _State.RESTARTING:
            entry.task.cancel()
        done, _ = await asyncio.wait({entry.task}, timeout=timeout)
        if not done:
            log.warning(
                "task %s did not finish in time; cancelled",
                name,
                extra={"event": "task.cancelled", "task": name},
            )
        await self._cancel(entry)

    async def close(self) -> None:
        """Cancel every task still running (the background loops, at shutdown)."""
        for entry in list(self._entries.values()):
            entry.stopping = True
            await self._cancel(entry)

    async def _cancel(self, entry: _Entry) -> None:
        task = entry.task
        if task is None:
            return
        if not task.done():
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if entry.state is _State.RESTARTING:
            entry.state = _State.DONE

    async def _keep(self, entry: _Entry) -> None:
        """Run ``entry`` until it returns; restart it after each failure, within the policy."""
        policy = self.policy
        while True:
            entry.state = _State.RUNNING
            started = self._clock()
            try:
                await entry.run()
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    entry.state = _State.DONE
                    raise  # our own cancel (stop/close): not a failure
                failure: BaseException = RuntimeError("the task was cancelled from inside")
            except Exception as exc:
                failure = exc
            else:
                entry.state = _State.DONE
                return
            now = self._clock()
            if entry.stopping:
                entry.state = _State.DONE
                log.error(
                    "task %s failed while stopping",
                    entry.name,
                    exc_info=failure,
                    extra={"event": "task.failed", "task": entry.name},
                )
                return
            entry.failures.append(now)
            while entry.failures and entry.failures[0] <= now - policy.window:
                entry.failures.popleft()
            if now - started >= policy.healthy_after:
                entry.delay = policy.first_delay
            count = len(entry.failures)
            if count > policy.max_failures:
                entry.state = _State.GAVE_UP
                self.error = TaskFailedError(entry.name, count, policy.window)
                log.critical(
                    "%s; stopping the relay",
                    self.error,
                    exc_info=failure,
                    extra={"event": "task.gave_up", "task": entry.name, "failures": count},
                )
                self.failed.set()
                return
            delay, entry.delay = entry.delay, min(policy.max_delay, entry.delay * 2)
            entry.state = _State.RESTARTING
            log.error(
                "task %s failed; restarting in %gs",
                entry.name,
                delay,
                exc_info=failure,
                extra={
                    "event": "task.failed",
                    "task": entry.name,
                    "restart_in_s": delay,
                    "failures": count,
                },
            )
            await self._sleep(delay)
            log.info(
                "task %s restarted",
                entry.name,
                extra={"event": "task.restarted", "task": entry.name},
            )
