"""The admin HTTP port: health, readiness, metrics, the /api routes and the status page.

Served by uvicorn in the relay's own event loop. ``/api/*`` needs ``Authorization: Bearer
$RELAY_ADMIN_TOKEN`` (compared in constant time); with no token configured it answers 403, so
an admin port exposed by mistake reveals nothing. The status page holds no data: it reads
``/api/*`` with the token it asks for once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import Callable, Iterator
from importlib import resources
from typing import Annotated, Any, Literal

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field

from relay import __version__, service
from relay.config import Settings
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


class Endpoint(BaseModel):
    name: str
    url: str | None = Field(description="With any credentials masked; null if unconfigured")
    configured: bool = Field(description="False: removed from the config, work kept")
    user_token: str | None = None
    signed: bool | None = None
    max_in_flight: int | None = None
    pending: int
    dead: int
    delivered: int
    oldest_pending_at: str | None
    last_success_at: str | None
    last_failure_at: str | None
    last_error: str | None


class Replayed(BaseModel):
    replayed: int


class Retried(BaseModel):
    retried: int


class Status(BaseModel):
    version: str
    feed_state: str
    ready: dict[str, bool]
    uptime_s: float
    in_flight: int


_AUTH_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": Problem, "description": "Missing or wrong bearer token"},
    403: {"model": Problem, "description": "No RELAY_ADMIN_TOKEN is configured"},
}
_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": Problem, "description": "No such delivery"}
}
_INVALID: dict[int | str, dict[str, Any]] = {
    422: {"model": Problem, "description": "Invalid query or path parameter"}
}


_SHORT_TOKEN = 16


def create_app(
    *,
    store: Store,
    settings: Settings,
    metrics: Metrics,
    readiness: Callable[[], dict[str, bool]],
    feed_state: Callable[[], str],
    in_flight: Callable[[], int] = lambda: 0,
    on_replay: Callable[[], None] = lambda: None,
    clock: Callable[[], float] = time.time,
) -> FastAPI:
    """The admin ASGI app; every dependency is injected so tests can drive it directly."""
    started = clock()
    app = FastAPI(
        title="sfox-relay admin",
        version=__version__,
        openapi_url="/api/openapi.json",
        docs_url="/api/docs",
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

    @app.get("/", include_in_schema=False)
    async def status_page() -> HTMLResponse:
        page = resources.files("relay").joinpath("static/index.html").read_text("utf-8")
        return HTMLResponse(page, headers={"cache-control": "no-store"})

    @api.get("/status")
    async def status() -> Status:
        """The relay's feed state and readiness."""
        return Status(
            version=__version__,
            feed_state=feed_state(),
            ready=readiness(),
            uptime_s=round(clock() - started, 1),
            in_flight=in_flight(),
        )

    @api.get("/endpoints")
    async def endpoints() -> list[Endpoint]:
        """Configured endpoints, and removed ones that still hold work, with their numbers."""
        return [Endpoint(**e) for e in await service.endpoints(store, settings)]

    @api.get("/deliveries", responses=_INVALID)
    async def deliveries(
        state: StateFilter | None = None,
        endpoint: str | None = None,
        user_id: str | None = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        before: str | None = None,
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

    @api.get("/deliveries/{delivery_id}", responses=_NOT_FOUND)
    async def delivery(delivery_id: str) -> DeliveryDetail:
        """One delivery with its event body and every attempt."""
        detail = await service.get_delivery(store, delivery_id)
        if detail is None:
            raise HTTPException(404, "no such delivery")
        return DeliveryDetail(**service.detail_json(detail))

    @api.post("/deliveries/{delivery_id}/replay", responses=_NOT_FOUND)
    async def replay_one(delivery_id: str) -> Replayed:
        """Re-queue one delivered or dead delivery: same webhook-id, fresh schedule."""
        if await service.get_delivery(store, delivery_id) is None:
            raise HTTPException(404, "no such delivery")
        count = await service.replay(store, ids=[delivery_id], now=clock())
        on_replay()
        return Replayed(replayed=count)

    app.include_router(api)
    return app


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the relay owns SIGTERM/SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class AdminServer:
    """uvicorn serving the admin app inside the relay's event loop."""

    def __init__(self, app: FastAPI, host: str, port: int) -> None:
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_config=None,
            access_log=False,
            lifespan="off",
            server_header=False,
        )
        self._server = _Server(config)
        self._task: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        sockets = [s for server in self._server.servers for s in server.sockets]
        return int(sockets[0].getsockname()[1]) if sockets else 0

    async def start(self) -> None:
        self._task = asyncio.create_task(self._server.serve(), name="relay-admin")
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise RuntimeError("admin server stopped during start-up")
            await asyncio.sleep(0.01)
        log.info("admin listening", extra={"event": "admin.started", "port": self.port})

    async def stop(self) -> None:
        """Stop accepting, finish open requests (uvicorn's own graceful close)."""
        if self._task is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
