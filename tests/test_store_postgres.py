"""The PostgreSQL outbox: the shared store contract, plus what replicas sharing one store need.

Runs against the server at ``SFOX_RELAY_TEST_PG`` (default ``postgresql://postgres@127.0.0.1:5432/
test``); skipped when it is unreachable. Every test works in a fresh schema, dropped afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import secrets
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

from bench.procs import PG_URL
from relay.app import Ingest
from relay.codec import loads
from relay.errors import StoreError, StoreSchemaError, StoreUnavailableError
from relay.events import reconcile_event
from relay.metrics import Metrics
from relay.store import open_store, sql
from relay.store import postgres as pg
from relay.store.base import Claim, Outcome, Store
from relay.store.postgres import MIGRATIONS, PostgresStore, display_url

pytest.register_assert_rewrite("store_suite")

from store_suite import (  # noqa: E402
    CRM,
    USER_A,
    USER_B,
    USER_C,
    VAULT,
    VERIFIED_REQ,
    Reopen,
    StoreContract,
    balance_event,
    claim_one,
    delivered,
    detail,
    everything,
    released,
    rest_user,
    retry,
    user_event,
)

NOW = 1_717_005_400.0
#: The suite's clock is injected, so a long lease costs no waiting; it must exceed the hour
#: ``test_claim_marks_deliveries_in_flight`` waits while expecting its claims to hold.
SUITE_LEASE = 7200.0


def _unreachable() -> str | None:
    async def probe() -> None:
        conn = await asyncpg.connect(PG_URL, timeout=3)
        await conn.close()

    try:
        asyncio.run(probe())
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        return (
            f"PostgreSQL unreachable at {display_url(PG_URL)} ({type(exc).__name__}); "
            "set SFOX_RELAY_TEST_PG to a server these tests may create schemas in"
        )
    return None


_SKIP = _unreachable()
if _SKIP is not None:
    pytest.skip(_SKIP, allow_module_level=True)

pytestmark = pytest.mark.postgres


# -- fixtures ---------------------------------------------------------------------------------


class Replicas:
    """Stores on one schema, as replicas would open them; all closed at teardown."""

    def __init__(self, schema: str) -> None:
        self.schema = schema
        self.stores: list[PostgresStore] = []
        self.current: PostgresStore | None = None
        self.watchers: list[asyncio.Task[None]] = []

    def new(self, *, lease: float = SUITE_LEASE, **options: Any) -> PostgresStore:
        options.setdefault("pool_size", 4)
        store = PostgresStore(PG_URL, schema=self.schema, lease=lease, **options)
        self.stores.append(store)
        return store

    async def open(self, *, daemon: bool = True, **options: Any) -> PostgresStore:
        store = self.new(**options)
        await store.open(daemon=daemon)
        return store

    async def reopen(self) -> Store:
        """What a restarted daemon does: a new store object (and replica name), same data."""
        if self.current is not None:
            await self.current.close()
        self.current = await self.open()
        return self.current

    def watch(self, store: PostgresStore, wake: Callable[[], None]) -> None:
        """Run ``store.watch(wake)`` until teardown, as the daemon's supervisor would."""
        self.watchers.append(asyncio.create_task(store.watch(wake)))

    async def close(self) -> None:
        for task in self.watchers:
            task.cancel()
        for task in self.watchers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for store in self.stores:
            await store.close()


@pytest_asyncio.fixture
async def schema() -> AsyncIterator[str]:
    name = f"relay_test_{secrets.token_hex(6)}"
    yield name
    conn = await asyncpg.connect(PG_URL, timeout=5)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
    finally:
        await conn.close()


@pytest_asyncio.fixture
async def replicas(schema: str) -> AsyncIterator[Replicas]:
    holder = Replicas(schema)
    yield holder
    await holder.close()


