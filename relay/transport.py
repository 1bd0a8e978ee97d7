"""The dispatcher's delivery seam: send bytes, get a status, a Retry-After and an excerpt back.

:class:`Senders` gives each endpoint its sender, chosen once at start-up from the endpoint's
configuration (:func:`sender_for`): destinations that need a client of their own (a broker, a
TLS identity, a proxy) plug in there, and the dispatcher never changes. HTTP has two
implementations behind the one small Protocol. :class:`AiohttpSender` is the hot path (httpx
alone caps near 1.2k requests/s on this class of machine, see bench/http_clients.py);
:class:`HttpxSender` serves tests that mock with respx and anyone who prefers httpx. Both
never follow redirects, always time out, honour ``HTTPS_PROXY``/``HTTP_PROXY``/``NO_PROXY``
and ``SSL_CERT_FILE``, ask for an uncompressed response (``accept-encoding: identity``: a
compressed body would be stored as binary) and read at most :data:`READ_BYTES` of it, twice
what is stored, so that a secret the endpoint echoes is whole when the dispatcher redacts the
text before cutting it (:func:`relay.events.stored_excerpt`). Error texts
name the failure, never the URL (it may carry credentials).
"""

from __future__ import annotations

import asyncio
import errno
import io
import os
import ssl
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol
from urllib.parse import urlsplit

import aiohttp
from aiohttp.helpers import get_env_proxy_for_url
from yarl import URL

from relay import tls
from relay.events import EXCERPT_BYTES
from relay.limits import out_of_descriptors

if TYPE_CHECKING:
    import httpx

    from relay.config import EndpointConfig

__all__ = [
    "READ_BYTES",
    "AiohttpSender",
    "HttpxSender",
    "SendResult",
    "Sender",
    "Senders",
    "env_proxy",
    "failure",
    "sender_for",
]

#: How much of a response body is read: twice the stored excerpt (1 KiB), see above.
READ_BYTES = 2 * EXCERPT_BYTES
#: Sent with every request: endpoints answer uncompressed.
_IDENTITY = {"accept-encoding": "identity"}
_RAW_BODY_LIMIT = 1024 * 1024


