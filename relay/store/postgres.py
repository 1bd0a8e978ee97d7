"""The shared outbox: PostgreSQL, used by several relay replicas at once (active-active).

Same records and semantics as the SQLite store (see :mod:`relay.store.base`); what differs is
how replicas share it:

- **Events once.** ``INSERT ... ON CONFLICT (event_id) DO NOTHING``: every replica appends what
  it received, each event is stored once and fanned out only by the replica that inserted it.
- **Lanes.** Whatever decides whether a lane has an active delivery (append, the promotion in
  record, replay, the reconciliation ``after`` check and ``user_state``) first locks the user's
  row in ``user_locks`` ``FOR UPDATE``, in ``user_id`` order. One row per user covers all of its
  lanes and its state. Row locks live in the tuples, so a reconciliation batch of thousands of
  users cannot exhaust the shared lock table as that many advisory locks could.
- **Claims are leases.** ``FOR UPDATE SKIP LOCKED`` hands a delivery to one replica, which
  holds it until ``lease_until``; after that any replica takes it over (a crash uses no
  attempt). A verdict applies only while the delivery is still in flight under the recording
  replica's claim, so a takeover wins. Claims are never renewed: configuration keeps every
  delivery timeout below half the lease, so an attempt ends well before its claim does.
- **Wake-ups.** Commits that make work due (new deliveries, promotions, releases, replays)
  ``NOTIFY`` a channel of this schema; :meth:`PostgresStore.watch` listens on a dedicated
  connection. One replica reconciles at a time under a session advisory lock.

Time is the caller's clock (``now``), as with SQLite, so replicas' clocks must agree to well
within the lease (NTP does). Transactions that lose a deadlock or serialization race are
retried; connection failures surface as ``StoreUnavailableError`` naming the store by its
masked URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import random
import secrets
import socket
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar, Unpack
from urllib.parse import urlsplit

import asyncpg

from relay.errors import StoreError, StoreSchemaError, StoreUnavailableError
from relay.events import BadFrame, NewEvent
from relay.masking import mask_url
from relay.store import core, records, sql
from relay.store.records import HealthRow, HealthWrite

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

__all__ = ["MIGRATIONS", "PostgresStore", "display_url"]

log = logging.getLogger("relay.store")

T = TypeVar("T")
Conn: TypeAlias = "PoolConnectionProxy[asyncpg.Record]"

_MASK = "***"

#: Forward-only schema migrations; index + 1 is the version each one produces.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE events (
        seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        event_id text NOT NULL UNIQUE,
        source text NOT NULL,
        recipient text NOT NULL,
        user_id text,
        status text,
        requirements text,
        body bytea NOT NULL,
        has_token boolean NOT NULL,
        received_at double precision NOT NULL
    );
    CREATE INDEX events_received ON events (received_at);
    CREATE TABLE deliveries (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        event_seq bigint NOT NULL,
        endpoint text NOT NULL,
        user_id text,
        ord bigint NOT NULL,
        state text NOT NULL CHECK (state IN (
            'waiting', 'pending', 'inflight', 'delivered', 'dead', 'superseded')),
        attempts integer NOT NULL DEFAULT 0,
        next_at double precision NOT NULL,
        created_at double precision NOT NULL,
        updated_at double precision NOT NULL,
        last_status integer,
        last_error text,
        claimed_by text,
        lease_until double precision,
        -- Only claims set claimed_by and every way out of flight clears it, so verdicts can
        -- find their deliveries by primary key and claimed_by alone.
        CHECK ((state = 'inflight') = (claimed_by IS NOT NULL AND lease_until IS NOT NULL))
    ) WITH (autovacuum_vacuum_scale_factor = 0.02, autovacuum_analyze_scale_factor = 0.02);
    -- Hot paths read only these partial indexes, never the delivery history.
    CREATE INDEX deliveries_due ON deliveries (endpoint, next_at, id) WHERE state = 'pending';
    CREATE INDEX deliveries_leased ON deliveries (endpoint, lease_until)
        WHERE state = 'inflight';
    CREATE INDEX deliveries_lane ON deliveries (endpoint, user_id, ord, id)
        INCLUDE (state, created_at) WHERE state IN ('waiting', 'pending', 'inflight');
    CREATE INDEX deliveries_dead ON deliveries (updated_at) INCLUDE (endpoint)
        WHERE state = 'dead';
    CREATE INDEX deliveries_done ON deliveries (updated_at)
        WHERE state IN ('delivered', 'superseded');
    CREATE INDEX deliveries_user ON deliveries (user_id);
    CREATE INDEX deliveries_event ON deliveries (event_seq);
    CREATE TABLE attempts (
        delivery_id bigint NOT NULL,
        n integer NOT NULL,
        at double precision NOT NULL,
        status integer,
        latency double precision NOT NULL,
        error text,
        excerpt text,
        PRIMARY KEY (delivery_id, n)
    );
    CREATE TABLE user_state (
        user_id text PRIMARY KEY,
        status text,
        requirements text,
        event_id text,
        source text NOT NULL,
        updated_at double precision NOT NULL
    );
    -- One row per user, locked FOR UPDATE to serialise decisions about the user's lanes.
    CREATE TABLE user_locks (user_id text PRIMARY KEY);
    CREATE TABLE endpoint_health (
        endpoint text PRIMARY KEY,
        delivered_total bigint NOT NULL DEFAULT 0,
        last_success_at double precision,
        last_failure_at double precision,
        last_error text
    );
    CREATE TABLE bad_frames (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        at double precision NOT NULL,
        reason text NOT NULL,
        text text NOT NULL
    );
    """,
    # v2: lanes follow sFOX's timestamp (ts, then ord); feed_ts makes older feed events
    # stale once a newer one is delivered; a replayed delivery is never superseded;
    # high_ts is the newest key a user's events reached (reconciled events go after it).
    # Rows from before keep their store order (ts 0).
    """
    ALTER TABLE deliveries ADD COLUMN ts bigint NOT NULL DEFAULT 0,
        ADD COLUMN feed_ts bigint, ADD COLUMN replayed boolean NOT NULL DEFAULT false;
    ALTER TABLE user_state ADD COLUMN high_ts bigint NOT NULL DEFAULT 0;
    """,
    # v3: endpoint health (CONTRACT.md 5b, 5c): one state row per endpoint, feed and dead
    # alert throttle, versioned for compare-and-set; replicas' heartbeats (rate-limit shares).
    """
    CREATE TABLE health (
        kind text NOT NULL,
        name text NOT NULL,
        state text NOT NULL,
        version integer NOT NULL,
        data text NOT NULL,
        updated_at double precision NOT NULL,
        PRIMARY KEY (kind, name)
    );
    CREATE TABLE replicas (name text PRIMARY KEY, seen_at double precision NOT NULL);
    """,
)

