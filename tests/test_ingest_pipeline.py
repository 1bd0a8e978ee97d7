"""Ingest commits one batch while the feed reads and prepares the next, and no more."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence

import pytest

from relay.app import Ingest
from relay.errors import StoreUnavailableError
from relay.events import USERS_FEED, BadFrame, Message, NewEvent, parse_frame
from relay.metrics import Metrics
from relay.store.base import AppendResult, Target


class GatedStore:
    """An IngestStore whose commits finish when the test says so (or fail as it says)."""

    takes = False

    def __init__(self) -> None:
        self.started: list[list[str]] = []
        self.committed: list[list[str]] = []
        self.gates: list[asyncio.Event] = []
        self.down = False

    async def append(
        self,
        events: Sequence[NewEvent],
        targets: Sequence[Target],
        now: float,
        *,
        take: Mapping[str, int] | None = None,
    ) -> AppendResult:
        ids = [e.event_id for e in events]
        self.started.append(ids)
        gate = asyncio.Event()
        self.gates.append(gate)
        await gate.wait()
        if self.down:
            raise StoreUnavailableError("sqlite:///relay.db: disk I/O error")
        self.committed.append(ids)
        return AppendResult(stored=list(events))

    async def quarantine(self, frame: BadFrame, now: float) -> None:
        raise AssertionError("nothing here is malformed")

    async def check_writable(self) -> None:
        return None

    def mark_subscribed(self, now: float) -> None:
        return None


def batch(*users: str) -> list[Message]:
    messages = []
    for n, user in enumerate(users):
        text = json.dumps(
            {
                "sequence": n,
                "recipient": USERS_FEED,
                "timestamp": 1_700_000_000_000_000_000 + n,
                "payload": {"user_id": user, "status": "PENDING"},
            }
        )
        message = parse_frame(text)
        assert isinstance(message, Message)
        messages.append(message)
    return messages


def ingest_over(store: GatedStore) -> tuple[Ingest, list[int]]:
    woken: list[int] = []
    ingest = Ingest(
        store, [Target("crm")], Metrics(), None, on_stored=lambda: woken.append(1), retry_delay=0
    )
    return ingest, woken


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_batch_commits_while_the_next_is_prepared_and_never_two_at_once() -> None:
    store = GatedStore()
    ingest, woken = ingest_over(store)
    await ingest.on_messages(batch("u-1", "u-2"))
    assert len(store.started) == 1  # handed to the store before on_messages returned
    assert store.committed == []
    second = asyncio.create_task(ingest.on_messages(batch("u-3")))
    await settle()
    assert not second.done()  # waits for the first commit: one batch in flight at most
    assert len(store.started) == 1
    store.gates[0].set()
    await second
    assert len(store.committed) == 1 and len(store.started) == 2
    store.gates[1].set()
    await ingest.flush()
    assert [len(ids) for ids in store.committed] == [2, 1]
    assert len(woken) == 2


async def test_flush_waits_for_the_last_commit_and_is_idempotent() -> None:
    store = GatedStore()
    ingest, _ = ingest_over(store)
    await ingest.flush()  # nothing in flight
    await ingest.on_messages(batch("u-1"))
    flushing = asyncio.create_task(ingest.flush())
    await settle()
    assert not flushing.done()
    store.gates[0].set()
    await flushing
    assert len(store.committed) == 1
    await ingest.flush()


async def test_a_write_waiting_for_the_store_holds_the_feed_and_abandon_cancels_it() -> None:
    store = GatedStore()
    store.down = True
    ingest, woken = ingest_over(store)
    await ingest.on_messages(batch("u-1"))
    store.gates[0].set()  # fails: unavailable, retried
    await settle()
    assert len(store.started) == 2 and ingest.store_ok is False
    held = asyncio.create_task(ingest.on_messages(batch("u-2")))
    await settle()
    assert not held.done()  # the feed reads nothing more while the store is down
    held.cancel()
    with pytest.raises(asyncio.CancelledError):
        await held
    await ingest.abandon()
    assert store.committed == [] and woken == []
    await ingest.flush()  # nothing left in flight


async def test_a_failed_write_is_raised_to_the_feed_not_lost() -> None:
    store = GatedStore()

    def broken_wake() -> None:
        raise RuntimeError("a bug after the commit")

    ingest = Ingest(store, [Target("crm")], Metrics(), None, on_stored=broken_wake)
    await ingest.on_messages(batch("u-1"))
    store.gates[0].set()
    with pytest.raises(RuntimeError, match="a bug after the commit"):
        await ingest.on_messages(batch("u-2"))  # the feed's next call: supervised, logged
    assert len(store.committed) == 1 and len(store.started) == 1
    await ingest.flush()  # the failed write was collected once
