"""Bad input never stops the relay (CONTRACT.md section 5), on both stores.

Whatever enters the store passes one boundary (``relay.events``); a store error one item
causes affects that item alone (``relay.isolation``). These tests feed hostile values past
each seam - the feed's frames, the store's append, quarantine and record, an endpoint's
response - against real SQLite and real PostgreSQL, the one that refuses NUL and long index
rows.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import secrets
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

from bench.procs import PG_URL
from relay.app import Ingest
from relay.config import EndpointConfig
from relay.dispatch import Dispatcher
from relay.errors import StoreError
from relay.events import USERS_FEED, BadFrame, Message, NewEvent, parse_frame, prepare
from relay.isolation import write_isolating
from relay.metrics import Metrics
from relay.receiver import Received, Receiver, Response
from relay.store import Store
from relay.store.base import AppendResult, Outcome, Target
from relay.store.postgres import PostgresStore
from relay.store.sqlite import SQLiteStore
from relay.transport import AiohttpSender, HttpxSender, Sender, SendResult

CRM = Target("crm")
TS = 1_717_005_327_995_988_841
NOW = 1_717_005_400.0
TOKEN = "2000611ea497d8ae4832c52166e0a26162cbb74716ab2662c50f8b47cdad3979"


def _pg_reachable() -> bool:
    async def probe() -> None:
        conn = await asyncpg.connect(PG_URL, timeout=3)
        await conn.close()

    try:
        asyncio.run(probe())
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
        return False
    return True


_PG = _pg_reachable()


@pytest_asyncio.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Any) -> AsyncIterator[Store]:
    """A fresh store of each kind, opened as the daemon opens it."""
    if request.param == "sqlite":
        sqlite = SQLiteStore(tmp_path / "relay.db")
        await sqlite.open(daemon=True)
        yield sqlite
        await sqlite.close()
        return
    if not _PG:
        pytest.skip(f"PostgreSQL unreachable at {PG_URL}")
    schema = f"relay_test_{secrets.token_hex(6)}"
    pg = PostgresStore(PG_URL, schema=schema, lease=7200.0, pool_size=2)
    await pg.open(daemon=True)
    try:
        yield pg
    finally:
        await pg.close()
        conn = await asyncpg.connect(PG_URL, timeout=5)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()


def frame(user_id: str, n: int, **payload: Any) -> str:
    body = {"user_id": user_id, "status": "PENDING", **payload}
    message = {"sequence": n, "recipient": USERS_FEED, "timestamp": TS + n, "payload": body}
    return json.dumps(message)


def event(user_id: str, n: int) -> NewEvent:
    message = parse_frame(frame(user_id, n))
    assert isinstance(message, Message)
    return prepare(message, seal_key=None)


def unchecked(user_id: str, n: int) -> NewEvent:
    """An event that skipped the boundary: what a store must never be the last line against."""
    good = event("u-template", n)
    body = good.body.replace(b"u-template", json.dumps(user_id)[1:-1].encode())
    return NewEvent(
        event_id=f"evt_unchecked_{n}",
        source="feed",
        recipient=USERS_FEED,
        user_id=user_id,
        status="PENDING",
        requirements=None,
        body=body,
        has_token=False,
    )


def ingest_for(store: Store, metrics: Metrics) -> Ingest:
    return Ingest(store, [CRM], metrics, None, on_stored=lambda: None, clock=lambda: NOW)


async def stored_ids(store: Store) -> list[str]:
    return [d.event_id for d in reversed(await store.list_deliveries(limit=1000))]


async def bad_frames(store: Store) -> list[tuple[str, str]]:
    """The quarantine, read through the store's own connection (either backend)."""
    if isinstance(store, SQLiteStore):
        return await store._run(
            lambda c: [(r[0], r[1]) for r in c.execute("SELECT reason, text FROM bad_frames")]
        )
    assert isinstance(store, PostgresStore)

    async def read(conn: Any) -> list[tuple[str, str]]:
        return [(r[0], r[1]) for r in await conn.fetch("SELECT reason, text FROM bad_frames")]

    return await store._run(read, tx=False)


def bad_count(metrics: Metrics) -> float:
    return metrics.registry.get_sample_value("relay_feed_bad_frames_total") or 0.0


# -- the feed's frames, through the boundary and ingest, into each store --------------------

HOSTILE = [
    frame("u\x00nul", 2),  # PostgreSQL: "invalid byte sequence" - the batch used to be lost
    frame("u" * 5000, 3),  # PostgreSQL: index row over its limit
    frame("u-deep", 4, nested=json.loads("[" * 200 + "]" * 200)),
    '{"user_id":"a\x00b" and then not JSON',  # quarantined text with a NUL in it
    frame("u-token", 5, user_token={"token": TOKEN}, bad="\x00"),
]


