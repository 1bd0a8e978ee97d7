"""The outbox's rules, written once: pure functions both backends call (no I/O, no SQL run).

A backend (SQLite, PostgreSQL) owns connections, transactions, locks, migrations and SQL
text; every decision about what a row becomes is made here, on plain values, so both stores
decide alike and the rules are tested as tables without a database (the split procrastinate
makes between its ``JobManager`` and its connectors).

The rules:

- **Stale reconciled events** (:func:`is_stale`): a reconciled event is stored only while the
  user's state is still the one it replaces.
- **Fan-out** (:func:`fan_out`): one delivery per matching endpoint; the user's new state;
  section 5a's equal-state rule marks a feed event ``superseded`` for ``strip`` endpoints.
- **Lanes** (:func:`settle`): deliveries of one (endpoint, user_id) lane go in the order of
  their key (sFOX ``timestamp``, then store order); at most one is ``pending`` or
  ``inflight``; a feed event older than one already delivered on its lane is ``superseded``.
- **Health** (:func:`fold_health`): several outcomes of one endpoint in one call fold into one
  change of its stats, the same on every store.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from relay import events as ev
from relay.codec import compact_json, loads
from relay.events import NewEvent
from relay.store.records import (
    Attempt,
    Claim,
    DeadSummary,
    DeliveryDetail,
    DeliveryInfo,
    EndpointStats,
    HealthRow,
    Outcome,
    PublicState,
    Target,
    UserState,
)

__all__ = [
    "ACTIVE",
    "ACTIVE_SQL",
    "FINISHED",
    "FINISHED_SQL",
    "DeliveryState",
    "FanOut",
    "Health",
    "LaneRow",
    "NewDelivery",
    "PublicState",
    "StateRow",
    "Change",
    "Replayed",
    "RowMoved",
    "Verdict",
    "attempts_used",
    "claim",
    "dead_summary",
    "delivery_detail",
    "delivery_info",
    "event_row",
    "health_row",
    "finished_lanes",
    "lane_users",
    "replay_plan",
    "superseded",
    "verdict_row",
    "just_delivered",
    "overtaking",
    "endpoint_stats",
    "delivered_high",
    "lane_row",
    "lane_ts",
    "state_row",
    "user_state",
    "display_body",
    "error_text",
    "fan_out",
    "fold_health",
    "format_delivery_id",
    "is_stale",
    "parse_delivery_id",
    "place",
    "public_state",
    "segments",
    "settle",
    "sql_states",
]


#: A row as a driver returns it (``sqlite3.Row`` or ``asyncpg.Record``: same column names).
Row = Any


class DeliveryState(StrEnum):
    """Where a delivery (one event for one endpoint) stands.

    ``waiting``: another delivery of its lane goes first; ``pending``: may be claimed once
    ``next_at`` has passed; ``inflight``: claimed by a dispatcher; the rest are final.
    """

    WAITING = "waiting"
    PENDING = "pending"
    INFLIGHT = "inflight"
    DELIVERED = "delivered"
    DEAD = "dead"
    SUPERSEDED = "superseded"


ACTIVE: tuple[DeliveryState, ...] = (
    DeliveryState.WAITING,
    DeliveryState.PENDING,
    DeliveryState.INFLIGHT,
)
FINISHED: tuple[DeliveryState, ...] = (
    DeliveryState.DELIVERED,
    DeliveryState.DEAD,
    DeliveryState.SUPERSEDED,
)


def sql_states(states: Iterable[DeliveryState]) -> str:
    """A SQL list of state literals, ``('a', 'b')``; repeated verbatim where a partial
    index's predicate must match it."""
    return "(" + ", ".join(f"'{s.value}'" for s in states) + ")"


ACTIVE_SQL = sql_states(ACTIVE)
FINISHED_SQL = sql_states(FINISHED)
#: Every state, for a CHECK constraint.
ALL_SQL = sql_states(DeliveryState)


def public_state(state: str) -> PublicState:
    """The state users see: the three active states are all ``pending``."""
    value = DeliveryState(state)
    if value in ACTIVE:
        return "pending"
    return value.value  # type: ignore[return-value]


def format_delivery_id(number: int) -> str:
    """The opaque id users and the API see."""
    return f"dlv_{number}"


