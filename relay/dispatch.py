"""The dispatcher: claims due deliveries, POSTs them signed, records the verdicts.

One claim loop hands each claimed delivery to its own task (bounded per endpoint by
``max_in_flight``); one recorder commits the verdicts in groups and wakes the claim loop, since
finishing a delivery may release the next one of its (endpoint, user_id) lane. The store owns
all state: a restart resumes from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from relay import __version__, retry, signing, tokens
from relay.codec import loads
from relay.config import EndpointConfig
from relay.errors import StoreUnavailableError
from relay.events import stored_excerpt
from relay.isolation import write_isolating
from relay.limits import Throttle
from relay.metrics import Metrics
from relay.monitor import Monitor
from relay.store.base import Attempt, Claim, DispatchStore, Outcome, format_delivery_id
from relay.tracing import OFF, Tracing
from relay.transport import Sender, Senders, SendResult

__all__ = ["Dispatcher", "build_request", "sfox_timestamp"]

log = logging.getLogger("relay.dispatch")

_USER_AGENT = f"sfox-relay/{__version__}"
_FALLBACK_RETRY = 60.0
_OUTCOMES = {"delivered": "success", "pending": "retry", "dead": "dead"}
_LOG_EVENTS = {
    "delivered": "delivery.succeeded",
    "pending": "delivery.retry",
    "dead": "delivery.dead",
}
#: The head of every stored body (feed and reconciled alike): the timestamp without a parse.
_HEAD = re.compile(
    rb'\{"sequence":(?:-?[0-9]+|null),"recipient":"(?:[^"\\]|\\.)*","timestamp":(-?[0-9]+)[,}]'
)


def sfox_timestamp(body: bytes) -> str | None:
    """The message's ``timestamp`` digits, exactly, for the ``sfox-timestamp`` header (a
    JavaScript receiver's JSON numbers are doubles, which round 19 digits)."""
    head = _HEAD.match(body)
    if head is not None:
        return head[1].decode()
    try:
        value = loads(body).get("timestamp")
    except (ValueError, AttributeError, RecursionError):
        return None
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else None


@dataclass(frozen=True, slots=True)
class _Request:
    body: bytes
    headers: dict[str, str]


def build_request(
    endpoint: EndpointConfig,
    claim: Claim,
    *,
    seal_key: bytes | None,
    now: float,
) -> _Request:
    """The exact bytes and headers of one attempt: the bytes sent are the bytes signed."""
    token_key = endpoint.token_key.get_secret_value() if endpoint.token_key else None
    body = tokens.render(
        claim.body,
        endpoint.user_token,
        has_token=claim.has_token,
        seal_key=seal_key,
        endpoint_key=token_key,
        webhook_id=claim.event_id,
        now=now,
        fields=endpoint.field_tree,
    )
    timestamp = int(now)
    headers = {name: value.get_secret_value() for name, value in endpoint.headers.items()}
    headers.update(
        {
            "content-type": "application/json",
            "user-agent": _USER_AGENT,
            "webhook-id": claim.event_id,
            "webhook-timestamp": str(timestamp),
            "relay-source": claim.source,
        }
    )
    sfox = sfox_timestamp(claim.body)
    if sfox is not None:
        headers["sfox-timestamp"] = sfox
    keys = endpoint.signing_keys
    if keys:
        headers["webhook-signature"] = signing.sign(keys, claim.event_id, timestamp, body)
    return _Request(body, headers)