async def test_hostile_frames_are_quarantined_and_the_batch_is_stored(store: Store) -> None:
    metrics = Metrics()
    ingest = ingest_for(store, metrics)
    parsed = [parse_frame(f) for f in [frame("u-1", 1), *HOSTILE, frame("u-6", 6)]]
    good = [p for p in parsed if isinstance(p, Message)]
    for bad in (p for p in parsed if isinstance(p, BadFrame)):
        await ingest.on_bad_frame(bad)
    await ingest.on_messages(good)
    await ingest.flush()
    assert [m.user_id for m in good] == ["u-1", "u-token", "u-6"]
    assert len(await stored_ids(store)) == 3
    quarantined = await bad_frames(store)
    assert len(quarantined) == 4
    assert all("\x00" not in text and TOKEN not in text for _, text in quarantined)


async def test_an_event_the_store_refuses_is_quarantined_alone(store: Store) -> None:
    metrics = Metrics()
    ingest = ingest_for(store, metrics)
    batch = [event("u-1", 1), unchecked("u\x00x", 2), event("u-3", 3), event("u-4", 4)]
    if isinstance(store, SQLiteStore):  # SQLite takes NUL: make it refuse like PostgreSQL
        refusing = Refusing(store, lambda e: e.user_id is not None and "\x00" in e.user_id)
        ingest = ingest_for(refusing, metrics)  # type: ignore[arg-type]
    assert await ingest.append(batch) == 3
    assert await stored_ids(store) == [batch[0].event_id, batch[2].event_id, batch[3].event_id]
    [(reason, text)] = await bad_frames(store)
    assert reason.startswith("store refused the event:")
    assert "\x00" not in text and "\x00" not in reason
    assert bad_count(metrics) == 1


class Refusing:
    """A store that refuses, as a data error, any append holding an event ``bad`` picks."""

    def __init__(self, inner: Any, bad: Any, *, refuse_quarantine: int = 0) -> None:
        self._inner = inner
        self._bad = bad
        self.appends: list[int] = []
        self.refuse_quarantine = refuse_quarantine
        self.quarantined: list[BadFrame] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def append(
        self,
        events: Sequence[NewEvent],
        targets: Sequence[Target],
        now: float,
        *,
        take: Mapping[str, int] | None = None,
    ) -> AppendResult:
        self.appends.append(len(events))
        if any(self._bad(e) for e in events):
            raise StoreError("sqlite:///x: refused")
        result: AppendResult = await self._inner.append(events, targets, now, take=take)
        return result

    async def quarantine(self, frame: BadFrame, now: float) -> None:
        if self.refuse_quarantine:
            self.refuse_quarantine -= 1
            raise StoreError("sqlite:///x: refused")
        self.quarantined.append(frame)
        await self._inner.quarantine(frame, now)


async def test_bisection_stores_every_good_event_in_order(tmp_path: Any) -> None:
    inner = SQLiteStore(tmp_path / "relay.db")
    await inner.open(daemon=True)
    try:
        poison = {"u-3", "u-7"}
        store = Refusing(inner, lambda e: e.user_id in poison)
        metrics = Metrics()
        batch = [event(f"u-{n}", n) for n in range(10)]
        assert await ingest_for(store, metrics).append(batch) == 8  # type: ignore[arg-type]
        expected = [e.event_id for e in batch if e.user_id not in poison]
        assert await stored_ids(inner) == expected
        assert len(store.quarantined) == 2 and bad_count(metrics) == 2
        assert len(store.appends) < 2 * len(batch)  # halves, not one by one
    finally:
        await inner.close()


async def test_a_refused_quarantine_record_is_kept_sanitised_or_dropped(tmp_path: Any) -> None:
    inner = SQLiteStore(tmp_path / "relay.db")
    await inner.open(daemon=True)
    try:
        store = Refusing(inner, lambda e: False, refuse_quarantine=1)
        ingest = ingest_for(store, Metrics())  # type: ignore[arg-type]
        await ingest.on_bad_frame(BadFrame("odd \u00e9", "text \u00e9\x00"))
        assert store.quarantined == [BadFrame("odd \\xe9", "text \\xe9\ufffd")]
        store.refuse_quarantine = 2
        await ingest.on_bad_frame(BadFrame("dropped", "x"))  # logged, never raised
        assert len(store.quarantined) == 1
    finally:
        await inner.close()


