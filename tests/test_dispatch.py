"""The dispatcher against mocked receivers (respx) over a real SQLite outbox (see the README).

Time is a fake clock the test moves: a retry is due when the test says so, never after a real
sleep. Waiting is polling (the store, the mock's calls) with a deadline. "The dispatcher did
not send X" is asserted only after it has demonstrably looked: every dispatcher here also
serves an idle ``probe`` endpoint, claimed last in each round, and :meth:`Harness.full_rounds`
counts probe claims to know that whole claim rounds ran after a change.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import logging
import ssl
import tempfile
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import formatdate
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
import respx
from conftest import eventually
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from relay import __version__
from relay.codec import compact_json, loads
from relay.config import EndpointConfig
from relay.dispatch import Dispatcher, build_request, sfox_timestamp
from relay.events import EXCERPT_BYTES, USERS_FEED, Message, NewEvent, parse_frame, prepare
from relay.metrics import Metrics
from relay.store.base import (
    Attempt,
    Claim,
    Claimed,
    DeliveryDetail,
    DeliveryInfo,
    Outcome,
    Target,
    parse_delivery_id,
)
from relay.store.sqlite import SQLiteStore
from relay.transport import HttpxSender, SendResult

T0_NS = 1_717_005_327_995_988_841  # 19 digits, beyond 2**53: must arrive exactly
TOKEN = "2000611e8c3f4a9b7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a1b0c9d8e7f6a3979"
TOKEN_EXPIRES = "2024-05-30T17:55:27.981Z"
BEFORE_EXPIRY = datetime.fromisoformat(TOKEN_EXPIRES).timestamp() - 3600
AFTER_EXPIRY = datetime.fromisoformat(TOKEN_EXPIRES).timestamp() + 1
SEAL_KEY = bytes(range(32))  # RELAY_TOKEN_KEY: tokens at rest
RECEIVER_KEY = bytes(range(100, 132))  # an endpoint's token_key: the encrypt policy
SECRET_1 = "whsec_" + base64.b64encode(b"first signing secret, 32 bytes!!").decode()
SECRET_2 = "whsec_" + base64.b64encode(b"second signing secret, 32 bytes!").decode()
WRONG_SECRET = "whsec_" + base64.b64encode(b"not the secret of this endpoint.").decode()

CRM_URL = "http://crm.test/hooks/sfox"
SICK_URL = "http://sick.test/hooks/sfox"
SCHEDULE = (0.0, 5.0, 60.0)
CRM = Target("crm")
SICK = Target("sick")
# httpx adds these itself; everything else on the wire is the relay's (or the endpoint's).
HTTPX_OWN_HEADERS = {"host", "accept", "accept-encoding", "connection", "content-length"}

PROBE = EndpointConfig.model_validate(
    {"url": "http://probe.test/", "name": "probe", "secrets": (SECRET_1,)}
)

Cond = Callable[[], Any]


# -- helpers --------------------------------------------------------------------------------


class FakeClock:
    """The dispatcher's wall clock; moves only when the test says so."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def endpoint(
    name: str = "crm",
    url: str = CRM_URL,
    *,
    secrets: Sequence[str] = (SECRET_1,),
    schedule: Sequence[float] = SCHEDULE,
    **fields: Any,
) -> EndpointConfig:
    return EndpointConfig.model_validate(
        {
            "url": url,
            "name": name,
            "secrets": tuple(secrets),
            "retry_schedule": tuple(schedule),
            **fields,
        }
    )


def user_frame(
    user_id: str, n: int, *, token: bool = False, expires: str = TOKEN_EXPIRES
) -> dict[str, Any]:
    """A users-feed message as sFOX sends it, with fields the relay does not know about."""
    payload: dict[str, Any] = {
        "user_id": user_id,
        "first_name": "Brando",
        "email": "brando@example.com",
        "status": "PENDING",
        "requirements": {"sms": True, "email": n % 2 == 0},
        "future_field": {"nested": [1, 2.5, None]},
    }
    if token:
        payload["user_token"] = {
            "token": TOKEN,
            "expires": expires,
            "partner_user_id": f"partner-{user_id}",
        }
    return {
        "sequence": n,
        "recipient": USERS_FEED,
        "timestamp": T0_NS + n,
        "payload": payload,
        "unknown_top_level": "kept",
    }


def new_event(
    user_id: str, n: int, *, token: bool = False, seal_key: bytes | None = None, **kw: Any
) -> NewEvent:
    message = parse_frame(json.dumps(user_frame(user_id, n, token=token, **kw)))
    assert isinstance(message, Message), message
    return prepare(message, seal_key=seal_key)


def key(info: DeliveryInfo) -> int:
    number = parse_delivery_id(info.id)
    assert number is not None
    return number