@pytest_asyncio.fixture
async def store(replicas: Replicas) -> PostgresStore:
    """A fresh PostgreSQL store opened as the daemon opens it; closed after the test."""
    replicas.current = await replicas.open()
    return replicas.current


@pytest.fixture
def reopen(replicas: Replicas) -> Reopen:
    return replicas.reopen


@pytest_asyncio.fixture
async def db(schema: str) -> AsyncIterator[asyncpg.Connection[asyncpg.Record]]:
    """A plain connection to the test's schema, to look behind the Protocol."""
    conn = await asyncpg.connect(PG_URL, timeout=5, server_settings={"search_path": schema})
    yield conn
    await conn.close()


class TestPostgresStore(StoreContract):
    """Every guarantee of the Store Protocol, on PostgreSQL."""

    crash_recovery_after = SUITE_LEASE


def application_name(store: PostgresStore, role: str = "") -> str:
    """How a store's connections (pool, ``listen``, ``reconcile``) show in pg_stat_activity."""
    return f"sfox-relay {store.replica}{' ' + role if role else ''}"[:63]


async def wait_for(event: asyncio.Event, timeout: float = 5.0) -> None:
    await asyncio.wait_for(event.wait(), timeout)


# -- several replicas on one store ------------------------------------------------------------


async def test_replicas_appending_the_same_batch_store_each_event_once(
    replicas: Replicas,
) -> None:
    stores = [await replicas.open() for _ in range(3)]

    for rnd in range(5):  # several rounds: each race may go another way
        base = 10 * rnd
        batch = [user_event(u, base + n) for n, u in enumerate((USER_A, USER_B, USER_C), 1)]
        batch += [balance_event(base + n) for n in range(4, 8)]
        results = await asyncio.gather(*(s.append(batch, [CRM, VAULT], NOW) for s in stores))
        assert sum(len(r.stored) for r in results) == 7
        assert sum(r.duplicates for r in results) == 14

    deliveries = await everything(stores[0])
    assert len(deliveries) == 5 * 7 * 2
    assert len({(d.endpoint, d.event_id) for d in deliveries}) == len(deliveries)


async def test_replicas_never_leave_two_active_deliveries_in_a_lane(
    replicas: Replicas, db: asyncpg.Connection[asyncpg.Record]
) -> None:
    rounds = 30
    stores = [await replicas.open() for _ in range(3)]
    users = [USER_A, USER_B, USER_C]
    numbers = itertools.count(1)
    rng = random.Random(7)
    sent: dict[tuple[str, str | None], list[str]] = {}
    stop = asyncio.Event()
    violations: list[Any] = []

    async def watch() -> None:
        while not stop.is_set():
            rows = await db.fetch(
                "SELECT endpoint, user_id, count(*) FROM deliveries "
                "WHERE state IN ('pending', 'inflight') AND user_id IS NOT NULL "
                "GROUP BY endpoint, user_id HAVING count(*) > 1"
            )
            violations.extend(rows)
            await asyncio.sleep(0)

    def verdict(claim: Claim, now: float) -> Outcome:
        roll = rng.random()
        if roll < 0.15:
            return retry(claim, now, next_at=now)
        if roll < 0.25:
            return released(claim, now)
        sent.setdefault((claim.endpoint, claim.user_id), []).append(claim.event_id)
        return delivered(claim, now)

    async def work(store: PostgresStore, now: float, append: bool) -> None:
        if append:
            batch = [user_event(rng.choice(users), next(numbers)) for _ in range(3)]
            await store.append(batch, [CRM, VAULT], now)
        for endpoint in ("crm", "vault"):
            claims = await store.claim(endpoint, now, 10)
            await store.record([verdict(c, now) for c in claims], now)

    watcher = asyncio.create_task(watch())
    try:
        for step in range(rounds):
            await asyncio.gather(*(work(s, NOW + step, True) for s in stores))
        for step in range(rounds, rounds + 200):  # drain
            await asyncio.gather(*(work(s, NOW + step, False) for s in stores))
            if not await everything(stores[0], state="pending"):
                break
    finally:
        stop.set()
        await watcher

    assert violations == []
    infos = await everything(stores[0])
    assert len(infos) == rounds * 3 * 3 * 2  # rounds, replicas, events, endpoints
    # Replicas append concurrently, so an event may be stored after a newer one of its user
    # was delivered: that one is superseded, never sent out of order.
    assert {i.state for i in infos} <= {"delivered", "superseded"}
    ts = {
        r["event_id"]: loads(r["body"])["timestamp"]
        for r in await db.fetch("SELECT event_id, body FROM events")
    }
    for lane, event_ids in sent.items():
        stamps = [ts[e] for e in event_ids]
        assert stamps == sorted(stamps), lane
    for info in infos:
        if info.state == "superseded":
            newer = sent[(info.endpoint, info.user_id)]
            assert max(ts[e] for e in newer) > ts[info.event_id]


