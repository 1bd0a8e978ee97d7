"""The sFOX connection: connect, authenticate, subscribe, read, reconnect.

One :class:`FeedClient` owns one WebSocket at a time. It performs sFOX's handshake (waiting for
each success reply), then reads frames in a reader task and hands them to a
:class:`FeedHandler` in batches (group commit). The handler is awaited before more is taken
from the bounded buffer, so a slow store slows reading down instead of piling frames up in
memory. Every buffer is bounded in bytes, not only in frames (CONTRACT.md section 5): frames
over ``max_size`` never arrive whole, the buffer between reader and committer holds at most
``max_buffer_bytes``, a batch at most ``max_batch_bytes``, and what arrives before sFOX
answers the handshake at most ``max_buffer_bytes`` (more is a failed handshake).

Every failure (drop, timeout, bad handshake, keepalive timeout) leads to a reconnection with
exponential backoff and full jitter that resets after a healthy connection, within sFOX's
per-IP limits (10 connections, 40 requests per minute, shared by ``replicas``). A rejected key
waits at least ``auth_retry_after`` so a revoked key doesn't hammer sFOX.

The API key never reaches a log line or an exception: our log records carry fixed messages
and fields, and websockets' own debug logging goes through :class:`WebSocketLogAdapter`, which
replaces frame contents by their size.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
import sys
import time
import urllib.parse
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosedError, ConnectionClosedOK, WebSocketException
from websockets.frames import CloseCode, Frame
from websockets.protocol import State

from relay.codec import compact_json
from relay.errors import FeedAuthError, FeedError
from relay.events import MAX_FRAME_BYTES, USERS_FEED, BadFrame, Control, Message, parse_frame
from relay.metrics import Metrics

__all__ = [
    "ConnectionLimiter",
    "FeedClient",
    "FeedHandler",
    "FeedOptions",
    "FeedState",
    "WebSocketLogAdapter",
    "default_backoff",
]

#: sFOX allows 40 requests per minute per IP; each connection costs two (authenticate and
#: subscribe), so 20 connection attempts per minute, shared by every replica behind the IP.
CONNECTS_PER_MINUTE = 20
_REDACTED = "[redacted]"


class FeedState(enum.StrEnum):
    """Where the client is; the values are :data:`relay.metrics.FEED_STATES`."""

    CONNECTING = "connecting"
    AUTHENTICATING = "authenticating"
    SUBSCRIBING = "subscribing"
    SUBSCRIBED = "subscribed"
    BACKING_OFF = "backing_off"
    AUTH_FAILED = "auth_failed"
    STOPPED = "stopped"


class FeedHandler(Protocol):
    """What the client feeds; implemented by the app (store commit, quarantine, reconcile)."""

    async def on_messages(self, messages: list[Message]) -> None:
        """Commit ``messages``; nothing more is read until this returns (back-pressure)."""

    async def on_bad_frame(self, frame: BadFrame) -> None:
        """Quarantine a malformed frame (already redacted)."""

    async def on_subscribed(self) -> None:
        """Called after each successful (re)subscription; must return quickly."""


@dataclass(frozen=True)
class FeedOptions:
    """Connection settings. Defaults follow the README."""

    url: str
    api_key: str
    feeds: tuple[str, ...] = (USERS_FEED,)
    #: Send a WebSocket ping this often ...
    ping_interval: float = 10.0
    #: ... and treat this long without a pong as a dead connection.
    dead_after: float = 30.0
    handshake_timeout: float = 10.0
    #: After sFOX rejects the key, wait at least this long before trying again.
    auth_retry_after: float = 60.0
    #: A connection subscribed this long resets the backoff.
    healthy_after: float = 60.0
    #: Replicas sharing one outbound IP: each keeps to 1/N of sFOX's per-IP limits.
    replicas: int = 1
    max_batch: int = 500
    #: A batch holds at most this many bytes of frames (parsed, they take a few times more);
    #: a larger frame is a batch of its own.
    max_batch_bytes: int = 1024 * 1024
    #: Frames received and not yet committed, and frames received before the handshake is
    #: answered: at most this many bytes each. 1 MiB is ~1,600 typical frames, three times
    #: what the 500-frame queue held before; 8 MiB put the RSS peak 12 MB over its target.
    max_buffer_bytes: int = 1024 * 1024
    #: How long to wait for the server's side of a closing handshake before dropping the TCP
    #: connection (after a keepalive timeout the server is usually not listening any more).
    close_timeout: float = 5.0
    #: websockets closes the connection (1009) on a larger message; one over the contract's
    #: 1 MiB but within this slack arrives, and is a bad frame (relay.events).
    max_size: int = MAX_FRAME_BYTES + 64 * 1024
    #: Frames websockets itself buffers before it stops reading the socket.
    max_queue: int = 8

    def __post_init__(self) -> None:
        if self.dead_after <= self.ping_interval:
            raise ValueError("dead_after must be longer than ping_interval")
        if self.replicas < 1:
            raise ValueError("replicas must be at least 1")
        if self.max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if min(self.max_batch_bytes, self.max_buffer_bytes, self.max_queue) < 1:
            raise ValueError("max_batch_bytes, max_buffer_bytes and max_queue must be positive")
        if not self.feeds:
            raise ValueError("feeds must not be empty")

    def __repr__(self) -> str:  # never show the key
        return f"FeedOptions(url={_safe_url(self.url)!r}, feeds={self.feeds!r}, api_key=***)"

    @property
    def connects_per_minute(self) -> int:
        return max(1, CONNECTS_PER_MINUTE // self.replicas)


def default_backoff(attempt: int) -> float:
    """Full jitter: uniform(0, min(60, 2**attempt)) seconds; the first retry within 1 s."""
    return random.uniform(0.0, min(60.0, 2.0 ** min(attempt, 16)))


class ConnectionLimiter:
    """At most ``limit`` connection attempts in any rolling ``period`` seconds."""

    def __init__(self, limit: int, period: float = 60.0, *, clock: Callable[[], float]) -> None:
        self.limit = limit
        self.period = period
        self._clock = clock
        self._times: deque[float] = deque()

    def delay(self) -> float:
        """Seconds until an attempt is allowed (0 when one is allowed now)."""
        now = self._clock()
        while self._times and self._times[0] <= now - self.period:
            self._times.popleft()
        if len(self._times) < self.limit:
            return 0.0
        return self._times[0] + self.period - now

    def record(self) -> None:
        self._times.append(self._clock())


class WebSocketLogAdapter(logging.LoggerAdapter[logging.Logger]):
    """websockets' logger, minus secrets: frames become their size, known secrets vanish.

    websockets logs every frame at DEBUG; those carry the API key (authenticate) and user
    tokens (data messages).
    """

    def __init__(self, logger: logging.Logger, secrets: Iterable[str]) -> None:
        super().__init__(logger, {})
        self._secrets = [s for s in secrets if s]

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        if not self.isEnabledFor(level):
            return
        shown = tuple(_describe_frame(a) if isinstance(a, Frame) else a for a in args)
        text = str(msg) % shown if shown else str(msg)
        for secret in self._secrets:
            text = text.replace(secret, _REDACTED)
        kwargs.setdefault("stacklevel", 2)
        self.logger.log(level, text, **kwargs)


def _describe_frame(frame: Frame) -> str:
    return f"{frame.opcode.name} [{len(frame.data)} bytes]"


def _safe_url(url: str) -> str:
    """The URL without credentials, query or fragment (for logs)."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme}://{host}{port}{parts.path}"
    except ValueError:
        return "<invalid url>"


