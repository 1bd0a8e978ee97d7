"""What every broker sender shares: one connection, opened on use, replaced after a failure.

A publish either ends confirmed (a ``SendResult`` with status 200 and the broker's receipt as
its excerpt) or as a failure with status None and an error naming what went wrong, retried
like a 5xx; only a message larger than the broker accepts is ``permanent``. The endpoint's
timeout covers (re)connecting, publishing and the confirmation. Error texts never quote the
URL or the client's own message (either may carry credentials).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from relay.brokers.target import message_headers
from relay.transport import SendResult

__all__ = ["BrokerSender", "Failure"]

log = logging.getLogger("relay.brokers")

Client = TypeVar("Client")

# A confirmed publish is recorded as this status: the delivery succeeded.
CONFIRMED = 200


@dataclass(frozen=True, slots=True)
class Failure:
    """How one publish failed: the text stored as the attempt's error, whether retrying can
    help, and whether the connection is to be replaced before the next publish."""

    error: str
    permanent: bool = False
    reconnect: bool = False


class BrokerSender(ABC, Generic[Client]):
    """One broker endpoint's connection and the template of a publish over it."""

    #: Whether a failure that calls for it replaces the client; False where the client
    #: re-establishes its own connection on the next use (replacing it under publishes still
    #: queued on it would strand their connections).
    replaces_connection = True

    def __init__(self, own_headers: Sequence[str], ssl_context: ssl.SSLContext | None) -> None:
        self._own_headers = tuple(own_headers)
        self._ssl_context = ssl_context
        self._client: Client | None = None
        self._lock = asyncio.Lock()

    async def post(
        self, url: str, body: bytes, headers: Mapping[str, str], timeout: float
    ) -> SendResult:
        """Publish ``body`` with the message's share of ``headers``; ``url`` is the
        endpoint's, already parsed when this sender was built."""
        del url
        start = time.perf_counter()
        pairs = message_headers(headers, self._own_headers)
        client: Client | None = None
        try:
            async with asyncio.timeout(timeout):
                client = await self._connected()
                receipt = await self._publish(client, body, pairs, headers["webhook-id"])
            return SendResult(CONFIRMED, time.perf_counter() - start, excerpt=receipt)
        except TimeoutError:
            phase = "connecting" if client is None else "waiting for the confirmation"
            # A confirmation that never came may mean a connection silently gone: replace it.
            failure = Failure(f"timeout after {timeout:g}s {phase}", reconnect=True)
        except Exception as exc:  # every client error is a result, never a crash
            failure = self._failure(exc, connected=client is not None)
        if failure.reconnect and client is not None and self.replaces_connection:
            await self._discard(client)
        return SendResult(
            None, time.perf_counter() - start, error=failure.error, permanent=failure.permanent
        )

    async def _connected(self) -> Client:
        """The open connection, (re)opened here under the lock, so concurrent publishes
        share one."""
        async with self._lock:
            if self._client is None or not self._usable(self._client):
                stale, self._client = self._client, None
                if stale is not None:
                    await self._close_quietly(stale)
                self._client = await self._open()
            return self._client

    async def _discard(self, client: Client) -> None:
        """Drop ``client`` unless another publish has already replaced it."""
        if self._client is client:
            self._client = None
        await self._close_quietly(client)

    async def _close_quietly(self, client: Client) -> None:
        try:
            async with asyncio.timeout(5.0):
                await self._close(client)
        except Exception as exc:  # a connection being dropped may fail to close cleanly
            log.debug(
                "broker connection did not close cleanly",
                extra={"event": "broker.close_failed", "error": type(exc).__name__},
            )

    async def close(self) -> None:
        """Close the connection (at shutdown)."""
        async with self._lock:
            if self._client is not None:
                client, self._client = self._client, None
                await self._close_quietly(client)

    @abstractmethod
    async def _open(self) -> Client:
        """Connect; raises the client's errors."""

    @abstractmethod
    def _usable(self, client: Client) -> bool:
        """Whether ``client`` is still open."""

    @abstractmethod
    async def _close(self, client: Client) -> None:
        """Close ``client``."""

    @abstractmethod
    async def _publish(
        self, client: Client, body: bytes, headers: list[tuple[str, str]], event_id: str
    ) -> str:
        """Publish and wait for the broker's confirmation; returns a short receipt."""

    @abstractmethod
    def _failure(self, exc: Exception, *, connected: bool) -> Failure:
        """What ``exc`` (raised while connecting, or publishing when ``connected``) means."""
