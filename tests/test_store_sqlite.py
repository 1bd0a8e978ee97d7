"""The SQLite outbox: the shared store contract, plus what only a file-backed store has."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from relay.errors import StoreLockedError, StoreSchemaError, StoreUnavailableError
from relay.store.base import Store, Target
from relay.store.sqlite import DELIVERING_SLICE, MIGRATIONS, SQLiteStore

# The suite's plain asserts explain their failures too (it is imported, not collected).
pytest.register_assert_rewrite("store_suite")

from store_suite import (  # noqa: E402
    CRM,
    SEAL_KEY,
    TOKEN,
    USER_A,
    USER_B,
    VAULT,
    Reopen,
    StoreContract,
    bad_frame,
    balance_event,
    delivered,
    token_event,
    user_event,
    user_frame,
)

NOW = 1_717_005_400.0


class _Opened:
    """The store a test uses: ``reopen`` replaces it, teardown closes whichever is current."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.current: SQLiteStore | None = None

    async def open(self) -> SQLiteStore:
        store = SQLiteStore(self.path)
        await store.open(daemon=True)
        self.current = store
        return store

    async def reopen(self) -> Store:
        await self.close()
        return await self.open()

    async def close(self) -> None:
        if self.current is not None:
            store, self.current = self.current, None
            await store.close()


@pytest_asyncio.fixture
async def opened(tmp_path: Path) -> AsyncIterator[_Opened]:
    holder = _Opened(tmp_path / "relay.db")
    yield holder
    await holder.close()


@pytest_asyncio.fixture
async def store(opened: _Opened) -> SQLiteStore:
    """A fresh SQLite store opened as the daemon opens it; closed after the test."""
    return await opened.open()


@pytest.fixture
def reopen(opened: _Opened) -> Reopen:
    return opened.reopen


class TestSQLiteStore(StoreContract):
    """Every guarantee of the Store Protocol, on SQLite."""


@contextlib.asynccontextmanager
async def open_store(path: Path, *, daemon: bool, **options: float) -> AsyncIterator[SQLiteStore]:
    store = SQLiteStore(path, **options)
    await store.open(daemon=daemon)
    try:
        yield store
    finally:
        await store.close()


async def expect_open_error(path: Path, error: type[Exception], *, daemon: bool = True) -> str:
    store = SQLiteStore(path)
    try:
        with pytest.raises(error) as caught:
            await store.open(daemon=daemon)
    finally:
        await store.close()
    return str(caught.value)


def file_bytes(directory: Path) -> bytes:
    """Everything SQLite keeps on disk for the store: main file, WAL and shared memory."""
    return b"".join(p.read_bytes() for p in sorted(directory.glob("relay.db*")) if p.is_file())


# -- one daemon per file ----------------------------------------------------------------------


async def test_second_daemon_open_raises_store_locked(store: SQLiteStore, tmp_path: Path) -> None:
    message = await expect_open_error(tmp_path / "relay.db", StoreLockedError)

    assert "relay.db.lock" in message
    await store.check_writable()  # the first daemon is unaffected


async def test_daemon_lock_is_released_on_close(tmp_path: Path) -> None:
    path = tmp_path / "relay.db"
    async with open_store(path, daemon=True):
        pass

    async with open_store(path, daemon=True) as again:
        await again.check_writable()


async def test_non_daemon_open_beside_a_daemon_reads_and_leaves_its_claims(
    store: SQLiteStore, tmp_path: Path
) -> None:
    event = user_event(USER_A, 1)
    await store.append([event], [CRM], NOW)
    assert len(await store.claim("crm", NOW, 10)) == 1

    async with open_store(tmp_path / "relay.db", daemon=False) as cli:
        [info] = await cli.list_deliveries()
        assert info.event_id == event.event_id
        assert await cli.replay(state="dead", now=NOW) == 0

    assert await store.claim("crm", NOW + 3600, 10) == []  # still in flight for the daemon


# -- schema -----------------------------------------------------------------------------------


async def test_fresh_store_records_its_schema_version(store: SQLiteStore, tmp_path: Path) -> None:
    with contextlib.closing(sqlite3.connect(tmp_path / "relay.db")) as conn:
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()

    assert row == (str(len(MIGRATIONS)),)


