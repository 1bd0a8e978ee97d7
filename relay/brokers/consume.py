"""The consumer's side, each with its broker's own client: set up a destination, read it back.

For ``relay demo --to URL``, the tests and the benchmark (one module, so all three read
messages the same way). This declares what the relay never does (a queue bound to the
exchange, a stream for the subject), because a demo or a test owns its destination; an
operator's deployment declares its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from dataclasses import dataclass, field
from typing import Any, Self

from relay.brokers.target import AmqpTarget, NatsTarget, RedisTarget, Target, parse

__all__ = ["Consumed", "Tap"]


@dataclass(frozen=True, slots=True)
class Consumed:
    """One message read back: its body, its headers in the order read, the broker's extras
    (AMQP properties; the NATS stream sequence; the Redis entry id)."""

    body: bytes
    headers: list[tuple[str, str]]
    extra: dict[str, Any] = field(default_factory=dict)
    arrived_ns: int = field(default_factory=time.time_ns)

    def header(self, name: str) -> str | None:
        return next((value for key, value in self.headers if key == name), None)


def _stream_name(subject: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", subject)


class Tap:
    """A destination for ``url`` set up on entry (``declare=True``) and read from;
    removed on exit when this tap declared it."""

    def __init__(
        self, url: str, *, declare: bool = True, feed: str = "", consume: bool = True
    ) -> None:
        self.target: Target = parse(url)
        self._declare = declare
        self._consume = consume  # False: messages stay put, to be counted by held()
        self._feed = feed or "private.enterprise.users"
        self._client: Any = None
        self._reader: Any = None
        self._queue: Any = None
        self._consumer_tag: Any = None
        self._buffer: asyncio.Queue[Consumed] = asyncio.Queue()
        self._cursor = "0-0"

    async def __aenter__(self) -> Self:
        target = self.target
        if isinstance(target, AmqpTarget):
            await self._enter_amqp(target)
        elif isinstance(target, NatsTarget):
            await self._enter_nats(target)
        else:
            await self._enter_redis(target)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any
    ) -> None:
        del exc_type, exc, tb
        target = self.target
        with contextlib.suppress(Exception):
            if isinstance(target, AmqpTarget):
                if self._consumer_tag is not None:
                    await self._queue.cancel(self._consumer_tag)
                if self._declare:
                    await self._queue.delete(if_unused=False, if_empty=False)
                await self._client.close()
            elif isinstance(target, NatsTarget):
                if self._declare:
                    await self._client.jetstream().delete_stream(_stream_name(target.subject))
                await self._client.close()
            else:
                if self._declare:
                    await self._client.delete(target.stream)
                await self._client.aclose()

    # -- RabbitMQ: a queue bound to the exchange with the routing key ---------------------------

    async def _enter_amqp(self, target: AmqpTarget) -> None:
        import aio_pika

        self._client = await aio_pika.connect(target.url)
        channel = await self._client.channel()
        key = target.routing_key or self._feed
        name = key if not target.exchange else f"{target.exchange}.{key}"
        if self._declare:
            self._queue = await channel.declare_queue(name, durable=True)
            if target.exchange:
                exchange = await channel.declare_exchange(target.exchange, durable=True)
                await self._queue.bind(exchange, key)
        else:
            self._queue = await channel.get_queue(name, ensure=True)

        async def on_message(message: Any) -> None:
            await message.ack()
            headers = [(str(k), _text(v)) for k, v in (message.headers or {}).items()]
            extra = {
                "message_id": message.message_id,
                "content_type": message.content_type,
                "app_id": message.app_id,
                "delivery_mode": int(message.delivery_mode),
            }
            self._buffer.put_nowait(Consumed(message.body, headers, extra))

        if self._consume:
            self._consumer_tag = await self._queue.consume(on_message)

    # -- NATS: a stream bound to the subject, read by an ordered push consumer ------------------

    async def _enter_nats(self, target: NatsTarget) -> None:
        import nats

        self._client = await nats.connect(servers=[target.url])
        js = self._client.jetstream()
        if self._declare:
            await js.add_stream(name=_stream_name(target.subject), subjects=[target.subject])

        async def on_message(message: Any) -> None:
            headers = [(str(k), str(v)) for k, v in (message.headers or {}).items()]
            extra = {"seq": message.metadata.sequence.stream}
            self._buffer.put_nowait(Consumed(message.data, headers, extra))

        if self._consume:
            await js.subscribe(target.subject, cb=on_message, ordered_consumer=True)

    # -- Redis: XREAD from the stream's start ---------------------------------------------------

    async def _enter_redis(self, target: RedisTarget) -> None:
        from redis.asyncio import Redis

        self._client = Redis.from_url(target.url)
        if self._declare:
            await self._client.delete(target.stream)

    async def _poll_redis(self, target: RedisTarget, block_ms: int) -> None:
        found = await self._client.xread({target.stream: self._cursor}, block=block_ms)
        for _, entries in found or []:
            for entry_id, fields in entries:
                self._cursor = entry_id.decode()
                pairs = list(fields.items())
                body = pairs[0][1] if pairs and pairs[0][0] == b"body" else b""
                headers = [(k.decode(), v.decode()) for k, v in pairs[1:]]
                self._buffer.put_nowait(Consumed(body, headers, {"id": self._cursor}))

    async def held(self) -> int:
        """How many messages the destination holds now (unconsumed ones, for RabbitMQ)."""
        target = self.target
        if isinstance(target, AmqpTarget):
            channel = await self._client.channel()
            queue = await channel.declare_queue(self._queue.name, passive=True)
            count = int(queue.declaration_result.message_count or 0)
            await channel.close()
            return count
        if isinstance(target, NatsTarget):
            info = await self._client.jetstream().stream_info(_stream_name(target.subject))
            return int(info.state.messages)
        return int(await self._client.xlen(target.stream))

    async def read(self, count: int, timeout: float = 10.0) -> list[Consumed]:
        """Up to ``count`` messages, waiting at most ``timeout`` for them to arrive."""
        got: list[Consumed] = []
        deadline = time.monotonic() + timeout
        while len(got) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if isinstance(self.target, RedisTarget) and self._buffer.empty():
                await self._poll_redis(self.target, max(1, int(min(left, 0.2) * 1000)))
                continue
            try:
                got.append(await asyncio.wait_for(self._buffer.get(), min(left, 0.2)))
            except TimeoutError:
                continue
        return got

    async def settle(self, quiet: float = 0.5) -> list[Consumed]:
        """Whatever else arrives until nothing has for ``quiet`` seconds."""
        more: list[Consumed] = []
        while batch := await self.read(1_000_000, timeout=quiet):
            more += batch
        return more


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
