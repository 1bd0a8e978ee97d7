"""The last hour, one slot a second: what the status page charts ("is it getting worse?").

Sampled from the relay's own metrics once a second, so no component reports to it and the hot
path pays nothing. Memory is fixed: every series is a ring of ``seconds`` unsigned 32-bit
slots (14 KiB for an hour), three series per endpoint plus the feed's. The history is this
process's: with several replicas each keeps and serves its own, named by ``replica``.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from array import array
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from relay.metrics import Metrics

__all__ = ["History", "Snapshot", "replica_name"]

_SLOT_MAX = 2**32 - 1
#: Delivery outcomes charted as failures: every attempt that did not deliver.
_FAILED = frozenset({"retry", "dead"})


def replica_name() -> str:
    """Who this process is among replicas: host name (a pod's name) and process id."""
    return f"{socket.gethostname()}:{os.getpid()}"


class _Ring:
    """``size`` per-second slots; slot ``t % size`` holds second ``t``."""

    __slots__ = ("slots",)

    def __init__(self, size: int) -> None:
        self.slots = array("I", bytes(4 * size))

    def put(self, second: int, value: float) -> None:
        self.slots[second % len(self.slots)] = min(_SLOT_MAX, max(0, round(value)))

    def add(self, second: int, value: float) -> None:
        index = second % len(self.slots)
        self.slots[index] = min(_SLOT_MAX, self.slots[index] + max(0, round(value)))

    def clear(self, seconds: Iterable[int]) -> None:
        for second in seconds:
            self.slots[second % len(self.slots)] = 0

    def window(self, first: int, last: int) -> list[int]:
        size = len(self.slots)
        return [self.slots[s % size] for s in range(first, last + 1)]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Seconds ``start`` .. ``end`` (unix, inclusive), one value per second in each series."""

    replica: str
    start: int
    end: int
    feed_messages: list[int]
    endpoints: dict[str, dict[str, list[int]]]

    def as_json(self) -> dict[str, Any]:
        return {
            "replica": self.replica,
            "step_s": 1,
            "start": self.start,
            "end": self.end,
            "feed_messages": self.feed_messages,
            "endpoints": self.endpoints,
        }


class History:
    """Per-second deltas of the delivery and feed counters, and the outbox depth, for an hour."""

    def __init__(
        self,
        metrics: Metrics,
        *,
        seconds: int = 3600,
        clock: Callable[[], float] = time.time,
        replica: str | None = None,
    ) -> None:
        if seconds < 2:
            raise ValueError("a history needs at least two seconds")
        self._metrics = metrics
        self._size = seconds
        self._clock = clock
        self.replica = replica or replica_name()
        self._feed = _Ring(seconds)
        self._series: dict[tuple[str, str], _Ring] = {}
        self._totals: dict[tuple[str, str], float] = {}
        self._last: int | None = None  # the last second sampled

    @property
    def nbytes(self) -> int:
        """Bytes held by the rings (the history's whole cost grows only with endpoints)."""
        return sum(r.slots.itemsize * len(r.slots) for r in (self._feed, *self._series.values()))

    def _ring(self, endpoint: str, kind: str) -> _Ring:
        key = (endpoint, kind)
        ring = self._series.get(key)
        if ring is None:
            ring = self._series[key] = _Ring(self._size)
            if self._last is not None:  # a series born now has no past: zero, not stale
                ring.clear(range(self._last - self._size + 1, self._last + 1))
        return ring

    def _delta(self, key: tuple[str, str], total: float, first: bool) -> float:
        """How much a cumulative counter grew since the last sample.

        At the first sample everything counted so far is the past; a counter that appears
        later was born since the last sample, from zero.
        """
        before = self._totals.get(key)
        self._totals[key] = total
        if before is None:
            return 0.0 if first else total
        return max(0.0, total - before)

    def sample(self) -> None:
        """Take this second's numbers; call about once a second (late calls lose nothing)."""
        now = int(self._clock())
        if self._last is not None and now > self._last + 1:  # seconds nobody sampled: zero
            gap = range(max(self._last + 1, now - self._size + 1), now)
            for ring in (self._feed, *self._series.values()):
                ring.clear(gap)
        if self._last is None or now > self._last:
            for ring in (self._feed, *self._series.values()):
                ring.clear((now,))
        first = self._last is None
        fresh = first or now > (self._last or now)
        self._last = max(now, self._last or now)
        messages = _total(self._metrics.feed_messages.collect())
        self._feed.add(now, self._delta(("", "feed"), messages, first))
        per_endpoint: dict[tuple[str, str], float] = {}
        for sample in _samples(self._metrics.deliveries.collect(), "_total"):
            outcome = sample.labels.get("outcome", "")
            kind = "delivered" if outcome == "success" else "failed" if outcome in _FAILED else ""
            if kind:
                key = (sample.labels["endpoint"], kind)
                per_endpoint[key] = per_endpoint.get(key, 0.0) + sample.value
        for key, total in per_endpoint.items():
            self._ring(*key).add(now, self._delta(key, total, first))
        for sample in _samples(self._metrics.outbox_pending.collect(), ""):
            ring = self._ring(sample.labels["endpoint"], "depth")
            if fresh:
                ring.put(now, sample.value)
            else:
                ring.put(now, max(sample.value, ring.slots[now % self._size]))

    def snapshot(self, seconds: int | None = None) -> Snapshot:
        """The last ``seconds`` (default: all kept) up to the last sample, oldest first."""
        span = self._size if seconds is None else max(1, min(seconds, self._size))
        end = self._last if self._last is not None else int(self._clock())
        start = end - span + 1
        if self._last is None:
            empty = [0] * span
            return Snapshot(self.replica, start, end, empty, {})
        endpoints: dict[str, dict[str, list[int]]] = {}
        for (endpoint, kind), ring in sorted(self._series.items()):
            endpoints.setdefault(endpoint, {"delivered": [], "failed": [], "depth": []})
            endpoints[endpoint][kind] = ring.window(start, end)
        for series in endpoints.values():
            for kind, values in series.items():
                if not values:
                    series[kind] = [0] * span
        return Snapshot(self.replica, start, end, self._feed.window(start, end), endpoints)

    async def run(self, interval: float = 1.0) -> None:
        """Sample every ``interval`` seconds until cancelled."""
        while True:
            self.sample()
            await asyncio.sleep(interval)


def _samples(families: Iterable[Any], suffix: str) -> Iterable[Any]:
    for family in families:
        for sample in family.samples:
            if sample.name == family.name + suffix:
                yield sample


def _total(families: Iterable[Any]) -> float:
    return float(sum(sample.value for sample in _samples(families, "_total")))
