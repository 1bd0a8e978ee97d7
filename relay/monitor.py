"""Endpoint health at run time: the adapter between :mod:`relay.health` and the relay.

The rules are pure (:mod:`relay.health`); this module keeps their state in the store, shared by
replicas, and applies it:

- the dispatcher asks :meth:`Monitor.mode` before claiming for an endpoint (claim, probe, or
  hold), :meth:`Monitor.room` for its rate limit, and reports each finished attempt to
  :meth:`Monitor.observe`;
- :meth:`Monitor.run` folds those results into the endpoint's state row, re-reads the rows
  (an operator's pause or resume, another replica's transition, within ``poll`` seconds),
  disables endpoints open too long, beats the replica heartbeat that sizes rate-limit shares,
  and raises ``delivery.dead`` and ``feed.down``/``feed.up``;
- every transition is written by :func:`transit`: compare-and-set of the state row, in one
  transaction with its alert event, so one alert is stored per transition however many
  replicas race for it. The CLI and the admin API use the same function.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from aiolimiter import AsyncLimiter

from relay import alerts, health, retry
from relay.config import EndpointConfig, Settings
from relay.errors import StoreUnavailableError
from relay.health import Health, Policy, Result
from relay.metrics import Metrics
from relay.store.base import Claim, HealthRow, HealthStore, format_delivery_id
from relay.tracing import OFF, Tracing
from relay.transport import SendResult

__all__ = ["Change", "Monitor", "Mode", "endpoint_health", "operate", "policy_of", "transit"]

log = logging.getLogger("relay.health")

Mode = Literal["claim", "probe", "hold"]
ENDPOINT = "endpoint"
FEED = "feed"
DEAD = "dead"
_TRIES = 8


@dataclass(frozen=True, slots=True)
class Change:
    """What one transition writes: the row's next state and data, and its alert."""

    state: str
    data: dict[str, Any]
    alert: str | None = None
    alert_data: dict[str, Any] = field(default_factory=dict)
    release: bool = False  # make the endpoint's pending deliveries due now


def policy_of(settings: Settings) -> Policy:
    """The breaker's settings."""
    return Policy(settings.breaker_threshold, settings.breaker_cooldown, settings.disable_after)


def endpoint_health(row: HealthRow | None) -> Health:
    """A stored endpoint row as :class:`Health` (no row: active)."""
    if row is None:
        return Health()
    return health.from_data(row.state, row.version, json.loads(row.data))


def _endpoint_change(before: Health, after: Health, alert: str | None, name: str) -> Change | None:
    if dataclasses.replace(after, version=before.version) == before:
        return None
    data = {
        "endpoint": name,
        "last_status": after.last_status,
        "last_error": after.last_error,
    }
    return Change(
        after.state,
        health.to_data(after),
        alert,
        data,
        release=alert in ("endpoint.recovered", "endpoint.resumed"),
    )


async def transit(
    store: HealthStore,
    kind: str,
    name: str,
    change: Callable[[HealthRow | None], Change | None],
    now: float,
    *,
    alert_endpoint: str | None,
    metrics: Metrics | None = None,
    tracing: Tracing = OFF,
) -> tuple[HealthRow | None, Change | None]:
    """Apply ``change`` to the stored row (compare-and-set, re-read on a lost race).

    The alert (if any; never for the alert endpoint's own rows) is stored in the same
    transaction, with an id derived from the row version the transition creates. Returns the
    row as written (or as found, when nothing changed) and the change made.
    """
    for _ in range(_TRIES):
        row = (await store.health_rows(kind)).get(name)
        made = change(row)
        if made is None:
            return row, None
        version = row.version if row else 0
        new = HealthRow(made.state, version, json.dumps(made.data))
        event = None
        kind_of_alert = made.alert
        if kind_of_alert is not None and alert_endpoint is not None and name != alert_endpoint:
            data = dict(made.alert_data)
            if kind == ENDPOINT:
                pending = await store.pending_stats()
                data["pending"] = pending.get(name, (0, now))[0]
            made = dataclasses.replace(made, alert_data=data)
            event = alerts.alert_event(
                alerts.alert_id(kind, name, version + 1, kind_of_alert), kind_of_alert, now, data
            )
        # An alert is stored under a relay.alert span: its delivery attempts link to it.
        with tracing.source("relay.alert") if event is not None else contextlib.nullcontext():
            written = await store.health_write(
                kind,
                name,
                new,
                now,
                alert=event,
                alert_endpoint=alert_endpoint,
                release=made.release,
            )
            if written and event is not None:
                tracing.stored([event.event_id])
        if written:
            if made.alert is not None:
                # Every transition is logged; the alert endpoint's own raise no alert.
                raised = name != alert_endpoint
                if metrics is not None and raised:
                    metrics.alerts.labels(type=made.alert).inc()
                log.warning(
                    "operational event" if raised else "alert endpoint state changed",
                    extra={"event": made.alert, "state": made.state, **made.alert_data},
                )
            return HealthRow(made.state, version + 1, new.data), made
    raise StoreUnavailableError(f"{kind} {name}: state row kept changing under this replica")


