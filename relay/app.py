"""Wires the pieces together and owns start-up and the phased shutdown.

Data flows one way: feed -> :class:`Ingest` (events, store) -> dispatcher -> endpoints.
Shutdown is phased like uvicorn's: stop reading the feed (what was received is committed),
let in-flight deliveries finish within the grace period, release the rest without using an
attempt, commit every verdict, close the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from relay import events, service
from relay.admin import AdminServer, create_app
from relay.config import Settings, endpoint_renames, secret_values
from relay.dispatch import Dispatcher
from relay.errors import StoreUnavailableError
from relay.events import BadFrame, Message, NewEvent
from relay.feed import FeedClient, FeedOptions, FeedState
from relay.history import History
from relay.isolation import write_isolating
from relay.limits import raise_nofile_limit
from relay.logs import Redactor
from relay.metrics import Metrics
from relay.monitor import Monitor
from relay.reconcile import Reconciler
from relay.store import Store, open_store
from relay.store.base import AppendResult, Claim, IngestStore, ReconcileStore, Target
from relay.supervise import Supervisor
from relay.tracing import OFF, Tracing, from_environment
from relay.transport import Sender, Senders

__all__ = ["Ingest", "Relay", "reconciler_for", "seal_key_of", "targets_of"]

log = logging.getLogger("relay.app")
T = TypeVar("T")


def targets_of(settings: Settings) -> list[Target]:
    """What the store needs of each endpoint to fan an event out."""
    return [
        Target(
            name=ep.name,
            feeds=ep.feeds,
            statuses=ep.statuses,
            wants_token=ep.user_token != "strip",
            first_delay=ep.retry_schedule[0],
        )
        for ep in settings.endpoints
    ]


def seal_key_of(settings: Settings) -> bytes | None:
    """RELAY_TOKEN_KEY when some endpoint needs user tokens kept (sealed), else None (stripped)."""
    if settings.token_key is None or not settings.needs_token_storage:
        return None
    return settings.token_key.get_secret_value()


def api_key_of(settings: Settings) -> str:
    return settings.api_key.get_secret_value() if settings.api_key else ""


def reconciler_for(
    settings: Settings,
    store: ReconcileStore,
    ingest: Ingest,
    metrics: Metrics,
    *,
    interval: float | None,
    clock: Callable[[], float] = time.time,
    tracing: Tracing = OFF,
) -> Reconciler:
    """The reconciler ``relay run`` and ``relay reconcile`` both use: REST -> ingest."""
    return Reconciler(
        store,
        ingest.append,
        metrics,
        api_url=settings.api_url,
        api_key=api_key_of(settings),
        interval=interval,
        clock=clock,
        tracing=tracing,
    )


def log_stored(event: NewEvent, sequence: int | None) -> None:
    """The contract's INFO line for a stored event (``event.stored``): what an operator
    follows an event by, with its feed ``sequence`` where known."""
    log.info(
        "event stored",
        extra={
            "event": "event.stored",
            "event_id": event.event_id,
            "user_id": event.user_id,
            "sequence": sequence,
            "feed": event.recipient,
            "source": event.source,
        },
    )


@dataclass
class Ingest:
    """Commits what the feed (or reconciliation) produces; the feed waits while it works.

    While the store is down this keeps retrying the batch in hand, so the feed stops
    reading: nothing is received that cannot be stored.
    """

    store: IngestStore
    targets: Sequence[Target]
    metrics: Metrics
    seal_key: bytes | None
    on_stored: Callable[[], None]
    clock: Callable[[], float] = time.time
    retry_delay: float = 1.0
    store_ok: bool = True
    _subscribed_hooks: list[Callable[[], None]] = field(default_factory=list)
    tracing: Tracing = OFF
    #: Hands the dispatcher what the store took for it in the commit that stored it.
    dispatcher: Dispatcher | None = None
    _writing: asyncio.Task[None] | None = field(default=None, init=False, repr=False)

    async def on_messages(self, messages: list[Message]) -> None:
        """Prepare a batch and hand it to the store; return once the batch before it is
        committed. So one batch commits while the feed reads and prepares the next (the store's
        thread and the event loop work side by side), and the feed still stops reading while
        the store is down. :meth:`flush` waits for the last one."""
        prepared: list[NewEvent] = []
        for message in messages:
            try:
                prepared.append(events.prepare(message, seal_key=self.seal_key))
            except Exception as exc:  # the boundary admitted it: one message, not the batch
                log.exception(
                    "feed message could not be prepared; quarantined",
                    extra={"event": "ingest.unprepared", "error": type(exc).__name__},
                )
                reason = f"could not be prepared: {type(exc).__name__}"
                await self._keep_bad(BadFrame(reason, events.redact(message.raw)))
        sequences = {e.event_id: m.sequence for e, m in zip(prepared, messages, strict=False)}
        await self.flush()
        self._writing = asyncio.create_task(
            self._write(prepared, sequences, len(messages)), name="relay-ingest-write"
        )
        await asyncio.sleep(0)  # let the write reach the store's queue before reading on

    async def abandon(self) -> None:
        """Cancel the write in flight (shutdown, with the store down past the grace period)."""
        writing, self._writing = self._writing, None
        if writing is None:
            return
        writing.cancel()  # nothing if it is done
        with contextlib.suppress(asyncio.CancelledError):
            await writing

    async def flush(self) -> None:
        """Wait until the batch the feed handed over last is committed (or raise what its
        write raised). Cancelling the caller cancels that write."""
        writing = self._writing
        if writing is not None:
            try:
                await writing
            finally:
                if writing.done():
                    self._writing = None

    async def _write(
        self, prepared: Sequence[NewEvent], sequences: Mapping[str, int | None], received: int
    ) -> None:
        with self.tracing.source("relay.ingest") as span:
            span.set("relay.messages", received)
            stored = await self.append(prepared, sequences)
            span.set("relay.stored", stored)

    async def append(
        self, new: Sequence[NewEvent], sequences: Mapping[str, int | None] | None = None
    ) -> int:
        """Store events (retrying while the store is down); returns how many were new.

        An event the store refuses is quarantined on its own; the rest of its batch is stored.
        Each new one is logged at INFO (``event.stored``) with its feed ``sequence`` when
        ``sequences`` (event id -> sequence) has it: what an operator follows an event by.
        """
        dispatcher = self.dispatcher if self.store.takes else None
        offer = dispatcher.offer() if dispatcher is not None else {}
        room = Counter(offer)
        taken: list[Claim] = []

        async def write(part: Sequence[NewEvent]) -> AppendResult:
            result = await self.store.append(part, self.targets, self.clock(), take=+room)
            room.subtract(claim.endpoint for claim in result.taken)
            taken.extend(result.taken)
            return result

        try:
            results = await write_isolating(
                new, lambda part: self._until_stored(lambda: write(part)), self._refused
            )
            stored = [event for result in results for event in result.stored]
            self.tracing.stored(e.event_id for e in stored)  # before their deliveries start
        finally:
            if dispatcher is not None:  # what was taken is committed: sent, or released
                dispatcher.adopt(offer, taken)
        if stored:
            if any(result.claimable for result in results):
                self.on_stored()
            await asyncio.sleep(0)  # what was taken goes out, or is claimed, before the logging
        if log.isEnabledFor(logging.INFO):
            for event in stored:
                log_stored(event, (sequences or {}).get(event.event_id))
        self.metrics.events_stored.inc(len(stored))
        self.metrics.events_duplicate.inc(sum(result.duplicates for result in results))
        for result in results:
            for endpoint, count in result.superseded.items():
                self.metrics.deliveries.labels(endpoint=endpoint, outcome="superseded").inc(count)
        return len(stored)

    async def _refused(self, event: NewEvent, exc: Exception) -> None:
        """An event the store refused on its own: kept (redacted) as a bad frame, counted."""
        error = events.without_controls(f"{type(exc).__name__}: {exc}")[:300]
        log.error(
            "store refused one event; quarantined, the rest of its batch stored",
            extra={"event": "ingest.refused", "event_id": event.event_id, "error": error},
        )
        self.metrics.feed_bad_frames.inc()
        await self._keep_bad(
            BadFrame(f"store refused the event: {error}", events.redact(event.body))
        )

    async def on_bad_frame(self, frame: BadFrame) -> None:
        """Quarantine a malformed frame; like events, it waits for the store to return."""
        await self._keep_bad(frame)

    async def _keep_bad(self, frame: BadFrame) -> None:
        """Quarantine ``frame``; if the store refuses it, an ASCII-only copy; else drop it,
        logged as an error: a bad frame must never end the run or hold the feed."""
        if await self._quarantined(frame, sanitised=False):
            return
        safe = BadFrame(_ascii(frame.reason), _ascii(frame.text))
        if await self._quarantined(safe, sanitised=True):
            return
        log.error(
            "bad frame dropped: the store refused even its sanitised record",
            extra={"event": "ingest.bad_frame_dropped"},
        )

    async def _quarantined(self, frame: BadFrame, *, sanitised: bool) -> bool:
        try:
            await self._quarantine(frame)
        except Exception:
            log.exception(
                "store refused a bad frame's record",
                extra={"event": "ingest.quarantine_refused", "sanitised": sanitised},
            )
            return False
        return True

    async def _quarantine(self, frame: BadFrame) -> None:
        await self._until_stored(lambda: self.store.quarantine(frame, self.clock()))

    async def _until_stored(self, write: Callable[[], Awaitable[T]]) -> T:
        while True:
            try:
                result = await write()
            except StoreUnavailableError as exc:
                self.store_ok = False
                log.error(
                    "store unavailable; feed paused until it returns",
                    extra={"event": "store.down", "error": str(exc)},
                )
                await asyncio.sleep(self.retry_delay)
                continue
            self.store_ok = True
            return result

    async def on_subscribed(self) -> None:
        # First, so that what this subscription brings is held for the reorder window.
        self.store.mark_subscribed(self.clock())
        for hook in self._subscribed_hooks:
            hook()

    def when_subscribed(self, hook: Callable[[], None]) -> None:
        """Call ``hook`` after every (re)subscription (reconciliation listens here)."""
        self._subscribed_hooks.append(hook)


def _ascii(text: str) -> str:
    """Printable ASCII only: what any store takes (non-ASCII shown as escapes)."""
    return events.without_controls(text.encode("ascii", "backslashreplace").decode())


class Relay:
    """``relay run``: feed -> store -> deliveries, plus the background loops."""

    def __init__(
        self,
        settings: Settings,
        *,
        store: Store | None = None,
        sender: Sender | None = None,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
        feed_options: FeedOptions | None = None,
        stats_interval: float = 5.0,
        supervisor: Supervisor | None = None,
        health_poll: float = 1.0,
    ) -> None:
        self.settings = settings
        # OTEL_* decide (CONTRACT 6b); without them nothing of OpenTelemetry is imported.
        self.tracing = from_environment()
        self.clock = clock
        self.metrics = metrics or Metrics(clock)
        self.store = store or open_store(
            settings.store.get_secret_value(),
            lease=settings.lease,
            schema=settings.store_schema,
            reorder_window=settings.reorder_window,
        )
        self.senders = (
            Senders.only(sender, settings.all_endpoints)
            if sender is not None
            else Senders.for_endpoints(settings.all_endpoints)
        )
        seal_key = seal_key_of(settings)
        self.monitor = Monitor(
            self.store,
            settings,
            self.metrics,
            # PostgreSQL names each replica process; a SQLite store has one daemon, the host's.
            replica=getattr(self.store, "replica", None) or socket.gethostname(),
            clock=clock,
            subscribed=lambda: self.feed.state == FeedState.SUBSCRIBED,
            wake=lambda: self.dispatcher.wake(),
            poll=health_poll,
            tracing=self.tracing,
        )
        self.dispatcher = Dispatcher(
            self.store,
            settings.all_endpoints,
            self.senders,
            self.metrics,
            seal_key=seal_key,
            clock=clock,
            redact=Redactor(secret_values(settings)),
            tracing=self.tracing,
            monitor=self.monitor,
        )
        self.ingest = Ingest(
            self.store,
            targets_of(settings),
            self.metrics,
            seal_key,
            on_stored=self.dispatcher.wake,
            clock=clock,
            tracing=self.tracing,
            dispatcher=self.dispatcher,
        )
        self.feed = FeedClient(
            feed_options
            or FeedOptions(
                url=settings.ws_url,
                api_key=api_key_of(settings),
                feeds=settings.feeds,
                replicas=settings.replicas,
            ),
            self.ingest,
            self.metrics,
        )
        self._stats_interval = stats_interval
        self.reconciler = reconciler_for(
            settings,
            self.store,
            self.ingest,
            self.metrics,
            interval=settings.reconcile_interval,
            clock=clock,
            tracing=self.tracing,
        )
        self.ingest.when_subscribed(self.reconciler.trigger)
        self.history = History(self.metrics, clock=clock)
        self.admin = AdminServer(
            create_app(
                store=self.store,
                settings=settings,
                metrics=self.metrics,
                readiness=lambda: self.ready,
                feed_state=lambda: str(self.feed.state),
                in_flight=lambda: self.dispatcher.in_flight,
                on_replay=self.dispatcher.wake,
                on_endpoint_change=self.monitor.refresh_soon,
                clock=clock,
                history=self.history,
            ),
            settings.admin_host,
            settings.admin_port,
        )
        #: Every long-running task runs under it; another part adds one with one call:
        #: ``relay.supervisor.add(name, coroutine_function)`` (cancelled at shutdown).
        self.supervisor = supervisor or Supervisor()
        self._stop = asyncio.Event()
        self.started = asyncio.Event()

    @property
    def ready(self) -> dict[str, bool]:
        """Readiness checks: the feed is subscribed, the store is writable, and no supervised
        task is down (each one down is a failing ``task.<name>`` check)."""
        checks = {
            "feed": self.feed.state == FeedState.SUBSCRIBED,
            "store": self.ingest.store_ok and self.dispatcher.store_ok,
        }
        for name in self.supervisor.down:
            checks[f"task.{name}"] = False
        return checks

    def request_stop(self) -> None:
        """Begin the phased shutdown (SIGTERM/SIGINT)."""
        self._stop.set()

    async def run(self) -> None:
        """Run until :meth:`request_stop`, then shut down in phases.

        Raises :class:`TaskFailedError` (exit 1) after that shutdown if a supervised task
        failed too often.
        """
        raise_nofile_limit()
        await self.admin.start()  # bind first: an address in use creates nothing
        try:
            await self.store.open(daemon=True)
            await self._rename_endpoints()
        except BaseException:
            await self.admin.stop()
            raise
        # Everything built so far (modules, FastAPI's routes, pydantic models) lives as long
        # as the process: keep it out of the collector, whose full passes over it took
        # ~30 ms and were the delivery-latency tail.
        gc.collect()
        gc.freeze()
        try:
            try:
                await self._serve()
            finally:
                await self.admin.stop()
                await self.supervisor.close()
        finally:
            await self.reconciler.close()
            await self.senders.close()
            await self.store.close()
            await self.tracing.close()  # export the last spans
        if self.supervisor.error is not None:
            raise self.supervisor.error

    async def _rename_endpoints(self) -> None:
        """Deliveries stored under an endpoint's former default name (the URL's host and path
        as they were, before names were slugs) move to its name now, once."""
        for old, new in endpoint_renames(self.settings):
            moved = await self.store.rename_endpoint(old, new)
            if moved:
                log.info(
                    "deliveries stored under an endpoint's former name renamed",
                    extra={
                        "event": "store.endpoint_renamed",
                        "from": old,
                        "to": new,
                        "count": moved,
                    },
                )

    async def _serve(self) -> None:
        supervise = self.supervisor.add
        supervise("admin", self.admin.serve)
        supervise("feed", self.feed.run)
        supervise("dispatch", self.dispatcher.deliver)
        supervise("recorder", self.dispatcher.record)
        supervise("store-listener", lambda: self.store.watch(self.dispatcher.wake))
        supervise("stats", self._stats_loop)
        supervise("reconcile", self.reconciler.run)
        supervise("retention", self._retention_loop)
        supervise("health", self.monitor.run)
        supervise("history", self.history.run)
        log.info(
            "relay started",
            extra={
                "event": "relay.started",
                "store": self.store.display,
                "endpoints": [ep.name for ep in self.settings.endpoints],
                "feeds": list(self.settings.feeds),
            },
        )
        self.started.set()
        stop = asyncio.create_task(self._stop.wait())
        failed = asyncio.create_task(self.supervisor.failed.wait())
        try:
            await asyncio.wait({stop, failed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            failed.cancel()
        log.info("shutting down", extra={"event": "relay.stopping"})
        deadline = asyncio.get_running_loop().time() + self.settings.shutdown_grace
        await self.admin.stop()
        await self.supervisor.stop("admin")
        try:
            async with asyncio.timeout_at(deadline):
                await self.feed.stop()
                await self.supervisor.stop("feed")
                await self._flush_ingest()  # commits what was received, if the store takes it
        except TimeoutError:
            # The store is down and the batch in hand cannot be committed: it was never
            # acknowledged, and reconciliation after the next start recovers it.
            log.warning(
                "store unavailable at shutdown; frames not yet committed were dropped "
                "(reconciliation on the next start recovers them)",
                extra={"event": "relay.stop_uncommitted"},
            )
            await self.supervisor.stop("feed", timeout=0)
            await self._flush_ingest(abandon=True)
        remaining = max(0.0, deadline - asyncio.get_running_loop().time())
        await self.dispatcher.shutdown(remaining)
        await self.supervisor.stop("dispatch")
        self.dispatcher.finish_recording()
        await self.supervisor.stop("recorder")
        if self.dispatcher.unrecorded:
            log.error(
                "delivery results not committed; those deliveries go back to pending on the "
                "next start without using an attempt",
                extra={"event": "relay.stop_unrecorded", "count": self.dispatcher.unrecorded},
            )
        await self.supervisor.close()  # the background loops
        log.info("relay stopped", extra={"event": "relay.stopped"})

    async def _flush_ingest(self, *, abandon: bool = False) -> None:
        try:
            await (self.ingest.abandon() if abandon else self.ingest.flush())
        except Exception:  # its batch was not committed: reconciliation recovers it
            log.exception("the last feed batch failed to commit", extra={"event": "ingest.failed"})

    async def _retention_loop(self) -> None:
        """Purge what retention allows, a little and often (every tenth of it, at most 1 min)."""
        every = min(60.0, max(0.05, self.settings.retention / 10))
        while True:
            await asyncio.sleep(every)
            try:
                removed = await service.purge(
                    self.store, retention=self.settings.retention, now=self.clock()
                )
            except StoreUnavailableError:
                continue
            if removed:
                log.info("retention purged", extra={"event": "store.purged", "rows": removed})

    async def _stats_loop(self) -> None:
        configured = {ep.name for ep in self.settings.all_endpoints}
        known = set(configured)
        while True:
            try:
                await self.store.check_writable()
                pending = await self.store.pending_stats()
                # Dead deliveries now (an indexed count): the gauge an alert on "dead
                # rising" reads, which the outcome counter cannot give after a restart.
                dead = {s.endpoint: s.dead for s in await self.store.endpoint_stats() if s.dead}
                self.ingest.store_ok = True
            except StoreUnavailableError:
                self.ingest.store_ok = False
                await asyncio.sleep(self._stats_interval)
                continue
            now = self.clock()
            for name in known | set(pending) | set(dead):
                count, oldest = pending.get(name, (0, now))
                self.metrics.outbox_pending.labels(endpoint=name).set(count)
                self.metrics.outbox_oldest_age.labels(endpoint=name).set(max(0.0, now - oldest))
                self.metrics.outbox_dead.labels(endpoint=name).set(dead.get(name, 0))
            known = configured | set(pending) | set(dead)
            await asyncio.sleep(self._stats_interval)
