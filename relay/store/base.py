"""The outbox's contract: what every store (SQLite, PostgreSQL) does, split by who uses it.

Each consumer types against its own role (:class:`IngestStore` for the feed's ingest,
:class:`DispatchStore` for the dispatcher, :class:`ReconcileStore` for reconciliation,
:class:`HealthStore` for endpoint health, :class:`AdminStore` for the CLI, the API and
retention); :class:`Store` is all of them plus
the lifecycle, and both backends implement it. The rules a store keeps (lanes, supersession,
fan-out, health) are in :mod:`relay.store.core`, the records in :mod:`relay.store.records`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol, Unpack

from relay.events import BadFrame, NewEvent
from relay.store.core import (
    ACTIVE,
    DeliveryState,
    delivery_info,
    display_body,
    format_delivery_id,
    parse_delivery_id,
    public_state,
)
from relay.store.records import (
    AppendResult,
    Attempt,
    Claim,
    Claimed,
    DeadSummary,
    DeliveryDetail,
    DeliveryInfo,
    EndpointStats,
    HealthRow,
    HealthWrite,
    Outcome,
    Page,
    PublicState,
    ReplaySelection,
    Selection,
    Target,
    UserState,
)

__all__ = [
    "ACTIVE_STATES",
    "AdminStore",
    "AppendResult",
    "Attempt",
    "Claim",
    "Claimed",
    "DeadSummary",
    "DeliveryDetail",
    "DeliveryInfo",
    "DeliveryState",
    "DispatchStore",
    "EndpointStats",
    "HealthRow",
    "HealthStore",
    "HealthWrite",
    "IngestStore",
    "Outcome",
    "Page",
    "PublicState",
    "ReplaySelection",
    "Selection",
    "ReconcileStore",
    "Store",
    "Target",
    "UserState",
    "delivery_info",
    "display_body",
    "format_delivery_id",
    "parse_delivery_id",
    "public_state",
]

#: The states reported as ``pending`` (the names of :data:`relay.store.core.ACTIVE`).
ACTIVE_STATES = tuple(s.value for s in ACTIVE)


class IngestStore(Protocol):
    """What the feed's ingest (and reconciliation's append) uses."""

    #: Whether ``append`` takes new deliveries for the dispatcher (its ``take``): where it
    #: does not, offering it the dispatcher's room would only hold that room idle.
    takes: bool

    async def append(
        self,
        events: Sequence[NewEvent],
        targets: Sequence[Target],
        now: float,
        *,
        take: Mapping[str, int] | None = None,
    ) -> AppendResult:
        """Store new events and their deliveries in one commit; duplicates are ignored.

        ``take`` (endpoint -> how many): the caller will send that many of the new
        deliveries due now right away; the store may mark them in flight in the same commit
        and return them (``AppendResult.taken``), sparing the dispatcher a claim. A store
        may take none.
        """

    async def quarantine(self, frame: BadFrame, now: float) -> None: ...

    async def check_writable(self) -> None:
        """Raise ``StoreUnavailableError`` unless a write commits right now (readiness)."""

    def mark_subscribed(self, now: float) -> None:
        """The feed (re)subscribed at ``now``.

        PostgreSQL holds the feed events this replica stores within its reorder window after
        that (they become due at store time plus the window), so that other replicas'
        earlier events of the same users are stored first. SQLite (one feed) ignores it.
        """


class DispatchStore(Protocol):
    """What the dispatcher uses."""

    async def claim(self, endpoint: str, now: float, limit: int) -> Claimed:
        """Mark up to ``limit`` due deliveries of one endpoint in flight and return them, with
        when the next one becomes due if this took fewer than ``limit``."""

    async def record(self, outcomes: Sequence[Outcome], now: float) -> dict[str, int]:
        """Apply the dispatcher's verdicts in one commit and settle their lanes.

        Returns, per endpoint, how many waiting deliveries this superseded (a newer feed
        event of their lane was delivered), for ``relay_deliveries_total``.
        """

    async def watch(self, wake: Callable[[], None]) -> None:
        """Call ``wake`` when another process made work due, until cancelled (PostgreSQL:
        LISTEN/NOTIFY); the daemon supervises it.

        A store with a single writer may return at once: the relay wakes its own dispatcher.
        """


class ReconcileStore(Protocol):
    """What reconciliation uses besides appending (which goes through ingest)."""

    async def user_states(self) -> dict[str, UserState]: ...

    async def record_baseline(self, states: Sequence[UserState], now: float) -> int:
        """Remember users' states without emitting anything (first reconciliation).

        Existing states (from the feed) are kept; the store remembers that a baseline exists.
        """

    async def has_baseline(self) -> bool:
        """Whether a reconciliation baseline was ever recorded in this store."""

    def reconcile_lock(self) -> contextlib.AbstractAsyncContextManager[bool]:
        """Hold while reconciling; yields False when another replica already is."""


class HealthStore(Protocol):
    """Endpoint health (CONTRACT.md 5b, 5c): rows and transactions only; the rules are in
    :mod:`relay.health`, their use in :mod:`relay.monitor`."""

    async def health_rows(self, kind: str) -> dict[str, HealthRow]:
        """Every state row of one kind (``endpoint``, ``feed``, ``dead``): name -> row."""

    async def health_write(
        self, kind: str, name: str, row: HealthRow, now: float, **also: Unpack[HealthWrite]
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

    async def pending_stats(self) -> dict[str, tuple[int, float]]:
        """Cheap, for metrics: endpoint -> (unfinished deliveries, oldest created_at)."""


class AdminStore(HealthStore, Protocol):
    """What the CLI, the admin API, metrics and retention use (with endpoint health: the
    API shows it and pauses or resumes endpoints)."""

    async def list_deliveries(self, **page: Unpack[Page]) -> list[DeliveryInfo]:
        """Newest first (50 unless ``limit`` says); ``before`` pages on. ``attempts`` is the
        number of attempt records (a replay keeps the earlier ones)."""

    async def get_delivery(self, delivery_id: int) -> DeliveryDetail | None: ...

    async def replay(self, *, now: float, **selection: Unpack[ReplaySelection]) -> int:
        """Re-queue finished deliveries (same webhook-id, fresh schedule, after later ones).

        A replayed delivery is never superseded.
        """

    async def retry_now(self, *, now: float, **selection: Unpack[Selection]) -> int:
        """Make pending deliveries that wait for a scheduled retry due at ``now``, without
        using an attempt; returns how many. Lanes keep their order: only the one pending
        delivery of a lane can wait for a retry. (``state`` is ignored: always pending.)"""

    async def endpoint_stats(self) -> list[EndpointStats]:
        """Full per-endpoint numbers (API, status page, `relay check`)."""

    async def rename_endpoint(self, old: str, new: str) -> int:
        """Move an endpoint's deliveries and state rows from name ``old`` to ``new`` (state
        already under ``new`` wins); returns how many deliveries moved."""

    async def purge(self, *, delivered_before: float, dead_before: float, batch: int) -> int:
        """Delete up to ``batch`` old finished deliveries, and up to ``batch`` old events no
        delivery refers to any more; returns how many deliveries and events were deleted."""


class Store(IngestStore, DispatchStore, ReconcileStore, AdminStore, Protocol):
    """The whole outbox. Every method may raise ``StoreUnavailableError`` when it is down."""

    display: str

    async def open(self, *, daemon: bool) -> None:
        """Migrate and connect; ``daemon`` also takes the single-writer lock where needed."""

    async def close(self) -> None: ...
