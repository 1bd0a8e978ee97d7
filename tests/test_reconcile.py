"""Reconciliation: the REST users list closes the gaps sFOX's feed never replays."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from conftest import EnvBuilder, eventually, run_relay

from bench.certs import make_certs
from relay.codec import canonical_json
from relay.errors import StoreError
from relay.events import USERS_FEED, reconcile_event_id
from relay.metrics import Metrics
from relay.receiver import Receiver
from relay.reconcile import Reconciler, diff
from relay.simulator import Faults, Simulator
from relay.store.base import Target, UserState
from relay.store.sqlite import SQLiteStore


def user(uid: str, status: str, sms: bool = False) -> dict[str, Any]:
    return {
        "account_type": "individual",
        "account_role": "Client",
        "user_id": uid,
        "advisor_user_id": None,
        "email": f"{uid}@example.com",
        "first_name": "A",
        "last_name": "B",
        "phone_number": "+1",
        "status": status,
        "requirements": {"sms": sms, "email": sms},
    }


def state(uid: str, status: str, sms: bool, event_id: str | None = "evt_x") -> UserState:
    req = canonical_json({"sms": sms, "email": sms}).decode()
    return UserState(uid, status, req, event_id, "feed")


# -- the pure diff ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stored", "rest", "changed"),
    [
        (None, ("VERIFIED", False), True),  # unknown user
        (("PENDING", True), ("VERIFIED", False), True),  # status changed
        (("PENDING", True), ("PENDING", False), True),  # requirements changed
        (("VERIFIED", False), ("VERIFIED", False), False),  # same
    ],
)
def test_diff_table(stored: tuple[str, bool] | None, rest: tuple[str, bool], changed: bool) -> None:
    states = {"u1": state("u1", *stored)} if stored else {}
    changes = diff([user("u1", *rest)], states, now_ns=1)
    assert bool(changes) is changed
    if changed:
        event = changes[0].event
        body = json.loads(event.body)
        assert body["sequence"] is None
        assert body["recipient"] == USERS_FEED
        assert body["timestamp"] == 1
        assert body["payload"] == user("u1", *rest)
        assert "user_token" not in body["payload"]
        assert event.source == "reconcile"
        assert event.event_id == reconcile_event_id(
            "u1", rest[0], {"sms": rest[1], "email": rest[1]}, "evt_x" if stored else None
        )


def test_diff_emit_all_includes_unchanged_users() -> None:
    states = {"u1": state("u1", "VERIFIED", False)}
    assert len(diff([user("u1", "VERIFIED")], states, now_ns=1, emit_all=True)) == 1


# -- REST behaviour -----------------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.sleeps: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.sleeps.append(seconds)


@pytest.fixture
async def store(tmp_path: Any) -> Any:
    s = SQLiteStore(tmp_path / "relay.db")
    await s.open(daemon=True)
    yield s
    await s.close()


Handler = Callable[[httpx.Request], httpx.Response]
Serve = Callable[..., Awaitable[str]]


@pytest.fixture
async def rest() -> AsyncIterator[Serve]:
    """``await rest(handler)``: a real HTTP server on port 0 and its URL. The handler sees
    each request as an ``httpx.Request`` and answers an ``httpx.Response`` (httpx only as
    the tests' data model), streamed as it reads when it carries a byte stream."""
    runners: list[web.AppRunner] = []

    async def serve(handler: Handler, tls: ssl.SSLContext | None = None) -> str:
        async def answer(request: web.Request) -> web.StreamResponse:
            seen = httpx.Request(request.method, str(request.url), headers=dict(request.headers))
            response = handler(seen)
            headers = {
                k: v
                for k, v in response.headers.items()
                if k.lower() not in ("content-length", "transfer-encoding")
            }
            out = web.StreamResponse(status=response.status_code, headers=headers)
            await out.prepare(request)
            with contextlib.suppress(ConnectionError):
                try:
                    await out.write(response.content)
                except httpx.ResponseNotRead:  # a stream: as much as the client reads
                    async for chunk in response.aiter_raw():
                        await out.write(chunk)
                await out.write_eof()
            return out

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", answer)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls)
        await site.start()
        runners.append(runner)
        port = runner.addresses[0][1]
        return f"{'https' if tls else 'http'}://127.0.0.1:{port}"

    yield serve
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
def refused_url() -> Iterator[str]:
    """A port that refuses connections: bound (so nothing else takes it), not listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


Make = Callable[[SQLiteStore, str, Recorder, Metrics], Reconciler]


@pytest.fixture
def reconciler(closing: Callable[[Any], Any]) -> Make:
    """``reconciler(store, url, sleep, metrics)``: a Reconciler of ``url``, closed after."""

    def make(store: SQLiteStore, url: str, sleep: Recorder, metrics: Metrics) -> Reconciler:
        async def append(events: Any) -> int:
            result = await store.append(events, [Target("ep")], 1.0)
            return len(result.stored)

        rec = Reconciler(
            store,
            append,
            metrics,
            api_url=url,
            api_key="the-api-key-123456",
            interval=None,
            sleep=sleep,
        )
        closing(rec)
        return rec

    return make


async def test_rate_limited_rest_waits_at_least_60s_then_succeeds(
    store: SQLiteStore, reconciler: Make, rest: Serve
) -> None:
    answers = iter([httpx.Response(429, headers={"retry-after": "5"}), None])
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        answer = next(answers)
        return answer or httpx.Response(200, json={"data": [user("u1", "PENDING", True)]})

    sleep, metrics = Recorder(), Metrics()
    report = await reconciler(store, await rest(handler), sleep, metrics).run_once()
    assert report.outcome == "baseline"
    assert sleep.sleeps == [60.0]  # sFOX: after a 429, wait 60 s
    assert seen[0].headers["authorization"] == "Bearer the-api-key-123456"
    assert seen[0].url.path == "/v1/enterprise/users"
    assert (
        metrics.registry.get_sample_value("relay_reconcile_runs_total", {"outcome": "baseline"})
        == 1.0
    )


async def test_rest_down_is_an_error_outcome_never_an_exception(
    store: SQLiteStore, reconciler: Make, refused_url: str
) -> None:
    sleep, metrics = Recorder(), Metrics()
    report = await reconciler(store, refused_url, sleep, metrics).run_once()
    assert report.outcome == "error"
    assert report.error == "REST users list unavailable: connection failed: Connection refused"
    assert "the-api-key" not in (report.error or "")
    assert len(sleep.sleeps) == 2  # three attempts
    assert (
        metrics.registry.get_sample_value("relay_reconcile_runs_total", {"outcome": "error"}) == 1.0
    )
    assert (
        metrics.registry.get_sample_value("relay_reconcile_last_success_timestamp_seconds") == 0.0
    )


async def test_rest_goes_through_the_environments_proxy(
    store: SQLiteStore, reconciler: Make, rest: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[httpx.Request] = []

    def proxy(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"data": [user("u1", "PENDING")]})

    monkeypatch.setenv("HTTP_PROXY", await rest(proxy))
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    report = await reconciler(store, "http://sfox.invalid", Recorder(), Metrics()).run_once()
    assert report.outcome == "baseline"
    assert [str(r.url) for r in seen] == ["http://sfox.invalid/v1/enterprise/users"]
    assert seen[0].headers["authorization"] == "Bearer the-api-key-123456"


async def test_rest_over_tls_is_verified_against_ssl_cert_file(
    store: SQLiteStore,
    reconciler: Make,
    rest: Serve,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pki = make_certs(tmp_path / "pki")
    answer = httpx.Response(200, json={"data": [user("u1", "PENDING")]})
    url = await rest(lambda r: answer, pki.server_context())
    for name in ("HTTPS_PROXY", "https_proxy", "SSL_CERT_FILE"):
        monkeypatch.delenv(name, raising=False)
    untrusted = await reconciler(store, url, Recorder(), Metrics()).run_once()
    assert untrusted.outcome == "error"
    assert untrusted.error == (
        "REST users list unavailable: "
        "TLS: sFOX's certificate is not trusted (unable to get local issuer certificate)"
    )
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca))
    trusted = await reconciler(store, url, Recorder(), Metrics()).run_once()
    assert trusted.outcome == "baseline"


@pytest.mark.parametrize(
    "response",
    [
        httpx.Response(401, json={"error": "no"}),
        httpx.Response(302, headers={"location": "http://elsewhere.invalid/users"}),
        httpx.Response(200, text="not json"),
        httpx.Response(200, json={"users": []}),
    ],
)
async def test_bad_rest_answers_are_errors(
    store: SQLiteStore, reconciler: Make, rest: Serve, response: httpx.Response
) -> None:
    url = await rest(lambda r: response)
    report = await reconciler(store, url, Recorder(), Metrics()).run_once()
    assert report.outcome == "error"


class Clock:
    """Wall time that moves only when the reconciler sleeps (its injected sleep)."""

    def __init__(self) -> None:
        self.now = 1_000_000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


async def scheduled_runs(
    store: SQLiteStore,
    rest: Serve,
    clock: Clock,
    *,
    interval: float,
    runs: int,
    trigger: int = 0,
) -> list[float]:
    """Run the reconciler's loop until ``runs`` REST requests; the clock at each."""
    seen: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(clock.now)
        return httpx.Response(200, json={"data": [user("u1", "PENDING")]})

    async def append(events: Any) -> int:
        return len((await store.append(events, [Target("ep")], clock.now)).stored)

    rec = Reconciler(
        store,
        append,
        Metrics(),
        api_url=await rest(handler),
        api_key="k" * 16,
        interval=interval,
        clock=clock,
        sleep=clock.sleep,
    )
    for _ in range(trigger):
        rec.trigger()
    task = asyncio.create_task(rec.run())
    try:
        async with asyncio.timeout(5):
            resubscribed = False
            while len(seen) < runs:
                if trigger and len(seen) == 1 and not resubscribed:
                    rec.trigger()  # a resubscription right after the first run
                    resubscribed = True
                await asyncio.sleep(0)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await rec.close()
    return [t - 1_000_000.0 for t in seen]


async def test_an_explicit_interval_is_honoured_as_set(store: SQLiteStore, rest: Serve) -> None:
    # RELAY_RECONCILE_INTERVAL=10s used to run every 5 minutes (the subscription deferral).
    runs = await scheduled_runs(store, rest, Clock(), interval=10.0, runs=3)
    assert runs == [10.0, 20.0, 30.0]


async def test_a_triggered_run_within_5_minutes_of_the_last_is_deferred(
    store: SQLiteStore, rest: Serve
) -> None:
    runs = await scheduled_runs(store, rest, Clock(), interval=3600.0, runs=3, trigger=1)
    assert runs == [0.0, 300.0, 3900.0]  # subscribed, resubscribed (deferred), the interval


async def test_a_retry_after_of_400_digits_waits_an_hour_not_forever(
    store: SQLiteStore, reconciler: Make, rest: Serve
) -> None:
    answers = iter([httpx.Response(429, headers={"retry-after": "9" * 400}), None])

    def handler(request: httpx.Request) -> httpx.Response:
        answer = next(answers)
        return answer or httpx.Response(200, json={"data": [user("u1", "PENDING", True)]})

    sleep = Recorder()
    report = await reconciler(store, await rest(handler), sleep, Metrics()).run_once()
    assert report.outcome == "baseline"
    assert sleep.sleeps == [3600.0]


async def test_rest_users_pass_the_input_boundary(
    store: SQLiteStore, reconciler: Make, rest: Serve
) -> None:
    hostile = [
        user("u\x00nul", "PENDING"),
        user("u" * 5000, "PENDING"),
        {**user("u-deep", "PENDING"), "x": json.loads("[" * 100 + "]" * 100)},
        user("u-status", "PEN\x00DING"),
        {"user_id": 7},
    ]
    answer = {"data": [user("u1", "PENDING"), *hostile, user("u2", "VERIFIED")]}
    sleep, metrics = Recorder(), Metrics()
    url = await rest(lambda r: httpx.Response(200, json=answer))
    rec = reconciler(store, url, sleep, metrics)
    assert (await rec.run_once()).outcome == "baseline"
    answer["data"].append(user("u3", "VERIFIED"))
    report = await rec.run_once()
    assert (report.outcome, report.emitted, report.bad_users) == ("success", 1, 5)
    assert set(await store.user_states()) == {"u1", "u2", "u3"}


async def test_a_store_error_in_a_run_is_an_error_outcome_never_the_tasks_end(
    store: SQLiteStore, rest: Serve
) -> None:
    async def refuse(events: Any) -> int:
        raise StoreError("sqlite:///x: refused")

    answer = {"data": [user("u1", "PENDING")]}
    rec = Reconciler(
        store,
        refuse,
        Metrics(),
        api_url=await rest(lambda r: httpx.Response(200, json=answer)),
        api_key="k" * 16,
        interval=None,
        sleep=Recorder(),
    )
    assert (await rec.run_once(emit_all=True)).outcome == "error"
    await rec.close()


async def test_a_rest_answer_over_64_mib_is_an_error(
    store: SQLiteStore, reconciler: Make, rest: Serve
) -> None:
    class Endless(httpx.AsyncByteStream):
        def __init__(self) -> None:
            self.sent = 0

        async def __aiter__(self) -> Any:
            yield b'{"data": ["'
            while True:
                self.sent += 1 << 20
                yield b"x" * (1 << 20)

    stream = Endless()
    url = await rest(lambda r: httpx.Response(200, stream=stream))
    rec = reconciler(store, url, Recorder(), Metrics())
    report = await rec.run_once()
    assert report.outcome == "error" and "64 MiB" in (report.error or "")
    # It stops reading at 64 MiB; the server is ahead of it by what the sockets buffer.
    assert stream.sent <= 96 << 20


async def test_first_run_is_a_baseline_then_changes_are_emitted_once(
    store: SQLiteStore, reconciler: Make, rest: Serve
) -> None:
    users = [user("u1", "PENDING", True), user("u2", "PENDING", True)]

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"data": users})

    metrics = Metrics()
    rec = reconciler(store, await rest(handler), Recorder(), metrics)
    assert (await rec.run_once()).baseline == 2
    assert await store.list_deliveries() == []
    users[0] = user("u1", "VERIFIED", False)
    report = await rec.run_once()
    assert (report.outcome, report.emitted) == ("success", 1)
    assert [(c.user_id, c.before, c.after) for c in report.changes] == [
        ("u1", "PENDING", "VERIFIED")
    ]
    assert (await rec.run_once()).emitted == 0  # nothing new: nothing twice
    assert metrics.registry.get_sample_value("relay_reconcile_events_total") == 1.0
    dry = await rec.run_once(emit_all=True, dry_run=True)
    assert len(dry.changes) == 2 and dry.emitted == 0


