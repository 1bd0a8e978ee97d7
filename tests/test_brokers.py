"""Broker senders (CONTRACT 4b) against the real RabbitMQ, NATS JetStream and Redis.

Each test uses its own queue, stream or subject and removes it. A test whose broker does not
answer is skipped, saying which.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Callable
from typing import Any

import pytest

from relay.brokers import open_sender
from relay.brokers.consume import Tap
from relay.transport import SendResult

RABBIT = os.environ.get("RELAY_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672/")
NATS = os.environ.get("RELAY_TEST_NATS", "nats://127.0.0.1:4222")
REDIS = os.environ.get("RELAY_TEST_REDIS", "redis://127.0.0.1:6379/0")
ADDRESSES = {"amqp": ("127.0.0.1", 5672), "nats": ("127.0.0.1", 4222), "redis": ("127.0.0.1", 6379)}


def _answers(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1.0):
        return True
    return False


def require(broker: str) -> None:
    """Skip unless ``broker``'s server answers."""
    host, port = ADDRESSES[broker]
    if not _answers(host, port):
        pytest.skip(f"{broker} server at {host}:{port} does not answer")


def unique(prefix: str) -> str:
    return f"{prefix}-{os.getpid()}-{os.urandom(4).hex()}"


def amqp_url(queue: str, exchange: str = "") -> str:
    query = f"routing_key={queue}" + (f"&exchange={exchange}" if exchange else "")
    return f"{RABBIT}?{query}"


def nats_url(subject: str) -> str:
    return f"{NATS}/{subject}"


def redis_url(stream: str, extra: str = "") -> str:
    return f"{REDIS}?stream={stream}{extra}"


def headers(event_id: str = "evt_1", **more: str) -> dict[str, str]:
    """What the dispatcher's build_request gives a sender (HTTP's set, user-agent included)."""
    return {
        "X-Tenant": "acme",
        "content-type": "application/json",
        "user-agent": "sfox-relay/0",
        "webhook-id": event_id,
        "webhook-timestamp": "1717005327",
        "relay-source": "feed",
        "webhook-signature": "v1,abc",
        **more,
    }


BODY = b'{"sequence":1,"recipient":"private.enterprise.users","timestamp":1,"payload":{}}'
MESSAGE_ORDER = [
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
    "relay-source",
    "content-type",
    "X-Tenant",
]


async def post(sender: Any, body: bytes = BODY, timeout: float = 5.0, **kw: Any) -> SendResult:
    result: SendResult = await sender.post("ignored", body, headers(**kw), timeout)
    return result


# -- each broker: what a message carries ----------------------------------------------------------


async def test_rabbitmq_message_is_persistent_confirmed_and_carries_the_headers(
    closing: Callable[[Any], Any],
) -> None:
    require("amqp")
    queue = unique("relay-test")
    async with Tap(amqp_url(queue)) as tap:
        sender = closing(open_sender(amqp_url(queue), ["X-Tenant"]))
        result = await post(sender, event_id="evt_a")
        assert (result.status, result.error, result.permanent) == (200, None, False)
        [message] = await tap.read(1)
    assert message.body == BODY
    # An AMQP headers table is a map: RabbitMQ keeps the names, not their order.
    assert sorted(name for name, _ in message.headers) == sorted(MESSAGE_ORDER)
    assert message.header("webhook-signature") == "v1,abc"
    assert message.extra == {
        "message_id": "evt_a",
        "content_type": "application/json",
        "app_id": "sfox-relay",
        "delivery_mode": 2,
    }


async def test_jetstream_message_has_nats_msg_id_and_the_headers(
    closing: Callable[[Any], Any],
) -> None:
    require("nats")
    subject = unique("relay.test").replace("-", "_")
    async with Tap(nats_url(subject)) as tap:
        sender = closing(open_sender(nats_url(subject), ["X-Tenant"]))
        result = await post(sender, event_id="evt_b")
        assert (result.status, result.error) == (200, None)
        assert result.excerpt is not None and "seq 1" in result.excerpt
        [message] = await tap.read(1)
    assert message.body == BODY
    assert [name for name, _ in message.headers] == ["Nats-Msg-Id", *MESSAGE_ORDER]
    assert message.header("Nats-Msg-Id") == "evt_b"


async def test_redis_xadd_puts_body_first_then_the_headers_in_order(
    closing: Callable[[Any], Any],
) -> None:
    require("redis")
    stream = unique("relay-test")
    async with Tap(redis_url(stream)) as tap:
        sender = closing(open_sender(redis_url(stream), ["X-Tenant"]))
        result = await post(sender)
        assert (result.status, result.error) == (200, None)
        [message] = await tap.read(1)
    assert message.body == BODY
    assert [name for name, _ in message.headers] == MESSAGE_ORDER
    assert result.excerpt == f"entry {message.extra['id']}"