_BOOKKEEPING = """
    CREATE TABLE IF NOT EXISTS meta (key text PRIMARY KEY, value text NOT NULL);
    CREATE TABLE IF NOT EXISTS schema_migrations (
        version integer PRIMARY KEY,
        applied_at timestamptz NOT NULL DEFAULT now(),
        applied_by text NOT NULL
    );
"""

#: Failures that mean "the store is not usable right now": the caller pauses and retries.
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,  # connection closed under us, pool closing
    asyncpg.InternalClientError,  # a connection the server cut while it sat in the pool
    asyncpg.PostgresConnectionError,  # class 08
    asyncpg.InsufficientResourcesError,  # class 53: disk full, too many connections
    asyncpg.OperatorInterventionError,  # class 57: shutdown, starting up, statement timeout
    asyncpg.InvalidAuthorizationSpecificationError,  # class 28: credentials refused
    asyncpg.InvalidCatalogNameError,  # the database does not exist (yet)
    asyncpg.ReadOnlySQLTransactionError,  # connected to a standby after a failover
    asyncpg.UndefinedTableError,  # the schema was dropped under us
)
_MAPPED: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)
#: Lost races between replicas; the transaction is simply run again.
_CONFLICTS = (asyncpg.DeadlockDetectedError, asyncpg.SerializationError)
_TX_ATTEMPTS = 5

_LOCK_USERS = (
    "SELECT user_id FROM user_locks WHERE user_id = ANY($1::text[]) ORDER BY user_id FOR UPDATE"
)

#: The users of these deliveries, locked as :data:`_LOCK_USERS` does.
_LOCK_USERS_OF = """
    SELECT user_id FROM user_locks WHERE user_id IN (
        SELECT user_id FROM deliveries WHERE id = ANY($1::bigint[]) AND user_id IS NOT NULL
    ) ORDER BY user_id FOR UPDATE
"""

_INSERT_EVENTS = """
    INSERT INTO events (event_id, source, recipient, user_id, status, requirements, body,
        has_token, received_at)
    SELECT event_id, source, recipient, user_id, status, requirements, body, has_token, $9::float8
    FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
        $7::bytea[], $8::bool[]) WITH ORDINALITY
        AS e(event_id, source, recipient, user_id, status, requirements, body, has_token, i)
    ORDER BY i
    ON CONFLICT (event_id) DO NOTHING
    RETURNING seq, event_id
"""

_UPSERT_USER_STATES = sql.upsert_user_states(
    "SELECT *, $7::float8 FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], "
    "$5::text[], $6::bigint[])"
)

#: New deliveries as :func:`core.fan_out` planned them (lane ones start waiting).
_INSERT_DELIVERIES = sql.insert_deliveries(
    "SELECT n.seq, n.endpoint, n.user_id, n.seq, n.state, n.next_at, $8::float8, $8::float8, "
    "n.ts, n.feed_ts FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], "
    "$5::float8[], $6::bigint[], $7::bigint[]) WITH ORDINALITY "
    "AS n(seq, endpoint, user_id, state, next_at, ts, feed_ts, i) ORDER BY n.i"
)

#: Two probes, each on its own small partial index: leases that ran out (a replica died
#: mid-delivery), then due pending deliveries, oldest first.
_CLAIM = """
    WITH expired AS (
        SELECT id FROM deliveries
        WHERE endpoint = $1 AND state = 'inflight' AND lease_until <= $2
        ORDER BY lease_until LIMIT $3 FOR UPDATE SKIP LOCKED
    ), due AS (
        SELECT id FROM deliveries
        WHERE endpoint = $1 AND state = 'pending' AND next_at <= $2
        ORDER BY next_at, id LIMIT $3 FOR UPDATE SKIP LOCKED
    ), picked AS (
        SELECT id FROM expired UNION ALL SELECT id FROM due LIMIT $3
    ), claimed AS (
        UPDATE deliveries d SET state = 'inflight', claimed_by = $4,
            lease_until = $2::float8 + $5::float8, updated_at = $2
        FROM picked WHERE d.id = picked.id
        RETURNING d.id, d.event_seq, d.user_id, d.attempts, d.created_at
    )
    SELECT c.id, c.user_id, c.attempts, c.created_at, e.event_id, e.source, e.body, e.has_token
    FROM claimed c JOIN events e ON e.seq = c.event_seq
    ORDER BY c.id
"""

#: When an endpoint next has something to claim: its earliest pending delivery, or the
#: earliest lease (another replica's, or this one's) that may lapse.
_NEXT_DUE = """
    SELECT MIN(at) FROM (
        (SELECT next_at AS at FROM deliveries WHERE state = 'pending' AND endpoint = $1
         ORDER BY next_at LIMIT 1)
        UNION ALL
        (SELECT lease_until FROM deliveries WHERE state = 'inflight' AND endpoint = $1
         ORDER BY lease_until LIMIT 1)
    ) AS due
"""