# -- end to end: the hidden gap -----------------------------------------------------------


def latest_by_user(receiver: Receiver) -> dict[str, tuple[str, Any]]:
    latest: dict[str, tuple[str, Any]] = {}
    for item in receiver.received:
        payload = item.json["payload"]
        latest[payload["user_id"]] = (payload["status"], payload["requirements"])
    return latest


@pytest.mark.parametrize(
    "sim",
    [{"count": None, "users": 12, "rate": 400.0, "faults": Faults(lose_while_disconnected=True)}],
    indirect=True,
)
async def test_changes_made_while_disconnected_arrive_after_reconnect(
    sim: Simulator, receiver: Receiver, relay_env: EnvBuilder
) -> None:
    env = relay_env(RELAY_RECONCILE_INTERVAL="1h")
    sim.pause()  # sFOX already has users when the relay is first deployed: the baseline
    before = {uid: (u["status"], u["requirements"]) for uid, u in sim.users.items()}
    async with run_relay(env) as relay:
        runs = relay.metrics.registry.get_sample_value
        await eventually(lambda: runs("relay_reconcile_runs_total", {"outcome": "baseline"}))
        sim.resume()
        await asyncio.sleep(0.3)
        sim.pause()
        await eventually(lambda: receiver.count >= len(sim.sent) > 0)
    # The relay is down: sFOX goes on, and what it sends now is lost to us.
    seen_before = len(sim.sent)
    sim.resume()
    await asyncio.sleep(0.3)
    sim.pause()
    assert len(sim.sent) == seen_before  # nobody was subscribed: those messages are gone
    rest = {
        uid: (u["status"], u["requirements"])
        for uid, u in sim.users.items()
        if before.get(uid) != (u["status"], u["requirements"])
    }  # every user that changed since the relay was deployed
    assert latest_by_user(receiver) != rest  # the gap is real
    async with run_relay(env) as relay:
        runs = relay.metrics.registry.get_sample_value
        await eventually(lambda: runs("relay_reconcile_runs_total", {"outcome": "success"}))
        await eventually(
            lambda: latest_by_user(receiver) == rest,
            message=lambda: f"{latest_by_user(receiver)} != {rest}",
        )
    recovered = [r for r in receiver.received if r.source == "reconcile"]
    assert recovered
    assert all(r.verified for r in receiver.received)
    assert all("user_token" not in r.json["payload"] for r in recovered)
    assert all(r.json["sequence"] is None for r in recovered)