async def test_newer_schema_version_raises_schema_error(tmp_path: Path) -> None:
    path = tmp_path / "relay.db"
    async with open_store(path, daemon=True):
        pass
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute(
            "UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(len(MIGRATIONS) + 1),)
        )
        conn.commit()

    # Twice as the daemon: a failed open must not keep the lock (no StoreLockedError).
    for daemon in (True, True, False):
        message = await expect_open_error(path, StoreSchemaError, daemon=daemon)
        assert "upgrade" in message


# -- store unavailable ------------------------------------------------------------------------


async def test_open_where_the_directory_is_a_file_raises_unavailable(tmp_path: Path) -> None:
    # Root ignores file modes, so a read-only directory cannot be simulated by chmod here;
    # a regular file where the store's directory should be fails the same way for everyone.
    blocker = tmp_path / "data"
    blocker.write_text("not a directory")

    for daemon in (True, False):
        await expect_open_error(blocker / "relay.db", StoreUnavailableError, daemon=daemon)


async def test_writes_raise_unavailable_while_the_file_cannot_be_written(tmp_path: Path) -> None:
    path = tmp_path / "relay.db"
    async with open_store(path, daemon=True, busy_timeout=0.05) as store:
        blocker = sqlite3.connect(path, isolation_level=None)
        try:
            blocker.execute("BEGIN IMMEDIATE")
            with pytest.raises(StoreUnavailableError):
                await store.check_writable()
            with pytest.raises(StoreUnavailableError):
                await store.append([user_event(USER_A, 1)], [], NOW)
            assert await store.list_deliveries() == []  # reads still work
        finally:
            blocker.rollback()
            blocker.close()

        await store.check_writable()  # the store is back
        result = await store.append([user_event(USER_A, 1)], [], NOW)
        assert (len(result.stored), result.duplicates) == (1, 0)  # the failed one rolled back


async def test_after_a_full_disk_the_wal_is_emptied_before_the_next_write(tmp_path: Path) -> None:
    path, wal = tmp_path / "relay.db", tmp_path / "relay.db-wal"
    async with open_store(path, daemon=True) as store:
        for n in range(1, 41):  # one commit each, as a feed at a low rate makes them
            await store.append([user_event(USER_A, n)], [CRM], NOW)
        grown = wal.stat().st_size

        def cap(pages: int | None) -> Callable[[sqlite3.Connection], None]:
            # SQLite's own SQLITE_FULL, as from a full disk: the file may not grow.
            def run(conn: sqlite3.Connection) -> None:
                limit = pages or conn.execute("PRAGMA page_count").fetchone()[0]
                conn.execute(f"PRAGMA max_page_count = {limit}")

            return run

        await store._run(cap(None))
        with pytest.raises(StoreUnavailableError, match="full"):
            await store.append([user_event(f"user-{n}", 1) for n in range(2000)], [CRM], NOW)
        await store._run(cap(1 << 30))  # space returns

        result = await store.append([user_event(USER_A, 41)], [CRM], NOW)
        assert len(result.stored) == 1
        assert wal.stat().st_size < grown / 4, (grown, wal.stat().st_size)
        assert len(await store.list_deliveries()) == 41  # nothing lost on the way


async def test_failed_open_releases_the_daemon_lock(tmp_path: Path) -> None:
    path = tmp_path / "relay.db"
    path.mkdir()  # something in the way: SQLite cannot open a directory
    store = SQLiteStore(path)
    try:
        with pytest.raises(StoreUnavailableError):
            await store.open(daemon=True)
        path.rmdir()  # the problem is fixed; the relay retries

        await store.open(daemon=True)
        await store.check_writable()
    finally:
        await store.close()


# -- secrets on disk --------------------------------------------------------------------------


@pytest.mark.parametrize("seal_key", [None, SEAL_KEY], ids=["stripped", "sealed"])
async def test_user_token_never_reaches_the_file_in_plaintext(
    tmp_path: Path, seal_key: bytes | None
) -> None:
    path = tmp_path / "relay.db"
    events = [token_event(USER_A, n, seal_key=seal_key) for n in (1, 2)]
    async with open_store(path, daemon=True) as store:
        await store.append(events, [CRM, VAULT], NOW)
        await store.quarantine(bad_frame(), NOW)
        claims = await store.claim("vault", NOW, 10)
        live = file_bytes(tmp_path)  # WAL not yet checkpointed
        assert claims

    at_rest = file_bytes(tmp_path)
    for data in (live, at_rest):
        assert USER_A.encode() in data  # we are reading the right files
        assert TOKEN.encode() not in data
        assert TOKEN[:16].encode() not in data
    assert user_frame(USER_A, 1, token=True).encode() not in at_rest


