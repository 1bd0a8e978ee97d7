"""The outbox's records: what goes into a store and what comes out of it (no behaviour)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypedDict

from relay.events import NewEvent

__all__ = [
    "AppendResult",
    "Attempt",
    "Claim",
    "Claimed",
    "DeadSummary",
    "DeliveryDetail",
    "DeliveryInfo",
    "EndpointStats",
    "HealthRow",
    "HealthWrite",
    "Outcome",
    "Page",
    "PublicState",
    "ReplaySelection",
    "Selection",
    "Target",
    "UserState",
]

PublicState = Literal["pending", "delivered", "dead", "superseded"]


class Selection(TypedDict, total=False):
    """Which deliveries an operator means (the CLI's and the API's filters); all optional."""

    state: PublicState | None
    endpoint: str | None
    user_id: str | None
    event_id: str | None


class Page(Selection, total=False):
    """One page of a listing: newest first; ``before`` is the last key of the previous one."""

    limit: int
    before: int | None


class ReplaySelection(Selection, total=False):
    """What to replay: these ids (if given) among what the filters select."""

    ids: Sequence[int] | None


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
    #: New deliveries the commit also marked in flight for the caller (``append``'s ``take``).
    taken: list[Claim] = field(default_factory=list)
    #: Whether it left pending deliveries for a claim (False only where the store knows it
    #: left none: then the dispatcher need not look).
    claimable: bool = True

    @classmethod
    def merged(cls, results: Sequence[AppendResult]) -> AppendResult:
        """What several commits of one batch did, together."""
        if len(results) == 1:
            return results[0]
        superseded: Counter[str] = Counter()
        for result in results:
            superseded.update(result.superseded)
        return cls(
            [event for result in results for event in result.stored],
            sum(result.duplicates for result in results),
            sum(result.stale for result in results),
            dict(superseded),
            [claim for result in results for claim in result.taken],
            any(result.claimable for result in results),
        )


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


class Claimed(list[Claim]):
    """What one claim took, in delivery order, and when the endpoint has more due.

    ``next_due``: when its earliest pending delivery that this claim left becomes due (with
    PostgreSQL, or a running lease lapses), or None: none, or the claim took all it was
    allowed (there may be more due now). Answered in the claim's own store call, so that an
    idle dispatcher knows how long to sleep without asking again.
    """

    def __init__(self, claims: Iterable[Claim] = (), next_due: float | None = None) -> None:
        super().__init__(claims)
        self.next_due = next_due


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
    """A delivery as `relay deliveries list` and the API show it.

    ``attempts`` is the number of attempt records (a replay keeps the earlier ones), not the
    retry schedule's position, which a replay resets.
    """

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


class HealthWrite(TypedDict, total=False):
    """What a health row's write also does in its transaction (all optional): store the
    ``alert`` event with its delivery to ``alert_endpoint``, and with ``release`` make the
    endpoint's pending deliveries due now."""

    alert: NewEvent | None
    alert_endpoint: str | None
    release: bool


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
