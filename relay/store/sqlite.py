"""The embedded outbox: one SQLite file in WAL mode, one daemon per file.

All SQL runs on one dedicated thread with one connection, so calls are serialised without
locks and the event loop never blocks on disk. Group commits: a batch of frames is one
transaction, a page of claims one statement, a batch of outcomes one transaction.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TypeVar, Unpack

import orjson

from relay.errors import StoreError, StoreLockedError, StoreSchemaError, StoreUnavailableError
from relay.events import BadFrame, NewEvent
from relay.store import core, records, sql
from relay.store.records import HealthRow, HealthWrite
from relay.store.worker import Priority, Worker

__all__ = ["MIGRATIONS", "SQLiteStore"]

T = TypeVar("T")
log = logging.getLogger("relay.store")

#: Forward-only schema migrations; index + 1 is the version each one produces.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        event_id TEXT NOT NULL UNIQUE,
        source TEXT NOT NULL,
        recipient TEXT NOT NULL,
        user_id TEXT,
        status TEXT,
        requirements TEXT,
        body BLOB NOT NULL,
        has_token INTEGER NOT NULL,
        received_at REAL NOT NULL
    );
    CREATE TABLE deliveries (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        event_seq INTEGER NOT NULL REFERENCES events(seq),
        endpoint TEXT NOT NULL,
        user_id TEXT,
        ord INTEGER NOT NULL,
        state TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_at REAL NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        last_status INTEGER,
        last_error TEXT
    );
    CREATE INDEX deliveries_due ON deliveries(endpoint, next_at) WHERE state = 'pending';
    CREATE INDEX deliveries_lane ON deliveries(endpoint, user_id, ord, created_at)
        WHERE state IN ('waiting', 'pending', 'inflight');
    CREATE INDEX deliveries_dead ON deliveries(endpoint, id) WHERE state = 'dead';
    CREATE INDEX deliveries_user ON deliveries(user_id);
    CREATE INDEX deliveries_event ON deliveries(event_seq);
    CREATE TABLE attempts (
        delivery_id INTEGER NOT NULL,
        n INTEGER NOT NULL,
        at REAL NOT NULL,
        status INTEGER,
        latency REAL NOT NULL,
        error TEXT,
        excerpt TEXT,
        PRIMARY KEY (delivery_id, n)
    ) WITHOUT ROWID;
    CREATE TABLE user_state (
        user_id TEXT PRIMARY KEY,
        status TEXT,
        requirements TEXT,
        event_id TEXT,
        source TEXT NOT NULL,
        updated_at REAL NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE endpoint_health (
        endpoint TEXT PRIMARY KEY,
        delivered_total INTEGER NOT NULL DEFAULT 0,
        last_success_at REAL,
        last_failure_at REAL,
        last_error TEXT
    ) WITHOUT ROWID;
    CREATE TABLE bad_frames (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at REAL NOT NULL,
        reason TEXT NOT NULL,
        text TEXT NOT NULL
    );
    """,
    # v2: retention walks finished deliveries and old events by time, never the history.
    """
    CREATE INDEX deliveries_finished ON deliveries(state, updated_at)
        WHERE state IN ('delivered', 'superseded', 'dead');
    CREATE INDEX events_received ON events(received_at);
    """,
    # v3: one index per user instead of two. Lanes are looked up by (endpoint, user) and an
    # operator filters by user; a user has a handful of deliveries, so one full index on
    # user_id first serves both, and a state change (claim, verdict) no longer rewrites a
    # partial index. Two random-key indexes per insert were the larger part of a commit.
    """
    DROP INDEX deliveries_user;
    DROP INDEX deliveries_lane;
    CREATE INDEX deliveries_lane ON deliveries(user_id, endpoint, ord, created_at);
    """,
    # v4: lanes follow sFOX's timestamp (ts, then ord); feed_ts makes older feed events
    # stale once a newer one is delivered; a replayed delivery is never superseded;
    # high_ts is the newest key a user's events reached (reconciled events go after it).
    # Rows from before keep their store order (ts 0).
    """
    ALTER TABLE deliveries ADD COLUMN ts INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE deliveries ADD COLUMN feed_ts INTEGER;
    ALTER TABLE deliveries ADD COLUMN replayed INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE user_state ADD COLUMN high_ts INTEGER NOT NULL DEFAULT 0;
    """,
    # v5: endpoint health (CONTRACT.md 5b, 5c): one state row per endpoint, feed and dead
    # alert throttle, versioned for compare-and-set; replicas' heartbeats (rate-limit shares).
    """
    CREATE TABLE health (
        kind TEXT NOT NULL,
        name TEXT NOT NULL,
        state TEXT NOT NULL,
        version INTEGER NOT NULL,
        data TEXT NOT NULL,
        updated_at REAL NOT NULL,
        PRIMARY KEY (kind, name)
    ) WITHOUT ROWID;
    CREATE TABLE replicas (name TEXT PRIMARY KEY, seen_at REAL NOT NULL) WITHOUT ROWID;
    """,
)

