"""Message-broker destinations (CONTRACT 4b): RabbitMQ, NATS JetStream and Redis Streams.

Each broker is a :class:`relay.transport.Sender` like HTTP, so the dispatcher, the retry
policy, ordering and endpoint health apply unchanged. The clients (aio-pika, nats-py,
redis-py) are imported only when an endpoint names their broker: an HTTP-only relay never
loads them.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from typing import TYPE_CHECKING

from relay.brokers.target import AmqpTarget, NatsTarget, is_broker, parse

if TYPE_CHECKING:
    from relay.transport import Sender

__all__ = ["is_broker", "open_sender"]


def open_sender(
    url: str, own_headers: Sequence[str] = (), ssl_context: ssl.SSLContext | None = None
) -> Sender:
    """The sender for the broker ``url`` names; it connects on first use, not here.

    ``own_headers`` are the endpoint's header names, carried after the relay's own;
    ``ssl_context`` verifies a TLS scheme (the default context when None).
    """
    target = parse(url)
    if isinstance(target, AmqpTarget):
        from relay.brokers.rabbitmq import AmqpSender

        return AmqpSender(target, own_headers, ssl_context)
    if isinstance(target, NatsTarget):
        from relay.brokers.jetstream import JetStreamSender

        return JetStreamSender(target, own_headers, ssl_context)
    from relay.brokers.redis_streams import RedisStreamSender

    return RedisStreamSender(target, own_headers, ssl_context)
