"""Endpoint health, pure: the circuit breaker's state machine and its probe schedule.

Every endpoint is ``active``, ``open``, ``paused`` or ``disabled`` (CONTRACT.md 5b); one that
is no longer configured is shown as ``removed``. The state lives in the store, shared by
replicas; this module only decides. Each function takes a :class:`Health` and returns the next
one with the alert type of the transition it made (None: no transition), so the adapter
(:mod:`relay.monitor`) can write both in one transaction.

- ``active`` -> ``open`` after ``threshold`` consecutive retried failures that span at least
  two users (one user's poisonous event must not close the endpoint for everyone); any answer
  that is not a retried failure resets the count.
- ``open``: nothing is claimed but probes: the first after ``cooldown``, each next after twice
  the previous delay, at most 10 minutes (or the cooldown if longer), never before a
  ``Retry-After``. A probe answered with anything but a retried failure closes the breaker.
- ``open`` for ``disable_after`` -> ``disabled``: nothing is attempted until resumed.
- an operator pauses (nothing attempted) or resumes (``active``, waiting deliveries due now).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "ALERT_TYPES",
    "DISPLAY_STATES",
    "PROBE_CAP",
    "Health",
    "Policy",
    "STATES",
    "Result",
    "State",
    "display_state",
    "fold",
    "from_data",
    "operate",
    "probe_hold",
    "start_probe",
    "tick",
    "to_data",
]

State = Literal["active", "open", "paused", "disabled"]
STATES: tuple[State, ...] = ("active", "open", "paused", "disabled")
DISPLAY_STATES = (*STATES, "removed")
PROBE_CAP = 600.0
ALERT_TYPES = (
    "endpoint.opened",
    "endpoint.recovered",
    "endpoint.disabled",
    "endpoint.paused",
    "endpoint.resumed",
    "delivery.dead",
    "feed.down",
    "feed.up",
)


@dataclass(frozen=True, slots=True)
class Policy:
    """The breaker's settings (``RELAY_BREAKER_*``, ``RELAY_DISABLE_AFTER``)."""

    threshold: int = 5
    cooldown: float = 30.0
    disable_after: float | None = 5 * 86400.0

    @property
    def probe_cap(self) -> float:
        """The longest wait between probes: 10 minutes, or the cooldown if longer."""
        return max(PROBE_CAP, self.cooldown)


@dataclass(frozen=True, slots=True)
class Health:
    """One endpoint's breaker, as stored (``version`` is the row's, for compare-and-set)."""

    state: State = "active"
    failures: int = 0
    first_user: str | None = None
    mixed: bool = False  # the consecutive failures span at least two users
    since: float = 0.0  # when the current state began
    probe_at: float = 0.0  # open: no probe before this
    probe_delay: float = 0.0  # open: the delay that set probe_at (doubles after a failure)
    probing_until: float = 0.0  # open: a probe is in flight until then (one at a time)
    cursor: str | None = None  # open: the user last probed (probes rotate over users)
    last_status: int | None = None
    last_error: str | None = None
    version: int = 0


@dataclass(frozen=True, slots=True)
class Result:
    """One finished attempt, as the breaker sees it."""

    user_id: str | None
    status: int | None
    error: str | None
    retried: bool  # a retried failure (timeout, connection error, 408/425/429/5xx)
    at: float
    probe: bool = False
    not_before: float | None = None  # the endpoint's Retry-After, as an absolute time


def display_state(health: Health | None, configured: bool) -> str:
    """What users see: ``removed`` for an endpoint no longer configured."""
    if not configured:
        return "removed"
    return "active" if health is None else health.state


def _reset(health: Health) -> Health:
    return dataclasses.replace(
        health,
        failures=0,
        first_user=None,
        mixed=False,
        probe_at=0.0,
        probe_delay=0.0,
        probing_until=0.0,
    )


def _enter(health: Health, state: State, now: float) -> Health:
    return dataclasses.replace(_reset(health), state=state, since=now)


def fold(health: Health, results: Iterable[Result], policy: Policy) -> tuple[Health, str | None]:
    """Fold attempts' results into the breaker; returns the new state and the alert, if any.

    Results of attempts that were in flight when an operator paused or disabled the endpoint
    change nothing but the last status.
    """
    alert: str | None = None
    for r in results:
        health = dataclasses.replace(health, last_status=r.status, last_error=r.error)
        if health.state in ("paused", "disabled"):
            continue
        if not r.retried:
            if health.state == "open":
                health = _enter(health, "active", r.at)
                alert = "endpoint.recovered"
            else:
                health = _reset(health)
            continue
        user = r.user_id or ""
        if health.state == "active":
            first = user if health.failures == 0 else health.first_user
            health = dataclasses.replace(
                health,
                failures=health.failures + 1,
                first_user=first,
                mixed=health.mixed or user != first,
            )
            if health.failures >= policy.threshold and health.mixed:
                delay = policy.cooldown
                health = dataclasses.replace(
                    _enter(health, "open", r.at),
                    probe_delay=delay,
                    probe_at=max(r.at + delay, r.not_before or 0.0),
                )
                alert = "endpoint.opened"
        elif r.probe:  # open: the probe failed, wait twice as long
            delay = min(policy.probe_cap, max(health.probe_delay, policy.cooldown) * 2)
            health = dataclasses.replace(
                health,
                probe_delay=delay,
                probe_at=max(r.at + delay, r.not_before or 0.0),
                probing_until=0.0,
                cursor=r.user_id,
            )
        elif r.not_before is not None:  # open: an attempt begun before it opened
            health = dataclasses.replace(health, probe_at=max(health.probe_at, r.not_before))
    return health, alert


def tick(health: Health, now: float, policy: Policy) -> tuple[Health, str | None]:
    """Time passing: an endpoint open for ``disable_after`` without a success is disabled."""
    if (
        health.state == "open"
        and policy.disable_after is not None
        and now - health.since >= policy.disable_after
    ):
        return _enter(health, "disabled", now), "endpoint.disabled"
    return health, None


def probe_hold(timeout: float) -> float:
    """How long a claimed probe blocks the next one: its timeout, and some slack for the
    verdict's commit (a replica that dies mid-probe delays the next probe by this much)."""
    return timeout * 2 + 5.0


def start_probe(health: Health, now: float, hold: float) -> Health | None:
    """The state with a probe in flight, or None when no probe may start now."""
    if health.state != "open" or now < health.probe_at or now < health.probing_until:
        return None
    return dataclasses.replace(health, probing_until=now + hold)


def operate(
    health: Health, action: Literal["pause", "resume"], now: float
) -> tuple[Health, str | None]:
    """An operator's pause or resume; idempotent (no transition, no alert, when unchanged)."""
    if action == "pause":
        if health.state == "paused":
            return health, None
        return _enter(health, "paused", now), "endpoint.paused"
    if health.state == "active":
        return health, None
    return _enter(health, "active", now), "endpoint.resumed"


_FIELDS = tuple(f.name for f in dataclasses.fields(Health) if f.name not in ("state", "version"))


def to_data(health: Health) -> dict[str, Any]:
    """The stored form (the state and version are columns of their own)."""
    return {name: getattr(health, name) for name in _FIELDS}


def from_data(state: str, version: int, data: Mapping[str, Any]) -> Health:
    """A stored row back as :class:`Health`; unknown keys (a newer version's) are ignored."""
    known = {name: data[name] for name in _FIELDS if name in data}
    current: State = "active"
    for candidate in STATES:
        if candidate == state:
            current = candidate
    return Health(state=current, version=version, **known)
