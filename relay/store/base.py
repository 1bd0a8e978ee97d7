"""The outbox's contract: what every store (SQLite, PostgreSQL) does, and its records.

A delivery is one (event, endpoint) pair. Its states:

- ``waiting``: an earlier delivery of the same (endpoint, user_id) lane is not finished yet;
- ``pending``: may be claimed once ``next_at`` has passed;
- ``inflight``: claimed by a dispatcher;
- ``delivered`` / ``dead`` / ``superseded``: final.

Per lane at most one delivery is ``pending`` or ``inflight``; finishing it (delivered or dead)
promotes the next ``waiting`` one in store order. That invariant is what makes per-user order
hold without any lane check on the hot claim path. Outside the store, ``waiting``,
``pending`` and ``inflight`` are all reported as ``pending``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from relay.codec import compact_json, loads
from relay.events import BadFrame, NewEvent

__all__ = [
    "ACTIVE_STATES",
    "AppendResult",
    "Attempt",
    "Claim",
    "DeadSummary",
    "DeliveryDetail",
    "DeliveryInfo",
    "EndpointStats",
    "HealthRow",
    "Outcome",
    "PublicState",
    "Store",
    "Target",
    "UserState",
    "delivery_info",
    "display_body",
    "format_delivery_id",
    "parse_delivery_id",
    "public_state",
]

ACTIVE_STATES = ("waiting", "pending", "inflight")
PublicState = Literal["pending", "delivered", "dead", "superseded"]


def public_state(state: str) -> PublicState:
    """The state users see: the three active states are all ``pending``."""
    if state in ACTIVE_STATES:
        return "pending"
    if state in ("delivered", "dead", "superseded"):
        return state  # type: ignore[return-value]
    raise ValueError(f"unknown delivery state {state!r}")


def delivery_info(row: Any) -> DeliveryInfo:
    """A delivery row (sqlite3.Row or asyncpg.Record, same column names) as users see it."""
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


def display_body(body: bytes) -> str:
    """The stored body with a sealed token shown as such (its ciphertext is of no use here)."""
    message = loads(body)
    payload = message.get("payload") if isinstance(message, dict) else None
    if isinstance(payload, dict) and "user_token" in payload:
        payload["user_token"] = "[sealed]"
    return compact_json(message).decode()


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


@dataclass(frozen=True, slots=True)
class Target:
    """An endpoint as the store needs it when fanning out a new event."""

    name: str
    feeds: frozenset[str] | None = None
    statuses: frozenset[str] | None = None
    wants_token: bool = False
    first_delay: float = 0.0


@dataclass(frozen=True, slots=True)
class AppendResult:
    """What one group commit did."""

    stored: list[NewEvent] = field(default_factory=list)
    duplicates: int = 0
    stale: int = 0  # reconciled events whose base state changed meanwhile (not stored)
    superseded: dict[str, int] = field(default_factory=dict)  # endpoint -> deliveries


@dataclass(frozen=True, slots=True)
class Claim:
    """A delivery handed to the dispatcher, with what it needs to send it."""

    delivery_id: int
    endpoint: str
    event_id: str
    user_id: str | None
    attempts: int
    source: str
    body: bytes
    has_token: bool
    created_at: float


@dataclass(frozen=True, slots=True)
class Attempt:
    """One HTTP try, as recorded."""

    at: float
    status: int | None
    latency: float
    error: str | None = None
    excerpt: str | None = None  # at most 1 KiB of the response body


@dataclass(frozen=True, slots=True)
class Outcome:
    """The dispatcher's verdict on a claimed delivery.

    ``released`` puts it back to ``pending`` without using an attempt (shutdown cut it off).
    A ``probe`` (an open endpoint's, CONTRACT.md 5b) is recorded as an attempt but does not
    use one up.
    """

    delivery_id: int
    state: Literal["delivered", "pending", "dead", "released"]
    next_at: float
    attempt: Attempt | None
    probe: bool = False


@dataclass(frozen=True, slots=True)
class DeliveryInfo:
    """A delivery as `relay deliveries list` and the API show it."""

    id: str
    endpoint: str
    event_id: str
    user_id: str | None
    state: PublicState
    attempts: int
    source: str
    status: str | None
    next_attempt_at: float | None
    created_at: float
    updated_at: float
    last_status: int | None
    last_error: str | None


@dataclass(frozen=True, slots=True)
class DeliveryDetail:
    """One delivery with its event body (token shown only as sealed) and every attempt."""

    info: DeliveryInfo
    body: str
    attempts: list[Attempt]


@dataclass(frozen=True, slots=True)
class EndpointStats:
    """Per-endpoint numbers for metrics, `relay check`, the API and the status page."""

    endpoint: str
    pending: int = 0
    dead: int = 0
    delivered: int = 0  # successful deliveries since the store was created (survives purges)
    oldest_pending_at: float | None = None
    last_success_at: float | None = None
    last_failure_at: float | None = None
    last_error: str | None = None


@dataclass(frozen=True, slots=True)
class HealthRow:
    """A health state row as stored: the rules' data is JSON the store does not read."""

    state: str
    version: int
    data: str


@dataclass(frozen=True, slots=True)
class DeadSummary:
    """Recent dead deliveries of one endpoint, for the ``delivery.dead`` alert."""

    count: int
    delivery_id: int
    event_id: str
    user_id: str | None


@dataclass(frozen=True, slots=True)
class UserState:
    """The last state the store saw for a user: what reconciliation compares against."""

    user_id: str
    status: str | None
    requirements: str | None  # canonical JSON
    event_id: str | None
    source: str


class Store(Protocol):
    """The outbox. Every method may raise ``StoreUnavailableError`` when the store is down."""

    display: str

    async def open(self, *, daemon: bool) -> None:
        """Migrate and connect; ``daemon`` also takes the single-writer lock where needed."""

    async def close(self) -> None: ...

    async def check_writable(self) -> None:
        """Raise ``StoreUnavailableError`` unless a write commits right now (readiness)."""

    async def append(
        self, events: Sequence[NewEvent], targets: Sequence[Target], now: float
    ) -> AppendResult:
        """Store new events and their deliveries in one commit; duplicates are ignored."""

    async def quarantine(self, frame: BadFrame, now: float) -> None: ...

    async def claim(self, endpoint: str, now: float, limit: int) -> list[Claim]:
        """Mark up to ``limit`` due deliveries of one endpoint in flight and return them."""

    async def next_due(self, endpoints: Sequence[str]) -> float | None:
        """When the earliest pending delivery of these endpoints becomes due (None: none)."""

    async def record(self, outcomes: Sequence[Outcome], now: float) -> None:
        """Apply the dispatcher's verdicts in one commit, promoting each lane's next delivery."""

    async def list_deliveries(
        self,
        *,
        state: PublicState | None = None,
        endpoint: str | None = None,
        user_id: str | None = None,
        limit: int = 50,
        before: int | None = None,
        event_id: str | None = None,
    ) -> list[DeliveryInfo]:
        """Newest first; ``before`` is the key of the last item of the previous page.

        ``attempts`` is the number of attempt records (a replay keeps the earlier ones)."""

    async def get_delivery(self, delivery_id: int) -> DeliveryDetail | None: ...

    async def replay(
        self,
        *,
        ids: Sequence[int] | None = None,
        state: PublicState | None = None,
        endpoint: str | None = None,
        user_id: str | None = None,
        now: float,
        event_id: str | None = None,
    ) -> int:
        """Re-queue finished deliveries (same webhook-id, fresh schedule, after later ones)."""

    async def retry_now(
        self,
        *,
        endpoint: str | None = None,
        user_id: str | None = None,
        event_id: str | None = None,
        now: float,
    ) -> int:
        """Make pending deliveries that wait for a scheduled retry due at ``now``, without
        using an attempt; returns how many. Lanes keep their order: only the one pending
        delivery of a lane can wait for a retry."""

    async def endpoint_stats(self) -> list[EndpointStats]:
        """Full per-endpoint numbers (API, status page, `relay check`)."""

    async def pending_stats(self) -> dict[str, tuple[int, float]]:
        """Cheap, for metrics: endpoint -> (unfinished deliveries, oldest created_at)."""

    async def user_states(self) -> dict[str, UserState]: ...

    async def record_baseline(self, states: Sequence[UserState], now: float) -> int:
        """Remember users' states without emitting anything (first reconciliation).

        Existing states (from the feed) are kept; the store remembers that a baseline exists.
        """

    async def has_baseline(self) -> bool:
        """Whether a reconciliation baseline was ever recorded in this store."""

    async def purge(self, *, delivered_before: float, dead_before: float, batch: int) -> int:
        """Delete up to ``batch`` old finished deliveries, and up to ``batch`` old events no
        delivery refers to any more; returns how many deliveries and events were deleted."""

    async def watch(self, wake: Callable[[], None]) -> None:
        """Call ``wake`` when another process made work due, until cancelled (PostgreSQL:
        LISTEN/NOTIFY); the daemon supervises it.

        A store with a single writer may return at once: the relay wakes its own dispatcher.
        """

    def reconcile_lock(self) -> contextlib.AbstractAsyncContextManager[bool]:
        """Hold while reconciling; yields False when another replica already is."""

    # -- health state (CONTRACT.md 5b, 5c): rows and transactions only; rules: relay.health

    async def health_rows(self, kind: str) -> dict[str, HealthRow]:
        """Every state row of one kind (``endpoint``, ``feed``, ``dead``): name -> row."""

    async def health_write(
        self,
        kind: str,
        name: str,
        row: HealthRow,
        now: float,
        *,
        alert: NewEvent | None = None,
        alert_endpoint: str | None = None,
        release: bool = False,
    ) -> bool:
        """Compare-and-set one state row (``row.version`` is the version read; 0: none yet;
        it is stored as version + 1), in one transaction with the alert event (and its
        delivery to ``alert_endpoint``) and, with ``release``, making the endpoint's pending
        deliveries due now. False (nothing written) when another writer got there first."""

    async def claim_probe(
        self, endpoint: str, now: float, row: HealthRow, after_user: str | None
    ) -> Claim | None:
        """Claim one due delivery of an open endpoint as its probe, rotating over users (the
        first user after ``after_user``, wrapping), and write ``row`` (compare-and-set) in the
        same transaction. None, and nothing written, when nothing is due or the row moved."""

    async def dead_summary(self, endpoint: str, since: float) -> DeadSummary | None:
        """Deliveries of ``endpoint`` that went dead since ``since``: how many, and the first."""

    async def beat(self, replica: str, now: float, ttl: float) -> int:
        """Record this replica's heartbeat; returns how many replicas beat within ``ttl``."""