class SpyStore(SQLiteStore):
    """The real SQLite outbox, noting every claim; ``hold`` parks the next non-probe claim."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.claims: list[tuple[str, float, int]] = []
        self.hold: asyncio.Event | None = None
        self.held = asyncio.Event()
        self.record_hold: asyncio.Event | None = None  # parks the recorder's commits

    async def claim(self, endpoint: str, now: float, limit: int) -> Claimed:
        if self.hold is not None and endpoint != PROBE.name:
            self.held.set()
            await self.hold.wait()
        claims = await super().claim(endpoint, now, limit)
        self.claims.append((endpoint, now, len(claims)))
        return claims

    def probe_rounds(self) -> int:
        return sum(1 for name, _, _ in self.claims if name == PROBE.name)

    async def record(self, outcomes: Sequence[Outcome], now: float) -> dict[str, int]:
        if self.record_hold is not None:
            await self.record_hold.wait()
        return await super().record(outcomes, now)


@dataclass
class Run:
    dispatcher: Dispatcher
    task: asyncio.Task[None]
    sender: HttpxSender


class Harness:
    """One store, one respx router, a fake clock, and the dispatchers a test starts."""

    def __init__(self, store: SpyStore, router: respx.MockRouter) -> None:
        self.store = store
        self.router = router
        self.t0 = float(int(time.time())) + 0.75  # near real time: standardwebhooks' tolerance
        self.clock = FakeClock(self.t0)
        self.metrics = Metrics()
        self.release = asyncio.Event()  # lets every hanging handler go (teardown)
        self.runs: list[Run] = []

    @property
    def dispatcher(self) -> Dispatcher:
        return self.runs[-1].dispatcher

    @property
    def task(self) -> asyncio.Task[None]:
        return self.runs[-1].task

    def start(self, *endpoints: EndpointConfig, seal_key: bytes | None = None) -> Dispatcher:
        sender = HttpxSender()
        dispatcher = Dispatcher(
            self.store,
            [*endpoints, PROBE],
            sender,
            self.metrics,
            seal_key=seal_key,
            clock=self.clock,
            rand=lambda: 0.5,
            idle_poll=0.05,
        )
        self.runs.append(Run(dispatcher, asyncio.create_task(dispatcher.run()), sender))
        return dispatcher

    async def stop(self, grace: float = 1.0) -> None:
        run = self.runs[-1]
        await run.dispatcher.shutdown(grace)
        await asyncio.wait_for(run.task, 5)

    async def close(self) -> None:
        self.release.set()
        for run in self.runs:
            if not run.task.done():
                await run.dispatcher.shutdown(0.5)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(run.task, 5)
            await run.dispatcher.shutdown(0.5)  # a task started after a shutdown, if any
            await run.sender.close()

    async def append(self, events: Sequence[NewEvent], targets: Sequence[Target] = (CRM,)) -> None:
        await self.store.append(events, targets, self.clock())
        for run in self.runs:
            run.dispatcher.wake()

    def advance(self, seconds: float) -> None:
        self.move_to(self.clock.now + seconds)

    def move_to(self, now: float) -> None:
        self.clock.now = now
        for run in self.runs:
            run.dispatcher.wake()

    async def full_rounds(self, n: int = 1) -> None:
        """Wait until the dispatcher has run ``n`` whole claim rounds that began after now."""
        mark = self.store.probe_rounds()

        def done() -> bool:
            for run in self.runs:
                run.dispatcher.wake()  # no need to wait out idle_poll between rounds
            return self.store.probe_rounds() >= mark + n + 1

        await eventually(done)

    async def deliveries(self, endpoint: str | None = None) -> list[DeliveryInfo]:
        items = await self.store.list_deliveries(endpoint=endpoint, limit=10_000)
        return sorted(items, key=key)

    async def delivery(self, event: NewEvent, endpoint: str = "crm") -> DeliveryInfo:
        found = [d for d in await self.deliveries(endpoint) if d.event_id == event.event_id]
        assert len(found) == 1, found
        return found[0]

    async def detail(self, event: NewEvent, endpoint: str = "crm") -> DeliveryDetail:
        info = await self.delivery(event, endpoint)
        found = await self.store.get_delivery(key(info))
        assert found is not None
        return found

    async def wait_for(
        self, event: NewEvent, state: str, attempts: int, endpoint: str = "crm"
    ) -> DeliveryInfo:
        async def reached() -> DeliveryInfo | None:
            info = await self.delivery(event, endpoint)
            return info if (info.state, info.attempts) == (state, attempts) else None

        try:
            return await eventually(reached)  # type: ignore[no-any-return]
        except AssertionError:
            info = await self.delivery(event, endpoint)
            raise AssertionError(f"wanted {state}/{attempts} attempts, have {info}") from None

    async def hang(self, request: httpx.Request) -> httpx.Response:
        await self.release.wait()
        return httpx.Response(200)


_TLS = ssl.create_default_context()


@pytest.fixture(autouse=True)
def _one_tls_context(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every sender loads the CA bundle (~40 ms); respx answers before any TLS, so share one."""
    monkeypatch.setattr("relay.transport._ssl_context", lambda: _TLS)


@pytest.fixture
def router() -> Iterator[respx.MockRouter]:
    with respx.mock(assert_all_called=False) as mock:
        yield mock


@pytest_asyncio.fixture
async def store(tmp_path: Path) -> AsyncIterator[SpyStore]:
    spy = SpyStore(tmp_path / "relay.db")
    await spy.open(daemon=True)
    yield spy
    await spy.close()


@pytest_asyncio.fixture
async def h(store: SpyStore, router: respx.MockRouter) -> AsyncIterator[Harness]:
    harness = Harness(store, router)
    yield harness
    await harness.close()


def deliveries_total(metrics: Metrics, name: str, outcome: str) -> float:
    value = metrics.registry.get_sample_value(
        "relay_deliveries_total", {"endpoint": name, "outcome": outcome}
    )
    return value or 0.0


def duration_count(metrics: Metrics, name: str) -> float:
    value = metrics.registry.get_sample_value(
        "relay_delivery_duration_seconds_count", {"endpoint": name}
    )
    return value or 0.0


# -- the wire format ----------------------------------------------------------------------


@pytest.mark.parametrize("secrets", [(SECRET_1,), (SECRET_1, SECRET_2)], ids=["one", "two"])
async def test_headers_and_body_on_the_wire(h: Harness, secrets: tuple[str, ...]) -> None:
    route = h.router.post(CRM_URL).mock(return_value=httpx.Response(204))
    ep = endpoint(secrets=secrets, headers={"Authorization": "Bearer crm-key", "X-Tenant": "acme"})
    event = new_event("user-a", 1, token=True)  # no RELAY_TOKEN_KEY: the token is stripped
    await h.append([event])
    h.start(ep)
    await h.wait_for(event, "delivered", 1)

    assert route.call_count == 1
    request = route.calls.last.request
    expected = {
        "webhook-id": event.event_id,
        "webhook-timestamp": str(int(h.t0)),
        "relay-source": "feed",
        "content-type": "application/json",
        "user-agent": f"sfox-relay/{__version__}",
        "sfox-timestamp": str(T0_NS + 1),
        "authorization": "Bearer crm-key",
        "x-tenant": "acme",
    }
    own = {name: request.headers[name] for name in request.headers if name in expected}
    assert own == expected
    assert set(request.headers) - HTTPX_OWN_HEADERS == {*expected, "webhook-signature"}
    assert request.headers.get_list("webhook-signature") == [request.headers["webhook-signature"]]

    signatures = request.headers["webhook-signature"].split(" ")
    assert len(signatures) == len(secrets)
    assert all(sig.startswith("v1,") for sig in signatures)
    for secret in secrets:
        assert Webhook(secret).verify(request.content, dict(request.headers)) is not None
    with pytest.raises(WebhookVerificationError):
        Webhook(WRONG_SECRET).verify(request.content, dict(request.headers))

    body = request.content
    assert body == event.body  # the stored bytes, exactly
    assert b"user_token" not in body and TOKEN.encode() not in body
    assert b'"timestamp":%d,' % (T0_NS + 1) in body
    sent = loads(body)
    assert sent["timestamp"] == T0_NS + 1
    assert list(sent) == ["sequence", "recipient", "timestamp", "payload", "unknown_top_level"]
    assert sent["payload"]["future_field"] == {"nested": [1, 2.5, None]}
    assert body == compact_json(sent)  # compact