#: Verdicts with an attempt, in one statement: apply those still claimed by this replica
#: (``claimed_by`` is set exactly while in flight; testing it alone keeps the planner on the
#: primary key rather than the in-flight index, whose dead entries pile up between vacuums)
#: and number their attempts. Returns what was applied, in the batch's order, for the
#: health fold and the lanes to settle.
_APPLY = """
    WITH verdict AS (
        SELECT * FROM unnest($2::bigint[], $3::text[], $4::float8[], $5::float8[], $6::int4[],
            $7::float8[], $8::text[], $9::text[], $10::int4[]) WITH ORDINALITY
            AS v(id, state, next_at, at, status, latency, error, excerpt, used, i)
    ), applied AS (
        UPDATE deliveries d SET state = v.state, attempts = d.attempts + v.used,
            next_at = v.next_at, updated_at = $11, last_status = v.status, last_error = v.error,
            claimed_by = NULL, lease_until = NULL
        FROM verdict v
        WHERE d.id = v.id AND d.claimed_by = $1
        RETURNING d.id, d.endpoint, d.user_id, d.feed_ts, v.state, v.at, v.status, v.error,
            v.i
    ), logged AS (
        INSERT INTO attempts (delivery_id, n, at, status, latency, error, excerpt)
        SELECT v.id,
            COALESCE((SELECT MAX(a.n) FROM attempts a WHERE a.delivery_id = v.id), 0) + 1,
            v.at, v.status, v.latency, v.error, v.excerpt
        FROM verdict v JOIN applied a ON a.id = v.id
    )
    SELECT id, endpoint, user_id, feed_ts, state, at, status, error FROM applied ORDER BY i
"""


#: Up to ``$3`` finished deliveries past their cutoff, each found on its own partial index.
_PURGE_DELIVERIES = """
    WITH doomed AS (
        SELECT id FROM deliveries WHERE id IN (
            (SELECT id FROM deliveries WHERE state IN ('delivered', 'superseded')
                AND updated_at < $1 LIMIT $3)
            UNION ALL
            (SELECT id FROM deliveries WHERE state = 'dead' AND updated_at < $2 LIMIT $3)
        ) AND ((state IN ('delivered', 'superseded') AND updated_at < $1)
            OR (state = 'dead' AND updated_at < $2))
        LIMIT $3 FOR UPDATE SKIP LOCKED
    ), gone_attempts AS (
        DELETE FROM attempts WHERE delivery_id IN (SELECT id FROM doomed)
    ), gone AS (
        DELETE FROM deliveries WHERE id IN (SELECT id FROM doomed) RETURNING id
    )
    SELECT count(*) FROM gone
"""

#: Old events no delivery refers to any more (or that matched no endpoint).
_PURGE_EVENTS = """
    DELETE FROM events WHERE seq IN (
        SELECT e.seq FROM events e WHERE e.received_at < $1
        AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.event_seq = e.seq)
        LIMIT $2
    )
"""

_RELEASE = """
    UPDATE deliveries d SET state = 'pending', next_at = v.next_at, updated_at = $3,
        claimed_by = NULL, lease_until = NULL
    FROM unnest($1::bigint[], $2::float8[]) AS v(id, next_at)
    WHERE d.id = v.id AND d.claimed_by = $4
"""


async def _keep_session(conn: asyncpg.Connection[asyncpg.Record]) -> None:
    """Pool connections keep no session state (only SET LOCAL and transaction locks), so a
    returned connection needs no reset beyond the rollback asyncpg does anyway."""


def display_url(url: str) -> str:
    """``url`` with any password (user info or ``password`` parameter) masked."""
    return mask_url(url)


def _columns(rows: Sequence[Any], width: int) -> list[list[Any]]:
    """Rows (tuples, or records with ``values()``) as ``width`` column lists, for ``unnest``."""
    tuples = [row if isinstance(row, tuple) else row.values() for row in rows]
    return [[row[i] for row in tuples] for i in range(width)]


def _password(url: str) -> str | None:
    try:
        return urlsplit(url).password
    except ValueError:
        return None


