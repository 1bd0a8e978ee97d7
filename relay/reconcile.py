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

import aiohttp
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
)
from yarl import URL

from relay import events, tls
from relay.codec import canonical_json, loads
from relay.errors import RelayError, StoreError
from relay.events import NewEvent
from relay.metrics import Metrics
from relay.retry import parse_retry_after
from relay.store.base import ReconcileStore, UserState
from relay.tracing import OFF, Tracing
from relay.transport import env_proxy, failure

__all__ = ["Change", "ReconcileError", "Reconciler", "Report", "diff"]

log = logging.getLogger("relay.reconcile")

USERS_PATH = "/v1/enterprise/users"
#: The most of a REST answer the relay reads (CONTRACT.md section 5); more is an error.
MAX_REST_BYTES = 64 * 1024 * 1024
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
    #: REST users refused at the input boundary (skipped, logged, counted here).
    bad_users: int = 0


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


def _validate(payload: Any) -> tuple[list[dict[str, Any]], int]:
    """The users that pass the input boundary (the feed's rule), and how many did not."""
    data = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(data, list):
        raise ReconcileError("unexpected REST answer: no data list")
    users: list[dict[str, Any]] = []
    reasons: dict[str, int] = {}
    for user in data:
        problem = events.user_problem(user)
        if problem is None:
            users.append(user)
        else:
            reasons[problem] = reasons.get(problem, 0) + 1
    if reasons:
        log.warning(
            "REST users refused at the input boundary, skipped",
            extra={
                "event": "reconcile.bad_users",
                "count": len(data) - len(users),
                "reasons": reasons,
            },
        )
    return users, len(data) - len(users)


class Reconciler:
    """Runs reconciliations on demand and on schedule; failures are logged and retried later."""

    def __init__(
        self,
        store: ReconcileStore,
        append: Callable[[Sequence[NewEvent]], Any],
        metrics: Metrics,
        *,
        api_url: str,
        api_key: str,
        interval: float | None,
        min_gap: float = 300.0,
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
        self._url = URL(api_url.rstrip("/") + USERS_PATH)
        self._headers = {"authorization": f"Bearer {api_key}", "accept": "application/json"}
        # Each connect and each read may take this long, not the whole answer (64 MiB on a
        # slow link).
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=request_timeout, sock_read=request_timeout
        )
        self._session: aiohttp.ClientSession | None = None
        self._wanted = asyncio.Event()
        self._poke = asyncio.Event()
        self._last_run: float | None = None

    def _client(self) -> aiohttp.ClientSession:
        """aiohttp, the client the senders already load (httpx was ~5 MB more), made at the
        first run. Verified like the senders' TLS (``SSL_CERT_FILE``, else the system's CAs);
        proxies from the environment, resolved per request (trust_env would also read
        ~/.netrc, whose credentials must not replace the API key)."""
        if self._session is None:
            connector = aiohttp.TCPConnector(ssl=tls.context())
            self._session = aiohttp.ClientSession(connector=connector, trust_env=False)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- scheduling -------------------------------------------------------------------------

    def trigger(self) -> None:
        """Ask for a run (after a (re)subscription); deferred to keep such runs 5 minutes
        after the last run."""
        if self._interval is not None:
            self._wanted.set()
            self._poke.set()

    def _due(self, now: float, tick: float) -> float:
        """When the next run is due: at ``tick`` (every interval, honoured as set), or for a
        triggered run as soon as ``min_gap`` has passed since the last run (section 5a)."""
        if not self._wanted.is_set():
            return tick
        if self._last_run is None:
            return now
        return min(tick, max(now, self._last_run + self._min_gap))

    async def run(self) -> None:
        """Reconcile when triggered and every interval, until cancelled."""
        if self._interval is None:
            return
        tick = self._clock() + self._interval
        while True:
            now = self._clock()
            due = self._due(now, tick)
            if due > now:
                await self._wait(due - now)
                continue
            self._wanted.clear()
            report = await self.run_once()
            tick = self._clock() + self._interval
            if report.outcome == "error":
                self._wanted.set()  # try again once the gap has passed (or at the interval)

    async def _wait(self, seconds: float) -> None:
        """Sleep ``seconds`` (the injected sleep), or less if :meth:`trigger` is called."""
        self._poke.clear()
        sleeper = asyncio.ensure_future(self._sleep(seconds))
        poked = asyncio.ensure_future(self._poke.wait())
        try:
            await asyncio.wait({sleeper, poked}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for future in (sleeper, poked):
                future.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await future

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
        except (ReconcileError, StoreError) as exc:  # StoreError: never the task's end
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
                "bad_users": report.bad_users,
                "dry_run": dry_run,
            },
        )
        return report

    async def _reconcile(self, *, emit_all: bool, dry_run: bool) -> Report:
        users, bad = await self.fetch_users()
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
            return Report("baseline", users=len(users), baseline=recorded, bad_users=bad)
        changes = diff(users, states, now_ns=time.time_ns(), emit_all=emit_all)
        emitted = 0
        if changes and not dry_run:
            emitted = await self._append([c.event for c in changes])
            self._metrics.reconcile_events.inc(emitted)
        return Report("success", users=len(users), changes=changes, emitted=emitted, bad_users=bad)

    async def fetch_users(self) -> tuple[list[dict[str, Any]], int]:
        """``GET /v1/enterprise/users``, retrying 429 (after its wait) and transient errors.

        Returns the users that pass the input boundary and how many did not.
        """

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
                    return _validate(await self._get_users())
        except _Retryable as exc:
            raise ReconcileError(f"REST users list unavailable: {exc}") from None
        raise AssertionError("unreachable")  # pragma: no cover

    async def _get_users(self) -> Any:
        """The parsed answer, read up to :data:`MAX_REST_BYTES` (decoded)."""
        body = bytearray()
        try:
            async with self._client().get(
                self._url,
                headers=self._headers,
                proxy=env_proxy(self._url),
                allow_redirects=False,
                timeout=self._timeout,
            ) as response:
                if response.status == 429:
                    ra = parse_retry_after(response.headers.get("retry-after"), self._clock())
                    raise _Retryable("HTTP 429", max(ra or 0.0, RATE_LIMIT_WAIT))
                if response.status >= 500:
                    raise _Retryable(f"HTTP {response.status}", 5.0)
                if response.status != 200:
                    raise ReconcileError(f"REST users list answered HTTP {response.status}")
                async for chunk in response.content.iter_any():
                    body += chunk
                    if len(body) > MAX_REST_BYTES:
                        raise ReconcileError(
                            f"REST users list larger than {MAX_REST_BYTES // 2**20} MiB"
                        )
        except TimeoutError:
            raise _Retryable(f"no answer within {self._timeout.sock_read:g}s", 5.0) from None
        # Also a connection lost mid-body, or a bad gzip body (ClientPayloadError).
        except (aiohttp.ClientError, OSError) as exc:
            over_tls = self._url.scheme == "https"
            raise _Retryable(failure(exc, over_tls=over_tls, peer="sFOX"), 5.0) from None
        try:
            return loads(bytes(body))
        except (ValueError, RecursionError):
            raise ReconcileError("REST users list is not JSON") from None