async def test_sealed_token_goes_out_stripped_to_a_strip_endpoint(h: Harness) -> None:
    route = h.router.post(CRM_URL).mock(return_value=httpx.Response(200))
    event = new_event("user-a", 1, token=True, seal_key=SEAL_KEY)
    assert event.has_token
    await h.append([event])
    h.start(endpoint(), seal_key=SEAL_KEY)
    await h.wait_for(event, "delivered", 1)

    body = route.calls.last.request.content
    assert b"user_token" not in body and TOKEN.encode() not in body and b"sealed" not in body
    expected = user_frame("user-a", 1)  # the same message without a token
    assert loads(body) == expected


# -- verdicts -------------------------------------------------------------------------------


async def test_2xx_is_delivered_with_one_attempt_recorded(h: Harness) -> None:
    route = h.router.post(CRM_URL).mock(return_value=httpx.Response(200, text="thanks"))
    event = new_event("user-a", 1)
    await h.append([event])
    h.start(endpoint())
    info = await h.wait_for(event, "delivered", 1)

    assert route.call_count == 1
    assert info.last_status == 200 and info.last_error is None and info.next_attempt_at is None
    detail = await h.detail(event)
    [attempt] = detail.attempts
    assert attempt.status == 200
    assert attempt.error is None
    assert 0.0 <= attempt.latency < 5.0
    assert attempt.at == pytest.approx(h.t0 - attempt.latency, abs=1e-3)
    assert attempt.excerpt == "thanks"


async def test_500_then_200_retries_exactly_when_the_schedule_says(h: Harness) -> None:
    sent_at: list[float] = []

    def respond(request: httpx.Request) -> httpx.Response:
        sent_at.append(h.clock())
        return httpx.Response(500 if len(sent_at) == 1 else 200)

    route = h.router.post(CRM_URL).mock(side_effect=respond)
    event = new_event("user-a", 1)
    await h.append([event])
    h.start(endpoint(schedule=(0, 5, 60)))

    info = await h.wait_for(event, "pending", 1)
    # rand() = 0.5 is the middle of the +-10% jitter: exactly schedule[1].
    assert info.next_attempt_at == pytest.approx(h.t0 + 5.0, abs=1e-6)
    assert info.last_status == 500

    h.advance(4.9)
    await h.full_rounds(2)
    assert route.call_count == 1, "retried before next_at"

    h.move_to(h.t0 + 5.0)
    await h.wait_for(event, "delivered", 2)
    assert route.call_count == 2
    assert sent_at[1] >= h.t0 + 5.0 - 1e-6
    detail = await h.detail(event)
    assert [a.status for a in detail.attempts] == [500, 200]
    assert detail.attempts[0].at < detail.attempts[1].at
    # identical webhook-id across retries; a fresh webhook-timestamp per attempt
    ids = [c.request.headers["webhook-id"] for c in route.calls]
    stamps = [c.request.headers["webhook-timestamp"] for c in route.calls]
    assert ids == [event.event_id] * 2
    assert stamps == [str(int(h.t0)), str(int(h.t0 + 5.0))]


@pytest.mark.parametrize(
    ("retry_after", "delay"),
    [("120", 120.0), ("7200", 3600.0), ("1", 5.0), ("not-a-date", 5.0)],
    ids=["stretches", "capped-at-1h", "never-shortens", "unreadable"],
)
async def test_429_retry_after(h: Harness, retry_after: str, delay: float) -> None:
    responses = [httpx.Response(429, headers={"Retry-After": retry_after}), httpx.Response(200)]
    route = h.router.post(CRM_URL).mock(side_effect=responses)
    event = new_event("user-a", 1)
    await h.append([event])
    h.start(endpoint(schedule=(0, 5, 60)))

    info = await h.wait_for(event, "pending", 1)
    assert info.next_attempt_at == pytest.approx(h.t0 + delay, abs=1e-6)
    assert info.last_status == 429

    h.advance(delay - 1)
    await h.full_rounds(2)
    assert route.call_count == 1
    h.advance(1)
    await h.wait_for(event, "delivered", 2)


async def test_429_retry_after_as_an_http_date(h: Harness) -> None:
    due = int(h.t0) + 300  # HTTP dates have whole seconds
    header = formatdate(due, usegmt=True)
    h.router.post(CRM_URL).mock(side_effect=[httpx.Response(429, headers={"Retry-After": header})])
    event = new_event("user-a", 1)
    await h.append([event])
    h.start(endpoint(schedule=(0, 5, 60)))

    info = await h.wait_for(event, "pending", 1)
    assert info.next_attempt_at == pytest.approx(due, abs=1e-6)


def _retryable_responses() -> list[Any]:
    return [
        pytest.param(httpx.Response(408), 408, None, id="408"),
        pytest.param(httpx.Response(425), 425, None, id="425"),
        pytest.param(httpx.Response(500), 500, None, id="500"),
        pytest.param(httpx.Response(503), 503, None, id="503"),
        pytest.param(httpx.ReadTimeout, None, "timeout", id="timeout"),
        pytest.param(httpx.ConnectTimeout, None, "timeout", id="connect-timeout"),
        pytest.param(httpx.ConnectError, None, "connection failed", id="connection-error"),
        pytest.param(httpx.RemoteProtocolError, None, "request failed", id="protocol-error"),
    ]


@pytest.mark.parametrize(("effect", "status", "error"), _retryable_responses())
async def test_transient_failures_are_retried(
    h: Harness, effect: Any, status: int | None, error: str | None
) -> None:
    route = h.router.post(CRM_URL).mock(side_effect=[effect, httpx.Response(200)])
    event = new_event("user-a", 1)
    await h.append([event])
    h.start(endpoint(schedule=(0, 5, 60)))

    info = await h.wait_for(event, "pending", 1)
    assert info.last_status == status
    assert info.next_attempt_at == pytest.approx(h.t0 + 5.0, abs=1e-6)
    if error is None:
        assert info.last_error is None
    else:
        assert info.last_error is not None and error in info.last_error
        assert CRM_URL not in info.last_error and "crm.test" not in info.last_error
    h.advance(5)
    await h.wait_for(event, "delivered", 2)
    assert route.call_count == 2
    assert [a.status for a in (await h.detail(event)).attempts] == [status, 200]