async def operate(
    store: HealthStore,
    settings: Settings,
    name: str,
    action: Literal["pause", "resume"],
    now: float,
    *,
    metrics: Metrics | None = None,
) -> tuple[Health, bool]:
    """An operator's pause or resume (CLI, API): the endpoint's state after it, and whether
    it changed. Idempotent. The caller has checked that ``name`` is known."""

    def change(row: HealthRow | None) -> Change | None:
        before = endpoint_health(row)
        after, alert = health.operate(before, action, now)
        return _endpoint_change(before, after, alert, name)

    row, made = await transit(
        store, ENDPOINT, name, change, now, alert_endpoint=_alert_name(settings), metrics=metrics
    )
    return endpoint_health(row), made is not None


def _alert_name(settings: Settings) -> str | None:
    return settings.alert_url.name if settings.alert_url is not None else None


class Monitor:
    """The breaker, pause, rate limits and operational alerts of one running relay."""

    def __init__(
        self,
        store: HealthStore,
        settings: Settings,
        metrics: Metrics,
        *,
        replica: str,
        clock: Callable[[], float] = time.time,
        subscribed: Callable[[], bool] = lambda: True,
        wake: Callable[[], None] = lambda: None,
        poll: float = 1.0,
        heartbeat_ttl: float = 10.0,
        feed_down_after: float = 120.0,
        dead_every: float = 60.0,
        tracing: Tracing = OFF,
    ) -> None:
        self._store = store
        self._tracing = tracing
        self.settings = settings
        self.metrics = metrics
        self._endpoints: Mapping[str, EndpointConfig] = {
            ep.name: ep for ep in settings.all_endpoints
        }
        self._alert_name = _alert_name(settings)
        self._policy = policy_of(settings)
        self.replica = replica
        self._clock = clock
        self._subscribed = subscribed
        self._wake_dispatcher = wake
        self.poll = poll
        self._ttl = heartbeat_ttl
        self._feed_down_after = feed_down_after
        self._dead_every = dead_every
        self._health: dict[str, Health] = {}
        self._loaded = False  # the states were read from the store at least once
        self._results: dict[str, list[Result]] = defaultdict(list)
        self._dead: set[str] = set()
        self._no_probe_until: dict[str, float] = {}
        self._replicas = 0
        self._limiters: dict[str, AsyncLimiter] = {}
        self._intervals: dict[str, float] = {}
        self._spent_at: dict[str, float] = {}  # loop time of each limited endpoint's last claim
        self._unsubscribed_since: float | None = None
        self._feed_down = False
        self._changed = asyncio.Event()
        self._resize(1)
        # With replicas, a newcomer's heartbeat is seen by the others within one poll; until
        # then they still take its share too, so it claims nothing rate-limited that long.
        self._settle = poll if settings.store.get_secret_value().startswith("postgres") else 0.0
        self._joined: float | None = None  # loop time of this replica's first heartbeat

    # -- what the dispatcher asks -----------------------------------------------------------

    def state(self, name: str) -> str:
        """The endpoint's state as this replica last read or wrote it."""
        return self._health.get(name, Health()).state

    def mode(self, name: str, now: float) -> Mode:
        """Claim normally, claim one probe, or hold (claim nothing)."""
        if not self._loaded:
            return "hold"  # a paused or disabled endpoint must not get a claim at start-up
        current = self._health.get(name)
        if current is None or current.state == "active":
            return "claim"
        if current.state != "open" or now < self._no_probe_until.get(name, 0.0):
            return "hold"
        hold = health.probe_hold(self._endpoints[name].timeout)
        return "probe" if health.start_probe(current, now, hold) is not None else "hold"

    def room(self, name: str) -> int | None:
        """How many deliveries the rate limit lets this replica claim now (None: no limit).

        At most one: attempts are spaced evenly, so no one-second window holds more than
        the limit (give or take one) and an idle spell builds up no burst.
        """
        limiter = self._limiters.get(name)
        if limiter is None:
            return None
        loop_now = asyncio.get_running_loop().time()
        if self._joined is None or loop_now < self._joined + self._settle:
            return 0
        return 1 if limiter.has_capacity() else 0

    async def spend(self, name: str) -> None:
        """Take the rate limit's capacity for one claimed delivery."""
        limiter = self._limiters.get(name)
        if limiter is not None:
            await limiter.acquire()
            self._spent_at[name] = asyncio.get_running_loop().time()

    async def claim_probe(self, name: str, now: float) -> Claim | None:
        """Claim the open endpoint's next probe (one at a time across replicas)."""
        current = self._health.get(name)
        if current is None:
            return None
        started = health.start_probe(current, now, health.probe_hold(self._endpoints[name].timeout))
        if started is None:
            return None
        row = HealthRow(started.state, current.version, json.dumps(health.to_data(started)))
        claim = await self._store.claim_probe(name, now, row, current.cursor)
        if claim is None:
            # Nothing due, or another replica probed first: look again a little later.
            self._no_probe_until[name] = now + min(1.0, self.poll)
            self._changed.set()
            return None
        self._health[name] = dataclasses.replace(started, version=current.version + 1)
        log.info(
            "probing an open endpoint",
            extra={
                "event": "endpoint.probe",
                "endpoint": name,
                "event_id": claim.event_id,
                "delivery_id": format_delivery_id(claim.delivery_id),
            },
        )
        return claim

    def next_wake(self, now: float) -> float | None:
        """When a held or rate-limited endpoint may have work again (None: nothing known)."""
        times = [
            max(h.probe_at, h.probing_until, self._no_probe_until.get(name, 0.0))
            for name, h in self._health.items()
            if h.state == "open"
        ]
        loop_now = asyncio.get_running_loop().time()
        times += [
            now + max(0.0, self._spent_at.get(name, loop_now) + interval - loop_now)
            for name, interval in self._intervals.items()
            if self.room(name) == 0
        ]
        return min(times) if times else None

    def observe(
        self, name: str, claim: Claim, result: SendResult, *, probe: bool, error: str | None
    ) -> None:
        """One finished attempt (its verdict is being recorded by the dispatcher); ``error``
        is the result's error as recorded, redacted."""
        endpoint = self._endpoints.get(name)
        retried = retry.is_retryable(
            result.status,
            endpoint.retry_statuses if endpoint is not None else (),
            permanent=result.permanent,  # a message too large for a broker: not its failure
        )
        current = self._health.get(name)
        healthy = current is None or (current.failures == 0 and current.state != "open")
        if not retried and not probe and healthy:
            return  # the hot path: a success on a healthy endpoint changes nothing
        now = self._clock()
        wait = retry.parse_retry_after(result.retry_after, now)
        self._results[name].append(
            Result(
                user_id=claim.user_id,
                status=result.status,
                error=error,
                retried=retried,
                at=now,
                probe=probe,
                not_before=None if wait is None else now + min(wait, retry.RETRY_AFTER_CAP),
            )
        )
        self._changed.set()

    def dead(self, name: str) -> None:
        """A delivery of ``name`` went dead: a ``delivery.dead`` alert is due (throttled)."""
        if name != self._alert_name:
            self._dead.add(name)
            self._changed.set()

    # -- the loop ---------------------------------------------------------------------------

    def refresh_soon(self) -> None:
        """An operator changed a state here: re-read the rows now rather than at the poll."""
        self._changed.set()

    async def run(self) -> None:
        """Keep the state current until cancelled; the store being down only delays it."""
        while True:
            try:
                await self.step()
            except StoreUnavailableError as exc:
                log.error(
                    "store unavailable; endpoint health waits for it",
                    extra={"event": "health.store_down", "error": str(exc)},
                )
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), self.poll)

    async def step(self) -> None:
        """One pass: results, rows, time, heartbeat, feed, dead deliveries, metrics."""
        await self._fold_results()
        await self._refresh()
        now = self._clock()

        def disable(h: Health) -> tuple[Health, str | None]:
            return health.tick(h, now, self._policy)

        for name, current in list(self._health.items()):
            if current.state == "open":
                await self._endpoint_transit(name, disable)
        self._resize(await self._store.beat(self.replica, now, self._ttl))
        if self._joined is None:
            self._joined = asyncio.get_running_loop().time()
        await self._watch_feed(now)
        await self._alert_dead(now)
        self._export()

    async def _fold_results(self) -> None:
        for name in list(self._results):
            results = self._results.pop(name)
            if results:

                def fold(h: Health, r: list[Result] = results) -> tuple[Health, str | None]:
                    return health.fold(h, r, self._policy)

                try:
                    await self._endpoint_transit(name, fold)
                except StoreUnavailableError:
                    self._results[name] = results + self._results.get(name, [])
                    raise

    async def _endpoint_transit(
        self, name: str, rule: Callable[[Health], tuple[Health, str | None]]
    ) -> None:
        def change(row: HealthRow | None) -> Change | None:
            before = endpoint_health(row)
            after, alert = rule(before)
            return _endpoint_change(before, after, alert, name)

        row, made = await transit(
            self._store,
            ENDPOINT,
            name,
            change,
            self._clock(),
            alert_endpoint=self._alert_name,
            metrics=self.metrics,
            tracing=self._tracing,
        )
        self._health[name] = endpoint_health(row)
        if made is not None:  # e.g. a failed probe set the next one's time: re-plan the wait
            self._wake_dispatcher()

    async def _refresh(self) -> None:
        rows = await self._store.health_rows(ENDPOINT)
        woke = not self._loaded
        self._loaded = True
        for name in self._endpoints:
            fresh = endpoint_health(rows.get(name))
            before = self._health.get(name)
            if before is not None and before.state != fresh.state:
                log.info(
                    "endpoint state changed",
                    extra={
                        "event": "endpoint.state",
                        "endpoint": name,
                        "from": before.state,
                        "to": fresh.state,
                    },
                )
                woke = True
            self._health[name] = fresh
        if woke:
            self._wake_dispatcher()

    def _resize(self, replicas: int) -> None:
        """Each replica with a live heartbeat takes an equal share of every rate limit."""
        replicas = max(1, replicas)
        if replicas == self._replicas:
            return
        self._replicas = replicas
        for name, endpoint in self._endpoints.items():
            if endpoint.rate_limit is not None:
                interval = replicas / endpoint.rate_limit
                self._limiters[name] = AsyncLimiter(1, interval)
                self._intervals[name] = interval

    async def _watch_feed(self, now: float) -> None:
        if self._subscribed():
            self._unsubscribed_since = None
            if not self._feed_down:
                return
            alert, state = "feed.up", "up"
        else:
            if self._unsubscribed_since is None:
                self._unsubscribed_since = now
            if self._feed_down or now - self._unsubscribed_since < self._feed_down_after:
                return
            alert, state = "feed.down", "down"

        def change(row: HealthRow | None) -> Change | None:
            if (row.state if row else "up") == state:
                return None
            return Change(state, {}, alert, {"replica": self.replica})

        await transit(
            self._store,
            FEED,
            self.replica,
            change,
            now,
            alert_endpoint=self._alert_name,
            metrics=self.metrics,
            tracing=self._tracing,
        )
        self._feed_down = state == "down"

    async def _alert_dead(self, now: float) -> None:
        for name in sorted(self._dead):
            summary = await self._store.dead_summary(name, now - self._dead_every)
            if summary is None:
                self._dead.discard(name)
                continue

            def change(row: HealthRow | None, s: Any = summary, n: str = name) -> Change | None:
                last = json.loads(row.data).get("alerted_at", 0.0) if row else 0.0
                if now - last < self._dead_every:
                    return None
                data = {
                    "endpoint": n,
                    "count": s.count,
                    "delivery_id": format_delivery_id(s.delivery_id),
                    "event_id": s.event_id,
                    "user_id": s.user_id,
                }
                return Change("idle", {"alerted_at": now}, "delivery.dead", data)

            _, made = await transit(
                self._store,
                DEAD,
                name,
                change,
                now,
                alert_endpoint=self._alert_name,
                metrics=self.metrics,
                tracing=self._tracing,
            )
            if made is not None:
                self._dead.discard(name)
            # else: alerted within the last minute; the loop tries again on a later pass

    def _export(self) -> None:
        for name in self._endpoints:
            current = self.state(name)
            for state in health.STATES:
                self.metrics.endpoint_state.labels(endpoint=name, state=state).set(
                    1 if state == current else 0
                )