async def test_an_earlier_event_stored_later_by_another_replica_goes_first(
    replicas: Replicas,
) -> None:
    """The measured race (section 7): B, subscribed between a user's two events, stores the
    later one; A stores the earlier one only afterwards. Store order alone sent VERIFIED
    before PENDING."""
    a, b = await replicas.open(), await replicas.open()
    pending, verified = user_event(USER_A, 1), user_event(USER_A, 2, status="VERIFIED")
    await b.append([verified], [CRM], NOW)
    await a.append([pending, verified], [CRM], NOW + 0.1)

    first = await claim_one(b, "crm", NOW + 0.2)
    assert first.event_id == pending.event_id
    await b.record([delivered(first, NOW + 0.3)], NOW + 0.3)
    assert (await claim_one(a, "crm", NOW + 0.3)).event_id == verified.event_id


async def test_a_replica_holds_what_it_stores_within_its_reorder_window(
    replicas: Replicas,
) -> None:
    """Without the window B's dispatcher claims the later event before A has stored the
    earlier one, which then comes too late (superseded, never sent)."""
    a, b = await replicas.open(), await replicas.open(reorder_window=1.0)
    pending, verified = user_event(USER_A, 1), user_event(USER_A, 2, status="VERIFIED")
    b.mark_subscribed(NOW)
    await b.append([verified], [CRM], NOW + 0.2)  # due at NOW + 1.2

    assert await b.claim("crm", NOW + 0.3, 10) == []
    await a.append([pending], [CRM], NOW + 0.4)
    first = await claim_one(b, "crm", NOW + 0.5)
    assert first.event_id == pending.event_id
    await b.record([delivered(first, NOW + 0.6)], NOW + 0.6)
    assert await a.claim("crm", NOW + 0.7, 10) == []  # still held
    assert (await claim_one(a, "crm", NOW + 1.2)).event_id == verified.event_id


async def test_the_reorder_window_holds_only_feed_events_of_users_after_a_subscription(
    replicas: Replicas,
) -> None:
    store = await replicas.open(reorder_window=1.0)
    await store.append([user_event(USER_A, 1)], [CRM], NOW)  # never subscribed: no hold
    store.mark_subscribed(NOW + 10)
    await store.append([user_event(USER_B, 2), balance_event(3)], [CRM], NOW + 10.5)
    await store.append([user_event(USER_C, 4)], [CRM], NOW + 11)  # the window is over

    due = sorted(info.next_attempt_at or 0 for info in await everything(store))
    assert due == [NOW, NOW + 10.5, NOW + 11, NOW + 11.5]


async def test_ingest_tells_the_store_when_the_feed_subscribed(replicas: Replicas) -> None:
    store = await replicas.open(reorder_window=1.5)
    ingest = Ingest(
        store, [CRM], Metrics(lambda: NOW), None, on_stored=lambda: None, clock=lambda: NOW
    )

    await ingest.on_subscribed()
    await ingest.append([user_event(USER_A, 1)])

    (info,) = await everything(store)
    assert info.next_attempt_at == NOW + 1.5


