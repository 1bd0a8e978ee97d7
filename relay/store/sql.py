"""Statements both backends run as they are: portable SQL with ``$n`` parameters.

PostgreSQL takes them verbatim; SQLite through :func:`for_sqlite` (``?n``). Only what is the
same on both lives here; each backend keeps its own set-based and locking SQL.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from relay.store.core import ACTIVE_SQL, FINISHED_SQL, DeliveryState, sql_states
from relay.store.records import Page, ReplaySelection, Selection

__all__ = [
    "ATTEMPTS_OF",
    "BEAT",
    "DEAD_STATS",
    "DEAD_SUMMARY",
    "DELIVERY",
    "DELIVERY_COLUMNS",
    "DELIVERY_INSERT_COLUMNS",
    "HEAD_STATES",
    "HEALTH_STATS",
    "FORGET_REPLICAS",
    "Filters",
    "HEALTH_CREATE",
    "HEALTH_ROWS",
    "HEALTH_UPDATE",
    "INSERT_ALERT_DELIVERY",
    "INSERT_ALERT_EVENT",
    "LIVE_REPLICAS",
    "LANE_COLUMNS",
    "MARK_BASELINE",
    "PENDING_STATS",
    "RELEASE_ENDPOINT",
    "RENAME_ENDPOINT",
    "REPLAY",
    "SETTLE",
    "UPSERT_HEALTH",
    "USER_STATES",
    "USER_STATE_COLUMNS",
    "WAITING_STATES",
    "delivered_high",
    "for_sqlite",
    "insert_deliveries",
    "upsert_user_states",
    "lane_rows",
    "list_deliveries",
    "replay_candidates",
    "replay_selection",
    "retry_now",
]

#: A delivery as users see it (:func:`relay.store.core.delivery_info`), joined with its event.
#: ``attempts`` shown is the number of attempt records; ``d.attempts`` is the retry schedule's
#: position, which a replay resets (and a probe does not advance).
DELIVERY_COLUMNS = """
    d.id, d.endpoint, e.event_id, d.user_id, d.state, e.source, e.status,
    d.next_at, d.created_at, d.updated_at, d.last_status, d.last_error,
    CAST((SELECT COUNT(*) FROM attempts a WHERE a.delivery_id = d.id) AS INTEGER) AS attempts