async def test_a_change_seen_both_ways_is_delivered_once(
    sim: Simulator, make_receiver: Any, relay_env: EnvBuilder, signing_secret: str
) -> None:
    """Reconciliation emitted VERIFIED first; the feed's VERIFIED is then superseded for a
    strip endpoint, while a forward endpoint still gets it for its user token."""
    strip_rx, forward_rx = await make_receiver(), await make_receiver()
    endpoints = json.dumps(
        [
            {"name": "strip", "url": strip_rx.url + "/a"},
            {"name": "forward", "url": forward_rx.url + "/b", "user_token": "forward"},
        ]
    )
    env = relay_env(
        RELAY_ENDPOINTS=endpoints,
        RELAY_TOKEN_KEY="AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
        RELAY_RECONCILE_INTERVAL="1h",
    )
    uid = "client_seen-both-ways"
    base: dict[str, Any] = {"sequence": 1000, "recipient": USERS_FEED}
    pending = user(uid, "PENDING", True)
    verified = user(uid, "VERIFIED", False)
    token = {"token": "ab" * 32, "expires": "2999-01-01T00:00:00.000Z", "partner_user_id": uid}
    async with run_relay(env) as relay:
        runs = relay.metrics.registry.get_sample_value
        await eventually(lambda: runs("relay_reconcile_runs_total", {"outcome": "baseline"}))
        await asyncio.wait_for(sim.finished.wait(), 5)
        await eventually(lambda: strip_rx.count >= 40 and forward_rx.count >= 40)
        await sim.publish({**base, "timestamp": 1, "payload": {**pending, "user_token": token}})
        await eventually(lambda: strip_rx.count >= 41 and forward_rx.count >= 41)
    # While the relay is down the user is verified; sFOX's REST knows, the feed message is
    # not seen yet.
    sim.users  # noqa: B018 (the REST view follows publish)
    await sim.publish({**base, "timestamp": 2, "payload": {**verified, "user_token": token}})
    async with run_relay(env) as relay:
        runs = relay.metrics.registry.get_sample_value
        await eventually(lambda: runs("relay_reconcile_runs_total", {"outcome": "success"}))
        await eventually(lambda: strip_rx.count >= 42 and forward_rx.count >= 42)
        # Now the feed message itself arrives (a resend, or a late frame).
        await sim.publish({**base, "timestamp": 3, "payload": {**verified, "user_token": token}})
        await eventually(lambda: forward_rx.count >= 43)
        await eventually(
            lambda: runs("relay_deliveries_total", {"endpoint": "strip", "outcome": "superseded"})
        )
    strip_mine = [r for r in strip_rx.received if r.json["payload"]["user_id"] == uid]
    forward_mine = [r for r in forward_rx.received if r.json["payload"]["user_id"] == uid]
    assert [(r.source, r.json["payload"]["status"]) for r in strip_mine] == [
        ("feed", "PENDING"),
        ("reconcile", "VERIFIED"),
    ]
    assert [(r.source, r.json["payload"]["status"]) for r in forward_mine] == [
        ("feed", "PENDING"),
        ("reconcile", "VERIFIED"),
        ("feed", "VERIFIED"),
    ]
    assert forward_mine[-1].json["payload"]["user_token"] == token