class Dispatcher:
    """Delivers what the store says is due, to every endpoint, without one waiting on another."""

    def __init__(
        self,
        store: DispatchStore,
        endpoints: Sequence[EndpointConfig],
        sender: Sender | Senders,
        metrics: Metrics,
        *,
        seal_key: bytes | None = None,
        clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
        redact: Callable[[str], str] = lambda text: text,
        page: int = 256,
        idle_poll: float = 5.0,
        store_retry: float = 1.0,
        tracing: Tracing = OFF,
        unsent_retry: float = 1.0,
        monitor: Monitor | None = None,
    ) -> None:
        self._store = store
        self._tracing = tracing
        self._monitor = monitor
        self._redact = redact
        self._endpoints: Mapping[str, EndpointConfig] = {ep.name: ep for ep in endpoints}
        # One sender for all is what tests inject; ``relay run`` passes each endpoint's own.
        self._senders = sender if isinstance(sender, Senders) else Senders.only(sender, endpoints)
        self._metrics = metrics
        self._seal_key = seal_key
        self._clock = clock
        self._rand = rand
        self._page = page
        self._idle_poll = idle_poll
        self._store_retry = store_retry
        self._unsent_retry = unsent_retry
        self._unsent_log = Throttle(10.0)
        self._inflight: dict[str, int] = dict.fromkeys(self._endpoints, 0)
        # Room offered to ingest (offer(), until adopt()), and the endpoints whose last claim
        # took all that was due: only those may be handed new deliveries by the store.
        self._offered: dict[str, int] = dict.fromkeys(self._endpoints, 0)
        self._caught_up: set[str] = set()
        self._passed_over: set[str] = set()  # skipped by a claim round for room offered
        self._claiming: str | None = None  # the endpoint whose claim is under way
        # Claims whose verdict is not committed yet (requests in flight and verdicts queued
        # for the recorder): delivery id -> endpoint. At most twice max_in_flight per endpoint,
        # so that a crash re-sends a bounded number even when the recorder lags behind.
        self._claimed_by: dict[int, str] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._outcomes: list[Outcome] = []
        self._wake = asyncio.Event()
        self._outcome_ready = asyncio.Event()
        self._stopping = asyncio.Event()
        self._closing = False
        self.store_ok = True
        self._metric_series: dict[str, tuple[dict[str, Any], Any]] = {}

    @property
    def in_flight(self) -> int:
        """Deliveries being sent right now."""
        return len(self._tasks)

    def wake(self) -> None:
        """New work may be due (new events, finished deliveries, replays)."""
        self._wake.set()

    def offer(self) -> dict[str, int]:
        """How many new deliveries each endpoint would start right now, for the store to
        mark in flight in the commit that stores them (``append``'s ``take``): the room of
        each endpoint that has caught up (its last claim took all that was due, so nothing
        older waits), is open and has no rate limit. Reserved until :meth:`adopt`."""
        offer: dict[str, int] = {}
        if self._stopping.is_set():
            return offer
        for name in self._caught_up:
            if name == self._claiming:  # its claim may take this same room
                continue
            endpoint = self._endpoints[name]
            if self._monitor is not None and (
                self._monitor.mode(name, self._clock()) != "claim"
                or self._monitor.room(name) is not None
            ):
                continue
            room = min(self._free(endpoint), self._page)
            if room > 0:
                offer[name] = room
                self._offered[name] += room
        return offer

    def adopt(self, offer: Mapping[str, int], taken: Sequence[Claim]) -> None:
        """Start what the store took for :meth:`offer` and give the rest of its room back.
        An endpoint given all it offered room for may have more due: a claim looks."""
        for name, room in offer.items():
            self._offered[name] -= room
        for claim in taken:
            if self._stopping.is_set():
                self._push(Outcome(claim.delivery_id, "released", self._clock(), None))
            else:
                self._start(self._endpoints[claim.endpoint], claim)
        for name, count in Counter(claim.endpoint for claim in taken).items():
            if count >= offer.get(name, 0):
                self._caught_up.discard(name)
                self._wake.set()
        if self._passed_over & offer.keys():  # something may have come due meanwhile
            self._passed_over -= offer.keys()
            self._wake.set()

    async def run(self) -> None:
        """Claim, deliver and record until :meth:`shutdown`; return once every verdict is
        committed. The daemon supervises :meth:`deliver` and :meth:`record` separately."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self.record(), name="relay-recorder")
            await self.deliver()
            self.finish_recording()

    async def deliver(self) -> None:
        """Claim due deliveries and start each in its own task, until :meth:`shutdown`.

        Restartable: the deliveries in flight and their counts live on the dispatcher, and
        their verdicts go to the recorder whatever happens to this loop.
        """
        await self._claim_loop()
        if self._tasks:
            await asyncio.wait(set(self._tasks))

    async def record(self) -> None:
        """Commit verdicts in groups until :meth:`finish_recording` and none is left.

        Restartable: a group the store refused stays queued for the next run.
        """
        while True:
            self._outcome_ready.clear()
            await self._flush()  # first what a failed run left queued
            if self._closing:
                return
            await self._outcome_ready.wait()

    def finish_recording(self) -> None:
        """Let :meth:`record` return once every queued verdict is committed (shutdown)."""
        self._closing = True
        self._outcome_ready.set()

    @property
    def unrecorded(self) -> int:
        """Verdicts not committed yet."""
        return len(self._outcomes)

    async def shutdown(self, grace: float) -> None:
        """Stop claiming; give in-flight deliveries ``grace`` seconds, then release the rest.

        A released delivery goes back to pending without using up an attempt.
        """
        self._stopping.set()
        self._wake.set()
        if self._tasks:
            _, late = await asyncio.wait(set(self._tasks), timeout=grace)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late)
                log.warning(
                    "shutdown grace ran out; deliveries released",
                    extra={"event": "dispatch.released", "count": len(late)},
                )

    # -- claiming ---------------------------------------------------------------------------

    async def _claim_loop(self) -> None:
        while not self._stopping.is_set():
            self._wake.clear()
            try:
                more, next_due = await self._claim_round()
                self.store_ok = True
            except StoreUnavailableError as exc:
                self.store_ok = False
                log.error(
                    "store unavailable; deliveries paused",
                    extra={"event": "dispatch.store_down", "error": str(exc)},
                )
                await self._sleep_or_wake(self._store_retry)
                continue
            if more:
                continue
            timeout = self._idle_poll
            now = self._clock()
            held = self._monitor.next_wake(now) if self._monitor is not None else None
            for due in (next_due, held):
                if due is not None:
                    timeout = min(timeout, max(0.0, due - now))
            await self._sleep_or_wake(timeout)

    async def _sleep_or_wake(self, timeout: float) -> None:
        # asyncio.timeout, not wait_for: no task per sleep, so a wake resumes the loop in one
        # step of the event loop (a new event's claim starts that much sooner).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._wake.wait()

    def _free(self, endpoint: EndpointConfig) -> int:
        cap = endpoint.max_in_flight
        unrecorded = sum(1 for name in self._claimed_by.values() if name == endpoint.name)
        offered = self._offered[endpoint.name]
        return min(cap - self._inflight[endpoint.name], 2 * cap - unrecorded) - offered

    async def _claim_round(self) -> tuple[bool, float | None]:
        """Claim for every endpoint with room. Returns whether some endpoint may have more due
        now, else when the earliest delivery the claims left becomes due (None: none)."""
        more = False
        due: list[float] = []
        for name, endpoint in self._endpoints.items():
            want = min(self._free(endpoint), self._page)
            if want <= 0 or self._stopping.is_set():
                self._caught_up.discard(name)  # what is due now is not known
                if self._offered[name]:
                    self._passed_over.add(name)
                continue
            probe = False
            if self._monitor is not None:
                # Health and the rate limit decide before the claim, so that what waits for
                # them waits unclaimed (no lease held, other replicas free to take it).
                mode = self._monitor.mode(name, self._clock())
                room = self._monitor.room(name)
                if mode == "hold" or room == 0:
                    self._caught_up.discard(name)
                    continue
                probe = mode == "probe"
                if room is not None:
                    want = min(want, room)
            next_due = None
            self._claiming = name
            try:
                if probe and self._monitor is not None:
                    claim = await self._monitor.claim_probe(name, self._clock())
                    claims = [claim] if claim is not None else []
                else:
                    claims = await self._store.claim(name, self._clock(), want)
                    next_due = claims.next_due
            except BaseException:
                self._caught_up.discard(name)
                raise
            finally:
                self._claiming = None
            if self._stopping.is_set():  # shutdown began during the claim: start nothing
                for claim in claims:
                    self._push(Outcome(claim.delivery_id, "released", self._clock(), None))
                return False, None
            for claim in claims:
                if self._monitor is not None:
                    await self._monitor.spend(name)
                self._start(endpoint, claim, probe=probe)
            if probe:
                self._caught_up.discard(name)
                continue
            if len(claims) == want:
                more = True
                self._caught_up.discard(name)
            else:
                self._caught_up.add(name)
            if next_due is not None:
                due.append(next_due)
        return more, (min(due) if due and not more else None)

    def _start(self, endpoint: EndpointConfig, claim: Claim, *, probe: bool = False) -> None:
        self._inflight[endpoint.name] += 1
        self._claimed_by[claim.delivery_id] = endpoint.name
        task = asyncio.create_task(self._deliver(endpoint, claim, probe=probe))
        self._tasks.add(task)
        task.add_done_callback(lambda t: self._finished(endpoint.name, t))

    def _finished(self, name: str, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if self._inflight[name] == self._endpoints[name].max_in_flight:
            # A free slot lets a full endpoint claim what it had to leave. Otherwise its last
            # claim took all that was due; the verdict's commit wakes the loop for what that
            # releases (the lane's next delivery).
            self._wake.set()
        self._inflight[name] -= 1
        if not task.cancelled() and (exc := task.exception()) is not None:
            # Its verdict was queued before anything that can fail here: only reporting
            # (metrics, the log line) was lost. Still, nothing fails unseen.
            log.error(
                "delivery task failed",
                exc_info=exc,
                extra={"event": "dispatch.task_failed", "endpoint": name},
            )

    # -- delivering -------------------------------------------------------------------------

    async def _deliver(self, endpoint: EndpointConfig, claim: Claim, *, probe: bool) -> None:
        attempt_no = claim.attempts + 1
        span = self._tracing.deliver(endpoint.name, claim.event_id, attempt_no)
        try:
            request = build_request(endpoint, claim, seal_key=self._seal_key, now=self._clock())
            span.inject(request.headers)
            result = await self._senders[endpoint.name].post(
                endpoint.url.get_secret_value(), request.body, request.headers, endpoint.timeout
            )
        except asyncio.CancelledError:
            span.finish(None, "released at shutdown")
            self._push(Outcome(claim.delivery_id, "released", self._clock(), None))
            raise
        except Exception as exc:  # a bug in rendering must not lose the delivery
            log.exception(
                "delivery could not be attempted",
                extra={"event": "dispatch.error", "endpoint": endpoint.name},
            )
            result = SendResult(None, 0.0, error=f"internal error: {type(exc).__name__}")
        span.finish(result.status, result.error)
        if not result.attempted:
            self._release_unsent(endpoint, claim, result)
            return
        now = self._clock()
        try:
            decision = retry.decide(
                status=result.status,
                attempt=attempt_no,
                schedule=endpoint.retry_schedule,
                now=now,
                retry_after=result.retry_after,
                rand=self._rand,
                retry_statuses=endpoint.retry_statuses,
                permanent=result.permanent,
            )
            # What an endpoint answers is stored and shown: one that echoes the request must
            # not put a header secret or the forwarded token on disk or in the API.
            attempt = Attempt(
                now - result.latency,
                result.status,
                result.latency,
                self._redact(result.error) if result.error else None,
                stored_excerpt(result.excerpt, self._redact),
            )
        except Exception:  # a claim must never be left unrecorded (its lane would wedge)
            log.exception(
                "retry decision failed; retrying later",
                extra={"event": "dispatch.error", "endpoint": endpoint.name},
            )
            decision = retry.Decision("pending", now + _FALLBACK_RETRY, "internal error")
            attempt = Attempt(now - result.latency, result.status, result.latency, None, None)
        if probe and retry.is_retryable(
            result.status, endpoint.retry_statuses, permanent=result.permanent
        ):
            # A failed probe uses no attempt up: the delivery waits, due, for the next probe
            # (the breaker's schedule, not the retry schedule, says when that is).
            decision = retry.Decision("pending", now, "probe failed")
        spared = probe and decision.state == "pending"
        self._push(Outcome(claim.delivery_id, decision.state, decision.next_at, attempt, spared))
        if self._monitor is not None:
            self._monitor.observe(endpoint.name, claim, result, probe=probe, error=attempt.error)
            if decision.state == "dead":
                self._monitor.dead(endpoint.name)
        outcome = _OUTCOMES[decision.state]
        counters, duration = self._series(endpoint.name)
        counters[outcome].inc()
        duration.observe(result.latency)
        if not log.isEnabledFor(logging.INFO):
            return
        fields = {
            "event": _LOG_EVENTS[decision.state],
            "event_id": claim.event_id,
            "delivery_id": format_delivery_id(claim.delivery_id),
            "user_id": claim.user_id,
            "endpoint": endpoint.name,
            "attempt": attempt_no,
            "status": result.status,
            "latency_ms": round(result.latency * 1000, 1),
        }
        if decision.state == "delivered":
            log.info("delivered", extra=fields)
        elif decision.state == "pending":
            fields["error"] = result.error
            fields["retry_in_s"] = round(decision.next_at - now, 1)
            log.info("delivery failed; will retry", extra=fields)
        else:
            fields["error"] = result.error
            fields["reason"] = decision.reason
            log.warning("delivery dead", extra=fields)

    def _release_unsent(self, endpoint: EndpointConfig, claim: Claim, result: SendResult) -> None:
        """Nothing reached the endpoint (no descriptor for a socket): no attempt is used; the
        delivery goes back to pending, due again shortly, its lane's order kept."""
        now = self._clock()
        self._push(Outcome(claim.delivery_id, "released", now + self._unsent_retry, None))
        held = self._unsent_log.allow()
        if held is not None:
            log.warning(
                "delivery not attempted: %s; released without using an attempt "
                "(%d more like this not logged)",
                result.error,
                held,
                extra={
                    "event": "dispatch.unsent",
                    "event_id": claim.event_id,
                    "endpoint": endpoint.name,
                    "suppressed": held,
                },
            )

    def _series(self, endpoint: str) -> tuple[dict[str, Any], Any]:
        """The endpoint's labelled metric children, looked up once (labels() is not free)."""
        series = self._metric_series.get(endpoint)
        if series is None:
            counters = {
                outcome: self._metrics.deliveries.labels(endpoint=endpoint, outcome=outcome)
                for outcome in _OUTCOMES.values()
            }
            series = (counters, self._metrics.delivery_duration.labels(endpoint=endpoint))
            self._metric_series[endpoint] = series
        return series

    def _push(self, outcome: Outcome) -> None:
        self._outcomes.append(outcome)
        self._outcome_ready.set()

    # -- recording --------------------------------------------------------------------------

    async def _flush(self) -> None:
        while self._outcomes:
            batch = self._outcomes
            self._outcomes = []
            await self._commit(batch)
            self._wake.set()

    async def _commit(self, batch: list[Outcome]) -> None:
        """Record a group, isolating what the store refuses. Interrupted (cancelled), only
        what is not committed yet goes back to the queue, in order, for the restarted
        recorder: a half the bisection already wrote would otherwise be recorded twice."""
        done: set[int] = set()  # id() of each verdict committed, or settled as refused

        async def write(part: Sequence[Outcome]) -> None:
            await self._record(part)
            done.update(map(id, part))

        async def refused(outcome: Outcome, exc: Exception) -> None:
            await self._refused(outcome, exc)
            done.add(id(outcome))

        try:
            await write_isolating(batch, write, refused)
        except BaseException:
            self._outcomes[:0] = [o for o in batch if id(o) not in done]
            raise
        finally:
            for outcome in batch:
                if id(outcome) in done:
                    self._claimed_by.pop(outcome.delivery_id, None)

    async def _record(self, batch: Sequence[Outcome]) -> None:
        """Commit verdicts, waiting while the store is down, and count the waiting deliveries
        the commit superseded (a newer event of their lane was just delivered)."""
        while True:
            try:
                superseded = await self._store.record(batch, self._clock())
                self.store_ok = True
                break
            except StoreUnavailableError as exc:
                self.store_ok = False
                log.error(
                    "store unavailable; holding delivery results",
                    extra={"event": "dispatch.store_down", "error": str(exc)},
                )
                await asyncio.sleep(self._store_retry)
        for endpoint, count in superseded.items():
            self._metrics.deliveries.labels(endpoint=endpoint, outcome="superseded").inc(count)

    async def _refused(self, outcome: Outcome, exc: Exception) -> None:
        """A verdict the store refused on its own: recorded without the attempt's details
        (what the endpoint said is the likely culprit), else released, else dropped (the
        claim then lapses like a crashed replica's): never the recorder's end."""
        log.error(
            "store refused a delivery result; recording it without its details",
            extra={
                "event": "dispatch.record_refused",
                "delivery_id": outcome.delivery_id,
                "error": f"{type(exc).__name__}: {exc}"[:300],
            },
        )
        fallbacks = [Outcome(outcome.delivery_id, "released", self._clock(), None)]
        if outcome.attempt is not None and outcome.state != "released":
            bare = replace(outcome.attempt, error=None, excerpt=None)
            fallbacks.insert(0, replace(outcome, attempt=bare))
        for fallback in fallbacks:
            try:
                await self._record([fallback])
                return
            except Exception:
                log.exception(
                    "store refused a delivery result again",
                    extra={"event": "dispatch.record_refused", "delivery_id": outcome.delivery_id},
                )
        log.error(
            "delivery result dropped; the delivery is retried once its claim lapses",
            extra={"event": "dispatch.record_dropped", "delivery_id": outcome.delivery_id},
        )
