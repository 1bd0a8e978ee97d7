"""The feed client against the real simulator on port 0: handshake, faults, limits, secrets."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import pytest
from conftest import eventually
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed

from relay.events import USERS_FEED, BadFrame, Message
from relay.feed import (
    ConnectionLimiter,
    FeedClient,
    FeedOptions,
    FeedState,
    default_backoff,
)
from relay.metrics import FEED_STATES, Metrics
from relay.simulator import FAKE_TOKEN, Faults, Simulator

KEY = "sk_live_TOP-SECRET-feed-key-0123456789"


class Recorder:
    """A FeedHandler that keeps everything and can be told to block."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.batches: list[int] = []
        self.bad: list[BadFrame] = []
        self.subscribed = 0
        self.gate: asyncio.Event | None = None

    async def on_messages(self, messages: list[Message]) -> None:
        self.batches.append(len(messages))
        self.messages.extend(messages)
        if self.gate is not None:
            await self.gate.wait()

    async def on_bad_frame(self, frame: BadFrame) -> None:
        self.bad.append(frame)

    async def on_subscribed(self) -> None:
        self.subscribed += 1


def state_of(client: FeedClient) -> FeedState:
    return client.state  # a call, so type checkers don't narrow across awaits


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def options(sim: Simulator, **overrides: Any) -> FeedOptions:
    base = FeedOptions(
        url=sim.ws_url,
        api_key=KEY,
        ping_interval=1.0,
        dead_after=3.0,
        handshake_timeout=2.0,
        close_timeout=0.2,
    )
    return replace(base, **overrides)


@asynccontextmanager
async def running(client: FeedClient) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(client.run())
    try:
        yield task
    finally:
        await asyncio.wait_for(client.stop(), 5)
        await asyncio.wait_for(task, 5)


def fast(sim: Simulator, handler: Recorder, metrics: Metrics, **overrides: Any) -> FeedClient:
    return FeedClient(options(sim, **overrides), handler, metrics, backoff=lambda n: 0.01)


# -- the happy path ---------------------------------------------------------------------


async def test_handshake_subscribe_and_receive() -> None:
    metrics, handler = Metrics(), Recorder()
    async with Simulator(api_key=KEY, count=50) as sim:
        client = fast(sim, handler, metrics)
        async with running(client):
            await eventually(lambda: len(handler.messages) == 50)
            assert client.state is FeedState.SUBSCRIBED
            assert sample(metrics, "relay_feed_connected") == 1
            assert sample(metrics, "relay_feed_state", state="subscribed") == 1
            assert sample(metrics, "relay_feed_messages_total") == 50
            assert sample(metrics, "relay_feed_last_message_age_seconds") >= 0
        assert state_of(client) is FeedState.STOPPED
        assert sample(metrics, "relay_feed_state", state="stopped") == 1
        assert sample(metrics, "relay_feed_connected") == 0
        assert handler.subscribed == 1
        assert [m.raw for m in handler.messages] == sim.sent
        assert client.last_sequence == 50
        assert sim.auth_attempts == 1 and sim.subscribes == 1 and sim.connections == 1
        assert sample(metrics, "relay_feed_reconnects_total") == 0
        await eventually(lambda: sim.subscribed == 0)


async def test_feed_states_match_metrics() -> None:
    assert [s.value for s in FeedState] == list(FEED_STATES)
    metrics, handler = Metrics(), Recorder()
    seen: list[str] = []
    original = metrics.set_feed_state

    def record(state: str) -> None:
        if not seen or seen[-1] != state:
            seen.append(state)
        original(state)

    metrics.set_feed_state = record  # type: ignore[method-assign]
    async with Simulator(api_key=KEY, count=0, faults=Faults(drop_every=1)) as sim:
        client = fast(sim, handler, metrics)
        async with running(client):
            await sim.wait_subscribed()
            await sim.publish(
                {
                    "sequence": 1,
                    "recipient": USERS_FEED,
                    "timestamp": 1,
                    "payload": {"user_id": "client_a"},
                }
            )
            await eventually(lambda: client.connections == 2 and client.state == "subscribed")
    assert seen[0] == "stopped"  # a new client, not yet running
    assert seen[1:6] == ["connecting", "authenticating", "subscribing", "subscribed", "backing_off"]
    assert seen[6:10] == ["connecting", "authenticating", "subscribing", "subscribed"]
    assert seen[-1] == "stopped"