@pytest.mark.parametrize("status", [400, 401, 404, 410, 422])
async def test_permanent_failures_are_dead_after_one_attempt(h: Harness, status: int) -> None:
    route = h.router.post(CRM_URL).mock(return_value=httpx.Response(status, text="no such hook"))
    event = new_event("user-a", 1)
    later = new_event("user-a", 2)
    await h.append([event, later])
    h.start(endpoint(schedule=(0, 5, 60)))

    info = await h.wait_for(event, "dead", 1)
    assert info.last_status == status and info.next_attempt_at is None
    detail = await h.detail(event)
    assert [(a.status, a.excerpt) for a in detail.attempts] == [(status, "no such hook")]
    # dead releases the lane: the user's next event goes (and dies the same way)
    await h.wait_for(later, "dead", 1)
    h.advance(3600)
    await h.full_rounds(2)
    assert route.call_count == 2


async def test_redirect_is_not_followed_and_is_permanent(h: Harness) -> None:
    route = h.router.post(CRM_URL).mock(
        return_value=httpx.Response(301, headers={"Location": "http://moved.test/elsewhere"})
    )
    moved = h.router.route(host="moved.test").mock(return_value=httpx.Response(200))
    event = new_event("user-a", 1)
    await h.append([event])
    h.start(endpoint())

    info = await h.wait_for(event, "dead", 1)
    assert info.last_status == 301
    h.advance(3600)
    await h.full_rounds(2)
    assert route.call_count == 1
    assert moved.call_count == 0


async def test_response_excerpt_is_capped_at_1_kib(h: Harness) -> None:
    h.router.post(CRM_URL).mock(return_value=httpx.Response(503, text="x" * 5000))
    event = new_event("user-a", 1)
    await h.append([event])
    h.start(endpoint())
    await h.wait_for(event, "pending", 1)
    [attempt] = (await h.detail(event)).attempts
    assert attempt.excerpt == "x" * EXCERPT_BYTES


async def test_schedule_exhausted_is_dead_after_len_schedule_attempts(h: Harness) -> None:
    schedule = (0.0, 1.0, 2.0, 4.0)
    route = h.router.post(CRM_URL).mock(return_value=httpx.Response(503))
    event = new_event("user-a", 1)
    await h.append([event])
    h.start(endpoint(schedule=schedule))

    for attempt, delay in enumerate(schedule[1:], start=1):
        info = await h.wait_for(event, "pending", attempt)
        assert info.next_attempt_at == pytest.approx(h.clock() + delay, abs=1e-6)
        h.advance(delay)
    info = await h.wait_for(event, "dead", len(schedule))
    assert info.last_status == 503
    h.advance(36_000)
    await h.full_rounds(2)
    assert route.call_count == len(schedule)
    assert [a.status for a in (await h.detail(event)).attempts] == [503] * len(schedule)


# -- order and isolation --------------------------------------------------------------------


async def test_per_user_order_holds_while_other_users_flow(h: Harness) -> None:
    a1, a2, a3 = (new_event("user-a", n) for n in (1, 2, 3))
    b1 = new_event("user-b", 4)
    names = {a1.event_id: "A1", a2.event_id: "A2", a3.event_id: "A3", b1.event_id: "B1"}
    log: list[str] = []

    def respond(request: httpx.Request) -> httpx.Response:
        name = names[request.headers["webhook-id"]]
        failed = name == "A1" and "A1 500" not in log
        log.append(f"{name} {500 if failed else 200}")
        return httpx.Response(500 if failed else 200)

    h.router.post(CRM_URL).mock(side_effect=respond)
    await h.append([a1, a2, a3, b1])
    h.start(endpoint(schedule=(0, 5, 60)))

    await h.wait_for(b1, "delivered", 1)
    await h.wait_for(a1, "pending", 1)
    await h.full_rounds(2)
    assert sorted(log) == ["A1 500", "B1 200"], "A2 went out before A1 was delivered"

    h.advance(5)
    for event in (a1, a2, a3):
        await h.wait_for(event, "delivered", 2 if event is a1 else 1)
    a_log = [entry for entry in log if entry.startswith("A")]
    assert a_log == ["A1 500", "A1 200", "A2 200", "A3 200"]


@pytest.mark.parametrize("sickness", ["503", "timeout", "hang"])
async def test_a_sick_endpoint_does_not_delay_a_healthy_one(h: Harness, sickness: str) -> None:
    sick_requests = 0

    async def sick_effect(request: httpx.Request) -> httpx.Response:
        nonlocal sick_requests
        sick_requests += 1
        if sickness == "503":
            return httpx.Response(503)
        if sickness == "timeout":
            await asyncio.sleep(0.02)
            raise httpx.ReadTimeout("timed out", request=request)
        return await h.hang(request)

    h.router.post(SICK_URL).mock(side_effect=sick_effect)
    healthy = h.router.post(CRM_URL).mock(return_value=httpx.Response(200))
    events = [new_event(f"user-{n % 3}", n) for n in range(9)]
    await h.append(events, [SICK, CRM])
    h.start(
        endpoint("sick", SICK_URL, max_in_flight=2, timeout=0.5),
        endpoint("crm", CRM_URL),
    )

    async def healthy_done() -> bool:
        return all(d.state == "delivered" for d in await h.deliveries("crm"))

    await eventually(healthy_done, timeout=2.0)
    assert healthy.call_count == len(events)
    assert sick_requests >= 2  # the sick one was tried meanwhile
    assert {d.state for d in await h.deliveries("sick")} == {"pending"}
    ids = [c.request.headers["webhook-id"] for c in healthy.calls]
    for user in ("user-0", "user-1", "user-2"):
        lane = [e.event_id for e in events if e.user_id == user]
        assert [i for i in ids if i in lane] == lane


async def test_max_in_flight_caps_concurrent_requests(h: Harness) -> None:
    current = 0
    peak = 0
    started: list[str] = []
    gates: dict[str, asyncio.Event] = {}

    async def respond(request: httpx.Request) -> httpx.Response:
        nonlocal current, peak
        eid = request.headers["webhook-id"]
        current += 1
        peak = max(peak, current)
        started.append(eid)
        gates[eid] = asyncio.Event()
        try:
            await gates[eid].wait()
        finally:
            current -= 1
        return httpx.Response(200)

    h.router.post(CRM_URL).mock(side_effect=respond)
    events = [new_event(f"user-{n}", n) for n in range(6)]  # six lanes, all due at once
    await h.append(events)
    h.start(endpoint(max_in_flight=2))

    await eventually(lambda: len(started) == 2)
    await h.full_rounds(2)  # it had every chance to start a third
    assert (len(started), peak) == (2, 2)
    while len(started) < len(events):
        count = len(started)
        gates[started[count - 2]].set()  # one finishes: exactly one more may start

        def one_more(n: int = count + 1) -> bool:
            return len(started) == n

        await eventually(one_more)
        await h.full_rounds(1)
        assert len(started) == count + 1 and peak == 2
    for gate in gates.values():
        gate.set()

    async def all_done() -> bool:
        return all(d.state == "delivered" for d in await h.deliveries("crm"))

    await eventually(all_done)
    assert peak == 2
    assert sorted(started) == sorted(e.event_id for e in events)


