"""One thread that runs a store's calls in order of urgency, with no call starved.

The SQLite store has one connection on one thread. First-in-first-out, a delivery's claim or
verdict waited behind every batch the feed had queued (tens of milliseconds each): while the
feed was being stored, the dispatcher delivered a tenth of its rate. Here the dispatcher's
calls go first, operators' and monitors' next, ingest last; a call that has waited longer
than ``patience`` goes before any newer one, so the feed is slowed, never stopped, by
deliveries (an idle feed connection is one sFOX may drop).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from enum import IntEnum
from typing import Any, TypeVar

__all__ = ["Priority", "Worker"]

T = TypeVar("T")


class Priority(IntEnum):
    """Lower runs first."""

    DELIVERY = 0  # claims, verdicts: each one gates a lane
    OTHER = 1  # the admin API, health, reconciliation, retention
    INGEST = 2  # batches of new events: large, and the feed can wait a little


_Item = tuple[float, Callable[[], Any], "Future[Any]"]


class Worker:
    """A single thread with one queue per :class:`Priority`."""

    def __init__(
        self, name: str, *, patience: float = 0.05, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._patience = patience
        self._clock = clock
        self._queues: tuple[deque[_Item], ...] = tuple(deque() for _ in Priority)
        self._ready = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, priority: Priority, fn: Callable[[], T]) -> Future[T]:
        future: Future[T] = Future()
        with self._ready:
            if self._closed:
                raise RuntimeError("the store's worker is shut down")
            self._queues[priority].append((self._clock(), fn, future))
            self._ready.notify()
        return future

    async def run(self, priority: Priority, fn: Callable[[], T]) -> T:
        return await asyncio.wrap_future(self.submit(priority, fn))

    def shutdown(self) -> None:
        """Run what is queued, then stop the thread."""
        with self._ready:
            self._closed = True
            self._ready.notify()
        self._thread.join()

    def _next(self) -> _Item | None:
        """The most urgent call, unless a less urgent one has waited past ``patience``."""
        with self._ready:
            while not any(self._queues):
                if self._closed:
                    return None
                self._ready.wait()
            waiting = [q for q in self._queues if q]
            overdue = self._clock() - self._patience
            late = [q for q in waiting[1:] if q[0][0] < overdue]
            return (min(late, key=lambda q: q[0][0]) if late else waiting[0]).popleft()

    def _loop(self) -> None:
        while (item := self._next()) is not None:
            _, fn, future = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn()
            except BaseException as exc:  # handed to the awaiting caller, never lost here
                future.set_exception(exc)
            else:
                future.set_result(result)
