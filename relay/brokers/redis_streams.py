"""Redis Streams through redis-py's asyncio client: ``XADD KEY [MAXLEN ~ N] * body <bytes>``
then the headers as field-value pairs (CONTRACT 4b).

Success is the entry id Redis replies with, which Redis sends before any fsync or
replication. redis-py's own retries are off: the relay's schedule retries, and a command
whose reply was lost is never silently sent twice by the client. One connection per
endpoint: publishes to it queue for that connection. Nothing is declared (XADD creates the
stream, as Redis does).
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import SSLConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    ConnectionError,
    NoPermissionError,
    RedisError,
    ResponseError,
)

from relay.brokers.connection import BrokerSender, Failure
from relay.brokers.target import RedisTarget

__all__ = ["RedisStreamSender"]


class _ContextSSLConnection(SSLConnection):
    """A TLS connection verified by the endpoint's own SSLContext (redis-py builds its own
    from file names otherwise)."""

    def __init__(self, *, relay_ssl_context: ssl.SSLContext, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ssl_context.context = relay_ssl_context


class RedisStreamSender(BrokerSender[Redis]):
    """Appends each event to the endpoint's stream and waits for the entry id."""

    # redis-py drops a connection whose command failed or was cut off by the timeout, and
    # connects it again for the next command queued on the pool: the client stays.
    replaces_connection = False

    def __init__(
        self,
        target: RedisTarget,
        own_headers: Sequence[str] = (),
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(own_headers, ssl_context)
        self._target = target

    async def _open(self) -> Redis:
        options: dict[str, Any] = {}
        if self._target.tls and self._ssl_context is not None:
            options = {
                "connection_class": _ContextSSLConnection,
                "relay_ssl_context": self._ssl_context,
            }
        pool = BlockingConnectionPool.from_url(
            self._target.url, max_connections=1, timeout=None, **options
        )
        client = Redis(connection_pool=pool, retry=Retry(NoBackoff(), 0))
        try:
            await client.ping()  # connect (and authenticate) now, within the timeout
        except BaseException:
            await client.aclose(close_connection_pool=True)
            raise
        return client

    def _usable(self, client: Redis) -> bool:
        return True  # a dropped connection fails its command; redis-py reconnects it

    async def _close(self, client: Redis) -> None:
        await client.aclose(close_connection_pool=True)

    async def _publish(
        self, client: Redis, body: bytes, headers: list[tuple[str, str]], event_id: str
    ) -> str:
        del event_id  # carried as the webhook-id field
        fields: dict[Any, Any] = {"body": body}
        fields.update(headers)
        maxlen = self._target.maxlen
        entry = await client.xadd(
            self._target.stream, fields, maxlen=maxlen, approximate=maxlen is not None
        )
        return f"entry {entry.decode() if isinstance(entry, bytes) else entry}"

    def _failure(self, exc: Exception, *, connected: bool) -> Failure:
        if isinstance(exc, (AuthenticationError, AuthorizationError)):
            return Failure("authentication refused by Redis", reconnect=True)
        if isinstance(exc, NoPermissionError):
            return Failure("permission refused by Redis (NOPERM)")
        if isinstance(exc, ResponseError):
            text = str(exc)
            if "bulk length" in text or "too big" in text:
                return Failure("message larger than Redis accepts", permanent=True)
            # The first word of a Redis error is its code (WRONGTYPE, OOM, READONLY...).
            return Failure(f"refused by Redis ({text.split(' ', 1)[0][:32]})")
        if isinstance(exc, ConnectionError):
            what = "connection lost" if connected else "connection failed"
            return Failure(f"{what} ({type(exc).__name__})", reconnect=True)
        if isinstance(exc, (RedisError, OSError)):
            return Failure(f"connection failed: {type(exc).__name__}", reconnect=True)
        return Failure(f"publish failed: {type(exc).__name__}", reconnect=True)