@contextlib.asynccontextmanager
async def idle_dispatcher(store: SpyStore, crm: EndpointConfig) -> AsyncIterator[Dispatcher]:
    """A running dispatcher of one endpoint that never polls (idle_poll 60 s), so every store
    call it makes is one the test caused; its first claim round has not run on entry."""
    sender = HttpxSender()
    dispatcher = Dispatcher(store, [crm], sender, Metrics(), idle_poll=60)
    task = asyncio.create_task(dispatcher.run())
    try:
        yield dispatcher
    finally:
        await dispatcher.shutdown(0.5)
        await asyncio.wait_for(task, 5)
        await sender.close()


async def only_delivered(store: SpyStore) -> bool:
    return [d.state for d in await store.list_deliveries()] == ["delivered"]


async def test_a_delivery_costs_two_claims_and_an_idle_dispatcher_asks_nothing_more(
    store: SpyStore, router: respx.MockRouter
) -> None:
    """The claim that takes it, and the one after its verdict's commit (which may release the
    lane's next delivery); a finished request of an endpoint with room claims nothing more,
    and the claim itself says when more comes due: no store call while idle."""
    router.post(CRM_URL).mock(return_value=httpx.Response(200))
    await store.append([new_event("user-a", 1)], [CRM], time.time())
    async with idle_dispatcher(store, endpoint(max_in_flight=4)):
        await eventually(lambda: only_delivered(store))
        await eventually(lambda: len(store.claims) == 2)
        await asyncio.sleep(0.05)  # room for a third, were one coming
        assert [n for _, _, n in store.claims] == [1, 0]


async def test_what_the_commit_took_goes_out_without_a_claim_of_its_own(
    store: SpyStore, router: respx.MockRouter
) -> None:
    """An endpoint that has caught up is offered to ingest; the commit that stores a fresh
    event marks its delivery in flight, and the dispatcher sends and records it."""
    route = router.post(CRM_URL).mock(return_value=httpx.Response(200))
    async with idle_dispatcher(store, endpoint(max_in_flight=4)) as dispatcher:
        assert dispatcher.offer() == {}  # no claim round yet: older work may be due
        await eventually(lambda: len(store.claims) == 1)  # found nothing: caught up
        offer = dispatcher.offer()
        assert offer == {"crm": 4}
        assert dispatcher.offer() == {}  # reserved until adopted
        result = await store.append([new_event("user-a", 1)], [CRM], time.time(), take=offer)
        dispatcher.adopt(offer, result.taken)
        assert dispatcher.offer() == {"crm": 3}  # one in flight
        dispatcher.adopt({"crm": 3}, [])

        await eventually(lambda: only_delivered(store))
        assert route.call_count == 1
        await eventually(lambda: len(store.claims) == 2)  # the one after the verdict
        assert [n for _, _, n in store.claims] == [0, 0]


async def test_no_room_is_offered_for_an_endpoint_whose_claim_is_under_way(
    store: SpyStore, router: respx.MockRouter
) -> None:
    """The claim and the commit would otherwise fill the same room: max_in_flight twice."""
    router.post(CRM_URL).mock(return_value=httpx.Response(200))
    async with idle_dispatcher(store, endpoint(max_in_flight=2)) as dispatcher:
        await eventually(lambda: len(store.claims) == 1)
        assert dispatcher.offer() == {"crm": 2}
        dispatcher.adopt({"crm": 2}, [])
        store.hold = asyncio.Event()
        dispatcher.wake()
        await store.held.wait()
        assert dispatcher.offer() == {}
        store.hold.set()
        await eventually(lambda: len(store.claims) == 2)
        assert dispatcher.offer() == {"crm": 2}
        dispatcher.adopt({"crm": 2}, [])


async def test_what_the_commit_took_after_shutdown_began_is_released_unsent(
    store: SpyStore, router: respx.MockRouter
) -> None:
    route = router.post(CRM_URL).mock(return_value=httpx.Response(200))
    async with idle_dispatcher(store, endpoint()) as dispatcher:
        await eventually(lambda: len(store.claims) == 1)
        offer = dispatcher.offer()
        result = await store.append([new_event("user-a", 1)], [CRM], time.time(), take=offer)
        await dispatcher.shutdown(0.5)
        dispatcher.adopt(offer, result.taken)
    # Leaving waited for the recorder, which commits the release before it returns.
    [info] = await store.list_deliveries()
    assert (info.state, info.attempts, route.call_count) == ("pending", 0, 0)


async def test_claims_whose_verdict_is_not_committed_are_capped_at_twice_max_in_flight(
    h: Harness,
) -> None:
    """A recorder that lags holds claims: at most 2 x max_in_flight wait for their verdict,
    so a crash re-sends a bounded number of deliveries (tests/test_replicas.py)."""
    started: list[str] = []

    async def respond(request: httpx.Request) -> httpx.Response:
        started.append(request.headers["webhook-id"])
        return httpx.Response(200)

    h.router.post(CRM_URL).mock(side_effect=respond)
    h.store.record_hold = asyncio.Event()
    events = [new_event(f"user-{n}", n) for n in range(8)]  # eight lanes, all due at once
    await h.append(events)
    h.start(endpoint(max_in_flight=2))
    await eventually(lambda: len(started) == 4)
    await h.full_rounds(2)  # it had every chance to claim a fifth
    assert len(started) == 4
    h.store.record_hold.set()

    async def all_done() -> bool:
        return all(d.state == "delivered" for d in await h.deliveries("crm"))

    await eventually(all_done)
    assert sorted(started) == sorted(e.event_id for e in events)


# -- shutdown -------------------------------------------------------------------------------


async def test_shutdown_releases_a_request_hanging_past_the_grace(h: Harness) -> None:
    started = asyncio.Event()

    async def respond(request: httpx.Request) -> httpx.Response:
        started.set()
        return await h.hang(request)

    h.router.post(CRM_URL).mock(side_effect=respond)
    event = new_event("user-a", 1)
    await h.append([event])
    dispatcher = h.start(endpoint())
    await asyncio.wait_for(started.wait(), 5)
    assert dispatcher.in_flight == 1

    loop = asyncio.get_running_loop()
    began = loop.time()
    await dispatcher.shutdown(0.2)
    await asyncio.wait_for(h.task, 2)
    assert loop.time() - began < 2.0
    assert dispatcher.in_flight == 0

    info = await h.delivery(event)
    assert (info.state, info.attempts, info.last_status, info.last_error) == (
        "pending",
        0,
        None,
        None,
    )
    assert (await h.detail(event)).attempts == []
    assert deliveries_total(h.metrics, "crm", "retry") == 0
    assert duration_count(h.metrics, "crm") == 0

    # a restarted dispatcher sends it at once, as attempt 1 of a full schedule
    h.router.post(CRM_URL).mock(return_value=httpx.Response(200))
    h.start(endpoint())
    await h.wait_for(event, "delivered", 1)


