"""Reconciliation: recover the user changes sFOX never replays after a disconnect.

sFOX's feed does not resend what a client missed. After every (re)subscription and every
``RELAY_RECONCILE_INTERVAL`` the relay lists users over REST and compares each one's
``status`` and ``requirements`` with the last state it stored. Each difference becomes an
event stored through the same path as feed events, with an id derived from the change and the
state it replaces, written in the same transaction as the new user state: a crash or a second
replica never emits it twice. REST shows only the latest state and carries no user token.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
)

from relay import events
from relay.codec import canonical_json
from relay.errors import RelayError, StoreUnavailableError
from relay.events import NewEvent
from relay.metrics import Metrics
from relay.retry import parse_retry_after
from relay.store.base import Store, UserState
from relay.tracing import OFF, Tracing

__all__ = ["Change", "ReconcileError", "Reconciler", "Report", "diff"]

log = logging.getLogger("relay.reconcile")

USERS_PATH = "/v1/enterprise/users"
#: sFOX asks clients to wait 60 s after a 429 on the REST API.
RATE_LIMIT_WAIT = 60.0
Outcome = Literal["success", "baseline", "error", "skipped"]


class ReconcileError(RelayError):
    """The REST users list could not be fetched or understood."""


class _Retryable(Exception):
    def __init__(self, reason: str, wait: float) -> None:
        super().__init__(reason)
        self.wait = wait


@dataclass(frozen=True, slots=True)
class Change:
    """One user whose REST state differs from the stored one."""

    user_id: str
    before: str | None  # status before (None: unknown user)
    after: str | None
    event: NewEvent


@dataclass(slots=True)
class Report:
    """What one reconciliation found and did."""

    outcome: Outcome
    users: int = 0
    changes: list[Change] = field(default_factory=list)
    emitted: int = 0
    baseline: int = 0
    error: str | None = None


def _requirements(user: dict[str, Any]) -> str | None:
    req = user.get("requirements")
    return canonical_json(req).decode() if req is not None else None


def diff(
    users: Sequence[dict[str, Any]],
    states: dict[str, UserState],
    *,
    now_ns: int,
    emit_all: bool = False,
) -> list[Change]:
    """Pure: the REST users whose status or requirements differ from the stored state."""
    changes: list[Change] = []
    for user in users:
        user_id = user["user_id"]
        state = states.get(user_id)
        status = user.get("status")
        same = (
            state is not None
            and state.status == status
            and state.requirements == _requirements(user)
        )
        if same and not emit_all:
            continue
        event = events.reconcile_event(user, after=state.event_id if state else None, now_ns=now_ns)
        changes.append(Change(user_id, state.status if state else None, event.status, event))
    return changes


def _validate(payload: Any) -> list[dict[str, Any]]:
    data = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(data, list):
        raise ReconcileError("unexpected REST answer: no data list")
    users = [u for u in data if isinstance(u, dict) and isinstance(u.get("user_id"), str)]
    if len(users) != len(data):
        log.warning(
            "REST users without a user_id ignored",
            extra={"event": "reconcile.bad_users", "count": len(data) - len(users)},
        )
    return users


class Reconciler:
    """Runs reconciliations on demand and on schedule; failures are logged and retried later."""

    def __init__(
        self,
        store: Store,
        append: Callable[[Sequence[NewEvent]], Any],
        metrics: Metrics,
        *,
        api_url: str,
        api_key: str,
        interval: float | None,
        min_gap: float = 300.0,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.time,
        attempts: int = 3,
        request_timeout: float = 30.0,
        sleep: Callable[[float], Any] = asyncio.sleep,
        tracing: Tracing = OFF,
    ) -> None:
        self._store = store
        self._tracing = tracing
        self._append = append
        self._metrics = metrics
        self._interval = interval
        self._min_gap = min_gap
        self._clock = clock
        self._attempts = attempts
        self._sleep = sleep
        self._client = httpx.AsyncClient(
            base_url=api_url,
            headers={"authorization": f"Bearer {api_key}", "accept": "application/json"},
            timeout=request_timeout,
            transport=transport,
            trust_env=True,
            follow_redirects=False,
        )
        self._wanted = asyncio.Event()
        self._last_run: float | None = None

    async def close(self) -> None:
        await self._client.aclose()

    # -- scheduling -------------------------------------------------------------------------

    def trigger(self) -> None:
        """Ask for a run (after a (re)subscription); deferred to keep runs 5 minutes apart."""
        if self._interval is not None:
            self._wanted.set()

    async def run(self) -> None:
        """Reconcile when triggered and every interval, never twice within ``min_gap``."""
        if self._interval is None:
            return
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wanted.wait(), self._interval)
            if self._last_run is not None:
                wait = self._last_run + self._min_gap - self._clock()
                if wait > 0:
                    await self._sleep(wait)
            self._wanted.clear()
            report = await self.run_once()
            if report.outcome == "error":
                self._wanted.set()  # try again once the gap has passed

    # -- one run ----------------------------------------------------------------------------

    async def run_once(self, *, emit_all: bool = False, dry_run: bool = False) -> Report:
        """One reconciliation; never raises for REST or store trouble (the report says)."""
        self._last_run = self._clock()
        try:
            async with self._store.reconcile_lock() as mine:
                if not mine:
                    report = Report("skipped")
                else:
                    # Events stored in here link their delivery attempts to this span.
                    with self._tracing.source("relay.reconcile") as span:
                        report = await self._reconcile(emit_all=emit_all, dry_run=dry_run)
                        span.set("relay.emitted", report.emitted)
        except (ReconcileError, StoreUnavailableError) as exc:
            report = Report("error", error=str(exc))
        self._metrics.reconcile_runs.labels(outcome=report.outcome).inc()
        if report.outcome in ("success", "baseline"):
            self._metrics.reconcile_last_success.set(self._clock())
        level = logging.WARNING if report.outcome == "error" else logging.INFO
        log.log(
            level,
            f"reconciliation {report.outcome}",
            extra={
                "event": f"reconcile.{report.outcome}",
                "users": report.users,
                "changes": len(report.changes),
                "emitted": report.emitted,
                "baseline": report.baseline,
                "error": report.error,
                "dry_run": dry_run,
            },
        )
        return report

    async def _reconcile(self, *, emit_all: bool, dry_run: bool) -> Report:
        users = await self.fetch_users()
        states = await self._store.user_states()
        # The first reconciliation of a store only records where sFOX stands: emitting every
        # existing user into a new deployment would be a flood, not a recovery.
        if not emit_all and not await self._store.has_baseline():
            baseline = [
                UserState(u["user_id"], u.get("status"), _requirements(u), None, "baseline")
                for u in users
            ]
            recorded = (
                len(baseline)
                if dry_run
                else await self._store.record_baseline(baseline, self._clock())
            )
            return Report("baseline", users=len(users), baseline=recorded)
        changes = diff(users, states, now_ns=time.time_ns(), emit_all=emit_all)
        emitted = 0
        if changes and not dry_run:
            emitted = await self._append([c.event for c in changes])
            self._metrics.reconcile_events.inc(emitted)
        return Report("success", users=len(users), changes=changes, emitted=emitted)

    async def fetch_users(self) -> list[dict[str, Any]]:
        """``GET /v1/enterprise/users``, retrying 429 (after its wait) and transient errors."""

        def wait(state: RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            return exc.wait if isinstance(exc, _Retryable) else 1.0

        try:
            async for attempt in AsyncRetrying(
                stop=stop_after_attempt(self._attempts),
                wait=wait,
                retry=retry_if_exception_type(_Retryable),
                sleep=self._sleep,
                reraise=True,
            ):
                with attempt:
                    return await self._get_users()
        except _Retryable as exc:
            raise ReconcileError(f"REST users list unavailable: {exc}") from None
        raise AssertionError("unreachable")  # pragma: no cover

    async def _get_users(self) -> list[dict[str, Any]]:
        try:
            response = await self._client.get(USERS_PATH)
        except httpx.TransportError as exc:
            raise _Retryable(f"{type(exc).__name__}", 5.0) from None
        if response.status_code == 429:
            ra = parse_retry_after(response.headers.get("retry-after"), self._clock())
            raise _Retryable("HTTP 429", max(ra or 0.0, RATE_LIMIT_WAIT))
        if response.status_code >= 500:
            raise _Retryable(f"HTTP {response.status_code}", 5.0)
        if response.status_code != 200:
            raise ReconcileError(f"REST users list answered HTTP {response.status_code}")
        try:
            return _validate(response.json())
        except ValueError:
            raise ReconcileError("REST users list is not JSON") from None