"""

#: What :func:`relay.store.core.settle` needs of a lane's delivery.
LANE_COLUMNS = "id, endpoint, user_id, state, attempts, ts, ord, feed_ts, replayed, next_at"


def lane_rows(users: str, states: str = ACTIVE_SQL) -> str:
    """The lane rows of the users ``users`` names (a backend's ``IN`` or ``ANY``) in these
    states (default: every active one)."""
    return f"SELECT {LANE_COLUMNS} FROM deliveries WHERE user_id {users} AND state IN {states}"


#: The one delivery of each lane that is pending or in flight.
HEAD_STATES = sql_states((DeliveryState.PENDING, DeliveryState.INFLIGHT))
WAITING_STATES = sql_states((DeliveryState.WAITING,))


def delivered_high(users: str) -> str:
    """Per lane of these users, the newest sFOX timestamp of a feed event delivered on it."""
    return (
        "SELECT endpoint, user_id, MAX(feed_ts) AS feed_ts FROM deliveries "
        f"WHERE user_id {users} AND state = '{DeliveryState.DELIVERED.value}' "
        "AND feed_ts IS NOT NULL GROUP BY endpoint, user_id"
    )


#: A user's state columns, as :func:`relay.store.core.state_row` reads them.
USER_STATE_COLUMNS = "user_id, status, requirements, event_id, source, high_ts"

_STATE_WRITE = (*USER_STATE_COLUMNS.split(", "), "updated_at")

#: New deliveries: their place in the lane, and the timestamp that makes them stale.
DELIVERY_INSERT_COLUMNS = (
    "event_seq, endpoint, user_id, ord, state, next_at, created_at, updated_at, ts, feed_ts"
)


def upsert_user_states(rows: str) -> str:
    """Write users' states (:class:`relay.store.core.StateRow` and ``updated_at``) from
    ``rows`` (a backend's ``VALUES`` or ``SELECT``)."""
    updates = ", ".join(f"{c} = excluded.{c}" for c in _STATE_WRITE[1:])
    return (
        f"INSERT INTO user_state ({', '.join(_STATE_WRITE)}) {rows} "
        f"ON CONFLICT (user_id) DO UPDATE SET {updates}"
    )


def insert_deliveries(rows: str) -> str:
    """Insert deliveries (:data:`DELIVERY_INSERT_COLUMNS`) from ``rows``."""
    return f"INSERT INTO deliveries ({DELIVERY_INSERT_COLUMNS}) {rows}"


#: One delivery with its event's body (:func:`relay.store.core.delivery_detail`).
DELIVERY = (
    f"SELECT {DELIVERY_COLUMNS}, e.body FROM deliveries d JOIN events e ON e.seq = d.event_seq "
    "WHERE d.id = $1"
)

MARK_BASELINE = (
    "INSERT INTO meta (key, value) VALUES ('reconcile_baseline', $1) ON CONFLICT (key) DO NOTHING"
)

#: A replayed delivery (:class:`relay.store.core.Replayed`): a fresh schedule and place.
REPLAY = """
    UPDATE deliveries SET state = $2, attempts = 0, next_at = $4, updated_at = $4, ts = $5,
        ord = $3, replayed = TRUE
    WHERE id = $1
"""


def list_deliveries(page: Page, *, mark: str = "$") -> tuple[str, list[Any]]:
    """One page of deliveries, newest first: the query and its arguments."""
    found = Filters.of(page, mark=mark)
    if page.get("before") is not None:
        found.add("d.id < {}", page.get("before"))
    query = (
        f"SELECT {DELIVERY_COLUMNS} FROM deliveries d JOIN events e ON e.seq = d.event_seq "
        f"{found.where()} ORDER BY d.id DESC LIMIT {found.next_mark()}"
    )
    return query, [*found.args, page.get("limit", 50)]


def replay_selection(selection: ReplaySelection, *, mark: str = "$") -> Filters | None:
    """The finished deliveries a replay selects (None: an empty list of ids, nothing)."""
    found = Filters.of(selection, mark=mark)
    found.add(f"d.state IN {FINISHED_SQL}")
    ids = selection.get("ids")
    if ids is not None:
        if not ids:
            return None
        found.ids(ids)
    return found


def replay_candidates(found: Filters) -> str:
    """The finished deliveries ``found`` selects, in lane order, with their user's newest key."""
    return (
        "SELECT d.id, d.endpoint, d.user_id, COALESCE(u.high_ts, 0) AS high_ts FROM deliveries d "
        f"LEFT JOIN user_state u ON u.user_id = d.user_id {found.where()} "
        "ORDER BY d.ts, d.ord, d.id"
    )


#: One change of :func:`relay.store.core.settle`, applied only if the row is still as seen.
SETTLE = """
    UPDATE deliveries SET state = $1, next_at = $2, updated_at = $3
    WHERE id = $4 AND state = $5
"""

#: One endpoint's folded health (:func:`relay.store.core.fold_health`) against what is
#: stored: counts add up, the newest success and failure win (equal times: the new one).
UPSERT_HEALTH = """
    INSERT INTO endpoint_health (endpoint, delivered_total, last_success_at, last_failure_at,
        last_error)
    VALUES ($1, $2, $3, $4, $5)
    ON CONFLICT (endpoint) DO UPDATE SET
        delivered_total = endpoint_health.delivered_total + excluded.delivered_total,
        last_success_at = CASE WHEN excluded.last_success_at IS NULL
            OR endpoint_health.last_success_at > excluded.last_success_at
            THEN endpoint_health.last_success_at ELSE excluded.last_success_at END,
        last_error = CASE WHEN excluded.last_failure_at IS NULL
            OR endpoint_health.last_failure_at > excluded.last_failure_at
            THEN endpoint_health.last_error ELSE excluded.last_error END,
        last_failure_at = CASE WHEN excluded.last_failure_at IS NULL
            OR endpoint_health.last_failure_at > excluded.last_failure_at
            THEN endpoint_health.last_failure_at ELSE excluded.last_failure_at END
"""

#: The unfinished deliveries per endpoint, and the oldest one's creation time.
PENDING_STATS = (
    "SELECT endpoint, COUNT(*) AS count, MIN(created_at) AS oldest FROM deliveries "
    f"WHERE state IN {ACTIVE_SQL} GROUP BY endpoint"
)
DEAD_STATS = (
    "SELECT endpoint, COUNT(*) AS dead FROM deliveries WHERE state = 'dead' GROUP BY endpoint"
)
HEALTH_STATS = (
    "SELECT endpoint, delivered_total, last_success_at, last_failure_at, last_error "
    "FROM endpoint_health"
)
USER_STATES = "SELECT user_id, status, requirements, event_id, source FROM user_state"
ATTEMPTS_OF = (
    "SELECT at, status, latency, error, excerpt FROM attempts WHERE delivery_id = $1 ORDER BY n"
)


def retry_now(selection: Selection, now: float, *, mark: str = "$") -> tuple[str, list[Any]]:
    """Make the pending deliveries ``selection`` picks that wait for a scheduled retry due at
    ``now``: the statement and its arguments. Only a lane's one pending delivery can wait for
    a retry, so lanes keep their order."""
    found = Filters.of({**selection, "state": None}, mark=mark)
    found.add(f"d.state = '{DeliveryState.PENDING.value}'")
    found.add("d.next_at > {}", now)
    at = found.next_mark()
    statement = (
        f"UPDATE deliveries SET next_at = {at}, updated_at = {at} "
        f"WHERE id IN (SELECT d.id FROM deliveries d {found.where()})"
    )
    return statement, [*found.args, now]


# -- endpoint health (CONTRACT.md 5b, 5c): state rows, alerts, probes, heartbeats -------------

HEALTH_ROWS = "SELECT name, state, version, data FROM health WHERE kind = $1"

#: Compare-and-set of a health row: the first one (version 0 read) ...
HEALTH_CREATE = """
    INSERT INTO health (kind, name, state, version, data, updated_at)
    VALUES ($1, $2, $3, 1, $4, $5) ON CONFLICT (kind, name) DO NOTHING
"""
#: ... or the next version of the one read (``$6``).
HEALTH_UPDATE = """
    UPDATE health SET state = $3, version = version + 1, data = $4, updated_at = $5
    WHERE kind = $1 AND name = $2 AND version = $6
"""

#: An endpoint's pending deliveries become due now (a breaker closed or was resumed).
RELEASE_ENDPOINT = f"""
    UPDATE deliveries SET next_at = $1, updated_at = $1
    WHERE state = '{DeliveryState.PENDING.value}' AND endpoint = $2 AND next_at > $1
"""

#: A relay alert event (no user, no token), stored once per event id.
INSERT_ALERT_EVENT = """
    INSERT INTO events (event_id, source, recipient, user_id, status, requirements, body,
        has_token, received_at)
    VALUES ($1, $2, $3, NULL, NULL, NULL, $4, $5, $6)
    ON CONFLICT (event_id) DO NOTHING RETURNING seq
"""

#: The alert's delivery to the alert endpoint: no lane, due now, placed by its own seq.
INSERT_ALERT_DELIVERY = insert_deliveries(
    f"VALUES ($1, $2, NULL, $1, '{DeliveryState.PENDING.value}', $3, $3, $3, 0, NULL)"
)

#: Deliveries of an endpoint that went dead since ``$2``: how many, and the first of them.
DEAD_SUMMARY = f"""
    SELECT COUNT(*) OVER () AS n, d.id, e.event_id, d.user_id FROM deliveries d
    JOIN events e ON e.seq = d.event_seq
    WHERE d.state = '{DeliveryState.DEAD.value}' AND d.updated_at >= $2 AND d.endpoint = $1
    ORDER BY d.updated_at, d.id LIMIT 1
"""

#: A replica's heartbeat, forgetting replicas long gone (``$3``) ...
BEAT = """
    INSERT INTO replicas (name, seen_at) VALUES ($1, $2)
    ON CONFLICT (name) DO UPDATE SET seen_at = excluded.seen_at
"""
FORGET_REPLICAS = "DELETE FROM replicas WHERE seen_at < $1"
#: ... and how many beat recently.
LIVE_REPLICAS = "SELECT COUNT(*) FROM replicas WHERE seen_at >= $1"


def for_sqlite(statement: str) -> str:
    """``statement`` with SQLite's numbered parameters (``?1``) for PostgreSQL's (``$1``)."""
    return statement.replace("$", "?")


class Filters:
    """WHERE terms with numbered parameters, for the filters of ``deliveries list``/replay.

    ``mark`` is the parameter prefix: ``$`` (PostgreSQL) or ``?`` (SQLite).
    """

    def __init__(self, mark: str = "$") -> None:
        self.mark = mark
        self.terms: list[str] = []
        self.args: list[Any] = []

    def add(self, term: str, *values: Any) -> None:
        """``term`` uses ``{}`` for each value, in order."""
        marks = []
        for value in values:
            self.args.append(value)
            marks.append(f"{self.mark}{len(self.args)}")
        self.terms.append(term.format(*marks))

    @classmethod
    def of(cls, selection: Selection, *, mark: str = "$") -> Filters:
        found = cls(mark)
        state = selection.get("state")
        if state == "pending":
            found.add(f"d.state IN {ACTIVE_SQL}")
        elif state is not None:
            found.add("d.state = {}", state)
        if selection.get("endpoint") is not None:
            found.add("d.endpoint = {}", selection.get("endpoint"))
        if selection.get("user_id") is not None:
            found.add("d.user_id = {}", selection.get("user_id"))
        if selection.get("event_id") is not None:
            found.add(
                "d.event_seq = (SELECT seq FROM events WHERE event_id = {})",
                selection.get("event_id"),
            )
        return found

    def ids(self, ids: Sequence[int]) -> None:
        """Only these delivery ids."""
        if self.mark == "$":
            self.add("d.id = ANY({}::bigint[])", list(ids))
        else:
            self.add(f"d.id IN ({', '.join('{}' for _ in ids)})", *ids)

    def where(self) -> str:
        return f"WHERE {' AND '.join(self.terms)}" if self.terms else ""

    def next_mark(self) -> str:
        """The mark of the next parameter (for a trailing LIMIT)."""
        return f"{self.mark}{len(self.args) + 1}"


#: An endpoint's work and state moved from a former name ($1) to its name now ($2): names
#: were once the URL's host and path as they are, and are slugs now. State rows already
#: under the new name win over the old ones.
RENAME_ENDPOINT = (
    "UPDATE deliveries SET endpoint = $2 WHERE endpoint = $1",
    "UPDATE endpoint_health SET endpoint = $2 WHERE endpoint = $1 "
    "AND NOT EXISTS (SELECT 1 FROM endpoint_health WHERE endpoint = $2)",
    "DELETE FROM endpoint_health WHERE endpoint = $1 AND endpoint <> $2",
    "UPDATE health SET name = $2 WHERE kind <> 'feed' AND name = $1 "
    "AND NOT EXISTS (SELECT 1 FROM health h WHERE h.kind = health.kind AND h.name = $2)",
    "DELETE FROM health WHERE kind <> 'feed' AND name = $1 AND name <> $2",
)