async def test_group_commit_and_back_pressure() -> None:
    metrics, handler = Metrics(), Recorder()
    gate = handler.gate = asyncio.Event()
    async with Simulator(api_key=KEY) as sim:
        # Keepalive as in production: the handler blocks for as long as a loaded box needs.
        client = fast(sim, handler, metrics, max_batch=50, ping_interval=10.0, dead_after=30.0)
        async with running(client):
            try:
                await eventually(lambda: len(handler.batches) == 1)
                # Blocked in the handler: nothing more is taken, whatever is buffered, and the
                # back-pressure reaches the server, whose generator stops.
                generated = -1
                async with asyncio.timeout(20):  # a loaded machine fills buffers slowly
                    while sim.generated != generated:
                        generated = sim.generated
                        await asyncio.sleep(0.3)
                assert len(handler.batches) == 1
            finally:
                gate.set()
            # ~10k frames buffered by then; on a loaded CI box with DEBUG logging (two records a
            # frame) they took over 5 s to drain.
            await eventually(lambda: len(handler.messages) >= generated, timeout=60)
    assert max(handler.batches) <= 50
    assert max(handler.batches[1:]) > 1  # frames that arrived together share one commit
    sequences = [m.sequence for m in handler.messages]
    assert sequences == list(range(1, len(sequences) + 1))


# -- failures and reconnection ----------------------------------------------------------