async def test_claims_from_replicas_never_hand_out_a_delivery_twice(replicas: Replicas) -> None:
    stores = [await replicas.open() for _ in range(3)]
    await stores[0].append([balance_event(n) for n in range(1, 601)], [CRM], NOW)
    handed: list[list[int]] = [[], [], []]

    async def drain(index: int) -> None:
        empty = 0
        while empty < 3:
            claims = await stores[index].claim("crm", NOW, 25)
            handed[index].extend(c.delivery_id for c in claims)
            empty = 0 if claims else empty + 1

    await asyncio.gather(*(drain(i) for i in range(3)))

    every = [d for ids in handed for d in ids]
    assert len(every) == len(set(every)) == 600
    assert all(handed), [len(ids) for ids in handed]  # the work was shared


async def test_in_flight_delivery_is_taken_over_after_the_lease(replicas: Replicas) -> None:
    crashed, other = await replicas.open(lease=10.0), await replicas.open(lease=10.0)
    a1, a2 = user_event(USER_A, 1), user_event(USER_A, 2, status="VERIFIED")
    await crashed.append([a1, a2], [CRM], NOW)
    lost = await claim_one(crashed, "crm", NOW)
    await crashed.close()  # died mid-delivery

    early = await other.claim("crm", NOW + 9.9, 10)
    assert (early, early.next_due) == ([], NOW + 10.0)  # the lease, then A2 behind it
    taken = await claim_one(other, "crm", NOW + 10.0)
    assert (taken.delivery_id, taken.event_id, taken.attempts) == (lost.delivery_id, a1.event_id, 0)
    assert await other.claim("crm", NOW + 15.0, 10) == []  # renewed for the new owner; A2 waits

    await other.record([delivered(taken, NOW + 16.0)], NOW + 16.0)
    assert (await claim_one(other, "crm", NOW + 16.0)).event_id == a2.event_id


async def test_verdicts_of_a_replica_whose_claim_was_taken_over_are_ignored(
    replicas: Replicas,
) -> None:
    slow, other = await replicas.open(lease=10.0), await replicas.open(lease=10.0)
    a1, a2 = user_event(USER_A, 1), user_event(USER_A, 2, status="VERIFIED")
    await slow.append([a1, a2], [CRM], NOW)
    late = await claim_one(slow, "crm", NOW)
    taken = await claim_one(other, "crm", NOW + 10.0)

    await slow.record([delivered(late, NOW + 11.0)], NOW + 11.0)
    await slow.record([released(late, NOW + 11.0)], NOW + 11.0)

    found = await detail(other, taken.delivery_id)
    assert (found.info.state, found.info.attempts, found.attempts) == ("pending", 0, [])
    assert await other.claim("crm", NOW + 11.0, 10) == []  # not released, A2 not promoted
    stats = {s.endpoint: s for s in await other.endpoint_stats()}
    assert stats["crm"].delivered == 0

    await other.record([retry(taken, NOW + 12.0, next_at=NOW + 20.0)], NOW + 12.0)
    await slow.record([delivered(late, NOW + 13.0)], NOW + 13.0)  # still not its claim
    found = await detail(other, taken.delivery_id)
    assert (found.info.attempts, [a.status for a in found.attempts]) == (1, [503])


async def test_reconciled_events_racing_on_one_user_state_store_one(replicas: Replicas) -> None:
    stores = [await replicas.open() for _ in range(3)]
    feed = user_event(USER_A, 1)
    await stores[0].append([feed], [CRM], NOW)
    rivals = [
        reconcile_event(rest_user(USER_A, status, VERIFIED_REQ), after=feed.event_id, now_ns=n)
        for n, status in enumerate(("VERIFIED", "UNSUPPORTED", "REJECTED"), 1)
    ]

    results = await asyncio.gather(
        *(s.append([event], [CRM], NOW + 1) for s, event in zip(stores, rivals, strict=True))
    )

    assert sum(len(r.stored) for r in results) == 1
    assert sum(r.stale for r in results) == 2
    [winner] = [r.stored[0] for r in results if r.stored]
    assert (await stores[1].user_states())[USER_A].event_id == winner.event_id


