"""The status page's hour of history: per-second deltas sampled from the metrics, bounded."""

from __future__ import annotations

import asyncio

import pytest

from relay.history import History
from relay.metrics import Metrics


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def delivered(metrics: Metrics, endpoint: str, outcome: str, count: int = 1) -> None:
    metrics.deliveries.labels(endpoint=endpoint, outcome=outcome).inc(count)


def test_each_second_holds_what_happened_in_it() -> None:
    clock = Clock()
    metrics = Metrics(clock)
    history = History(metrics, seconds=10, clock=clock, replica="r1")
    metrics.feed_messages.inc(100)  # before the first sample: not this history's
    delivered(metrics, "crm", "success", 7)
    history.sample()
    clock.now += 1
    metrics.feed_messages.inc(5)
    delivered(metrics, "crm", "success", 3)
    delivered(metrics, "crm", "retry", 2)
    delivered(metrics, "crm", "dead", 1)
    delivered(metrics, "crm", "superseded", 4)  # not sent: neither delivered nor failed
    metrics.outbox_pending.labels(endpoint="crm").set(42)
    history.sample()
    clock.now += 1
    history.sample()

    snap = history.snapshot(3)
    assert (snap.replica, snap.end - snap.start) == ("r1", 2)
    assert snap.feed_messages == [0, 5, 0]
    assert snap.endpoints["crm"] == {
        "delivered": [0, 3, 0],
        "failed": [0, 3, 0],
        "depth": [0, 42, 42],
    }
    assert snap.as_json()["step_s"] == 1


def test_unsampled_seconds_are_zero_and_the_ring_forgets_past_its_size() -> None:
    clock = Clock()
    metrics = Metrics(clock)
    history = History(metrics, seconds=5, clock=clock)
    history.sample()
    for _ in range(3):
        clock.now += 1
        delivered(metrics, "crm", "success", 2)
        history.sample()
    assert history.snapshot().endpoints["crm"]["delivered"] == [0, 0, 2, 2, 2]
    clock.now += 3  # two seconds nobody sampled
    delivered(metrics, "crm", "success", 9)
    history.sample()
    assert history.snapshot().endpoints["crm"]["delivered"] == [2, 2, 0, 0, 9]
    clock.now += 60  # far past the ring: all of it is old
    history.sample()
    assert history.snapshot().endpoints["crm"]["delivered"] == [0, 0, 0, 0, 0]
    assert len(history.snapshot(999).feed_messages) == 5


def test_a_new_endpoint_series_starts_at_zero_and_samples_in_one_second_add_up() -> None:
    clock = Clock()
    metrics = Metrics(clock)
    history = History(metrics, seconds=4, clock=clock)
    history.sample()
    clock.now += 1
    history.sample()
    delivered(metrics, "late", "retry", 1)
    history.sample()  # a counter born since the last sample counts from zero
    delivered(metrics, "late", "retry", 2)
    metrics.outbox_pending.labels(endpoint="late").set(5)
    history.sample()
    metrics.outbox_pending.labels(endpoint="late").set(3)
    history.sample()  # the same second again: depth keeps its peak
    snap = history.snapshot()
    assert snap.endpoints["late"]["failed"] == [0, 0, 0, 3]
    assert snap.endpoints["late"]["depth"] == [0, 0, 0, 5]
    assert snap.endpoints["late"]["delivered"] == [0, 0, 0, 0]


def test_an_hour_costs_fourteen_kib_a_series() -> None:
    metrics = Metrics()
    history = History(metrics)
    for name in ("a", "b", "c"):
        delivered(metrics, name, "success")
        delivered(metrics, name, "retry")
        metrics.outbox_pending.labels(endpoint=name).set(1)
    history.sample()
    assert history.nbytes == 10 * 3600 * 4  # feed + 3 series x 3 endpoints
    assert History(Metrics(), seconds=3600).snapshot().endpoints == {}
    with pytest.raises(ValueError):
        History(metrics, seconds=1)


async def test_run_samples_until_cancelled() -> None:
    metrics = Metrics()
    history = History(metrics, seconds=60)
    task = asyncio.create_task(history.run(interval=0.01))
    await asyncio.sleep(0.02)  # the first sample is the baseline
    metrics.feed_messages.inc(3)
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sum(history.snapshot().feed_messages) == 3