async def test_shutdown_lets_a_request_finish_within_the_grace(h: Harness) -> None:
    started = asyncio.Event()
    finish = asyncio.Event()

    async def respond(request: httpx.Request) -> httpx.Response:
        started.set()
        await finish.wait()
        return httpx.Response(200)

    h.router.post(CRM_URL).mock(side_effect=respond)
    event = new_event("user-a", 1)
    await h.append([event])
    dispatcher = h.start(endpoint())
    await asyncio.wait_for(started.wait(), 5)

    stopping = asyncio.create_task(dispatcher.shutdown(5.0))
    for _ in range(20):
        await asyncio.sleep(0)
    assert not stopping.done()
    finish.set()
    await asyncio.wait_for(stopping, 2)
    await asyncio.wait_for(h.task, 2)
    await h.wait_for(event, "delivered", 1)


async def test_shutdown_during_a_claim_still_honours_the_grace(h: Harness) -> None:
    """A delivery claimed while shutdown() runs is bounded by the grace too (or not sent)."""
    h.router.post(CRM_URL).mock(side_effect=h.hang)
    event = new_event("user-a", 1)
    await h.append([event])
    h.store.hold = asyncio.Event()
    dispatcher = h.start(endpoint())
    await asyncio.wait_for(h.store.held.wait(), 5)  # the claim of crm is under way

    stopping = asyncio.create_task(dispatcher.shutdown(0.2))
    await asyncio.sleep(0)
    h.store.hold.set()  # ... and returns the delivery after shutdown() began
    await asyncio.wait_for(stopping, 2)
    done, _ = await asyncio.wait({h.task}, timeout=0.8)
    assert h.task in done, "run() outlived shutdown(grace=0.2) by 0.8 s: a claimed request hangs on"
    info = await h.delivery(event)
    assert (info.state, info.attempts) == ("pending", 0)


# -- metrics --------------------------------------------------------------------------------


async def test_metrics_count_each_outcome_and_each_attempt(h: Harness) -> None:
    retried, gone = new_event("user-a", 1), new_event("user-b", 2)
    calls: dict[str, int] = defaultdict(int)

    def respond(request: httpx.Request) -> httpx.Response:
        eid = request.headers["webhook-id"]
        calls[eid] += 1
        if eid == gone.event_id:
            return httpx.Response(404)
        return httpx.Response(500 if calls[eid] == 1 else 200)

    h.router.post(CRM_URL).mock(side_effect=respond)
    for outcome in ("success", "retry", "dead"):
        assert deliveries_total(h.metrics, "crm", outcome) == 0
    await h.append([retried, gone])
    h.start(endpoint())

    await h.wait_for(retried, "pending", 1)
    await h.wait_for(gone, "dead", 1)
    assert deliveries_total(h.metrics, "crm", "retry") == 1
    assert deliveries_total(h.metrics, "crm", "dead") == 1
    assert deliveries_total(h.metrics, "crm", "success") == 0
    assert duration_count(h.metrics, "crm") == 2

    h.advance(5)
    await h.wait_for(retried, "delivered", 2)
    assert deliveries_total(h.metrics, "crm", "success") == 1
    assert deliveries_total(h.metrics, "crm", "retry") == 1
    assert duration_count(h.metrics, "crm") == 3
    total = h.metrics.registry.get_sample_value(
        "relay_delivery_duration_seconds_sum", {"endpoint": "crm"}
    )
    assert total is not None and total >= 0
    assert deliveries_total(h.metrics, "probe", "success") == 0
    assert CRM_URL.encode() not in h.metrics.render()


async def test_metrics_count_deliveries_a_newer_delivered_event_superseded(h: Harness) -> None:
    """An older event stored while a newer one of its lane is in flight (another replica, a
    reconnect) waits; the newer one is delivered, so the older is superseded and counted."""
    newer, older = new_event("user-a", 2), new_event("user-a", 1)
    started = asyncio.Event()

    async def respond(request: httpx.Request) -> httpx.Response:
        started.set()
        return await h.hang(request)

    h.router.post(CRM_URL).mock(side_effect=respond)
    await h.append([newer])
    h.start(endpoint())
    await asyncio.wait_for(started.wait(), 5)
    await h.append([older])
    h.release.set()

    await h.wait_for(newer, "delivered", 1)
    await h.wait_for(older, "superseded", 0)
    assert deliveries_total(h.metrics, "crm", "superseded") == 1
    assert deliveries_total(h.metrics, "crm", "success") == 1


# -- the ordering property --------------------------------------------------------------------


@settings(
    max_examples=10,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    users=st.lists(st.sampled_from("ABC"), min_size=1, max_size=9),
    cuts=st.sets(st.integers(1, 8), max_size=3),
    failures=st.lists(st.booleans(), min_size=1, max_size=12),
    latencies=st.lists(st.integers(0, 4), min_size=1, max_size=12),
    max_in_flight=st.sampled_from([1, 2, 16]),
)
async def test_property_each_user_is_delivered_in_store_order(
    users: list[str],
    cuts: set[int],
    failures: list[bool],
    latencies: list[int],
    max_in_flight: int,
) -> None:
    events = [new_event(f"user-{u}", n) for n, u in enumerate(users)]
    lane_of = {e.event_id: e.user_id for e in events}
    lanes: dict[str | None, list[str]] = defaultdict(list)
    for e in events:
        lanes[e.user_id].append(e.event_id)
    succeeded: set[str] = set()
    first_successes: list[str] = []
    failed: dict[str, int] = defaultdict(int)
    violations: list[str] = []
    counter = itertools.count()

    async def respond(request: httpx.Request) -> httpx.Response:
        i = next(counter)
        eid = request.headers["webhook-id"]
        lane = lanes[lane_of[eid]]
        if eid in succeeded:
            violations.append(f"request {i}: {eid} sent again after it succeeded")
        earlier = lane[: lane.index(eid)]
        if not succeeded.issuperset(earlier):
            violations.append(f"request {i}: {eid} sent before an earlier event succeeded")
        await asyncio.sleep(latencies[i % len(latencies)] / 1000)
        if failures[i % len(failures)] and failed[eid] < 2:
            failed[eid] += 1
            return httpx.Response(500)
        if eid not in succeeded:
            succeeded.add(eid)
            first_successes.append(eid)
        return httpx.Response(200)

    with tempfile.TemporaryDirectory() as tmp, respx.mock(assert_all_called=False) as router:
        router.post(CRM_URL).mock(side_effect=respond)
        store = SpyStore(Path(tmp) / "relay.db")
        await store.open(daemon=True)
        h = Harness(store, router)
        try:
            h.start(endpoint(schedule=(0, 0, 0, 0), max_in_flight=max_in_flight))
            bounds = [0, *sorted(c for c in cuts if c < len(events)), len(events)]
            for lo, hi in itertools.pairwise(bounds):
                await h.append(events[lo:hi])
                await asyncio.sleep(0.003 * (hi % 3))  # let some of it go out first

            async def all_delivered() -> bool:
                states = [d.state for d in await h.deliveries("crm")]
                return len(states) == len(events) and set(states) == {"delivered"}

            await eventually(all_delivered)
            await h.stop()
            infos = {d.event_id: d for d in await h.deliveries("crm")}
        finally:
            await h.close()
            await store.close()

    assert violations == []
    for user, lane in lanes.items():
        assert [e for e in first_successes if lane_of[e] == user] == lane
    assert {eid: info.attempts for eid, info in infos.items()} == {
        e.event_id: failed[e.event_id] + 1 for e in events
    }


