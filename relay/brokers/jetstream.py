"""NATS JetStream through nats-py: a JetStream publish, confirmed by the stream's PubAck
(CONTRACT 4b).

The header ``Nats-Msg-Id`` is the event id, so a retried publish the stream already holds
comes back as a PubAck marked duplicate: that is a success (JetStream has the message, within
the stream's ``duplicate_window``). nats-py's own reconnection is off: a lost connection fails
the publishes on it, which the relay retries, and the next publish connects afresh. Nothing
is declared: streams are the operator's.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence

from nats.aio.client import Client as NatsClient
from nats.errors import (
    AuthorizationError,
    ConnectionClosedError,
    MaxPayloadError,
    NoServersError,
    StaleConnectionError,
)
from nats.errors import Error as NatsError
from nats.js.errors import APIError, NoStreamResponseError, ServiceUnavailableError

from relay.brokers.connection import BrokerSender, Failure
from relay.brokers.target import NatsTarget

__all__ = ["JetStreamDisabledError", "JetStreamSender"]

# JetStream's error code for a message over the stream's max_msg_size.
_MESSAGE_TOO_LARGE = 10054


class JetStreamDisabledError(Exception):
    """The server answers, but its JetStream does not (not enabled for the account)."""


async def _ignore(*_: object) -> None:
    """nats-py's callbacks log on their own (with details that may carry the URL); the
    relay reports each failure once, as the attempt's result."""


class JetStreamSender(BrokerSender[NatsClient]):
    """Publishes each event to the endpoint's subject and waits for the stream's PubAck."""

    def __init__(
        self,
        target: NatsTarget,
        own_headers: Sequence[str] = (),
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(own_headers, ssl_context)
        self._target = target

    async def _open(self) -> NatsClient:
        tls = (self._ssl_context or ssl.create_default_context()) if self._target.tls else None
        client = NatsClient()
        try:
            await self._connect(client, tls)
        except BaseException:
            # Cut off mid-handshake (the timeout), nats-py leaves its socket open.
            await self._close_quietly(client)
            raise
        return client

    async def _connect(self, client: NatsClient, tls: ssl.SSLContext | None) -> None:
        await client.connect(
            servers=[self._target.url],
            allow_reconnect=False,
            # nats-py retries a server forever (every reconnect_time_wait) unless it has a
            # positive limit: give up at once, and let the relay's schedule retry.
            max_reconnect_attempts=1,
            reconnect_time_wait=0,
            tls=tls,
            tls_hostname=self._target.host if tls else None,
            error_cb=_ignore,
            disconnected_cb=_ignore,
            closed_cb=_ignore,
        )

    def _usable(self, client: NatsClient) -> bool:
        return client.is_connected

    async def _close(self, client: NatsClient) -> None:
        await client.close()

    async def _publish(
        self, client: NatsClient, body: bytes, headers: list[tuple[str, str]], event_id: str
    ) -> str:
        message_headers = {"Nats-Msg-Id": event_id, **dict(headers)}
        js = client.jetstream()
        try:
            # No timeout of nats-py's own: the endpoint's timeout around the publish bounds it.
            ack = await js.publish(
                self._target.subject, body, timeout=3600.0, headers=message_headers
            )
        except NoStreamResponseError:
            # Nobody answered: no stream for the subject, or no JetStream at all. Which one
            # is worth the one request it takes to ask, on this failure path only.
            try:
                await js.account_info()
            except (NatsError, OSError) as exc:
                raise JetStreamDisabledError from exc
            raise
        duplicate = " (duplicate: already stored)" if ack.duplicate else ""
        return f"stored by stream {ack.stream} seq {ack.seq}{duplicate}"

    def _failure(self, exc: Exception, *, connected: bool) -> Failure:
        if isinstance(exc, MaxPayloadError):
            return Failure("message larger than the NATS server accepts", permanent=True)
        if isinstance(exc, NoStreamResponseError):
            return Failure("no stream for the subject")
        if isinstance(exc, JetStreamDisabledError):
            return Failure("JetStream not enabled on the NATS server")
        if isinstance(exc, ServiceUnavailableError):
            return Failure("JetStream not enabled or unavailable (503)")
        if isinstance(exc, APIError):
            if exc.err_code == _MESSAGE_TOO_LARGE:
                return Failure("message larger than the stream accepts", permanent=True)
            return Failure(f"refused by JetStream (error {exc.err_code or exc.code})")
        if isinstance(exc, AuthorizationError) or "authorization" in str(exc).lower():
            return Failure("authentication or permission refused by NATS", reconnect=True)
        if isinstance(exc, (ConnectionClosedError, StaleConnectionError)) or connected:
            return Failure(f"connection lost ({type(exc).__name__})", reconnect=True)
        if isinstance(exc, NoServersError):
            return Failure("connection failed: no NATS server answered", reconnect=True)
        if isinstance(exc, OSError):
            return Failure(f"connection failed: {exc.strerror or type(exc).__name__}")
        if isinstance(exc, NatsError):
            return Failure(f"connection failed: {type(exc).__name__}", reconnect=True)
        return Failure(f"connection failed: {type(exc).__name__}", reconnect=True)