async def test_write_isolating_passes_unavailability_through() -> None:
    from relay.errors import StoreUnavailableError

    async def down(items: Sequence[int]) -> None:
        raise StoreUnavailableError("down")

    async def refused(item: int, exc: Exception) -> None:
        raise AssertionError("not a refusal")

    with pytest.raises(StoreUnavailableError):
        await write_isolating([1, 2], down, refused)


# -- what endpoints answer, into each store ------------------------------------------------


class Answer:
    """A sender that answers every POST with one result (what the wire would have given)."""

    def __init__(self, result: SendResult) -> None:
        self.result = result

    async def post(
        self, url: str, body: bytes, headers: Mapping[str, str], timeout: float
    ) -> SendResult:
        return self.result

    async def close(self) -> None:
        return None


def crm() -> EndpointConfig:
    return EndpointConfig.model_validate(
        {
            "url": "http://crm.test/",
            "name": "crm",
            "secrets": ("whsec_" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldY",),
            "retry_schedule": (0.0, 3600.0),
        }
    )


async def run_until_recorded(store: Store, sender: Sender, n: int) -> list[Any]:
    dispatcher = Dispatcher(store, [crm()], sender, Metrics(), clock=lambda: NOW, idle_poll=0.02)
    task = asyncio.create_task(dispatcher.run())
    try:
        async with asyncio.timeout(10):
            while True:
                infos = await store.list_deliveries(limit=100)
                if sum(i.attempts for i in infos) >= n:
                    break
                await asyncio.sleep(0.01)
    finally:
        await dispatcher.shutdown(1.0)
        await asyncio.wait_for(task, 5)
    details = [await store.get_delivery(int(i.id[4:])) for i in infos]
    return [a for d in details if d is not None for a in d.attempts]


GZIP_PAGE = gzip.compress(b"<html>502 Bad Gateway</html>" + bytes(range(256)) * 8)


async def test_a_gzip_error_page_is_stored_without_control_characters(store: Store) -> None:
    await store.append([event("u-1", 1), event("u-2", 2)], [CRM], NOW)
    text = GZIP_PAGE.decode("utf-8", "replace")  # what a sender makes of the raw body
    attempts = await run_until_recorded(store, Answer(SendResult(502, 0.01, excerpt=text)), 2)
    assert len(attempts) == 2
    for attempt in attempts:
        assert attempt.status == 502
        assert attempt.excerpt
        assert not any(ord(c) < 32 or 127 <= ord(c) < 160 for c in attempt.excerpt)
        assert len(attempt.excerpt.encode()) <= 1024


async def test_a_result_the_store_refuses_is_recorded_without_its_details(
    tmp_path: Any,
) -> None:
    inner = SQLiteStore(tmp_path / "relay.db")
    await inner.open(daemon=True)

    class RefusesDetails:
        def __getattr__(self, name: str) -> Any:
            return getattr(inner, name)

        async def record(self, outcomes: Sequence[Outcome], now: float) -> None:
            if any(o.attempt is not None and o.attempt.excerpt for o in outcomes):
                raise StoreError("sqlite:///x: refused")
            await inner.record(outcomes, now)

    try:
        await inner.append([event("u-1", 1), event("u-2", 2)], [CRM], NOW)
        sender = Answer(SendResult(500, 0.01, excerpt="upstream down"))
        attempts = await run_until_recorded(RefusesDetails(), sender, 2)  # type: ignore[arg-type]
        assert [(a.status, a.excerpt) for a in attempts] == [(500, None), (500, None)]
        infos = await inner.list_deliveries(limit=10)
        assert {(i.state, i.attempts) for i in infos} == {("pending", 1)}
    finally:
        await inner.close()


@pytest.mark.parametrize("kind", ["aiohttp", "httpx"])
async def test_senders_ask_for_an_uncompressed_response(kind: str) -> None:
    seen: list[Received] = []

    def answer(received: Received) -> Response:
        seen.append(received)
        return Response(500, headers={"content-type": "text/plain"}, body=b"a\x00b" * 2000)

    sender: Sender = AiohttpSender() if kind == "aiohttp" else HttpxSender()
    try:
        async with Receiver(behaviour=answer) as receiver:
            result = await sender.post(
                receiver.url, b"{}", {"accept-encoding": "gzip"}, timeout=5.0
            )
    finally:
        await sender.close()
    assert seen[0].headers["accept-encoding"] == "identity"
    assert result.status == 500 and result.excerpt is not None
    # Twice the stored excerpt is read, so redaction sees a secret the 1 KiB cut would split.
    assert 1024 < len(result.excerpt.encode()) <= 2048
