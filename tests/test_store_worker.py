"""The store's worker thread: urgent calls first, none starved, errors to the caller."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import pytest

from relay.store.worker import Priority, Worker


def _gate(worker: Worker) -> threading.Event:
    """Hold the worker's thread until the returned event is set (so calls queue up)."""
    release = threading.Event()
    worker.submit(Priority.DELIVERY, release.wait)
    return release


def _recorder(ran: list[str], name: str) -> Callable[[], str]:
    def call() -> str:
        ran.append(name)
        return name

    return call


def test_urgent_calls_go_first_and_each_priority_keeps_its_order() -> None:
    worker = Worker("test-worker", patience=60.0)
    ran: list[str] = []
    release = _gate(worker)
    futures = [
        worker.submit(Priority.INGEST, _recorder(ran, "ingest-1")),
        worker.submit(Priority.OTHER, _recorder(ran, "other-1")),
        worker.submit(Priority.DELIVERY, _recorder(ran, "claim-1")),
        worker.submit(Priority.INGEST, _recorder(ran, "ingest-2")),
        worker.submit(Priority.DELIVERY, _recorder(ran, "claim-2")),
    ]
    release.set()
    assert [f.result(timeout=5) for f in futures] == [
        "ingest-1",
        "other-1",
        "claim-1",
        "ingest-2",
        "claim-2",
    ]
    assert ran == ["claim-1", "claim-2", "other-1", "ingest-1", "ingest-2"]
    worker.shutdown()


def test_a_call_waiting_past_its_patience_goes_before_newer_urgent_ones() -> None:
    clock = [0.0]
    worker = Worker("test-worker", patience=0.05, clock=lambda: clock[0])
    ran: list[str] = []
    release = _gate(worker)
    worker.submit(Priority.INGEST, _recorder(ran, "ingest"))
    clock[0] = 0.03
    worker.submit(Priority.OTHER, _recorder(ran, "other"))
    clock[0] = 0.1  # both overdue now: the oldest first
    last = worker.submit(Priority.DELIVERY, _recorder(ran, "claim"))
    release.set()
    last.result(timeout=5)
    assert ran == ["ingest", "other", "claim"]
    worker.shutdown()


async def test_results_and_errors_reach_the_awaiting_caller() -> None:
    worker = Worker("test-worker")

    def boom() -> None:
        raise ValueError("no such table")

    assert await worker.run(Priority.OTHER, lambda: 42) == 42
    with pytest.raises(ValueError, match="no such table"):
        await worker.run(Priority.INGEST, boom)
    assert await worker.run(Priority.DELIVERY, lambda: "still serving") == "still serving"
    worker.shutdown()


def test_shutdown_runs_what_is_queued_then_refuses_more() -> None:
    worker = Worker("test-worker")
    ran: list[str] = []
    release = _gate(worker)
    queued = worker.submit(Priority.INGEST, _recorder(ran, "last batch"))
    stopper = threading.Thread(target=worker.shutdown)
    stopper.start()
    release.set()
    stopper.join(5)
    assert queued.result(timeout=0) == "last batch"
    with pytest.raises(RuntimeError, match="shut down"):
        worker.submit(Priority.OTHER, lambda: None)


async def test_a_cancelled_call_is_skipped() -> None:
    worker = Worker("test-worker")
    ran: list[str] = []
    release = _gate(worker)
    waiting = asyncio.ensure_future(worker.run(Priority.OTHER, _recorder(ran, "cancelled")))
    await asyncio.sleep(0)
    waiting.cancel()
    await asyncio.sleep(0)
    release.set()
    assert await worker.run(Priority.OTHER, _recorder(ran, "next")) == "next"
    assert ran == ["next"]
    worker.shutdown()