#: Delivery keys are 64-bit signed integers in both stores.
_MAX_DELIVERY_KEY = 2**63 - 1


def parse_delivery_id(text: str) -> int | None:
    """The store's key for an opaque id, or None if it is not one of ours.

    An id no store can hold (``dlv_99999999999999999999``, or thousands of digits, which
    ``int()`` refuses) is not one of ours either: a 404, never a store or parser error.
    """
    digits = text[4:]
    if not text.startswith("dlv_") or not (digits.isascii() and digits.isdigit()):
        return None
    if len(digits.lstrip("0")) > 19:
        return None
    number = int(digits)
    return number if number <= _MAX_DELIVERY_KEY else None


def display_body(body: bytes) -> str:
    """The stored body with a sealed token shown as such (its ciphertext is of no use here)."""
    message = loads(body)
    payload = message.get("payload") if isinstance(message, dict) else None
    if isinstance(payload, dict) and "user_token" in payload:
        payload["user_token"] = "[sealed]"
    return compact_json(message).decode()


# -- ingest -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StateRow:
    """The last state stored for a user, and the newest lane key its events reached."""

    user_id: str
    status: str | None
    requirements: str | None
    event_id: str | None
    source: str
    high_ts: int = 0

    def values(self) -> tuple[Any, ...]:
        """The columns in the order the stores write them (cheaper than ``astuple``)."""
        return (
            self.user_id,
            self.status,
            self.requirements,
            self.event_id,
            self.source,
            self.high_ts,
        )


def is_stale(event: NewEvent, state: StateRow | None) -> bool:
    """A reconciled event whose base state changed meanwhile (the feed was newer): not stored.

    Checked under the user's lock in the same transaction that writes the new state, so a
    crash or a second replica never emits the same change twice.
    """
    if event.source != "reconcile" or event.user_id is None:
        return False
    return (state.event_id if state is not None else None) != event.after


def segments(events: Sequence[NewEvent]) -> list[list[NewEvent]]:
    """Split a batch into runs in which each user appears at most once.

    Within a run no stale check, user state or lane decision depends on another event of the
    same run, so a backend can write each run set-wise.
    """
    runs: list[list[NewEvent]] = [[]]
    users: set[str] = set()
    for event in events:
        if event.user_id is not None:
            if event.user_id in users:
                runs.append([])
                users = set()
            users.add(event.user_id)
        runs[-1].append(event)
    return [run for run in runs if run]


def event_row(event: NewEvent) -> tuple[Any, ...]:
    """The ``events`` columns of a new event, in the order both stores insert them."""
    return (
        event.event_id,
        event.source,
        event.recipient,
        event.user_id,
        event.status,
        event.requirements,
        event.body,
        event.has_token,
    )


#: Lane keys are signed 64-bit columns on both stores. sFOX's timestamps (19 digits) fit;
#: any integer a frame may carry beyond that is clamped, so it sorts last (or first), in
#: store order, instead of failing the batch it came in.
_TS_MIN, _TS_MAX = -(2**63), 2**63 - 1


def lane_ts(timestamp: int) -> int:
    """A feed event's place in its lane: its sFOX timestamp, within 64 bits."""
    return max(_TS_MIN, min(timestamp, _TS_MAX))


@dataclass(frozen=True, slots=True)
class NewDelivery:
    """A delivery row to insert.

    ``ts`` and ``ord`` are its place in the lane (sFOX timestamp, then store order);
    ``feed_ts`` is the sFOX timestamp that makes it stale or makes others stale (feed events
    only: reconciled events never make a feed event stale).
    """

    seq: int
    endpoint: str
    user_id: str | None
    state: DeliveryState
    next_at: float
    ts: int
    feed_ts: int | None


@dataclass(slots=True)
class FanOut:
    """What storing a run of new events writes besides the events themselves."""

    deliveries: list[NewDelivery] = field(default_factory=list)
    states: list[StateRow] = field(default_factory=list)  # upserts, one per user
    superseded: dict[str, int] = field(default_factory=dict)
    #: Users whose new feed event is older than the newest one stored for them: only their
    #: lanes can hold a delivered event that makes it stale.
    late: list[str] = field(default_factory=list)