async def test_redis_maxlen_trims_approximately(closing: Callable[[Any], Any]) -> None:
    require("redis")
    from redis.asyncio import Redis

    stream = unique("relay-test")
    sender = closing(open_sender(redis_url(stream, "&maxlen=10")))
    client = Redis.from_url(REDIS)
    try:
        for n in range(500):
            assert (await post(sender, event_id=f"evt_{n}")).status == 200
        length = await client.xlen(stream)
        assert 10 <= length < 500  # MAXLEN ~ trims whole nodes, never below the limit
    finally:
        await client.delete(stream)
        await client.aclose()


# -- failures: each a result with status None, retried; only "too large" is permanent -------------


def failed(result: SendResult, *words: str) -> bool:
    return (
        result.status is None
        and not result.permanent
        and result.error is not None
        and all(word in result.error for word in words)
    )


async def test_rabbitmq_unroutable_message_is_a_failure_not_a_success(
    closing: Callable[[Any], Any],
) -> None:
    """aio-pika resolves a returned mandatory message as a success unless the channel was
    opened with on_return_raises=True: no queue is bound to this routing key."""
    require("amqp")
    sender = closing(open_sender(amqp_url(unique("relay-nobody"))))
    result = await post(sender)
    assert failed(result, "unroutable"), result
    # The channel survives a return: a routable message right after is confirmed.
    queue = unique("relay-test")
    async with Tap(amqp_url(queue)) as tap:
        routable = closing(open_sender(amqp_url(queue)))
        assert (await post(routable)).status == 200
        assert len(await tap.read(1)) == 1


async def test_rabbitmq_missing_exchange_fails_every_outstanding_publish_then_recovers(
    closing: Callable[[Any], Any],
) -> None:
    """A missing exchange closes the channel, failing every publish outstanding on it; the
    sender opens a new channel for the next publish (no reconnect, nothing declared)."""
    require("amqp")
    exchange, queue = unique("relay-ex"), unique("relay-test")
    sender = closing(open_sender(amqp_url(queue, exchange)))
    results = await asyncio.gather(*(post(sender, event_id=f"evt_{n}") for n in range(5)))
    assert all(failed(r, "exchange not found") or failed(r, "channel") for r in results), results
    async with Tap(amqp_url(queue, exchange)) as tap:  # the operator declares it
        # Publishes that raced the channel's closing can make RabbitMQ close the whole
        # connection (CHANNEL_ERROR), which the next publish may still meet; the one after
        # reconnects. Either way the same sender recovers, as the relay's retries would.
        results = [await post(sender) for _ in range(3)]
        assert results[-1].status == 200, results
        assert all(r.status == 200 or failed(r) for r in results), results
        assert len(await tap.read(3, timeout=1.0)) == sum(r.status == 200 for r in results)


async def test_jetstream_duplicate_puback_is_a_success(closing: Callable[[Any], Any]) -> None:
    require("nats")
    subject = unique("relay.test").replace("-", "_")
    async with Tap(nats_url(subject)) as tap:
        sender = closing(open_sender(nats_url(subject)))
        first = await post(sender, event_id="evt_same")
        again = await post(sender, event_id="evt_same")
        assert (first.status, again.status) == (200, 200)
        assert again.excerpt is not None and "duplicate" in again.excerpt
        assert len(await tap.read(2, timeout=1.0)) == 1  # JetStream kept one


async def test_jetstream_without_a_stream_for_the_subject_is_a_failure(
    closing: Callable[[Any], Any],
) -> None:
    require("nats")
    sender = closing(open_sender(nats_url(unique("relay.nostream").replace("-", "_"))))
    assert failed(await post(sender), "no stream"), "silently dropped?"


