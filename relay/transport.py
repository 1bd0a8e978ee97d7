"""The dispatcher's delivery seam: send bytes, get a status, a Retry-After and an excerpt back.

:class:`Senders` gives each endpoint its sender, chosen once at start-up from the endpoint's
configuration (:func:`sender_for`): destinations that need a client of their own (a broker, a
TLS identity, a proxy) plug in there, and the dispatcher never changes. HTTP has two
implementations behind the one small Protocol. :class:`AiohttpSender` is the hot path (httpx
alone caps near 1.2k requests/s on this class of machine, see bench/http_clients.py);
:class:`HttpxSender` serves tests that mock with respx and anyone who prefers httpx. Both
never follow redirects, always time out, honour ``HTTPS_PROXY``/``HTTP_PROXY``/``NO_PROXY``
and ``SSL_CERT_FILE``, and read at most :data:`EXCERPT_BYTES` of a response. Error texts
name the failure, never the URL (it may carry credentials).
"""

from __future__ import annotations

import asyncio
import io
import os
import ssl
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import aiohttp
import httpx
from aiohttp.helpers import get_env_proxy_for_url
from yarl import URL

if TYPE_CHECKING:
    from relay.config import EndpointConfig

__all__ = [
    "EXCERPT_BYTES",
    "AiohttpSender",
    "HttpxSender",
    "SendResult",
    "Sender",
    "Senders",
    "sender_for",
]

EXCERPT_BYTES = 1024
_RAW_BODY_LIMIT = 1024 * 1024


@dataclass(frozen=True, slots=True)
class SendResult:
    """What came back from one POST (or publish). ``status`` is None when no response arrived.

    ``permanent`` marks a failure that no retry can fix although no HTTP status says so (a
    message larger than a broker accepts): the delivery goes dead at once.
    """

    status: int | None
    latency: float
    retry_after: str | None = None
    excerpt: str | None = None
    error: str | None = None
    permanent: bool = False


class Sender(Protocol):
    """Sends one webhook. Never raises for network trouble: that is a result too."""

    async def post(
        self, url: str, body: bytes, headers: Mapping[str, str], timeout: float
    ) -> SendResult: ...

    async def close(self) -> None: ...


def sender_for(endpoint: EndpointConfig, http: Sender) -> Sender:
    """The sender one endpoint's deliveries go through; ``http`` is the shared HTTP pool.

    The one place a destination is chosen: endpoints whose URL or options need a client of
    their own get it here, built once. A broker URL (CONTRACT 4b) gets that broker's sender,
    whose client library is imported only then; it connects on its first publish, so a
    broker that is down at start-up never stops the relay.
    """
    url = endpoint.url.get_secret_value()
    from relay.brokers import is_broker

    if is_broker(url):
        from relay.brokers import open_sender

        return open_sender(url, tuple(endpoint.headers))
    return http


class Senders:
    """Each endpoint's sender, by endpoint name; closes each distinct sender once."""

    def __init__(self, by_endpoint: Mapping[str, Sender]) -> None:
        self._by_endpoint = dict(by_endpoint)

    @classmethod
    def for_endpoints(
        cls, endpoints: Iterable[EndpointConfig], *, http: Sender | None = None
    ) -> Senders:
        """What ``relay run`` uses: :func:`sender_for` each endpoint."""
        pool = http if http is not None else AiohttpSender()
        return cls({ep.name: sender_for(ep, pool) for ep in endpoints})

    @classmethod
    def only(cls, sender: Sender, endpoints: Iterable[EndpointConfig]) -> Senders:
        """Every endpoint through ``sender`` (tests inject one this way)."""
        return cls(dict.fromkeys((ep.name for ep in endpoints), sender))

    def __getitem__(self, endpoint: str) -> Sender:
        return self._by_endpoint[endpoint]

    async def close(self) -> None:
        closed: list[Sender] = []
        for sender in self._by_endpoint.values():
            if not any(sender is done for done in closed):
                closed.append(sender)
                await sender.close()


def _ssl_context() -> ssl.SSLContext:
    return ssl.create_default_context(cafile=os.environ.get("SSL_CERT_FILE") or None)