def fan_out(
    stored: Sequence[tuple[int, NewEvent]],
    targets: Sequence[Target],
    states: dict[str, StateRow],
    now: float,
    *,
    hold_until: float | None = None,
) -> FanOut:
    """Deliveries and user states for newly stored events (``(seq, event)``, one run).

    ``states`` is updated in place, so the next run of the batch sees this one. Lane events
    start ``waiting``; :func:`settle` then lets the right one of each lane go. A feed event
    stored while ``hold_until`` lies ahead (a replica's reorder window after a subscription)
    becomes due only then, so that other replicas' earlier events of its user come first.
    """
    plan = FanOut()
    for seq, event in stored:
        before = states.get(event.user_id) if event.user_id is not None else None
        reconciled_same = (
            event.source == "feed"
            and before is not None
            and before.source == "reconcile"
            and before.status == event.status
            and before.requirements == event.requirements
        )
        high = before.high_ts if before is not None else 0
        if event.source == "feed" and event.timestamp is not None:
            ts = feed_ts = lane_ts(event.timestamp)
        else:  # a reconciled event goes after every event of its user stored before it
            ts, feed_ts = high, None
        if event.user_id is not None:
            if before is not None and feed_ts is not None and ts < high:
                plan.late.append(event.user_id)
            if before is None or ts >= high:  # the newest so far: reconciliation compares it
                after = StateRow(
                    event.user_id,
                    event.status,
                    event.requirements,
                    event.event_id,
                    event.source,
                    ts,
                )
            else:  # an older event arriving late describes no current state
                after = before
            if after is not before:
                states[event.user_id] = after
                plan.states.append(after)
        due = now
        if hold_until is not None and event.source == "feed" and event.user_id is not None:
            due = max(due, hold_until)
        for target in targets:
            if not ev.routes((target,), event):
                continue
            if reconciled_same and not target.wants_token:
                plan.superseded[target.name] = plan.superseded.get(target.name, 0) + 1
                state = DeliveryState.SUPERSEDED
            elif event.user_id is None:
                state = DeliveryState.PENDING
            else:
                state = DeliveryState.WAITING
            plan.deliveries.append(
                NewDelivery(
                    seq,
                    target.name,
                    event.user_id,
                    state,
                    max(due, now + target.first_delay),
                    ts,
                    feed_ts,
                )
            )
    return plan


# -- lanes ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LaneRow:
    """A delivery of a lane as :func:`settle` needs it (active ones, and delivered ones)."""

    id: int
    endpoint: str
    user_id: str
    state: str
    attempts: int
    ts: int
    ord: int
    feed_ts: int | None
    replayed: bool
    next_at: float


@dataclass(frozen=True, slots=True)
class Change:
    """One delivery moving from ``was`` to ``state`` (applied only if still ``was``)."""

    id: int
    endpoint: str
    was: str
    state: DeliveryState
    next_at: float


def _untouched(row: LaneRow) -> bool:
    """Pending and never attempted: nothing of it has left the relay, so an older event may
    still go before it."""
    return row.state == DeliveryState.PENDING and row.attempts == 0


Lane = tuple[str, str]  # (endpoint, user_id)