async def test_quarantined_frame_is_kept_redacted(store: SQLiteStore, tmp_path: Path) -> None:
    frame = bad_frame()

    await store.quarantine(frame, NOW)

    with contextlib.closing(sqlite3.connect(tmp_path / "relay.db")) as conn:
        rows = conn.execute("SELECT at, reason, text FROM bad_frames").fetchall()
    assert rows == [(NOW, frame.reason, frame.text)]
    assert "[redacted]" in rows[0][2]
    assert TOKEN not in rows[0][2]


async def test_sqlite_ignores_subscriptions_one_feed_is_in_order(tmp_path: Path) -> None:
    """RELAY_REORDER_WINDOW is for replicas sharing PostgreSQL; SQLite has one feed."""
    async with open_store(tmp_path / "relay.db", daemon=True) as store:
        store.mark_subscribed(NOW)
        await store.append([user_event(USER_A, 1)], [CRM], NOW)
        assert len(await store.claim("crm", NOW, 10)) == 1


async def test_store_files_are_readable_by_their_owner_only(tmp_path: Path) -> None:
    old = os.umask(0o022)  # the usual umask, under which SQLite creates files 0644
    try:
        store = SQLiteStore(tmp_path / "relay.db")
        await store.open(daemon=True)
        try:
            await store.check_writable()  # a write: the -wal and -shm files exist now
            files = [tmp_path / n for n in ("relay.db", "relay.db-wal", "relay.db-shm")]
            modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in files}
        finally:
            await store.close()
    finally:
        os.umask(old)
    assert modes == {"relay.db": 0o600, "relay.db-wal": 0o600, "relay.db-shm": 0o600}