class FakeTime:
    """An injected clock and sleep: sleeping records the delay and advances the clock."""

    def __init__(self, block_at: float = float("inf")) -> None:
        self.now = 1000.0
        self.delays: list[float] = []
        self.block_at = block_at
        self.blocked = asyncio.Event()

    def clock(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        self.delays.append(delay)
        if delay >= self.block_at:
            self.blocked.set()
            await asyncio.Event().wait()  # until stop()
        self.now += delay
        await asyncio.sleep(0)


async def test_auth_failure_waits_before_retrying(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    metrics, handler = Metrics(), Recorder()
    fake = FakeTime(block_at=60)
    async with Simulator(api_key="the-right-key", count=0) as sim:
        client = FeedClient(
            options(sim),
            handler,
            metrics,
            backoff=lambda n: 0.5,
            sleep=fake.sleep,
            clock=fake.clock,
        )
        async with running(client):
            await asyncio.wait_for(fake.blocked.wait(), 5)
            assert client.state is FeedState.AUTH_FAILED
            assert sample(metrics, "relay_feed_state", state="auth_failed") == 1
            assert fake.delays == [60.0]  # never sooner than auth_retry_after
        assert sim.auth_attempts == 1
        assert sim.subscribes == 0
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert any(getattr(r, "event", None) == "feed.auth_failed" for r in errors)
    assert "rejected the API key" in caplog.text
    assert KEY not in caplog.text


async def test_auth_rejected_once_then_accepted() -> None:
    metrics, handler = Metrics(), Recorder()
    fake = FakeTime()
    async with Simulator(api_key=KEY, count=5, faults=Faults(reject_auth=1)) as sim:
        client = FeedClient(
            options(sim, auth_retry_after=90),
            handler,
            metrics,
            backoff=lambda n: 0.0,
            sleep=fake.sleep,
            clock=fake.clock,
        )
        async with running(client):
            await eventually(lambda: len(handler.messages) == 5)
        assert fake.delays == [90.0]
        assert sim.auth_attempts == 2
        assert sample(metrics, "relay_feed_reconnects_total") == 1


async def test_reconnects_after_drops_and_keeps_receiving() -> None:
    metrics, handler = Metrics(), Recorder()
    async with Simulator(api_key=KEY, count=60, rate=400, faults=Faults(drop_every=10)) as sim:
        client = fast(sim, handler, metrics)
        async with running(client):
            await asyncio.wait_for(sim.finished.wait(), 10)
            await eventually(lambda: client.state is FeedState.SUBSCRIBED and sim.subscribed > 0)
        assert client.connections >= 4
        assert handler.subscribed == client.connections
        assert sample(metrics, "relay_feed_reconnects_total") == client.connections - 1
        # Messages queued for a connection when it drops are lost (as with sFOX), but every
        # message the simulator wrote arrives.
        received = [m.raw for m in handler.messages]
        assert received == sim.sent
        assert len(received) >= 30


async def test_stalled_connection_is_detected_by_keepalive() -> None:
    metrics, handler = Metrics(), Recorder()
    async with Simulator(api_key=KEY, rate=200, faults=Faults(stall_after=5)) as sim:
        client = fast(sim, handler, metrics, ping_interval=0.2, dead_after=0.6)
        async with running(client):
            await eventually(
                lambda: client.connections >= 2 and len(handler.messages) > 5, timeout=5
            )
        assert sample(metrics, "relay_feed_reconnects_total") >= 1
        assert handler.subscribed >= 2


async def test_handshake_timeout_reconnects(caplog: pytest.LogCaptureFixture) -> None:
    metrics, handler = Metrics(), Recorder()
    faults = Faults(handshake_delay=0.4)
    async with Simulator(api_key=KEY, count=3, faults=faults) as sim:
        client = fast(sim, handler, metrics, handshake_timeout=0.1)
        async with running(client):
            await eventually(lambda: "no authenticate reply" in caplog.text)
            faults.handshake_delay = 0.0
            await eventually(lambda: len(handler.messages) == 3)
        assert client.connections >= 2


async def test_unreachable_server_backs_off_and_stops_promptly() -> None:
    metrics, handler = Metrics(), Recorder()
    async with Simulator(api_key=KEY) as sim:
        url = sim.ws_url
    attempts: list[int] = []

    def backoff(n: int) -> float:
        attempts.append(n)
        return 0.01 if n < 3 else 30.0

    client = FeedClient(options(sim, url=url), handler, metrics, backoff=backoff)
    async with running(client):
        await eventually(lambda: len(attempts) == 4)
        assert client.state is FeedState.BACKING_OFF
        assert sample(metrics, "relay_feed_state", state="backing_off") == 1
    assert attempts == [0, 1, 2, 3]  # exponential: the attempt number grows
    assert state_of(client) is FeedState.STOPPED


@pytest.mark.parametrize(("healthy_after", "expected"), [(0.0, [0, 0, 0]), (600.0, [0, 1, 2])])
async def test_backoff_resets_after_a_healthy_connection(
    healthy_after: float, expected: list[int]
) -> None:
    metrics, handler = Metrics(), Recorder()
    attempts: list[int] = []

    def backoff(n: int) -> float:
        attempts.append(n)
        return 0.0

    async with Simulator(api_key=KEY, count=0, faults=Faults(drop_every=1)) as sim:
        client = FeedClient(
            options(sim, healthy_after=healthy_after), handler, metrics, backoff=backoff
        )
        async with running(client):
            for n in range(3):
                await sim.wait_subscribed()
                await sim.publish(
                    {
                        "sequence": n,
                        "recipient": USERS_FEED,
                        "timestamp": 1,
                        "payload": {"user_id": "client_a"},
                    }
                )
                await eventually(lambda: len(attempts) == n + 1)  # noqa: B023
    assert attempts[:3] == expected


def test_default_backoff_is_full_jitter() -> None:
    assert all(0 <= default_backoff(0) <= 1 for _ in range(200))
    assert all(0 <= default_backoff(3) <= 8 for _ in range(200))
    assert all(0 <= default_backoff(500) <= 60 for _ in range(200))
    assert max(default_backoff(10) for _ in range(200)) > 30


# -- sFOX's per-IP limits ---------------------------------------------------------------


def test_connection_limiter_rolling_minute() -> None:
    now = [0.0]
    limiter = ConnectionLimiter(2, 60.0, clock=lambda: now[0])
    assert limiter.delay() == 0
    limiter.record()
    now[0] = 10.0
    limiter.record()
    assert limiter.delay() == 50.0
    now[0] = 59.5
    assert limiter.delay() == 0.5
    now[0] = 60.0  # the first attempt is a minute old: its slot is free
    assert limiter.delay() == 0
    limiter.record()
    assert limiter.delay() == 10.0


@pytest.mark.parametrize(("replicas", "per_minute"), [(1, 20), (2, 10), (3, 6), (10, 2), (50, 1)])
def test_replicas_share_the_limit(replicas: int, per_minute: int) -> None:
    opts = FeedOptions(url="ws://x", api_key="k", replicas=replicas)
    assert opts.connects_per_minute == per_minute


async def test_connection_attempts_wait_for_a_free_slot() -> None:
    metrics, handler = Metrics(), Recorder()
    fake = FakeTime(block_at=30)
    async with Simulator(api_key=KEY, rate=1000, faults=Faults(drop_every=1)) as sim:
        client = FeedClient(
            options(sim, replicas=10),
            handler,
            metrics,
            backoff=lambda n: 0.0,
            sleep=fake.sleep,
            clock=fake.clock,
        )
        async with running(client):
            await asyncio.wait_for(fake.blocked.wait(), 5)
            assert client.state is FeedState.BACKING_OFF
        assert fake.delays == [60.0]  # two attempts at t=0, the third waits a whole minute
        assert sim.connections == 2


# -- frames -----------------------------------------------------------------------------


async def test_garbage_is_counted_quarantined_and_skipped() -> None:
    metrics, handler = Metrics(), Recorder()
    async with Simulator(api_key=KEY, count=30, faults=Faults(bad_every=3)) as sim:
        client = fast(sim, handler, metrics)
        async with running(client):
            await eventually(lambda: len(handler.messages) == 30 and len(handler.bad) == 10)
        assert client.connections == 1  # the connection lived on
    assert sample(metrics, "relay_feed_bad_frames_total") == 10
    assert sample(metrics, "relay_feed_messages_total") == 30
    assert [m.sequence for m in handler.messages] == list(range(1, 31))
    assert all(FAKE_TOKEN not in b.text for b in handler.bad)
    assert any("user_id" in b.reason for b in handler.bad)


async def test_a_frame_over_the_size_limit_is_counted_and_the_feed_reconnects() -> None:
    metrics, handler = Metrics(), Recorder()
    async with Simulator(api_key=KEY, count=0) as sim:
        client = fast(sim, handler, metrics, max_size=10_000)
        async with running(client):
            await sim.wait_subscribed()

            def message(sequence: int, size: int) -> dict[str, Any]:
                payload = {"user_id": f"u{sequence}", "note": "x" * size}
                return {
                    "sequence": sequence,
                    "recipient": USERS_FEED,
                    "timestamp": 1,
                    "payload": payload,
                }

            await sim.publish(message(1, 10))
            await sim.publish(message(2, 20_000))  # websockets closes the connection (1009)
            await eventually(lambda: len(handler.bad) == 1)
            await eventually(lambda: client.connections == 2 and state_of(client) == "subscribed")
            await sim.publish(message(3, 10))
            await eventually(lambda: [m.sequence for m in handler.messages] == [1, 3])
    assert "10,000-byte limit" in handler.bad[0].reason
    assert sample(metrics, "relay_feed_bad_frames_total") == 1


async def test_sequence_gaps_are_counted(caplog: pytest.LogCaptureFixture) -> None:
    metrics, handler = Metrics(), Recorder()
    async with Simulator(api_key=KEY, count=0) as sim:
        client = fast(sim, handler, metrics)
        async with running(client):
            await sim.wait_subscribed()
            for seq in (1, 2, 5, 4, 5, 6, None, 9):
                await sim.publish(
                    {
                        "sequence": seq,
                        "recipient": USERS_FEED,
                        "timestamp": 1717005327995988841,
                        "payload": {"user_id": f"client_{seq}"},
                    }
                )
            await eventually(lambda: len(handler.messages) == 8)
    # 3 and 4 missing after 2; 4, 5 again, 6 and null are not gaps; 7 and 8 missing after 6.
    assert sample(metrics, "relay_feed_sequence_gaps_total") == 4
    assert client.last_sequence == 9
    gaps = [r for r in caplog.records if getattr(r, "event", None) == "feed.sequence_gap"]
    assert [(r.missing, r.after) for r in gaps] == [(2, 2), (2, 6)]  # type: ignore[attr-defined]


async def test_exact_timestamps_and_unknown_fields_survive() -> None:
    metrics, handler = Metrics(), Recorder()
    message = {
        "sequence": 5,
        "recipient": USERS_FEED,
        "timestamp": 1717005327995988841,
        "payload": {"user_id": "client_1", "status": "NEW_STATUS", "brand_new": {"x": 1}},
        "extra": 12345678901234567890123,
    }
    async with Simulator(api_key=KEY, count=0) as sim:
        client = fast(sim, handler, metrics)
        async with running(client):
            await sim.wait_subscribed()
            await sim.publish(message)
            await eventually(lambda: len(handler.messages) == 1)
    got = handler.messages[0]
    assert got.timestamp == 1717005327995988841
    assert got.raw == message
    assert list(got.raw) == list(message)


async def test_control_frames_after_subscription_are_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    metrics, handler = Metrics(), Recorder()
    async with Simulator(api_key=KEY, count=0) as sim:
        client = fast(sim, handler, metrics)
        async with running(client):
            await sim.wait_subscribed()
            await sim.publish({"type": "error", "payload": {"action": "x", "message": KEY}})
            await eventually(
                lambda: any(getattr(r, "event", None) == "feed.control" for r in caplog.records)
            )
    assert KEY not in caplog.text
    assert handler.messages == [] and handler.bad == []


# -- secrets ----------------------------------------------------------------------------


def _all_log_text(caplog: pytest.LogCaptureFixture) -> str:
    parts = [caplog.text]
    for record in caplog.records:
        parts.append(record.getMessage())
        parts.append(repr(record.__dict__))
    return "\n".join(parts)


async def test_api_key_never_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    metrics, handler = Metrics(), Recorder()
    faults = Faults(bad_every=2, drop_every=5, reject_auth=1)
    async with Simulator(api_key=KEY, count=12, faults=faults) as sim:
        client = FeedClient(
            options(sim),
            handler,
            metrics,
            backoff=lambda n: 0.01,
            sleep=lambda d: asyncio.sleep(min(d, 0.01)),
        )
        async with running(client):
            await asyncio.wait_for(sim.finished.wait(), 5)
            await eventually(lambda: client.state is FeedState.SUBSCRIBED)
        wrong = FeedClient(
            options(sim, api_key=KEY + "-wrong"),
            handler,
            metrics,
            sleep=lambda d: asyncio.sleep(min(d, 0.01)),
        )
        async with running(wrong):
            await eventually(lambda: wrong.state is FeedState.AUTH_FAILED)
    text = _all_log_text(caplog)
    assert any(r.name.startswith("relay.feed.websockets") for r in caplog.records)
    assert "rejected the API key" in text
    assert KEY not in text
    assert KEY[:12] not in text
    assert KEY not in repr(client.options)
    for message in sim.sent:  # user tokens are secrets too
        assert message["payload"]["user_token"]["token"] not in text
    assert FAKE_TOKEN not in text


def test_options_validate() -> None:
    with pytest.raises(ValueError):
        FeedOptions(url="ws://x", api_key="k", ping_interval=10, dead_after=10)
    with pytest.raises(ValueError):
        FeedOptions(url="ws://x", api_key="k", replicas=0)
    assert "k" not in repr(FeedOptions(url="ws://u:pw@x/ws?token=t", api_key="k")).replace(
        "api_key", ""
    ).replace("ws://x", "")


# -- memory: bounded by bytes, not only by frame counts ---------------------------------------


class Counter(Recorder):
    """A Recorder that keeps no message (so that it holds no memory of its own)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    async def on_messages(self, messages: list[Message]) -> None:
        self.batches.append(len(messages))
        self.count += len(messages)
        if self.gate is not None:
            await self.gate.wait()


class FloodingFeed:
    """An sFOX look-alike that sends ``count`` frames of ~1 MB: before it answers
    authenticate on the first connection (``early``), or after the subscribe reply."""

    def __init__(self, count: int, *, early: bool) -> None:
        self.count = count
        self.early = early
        self.sent = 0
        self.connections = 0
        self.port = 0
        self._server: Any = None
        payload = {"user_id": "u-@", "status": "PENDING", "note": "n" * 1_000_000}
        self.frame = json.dumps(
            {"sequence": 1, "recipient": USERS_FEED, "timestamp": 1, "payload": payload}
        )

    async def __aenter__(self) -> FloodingFeed:
        self._server = await serve(self._handle, "127.0.0.1", 0, max_size=None, compression=None)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()
        await self._server.wait_closed()

    async def _flood(self, conn: Any) -> None:
        for n in range(self.count):
            await conn.send(self.frame.replace("u-@", f"u-{n}", 1))
            self.sent += 1

    async def _handle(self, conn: Any) -> None:
        self.connections += 1
        first = self.connections == 1
        with contextlib.suppress(ConnectionClosed):
            async for raw in conn:
                action = json.loads(raw)["type"]
                if action == "authenticate" and self.early and first:
                    await self._flood(conn)
                reply = {"type": "success", "payload": {"action": action}, "action": action}
                await conn.send(json.dumps(reply))
                if action == "subscribe" and not self.early:
                    await self._flood(conn)


@contextlib.contextmanager
def peak_memory() -> Iterator[list[int]]:
    """The peak of Python's allocations inside the block, in bytes (appended on exit)."""
    result: list[int] = []
    tracemalloc.start()
    try:
        yield result
    finally:
        result.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()


async def test_frames_before_the_handshake_reply_are_bounded_in_bytes() -> None:
    # 1,000 frames of 1 MB before the auth reply once took 2.0 GB; a hundred suffice here.
    metrics, handler = Metrics(), Recorder()
    async with FloodingFeed(100, early=True) as flood:
        url = f"ws://127.0.0.1:{flood.port}/ws"
        client = FeedClient(
            replace(options_for(url), handshake_timeout=10.0),
            handler,
            metrics,
            backoff=lambda n: 0.01,
        )
        with peak_memory() as peak:
            async with running(client):
                await eventually(lambda: client.state == "subscribed", 20)
    assert flood.connections == 2  # the flooding handshake was given up, the next one worked
    assert flood.sent < 100  # the relay stopped reading: sFOX's sends waited
    assert peak[0] < 48 * 2**20, f"peak {peak[0] / 2**20:.0f} MiB"


async def test_frames_waiting_for_a_slow_store_are_bounded_in_bytes() -> None:
    # 600 frames of 4 MiB behind a slow store once took 936 MB.
    metrics, handler = Metrics(), Counter()
    gate = handler.gate = asyncio.Event()
    async with FloodingFeed(100, early=False) as flood:
        url = f"ws://127.0.0.1:{flood.port}/ws"
        client = FeedClient(options_for(url), handler, metrics, backoff=lambda n: 0.01)
        with peak_memory() as peak:
            async with running(client):
                await eventually(lambda: len(handler.batches) == 1, 20)
                # The store is stuck; sFOX keeps sending until the relay stops reading.
                with contextlib.suppress(AssertionError):  # it stops reading first
                    await eventually(lambda: flood.sent == 100, 1.0)
                gate.set()
                await eventually(lambda: handler.count == 100, 20)
    assert client.connections == 1
    # At most 1 MiB of frames per batch: one of these at a time.
    assert max(handler.batches) == 1, handler.batches
    assert peak[0] < 48 * 2**20, f"peak {peak[0] / 2**20:.0f} MiB"


def options_for(url: str) -> FeedOptions:
    return FeedOptions(
        url=url,
        api_key=KEY,
        ping_interval=5.0,
        dead_after=15.0,
        handshake_timeout=5.0,
        close_timeout=0.2,
    )