_UNAVAILABLE = (
    "readonly",
    "disk is full",
    "disk i/o error",
    "unable to open",
    "database is locked",
    "no such table",  # the file was replaced or truncated under us
)

#: Both stores insert events one run at a time; here one row at a time, for its seq.
_INSERT_EVENT = """
    INSERT INTO events (event_id, source, recipient, user_id, status, requirements, body,
        has_token, received_at)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT (event_id) DO NOTHING
    RETURNING seq
"""

_UPSERT_USER_STATE = sql.upsert_user_states("VALUES (?, ?, ?, ?, ?, ?, ?)")

_INSERT_DELIVERY = sql.insert_deliveries("VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7, ?8, ?9)")

#: Events per commit while the dispatcher uses the store (else a feed batch is one commit):
#: live delivery while the feed was stored went from 0.33x to 1x of the rate after (bench),
#: ingest alone stays at full batches.
DELIVERING_SLICE = 100
#: The dispatcher "uses the store" when it claimed or recorded something this recently (s).
_DELIVERING_LATELY = 0.25

#: Repeated verbatim so SQLite can use the partial index ``deliveries_finished``.
_FINISHED = "state IN ('delivered', 'superseded', 'dead')"


def _each(conn: sqlite3.Connection, statement: str, rows: Iterable[Sequence[object]]) -> int:
    """Run ``statement`` once per row; the rows changed.

    Never ``executemany``: it gives up the GIL at each row in a way that, while the event loop
    is busy (the feed being stored), waits a whole switch interval to get it back. 500 rows
    took 13 s that way, 3 ms as single executes (Python 3.11, measured beside a busy loop).
    """
    changed = 0
    for row in rows:
        changed += conn.execute(statement, row).rowcount
    return changed


#: ``IN`` a list given as one JSON array parameter (:func:`_listed`): one statement text
#: whatever the list's length, so it is prepared once; ``IN (?, ?, ...)`` was a new
#: statement for every length, prepared again on each commit once the cache had churned.
_IN_LIST = "IN (SELECT value FROM json_each(?))"


def _listed(values: Iterable[str | int]) -> tuple[str]:
    """The parameter of :data:`_IN_LIST`."""
    return (orjson.dumps(list(values)).decode(),)


def _claim(among: str = "") -> str:
    """Mark in flight up to ``?3`` pending deliveries of endpoint ``?2`` due at ``?1``
    (``among``: a further condition), oldest due first, returning what a claim needs."""
    return (
        "UPDATE deliveries SET state = 'inflight', updated_at = ?1 WHERE id IN ("
        "SELECT id FROM deliveries WHERE state = 'pending' AND endpoint = ?2 "
        f"AND next_at <= ?1 {among}ORDER BY next_at, id LIMIT ?3) "
        "RETURNING id, event_seq, user_id, attempts, created_at"
    )


_CLAIM = _claim()
#: The same among the deliveries of the events ``?4`` (a JSON array of their seqs).
_TAKE = _claim(f"AND event_seq {_IN_LIST.replace('?', '?4')} ")


class _Checkpointer:
    """Copies the WAL into the database file on its own thread and connection.

    Inline auto-checkpoints ran on the store's one thread, copying megabytes and fsyncing in
    the middle of a claim or a commit: tens of milliseconds of delivery latency each time.
    A PASSIVE checkpoint here never blocks the store's readers or writers.
    """

    def __init__(self, path: Path, interval: float = 1.0) -> None:
        self._path = path
        self._interval = interval
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="relay-checkpoint", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        try:
            conn = sqlite3.connect(self._path, timeout=5.0, isolation_level=None)
        except sqlite3.Error:
            log.exception("checkpointer could not open the store", extra={"event": "store.wal"})
            return
        try:
            while not self._stopping.wait(self._interval):
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                except sqlite3.Error as exc:
                    log.warning(
                        "WAL checkpoint failed; will retry",
                        extra={"event": "store.wal", "error": str(exc)},
                    )
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        except sqlite3.Error:
            pass  # the store is closing; the next open checkpoints
        finally:
            conn.close()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=10)