def settle(
    rows: Iterable[LaneRow], now: float, delivered: Mapping[Lane, int] | None = None
) -> list[Change]:
    """The changes that restore every lane's rules, given its active rows (waiting, pending,
    in flight) and, per lane, the newest sFOX timestamp of a feed event delivered on it.

    Per lane, in key order (``ts``, then ``ord``):

    - a waiting feed event older than a feed event already delivered on the lane is
      ``superseded`` (decided before sending; never for a replay);
    - at most one delivery is ``pending`` or ``inflight``: the first waiting one when none
      is; or, when the active one is pending and untouched, an older waiting one takes its
      place (it goes back to waiting);
    - an active one that was attempted (in flight, or retrying) keeps its place: an older
      event waits for its outcome (delivered: the older is then superseded; dead: it is sent).

    Idempotent: rows that already keep the rules produce no change.
    """
    lanes: dict[Lane, list[LaneRow]] = {}
    for row in rows:
        lanes.setdefault((row.endpoint, row.user_id), []).append(row)
    changes: list[Change] = []
    for name, lane in lanes.items():
        newest = (delivered or {}).get(name)
        waiting: list[LaneRow] = []
        active: LaneRow | None = None
        for row in sorted(lane, key=lambda r: (r.ts, r.ord, r.id)):
            if row.state in (DeliveryState.PENDING, DeliveryState.INFLIGHT):
                active = row
            elif row.state != DeliveryState.WAITING:
                continue
            elif (
                not row.replayed
                and row.feed_ts is not None
                and newest is not None
                and row.feed_ts < newest
            ):
                changes.append(
                    Change(row.id, row.endpoint, row.state, DeliveryState.SUPERSEDED, row.next_at)
                )
            else:
                waiting.append(row)
        if not waiting:
            continue
        first = waiting[0]
        if active is not None:
            if not _untouched(active) or (active.ts, active.ord) <= (first.ts, first.ord):
                continue
            changes.append(
                Change(
                    active.id, active.endpoint, active.state, DeliveryState.WAITING, active.next_at
                )
            )
        changes.append(
            Change(
                first.id,
                first.endpoint,
                first.state,
                DeliveryState.PENDING,
                max(first.next_at, now),
            )
        )
    return changes


def place(
    new: Sequence[NewDelivery],
    rows: Iterable[LaneRow],
    delivered: Mapping[Lane, int],
    now: float,
) -> tuple[list[NewDelivery], list[Change], Counter[str]]:
    """New deliveries with the state :func:`settle` gives them among their lanes' active
    ``rows``, the changes to those rows (an older event taking an untouched one's place),
    and how many deliveries, new or not, this superseded per endpoint.

    Decided before inserting, so that a new delivery is written once, in its final state.
    """
    virtual = {
        -(i + 1): d for i, d in enumerate(new) if d.state == DeliveryState.WAITING and d.user_id
    }
    lane_rows = [*rows]
    for key, d in virtual.items():
        assert d.user_id is not None
        lane_rows.append(
            LaneRow(
                key, d.endpoint, d.user_id, d.state, 0, d.ts, d.seq, d.feed_ts, False, d.next_at
            )
        )
    decided: dict[int, Change] = {}
    changes: list[Change] = []
    everything = settle(lane_rows, now, delivered)
    for change in everything:
        if change.id < 0:
            decided[change.id] = change
        else:
            changes.append(change)
    placed = list(new)
    for key, change in decided.items():
        index = -key - 1
        placed[index] = replace(new[index], state=change.state, next_at=change.next_at)
    return placed, changes, superseded(everything)


def overtaking(new: Iterable[NewDelivery], heads: Iterable[LaneRow]) -> list[str]:
    """Users for whom :func:`place` needs their lanes' waiting rows too, beyond each lane's
    head (its pending or in-flight delivery): where a new delivery is older than an
    untouched head. Elsewhere a lane's waiting rows cannot change the new one's state."""
    untouched = {(h.endpoint, h.user_id): (h.ts, h.ord) for h in heads if _untouched(h)}
    return sorted(
        {
            d.user_id
            for d in new
            if d.user_id is not None
            and (d.endpoint, d.user_id) in untouched
            and (d.ts, d.seq) < untouched[d.endpoint, d.user_id]
        }
    )


def delivered_high(rows: Iterable[Row]) -> dict[Lane, int]:
    """``(endpoint, user_id, feed_ts)`` rows, the newest delivered feed event of each lane."""
    return {(row["endpoint"], row["user_id"]): row["feed_ts"] for row in rows}


def just_delivered(verdicts: Iterable[tuple[str, str | None, str, int | None]]) -> dict[Lane, int]:
    """Per lane, the newest feed event among ``(endpoint, user_id, state, feed_ts)`` verdicts
    that were delivered.

    Enough to settle those lanes: no waiting delivery is ever older than a feed event
    delivered before (it was superseded then, or when it was placed), so only the one just
    delivered can make another stale.
    """
    newest: dict[Lane, int] = {}
    for endpoint, user_id, state, feed_ts in verdicts:
        if state == DeliveryState.DELIVERED and user_id is not None and feed_ts is not None:
            lane = (endpoint, user_id)
            newest[lane] = max(newest.get(lane, feed_ts), feed_ts)
    return newest


