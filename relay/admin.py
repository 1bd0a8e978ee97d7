"""The admin HTTP port: health, readiness, metrics, the /api routes and the status page.

Served by uvicorn in the relay's own event loop. ``/api/*`` needs ``Authorization: Bearer
$RELAY_ADMIN_TOKEN`` (compared in constant time); with no token configured it answers 403, so
an admin port exposed by mistake reveals nothing. The status page holds no data: it reads
``/api/*`` with the token it asks for once.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import hashlib
import hmac
import logging
import re
import socket
import time
from collections.abc import Callable
from email.utils import formatdate
from importlib import resources
from typing import Annotated, Any, Literal

import h11
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from relay import __version__, service
from relay.config import Settings
from relay.errors import RelayError
from relay.history import History
from relay.limits import Throttle, admin_connection_cap, nofile_limit
from relay.metrics import Metrics
from relay.store.base import Store

__all__ = ["AdminServer", "create_app"]

log = logging.getLogger("relay.admin")

StateFilter = Literal["pending", "delivered", "dead", "superseded"]


class Problem(BaseModel):
    """An error answer."""

    detail: str


class Attempt(BaseModel):
    at: str | None
    status: int | None
    latency_ms: float
    error: str | None
    response_excerpt: str | None


class Delivery(BaseModel):
    id: str = Field(description="Opaque delivery id")
    endpoint: str
    event_id: str = Field(description="The webhook-id header of every attempt")
    user_id: str | None
    state: StateFilter
    attempts: int
    source: str = Field(description="feed or reconcile")
    status: str | None = Field(description="The user's verification status in the event")
    next_attempt_at: str | None
    created_at: str | None
    updated_at: str | None
    last_status: int | None
    last_error: str | None


class DeliveryDetail(Delivery):
    body: str = Field(description="The stored event; a user token appears only as [sealed]")
    attempt_log: list[Attempt]


class DeliveryPage(BaseModel):
    items: list[Delivery]
    next_cursor: str | None = Field(description="Pass as `before` for the next page")


EndpointState = Literal["active", "open", "paused", "disabled", "removed"]


class Endpoint(BaseModel):
    name: str
    url: str | None = Field(description="With any credentials masked; null if unconfigured")
    configured: bool = Field(description="False: removed from the config, work kept")
    state: EndpointState = Field(description="Health (CONTRACT.md 5b); removed: unconfigured")
    alerts: bool = Field(default=False, description="The operational-events endpoint")
    user_token: str | None = None
    signed: bool | None = None
    max_in_flight: int | None = None
    rate_limit: float | None = Field(default=None, description="Attempts per second, or null")
    pending: int
    oldest_pending_age_s: float | None
    dead: int
    delivered: int
    oldest_pending_at: str | None
    last_success_at: str | None
    last_failure_at: str | None
    last_error: str | None


class EndpointChange(BaseModel):
    name: str
    state: EndpointState
    changed: bool = Field(description="False when the endpoint already was in that state")


class Replayed(BaseModel):
    replayed: int


class Retried(BaseModel):
    retried: int


class Status(BaseModel):
    version: str
    replica: str = Field(description="This process (host:pid): history and numbers are its own")
    feed_state: str
    ready: dict[str, bool]
    uptime_s: float
    in_flight: int
    feed_last_message_age_s: float | None = Field(description="null before the first frame")
    feed_reconnects: int
    last_reconcile_at: str | None = Field(description="The last successful reconciliation")


class EndpointHistory(BaseModel):
    delivered: list[int] = Field(description="Deliveries that succeeded, per second")
    failed: list[int] = Field(description="Attempts that failed (retried or dead), per second")
    depth: list[int] = Field(description="Outbox depth (pending deliveries), per second")


class HistoryPage(BaseModel):
    replica: str = Field(description="Whose history: each replica keeps its own")
    step_s: int
    start: int = Field(description="Unix second of the first value of every series")
    end: int = Field(description="Unix second of the last value")
    feed_messages: list[int] = Field(description="Feed messages received, per second")
    endpoints: dict[str, EndpointHistory]


_AUTH_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": Problem, "description": "Missing or wrong bearer token"},
    403: {"model": Problem, "description": "No RELAY_ADMIN_TOKEN is configured"},
}
_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": Problem, "description": "No such delivery"}
}
_NO_ENDPOINT: dict[int | str, dict[str, Any]] = {
    404: {"model": Problem, "description": "No such endpoint"}
}
_INVALID: dict[int | str, dict[str, Any]] = {
    422: {"model": Problem, "description": "Invalid query or path parameter"}
}


_SHORT_TOKEN = 16
#: A delivery id as a cursor; 18 digits at most, so it always fits the stores' 64-bit keys.
_CURSOR = r"^dlv_[0-9]{1,18}$"
_OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
#: The status page's own files (script and styles are files of the origin: no inline code).
_STATIC_FILES = {
    "console.js": "text/javascript; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}


def create_app(
    *,
    store: Store,
    settings: Settings,
    metrics: Metrics,
    readiness: Callable[[], dict[str, bool]],
    feed_state: Callable[[], str],
    in_flight: Callable[[], int] = lambda: 0,
    on_replay: Callable[[], None] = lambda: None,
    on_endpoint_change: Callable[[], None] = lambda: None,
    clock: Callable[[], float] = time.time,
    history: History | None = None,
) -> FastAPI:
    """The admin ASGI app; every dependency is injected so tests can drive it directly."""
    started = clock()
    history = history or History(metrics, clock=clock)
    app = FastAPI(
        title="sfox-relay admin",
        version=__version__,
        openapi_url="/api/openapi.json",
        # No Swagger UI or ReDoc: they load scripts from a CDN into the origin that holds
        # the admin token, and answer without one.
        docs_url=None,
        redoc_url=None,
        redirect_slashes=False,  # "/api/endpoints/" must not answer (307) before auth does
    )
    token = settings.admin_token.get_secret_value().encode() if settings.admin_token else None
    if token is not None and len(token) < _SHORT_TOKEN:
        log.warning(
            "RELAY_ADMIN_TOKEN is shorter than %d characters: easy to guess for anyone who "
            "reaches the admin port (e.g. openssl rand -hex 32)",
            _SHORT_TOKEN,
            extra={"event": "admin.weak_token"},
        )

    def authorize(request: Request) -> None:
        if token is None:
            raise HTTPException(403, "the admin API is disabled: set RELAY_ADMIN_TOKEN")
        header = request.headers.get("authorization", "")
        scheme, _, offered = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(offered.encode(), token):
            raise HTTPException(
                401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"}
            )

    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_middleware(_SecurityHeaders)
    api = APIRouter(prefix="/api", dependencies=[Depends(authorize)], responses=_AUTH_ERRORS)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> JSONResponse:
        checks = readiness()
        ok = all(checks.values())
        body = {"ready": ok, "checks": {k: "ok" if v else "failing" for k, v in checks.items()}}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    page = resources.files("relay").joinpath("static/index.html").read_text("utf-8")
    page_headers = {"cache-control": "no-store", "content-security-policy": page_policy(page)}

    @app.get("/", include_in_schema=False)
    async def status_page() -> HTMLResponse:
        return HTMLResponse(page, headers=page_headers)

    @app.get("/static/{name}", include_in_schema=False)
    async def static_file(name: str) -> Response:
        media_type = _STATIC_FILES.get(name)
        if media_type is None:
            raise HTTPException(404, "not found")
        data = resources.files("relay").joinpath("static", name).read_bytes()
        return Response(data, media_type=media_type, headers={"cache-control": "no-store"})

    @api.get("/status")
    async def status() -> Status:
        """The relay's feed state and readiness."""
        age = _sample(metrics.feed_last_message_age)
        reconciled = _sample(metrics.reconcile_last_success)
        return Status(
            version=__version__,
            replica=history.replica,
            feed_state=feed_state(),
            ready=readiness(),
            uptime_s=round(clock() - started, 1),
            in_flight=in_flight(),
            feed_last_message_age_s=None if age < 0 else round(age, 1),
            feed_reconnects=int(_sample(metrics.feed_reconnects)),
            last_reconcile_at=service.iso(reconciled) if reconciled > 0 else None,
        )

    @api.get("/history", responses=_INVALID)
    async def history_route(
        seconds: Annotated[int, Query(ge=1, le=3600)] = 3600,
    ) -> HistoryPage:
        """The last ``seconds`` of per-second numbers, oldest first (the status page's charts)."""
        snap = history.snapshot(seconds)
        return HistoryPage(
            replica=snap.replica,
            step_s=1,
            start=snap.start,
            end=snap.end,
            feed_messages=snap.feed_messages,
            endpoints={name: EndpointHistory(**series) for name, series in snap.endpoints.items()},
        )

    @api.get("/endpoints")
    async def endpoints() -> list[Endpoint]:
        """Configured endpoints, and removed ones that still hold work, with their numbers."""
        return [Endpoint(**e) for e in await service.endpoints(store, settings)]

    async def endpoint_action(name: str, action: Literal["pause", "resume"]) -> EndpointChange:
        done = await service.endpoint_action(
            store, settings, name, action, now=clock(), metrics=metrics
        )
        if done is None:
            raise HTTPException(404, "no such endpoint")
        on_endpoint_change()
        return EndpointChange(**done)

    @api.post("/endpoints/{name}/pause", responses=_NO_ENDPOINT)
    async def pause(name: str) -> EndpointChange:
        """Stop attempting deliveries to the endpoint (in-flight ones finish); idempotent."""
        return await endpoint_action(name, "pause")

    @api.post("/endpoints/{name}/resume", responses=_NO_ENDPOINT)
    async def resume(name: str) -> EndpointChange:
        """Make the endpoint active and its waiting deliveries due now; idempotent."""
        return await endpoint_action(name, "resume")

    @api.get("/deliveries", responses=_INVALID)
    async def deliveries(
        state: StateFilter | None = None,
        endpoint: str | None = None,
        user_id: str | None = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        before: Annotated[
            str | None,
            Query(pattern=_CURSOR, description="`next_cursor` of the previous page"),
        ] = None,
        event_id: str | None = None,
    ) -> DeliveryPage:
        """Deliveries, newest first, filtered like `relay deliveries list` (``event_id``: a
        ``webhook-id``)."""
        try:
            page = await service.list_deliveries(
                store,
                state=state,
                endpoint=endpoint,
                user_id=user_id,
                limit=limit,
                before=before,
                event_id=event_id,
            )
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        return DeliveryPage(
            items=[Delivery(**service.info_json(i)) for i in page.items],
            next_cursor=page.next_cursor,
        )

    @api.post("/deliveries/replay", responses=_INVALID)
    async def replay_matching(
        state: Literal["delivered", "dead", "superseded"] = "dead",
        endpoint: str | None = None,
        user_id: str | None = None,
        event_id: str | None = None,
    ) -> Replayed:
        """Re-queue every finished delivery matching the filters (default: dead ones)."""
        count = await service.replay(
            store, state=state, endpoint=endpoint, user_id=user_id, event_id=event_id, now=clock()
        )
        on_replay()
        return Replayed(replayed=count)

    @api.post("/deliveries/retry", responses=_INVALID)
    async def retry_waiting(
        endpoint: str | None = None,
        user_id: str | None = None,
        event_id: str | None = None,
    ) -> Retried:
        """Make pending deliveries waiting for a scheduled retry due now, without using an
        attempt (like `relay deliveries retry`)."""
        count = await service.retry_now(
            store, endpoint=endpoint, user_id=user_id, event_id=event_id, now=clock()
        )
        on_replay()
        return Retried(retried=count)

    @api.get("/deliveries/{delivery_id}", responses=_NOT_FOUND | _INVALID)
    async def delivery(delivery_id: str) -> DeliveryDetail:
        """One delivery with its event body and every attempt."""
        detail = await service.get_delivery(store, delivery_id)
        if detail is None:
            raise HTTPException(404, "no such delivery")
        return DeliveryDetail(**service.detail_json(detail))

    @api.post("/deliveries/{delivery_id}/replay", responses=_NOT_FOUND | _INVALID)
    async def replay_one(delivery_id: str) -> Replayed:
        """Re-queue one delivered or dead delivery: same webhook-id, fresh schedule."""
        if await service.get_delivery(store, delivery_id) is None:
            raise HTTPException(404, "no such delivery")
        count = await service.replay(store, ids=[delivery_id], now=clock())
        on_replay()
        return Replayed(replayed=count)

    app.include_router(api)
    return app