async def test_concurrent_opens_migrate_once(
    replicas: Replicas, db: asyncpg.Connection[asyncpg.Record]
) -> None:
    stores = [replicas.new() for _ in range(3)]

    await asyncio.gather(*(s.open(daemon=True) for s in stores))

    rows = await db.fetch("SELECT version, applied_by FROM schema_migrations ORDER BY version")
    assert [r["version"] for r in rows] == list(range(1, len(MIGRATIONS) + 1))
    assert {r["applied_by"] for r in rows} <= {s.replica for s in stores}
    version = await db.fetchval("SELECT value FROM meta WHERE key = 'schema_version'")
    assert version == str(len(MIGRATIONS))
    for store in stores:
        await store.check_writable()


async def test_newer_schema_version_raises_schema_error(
    replicas: Replicas, db: asyncpg.Connection[asyncpg.Record]
) -> None:
    await (await replicas.open()).close()
    await db.execute(
        "UPDATE meta SET value = $1 WHERE key = 'schema_version'", str(len(MIGRATIONS) + 1)
    )

    for daemon in (True, False):
        store = replicas.new()
        with pytest.raises(StoreSchemaError, match="upgrade"):
            await store.open(daemon=daemon)
        await store.close()

    await db.execute(
        "UPDATE meta SET value = $1 WHERE key = 'schema_version'", str(len(MIGRATIONS))
    )
    await store.open(daemon=True)  # the relay retries once the cause is gone
    await store.check_writable()


async def test_a_read_only_open_never_writes(
    replicas: Replicas, db: asyncpg.Connection[asyncpg.Record]
) -> None:
    """`relay check` opens the store read-only: no schema, no migration, no write at all."""
    absent = replicas.new(read_only=True)
    with pytest.raises(StoreError, match="no relay store"):
        await absent.open(daemon=False)
    await absent.close()
    assert await db.fetchval("SELECT to_regclass('meta')") is None

    await (await replicas.open()).close()
    store = await replicas.open(daemon=False, read_only=True)
    assert await store.endpoint_stats() == []
    with pytest.raises(StoreError):
        await store.check_writable()


async def test_pg_schema_is_created_once_and_used(schema: str) -> None:
    """RELAY_PG_SCHEMA, wired through open_store: the tables live in that schema."""
    url_store = open_store(PG_URL, schema=schema + "_x")
    await url_store.open(daemon=False)
    await url_store.close()
    conn = await asyncpg.connect(PG_URL, timeout=5)
    try:
        found = await conn.fetchval(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = $1 "
            "AND table_name = 'deliveries'",
            schema + "_x",
        )
        assert found == 1
    finally:
        await conn.execute(f'DROP SCHEMA "{schema}_x" CASCADE')
        await conn.close()


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://relay:hunter2-secret@127.0.0.1:1/test",
        "postgres://relay@127.0.0.1:1/test?password=hunter2-secret",
    ],
    ids=["userinfo", "query"],
)
async def test_unreachable_server_raises_unavailable_without_the_password(url: str) -> None:
    store = PostgresStore(url, timeout=2.0)
    assert "hunter2" not in store.display
    try:
        with pytest.raises(StoreUnavailableError) as caught:
            await store.open(daemon=True)
    finally:
        await store.close()

    message = str(caught.value)
    assert "hunter2" not in message
    assert "***" in message
    assert "127.0.0.1:1" in message