@dataclass(frozen=True, slots=True)
class SendResult:
    """What came back from one POST (or publish). ``status`` is None when no response arrived.

    ``attempted`` is False when nothing reached the network because the process ran out of
    file descriptors: that is the relay's trouble, not the endpoint's, and costs no attempt.
    ``permanent`` marks a failure that no retry can fix although no HTTP status says so (a
    message larger than a broker accepts): the delivery goes dead at once.
    """

    status: int | None
    latency: float
    retry_after: str | None = None
    excerpt: str | None = None
    error: str | None = None
    attempted: bool = True
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
    their own get it here, built once. An endpoint with its own TLS files or proxy gets its own
    connection pool: a pool's connections carry one TLS identity and one route. A broker URL
    (CONTRACT 4b) gets that broker's sender, verified with the endpoint's TLS files when it
    has any; its client library is imported only then, and it connects on its first
    publish, so a broker that is down at start-up never stops the relay.
    """
    url = endpoint.url.get_secret_value()
    has_tls_files = endpoint.ca_file is not None or endpoint.client_cert is not None
    from relay.brokers import is_broker

    if is_broker(url):
        from relay.brokers import open_sender

        context = tls.context_for(endpoint) if has_tls_files else None
        return open_sender(url, tuple(endpoint.headers), context)
    is_http = urlsplit(url).scheme in ("http", "https")
    if is_http and (has_tls_files or endpoint.proxy is not None):
        return AiohttpSender(
            ssl_context=tls.context_for(endpoint) if has_tls_files else None,
            proxy=endpoint.proxy.get_secret_value() if endpoint.proxy is not None else None,
        )
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
    return tls.context()


def env_proxy(url: URL) -> URL | None:
    """The proxy ``HTTPS_PROXY``/``HTTP_PROXY``/``NO_PROXY`` choose for ``url`` (None: go
    direct), its credentials in the URL (aiohttp's ``proxy_auth`` is deprecated)."""
    try:
        proxy, auth = get_env_proxy_for_url(url)
    except LookupError:
        return None
    if auth is not None:
        proxy = proxy.with_user(auth.login).with_password(auth.password)
    return proxy


def _excerpt(data: bytes) -> str | None:
    """The head of a body as text, whatever its encoding (the dispatcher cleans and cuts it)."""
    if not data:
        return None
    return data[:READ_BYTES].decode("utf-8", "replace")


def failure(exc: BaseException, *, over_tls: bool, peer: str = "the endpoint") -> str:
    """Why an aiohttp request to ``peer`` got no answer, in words an operator can act on.

    Built from exception types, OpenSSL's reason codes and errno texts only: aiohttp's own
    messages name the host and may name the proxy URL, credentials included.
    """
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        cert_error = exc.certificate_error
        detail = getattr(cert_error, "verify_message", None) or _ssl_reason(cert_error)
        return f"TLS: {peer}'s certificate is not trusted ({detail})"
    if isinstance(exc, aiohttp.ClientHttpProxyError):
        return f"proxy refused the connection: {exc.status}"
    tls_error = _ssl_error(exc)
    if tls_error is not None:
        return f"TLS failed: {_ssl_reason(tls_error)}"
    if isinstance(exc, aiohttp.ClientProxyConnectionError):
        return f"proxy connection failed: {_os_reason(exc.os_error)}"
    if isinstance(exc, aiohttp.ClientConnectorError):
        if over_tls and isinstance(exc.os_error, ConnectionResetError):
            return f"TLS handshake failed: connection reset by {peer}"
        return f"connection failed: {_os_reason(exc.os_error)}"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return f"connection closed by {peer}"
    if isinstance(exc, aiohttp.ClientOSError) and exc.errno == errno.ECONNRESET:
        return f"connection reset by {peer}"
    return f"request failed: {type(exc).__name__}"


def _ssl_error(exc: BaseException) -> ssl.SSLError | None:
    """The OpenSSL error behind ``exc`` (its os_error or cause), if any."""
    for candidate in (getattr(exc, "os_error", None), exc.__cause__, exc):
        if isinstance(candidate, ssl.SSLError):
            return candidate
    return None


def _ssl_reason(error: BaseException) -> str:
    """OpenSSL's reason code, readable: ``TLSV13_ALERT_CERTIFICATE_REQUIRED`` -> words."""
    reason = getattr(error, "reason", None)
    return reason.replace("_", " ").lower() if isinstance(reason, str) else type(error).__name__


def _os_reason(error: OSError) -> str:
    """The errno's text: asyncio's own ``strerror`` names the address ("Connect call failed
    ('10.0.0.7', 443)")."""
    if error.errno:
        return os.strerror(error.errno)
    return error.strerror or type(error).__name__


def _unsent(start: float) -> SendResult:
    return SendResult(
        status=None,
        latency=time.perf_counter() - start,
        error="not sent: out of file descriptors",
        attempted=False,
    )


class AiohttpSender:
    """aiohttp behind the seam: several times the throughput of httpx's own transport.

    Args:
        max_connections: cap on open connections (0: none).
        ssl_context: how TLS is verified and which client certificate is shown; the default
            trusts ``SSL_CERT_FILE`` (else the system's CAs).
        proxy: ``None`` resolves ``HTTPS_PROXY``/``HTTP_PROXY``/``NO_PROXY`` per host;
            ``"none"`` always connects directly; an http(s) URL (credentials in it are sent as
            ``Proxy-Authorization``) is used for every request.
    """

    def __init__(
        self,
        *,
        max_connections: int = 0,
        ssl_context: ssl.SSLContext | None = None,
        proxy: str | None = None,
    ) -> None:
        self._max_connections = max_connections
        self._ssl_context = ssl_context
        self._session: aiohttp.ClientSession | None = None
        self._proxies: dict[tuple[str, str], URL | None] = {}
        self._fixed_proxy = proxy is not None
        self._proxy_url = None if proxy in (None, "none") else URL(proxy)

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            context = self._ssl_context if self._ssl_context is not None else _ssl_context()
            connector = aiohttp.TCPConnector(
                limit=self._max_connections, ssl=context, enable_cleanup_closed=True
            )
            # trust_env would read ~/.netrc on every request; proxies are resolved below.
            self._session = aiohttp.ClientSession(
                connector=connector, trust_env=False, auto_decompress=False
            )
        return self._session

    def _proxy(self, url: str) -> URL | None:
        """The configured proxy, or the one the environment chooses, cached per host.

        Credentials ride in the proxy URL: aiohttp sends them as ``Proxy-Authorization`` (its
        ``proxy_auth`` argument is deprecated, and a warning per request is no way to run).
        """
        if self._fixed_proxy:
            return self._proxy_url
        target = URL(url)
        key = (target.scheme, target.host or "")
        if key not in self._proxies:
            self._proxies[key] = env_proxy(target)
        return self._proxies[key]

    async def post(
        self, url: str, body: bytes, headers: Mapping[str, str], timeout: float
    ) -> SendResult:
        start = time.perf_counter()
        proxy = self._proxy(url)
        try:
            async with self._client().post(
                url,
                # aiohttp warns (and, with warnings as errors, fails) on raw bytes over 1 MiB;
                # a BytesIO sends the same bytes, the ones signed, with a Content-Length.
                data=body if len(body) <= _RAW_BODY_LIMIT else io.BytesIO(body),
                headers={**headers, **_IDENTITY},
                allow_redirects=False,
                proxy=proxy,
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as response:
                excerpt = await response.content.read(READ_BYTES)
                return SendResult(
                    status=response.status,
                    latency=time.perf_counter() - start,
                    retry_after=response.headers.get("retry-after"),
                    excerpt=_excerpt(excerpt),
                )
        except TimeoutError:
            error = f"timeout after {timeout:g}s"
        except (aiohttp.ClientError, OSError) as exc:
            if out_of_descriptors(exc):
                return _unsent(start)
            error = failure(exc, over_tls=url[:6].lower() == "https:")
        return SendResult(status=None, latency=time.perf_counter() - start, error=error)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class HttpxSender:
    """httpx behind the seam (pass ``transport=`` for tests; respx mocks it too)."""

    def __init__(self, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        import httpx  # only here: the daemon's own senders never load it

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
        import httpx

        start = time.perf_counter()
        try:
            async with self._client.stream(
                "POST", url, content=body, headers={**headers, **_IDENTITY}, timeout=timeout
            ) as response:
                excerpt = b""
                async for chunk in response.aiter_raw():
                    excerpt += chunk
                    if len(excerpt) >= READ_BYTES:
                        break
                return SendResult(
                    status=response.status_code,
                    latency=time.perf_counter() - start,
                    retry_after=response.headers.get("retry-after"),
                    excerpt=_excerpt(excerpt),
                )
        except httpx.TimeoutException:
            error = f"timeout after {timeout:g}s"
        except (httpx.HTTPError, OSError, asyncio.IncompleteReadError) as exc:
            if out_of_descriptors(exc):
                return _unsent(start)
            connect = isinstance(exc, httpx.ConnectError)
            error = "connection failed" if connect else f"request failed: {type(exc).__name__}"
        return SendResult(status=None, latency=time.perf_counter() - start, error=error)

    async def close(self) -> None:
        await self._client.aclose()