def _sample(metric: Any) -> float:
    """The value of an unlabelled metric (a counter's ``_total``)."""
    samples = [s for f in metric.collect() for s in f.samples if not s.name.endswith("_created")]
    return float(samples[0].value) if samples else 0.0


async def _invalid(request: Request, exc: Exception) -> JSONResponse:
    """A 422 as the document says: ``{"detail": "<where>: <why>; ..."}`` (FastAPI's own
    answers a list there, which its schema does not say). The input is never echoed."""
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    detail = "; ".join(
        f"{'.'.join(str(part) for part in error.get('loc', ()))}: {error.get('msg', 'invalid')}"
        for error in errors
    )
    return JSONResponse({"detail": detail or "invalid request"}, status_code=422)


_INLINE = re.compile(r"<(script|style)(?:\s[^>]*)?>(.*?)</\1>", re.DOTALL | re.IGNORECASE)


def page_policy(page: str) -> str:
    """The status page's Content-Security-Policy: nothing from other origins, no framing;
    its own inline script and style are allowed by their hashes, nothing else inline."""
    hashes: dict[str, list[str]] = {"script": [], "style": []}
    for kind, body in _INLINE.findall(page):
        digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
        hashes[kind.lower()].append(f"'sha256-{digest}'")
    return "; ".join(
        [
            "default-src 'self'",
            " ".join(["script-src 'self'", *hashes["script"]]),
            " ".join(["style-src 'self'", *hashes["style"]]),
            "img-src 'self' data:",
            "connect-src 'self'",
            "object-src 'none'",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )


class _SecurityHeaders:
    """Every admin answer: no MIME sniffing, no framing; and a policy that allows nothing
    unless the route set its own (the status page does)."""

    _HEADERS = (
        (b"x-content-type-options", b"nosniff"),
        (b"x-frame-options", b"DENY"),
    )
    _POLICY = (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'")

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                names = {name.lower() for name, _ in headers}
                headers.extend(h for h in self._HEADERS if h[0] not in names)
                if self._POLICY[0] not in names:
                    headers.append(self._POLICY)
                message = {**message, "headers": headers}
            await send(message)

        await self._app(scope, receive, with_headers)


class _HeadersInTime(H11Protocol):
    """uvicorn's h11 protocol, except that a request's headers must arrive within
    :attr:`header_timeout` of the connection (or of the previous response) or the connection
    is closed: idle connections that never sent a request once held every descriptor."""

    header_timeout = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._expect_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self._headers_arrived()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # h11 has parsed the request's head
            self._headers_arrived()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._expect_headers()  # the next request on this connection gets as long

    def _expect_headers(self) -> None:
        self._headers_arrived()
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_late)

    def _headers_arrived(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.close()


class AdminServer:
    """uvicorn's HTTP protocol serving the admin app inside the relay's event loop, behind
    the relay's own accept loop (CONTRACT.md section 6).

    The accept loop is ours, not asyncio's ``create_server``, so that it can bound what
    clients hold: it accepts one connection at a time, closes at once one beyond
    :attr:`max_connections`, and when descriptors run out it logs that at a bounded rate and
    pauses (asyncio's own loop retries ``backlog`` times per wake-up, logging each, and
    schedules as many restarts). :meth:`start` binds; :meth:`serve` is the accept loop, run
    under the daemon's supervisor until :meth:`stop`, which then shuts down like uvicorn:
    stop accepting, close idle connections, finish open requests.
    """

    def __init__(
        self,
        app: FastAPI,
        host: str,
        port: int,
        *,
        max_connections: int | None = None,
        header_timeout: float = 10.0,
        accept_retry: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        class Protocol(_HeadersInTime):
            pass

        Protocol.header_timeout = header_timeout
        self._config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_config=None,
            access_log=False,
            lifespan="off",
            server_header=False,
            http=Protocol,
            timeout_graceful_shutdown=5,
        )
        self._host = host
        self._port = port
        self._max_connections = max_connections
        self._accept_retry = accept_retry
        self._server = uvicorn.Server(self._config)
        self._sockets: list[socket.socket] = []
        self._stopping = asyncio.Event()
        self._stopped = asyncio.Event()
        self._serving = 0
        self._refusals = Throttle(10.0, clock=clock)
        self._accept_errors = Throttle(10.0, clock=clock)

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        return int(self._sockets[0].getsockname()[1]) if self._sockets else 0

    @property
    def max_connections(self) -> int:
        """Connections held at most: a share of the descriptor limit, never more than 256."""
        if self._max_connections is not None:
            return self._max_connections
        return admin_connection_cap(nofile_limit())

    @property
    def connections(self) -> int:
        """Connections open now."""
        return len(self._server.server_state.connections)

    async def start(self) -> None:
        """Bind; an address that cannot be bound is a :class:`RelayError` (exit 1)."""
        if not self._config.loaded:
            self._config.load()
        self._server.lifespan = self._config.lifespan_class(self._config)
        loop = asyncio.get_running_loop()
        try:
            found = await loop.getaddrinfo(
                self._host or None,
                self._port,
                type=socket.SOCK_STREAM,
                flags=socket.AI_PASSIVE,
            )
            for family, kind, proto, _, address in dict.fromkeys(found):
                sock = socket.socket(family, kind, proto)
                self._sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                if self._sockets[0] is not sock:  # one port for all: the first one's
                    address = (address[0], self.port, *address[2:])
                sock.bind(address)
                sock.listen(128)
                sock.setblocking(False)
        except OSError as exc:
            self._close_sockets()
            raise RelayError(
                f"RELAY_ADMIN_ADDR {self._host}:{self._port}: cannot listen there "
                f"({exc.strerror or exc})"
            ) from None
        log.info(
            "admin listening",
            extra={
                "event": "admin.started",
                "port": self.port,
                "max_connections": self.max_connections,
            },
        )

    async def serve(self) -> None:
        """Accept connections until :meth:`stop`, then shut down gracefully. Restartable:
        the listening sockets stay bound and open connections are untouched."""
        self._serving += 1
        try:
            async with asyncio.TaskGroup() as group:
                for sock in self._sockets:
                    group.create_task(self._accept(sock))
        finally:
            self._serving -= 1
        await self._shutdown()

    async def _accept(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            while not self._stopping.is_set():
                self._tick()
                accepting = asyncio.ensure_future(loop.sock_accept(sock))
                await asyncio.wait(
                    {accepting, stopping}, timeout=1.0, return_when="FIRST_COMPLETED"
                )
                if not accepting.done():
                    accepting.cancel()
                    with contextlib.suppress(asyncio.CancelledError, OSError):
                        await accepting
                    continue
                try:
                    conn, _ = accepting.result()
                except OSError as exc:
                    if exc.errno not in _OUT_OF_RESOURCES:
                        raise
                    self._log_accept_error(exc)
                    await asyncio.wait({stopping}, timeout=self._accept_retry)
                    continue
                if self.connections >= self.max_connections:
                    conn.close()
                    self._log_refusal()
                    continue
                try:
                    await loop.connect_accepted_socket(self._protocol, conn)
                except OSError:  # the client is gone already
                    conn.close()
        finally:
            stopping.cancel()

    def _protocol(self) -> asyncio.Protocol:
        return self._config.http_protocol_class(  # type: ignore[call-arg]
            config=self._config,
            server_state=self._server.server_state,
            app_state=self._server.lifespan.state,
        )

    def _tick(self) -> None:
        """uvicorn's once-a-second housekeeping: the Date header its responses carry."""
        date = formatdate(time.time(), usegmt=True).encode()
        self._server.server_state.default_headers = [(b"date", date)]

    def _log_accept_error(self, exc: OSError) -> None:
        held = self._accept_errors.allow()
        if held is not None:
            log.error(
                "admin port cannot accept connections: %s; retrying in %gs "
                "(%d more like this not logged)",
                exc.strerror or exc,
                self._accept_retry,
                held,
                extra={"event": "admin.accept_error", "suppressed": held},
            )

    def _log_refusal(self) -> None:
        held = self._refusals.allow()
        if held is not None:
            log.warning(
                "admin connection closed: %d open, the most allowed (%d more like this not logged)",
                self.max_connections,
                held,
                extra={"event": "admin.refused", "suppressed": held},
            )

    async def stop(self) -> None:
        """Stop accepting, close idle connections, finish open requests."""
        self._stopping.set()
        if self._serving:
            await self._stopped.wait()
        else:
            await self._shutdown()

    async def _shutdown(self) -> None:
        if self._stopped.is_set():
            return
        self._close_sockets()
        self._server.servers = []
        await self._server.shutdown()
        self._stopped.set()

    def _close_sockets(self) -> None:
        for sock in self._sockets:
            sock.close()