async def test_operations_before_open_fail_clearly() -> None:
    store = PostgresStore(PG_URL)
    with pytest.raises(StoreError, match="not open"):
        await store.claim("crm", NOW, 10)


async def test_store_recovers_when_its_connections_are_cut(
    store: PostgresStore, db: asyncpg.Connection[asyncpg.Record]
) -> None:
    await store.append([user_event(USER_A, 1)], [CRM], NOW)
    cut = await db.fetch(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
        application_name(store),
    )
    assert cut

    async def works() -> bool:
        try:
            await store.check_writable()
        except StoreUnavailableError:  # what the relay sees while the store is down
            return False
        return True

    for _ in range(50):
        if await works():
            break
        await asyncio.sleep(0.05)
    assert await works()
    assert len(await store.claim("crm", NOW, 10)) == 1


# -- wake-ups and the reconciliation lock -----------------------------------------------------


async def listening(replicas: Replicas, store: PostgresStore) -> asyncio.Event:
    """Watch ``store`` for wake-ups and wait until its listener is up (it wakes once then)."""
    woke = asyncio.Event()
    replicas.watch(store, woke.set)
    await wait_for(woke)
    woke.clear()
    return woke


async def test_notify_wakes_other_replicas_when_work_becomes_due(replicas: Replicas) -> None:
    writer, reader = await replicas.open(), await replicas.open()
    woke = await listening(replicas, reader)
    own = await listening(replicas, writer)
    a1, a2 = user_event(USER_A, 1), user_event(USER_A, 2, status="VERIFIED")

    await writer.append([a1, a2], [CRM], NOW)
    await wait_for(woke)

    woke.clear()
    first = await claim_one(writer, "crm", NOW)
    await writer.record([delivered(first, NOW + 1)], NOW + 1)  # promotes A2
    await wait_for(woke)

    second = await claim_one(writer, "crm", NOW + 1)
    await writer.record([delivered(second, NOW + 2)], NOW + 2)  # the lane is free again
    woke.clear()
    assert await writer.replay(ids=[first.delivery_id], now=NOW + 3) == 1
    await wait_for(woke)

    await asyncio.sleep(0.2)
    assert not own.is_set()  # a replica's own commits wake its dispatcher directly


async def test_watching_needs_an_open_store(replicas: Replicas) -> None:
    with pytest.raises(StoreError):
        await replicas.new().watch(lambda: None)


async def test_listener_reconnects_after_losing_its_connection(
    replicas: Replicas, db: asyncpg.Connection[asyncpg.Record]
) -> None:
    writer, reader = await replicas.open(), await replicas.open(liveness=0.1)
    woke = await listening(replicas, reader)

    cut = await db.fetch(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
        application_name(reader, "listen"),
    )
    assert cut
    await wait_for(woke)  # back, and woken for whatever it may have missed
    woke.clear()

    await writer.append([balance_event(1)], [CRM], NOW)
    await wait_for(woke)


async def test_reconcile_lock_is_held_by_one_replica_at_a_time(replicas: Replicas) -> None:
    first, second = await replicas.open(), await replicas.open()

    async with first.reconcile_lock() as mine:
        assert mine
        async with second.reconcile_lock() as theirs:
            assert not theirs
        async with first.reconcile_lock() as again:
            assert not again  # a second reconciliation in the same process waits too

    async with second.reconcile_lock() as theirs:
        assert theirs


async def test_reconcile_lock_is_released_when_its_holder_dies(
    replicas: Replicas, db: asyncpg.Connection[asyncpg.Record]
) -> None:
    first, second = await replicas.open(), await replicas.open()

    async with first.reconcile_lock() as mine:
        assert mine
        await db.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
            application_name(first, "reconcile"),
        )
        for _ in range(50):
            async with second.reconcile_lock() as theirs:
                if theirs:
                    break
            await asyncio.sleep(0.02)
        assert theirs


# -- hot paths --------------------------------------------------------------------------------