def _lock_key(namespace: str, name: str) -> int:
    """A stable advisory-lock key (signed 64 bit) for ``name`` within one store's schema."""
    digest = hashlib.blake2b(f"sfox-relay\0{namespace}\0{name}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "big", signed=True)


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class PostgresStore:
    """The PostgreSQL outbox (``RELAY_STORE=postgresql://...``), shared by replicas.

    Args:
        url: a ``postgresql://`` URL (asyncpg's DSN syntax).
        lease: how long a claim lasts before another replica may take the delivery over.
        replica: this process's name in claims; unique per running process (default:
            host, pid and a random suffix, so a restarted process never reuses a claim).
        schema: keep the store in this PostgreSQL schema (created if missing) instead of
            the connection's ``search_path``.
        pool_size: most connections a daemon opens (a CLI command opens two at most).
        timeout: seconds for connecting, acquiring a connection and each statement.
        liveness: seconds between checks of the wake-up listener's connection.
        reorder_window: ``RELAY_REORDER_WINDOW``: how long after each (re)subscription
            this replica holds the feed events it stores (see :meth:`append`).
        read_only: `relay check`: every transaction read-only, no migration; a store that
            is not at this version's schema is a StoreError.
    """

    takes = False  # a claim holds a lease, which the dispatcher's claim sets

    def __init__(
        self,
        url: str,
        *,
        lease: float = 60.0,
        replica: str | None = None,
        schema: str | None = None,
        pool_size: int = 10,
        timeout: float = 10.0,
        liveness: float = 15.0,
        reorder_window: float = 1.0,
        read_only: bool = False,
    ) -> None:
        if lease <= 0:
            raise ValueError("lease must be positive")
        self._url = url
        self.display = display_url(url)
        self._secret = _password(url)
        self.lease = lease
        self.replica = replica or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.schema = schema
        self._read_only = read_only
        self._pool_size = max(2, pool_size)
        self._timeout = timeout
        self._liveness = liveness
        self._pool: asyncpg.Pool[asyncpg.Record] | None = None
        self._namespace = ""
        self._channel = ""
        self.reorder_window = reorder_window
        self._subscribed_at: float | None = None

    # -- plumbing ---------------------------------------------------------------------------

    def _server_settings(self, role: str = "") -> dict[str, str]:
        """Session settings; the application name tells replicas (and their roles) apart."""
        name = f"sfox-relay {self.replica}{' ' + role if role else ''}"
        settings = {"application_name": name[:63]}
        if self.schema is not None:
            settings["search_path"] = _quote_ident(self.schema)
        if self._read_only:
            settings["default_transaction_read_only"] = "on"
        return settings

    def _error(self, exc: BaseException) -> StoreError:
        """The store error for a driver or network failure, without any secret in it."""
        text = str(exc) or type(exc).__name__
        if self._secret:
            text = text.replace(self._secret, _MASK)
        message = f"{self.display}: {text}"
        if isinstance(exc, asyncpg.ClientConfigurationError):
            return StoreError(message)
        if isinstance(exc, _UNAVAILABLE):
            return StoreUnavailableError(message)
        return StoreError(message)

    def _require_pool(self) -> asyncpg.Pool[asyncpg.Record]:
        if self._pool is None:
            raise StoreError(f"{self.display}: store is not open")
        return self._pool

    async def _run(
        self, fn: Callable[[Conn], Awaitable[T]], *, tx: bool = True, durable: bool = True
    ) -> T:
        """Run ``fn`` on a pooled connection (in a transaction unless ``tx`` is False).

        ``durable`` commits wait for the WAL flush (new events, replays, everything an
        operator did). Claims and verdicts do not: a server crash may forget the last few,
        which at worst re-sends a delivery, as at-least-once allows (SQLite does the same).

        A transaction that lost a deadlock or serialization race to another replica is run
        again; driver and network failures become store errors here, at the boundary.
        """
        pool = self._require_pool()
        try:
            for attempt in range(1, _TX_ATTEMPTS + 1):
                try:
                    async with pool.acquire(timeout=self._timeout) as conn:
                        if not tx:
                            return await fn(conn)
                        async with conn.transaction():
                            if not durable:
                                await conn.execute("SET LOCAL synchronous_commit TO off")
                            return await fn(conn)
                except _CONFLICTS:
                    if attempt == _TX_ATTEMPTS:
                        raise
                    await asyncio.sleep(random.uniform(0.0, 0.005 * attempt))
            raise AssertionError("unreachable")  # pragma: no cover
        except _MAPPED as exc:
            raise self._error(exc) from exc

    async def _connect(self, role: str) -> asyncpg.Connection[asyncpg.Record]:
        """A connection outside the pool (``listen``, ``reconcile``)."""
        try:
            return await asyncpg.connect(
                self._url,
                timeout=self._timeout,
                command_timeout=self._timeout,
                server_settings=self._server_settings(role),
            )
        except _MAPPED as exc:
            raise self._error(exc) from exc

    async def _close_connection(self, conn: asyncpg.Connection[asyncpg.Record]) -> None:
        try:
            await asyncio.wait_for(conn.close(), self._timeout)
        except BaseException:
            conn.terminate()
            raise

    @staticmethod
    async def _lock_users(conn: Conn, users: Sequence[str], *, create: bool) -> None:
        """Lock the users' rows in user_id order, so lock waits never form a cycle.

        ``create`` first adds rows for users never seen; elsewhere they exist already, since
        a delivery with a user id exists only after an append locked that user.
        """
        wanted = sorted(set(users))
        if not wanted:
            return
        locked = await conn.fetch(_LOCK_USERS, wanted)
        if create and len(locked) < len(wanted):
            await conn.execute(
                "INSERT INTO user_locks (user_id) SELECT u FROM unnest($1::text[]) AS u "
                "ORDER BY u ON CONFLICT DO NOTHING",
                wanted,
            )
            await conn.fetch(_LOCK_USERS, wanted)

    async def _notify(self, conn: Conn) -> None:
        """Wake the other replicas when this transaction commits."""
        await conn.execute("SELECT pg_notify($1, $2)", self._channel, self.replica)

    # -- lifecycle --------------------------------------------------------------------------

    async def open(self, *, daemon: bool) -> None:
        """Connect and migrate. No single-writer lock: replicas share the store."""
        if self._pool is not None:
            return
        try:
            pool = await asyncpg.create_pool(
                self._url,
                min_size=1,
                max_size=self._pool_size if daemon else 2,
                timeout=self._timeout,
                command_timeout=self._timeout,
                max_inactive_connection_lifetime=300.0,
                server_settings=self._server_settings(),
                reset=_keep_session,
            )
        except _MAPPED as exc:
            raise self._error(exc) from exc
        self._pool = pool
        try:
            self._namespace = await self._run(
                self._check_schema if self._read_only else self._migrate
            )
        except BaseException:
            self._pool = None
            await self._close_pool(pool)
            raise
        self._channel = f"relay_wakeup_{_lock_key(self._namespace, 'wakeup') & 0xFFFFFFFFFFFF:012x}"

    async def _migrate(self, conn: Conn) -> str:
        """Apply what migrations are missing, once, however many replicas start together."""
        namespace = self.schema
        if namespace is None:
            namespace = await conn.fetchval("SELECT current_schema()")
            if namespace is None:
                raise StoreError(
                    f"{self.display}: no schema of the search_path exists; create one or name "
                    "one with ?options=-csearch_path%3D<schema>"
                )
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _lock_key(namespace, "migrate"))
        exists = "SELECT 1 FROM pg_namespace WHERE nspname = $1"
        # CREATE SCHEMA checks the database's CREATE privilege even when the schema exists.
        if self.schema is not None and not await conn.fetchval(exists, self.schema):
            await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {_quote_ident(self.schema)}")
        await conn.execute(_BOOKKEEPING)
        value = await conn.fetchval("SELECT value FROM meta WHERE key = 'schema_version'")
        version = int(value) if value is not None else 0
        if version > len(MIGRATIONS):
            raise StoreSchemaError(
                f"{self.display} has schema version {version}, newer than this relay knows "
                f"({len(MIGRATIONS)}); upgrade sfox-relay"
            )
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            await conn.execute(script)
            await conn.execute(
                "INSERT INTO schema_migrations (version, applied_by) VALUES ($1, $2)",
                number,
                self.replica,
            )
            await conn.execute(
                "INSERT INTO meta (key, value) VALUES ('schema_version', $1) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                str(number),
            )
            log.info(
                "store migrated",
                extra={"event": "store.migrated", "store": self.display, "version": number},
            )
        return str(namespace)

    async def _check_schema(self, conn: Conn) -> str:
        """What :meth:`_migrate` would find, without writing: the version must be current."""
        namespace = self.schema or await conn.fetchval("SELECT current_schema()")
        try:
            value = await conn.fetchval("SELECT value FROM meta WHERE key = 'schema_version'")
        except asyncpg.UndefinedTableError:
            raise StoreError(f"{self.display}: no relay store in schema {namespace}") from None
        version = int(value) if value is not None else 0
        if version != len(MIGRATIONS):
            newer = version > len(MIGRATIONS)
            raise (StoreSchemaError if newer else StoreError)(
                f"{self.display} has schema version {version}; this relay knows "
                f"{len(MIGRATIONS)} ({'upgrade sfox-relay' if newer else 'relay run migrates it'})"
            )
        return str(namespace)

    async def _close_pool(self, pool: asyncpg.Pool[asyncpg.Record]) -> None:
        try:
            await asyncio.wait_for(pool.close(), self._timeout)
        except BaseException:
            pool.terminate()
            raise

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            with contextlib.suppress(*_MAPPED):
                await self._close_pool(pool)

    async def check_writable(self) -> None:
        async def write(conn: Conn) -> None:
            await conn.execute(
                "INSERT INTO meta (key, value) VALUES ('heartbeat', '1') ON CONFLICT (key) "
                "DO UPDATE SET value = (meta.value::bigint + 1)::text"
            )

        await self._run(write)

    # -- ingest -----------------------------------------------------------------------------

    def mark_subscribed(self, now: float) -> None:
        """Hold what this replica stores for the next reorder window (see ``append``)."""
        self._subscribed_at = now

    async def append(
        self,
        events: Sequence[NewEvent],
        targets: Sequence[records.Target],
        now: float,
        *,
        take: Mapping[str, int] | None = None,
    ) -> records.AppendResult:
        """Also: feed events stored within the reorder window after this replica's
        (re)subscription become due at store time plus the window. Another replica,
        subscribed all along, may still be storing the same users' earlier events, which
        sFOX sent before this replica was listening; their lanes put those first.

        Takes nothing (``take``): a claim here holds a lease, which the dispatcher's claim
        sets; the store's round trip is a network one anyway."""
        if not events:
            return records.AppendResult()
        hold = None
        if self._subscribed_at is not None and now < self._subscribed_at + self.reorder_window:
            hold = now + self.reorder_window
        return await self._run(lambda c: self._append(c, events, targets, now, hold))

    async def _append(
        self,
        conn: Conn,
        events: Sequence[NewEvent],
        targets: Sequence[records.Target],
        now: float,
        hold: float | None,
    ) -> records.AppendResult:
        users = sorted({e.user_id for e in events if e.user_id is not None})
        await self._lock_users(conn, users, create=True)
        states = {
            row["user_id"]: core.state_row(row)
            for row in await conn.fetch(
                f"SELECT {sql.USER_STATE_COLUMNS} FROM user_state WHERE user_id = ANY($1::text[])",
                users,
            )
        }
        stored: list[NewEvent] = []
        superseded: Counter[str] = Counter()
        stale = duplicates = 0
        due = False
        for run in core.segments(events):
            fresh = [e for e in run if not core.is_stale(e, states.get(e.user_id or ""))]
            stale += len(run) - len(fresh)
            if not fresh:
                continue
            rows = await conn.fetch(
                _INSERT_EVENTS, *_columns([core.event_row(e) for e in fresh], 8), now
            )
            seqs: dict[str, int] = {row["event_id"]: row["seq"] for row in rows}
            # An event twice in one run (no user: runs split only per user) was inserted
            # once: its first occurrence is the new one, the other a duplicate.
            new = [(seqs.pop(e.event_id), e) for e in fresh if e.event_id in seqs]
            duplicates += len(fresh) - len(new)
            stored.extend(e for _, e in new)
            plan = core.fan_out(new, targets, states, now, hold_until=hold)
            superseded.update(plan.superseded)
            if plan.states:
                await conn.execute(_UPSERT_USER_STATES, *_columns(plan.states, 6), now)
            users_of_run = sorted({e.user_id for _, e in new if e.user_id})
            lanes, delivered = await self._heads(conn, users_of_run, plan)
            placed, changes, moved = core.place(plan.deliveries, lanes, delivered, now)
            superseded.update(moved)
            if placed:
                rows_ = [
                    (d.seq, d.endpoint, d.user_id, d.state.value, d.next_at, d.ts, d.feed_ts)
                    for d in placed
                ]
                await conn.execute(_INSERT_DELIVERIES, *_columns(rows_, 7), now)
            await self._apply(conn, changes, now)
            pending = core.DeliveryState.PENDING
            due = due or any(d.state == pending for d in placed)
            due = due or any(c.state == pending for c in changes)
        if due:
            await self._notify(conn)
        return records.AppendResult(stored, duplicates, stale, dict(superseded))

    @staticmethod
    async def _heads(
        conn: Conn, users: Sequence[str], plan: core.FanOut
    ) -> tuple[list[core.LaneRow], dict[core.Lane, int]]:
        """What :func:`core.place` needs (the users' locks are held): each lane's head, its
        waiting rows where a new delivery may overtake the head, the newest delivered
        timestamp where one is late."""
        rows = await PostgresStore._rows(conn, users, sql.HEAD_STATES)
        overtaking = core.overtaking(plan.deliveries, rows)
        rows += await PostgresStore._rows(conn, overtaking, sql.WAITING_STATES)
        if not plan.late:
            return rows, {}
        high = await conn.fetch(sql.delivered_high("= ANY($1::text[])"), plan.late)
        return rows, core.delivered_high(high)

    @staticmethod
    async def _rows(conn: Conn, users: Sequence[str], states: str) -> list[core.LaneRow]:
        """Lane rows, locked: a claim skips them meanwhile, so an untouched pending delivery
        that goes back to waiting is never in flight at the same time."""
        if not users:
            return []
        query = sql.lane_rows("= ANY($1::text[])", states) + " FOR UPDATE"
        return [core.lane_row(row) for row in await conn.fetch(query, list(users))]

    @staticmethod
    async def _apply(conn: Conn, changes: Sequence[core.Change], now: float) -> None:
        if changes:
            await conn.executemany(
                sql.SETTLE, [(c.state.value, c.next_at, now, c.id, c.was) for c in changes]
            )

    async def _settle(
        self,
        conn: Conn,
        users: Sequence[str],
        now: float,
        delivered: Mapping[core.Lane, int],
        only: set[core.Lane] | None = None,
    ) -> list[core.Change]:
        """Apply :func:`core.settle` to these users' lanes (their locks are held; ``only``:
        to these lanes, whose head is gone, by their waiting rows)."""
        if only is None:
            rows = await self._rows(conn, users, core.ACTIVE_SQL)
        else:
            found = await self._rows(conn, users, sql.WAITING_STATES)
            rows = [r for r in found if (r.endpoint, r.user_id) in only]
        changes = core.settle(rows, now, delivered)
        await self._apply(conn, changes, now)
        return changes

    async def quarantine(self, frame: BadFrame, now: float) -> None:
        async def insert(conn: Conn) -> None:
            await conn.execute(
                "INSERT INTO bad_frames (at, reason, text) VALUES ($1, $2, $3)",
                now,
                frame.reason,
                frame.text,
            )

        await self._run(insert)

    # -- dispatch ---------------------------------------------------------------------------

    async def claim(self, endpoint: str, now: float, limit: int) -> records.Claimed:
        """``next_due`` also counts leases running out: a dead replica's deliveries become
        claimable then."""
        if limit <= 0:
            return records.Claimed()

        async def claim(conn: Conn) -> records.Claimed:
            rows = await conn.fetch(_CLAIM, endpoint, now, limit, self.replica, self.lease)
            claims = [core.claim(row, endpoint) for row in rows]
            if len(rows) == limit:
                return records.Claimed(claims)
            due = await conn.fetchval(_NEXT_DUE, endpoint)
            return records.Claimed(claims, float(due) if due is not None else None)

        return await self._run(claim, durable=False)

    async def record(self, outcomes: Sequence[records.Outcome], now: float) -> dict[str, int]:
        # Sequential semantics for a repeated id: the first verdict applies, the rest find the
        # delivery no longer in flight.
        first: dict[int, records.Outcome] = {}
        for out in outcomes:
            first.setdefault(out.delivery_id, out)
        tried = [o for o in first.values() if o.state != "released" and o.attempt is not None]
        released = [o for o in first.values() if o.state == "released" or o.attempt is None]
        if not first:
            return {}

        async def record(conn: Conn) -> dict[str, int]:
            finishing = [o.delivery_id for o in tried if o.state != "pending"]
            if finishing:
                await conn.fetch(_LOCK_USERS_OF, finishing)
            changes: list[core.Change] = []
            if tried:
                verdicts = [core.verdict_row(o) for o in tried]
                applied = await conn.fetch(_APPLY, self.replica, *_columns(verdicts, 9), now)
                health = core.fold_health(
                    [
                        core.Verdict(r["endpoint"], r["state"], r["at"], r["status"], r["error"])
                        for r in applied
                    ]
                )
                if health:
                    await conn.executemany(sql.UPSERT_HEALTH, [h.values() for h in health])
                finished = core.finished_lanes(
                    (r["endpoint"], r["user_id"], r["state"]) for r in applied
                )
                delivered = core.just_delivered(
                    (r["endpoint"], r["user_id"], r["state"], r["feed_ts"]) for r in applied
                )
                users = sorted({user for _, user in finished})
                changes = await self._settle(conn, users, now, delivered, finished)
            back = "UPDATE 0"
            if released:
                back = await conn.execute(
                    _RELEASE,
                    [o.delivery_id for o in released],
                    [o.next_at for o in released],
                    now,
                    self.replica,
                )
            if back != "UPDATE 0" or any(c.state == core.DeliveryState.PENDING for c in changes):
                await self._notify(conn)
            return dict(core.superseded(changes))

        return await self._run(record, durable=False)

    # -- inspection and replay --------------------------------------------------------------

    async def list_deliveries(self, **page: Unpack[records.Page]) -> list[records.DeliveryInfo]:
        query, args = sql.list_deliveries(page)
        rows = await self._run(lambda c: c.fetch(query, *args), tx=False)
        return [core.delivery_info(row) for row in rows]

    async def get_delivery(self, delivery_id: int) -> records.DeliveryDetail | None:
        async def query(conn: Conn) -> records.DeliveryDetail | None:
            row = await conn.fetchrow(sql.DELIVERY, delivery_id)
            if row is None:
                return None
            return core.delivery_detail(row, await conn.fetch(sql.ATTEMPTS_OF, delivery_id))

        return await self._run(query, tx=False)

    async def replay(self, *, now: float, **selection: Unpack[records.ReplaySelection]) -> int:
        found = sql.replay_selection(selection)
        if found is None:
            return 0

        async def replay(conn: Conn) -> int:
            candidates = await conn.fetch(
                f"SELECT d.id, d.user_id FROM deliveries d {found.where()}", *found.args
            )
            if not candidates:
                return 0
            users = [row["user_id"] for row in candidates if row["user_id"] is not None]
            await self._lock_users(conn, users, create=False)
            # Again under the locks, in lane order: another replay may have taken some.
            again = sql.Filters()
            again.ids([row["id"] for row in candidates])
            again.add(f"d.state IN {core.FINISHED_SQL}")
            rows = await conn.fetch(sql.replay_candidates(again) + " FOR UPDATE OF d", *again.args)
            if not rows:
                return 0
            # Fresh positions from the events' own sequence, which later events continue.
            positions = sorted(
                r[0]
                for r in await conn.fetch(
                    "SELECT nextval(pg_get_serial_sequence('events', 'seq')) "
                    "FROM generate_series(1, $1)",
                    len(rows),
                )
            )
            plan = core.replay_plan(rows, positions)
            await conn.executemany(
                sql.REPLAY, [(r.id, r.state.value, r.ord, now, r.ts) for r in plan]
            )
            changes = await self._settle(conn, core.lane_users(plan), now, {})
            pending = core.DeliveryState.PENDING
            if any(r.state == pending for r in plan) or any(c.state == pending for c in changes):
                await self._notify(conn)
            return len(rows)

        return await self._run(replay)

    async def rename_endpoint(self, old: str, new: str) -> int:
        async def rename(conn: Conn) -> int:
            moved = int((await conn.execute(sql.RENAME_ENDPOINT[0], old, new)).split()[-1])
            for statement in sql.RENAME_ENDPOINT[1:]:
                await conn.execute(statement, old, new)
            return moved

        return await self._run(rename)

    async def retry_now(self, *, now: float, **selection: Unpack[records.Selection]) -> int:
        statement, args = sql.retry_now(selection, now)

        async def retry(conn: Conn) -> int:
            count = int((await conn.execute(statement, *args)).split()[-1])
            if count:
                await self._notify(conn)
            return count

        return await self._run(retry)

    async def endpoint_stats(self) -> list[records.EndpointStats]:
        async def query(conn: Conn) -> list[records.EndpointStats]:
            # Every query here is served by a small index: a status page refreshing every few
            # seconds must not scan the delivery history.
            return core.endpoint_stats(
                await self._pending(conn),
                await conn.fetch(sql.DEAD_STATS),
                await conn.fetch(sql.HEALTH_STATS),
            )

        return await self._run(query, tx=False)

    async def pending_stats(self) -> dict[str, tuple[int, float]]:
        return await self._run(self._pending, tx=False)

    @staticmethod
    async def _pending(conn: Conn) -> dict[str, tuple[int, float]]:
        return {
            row["endpoint"]: (row["count"], row["oldest"])
            for row in await conn.fetch(sql.PENDING_STATS)
        }

    # -- reconciliation ---------------------------------------------------------------------

    async def user_states(self) -> dict[str, records.UserState]:
        async def query(conn: Conn) -> dict[str, records.UserState]:
            return {
                row["user_id"]: core.user_state(row) for row in await conn.fetch(sql.USER_STATES)
            }

        return await self._run(query, tx=False)

    async def record_baseline(self, states: Sequence[records.UserState], now: float) -> int:
        async def insert(conn: Conn) -> int:
            await conn.execute(sql.MARK_BASELINE, repr(now))
            if not states:
                return 0
            status = await conn.execute(
                "INSERT INTO user_state (user_id, status, requirements, event_id, source, "
                "updated_at) SELECT *, $6::float8 FROM unnest($1::text[], $2::text[], $3::text[], "
                "$4::text[], $5::text[]) ON CONFLICT (user_id) DO NOTHING",
                [s.user_id for s in states],
                [s.status for s in states],
                [s.requirements for s in states],
                [s.event_id for s in states],
                [s.source for s in states],
                now,
            )
            return int(status.rsplit(" ", 1)[-1])

        return await self._run(insert)

    async def has_baseline(self) -> bool:
        async def query(conn: Conn) -> bool:
            found = await conn.fetchval("SELECT 1 FROM meta WHERE key = 'reconcile_baseline'")
            return found is not None

        return await self._run(query, tx=False)

    async def watch(self, wake: Callable[[], None]) -> None:
        """Call ``wake`` when another replica commits work that is due, until cancelled.

        A dedicated connection LISTENs, reconnecting when it is lost. Each time it starts
        listening (first, and after reconnecting) it calls ``wake`` once, for anything
        committed while it was not. The daemon runs this under its supervisor.
        """
        self._require_pool()

        def notified(
            conn: asyncpg.Connection[Any] | PoolConnectionProxy[Any],
            pid: int,
            channel: str,
            payload: object,
        ) -> None:
            if payload != self.replica:  # our own commits wake our dispatcher directly
                wake()

        delay = 0.5
        while True:
            try:
                conn = await self._connect("listen")
            except StoreError as exc:
                log.warning(
                    "store listener cannot connect; retrying",
                    extra={"event": "store.listener_down", "error": str(exc), "retry_s": delay},
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
                continue
            lost = asyncio.Event()
            conn.add_termination_listener(lambda _conn, lost=lost: lost.set())
            try:
                await conn.add_listener(self._channel, notified)
                delay = 0.5
                # Whatever was committed before we listened (or while we were cut off) may be
                # due: wake once. This also tells a caller the listener is up.
                wake()
                while True:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(lost.wait(), self._liveness)
                    if lost.is_set():
                        break
                    await conn.execute("SELECT 1")
            except _MAPPED as exc:
                log.warning(
                    "store listener lost its connection; reconnecting",
                    extra={"event": "store.listener_down", "error": str(self._error(exc))},
                )
            finally:
                conn.terminate()

    @contextlib.asynccontextmanager
    async def reconcile_lock(self) -> AsyncIterator[bool]:
        """A session advisory lock on a dedicated connection; False if another replica has it.

        Closing the connection releases the lock, also when this process dies.
        """
        self._require_pool()
        conn = await self._connect("reconcile")
        try:
            try:
                mine = await conn.fetchval(
                    "SELECT pg_try_advisory_lock($1)", _lock_key(self._namespace, "reconcile")
                )
            except _MAPPED as exc:
                raise self._error(exc) from exc
            yield bool(mine)
        finally:
            with contextlib.suppress(*_MAPPED):
                await self._close_connection(conn)

    # -- retention --------------------------------------------------------------------------

    async def purge(self, *, delivered_before: float, dead_before: float, batch: int) -> int:
        async def purge(conn: Conn) -> int:
            # Replicas purge one at a time: the same rows, never two transactions' worth of
            # lock waits over them.
            await conn.execute(
                "SELECT pg_advisory_xact_lock($1)", _lock_key(self._namespace, "purge")
            )
            deliveries = await conn.fetchval(
                _PURGE_DELIVERIES, delivered_before, dead_before, batch
            )
            # Events no delivery refers to any more (or that matched no endpoint); their ids
            # stop deduplicating now, long after sFOX could resend them.
            events = await conn.execute(_PURGE_EVENTS, delivered_before, batch)
            await conn.execute(
                "DELETE FROM bad_frames WHERE id IN (SELECT id FROM bad_frames WHERE at < $1 "
                "LIMIT $2)",
                dead_before,
                batch,
            )
            return int(deliveries) + int(events.rsplit(" ", 1)[-1])

        return await self._run(purge)

    # -- endpoint health (CONTRACT.md 5b, 5c): state rows and transactions only ------------

    async def health_rows(self, kind: str) -> dict[str, HealthRow]:
        async def query(conn: Conn) -> dict[str, HealthRow]:
            rows = await conn.fetch(sql.HEALTH_ROWS, kind)
            return {row["name"]: core.health_row(row) for row in rows}

        return await self._run(query, tx=False)

    @staticmethod
    async def _health_cas(conn: Conn, kind: str, name: str, row: HealthRow, now: float) -> bool:
        if row.version == 0:
            status = await conn.execute(sql.HEALTH_CREATE, kind, name, row.state, row.data, now)
        else:
            status = await conn.execute(
                sql.HEALTH_UPDATE, kind, name, row.state, row.data, now, row.version
            )
        return bool(status.endswith(" 1"))

    async def health_write(
        self, kind: str, name: str, row: HealthRow, now: float, **also: Unpack[HealthWrite]
    ) -> bool:
        alert, alert_endpoint = also.get("alert"), also.get("alert_endpoint")

        async def write(conn: Conn) -> bool:
            if not await self._health_cas(conn, kind, name, row, now):
                return False
            due = False
            if also.get("release"):
                status = await conn.execute(sql.RELEASE_ENDPOINT, now, name)
                due = not status.endswith(" 0")
            if alert is not None and alert_endpoint is not None:
                seq = await conn.fetchval(
                    sql.INSERT_ALERT_EVENT,
                    alert.event_id,
                    alert.source,
                    alert.recipient,
                    alert.body,
                    False,
                    now,
                )
                if seq is not None:
                    await conn.execute(sql.INSERT_ALERT_DELIVERY, seq, alert_endpoint, now)
                    due = True
            if due:
                await self._notify(conn)
            return True

        return await self._run(write)

    async def claim_probe(
        self, endpoint: str, now: float, row: HealthRow, after_user: str | None
    ) -> records.Claim | None:
        async def claim(conn: Conn) -> records.Claim | None:
            picked = await conn.fetchrow(
                "WITH picked AS (SELECT id FROM deliveries WHERE state = 'pending' "
                "AND endpoint = $1 AND next_at <= $2 ORDER BY "
                "($3::text IS NOT NULL AND COALESCE(user_id, '') <= $3::text), "
                "COALESCE(user_id, ''), next_at, id LIMIT 1 FOR UPDATE SKIP LOCKED) "
                "UPDATE deliveries d SET state = 'inflight', claimed_by = $4, "
                "lease_until = $2::float8 + $5::float8, updated_at = $2 FROM picked "
                "WHERE d.id = picked.id RETURNING d.id, d.event_seq, d.user_id, d.attempts, "
                "d.created_at",
                endpoint,
                now,
                after_user,
                self.replica,
                self.lease,
            )
            if picked is None:
                return None
            if not await self._health_cas(conn, "endpoint", endpoint, row, now):
                raise core.RowMoved
            event = await conn.fetchrow(
                "SELECT event_id, source, body, has_token FROM events WHERE seq = $1",
                picked["event_seq"],
            )
            if event is None:  # deliveries refer to their event until both are purged
                raise StoreError(f"{self.display}: delivery {picked['id']} has no event")
            return core.claim({**picked, **event}, endpoint)

        try:
            return await self._run(claim, durable=False)
        except core.RowMoved:  # rolled back: another replica changed the row
            return None

    async def dead_summary(self, endpoint: str, since: float) -> records.DeadSummary | None:
        async def query(conn: Conn) -> records.DeadSummary | None:
            found = await conn.fetchrow(sql.DEAD_SUMMARY, endpoint, since)
            return None if found is None else core.dead_summary(found)

        return await self._run(query, tx=False)

    async def beat(self, replica: str, now: float, ttl: float) -> int:
        async def beat(conn: Conn) -> int:
            await conn.execute(sql.BEAT, replica, now)
            await conn.execute(sql.FORGET_REPLICAS, now - 100 * ttl)
            return int(await conn.fetchval(sql.LIVE_REPLICAS, now - ttl))

        return await self._run(beat, durable=False)