# -- token policies, through build_request ---------------------------------------------------


def _claim(event: NewEvent, endpoint_name: str = "vault") -> Claim:
    return Claim(
        delivery_id=1,
        endpoint=endpoint_name,
        event_id=event.event_id,
        user_id=event.user_id,
        attempts=0,
        source=event.source,
        body=event.body,
        has_token=event.has_token,
        created_at=BEFORE_EXPIRY,
    )


def _signed_by(secrets: Sequence[str], headers: dict[str, str], body: bytes) -> None:
    """Every secret's signature, computed by the official package, and nothing else."""
    stamp = datetime.fromtimestamp(int(headers["webhook-timestamp"]), tz=UTC)
    expected = [Webhook(s).sign(headers["webhook-id"], stamp, body.decode()) for s in secrets]
    assert headers["webhook-signature"].split(" ") == expected


async def test_forward_restores_the_exact_token() -> None:
    ep = endpoint("vault", "http://vault.test/", user_token="forward")
    event = new_event("user-a", 7, token=True, seal_key=SEAL_KEY)
    assert TOKEN.encode() not in event.body  # sealed at rest

    request = build_request(ep, _claim(event), seal_key=SEAL_KEY, now=BEFORE_EXPIRY)

    original = user_frame("user-a", 7, token=True)
    assert request.body == compact_json(original)  # token back, in place, byte for byte
    assert loads(request.body)["payload"]["user_token"] == original["payload"]["user_token"]
    assert request.headers["webhook-timestamp"] == str(int(BEFORE_EXPIRY))


async def test_encrypt_sends_a_token_only_the_receiver_can_open() -> None:
    ep = endpoint("vault", "http://vault.test/", user_token="encrypt", token_key=RECEIVER_KEY)
    event = new_event("user-a", 7, token=True, seal_key=SEAL_KEY)

    request = build_request(ep, _claim(event), seal_key=SEAL_KEY, now=BEFORE_EXPIRY)

    assert TOKEN.encode() not in request.body
    sent = loads(request.body)
    sealed = sent["payload"].pop("user_token")
    assert sealed["alg"] == "A256GCM"
    assert sealed["expires"] == TOKEN_EXPIRES
    assert sealed["partner_user_id"] == "partner-user-a"
    nonce = base64.b64decode(sealed["nonce"])
    ciphertext = base64.b64decode(sealed["ciphertext"])
    webhook_id = request.headers["webhook-id"]
    assert webhook_id == event.event_id
    plain = AESGCM(RECEIVER_KEY).decrypt(nonce, ciphertext, webhook_id.encode())
    assert plain.decode() == TOKEN
    with pytest.raises(InvalidTag):  # bound to this webhook-id
        AESGCM(RECEIVER_KEY).decrypt(nonce, ciphertext, b"evt_another")
    with pytest.raises(InvalidTag):  # and to the receiver's key, not the relay's
        AESGCM(SEAL_KEY).decrypt(nonce, ciphertext, webhook_id.encode())
    expected = user_frame("user-a", 7)
    assert sent == expected  # everything else unchanged
    assert list(sent["payload"]) == list(expected["payload"])


@pytest.mark.parametrize("policy", ["forward", "encrypt"])
async def test_an_expired_token_is_never_sent(policy: str) -> None:
    ep = endpoint("vault", "http://vault.test/", user_token=policy, token_key=RECEIVER_KEY)
    event = new_event("user-a", 7, token=True, seal_key=SEAL_KEY)

    request = build_request(ep, _claim(event), seal_key=SEAL_KEY, now=AFTER_EXPIRY)

    assert b"user_token" not in request.body and TOKEN.encode() not in request.body
    assert loads(request.body) == user_frame("user-a", 7)


@pytest.mark.parametrize("policy", ["strip", "forward", "encrypt"])
async def test_signature_covers_the_bytes_sent(policy: str) -> None:
    ep = endpoint(
        "vault",
        "http://vault.test/",
        secrets=(SECRET_1, SECRET_2),
        user_token=policy,
        token_key=RECEIVER_KEY,
    )
    event = new_event("user-a", 7, token=True, seal_key=SEAL_KEY)
    request = build_request(ep, _claim(event), seal_key=SEAL_KEY, now=BEFORE_EXPIRY)
    _signed_by((SECRET_1, SECRET_2), request.headers, request.body)
    tampered = request.body.replace(b"Brando", b"Brandon")
    with pytest.raises(AssertionError):
        _signed_by((SECRET_1, SECRET_2), request.headers, tampered)


async def test_senders_close_each_distinct_sender_once() -> None:
    from relay.config import EndpointConfig
    from relay.transport import Senders

    class Counting:
        closed = 0

        async def post(self, url: str, body: bytes, headers: Any, timeout: float) -> Any:
            raise AssertionError("not used")

        async def close(self) -> None:
            self.closed += 1

    shared, own = Counting(), Counting()
    endpoints = [
        EndpointConfig(url=f"https://{host}.example/hook", name=host) for host in ("a", "b")
    ]
    senders = Senders.only(shared, endpoints)
    assert senders["a"] is shared and senders["b"] is shared
    await Senders({"a": shared, "b": shared, "c": own}).close()
    assert (shared.closed, own.closed) == (1, 1)