def _excerpt(data: bytes) -> str | None:
    """At most :data:`EXCERPT_BYTES` of UTF-8, whatever the body's encoding."""
    if not data:
        return None
    text = data[:EXCERPT_BYTES].decode("utf-8", "replace")
    return text.encode()[:EXCERPT_BYTES].decode("utf-8", "ignore")


class AiohttpSender:
    """aiohttp behind the seam: several times the throughput of httpx's own transport."""

    def __init__(self, *, max_connections: int = 0) -> None:
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None
        self._proxies: dict[tuple[str, str], tuple[URL | None, aiohttp.BasicAuth | None]] = {}

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self._max_connections, ssl=_ssl_context(), enable_cleanup_closed=True
            )
            # trust_env would read ~/.netrc on every request; proxies are resolved below.
            self._session = aiohttp.ClientSession(
                connector=connector, trust_env=False, auto_decompress=False
            )
        return self._session

    def _proxy(self, url: str) -> tuple[URL | None, aiohttp.BasicAuth | None]:
        """The proxy ``HTTPS_PROXY``/``HTTP_PROXY``/``NO_PROXY`` choose, cached per host."""
        target = URL(url)
        key = (target.scheme, target.host or "")
        if key not in self._proxies:
            try:
                self._proxies[key] = get_env_proxy_for_url(target)
            except LookupError:
                self._proxies[key] = (None, None)
        return self._proxies[key]

    async def post(
        self, url: str, body: bytes, headers: Mapping[str, str], timeout: float
    ) -> SendResult:
        start = time.perf_counter()
        proxy, proxy_auth = self._proxy(url)
        try:
            async with self._client().post(
                url,
                # aiohttp warns (and, with warnings as errors, fails) on raw bytes over 1 MiB;
                # a BytesIO sends the same bytes, the ones signed, with a Content-Length.
                data=body if len(body) <= _RAW_BODY_LIMIT else io.BytesIO(body),
                headers=headers,
                allow_redirects=False,
                proxy=proxy,
                proxy_auth=proxy_auth,
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as response:
                excerpt = await response.content.read(EXCERPT_BYTES)
                return SendResult(
                    status=response.status,
                    latency=time.perf_counter() - start,
                    retry_after=response.headers.get("retry-after"),
                    excerpt=_excerpt(excerpt),
                )
        except TimeoutError:
            error = f"timeout after {timeout:g}s"
        except aiohttp.ClientConnectorError as exc:
            error = f"connection failed: {exc.os_error.strerror or type(exc.os_error).__name__}"
        except aiohttp.ServerDisconnectedError:
            error = "connection closed by the endpoint"
        except (aiohttp.ClientError, OSError) as exc:
            error = f"request failed: {type(exc).__name__}"
        return SendResult(status=None, latency=time.perf_counter() - start, error=error)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class HttpxSender:
    """httpx behind the seam (pass ``transport=`` for tests; respx mocks it too)."""

    def __init__(self, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._client = httpx.AsyncClient(
            transport=transport,
            follow_redirects=False,
            trust_env=True,
            verify=_ssl_context(),
            timeout=httpx.Timeout(15.0),
        )

    async def post(
        self, url: str, body: bytes, headers: Mapping[str, str], timeout: float
    ) -> SendResult:
        start = time.perf_counter()
        try:
            async with self._client.stream(
                "POST", url, content=body, headers=dict(headers), timeout=timeout
            ) as response:
                excerpt = b""
                async for chunk in response.aiter_raw():
                    excerpt += chunk
                    if len(excerpt) >= EXCERPT_BYTES:
                        break
                return SendResult(
                    status=response.status_code,
                    latency=time.perf_counter() - start,
                    retry_after=response.headers.get("retry-after"),
                    excerpt=_excerpt(excerpt),
                )
        except httpx.TimeoutException:
            error = f"timeout after {timeout:g}s"
        except httpx.ConnectError:
            error = "connection failed"
        except (httpx.HTTPError, OSError, asyncio.IncompleteReadError) as exc:
            error = f"request failed: {type(exc).__name__}"
        return SendResult(status=None, latency=time.perf_counter() - start, error=error)

    async def close(self) -> None:
        await self._client.aclose()