async def test_a_claim_says_when_pending_retries_and_running_leases_come_due(
    store: PostgresStore,
) -> None:
    assert (await store.claim("crm", NOW, 10)).next_due is None
    await store.append([balance_event(1), balance_event(2)], [CRM, VAULT], NOW)
    first = await store.claim("crm", NOW, 1)
    assert (len(first), first.next_due) == (1, None)  # full: more may be due now
    await store.record([retry(first[0], NOW + 1, next_at=NOW + 300)], NOW + 1)

    second = await store.claim("crm", NOW + 1, 10)
    assert (len(second), second.next_due) == (1, NOW + 300)
    vault = await store.claim("vault", NOW + 5, 1)
    assert (len(vault), vault.next_due) == (1, None)
    assert (await store.claim("vault", NOW + 5, 10)).next_due == NOW + 5 + SUITE_LEASE


async def plan(conn: asyncpg.Connection[asyncpg.Record], sql: str, *args: Any) -> str:
    """The plan PostgreSQL picks when it must use an index wherever one serves."""
    async with conn.transaction():
        await conn.execute("SET LOCAL enable_seqscan = off")
        rows = await conn.fetch("EXPLAIN " + sql, *args)
    return "\n".join(r[0] for r in rows)


async def test_hot_paths_read_partial_indexes_not_the_history(
    store: PostgresStore, db: asyncpg.Connection[asyncpg.Record]
) -> None:
    claim = await plan(db, pg._CLAIM, "crm", NOW, 64, "r", 60.0)
    assert "deliveries_due" in claim
    assert "deliveries_leased" in claim
    record = await plan(
        db,
        pg._APPLY,
        "r",
        [1],
        ["delivered"],
        [NOW],
        [NOW],
        [200],
        [0.1],
        [None],
        [None],
        [1],
        NOW,
    )
    assert "deliveries_pkey" in record
    lanes = await plan(db, sql.lane_rows("= ANY($1::text[])"), [USER_A])
    assert "deliveries_lane" in lanes  # the partial index of active rows
    locks = await plan(db, pg._LOCK_USERS_OF, [1, 2])
    assert "user_locks_pkey" in locks
    pending = await plan(
        db,
        "SELECT endpoint, COUNT(*), MIN(created_at) FROM deliveries "
        "WHERE state IN ('waiting', 'pending', 'inflight') GROUP BY endpoint",
    )
    assert "deliveries_lane" in pending
    purge = await plan(db, pg._PURGE_DELIVERIES, NOW, NOW, 100)
    assert "deliveries_done" in purge
    assert "deliveries_dead" in purge
    orphans = await plan(db, pg._PURGE_EVENTS, NOW, 100)
    assert "events_received" in orphans
    for text in (claim, record, lanes, locks, pending, purge, orphans):
        assert "Seq Scan" not in text, text


# -- wiring -----------------------------------------------------------------------------------


def test_open_store_builds_a_postgres_store_with_the_lease() -> None:
    for url in ("postgresql://relay:pw@db.internal:5432/relay", "postgres://relay:pw@db/relay"):
        built = open_store(url, lease=90.0)
        assert isinstance(built, PostgresStore)
        assert built.lease == 90.0
        assert "pw" not in built.display.replace("postgres", "")


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://relay:s3cret@db:5432/relay", "postgresql://relay:***@db:5432/relay"),
        ("postgresql://relay@db/relay", "postgresql://relay@db/relay"),
        ("postgresql://db/relay?password=s3cret&sslmode=require", None),
        ("postgresql://:s3cret@db/relay", "postgresql://:***@db/relay"),
    ],
)
def test_display_url_masks_passwords(url: str, shown: str | None) -> None:
    masked = display_url(url)
    assert "s3cret" not in masked
    if shown is not None:
        assert masked == shown
    else:
        assert masked == "postgresql://db/relay?password=***&sslmode=require"
