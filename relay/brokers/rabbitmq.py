"""RabbitMQ through aio-pika: persistent, mandatory messages on a channel with publisher
confirms (CONTRACT 4b).

Two aio-pika behaviours decide correctness here. A mandatory message the broker returns as
unroutable resolves the publish as a *success* unless the channel was opened with
``on_return_raises=True``. A publish to a missing exchange closes the whole channel (404),
failing every publish outstanding on it; the next publish opens a fresh channel on the same
connection. Nothing is declared: exchanges and queues are the operator's.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Sequence

import aio_pika
import orjson
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange
from aiormq.exceptions import (
    AMQPChannelError,
    AuthenticationError,
    ChannelAccessRefused,
    ChannelClosed,
    ChannelInvalidStateError,
    ChannelNotFoundEntity,
    ChannelPreconditionFailed,
    DeliveryError,
    ProbableAuthenticationError,
    PublishError,
)

from relay.brokers.connection import BrokerSender, Failure
from relay.brokers.target import AmqpTarget

__all__ = ["AmqpSender"]

APP_ID = "sfox-relay"


class _Link:
    """A connection and its confirming channel; the channel is replaced when the broker
    closes it (a missing exchange, a refused permission), the connection when it drops."""

    def __init__(self, connection: AbstractConnection) -> None:
        self.connection = connection
        self._channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None
        self._lock = asyncio.Lock()  # concurrent publishes open one channel, not one each

    async def exchange(self, name: str) -> AbstractExchange:
        async with self._lock:
            if self._channel is None or self._channel.is_closed or self._exchange is None:
                self._exchange = None
                self._channel = await self.connection.channel(
                    publisher_confirms=True, on_return_raises=True
                )
                # ensure=False: look the exchange up by name, declare nothing.
                self._exchange = (
                    self._channel.default_exchange
                    if not name
                    else await self._channel.get_exchange(name, ensure=False)
                )
            return self._exchange

    def forget_channel(self) -> None:
        """Open a new channel for the next publish: the broker may be closing this one (its
        closed state can arrive after the failure it caused)."""
        self._channel = None
        self._exchange = None


class AmqpSender(BrokerSender[_Link]):
    """Publishes each event as one message and waits for RabbitMQ's confirm."""

    def __init__(
        self,
        target: AmqpTarget,
        own_headers: Sequence[str] = (),
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(own_headers, ssl_context)
        self._target = target

    async def _open(self) -> _Link:
        if self._target.tls:
            context = self._ssl_context or ssl.create_default_context()
            connection = await aio_pika.connect(self._target.url, ssl_context=context)
        else:
            connection = await aio_pika.connect(self._target.url)
        return _Link(connection)

    def _usable(self, client: _Link) -> bool:
        return not client.connection.is_closed

    async def _close(self, client: _Link) -> None:
        await client.connection.close()

    async def _publish(
        self, client: _Link, body: bytes, headers: list[tuple[str, str]], event_id: str
    ) -> str:
        exchange = await client.exchange(self._target.exchange)
        routing_key = self._target.routing_key or _feed(body)
        message = aio_pika.Message(
            body,
            headers=dict(headers),
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=event_id,
            app_id=APP_ID,
        )
        try:
            await exchange.publish(message, routing_key, mandatory=True)
        except DeliveryError:
            raise  # a nack or a returned message: the channel carries on
        except Exception:
            client.forget_channel()
            raise
        return "confirmed by RabbitMQ"

    def _failure(self, exc: Exception, *, connected: bool) -> Failure:
        if isinstance(exc, PublishError):  # before DeliveryError: it is one
            code = getattr(getattr(exc.message, "delivery", None), "reply_code", "?")
            return Failure(f"returned unroutable by RabbitMQ (reply {code}: no queue bound)")
        if isinstance(exc, DeliveryError):
            return Failure("negative acknowledgement (nack) from RabbitMQ")
        if isinstance(exc, ChannelNotFoundEntity):
            return Failure("exchange not found (404); RabbitMQ closed the channel")
        if isinstance(exc, ChannelAccessRefused):
            return Failure("permission refused by RabbitMQ (403)")
        if isinstance(exc, ChannelPreconditionFailed) and "size" in str(exc).lower():
            return Failure("message larger than RabbitMQ accepts", permanent=True)
        if isinstance(exc, (AuthenticationError, ProbableAuthenticationError)):
            return Failure("authentication refused by RabbitMQ", reconnect=True)
        if isinstance(exc, (ChannelClosed, ChannelInvalidStateError, AMQPChannelError)):
            return Failure(f"channel closed by RabbitMQ ({type(exc).__name__})")
        if connected:
            return Failure(f"connection lost ({type(exc).__name__})", reconnect=True)
        if isinstance(exc, OSError) and exc.strerror:  # aiormq's errors are OSErrors too
            return Failure(f"connection failed: {exc.strerror}", reconnect=True)
        return Failure(f"connection failed: {type(exc).__name__}", reconnect=True)


def _feed(body: bytes) -> str:
    """The routing key when the URL gives none: the event's feed (its ``recipient``)."""
    recipient = orjson.loads(body).get("recipient")
    return recipient if isinstance(recipient, str) and recipient else "relay"