async def test_jetstream_message_larger_than_the_stream_accepts_is_permanent(
    closing: Callable[[Any], Any],
) -> None:
    require("nats")
    import nats

    subject = unique("relay.small").replace("-", "_")
    client = await nats.connect(servers=[NATS])
    js = client.jetstream()
    name = subject.replace(".", "_")
    await js.add_stream(name=name, subjects=[subject], max_msg_size=256)
    try:
        sender = closing(open_sender(nats_url(subject)))
        result = await post(sender, body=b"x" * 1024)
        assert (result.status, result.permanent) == (None, True), result
        assert result.error is not None and "larger" in result.error
        assert (await post(sender)).status == 200  # a small one still goes
    finally:
        await js.delete_stream(name)
        await client.close()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize(
    "url",
    [
        "amqp://guest:guest@127.0.0.1:{port}/?routing_key=q",
        "nats://127.0.0.1:{port}/relay.x",
        "redis://127.0.0.1:{port}/0?stream=s",
    ],
)
async def test_a_broker_that_is_down_is_a_failure_within_the_timeout(
    url: str, closing: Callable[[Any], Any]
) -> None:
    sender = closing(open_sender(url.format(port=_closed_port())))
    result = await post(sender, timeout=3.0)
    assert failed(result, "connection failed"), result
    assert result.latency < 1.0


@pytest.mark.parametrize(
    "url",
    [
        "amqp://guest:guest@127.0.0.1:{port}/?routing_key=q",
        "nats://127.0.0.1:{port}/relay.x",
        "redis://127.0.0.1:{port}/0?stream=s",
    ],
)
async def test_the_timeout_covers_connecting(url: str, closing: Callable[[Any], Any]) -> None:
    """A server that accepts the TCP connection and never answers."""
    held: list[asyncio.StreamWriter] = []
    silent = await asyncio.start_server(lambda r, w: held.append(w), "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    try:
        sender = closing(open_sender(url.format(port=port)))
        result = await post(sender, timeout=0.3)
        assert failed(result, "timeout after 0.3s connecting"), result
    finally:
        for writer in held:
            writer.close()
        silent.close()
        await silent.wait_closed()


async def test_rabbitmq_refused_password_is_named_and_never_shown(
    closing: Callable[[Any], Any],
) -> None:
    require("amqp")
    password = "not-the-password-" + os.urandom(6).hex()
    sender = closing(open_sender(f"amqp://guest:{password}@127.0.0.1:5672/?routing_key=q"))
    result = await post(sender)
    assert failed(result, "authentication refused"), result
    assert password not in repr(result)


async def test_redis_refused_password_is_named_and_never_shown(
    closing: Callable[[Any], Any],
) -> None:
    require("redis")
    password = "not-the-password-" + os.urandom(6).hex()
    sender = closing(open_sender(f"redis://nobody:{password}@127.0.0.1:6379/0?stream=s"))
    result = await post(sender)
    assert failed(result, "authentication refused"), result
    assert password not in repr(result)


# -- error mapping: the failures a live server cannot be made to produce here --------------


@pytest.mark.parametrize(
    ("url", "exc", "error", "permanent"),
    [
        (  # RabbitMQ's max_message_size is 128 MiB here; events are far smaller
            "amqp://h/?routing_key=q",
            "aiormq.exceptions:ChannelPreconditionFailed",
            "message larger than RabbitMQ accepts",
            True,
        ),
        ("amqp://h/?routing_key=q", "aiormq.exceptions:ChannelAccessRefused", "permission", False),
        ("redis://h/0?stream=s", "redis.exceptions:NoPermissionError", "NOPERM", False),
        ("redis://h/0?stream=s", "redis.exceptions:ReadOnlyError", "READONLY", False),
        ("nats://h/s", "nats.errors:MaxPayloadError", "larger than the NATS server", True),
        ("nats://h/s", "nats.js.errors:ServiceUnavailableError", "JetStream not enabled", False),
        ("nats://h/s", "relay.brokers.jetstream:JetStreamDisabledError", "not enabled", False),
    ],
)
def test_failure_mapping(url: str, exc: str, error: str, permanent: bool) -> None:
    import importlib

    module, name = exc.split(":")
    cls = getattr(importlib.import_module(module), name)
    texts = {
        "ChannelPreconditionFailed": "PRECONDITION_FAILED - message size 140000000 is larger "
        "than configured max size 134217728",
        "ReadOnlyError": "READONLY You can't write against a read only replica.",
    }
    raised = cls(texts[name]) if name in texts else cls()
    failure = open_sender(url)._failure(raised, connected=True)  # type: ignore[attr-defined]
    assert error in failure.error
    assert failure.permanent is permanent


async def test_rabbitmq_routing_key_defaults_to_the_events_feed(
    closing: Callable[[Any], Any],
) -> None:
    require("amqp")
    exchange = unique("relay-ex")
    url = f"{RABBIT}?exchange={exchange}"
    async with Tap(url) as tap:  # binds a queue to the exchange with the feed's name
        sender = closing(open_sender(url))
        assert (await post(sender)).status == 200
        [message] = await tap.read(1)
    assert message.body == BODY  # its recipient is private.enterprise.users