def superseded(changes: Iterable[Change]) -> Counter[str]:
    """How many deliveries per endpoint ``changes`` supersede (for the metrics)."""
    return Counter(c.endpoint for c in changes if c.state == DeliveryState.SUPERSEDED)


def finished_lanes(verdicts: Iterable[tuple[str, str | None, str]]) -> set[Lane]:
    """The lanes whose head a verdict finished, from ``(endpoint, user_id, new state)``:
    only they can move on, and they have no head left, so their waiting rows suffice."""
    return {
        (endpoint, user)
        for endpoint, user, state in verdicts
        if user is not None and state != DeliveryState.PENDING
    }


@dataclass(frozen=True, slots=True)
class Replayed:
    """A finished delivery re-queued: a fresh place after everything its user stored so far.

    It goes through :func:`settle` like a new one and is never superseded.
    """

    id: int
    user_id: str | None
    state: DeliveryState
    ts: int
    ord: int


def replay_plan(rows: Sequence[Row], positions: Iterable[int]) -> list[Replayed]:
    """Replays for finished rows (``id``, ``user_id``, the user's ``high_ts``), in lane order,
    taking ``positions`` (fresh store-order numbers, ascending) one each."""
    return [
        Replayed(
            row["id"],
            row["user_id"],
            DeliveryState.PENDING if row["user_id"] is None else DeliveryState.WAITING,
            row["high_ts"],
            position,
        )
        for row, position in zip(rows, positions, strict=False)
    ]


def lane_users(replayed: Iterable[Replayed]) -> list[str]:
    """The users (sorted, once each) whose lanes replays touched."""
    return sorted({r.user_id for r in replayed if r.user_id is not None})


# -- verdicts and endpoint health -------------------------------------------------------------


def attempts_used(outcome: Outcome) -> int:
    """How many steps of the retry schedule a verdict with an attempt uses: one, except a
    probe's (an open endpoint's test delivery, CONTRACT.md 5b), which is recorded and
    counted but leaves the schedule where it was."""
    return 0 if outcome.probe else 1


def verdict_row(outcome: Outcome) -> tuple[Any, ...]:
    """A verdict with an attempt: id, state, next_at, the attempt's columns, then how many
    schedule steps it uses (:func:`attempts_used`)."""
    a = outcome.attempt
    assert a is not None, "released outcomes carry no attempt"
    return (
        outcome.delivery_id,
        outcome.state,
        outcome.next_at,
        a.at,
        a.status,
        a.latency,
        a.error,
        a.excerpt,
        attempts_used(outcome),
    )


@dataclass(frozen=True, slots=True)
class Verdict:
    """An applied verdict with an attempt, as :func:`fold_health` needs it."""

    endpoint: str
    state: str
    at: float
    status: int | None
    error: str | None


@dataclass(frozen=True, slots=True)
class Health:
    """The change one batch of verdicts makes to an endpoint's stats."""

    endpoint: str
    delivered: int
    last_success_at: float | None
    last_failure_at: float | None
    last_error: str | None

    def values(self) -> tuple[Any, ...]:
        """The columns in the order :data:`relay.store.sql.UPSERT_HEALTH` takes them."""
        return (
            self.endpoint,
            self.delivered,
            self.last_success_at,
            self.last_failure_at,
            self.last_error,
        )


def error_text(status: int | None, error: str | None) -> str:
    """What an attempt's failure is called in the endpoint's stats."""
    if error:
        return error
    return f"HTTP {status}" if status is not None else "failed"


def fold_health(verdicts: Sequence[Verdict]) -> list[Health]:
    """One change per endpoint, whatever the number of outcomes recorded in one call.

    The newest attempt wins (by its time; equal times: the later in the batch), the rule the
    store then also applies against what it already holds.
    """
    folded: dict[str, Health] = {}
    for v in verdicts:
        old = folded.get(v.endpoint) or Health(v.endpoint, 0, None, None, None)
        if v.state == DeliveryState.DELIVERED:
            success = v.at if old.last_success_at is None else max(old.last_success_at, v.at)
            folded[v.endpoint] = Health(
                v.endpoint, old.delivered + 1, success, old.last_failure_at, old.last_error
            )
        elif old.last_failure_at is None or v.at >= old.last_failure_at:
            folded[v.endpoint] = Health(
                v.endpoint, old.delivered, old.last_success_at, v.at, error_text(v.status, v.error)
            )
    return sorted(folded.values(), key=lambda h: h.endpoint)