class SQLiteStore:
    """The SQLite outbox (``RELAY_STORE=sqlite:///path``)."""

    takes = True

    def __init__(
        self, path: str | os.PathLike[str], *, busy_timeout: float = 5.0, read_only: bool = False
    ) -> None:
        """``read_only`` (`relay check`): open an existing store without writing or creating
        anything, not even a migration; an absent or older store is a StoreError."""
        self.path = Path(path)
        self._read_only = read_only
        self.display = f"sqlite:///{self.path}"
        self._busy_timeout = busy_timeout
        self._worker = Worker("relay-sqlite")
        self._conn: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        self._closed = False
        self._durable = True
        self._checkpointer: _Checkpointer | None = None
        self._disk_was_full = False
        self._delivered_at = -1e9  # monotonic: the last claim that found work, or verdicts

    # -- plumbing ---------------------------------------------------------------------------

    async def _run(
        self, fn: Callable[[sqlite3.Connection], T], priority: Priority = Priority.OTHER
    ) -> T:
        return await self._worker.run(priority, lambda: self._call(fn))

    def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._conn is None:
            raise StoreError("store is not open")
        if self._disk_was_full:
            self._reclaim_wal(self._conn)
        try:
            return fn(self._conn)
        except sqlite3.OperationalError as exc:
            if self._conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.rollback()
            text = str(exc).lower()
            if "disk is full" in text:
                self._disk_was_full = True
            if any(marker in text for marker in _UNAVAILABLE):
                raise StoreUnavailableError(f"{self.display}: {exc}") from exc
            raise StoreError(f"{self.display}: {exc}") from exc
        except sqlite3.DatabaseError as exc:
            if self._conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.rollback()
            raise StoreError(f"{self.display}: {exc}") from exc

    def _reclaim_wal(self, conn: sqlite3.Connection) -> None:
        """After a full disk, empty the WAL before writing again.

        The WAL then holds committed frames that could not be copied into the database file
        (it could not grow), and new commits only append to it: once space returns, the
        backlog the feed and the dispatcher had held would refill the disk before the next
        periodic checkpoint. A TRUNCATE checkpoint copies the frames and gives the WAL's
        space back first; until it completes, writes keep failing as unavailable.
        """
        try:
            busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        except sqlite3.Error:
            return
        if not busy:
            self._disk_was_full = False
            log.info("WAL emptied after the disk filled", extra={"event": "store.wal"})

    @contextlib.contextmanager
    def _tx(
        self, conn: sqlite3.Connection, *, durable: bool = True
    ) -> Iterator[sqlite3.Connection]:
        """One write transaction.

        ``durable`` commits are fsynced (new events, replays, everything an operator did).
        Claims and verdicts skip the fsync: they survive a process crash like every commit in
        WAL mode, and a power cut at worst re-sends a delivery, which at-least-once allows.
        A later durable commit fsyncs them too.
        """
        if durable != self._durable:
            conn.execute(f"PRAGMA synchronous = {'FULL' if durable else 'NORMAL'}")
            self._durable = durable
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.rollback()
            raise
        conn.commit()

    # -- lifecycle --------------------------------------------------------------------------

    async def open(self, *, daemon: bool) -> None:
        await self._worker.run(Priority.OTHER, lambda: self._open(daemon))

    def _open(self, daemon: bool) -> None:
        if self._read_only:
            self._open_read_only()
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if daemon:
                self._take_lock()
            self._create_private()
            conn = sqlite3.connect(
                self.path, timeout=self._busy_timeout, isolation_level=None, check_same_thread=False
            )
        except OSError as exc:
            self._close()
            raise StoreUnavailableError(f"{self.display}: {exc.strerror or exc}") from exc
        except sqlite3.Error as exc:
            self._close()
            raise StoreUnavailableError(f"{self.display}: {exc}") from exc
        conn.row_factory = sqlite3.Row
        self._conn = conn
        try:
            self._call(self._setup)
            if daemon:
                self._checkpointer = _Checkpointer(self.path)
                conn.execute("PRAGMA wal_autocheckpoint = 0")  # the checkpointer's job now
                # Claims of a previous daemon that died: back to pending (no attempt used).
                self._call(
                    lambda c: c.execute(
                        "UPDATE deliveries SET state = 'pending' WHERE state = 'inflight'"
                    )
                )
        except BaseException:
            self._close()
            raise

    def _create_private(self) -> None:
        """Create the database file readable by its owner only, before SQLite does (0644).

        SQLite gives the ``-wal`` and ``-shm`` files the database file's permissions, so
        they are owner-only too. An existing file is left as it is.
        """
        with contextlib.suppress(FileExistsError):
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))

    def _open_read_only(self) -> None:
        if not self.path.is_file():
            raise StoreError(f"{self.display}: no such store")
        # Without a WAL (no daemon running) "immutable" creates no -wal/-shm files either.
        wal = Path(f"{self.path}-wal").exists()
        uri = f"{self.path.resolve().as_uri()}?{'mode=ro' if wal else 'immutable=1'}"
        try:
            conn = sqlite3.connect(
                uri,
                uri=True,
                timeout=self._busy_timeout,
                isolation_level=None,
                check_same_thread=False,
            )
        except sqlite3.Error as exc:
            raise StoreUnavailableError(f"{self.display}: {exc}") from exc
        conn.row_factory = sqlite3.Row
        self._conn = conn

        def version(conn: sqlite3.Connection) -> int:
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            return int(row[0]) if row else 0

        try:
            found = self._call(version)
        except StoreError:
            self._close()
            raise StoreError(f"{self.display}: not a relay store") from None
        if found != len(MIGRATIONS):
            self._close()
            newer = found > len(MIGRATIONS)
            raise (StoreSchemaError if newer else StoreError)(
                f"{self.display} has schema version {found}; this relay knows "
                f"{len(MIGRATIONS)} ({'upgrade sfox-relay' if newer else 'relay run migrates it'})"
            )

    def _take_lock(self) -> None:
        fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreLockedError(
                f"{self.display} is in use by another relay run (lock {self.path}.lock); "
                "run one daemon per SQLite store, or use PostgreSQL for several replicas"
            ) from None
        self._lock_fd = fd

    def _setup(self, conn: sqlite3.Connection) -> None:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = OFF")
        conn.execute("PRAGMA journal_size_limit = 67108864")
        with self._tx(conn):
            conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            version = int(row[0]) if row else 0
            if version > len(MIGRATIONS):
                raise StoreSchemaError(
                    f"{self.display} has schema version {version}, newer than this relay knows "
                    f"({len(MIGRATIONS)}); upgrade sfox-relay"
                )
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                for statement in script.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(
                    "INSERT INTO meta (key, value) VALUES ('schema_version', ?) "
                    "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (str(number),),
                )

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._worker.run(Priority.INGEST, self._close)  # after whatever is queued
        self._worker.shutdown()

    def _close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.stop()
            self._checkpointer = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    async def check_writable(self) -> None:
        def write(conn: sqlite3.Connection) -> None:
            with self._tx(conn):
                conn.execute(
                    "INSERT INTO meta (key, value) VALUES ('heartbeat', '1') "
                    "ON CONFLICT (key) DO UPDATE SET value = value + 1"
                )

        await self._run(write)

    # -- ingest -----------------------------------------------------------------------------

    async def append(
        self,
        events: Sequence[NewEvent],
        targets: Sequence[records.Target],
        now: float,
        *,
        take: Mapping[str, int] | None = None,
    ) -> records.AppendResult:
        """One commit, or, while the dispatcher is using the store, one per slice of
        :data:`DELIVERING_SLICE` events: a claim or a verdict then waits for a slice (a few
        milliseconds), never for a whole batch. Each event commits with its deliveries; only
        the last slice's commit is fsynced, which makes the WAL durable up to it: the batch is
        durable when this returns, as one commit would be, and a crash before that loses
        nothing that was reported stored (a process crash loses no commit in WAL mode).

        ``take``: the last commit marks in flight, after everything else, the batch's new
        deliveries due now that it may (those that came out pending: the heads of their
        lanes, an older event of the batch having taken a newer one's place whatever slice
        either was in), so that a fresh event goes out without a claim of its own (two
        handoffs between the event loop and this thread, and a commit). A slice that fails
        leaves nothing in flight."""
        results: list[records.AppendResult] = []
        fresh: list[tuple[int, NewEvent]] = []  # (seq, event) stored by the slices so far
        rest = events
        while rest:
            busy = time.monotonic() - self._delivered_at < _DELIVERING_LATELY
            size = DELIVERING_SLICE if busy else len(rest)
            part, rest = rest[:size], rest[size:]
            write = functools.partial(
                self._append,
                events=part,
                targets=targets,
                now=now,
                durable=not rest,
                fresh=fresh,
                take=take if not rest else None,
            )
            results.append(await self._run(write, Priority.INGEST))
        return records.AppendResult.merged(results)

    def mark_subscribed(self, now: float) -> None:
        """One feed per store: its events arrive in sFOX's order, nothing to wait for."""

    def _append(
        self,
        conn: sqlite3.Connection,
        events: Sequence[NewEvent],
        targets: Sequence[records.Target],
        now: float,
        durable: bool = True,
        fresh: list[tuple[int, NewEvent]] | None = None,
        take: Mapping[str, int] | None = None,
    ) -> records.AppendResult:
        """``fresh``: the batch's (seq, event) stored by earlier commits, extended with this
        one's on success; ``take`` covers them all."""
        stored: list[NewEvent] = []
        new_here: list[tuple[int, NewEvent]] = []
        pending = 0  # deliveries the batch's commits made pending (new, or lanes settled)
        superseded: Counter[str] = Counter()
        stale = duplicates = 0
        with self._tx(conn, durable=durable):
            for run in core.segments(events):
                users = sorted({e.user_id for e in run if e.user_id is not None})
                states = {
                    row["user_id"]: core.state_row(row)
                    for row in conn.execute(
                        f"SELECT {sql.USER_STATE_COLUMNS} FROM user_state WHERE user_id {_IN_LIST}",
                        _listed(users),
                    )
                }
                new: list[tuple[int, NewEvent]] = []
                for event in run:
                    if core.is_stale(event, states.get(event.user_id or "")):
                        stale += 1
                        continue
                    row = conn.execute(_INSERT_EVENT, (*core.event_row(event), now)).fetchone()
                    if row is None:
                        duplicates += 1
                        continue
                    new.append((row[0], event))
                    stored.append(event)
                new_here += new
                plan = core.fan_out(new, targets, states, now)
                superseded.update(plan.superseded)
                _each(
                    conn,
                    _UPSERT_USER_STATE,
                    [(*s.values(), now) for s in plan.states],
                )
                rows, delivered = self._heads(conn, users, plan)
                placed, changes, moved = core.place(plan.deliveries, rows, delivered, now)
                superseded.update(moved)
                pending += sum(d.state == core.DeliveryState.PENDING for d in placed)
                pending += sum(c.state == core.DeliveryState.PENDING for c in changes)
                _each(
                    conn,
                    _INSERT_DELIVERY,
                    [
                        (
                            d.seq,
                            d.endpoint,
                            d.user_id,
                            d.seq,
                            d.state.value,
                            d.next_at,
                            now,
                            d.ts,
                            d.feed_ts,
                        )
                        for d in placed
                    ],
                )
                self._apply(conn, changes, now)
            batch = [*(fresh or ()), *new_here]
            taken = self._take(conn, batch, take, now) if take and batch else []
        if fresh is not None:
            fresh += new_here
        return records.AppendResult(
            stored, duplicates, stale, dict(superseded), taken, claimable=pending > len(taken)
        )

    def _take(
        self,
        conn: sqlite3.Connection,
        fresh: Sequence[tuple[int, NewEvent]],
        take: Mapping[str, int],
        now: float,
    ) -> list[records.Claim]:
        """Mark in flight up to ``take[endpoint]`` deliveries of these new events that are
        due now, as a claim would (after every run of the batch is placed, so that an older
        event later in the batch could still take a newer one's place)."""
        events = dict(fresh)
        seqs = _listed(events)
        claims: list[records.Claim] = []
        for endpoint, limit in take.items():
            for row in conn.execute(_TAKE, (now, endpoint, limit, *seqs)).fetchall():
                event = events[row["event_seq"]]
                joined = {
                    **row,
                    "event_id": event.event_id,
                    "source": event.source,
                    "body": event.body,
                    "has_token": event.has_token,
                }
                claims.append(core.claim(joined, endpoint))
        if claims:
            self._delivered_at = time.monotonic()
        claims.sort(key=lambda c: c.delivery_id)
        return claims

    @staticmethod
    def _heads(
        conn: sqlite3.Connection, users: Sequence[str], plan: core.FanOut
    ) -> tuple[list[core.LaneRow], dict[core.Lane, int]]:
        """What :func:`core.place` needs: each lane's head, its waiting rows where a new
        delivery may overtake the head, the newest delivered timestamp where one is late."""
        rows = SQLiteStore._rows(conn, users, sql.HEAD_STATES)
        rows += SQLiteStore._rows(conn, core.overtaking(plan.deliveries, rows), sql.WAITING_STATES)
        if not plan.late:
            return rows, {}
        high = conn.execute(sql.delivered_high(_IN_LIST), _listed(plan.late))
        return rows, core.delivered_high(high)

    @staticmethod
    def _rows(conn: sqlite3.Connection, users: Sequence[str], states: str) -> list[core.LaneRow]:
        if not users:
            return []
        found = conn.execute(sql.lane_rows(_IN_LIST, states), _listed(users))
        return [core.lane_row(row) for row in found]

    @staticmethod
    def _apply(conn: sqlite3.Connection, changes: Sequence[core.Change], now: float) -> None:
        _each(
            conn,
            sql.for_sqlite(sql.SETTLE),
            [(c.state.value, c.next_at, now, c.id, c.was) for c in changes],
        )

    def _settle(
        self,
        conn: sqlite3.Connection,
        users: Sequence[str],
        now: float,
        delivered: Mapping[core.Lane, int],
        only: set[core.Lane] | None = None,
    ) -> Counter[str]:
        """Apply :func:`core.settle` to these users' lanes (``only``: to these lanes, whose
        head is gone, by their waiting rows); superseded counts per endpoint."""
        if only is None:
            rows = self._rows(conn, users, core.ACTIVE_SQL)
        else:
            found = self._rows(conn, users, sql.WAITING_STATES)
            rows = [r for r in found if (r.endpoint, r.user_id) in only]
        changes = core.settle(rows, now, delivered)
        self._apply(conn, changes, now)
        return core.superseded(changes)

    async def quarantine(self, frame: BadFrame, now: float) -> None:
        def insert(conn: sqlite3.Connection) -> None:
            with self._tx(conn):
                conn.execute(
                    "INSERT INTO bad_frames (at, reason, text) VALUES (?, ?, ?)",
                    (now, frame.reason, frame.text),
                )

        await self._run(insert, Priority.INGEST)

    # -- dispatch ---------------------------------------------------------------------------

    async def claim(self, endpoint: str, now: float, limit: int) -> records.Claimed:
        def claim(conn: sqlite3.Connection) -> records.Claimed:
            with self._tx(conn, durable=False):
                rows = conn.execute(_CLAIM, (now, endpoint, limit)).fetchall()
                next_due = None
                if len(rows) < limit:
                    next_due = conn.execute(
                        "SELECT MIN(next_at) FROM deliveries "
                        "WHERE state = 'pending' AND endpoint = ?",
                        (endpoint,),
                    ).fetchone()[0]
                if not rows:
                    return records.Claimed((), next_due)
                self._delivered_at = time.monotonic()
                seqs = sorted({row["event_seq"] for row in rows})
                bodies = {
                    e["seq"]: e
                    for e in conn.execute(
                        "SELECT seq, event_id, source, body, has_token FROM events "
                        f"WHERE seq {_IN_LIST}",
                        _listed(seqs),
                    )
                }
            claims = [core.claim({**row, **bodies[row["event_seq"]]}, endpoint) for row in rows]
            claims.sort(key=lambda c: c.delivery_id)
            return records.Claimed(claims, next_due)

        return await self._run(claim, Priority.DELIVERY)

    async def record(self, outcomes: Sequence[records.Outcome], now: float) -> dict[str, int]:
        return await self._run(lambda c: self._record(c, outcomes, now), Priority.DELIVERY)

    def _record(
        self, conn: sqlite3.Connection, outcomes: Sequence[records.Outcome], now: float
    ) -> dict[str, int]:
        # Set-wise where it can: this runs for every delivery, so per-row Python work here
        # competes with the event loop for the GIL.
        released = [
            (out.next_at, now, out.delivery_id)
            for out in outcomes
            if out.state == "released" or out.attempt is None
        ]
        tried = [out for out in outcomes if out.state != "released" and out.attempt is not None]
        self._delivered_at = time.monotonic()
        with self._tx(conn, durable=False):
            if released:
                _each(
                    conn,
                    "UPDATE deliveries SET state = 'pending', next_at = ?, updated_at = ? "
                    "WHERE id = ? AND state = 'inflight'",
                    released,
                )
            if not tried:
                return {}
            ids = [out.delivery_id for out in tried]
            lanes: dict[int, tuple[str, str | None, int | None]] = {
                row[0]: (row[1], row[2], row[3])
                for row in conn.execute(
                    f"SELECT id, endpoint, user_id, feed_ts FROM deliveries WHERE id {_IN_LIST}",
                    _listed(ids),
                )
            }
            attempts = [
                (out, out.attempt)
                for out in tried
                if out.delivery_id in lanes and out.attempt is not None  # not purged meanwhile
            ]
            _each(
                conn,
                "UPDATE deliveries SET state = ?, attempts = attempts + ?, next_at = ?, "
                "updated_at = ?, last_status = ?, last_error = ? WHERE id = ?",
                [
                    (
                        out.state,
                        core.attempts_used(out),
                        out.next_at,
                        now,
                        a.status,
                        a.error,
                        out.delivery_id,
                    )
                    for out, a in attempts
                ],
            )
            _each(
                conn,
                "INSERT INTO attempts (delivery_id, n, at, status, latency, error, excerpt) "
                "VALUES (?1, (SELECT COALESCE(MAX(n), 0) + 1 FROM attempts "
                "WHERE delivery_id = ?1), ?2, ?3, ?4, ?5, ?6)",
                [
                    (out.delivery_id, a.at, a.status, a.latency, a.error, a.excerpt)
                    for out, a in attempts
                ],
            )
            health = core.fold_health(
                [
                    core.Verdict(lanes[out.delivery_id][0], out.state, a.at, a.status, a.error)
                    for out, a in attempts
                ]
            )
            _each(conn, sql.for_sqlite(sql.UPSERT_HEALTH), [h.values() for h in health])
            finished = core.finished_lanes(
                (*lanes[out.delivery_id][:2], out.state) for out, _ in attempts
            )
            delivered = core.just_delivered(
                (*lanes[out.delivery_id][:2], out.state, lanes[out.delivery_id][2])
                for out, _ in attempts
            )
            users = sorted({user for _, user in finished})
            return dict(self._settle(conn, users, now, delivered, finished))

    # -- inspection and replay --------------------------------------------------------------

    async def list_deliveries(self, **page: Unpack[records.Page]) -> list[records.DeliveryInfo]:
        query, args = sql.list_deliveries(page, mark="?")
        rows = await self._run(lambda c: c.execute(query, args).fetchall())
        return [core.delivery_info(row) for row in rows]

    async def get_delivery(self, delivery_id: int) -> records.DeliveryDetail | None:
        def query(conn: sqlite3.Connection) -> records.DeliveryDetail | None:
            row = conn.execute(sql.for_sqlite(sql.DELIVERY), (delivery_id,)).fetchone()
            if row is None:
                return None
            attempts = conn.execute(sql.for_sqlite(sql.ATTEMPTS_OF), (delivery_id,)).fetchall()
            return core.delivery_detail(row, attempts)

        return await self._run(query)

    async def replay(self, *, now: float, **selection: Unpack[records.ReplaySelection]) -> int:
        found = sql.replay_selection(selection, mark="?")
        if found is None:
            return 0

        def replay(conn: sqlite3.Connection) -> int:
            with self._tx(conn):
                rows = conn.execute(sql.replay_candidates(found), found.args).fetchall()
                if not rows:
                    return 0
                # Replayed deliveries go after everything stored so far: fresh positions
                # from the events' own sequence, which later events continue.
                top = conn.execute(
                    "SELECT COALESCE(MAX(seq), 0) FROM sqlite_sequence WHERE name = 'events'"
                ).fetchone()[0]
                conn.execute(
                    "UPDATE sqlite_sequence SET seq = ? WHERE name = 'events'",
                    (top + len(rows),),
                )
                plan = core.replay_plan(rows, range(top + 1, top + 1 + len(rows)))
                _each(
                    conn,
                    sql.for_sqlite(sql.REPLAY),
                    [(r.id, r.state.value, r.ord, now, r.ts) for r in plan],
                )
                self._settle(conn, core.lane_users(plan), now, {})
                return len(rows)

        return await self._run(replay)

    async def rename_endpoint(self, old: str, new: str) -> int:
        def rename(conn: sqlite3.Connection) -> int:
            with self._tx(conn):
                moved = conn.execute(sql.for_sqlite(sql.RENAME_ENDPOINT[0]), (old, new)).rowcount
                for statement in sql.RENAME_ENDPOINT[1:]:
                    conn.execute(sql.for_sqlite(statement), (old, new))
                return moved

        return await self._run(rename)

    async def retry_now(self, *, now: float, **selection: Unpack[records.Selection]) -> int:
        statement, args = sql.retry_now(selection, now, mark="?")

        def retry(conn: sqlite3.Connection) -> int:
            with self._tx(conn):
                return conn.execute(statement, args).rowcount

        return await self._run(retry)

    async def endpoint_stats(self) -> list[records.EndpointStats]:
        def query(conn: sqlite3.Connection) -> list[records.EndpointStats]:
            # Every query here is served by a small index: a status page refreshing every few
            # seconds must not scan the delivery history.
            return core.endpoint_stats(
                self._pending(conn),
                conn.execute(sql.DEAD_STATS),
                conn.execute(sql.HEALTH_STATS),
            )

        return await self._run(query)

    async def pending_stats(self) -> dict[str, tuple[int, float]]:
        return await self._run(self._pending)

    @staticmethod
    def _pending(conn: sqlite3.Connection) -> dict[str, tuple[int, float]]:
        return {row[0]: (row[1], row[2]) for row in conn.execute(sql.PENDING_STATS)}

    # -- reconciliation ---------------------------------------------------------------------

    async def user_states(self) -> dict[str, records.UserState]:
        def query(conn: sqlite3.Connection) -> dict[str, records.UserState]:
            return {row["user_id"]: core.user_state(row) for row in conn.execute(sql.USER_STATES)}

        return await self._run(query)

    async def record_baseline(self, states: Sequence[records.UserState], now: float) -> int:
        def insert(conn: sqlite3.Connection) -> int:
            with self._tx(conn):
                conn.execute(sql.for_sqlite(sql.MARK_BASELINE), (str(now),))
                return _each(
                    conn,
                    "INSERT OR IGNORE INTO user_state (user_id, status, requirements, event_id, "
                    "source, updated_at) VALUES (?,?,?,?,?,?)",
                    [
                        (s.user_id, s.status, s.requirements, s.event_id, s.source, now)
                        for s in states
                    ],
                )

        return await self._run(insert)

    async def watch(self, wake: Callable[[], None]) -> None:
        """One daemon per file: the relay wakes its own dispatcher, nothing to listen to."""

    @contextlib.asynccontextmanager
    async def reconcile_lock(self) -> AsyncIterator[bool]:
        """One daemon per file; a concurrent `relay reconcile` is safe anyway, since a
        reconciled event is appended only while the user's state is the one it replaces."""
        yield True

    async def has_baseline(self) -> bool:
        def query(conn: sqlite3.Connection) -> bool:
            row = conn.execute("SELECT 1 FROM meta WHERE key = 'reconcile_baseline'").fetchone()
            return row is not None

        return await self._run(query)

    # -- retention --------------------------------------------------------------------------

    async def purge(self, *, delivered_before: float, dead_before: float, batch: int) -> int:
        def purge(conn: sqlite3.Connection) -> int:
            with self._tx(conn):
                ids = [
                    row[0]
                    for row in conn.execute(
                        f"SELECT id FROM deliveries WHERE {_FINISHED} AND state IN "
                        "('delivered', 'superseded') AND updated_at < ?1 UNION ALL SELECT id "
                        f"FROM deliveries WHERE {_FINISHED} AND state = 'dead' "
                        "AND updated_at < ?2 LIMIT ?3",
                        (delivered_before, dead_before, batch),
                    )
                ]
                removed = len(ids)
                if ids:
                    conn.execute(f"DELETE FROM attempts WHERE delivery_id {_IN_LIST}", _listed(ids))
                    conn.execute(f"DELETE FROM deliveries WHERE id {_IN_LIST}", _listed(ids))
                # Events no delivery refers to any more (or that matched no endpoint); their
                # ids stop deduplicating now, long after sFOX could resend them.
                removed += conn.execute(
                    "DELETE FROM events WHERE seq IN (SELECT seq FROM events "
                    "WHERE received_at < ? AND NOT EXISTS (SELECT 1 FROM deliveries d "
                    "WHERE d.event_seq = events.seq) LIMIT ?)",
                    (delivered_before, batch),
                ).rowcount
                conn.execute(
                    "DELETE FROM bad_frames WHERE id IN (SELECT id FROM bad_frames "
                    "WHERE at < ? LIMIT ?)",
                    (dead_before, batch),
                )
                return removed

        return await self._run(purge)

    # -- endpoint health (CONTRACT.md 5b, 5c): state rows and transactions only ------------

    async def health_rows(self, kind: str) -> dict[str, HealthRow]:
        def query(conn: sqlite3.Connection) -> dict[str, HealthRow]:
            found = conn.execute(sql.for_sqlite(sql.HEALTH_ROWS), (kind,))
            return {row["name"]: core.health_row(row) for row in found}

        return await self._run(query)

    @staticmethod
    def _health_cas(
        conn: sqlite3.Connection, kind: str, name: str, row: HealthRow, now: float
    ) -> bool:
        if row.version == 0:
            cur = conn.execute(
                sql.for_sqlite(sql.HEALTH_CREATE), (kind, name, row.state, row.data, now)
            )
        else:
            cur = conn.execute(
                sql.for_sqlite(sql.HEALTH_UPDATE),
                (kind, name, row.state, row.data, now, row.version),
            )
        return cur.rowcount == 1

    async def health_write(
        self, kind: str, name: str, row: HealthRow, now: float, **also: Unpack[HealthWrite]
    ) -> bool:
        alert, alert_endpoint = also.get("alert"), also.get("alert_endpoint")

        def write(conn: sqlite3.Connection) -> bool:
            with self._tx(conn):
                if not self._health_cas(conn, kind, name, row, now):
                    return False
                if also.get("release"):
                    conn.execute(sql.for_sqlite(sql.RELEASE_ENDPOINT), (now, name))
                if alert is not None and alert_endpoint is not None:
                    seq = conn.execute(
                        sql.for_sqlite(sql.INSERT_ALERT_EVENT),
                        (alert.event_id, alert.source, alert.recipient, alert.body, False, now),
                    ).fetchone()
                    if seq is not None:
                        conn.execute(
                            sql.for_sqlite(sql.INSERT_ALERT_DELIVERY),
                            (seq[0], alert_endpoint, now),
                        )
                return True

        return await self._run(write)

    async def claim_probe(
        self, endpoint: str, now: float, row: HealthRow, after_user: str | None
    ) -> records.Claim | None:
        def claim(conn: sqlite3.Connection) -> records.Claim | None:
            try:
                return attempt(conn)
            except core.RowMoved:  # rolled back: another writer changed the row
                return None

        def attempt(conn: sqlite3.Connection) -> records.Claim | None:
            with self._tx(conn, durable=False):
                picked = conn.execute(
                    "UPDATE deliveries SET state = 'inflight', updated_at = ?1 WHERE id = ("
                    "SELECT id FROM deliveries WHERE state = 'pending' AND endpoint = ?2 "
                    "AND next_at <= ?1 ORDER BY (?3 IS NOT NULL AND COALESCE(user_id, '') <= ?3),"
                    " COALESCE(user_id, ''), next_at, id LIMIT 1) "
                    "RETURNING id, event_seq, user_id, attempts, created_at",
                    (now, endpoint, after_user),
                ).fetchone()
                if picked is None:
                    return None
                if not self._health_cas(conn, "endpoint", endpoint, row, now):
                    raise core.RowMoved
                event = conn.execute(
                    "SELECT event_id, source, body, has_token FROM events WHERE seq = ?",
                    (picked["event_seq"],),
                ).fetchone()
            return core.claim({**picked, **event}, endpoint)

        return await self._run(claim, Priority.DELIVERY)

    async def dead_summary(self, endpoint: str, since: float) -> records.DeadSummary | None:
        def query(conn: sqlite3.Connection) -> records.DeadSummary | None:
            found = conn.execute(sql.for_sqlite(sql.DEAD_SUMMARY), (endpoint, since)).fetchone()
            return None if found is None else core.dead_summary(found)

        return await self._run(query)

    async def beat(self, replica: str, now: float, ttl: float) -> int:
        def beat(conn: sqlite3.Connection) -> int:
            with self._tx(conn, durable=False):
                conn.execute(sql.for_sqlite(sql.BEAT), (replica, now))
                conn.execute(sql.for_sqlite(sql.FORGET_REPLICAS), (now - 100 * ttl,))
                count: int = conn.execute(
                    sql.for_sqlite(sql.LIVE_REPLICAS), (now - ttl,)
                ).fetchone()[0]
                return count

        return await self._run(beat)