class _FrameBuffer:
    """Frames between the socket and the committer, bounded in bytes as well as in count.

    :meth:`put` waits while the buffer holds ``max_bytes`` (one frame always fits, so a frame
    larger than the budget still passes, alone); :meth:`take` hands out a batch. Sizes are
    the frames' memory (``sys.getsizeof``), which is what the bound is for.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        #: The most the buffer ever held, in bytes (tests and benchmarks read it).
        self.peak = 0
        self._items: deque[tuple[object, int]] = deque()
        self._not_empty = asyncio.Event()
        self._room = asyncio.Event()

    @staticmethod
    def _size(item: object) -> int:
        return sys.getsizeof(item) if isinstance(item, str | bytes) else 0

    def fits(self, item: object) -> bool:
        return not self._items or self.bytes + self._size(item) <= self.max_bytes

    def append(self, item: object) -> None:
        """Add without waiting (the caller checked :meth:`fits`, or must not wait)."""
        size = self._size(item)
        self._items.append((item, size))
        self.bytes += size
        self.peak = max(self.peak, self.bytes)
        self._not_empty.set()

    async def put(self, item: object) -> None:
        while not self.fits(item):
            self._room.clear()
            await self._room.wait()
        self.append(item)

    async def take(self, max_items: int, max_bytes: int) -> list[object]:
        """At least one item; then more while under ``max_items`` and ``max_bytes``."""
        while not self._items:
            self._not_empty.clear()
            await self._not_empty.wait()
        item, taken = self._items.popleft()
        batch = [item]
        while self._items and len(batch) < max_items:
            size = self._items[0][1]
            if taken + size > max_bytes:
                break
            batch.append(self._items.popleft()[0])
            taken += size
        self.bytes -= taken
        self._room.set()
        return batch


class _Stopped(Exception):
    """Internal: stop() was called while waiting."""


_END = object()
_T = TypeVar("_T")


class FeedClient:
    """Keeps one subscription to sFOX alive and hands what arrives to a :class:`FeedHandler`.

    A client runs once: :meth:`run` until :meth:`stop`.
    """

    def __init__(
        self,
        options: FeedOptions,
        handler: FeedHandler,
        metrics: Metrics,
        *,
        backoff: Callable[[int], float] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        logger: logging.Logger | None = None,
    ) -> None:
        self.options = options
        self._handler = handler
        self._metrics = metrics
        self._backoff = backoff if backoff is not None else default_backoff
        self._sleep = sleep
        self._clock = clock
        self._log = logger if logger is not None else logging.getLogger("relay.feed")
        self._ws_log = WebSocketLogAdapter(
            logging.getLogger("relay.feed.websockets"), [options.api_key]
        )
        self._limiter = ConnectionLimiter(options.connects_per_minute, 60.0, clock=clock)
        self._auth_frame = compact_json(
            {"type": "authenticate", "apiKey": options.api_key, "enterprise": "true"}
        ).decode()
        self._subscribe_frame = compact_json(
            {"type": "subscribe", "feeds": list(options.feeds)}
        ).decode()
        self.state = FeedState.STOPPED
        metrics.set_feed_state(self.state)
        self.last_sequence: int | None = None
        #: WebSocket connections opened (the first one and every reconnection).
        self.connections = 0
        self._attempt = 0
        self._subscribed_at: float | None = None
        self._ws: ClientConnection | None = None
        self._stopping = asyncio.Event()
        self._done = asyncio.Event()
        self._done.set()

    # -- public ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Connect, authenticate, subscribe, read; reconnect on any failure; until stop()."""
        self._done.clear()
        try:
            while not self._stopping.is_set():
                await self._cycle()
        except _Stopped:
            pass
        finally:
            ws, self._ws = self._ws, None
            if ws is not None:  # cancelled mid-connection: don't wait for a close handshake
                ws.transport.abort()
            self._set_state(FeedState.STOPPED)
            self._done.set()
            self._log.info("feed stopped", extra={"event": "feed.stopped"})

    async def stop(self) -> None:
        """Close the connection with a normal close frame; returns once run() has returned.

        Frames already received are still handed to the handler first, so this waits for the
        handler's current commit; callers that need a deadline wrap it in a timeout and then
        cancel the task running :meth:`run`.
        """
        self._stopping.set()
        ws = self._ws
        if ws is not None:
            await ws.close()
        await self._done.wait()

    # -- one connection attempt -----------------------------------------------------------

    async def _cycle(self) -> None:
        wait = self._limiter.delay()
        if wait > 0:
            self._set_state(FeedState.BACKING_OFF)
            self._log.warning(
                "feed connection attempts at sFOX's per-IP limit; waiting %.1fs",
                wait,
                extra={
                    "event": "feed.rate_limited",
                    "delay": wait,
                    "limit_per_minute": self._limiter.limit,
                },
            )
            await self._pause(wait)
            return
        self._limiter.record()
        self._subscribed_at = None
        try:
            await self._session()
        except FeedAuthError as exc:
            if self._stopping.is_set():
                return
            delay = max(self.options.auth_retry_after, self._next_backoff())
            self._set_state(FeedState.AUTH_FAILED)
            self._log.error(
                "sFOX rejected the API key (%s); retrying in %.0fs",
                exc,
                delay,
                extra={"event": "feed.auth_failed", "reason": str(exc), "delay": delay},
            )
            await self._pause(delay)
            return
        except (FeedError, WebSocketException, OSError, TimeoutError) as exc:
            if self._stopping.is_set():
                return
            self._reconnect_later(_describe_error(exc, self.options.api_key))
            await self._pause_backoff()
            return
        if not self._stopping.is_set():
            self._reconnect_later("connection closed by sFOX")
            await self._pause_backoff()

    def _reconnect_later(self, reason: str) -> None:
        self._set_state(FeedState.BACKING_OFF)
        self._log.warning(
            "feed connection lost: %s",
            reason,
            extra={"event": "feed.disconnected", "error": reason},
        )

    async def _pause_backoff(self) -> None:
        delay = self._next_backoff()
        self._log.info(
            "feed reconnecting in %.2fs",
            delay,
            extra={"event": "feed.backoff", "delay": delay, "attempt": self._attempt},
        )
        await self._pause(delay)

    def _next_backoff(self) -> float:
        if (
            self._subscribed_at is not None
            and self._clock() - self._subscribed_at >= self.options.healthy_after
        ):
            self._attempt = 0
        delay = max(0.0, self._backoff(self._attempt))
        self._attempt += 1
        return delay

    async def _session(self) -> None:
        opts = self.options
        self._set_state(FeedState.CONNECTING)
        self._log.debug(
            "feed connecting to %s",
            _safe_url(opts.url),
            extra={"event": "feed.connecting", "url": _safe_url(opts.url)},
        )
        ws = await self._race(
            connect(
                opts.url,
                open_timeout=opts.handshake_timeout,
                ping_interval=opts.ping_interval,
                ping_timeout=opts.dead_after - opts.ping_interval,
                close_timeout=opts.close_timeout,
                max_size=opts.max_size,
                max_queue=opts.max_queue,
                compression=None,
                logger=self._ws_log,
            )
        )
        self._ws = ws
        try:
            if self.connections > 0:
                self._metrics.feed_reconnects.inc()
            self.connections += 1
            self.last_sequence = None
            early = _FrameBuffer(opts.max_buffer_bytes)
            self._set_state(FeedState.AUTHENTICATING)
            await ws.send(self._auth_frame)
            await self._expect(ws, "authenticate", early)
            self._set_state(FeedState.SUBSCRIBING)
            await ws.send(self._subscribe_frame)
            await self._expect(ws, "subscribe", early)
            self._subscribed_at = self._clock()
            self._set_state(FeedState.SUBSCRIBED)
            self._log.info(
                "feed subscribed to %s",
                ",".join(opts.feeds),
                extra={
                    "event": "feed.subscribed",
                    "feeds": list(opts.feeds),
                    "connection": self.connections,
                },
            )
            await self._handler.on_subscribed()
            await self._read(ws, early)
        finally:
            self._ws = None
            if ws.state is not State.CLOSED:
                await ws.close()  # a normal close frame; bounded by close_timeout

    async def _expect(self, ws: ClientConnection, action: str, early: _FrameBuffer) -> None:
        """Wait for sFOX's reply to ``action``; frames that are not replies are kept (raw,
        up to ``max_buffer_bytes``: a server that sends more before answering is dropped)."""
        try:
            async with asyncio.timeout(self.options.handshake_timeout):
                while True:
                    data = await ws.recv()
                    frame = parse_frame(data)
                    self._metrics.frame_received()
                    if not isinstance(frame, Control):
                        if not early.fits(data):
                            raise FeedError(
                                f"over {early.max_bytes:,} bytes of frames before the "
                                f"{action} reply"
                            )
                        early.append(data)
                        continue
                    if frame.type == "error":
                        reason = _clean(frame.message or "error reply", self.options.api_key)
                        if action == "authenticate":
                            raise FeedAuthError(reason)
                        raise FeedError(f"{action} refused: {reason}")
                    if frame.type == "success" and frame.action in (action, None):
                        return
                    self._log.debug(
                        "feed ignored a %s reply while waiting for %s",
                        frame.type,
                        action,
                        extra={"event": "feed.unexpected_reply", "action": frame.action},
                    )
        except TimeoutError as exc:
            raise FeedError(
                f"no {action} reply within {self.options.handshake_timeout:g}s"
            ) from exc

    # -- reading --------------------------------------------------------------------------

    async def _read(self, ws: ClientConnection, buffer: _FrameBuffer) -> None:
        """Reader task -> byte-bounded buffer -> batches to the handler, until the connection
        ends. ``buffer`` already holds what arrived during the handshake.

        The buffer holds frames as received and a batch is parsed when it is taken: a parsed
        message is ~5x the size of its text, and the buffer is full whenever the store is
        slower than the feed.
        """
        failure: list[BaseException] = []
        reader = asyncio.create_task(self._reader(ws, buffer, failure), name="feed-reader")
        opts = self.options
        try:
            while True:
                items = await buffer.take(opts.max_batch, opts.max_batch_bytes)
                ended = items[-1] is _END
                frames = items[:-1] if ended else items
                await self._dispatch(
                    [parse_frame(f) if isinstance(f, str | bytes) else f for f in frames]
                )
                if ended:
                    break
        finally:
            if not reader.done():
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader
        if failure:
            raise failure[0]

    async def _reader(
        self,
        ws: ClientConnection,
        buffer: _FrameBuffer,
        failure: list[BaseException],
    ) -> None:
        metrics = self._metrics
        try:
            async for data in ws:
                metrics.frame_received()
                await buffer.put(data)
        except ConnectionClosedOK:
            pass
        except Exception as exc:  # ConnectionClosedError, or a bug: re-raised by _read
            sent = exc.sent if isinstance(exc, ConnectionClosedError) else None
            if sent is not None and sent.code == CloseCode.MESSAGE_TOO_BIG:
                # A frame over max_size: websockets closed the connection before reading it
                # whole. It cannot be kept, but it is counted and a record of it is.
                limit = self.options.max_size
                reason = f"frame over the {limit:,}-byte limit; connection closed"
                await buffer.put(BadFrame(reason=reason, text=""))
            failure.append(exc)
        await buffer.put(_END)

    async def _dispatch(self, items: Iterable[object]) -> None:
        batch: list[Message] = []
        for item in items:
            if isinstance(item, Message):
                self._track_sequence(item.sequence)
                batch.append(item)
            elif isinstance(item, BadFrame):
                self._metrics.feed_bad_frames.inc()
                self._log.warning(
                    "feed bad frame skipped: %s",
                    item.reason,
                    extra={"event": "feed.bad_frame", "reason": item.reason},
                )
                await self._handler.on_bad_frame(item)
            elif isinstance(item, Control):
                self._log_control(item)
        if batch:
            self._metrics.feed_messages.inc(len(batch))
            await self._handler.on_messages(batch)

    def _track_sequence(self, sequence: int | None) -> None:
        if sequence is None:
            return
        last = self.last_sequence
        if last is not None and sequence > last + 1:
            missing = sequence - last - 1
            self._metrics.feed_sequence_gaps.inc(missing)
            self._log.warning(
                "feed sequence gap: %d message(s) missing after %d",
                missing,
                last,
                extra={
                    "event": "feed.sequence_gap",
                    "missing": missing,
                    "after": last,
                    "sequence": sequence,
                },
            )
        if last is None or sequence > last:
            self.last_sequence = sequence

    def _log_control(self, frame: Control) -> None:
        level = logging.WARNING if frame.type == "error" else logging.INFO
        text = _clean(frame.message, self.options.api_key) if frame.message else None
        self._log.log(
            level,
            "feed %s reply (action %s)",
            frame.type,
            frame.action,
            extra={
                "event": "feed.control",
                "type": frame.type,
                "action": frame.action,
                "text": text,
            },
        )

    # -- helpers --------------------------------------------------------------------------

    def _set_state(self, state: FeedState) -> None:
        if state is not self.state:
            self._log.debug(
                "feed state %s -> %s",
                self.state.value,
                state.value,
                extra={"event": "feed.state", "state": state.value, "previous": self.state.value},
            )
        self.state = state
        self._metrics.set_feed_state(state.value)

    async def _pause(self, delay: float) -> None:
        """Sleep ``delay`` (with the injected sleep) unless stop() comes first."""
        if delay <= 0:
            return
        await self._race(self._sleep(delay))

    async def _race(self, aw: Awaitable[_T]) -> _T:
        """Await ``aw`` unless stop() is called first (then raise _Stopped)."""
        task: asyncio.Future[_T] = asyncio.ensure_future(aw)
        stopper: asyncio.Future[Any] = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait([task, stopper], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if not self._stopping.is_set():
            return task.result()
        # Stopped, though the awaited thing may have finished too: release what it opened.
        if not task.cancelled() and task.exception() is None:
            result = task.result()
            if isinstance(result, ClientConnection):
                result.transport.abort()
        raise _Stopped


def _clean(text: str, secret: str) -> str:
    return text.replace(secret, _REDACTED) if secret else text


def _describe_error(exc: BaseException, secret: str) -> str:
    text = str(exc) or type(exc).__name__
    return _clean(f"{type(exc).__name__}: {text}", secret)