async def test_while_the_dispatcher_works_a_batch_commits_in_slices(
    store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A claim or verdict then waits for one slice on the store's thread, not a whole batch;
    with nothing being delivered a feed batch stays one commit (and one fsync)."""
    commits: list[int] = []
    fsynced: list[bool] = []
    append = store._append

    def counting(conn: sqlite3.Connection, **kw: Any) -> Any:
        commits.append(len(kw["events"]))
        fsynced.append(kw["durable"])
        return append(conn, **kw)

    monkeypatch.setattr(store, "_append", counting)
    first = [user_event(f"u-{n}", n) for n in range(DELIVERING_SLICE + 50)]
    result = await store.append(first, [CRM], NOW)
    assert commits == [len(first)] and len(result.stored) == len(first)

    assert await store.claim("crm", NOW + 60, 10)  # the dispatcher found work just now
    commits.clear()
    second = [user_event(f"u-{n}", 1000 + n) for n in range(2 * DELIVERING_SLICE + 1)]
    result = await store.append([*second, second[0]], [CRM], NOW)
    assert commits == [DELIVERING_SLICE, DELIVERING_SLICE, 2]
    assert fsynced == [True, False, False, True]  # the last commit makes its batch durable
    assert [e.event_id for e in result.stored] == [e.event_id for e in second]
    assert result.duplicates == 1  # counted across slices


# -- taking fresh deliveries in the commit that stores them -----------------------------------


async def test_a_commit_takes_the_heads_of_lanes_due_now_up_to_what_it_may(
    store: SQLiteStore,
) -> None:
    """Taken: in flight, with all a delivery needs; a lane's next event waits, another
    endpoint's deliveries stay for the claim, and so does what is over the limit."""
    a1, a2 = user_event(USER_A, 1), user_event(USER_A, 2, status="VERIFIED")
    b1, loose = user_event(USER_B, 3), balance_event(4)
    result = await store.append([a1, a2, b1, loose], [CRM, VAULT], NOW, take={"crm": 2})

    taken = {c.event_id: c for c in result.taken}
    assert set(taken) == {a1.event_id, b1.event_id}  # heads, oldest deliveries first
    claim = taken[a1.event_id]
    assert (claim.endpoint, claim.user_id, claim.attempts) == ("crm", USER_A, 0)
    assert claim.source == "feed"
    assert (claim.body, claim.has_token, claim.created_at) == (a1.body, False, NOW)
    assert result.claimable  # the balance event for crm, everything for vault
    assert [c.event_id for c in await store.claim("crm", NOW, 10)] == [loose.event_id]
    assert len(await store.claim("vault", NOW, 10)) == 3

    await store.record([delivered(claim, NOW + 1)], NOW + 1)  # a taken delivery is a claim
    assert [c.event_id for c in await store.claim("crm", NOW + 1, 10)] == [a2.event_id]


async def test_a_commit_that_took_every_pending_delivery_says_none_is_left(
    store: SQLiteStore,
) -> None:
    a1, a2 = user_event(USER_A, 1), user_event(USER_A, 2, status="VERIFIED")
    result = await store.append([a1, a2], [CRM], NOW, take={"crm": 10})
    assert ([c.event_id for c in result.taken], result.claimable) == ([a1.event_id], False)

    untaken = await store.append([user_event(USER_B, 3)], [CRM], NOW)
    assert (untaken.taken, untaken.claimable) == ([], True)


async def test_a_commit_takes_nothing_not_due_yet(store: SQLiteStore) -> None:
    slow = Target("slow", first_delay=30.0)
    result = await store.append([user_event(USER_A, 1)], [slow], NOW, take={"slow": 5})
    assert (result.taken, result.claimable) == ([], True)  # the claim loop must learn when


async def test_an_older_event_later_in_the_batch_is_taken_instead_of_the_newer(
    store: SQLiteStore,
) -> None:
    """Taken after the whole batch is placed: the older event took the untouched newer
    one's place, as it would have before any claim."""
    newer, older = user_event(USER_A, 2, status="VERIFIED"), user_event(USER_A, 1)
    result = await store.append([newer, older], [CRM], NOW, take={"crm": 10})
    assert [c.event_id for c in result.taken] == [older.event_id]


async def test_what_a_batch_may_take_is_shared_by_its_slices(store: SQLiteStore) -> None:
    assert await store.claim("crm", NOW, 10) == []
    store._delivered_at = float("inf")  # the dispatcher is busy: the batch goes in slices
    events = [user_event(f"u-{n}", n) for n in range(2 * DELIVERING_SLICE + 1)]
    result = await store.append(events, [CRM], NOW, take={"crm": DELIVERING_SLICE + 7})
    assert len(result.taken) == DELIVERING_SLICE + 7
    assert len({c.delivery_id for c in result.taken}) == DELIVERING_SLICE + 7
    assert len(await store.claim("crm", NOW, 1000)) == DELIVERING_SLICE - 6


async def test_a_batch_takes_in_its_last_commit_so_a_failed_slice_leaves_none_in_flight(
    store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store._delivered_at = float("inf")  # the dispatcher is busy: the batch goes in slices
    append = store._append
    calls: list[bool] = []

    def failing_last(conn: sqlite3.Connection, **kw: Any) -> Any:
        calls.append(kw["take"] is not None)
        if len(calls) == 3:
            raise StoreUnavailableError("sqlite:///x: disk I/O error")
        return append(conn, **kw)

    monkeypatch.setattr(store, "_append", failing_last)
    events = [user_event(f"u-{n}", n) for n in range(2 * DELIVERING_SLICE + 1)]
    with pytest.raises(StoreUnavailableError):
        await store.append(events, [CRM], NOW, take={"crm": 50})
    assert calls == [False, False, True]
    # The two committed slices' deliveries wait for a claim, none stranded in flight.
    assert len(await store.claim("crm", NOW, 1000)) == 2 * DELIVERING_SLICE


async def test_an_older_event_in_a_later_slice_is_taken_instead_of_the_newer(
    store: SQLiteStore,
) -> None:
    store._delivered_at = float("inf")
    filler = [user_event(f"u-{n}", n) for n in range(DELIVERING_SLICE - 1)]
    newer, older = user_event(USER_A, 1000, status="VERIFIED"), user_event(USER_A, 999)
    result = await store.append([*filler, newer, older], [CRM], NOW, take={"crm": 1000})
    taken = {c.event_id for c in result.taken}
    assert older.event_id in taken and newer.event_id not in taken