# -- issue 20: sfox-timestamp and the INFO log of every outcome -----------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"sequence":1,"recipient":"r","timestamp":1717005327981000001,"payload":{}}',
         "1717005327981000001"),
        (b'{"sequence":null,"recipient":"r","timestamp":9999999999999999999,"payload":{}}',
         "9999999999999999999"),
        (b'{"payload":{"timestamp":1},"timestamp":1717005327981000002}', "1717005327981000002"),
        (b'{"sequence":1,"recipient":"a\\"b","timestamp":7}', "7"),
        (b'{"payload":{}}', None),
        (b'{"timestamp":"soon"}', None),
        (b"[1]", None),
    ],
)  # fmt: skip
def test_sfox_timestamp_is_the_message_timestamp_exactly(body: bytes, expected: str | None) -> None:
    assert sfox_timestamp(body) == expected


async def test_every_outcome_is_logged_at_info_with_both_ids(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    tries: dict[str, int] = {}

    def answer(request: httpx.Request) -> httpx.Response:
        user = json.loads(request.content)["payload"]["user_id"]
        tries[user] = tries.get(user, 0) + 1
        if user == "user-b":
            return httpx.Response(410)
        return httpx.Response(503 if tries[user] == 1 else 200)

    h.router.post(CRM_URL).mock(side_effect=answer)
    first, second = new_event("user-a", 1), new_event("user-b", 2)
    await h.append([first, second])
    caplog.set_level(logging.INFO, logger="relay.dispatch")
    h.start(endpoint(schedule=(0.0, 0.0)))
    await h.wait_for(first, "delivered", 2)
    await h.wait_for(second, "dead", 1)

    records = [r for r in caplog.records if r.name == "relay.dispatch"]
    assert sorted(r.event for r in records) == sorted(
        ["delivery.retry", "delivery.succeeded", "delivery.dead"]
    )
    assert {r.event_id for r in records} == {first.event_id, second.event_id}
    for record in records:
        assert record.levelno >= logging.INFO
        assert record.delivery_id.startswith("dlv_")
        assert record.endpoint == "crm"
        assert record.latency_ms >= 0


# -- running out of descriptors; nothing fails unseen ----------------------------------------


async def test_a_delivery_that_could_not_open_a_socket_uses_no_attempt(
    h: Harness, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sender says nothing reached the network (EMFILE; tests/test_limits.py shows the
    senders say so for a real EMFILE): the delivery is released, no attempt used."""
    route = h.router.post(CRM_URL).mock(return_value=httpx.Response(200))
    unsent: list[int] = []
    post = HttpxSender.post

    async def short_of_descriptors(self: HttpxSender, *args: Any) -> SendResult:
        if len(unsent) < 2:
            unsent.append(1)
            return SendResult(None, 0.0, error="not sent: out of file descriptors", attempted=False)
        return await post(self, *args)

    monkeypatch.setattr(HttpxSender, "post", short_of_descriptors)
    event = new_event("user-a", 1)
    await h.append([event])
    h.start(endpoint(schedule=(0, 5, 60)))

    async def released() -> DeliveryInfo | None:
        info = await h.delivery(event)
        due_again = info.next_attempt_at == pytest.approx(h.t0 + 1.0, abs=1e-6)
        return info if due_again else None

    info = await eventually(released)
    assert (info.state, info.attempts, info.last_error) == ("pending", 0, None)
    assert (await h.detail(event)).attempts == []
    h.advance(1)
    await eventually(lambda: len(unsent) == 2)
    h.advance(1)
    await h.wait_for(event, "delivered", 1)
    assert route.call_count == 1
    logged = [r for r in caplog.records if getattr(r, "event", None) == "dispatch.unsent"]
    assert len(logged) == 1  # the second one within 10 s is counted, not logged


async def test_a_delivery_task_that_fails_after_its_verdict_is_logged(
    h: Harness, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    h.router.post(CRM_URL).mock(return_value=httpx.Response(200))
    event = new_event("user-a", 1)
    await h.append([event])
    dispatcher = h.start(endpoint())

    def broken(endpoint: str) -> Any:
        raise RuntimeError("injected: metrics broke")

    monkeypatch.setattr(dispatcher, "_series", broken)
    await h.wait_for(event, "delivered", 1)  # the verdict was queued before the failure
    failed = await eventually(
        lambda: [r for r in caplog.records if getattr(r, "event", None) == "dispatch.task_failed"]
    )
    assert failed[0].exc_info is not None and "injected: metrics broke" in caplog.text


async def test_a_verdict_that_cannot_be_built_still_frees_the_lane(h: Harness) -> None:
    h.router.post(CRM_URL).mock(return_value=httpx.Response(500, text="echo"))
    event = new_event("user-a", 1)
    await h.append([event])
    dispatcher = h.start(endpoint())

    def broken(text: str) -> str:
        raise RuntimeError("injected: redaction broke")

    dispatcher._redact = broken
    info = await h.wait_for(event, "pending", 1)
    assert info.next_attempt_at == pytest.approx(h.t0 + 60.0, abs=1e-6)


class CutOffStore:
    """Refuses a group of verdicts as a data error (so the recorder bisects it), commits a
    lone verdict, and is cancelled while committing ``cut_at``: a shutdown mid-bisection."""

    def __init__(self, cut_at: int) -> None:
        self.cut_at = cut_at
        self.committed: list[int] = []

    async def record(self, outcomes: Sequence[Outcome], now: float) -> dict[str, int]:
        if len(outcomes) > 1:
            raise ValueError("refused as a group")
        if outcomes[0].delivery_id == self.cut_at:
            raise asyncio.CancelledError
        self.committed.append(outcomes[0].delivery_id)
        return {}


async def test_a_recorder_cut_off_mid_bisection_keeps_only_what_it_did_not_commit() -> None:
    store = CutOffStore(cut_at=3)
    ep = EndpointConfig(name="a", url="http://a.test/hook")
    dispatcher = Dispatcher(store, [ep], HttpxSender(), Metrics())  # type: ignore[arg-type]
    attempt = Attempt(at=1.0, status=200, latency=0.01, error=None, excerpt=None)
    for delivery_id in (1, 2, 3, 4):
        dispatcher._push(Outcome(delivery_id, "delivered", 0.0, attempt))
    with pytest.raises(asyncio.CancelledError):
        await dispatcher._flush()
    assert store.committed == [1, 2]
    assert dispatcher.unrecorded == 2  # 3 and 4, not 1 and 2 a second time
    store.cut_at = 0
    await dispatcher._flush()  # the restarted recorder
    assert store.committed == [1, 2, 3, 4]