# -- row mappers ------------------------------------------------------------------------------


def lane_row(row: Row) -> LaneRow:
    """A lane row (sqlite3.Row or asyncpg.Record, same column names)."""
    return LaneRow(
        id=row["id"],
        endpoint=row["endpoint"],
        user_id=row["user_id"],
        state=row["state"],
        attempts=row["attempts"],
        ts=row["ts"],
        ord=row["ord"],
        feed_ts=row["feed_ts"],
        replayed=bool(row["replayed"]),
        next_at=row["next_at"],
    )


def state_row(row: Row) -> StateRow:
    """A ``user_state`` row."""
    return StateRow(
        row["user_id"],
        row["status"],
        row["requirements"],
        row["event_id"],
        row["source"],
        row["high_ts"],
    )


def user_state(row: Row) -> UserState:
    """A ``user_state`` row as reconciliation sees it."""
    return UserState(
        row["user_id"], row["status"], row["requirements"], row["event_id"], row["source"]
    )


def delivery_info(row: Row) -> DeliveryInfo:
    """A delivery row joined with its event, as users see it."""
    state = public_state(row["state"])
    return DeliveryInfo(
        id=format_delivery_id(row["id"]),
        endpoint=row["endpoint"],
        event_id=row["event_id"],
        user_id=row["user_id"],
        state=state,
        attempts=row["attempts"],
        source=row["source"],
        status=row["status"],
        next_attempt_at=row["next_at"] if state == "pending" else None,
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        last_status=row["last_status"],
        last_error=row["last_error"],
    )


def delivery_detail(row: Row, attempts: Iterable[Row]) -> DeliveryDetail:
    """A delivery row with its event's body, and its ``attempts`` rows in order."""
    return DeliveryDetail(
        delivery_info(row),
        display_body(bytes(row["body"])),
        [Attempt(a["at"], a["status"], a["latency"], a["error"], a["excerpt"]) for a in attempts],
    )


def claim(row: Row, endpoint: str) -> Claim:
    """A claimed delivery joined with its event."""
    return Claim(
        delivery_id=row["id"],
        endpoint=endpoint,
        event_id=row["event_id"],
        user_id=row["user_id"],
        attempts=row["attempts"],
        source=row["source"],
        body=bytes(row["body"]),
        has_token=bool(row["has_token"]),
        created_at=row["created_at"],
    )


class RowMoved(Exception):
    """A health row's compare-and-set lost to another writer inside a larger transaction
    (a probe's claim): raised to roll that transaction back, caught by the backend."""


def health_row(row: Row) -> HealthRow:
    """A ``health`` state row (its data stays the JSON the rules wrote)."""
    return HealthRow(row["state"], row["version"], row["data"])


def dead_summary(row: Row) -> DeadSummary:
    """The first recent dead delivery of an endpoint, with how many there were."""
    return DeadSummary(row["n"], row["id"], row["event_id"], row["user_id"])


def endpoint_stats(
    pending: Mapping[str, tuple[int, float]],
    dead: Iterable[Row],
    health: Iterable[Row],
) -> list[EndpointStats]:
    """Per-endpoint numbers from the three small queries each store runs for them."""
    stats: dict[str, dict[str, Any]] = {
        name: {"endpoint": name, "pending": count, "oldest_pending_at": oldest}
        for name, (count, oldest) in pending.items()
    }
    for row in dead:
        stats.setdefault(row["endpoint"], {"endpoint": row["endpoint"]})["dead"] = row["dead"]
    for row in health:
        stats.setdefault(row["endpoint"], {"endpoint": row["endpoint"]}).update(
            delivered=row["delivered_total"],
            last_success_at=row["last_success_at"],
            last_failure_at=row["last_failure_at"],
            last_error=row["last_error"],
        )
    return [EndpointStats(**entry) for entry in stats.values()]
