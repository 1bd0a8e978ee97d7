"""Endpoint health with real parts (CONTRACT.md 5b, 5c): breaker, probes, pause and resume,
auto-disable, rate limits and operational alerts.

A real SQLite (or PostgreSQL) store, real receivers (relay/receiver.py) counting what arrives,
the real dispatcher and monitor. Outages of many minutes run on a simulated clock the test
moves; what must be measured in wall time (rate limits, pause within 2 s) runs in real time
with short settings.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import eventually, run_relay
from store_suite import user_event

from relay import service
from relay.app import targets_of
from relay.config import load_settings
from relay.dispatch import Dispatcher
from relay.errors import ConfigError, StoreUnavailableError
from relay.metrics import Metrics
from relay.monitor import Monitor
from relay.receiver import Received, Receiver, Response
from relay.signing import decode_secret
from relay.simulator import Simulator
from relay.store.base import HealthRow
from relay.store.postgres import PostgresStore
from relay.store.sqlite import SQLiteStore
from relay.transport import AiohttpSender, SendResult

SECRET = "whsec_" + "c2lnbmluZyBzZWNyZXQgZm9yIGhlYWx0aCB0ZXN0cyE="
USERS = [f"client_{n:04d}" for n in range(20)]


class Clock:
    """Simulated seconds; the test moves it."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0
        self.start = self.now

    def __call__(self) -> float:
        return self.now

    @property
    def elapsed(self) -> float:
        return self.now - self.start


@dataclass
class Endpoint:
    """A receiver whose answers the test controls, with what it saw (at simulated times)."""

    clock: Callable[[], float]
    failing: Callable[[float], bool] = lambda now: False
    arrivals: list[tuple[float, Received, int]] = field(default_factory=list)
    receiver: Receiver | None = None

    def behaviour(self, request: Received) -> Response:
        status = 503 if self.failing(self.clock()) else 204
        self.arrivals.append((self.clock(), request, status))
        return Response(status)

    async def start(self) -> str:
        self.receiver = Receiver(
            keys=[decode_secret(SECRET)], behaviour=self.behaviour, clock=self.clock
        )
        await self.receiver.start()
        return self.receiver.url

    def times(self, status: int | None = None) -> list[float]:
        return [at for at, _, s in self.arrivals if status is None or s == status]


def alert_bodies(alerts: Endpoint) -> list[dict[str, Any]]:
    bodies = []
    for _, request, _ in alerts.arrivals:
        assert request.verified is True
        assert request.source == "relay"
        bodies.append(request.json)
    return bodies


@dataclass
class Outage:
    """The numbers of one simulated outage."""

    sick: Endpoint
    crm: Endpoint
    alerts: Endpoint
    dead: int
    states: list[tuple[float, str]]


async def simulate_outage(
    tmp_path: Path, *, threshold: int, outage: float = 600.0, until: float = 1200.0
) -> Outage:
    """Two events per user to ``sick`` (503 for ``outage`` seconds) and ``crm`` (healthy)."""
    clock = Clock()
    sick = Endpoint(clock, failing=lambda now: now - clock.start < outage)
    crm = Endpoint(clock)
    alerts = Endpoint(clock)
    urls = [await e.start() for e in (sick, crm, alerts)]
    settings = load_settings(
        {
            "RELAY_ENDPOINTS": json.dumps(
                [{"name": "sick", "url": urls[0] + "/h"}, {"name": "crm", "url": urls[1] + "/h"}]
            ),
            "RELAY_ALERT_URL": urls[2] + "/alerts",
            "RELAY_SIGNING_SECRET": SECRET,
            "RELAY_RETRY_SCHEDULE": "0s,5s,30s,60s",
            "RELAY_BREAKER_THRESHOLD": str(threshold),
            "RELAY_BREAKER_COOLDOWN": "30s",
        }
    )
    store = SQLiteStore(tmp_path / f"outage-{threshold}.db")
    await store.open(daemon=True)
    metrics = Metrics(clock)
    sender = AiohttpSender()
    monitor = Monitor(store, settings, metrics, replica="test", clock=clock)
    dispatcher = Dispatcher(
        store,
        settings.all_endpoints,
        sender,
        metrics,
        clock=clock,
        rand=lambda: 0.5,
        monitor=monitor,
        idle_poll=0.05,
    )
    events = [user_event(u, n) for n in (1, 2) for u in USERS]
    await store.append(events, targets_of(settings), clock())
    await monitor.step()
    running = asyncio.create_task(dispatcher.run())
    states: list[tuple[float, str]] = []
    try:
        while clock.elapsed < until:
            # The test drives the monitor itself: at each simulated instant the attempts due
            # go out, their results are folded into the breaker, and only then time moves.
            for _ in range(3):
                dispatcher.wake()
                await asyncio.sleep(0.004)
                await eventually(lambda: dispatcher.in_flight == 0, timeout=5)
                await monitor.step()
            if not states or states[-1][1] != monitor.state("sick"):
                states.append((clock.elapsed, monitor.state("sick")))
            clock.now += 5.0
    finally:
        await dispatcher.shutdown(1.0)
        await running
        await sender.close()
        dead = len(await store.list_deliveries(state="dead", endpoint="sick", limit=500))
        await store.close()
        for e in (sick, crm, alerts):
            assert e.receiver is not None
            await e.receiver.close()
    return Outage(sick, crm, alerts, dead, states)


async def test_a_ten_minute_outage_costs_a_few_probes_and_loses_nothing(tmp_path: Path) -> None:
    run = await simulate_outage(tmp_path, threshold=5)
    start = run.states[0][0]
    opened = next(t for t, s in run.states if s == "open")
    recovered = next(t for t, s in run.states if s == "active" and t > opened)
    failed = run.sick.times(503)
    first_batch = [t for t in failed if t - failed[0] < 1]
    during = [t for t in run.sick.times() if failed[0] + 1 <= t < failed[0] + recovered]
    # While open: only probes, after 30 s, then 60, 120, 240, 480 s (at most 10 min).
    assert len(first_batch) == len(USERS)  # every user's head was in flight when it opened
    assert len(during) <= 5, during
    assert recovered - opened >= 600 - 30  # not closed before the endpoint came back
    assert run.dead == 0  # a probe never uses an attempt up
    # After recovery every event arrives once, in per-user order.
    delivered = [r for _, r, s in run.sick.arrivals if s == 204]
    assert Counter(r.webhook_id for r in delivered).most_common(1)[0][1] == 1
    assert len(delivered) == 2 * len(USERS)
    seen: dict[str, list[int]] = defaultdict(list)
    for r in delivered:
        seen[r.json["payload"]["user_id"]].append(r.json["sequence"])
    assert all(seqs == sorted(seqs) for seqs in seen.values())
    # The healthy endpoint did not wait for the sick one.
    assert len(run.crm.arrivals) == 2 * len(USERS)
    assert max(run.crm.times()) - run.crm.times()[0] <= 10.0
    assert start == 0
    # One alert per transition, signed, from the relay.
    bodies = alert_bodies(run.alerts)
    assert [b["type"] for b in bodies] == ["endpoint.opened", "endpoint.recovered"]
    assert bodies[0]["data"]["endpoint"] == "sick"
    assert bodies[0]["data"]["last_status"] == 503
    assert bodies[0]["data"]["pending"] == 2 * len(USERS)
    assert bodies[0]["timestamp"].endswith("Z")


async def test_without_the_breaker_the_same_outage_burns_attempts(tmp_path: Path) -> None:
    before = await simulate_outage(tmp_path, threshold=10**6, until=700.0)
    after = await simulate_outage(tmp_path, threshold=5, until=700.0)
    spent_before = len(before.sick.times(503))
    spent_after = len(after.sick.times(503))
    print(
        f"\n10-minute outage: attempts before={spent_before} (dead {before.dead}), "
        f"after={spent_after} (dead {after.dead})"
    )
    assert before.dead == 2 * len(USERS)  # every delivery ran out of attempts
    assert spent_before == 4 * 2 * len(USERS)
    assert after.dead == 0
    assert spent_after <= len(USERS) + 5
    # Dead deliveries raise delivery.dead, at most once a minute per endpoint.
    dead = [
        (at, r.json) for at, r, _ in before.alerts.arrivals if r.json["type"] == "delivery.dead"
    ]
    assert dead and all(body["data"]["endpoint"] == "sick" for _, body in dead)
    assert all(b - a >= 60 for (a, _), (b, _) in zip(dead, dead[1:], strict=False))
    first = dead[0][1]["data"]
    assert set(first) == {"endpoint", "count", "delivery_id", "event_id", "user_id"}
    assert first["delivery_id"].startswith("dlv_") and first["event_id"].startswith("evt_")
    assert first["user_id"] in USERS
    assert sum(body["data"]["count"] for _, body in dead) >= 2 * len(USERS) - first["count"]
    print("delivery.dead alert bodies:", [body for _, body in dead[:2]])


# -- in real time, through `relay run` (in-process) ---------------------------------------

ADMIN_TOKEN = "health-test-admin-token-0123456789"
API = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def relay_env(
    sim: Simulator, store: str, endpoints: list[dict[str, Any]], **extra: str
) -> dict[str, str]:
    return {
        "RELAY_API_KEY": sim.api_key,
        "RELAY_WS_URL": sim.ws_url,
        "RELAY_API_URL": sim.api_url,
        "RELAY_ENDPOINTS": json.dumps(endpoints),
        "RELAY_SIGNING_SECRET": SECRET,
        "RELAY_STORE": store,
        "RELAY_ADMIN_ADDR": "127.0.0.1:0",
        "RELAY_ADMIN_TOKEN": ADMIN_TOKEN,
        "RELAY_RECONCILE_INTERVAL": "off",
        "RELAY_LOG_LEVEL": "WARNING",
        "RELAY_LOG_FORMAT": "console",
        **extra,
    }


def busiest_second(times: list[float]) -> int:
    """The most arrivals in any one-second window (sliding, starting at an arrival)."""
    times = sorted(times)
    best = 0
    j = 0
    for i, start in enumerate(times):
        while j < len(times) and times[j] < start + 1.0:
            j += 1
        best = max(best, j - i)
    return best


def in_user_order(endpoint: Endpoint) -> bool:
    seen: dict[str, list[int]] = defaultdict(list)
    for _, r, status in endpoint.arrivals:
        if status == 204:
            seen[r.json["payload"]["user_id"]].append(r.json["timestamp"])
    return all(ts == sorted(ts) for ts in seen.values())


async def api(relay: Any, method: str, path: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{relay.admin.port}") as client:
        return await client.request(method, path, headers=API)


async def test_rate_limit_holds_at_the_receiver(make_sim: Any, tmp_path: Path) -> None:
    sim = await make_sim(count=90, users=30)
    crm = Endpoint(time.time)
    url = await crm.start()
    env = relay_env(
        sim, f"sqlite:///{tmp_path}/r.db", [{"name": "crm", "url": url, "rate_limit": 30}]
    )
    async with run_relay(env):
        await eventually(lambda: len(crm.arrivals) >= 90, timeout=20)
    times = crm.times()
    rate = (len(times) - 1) / (max(times) - min(times))
    print(f"\nrate_limit 30/s: busiest second {busiest_second(times)}, mean {rate:.1f}/s")
    assert busiest_second(times) <= 31  # the limit, give or take one
    assert rate >= 20  # and not far below it (each claim adds a store round trip)


async def test_pause_and_resume_while_running(make_sim: Any, tmp_path: Path) -> None:
    sim = await make_sim(count=60, users=12, rate=20)
    crm = Endpoint(time.time)
    alerts = Endpoint(time.time)
    url = await crm.start()
    store = f"sqlite:///{tmp_path}/p.db"
    env = relay_env(sim, store, [{"name": "crm", "url": url}], RELAY_ALERT_URL=await alerts.start())
    async with run_relay(env) as relay:
        await eventually(lambda: len(crm.arrivals) >= 5, timeout=10)
        paused = await api(relay, "POST", "/api/endpoints/crm/pause")
        assert paused.json() == {"name": "crm", "state": "paused", "changed": True}
        again = await api(relay, "POST", "/api/endpoints/crm/pause")
        assert (again.status_code, again.json()["changed"]) == (200, False)
        assert (await api(relay, "POST", "/api/endpoints/nope/pause")).status_code == 404
        await asyncio.sleep(2.0)  # in-flight attempts finish; then nothing is attempted
        frozen = len(crm.arrivals)
        await asyncio.sleep(1.0)
        assert len(crm.arrivals) == frozen < 60
        (listed,) = [
            e for e in (await api(relay, "GET", "/api/endpoints")).json() if e["name"] == "crm"
        ]
        assert (listed["state"], listed["pending"] > 0) == ("paused", True)
        assert b'relay_endpoint_state{endpoint="crm",state="paused"} 1.0' in relay.metrics.render()
        # The CLI, as a separate process on the same store, resumes it.
        done = await cli(env, "endpoints", "resume", "crm", "--json")
        assert json.loads(done.stdout) == {"name": "crm", "state": "active", "changed": True}
        assert (await cli(env, "endpoints", "resume", "nope")).returncode == 1
        await eventually(lambda: len(crm.arrivals) >= 60, timeout=15)
        await eventually(lambda: len(alerts.arrivals) >= 2, timeout=5)
    assert in_user_order(crm)
    bodies = alert_bodies(alerts)
    assert [b["type"] for b in bodies] == ["endpoint.paused", "endpoint.resumed"]
    assert all(b["data"]["endpoint"] == "crm" for b in bodies)


@dataclass
class Cli:
    returncode: int
    stdout: str
    stderr: str


async def cli(env: dict[str, str], *args: str) -> Cli:
    """`relay ...` as a separate process (the CLI an operator runs next to the daemon)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "relay",
        *args,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return Cli(proc.returncode, out.decode(), err.decode())


async def test_a_disabled_endpoint_keeps_its_backlog_across_a_restart(
    make_sim: Any, tmp_path: Path
) -> None:
    sim = await make_sim(count=10, users=5)
    down = {"on": True}
    sick = Endpoint(time.time, failing=lambda now: down["on"])
    alerts = Endpoint(time.time)
    url = await sick.start()
    env = relay_env(
        sim,
        f"sqlite:///{tmp_path}/d.db",
        [{"name": "sick", "url": url}],
        RELAY_ALERT_URL=await alerts.start(),
        RELAY_BREAKER_THRESHOLD="2",
        RELAY_BREAKER_COOLDOWN="100ms",
        RELAY_DISABLE_AFTER="600ms",
        RELAY_RETENTION="1s",
    )
    async with run_relay(env, health_poll=0.05) as relay:
        await eventually(lambda: relay.monitor.state("sick") == "disabled", timeout=10)
        tried = len(sick.arrivals)
        await asyncio.sleep(0.5)
        assert len(sick.arrivals) == tried  # no probes once disabled
    store = SQLiteStore(tmp_path / "d.db")
    await store.open(daemon=False)
    try:
        await service.purge(store, retention=0.0, now=time.time() + 3600)
        assert len(await store.list_deliveries(state="pending")) == 10  # nothing purged
    finally:
        await store.close()
    down["on"] = False
    async with run_relay(env, health_poll=0.05) as relay:
        await asyncio.sleep(0.5)
        assert len(sick.arrivals) == tried  # still disabled after the restart
        (listed,) = (await api(relay, "GET", "/api/endpoints")).json()[:1]
        assert (listed["state"], listed["pending"]) == ("disabled", 10)
        resumed = await api(relay, "POST", "/api/endpoints/sick/resume")
        assert resumed.json()["state"] == "active"
        await eventually(lambda: len(sick.times(204)) >= 10, timeout=10)
        await eventually(lambda: len(alerts.arrivals) >= 3, timeout=5)
    assert in_user_order(sick)
    assert len({r.webhook_id for _, r, s in sick.arrivals if s == 204}) == 10
    bodies = alert_bodies(alerts)
    assert [b["type"] for b in bodies] == [
        "endpoint.opened",
        "endpoint.disabled",
        "endpoint.resumed",
    ]
    assert bodies[1]["data"]["pending"] == 10


@pytest.mark.postgres
async def test_two_replicas_share_breaker_alerts_and_rate_limit(
    make_sim: Any, database: str
) -> None:
    sim = await make_sim(count=40, users=10)
    down = {"on": True}
    sick = Endpoint(time.time, failing=lambda now: down["on"])
    crm = Endpoint(time.time)
    alerts = Endpoint(time.time)
    endpoints = [
        {"name": "sick", "url": await sick.start()},
        {"name": "crm", "url": await crm.start(), "rate_limit": 20},
    ]
    env = relay_env(
        sim,
        database,
        endpoints,
        RELAY_ALERT_URL=await alerts.start(),
        RELAY_BREAKER_THRESHOLD="3",
        RELAY_BREAKER_COOLDOWN="200ms",
        RELAY_REPLICAS="2",
    )
    settings = load_settings(env)

    def store() -> PostgresStore:
        return PostgresStore(database, lease=settings.lease)

    async with (
        run_relay(env, store=store(), health_poll=0.05) as one,
        run_relay(env, store=store(), health_poll=0.05) as two,
    ):
        await eventually(lambda: "open" in (one.monitor.state("sick"), two.monitor.state("sick")))
        await eventually(lambda: one.monitor.state("sick") == two.monitor.state("sick") == "open")
        await asyncio.sleep(1.0)  # probes only, one at a time across both replicas
        down["on"] = False
        await eventually(lambda: len(sick.times(204)) >= 40, timeout=15)
        await eventually(lambda: len(crm.arrivals) >= 40, timeout=15)
        await eventually(lambda: len(alerts.arrivals) >= 2, timeout=5)
        await asyncio.sleep(0.3)  # a duplicate alert would have arrived by now
    assert in_user_order(sick)
    failed = sick.times(503)
    opened_at = failed[0]
    probes = [t for t in failed if t > opened_at + 0.15]  # after the first cooldown
    assert len(probes) <= 4, probes  # 0.2, 0.4, 0.8 s ... within the ~1.2 s it was open
    assert busiest_second(crm.times()) <= 21
    bodies = alert_bodies(alerts)
    assert sorted(b["type"] for b in bodies) == ["endpoint.opened", "endpoint.recovered"]


# -- alerts: once per transition however many replicas --------------------------------------


async def monitors_on_one_store(
    tmp_path: Path, clock: Clock, alerts: Endpoint, *, subscribed: Callable[[], bool]
) -> tuple[SQLiteStore, list[Monitor]]:
    settings = load_settings(
        {
            "RELAY_ENDPOINTS": json.dumps([{"name": "sick", "url": "http://sick.test/h"}]),
            "RELAY_ALERT_URL": await alerts.start(),
            "RELAY_SIGNING_SECRET": SECRET,
            "RELAY_BREAKER_THRESHOLD": "2",
        }
    )
    store = SQLiteStore(tmp_path / "m.db")
    await store.open(daemon=False)
    monitors = [
        Monitor(
            store, settings, Metrics(clock), replica=f"r{n}", clock=clock, subscribed=subscribed
        )
        for n in (1, 2)
    ]
    return store, monitors


async def stored_alerts(store: SQLiteStore, clock: Clock) -> list[dict[str, Any]]:
    return [json.loads(c.body) for c in await store.claim("alerts", clock() + 1, 100)]


async def test_replicas_racing_for_one_transition_store_one_alert(tmp_path: Path) -> None:
    clock = Clock()
    alerts = Endpoint(clock)
    store, monitors = await monitors_on_one_store(tmp_path, clock, alerts, subscribed=lambda: True)
    try:
        await store.append([user_event(u, 1) for u in USERS[:4]], targets_of_sick(), clock())
        claims = await store.claim("sick", clock(), 10)
        for monitor in monitors:  # each replica saw failures of two users
            for user_claim in claims[:2]:
                monitor.observe("sick", user_claim, SendResult(503, 0.1), probe=False, error=None)
        await asyncio.gather(*(m.step() for m in monitors))
        assert [m.state("sick") for m in monitors] == ["open", "open"]
        bodies = await stored_alerts(store, clock)
        assert [b["type"] for b in bodies] == ["endpoint.opened"]
        assert bodies[0]["data"] == {
            "endpoint": "sick",
            "last_status": 503,
            "last_error": None,
            "pending": 4,
        }
    finally:
        await store.close()
        assert alerts.receiver is not None
        await alerts.receiver.close()


def targets_of_sick() -> list[Any]:
    from relay.store.base import Target

    return [Target("sick")]


async def test_feed_down_after_two_minutes_then_up(tmp_path: Path) -> None:
    clock = Clock()
    alerts = Endpoint(clock)
    feed = {"subscribed": False}
    store, (monitor, _) = await monitors_on_one_store(
        tmp_path, clock, alerts, subscribed=lambda: feed["subscribed"]
    )
    try:
        await monitor.step()
        clock.now += 119.0
        await monitor.step()
        assert await stored_alerts(store, clock) == []
        clock.now += 1.0
        await monitor.step()
        await monitor.step()
        feed["subscribed"] = True
        await monitor.step()
        await monitor.step()
        bodies = await stored_alerts(store, clock)
        assert [(b["type"], b["data"]) for b in bodies] == [
            ("feed.down", {"replica": "r1"}),
            ("feed.up", {"replica": "r1"}),
        ]
        text = monitor_metrics(monitor)
        assert 'relay_alerts_total{type="feed.down"} 1.0' in text
        assert 'relay_endpoint_state{endpoint="sick",state="active"} 1.0' in text
    finally:
        await store.close()
        assert alerts.receiver is not None
        await alerts.receiver.close()


def monitor_metrics(monitor: Monitor) -> str:
    return monitor.metrics.render().decode()


# -- configuration and the CLI ------------------------------------------------------------

BASE_ENV = {"RELAY_SIGNING_SECRET": SECRET, "RELAY_ENDPOINTS": "http://crm.test/h"}


def test_health_settings_default_as_the_contract_says() -> None:
    settings = load_settings(BASE_ENV)
    assert (settings.breaker_threshold, settings.breaker_cooldown) == (5, 30.0)
    assert settings.disable_after == 5 * 86400
    assert settings.alert_url is None and settings.endpoints[0].rate_limit is None
    off = load_settings({**BASE_ENV, "RELAY_DISABLE_AFTER": "off"})
    assert off.disable_after is None


def test_alert_url_as_a_url_or_a_limited_endpoint_object() -> None:
    plain = load_settings({**BASE_ENV, "RELAY_ALERT_URL": "https://u:pw@ops.test/alerts"})
    assert plain.alert_url is not None
    assert (plain.alert_url.name, plain.alert_url.display_url) == (
        "alerts",
        "https://***@ops.test/alerts",
    )
    assert [e.name for e in plain.all_endpoints][-1] == "alerts"
    obj = load_settings(
        {
            **BASE_ENV,
            "RELAY_ALERT_URL": json.dumps(
                {"url": "https://ops.test/a", "name": "ops", "headers": {"x-team": "on-call"}}
            ),
        }
    )
    assert obj.alert_url is not None and obj.alert_url.name == "ops"


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"RELAY_BREAKER_THRESHOLD": "0"}, "RELAY_BREAKER_THRESHOLD"),
        ({"RELAY_BREAKER_COOLDOWN": "soon"}, "RELAY_BREAKER_COOLDOWN"),
        ({"RELAY_DISABLE_AFTER": "never"}, "RELAY_DISABLE_AFTER"),
        ({"RELAY_ALERT_URL": "ftp://ops.test/"}, "RELAY_ALERT_URL.url"),
        ({"RELAY_ALERT_URL": '{"url": "https://o.test", "statuses": ["x"]}'}, "RELAY_ALERT_URL"),
        ({"RELAY_ALERT_URL": '{"url": "https://o.test", "name": "crm"}'}, "RELAY_ALERT_URL.name"),
        (
            {"RELAY_ENDPOINTS": '[{"url": "http://a.test", "rate_limit": -1}]'},
            "RELAY_ENDPOINTS[0].rate_limit",
        ),
        (
            {"RELAY_ENDPOINTS": '[{"url": "http://a.test", "rate_limit": "fast"}]'},
            "RELAY_ENDPOINTS[0].rate_limit",
        ),
    ],
)
def test_bad_health_settings_name_their_variable(env: dict[str, str], variable: str) -> None:
    endpoints = json.dumps([{"url": "http://crm.test/h", "name": "crm"}])
    with pytest.raises(ConfigError) as caught:
        load_settings({**BASE_ENV, "RELAY_ENDPOINTS": endpoints, **env})
    assert caught.value.variable == variable


async def test_endpoints_cli_lists_states_and_never_creates_a_store(
    make_sim: Any, tmp_path: Path
) -> None:
    sim = await make_sim(count=4, users=2)
    crm = Endpoint(time.time, failing=lambda now: True)
    env = relay_env(sim, f"sqlite:///{tmp_path}/c.db", [{"name": "crm", "url": await crm.start()}])
    missing = await cli(env, "endpoints", "list")
    assert missing.returncode == 1
    assert f"{tmp_path}/c.db" in missing.stderr and "RELAY_STORE" in missing.stderr
    assert not (tmp_path / "c.db").exists()
    async with run_relay(env):
        await eventually(lambda: len(crm.arrivals) >= 2)
        assert (await cli(env, "endpoints", "pause", "crm")).stdout == "crm: paused\n"
        listed = await cli(env, "endpoints", "list", "--json")
        table = await cli(env, "endpoints", "list")
    (item,) = [json.loads(line) for line in listed.stdout.splitlines()]
    assert (item["name"], item["state"], item["pending"]) == ("crm", "paused", 4)
    assert item["oldest_pending_age_s"] >= 0 and item["last_error"] == "HTTP 503"
    header, row = table.stdout.splitlines()
    assert header.split() == ["NAME", "STATE", "PENDING", "OLDEST", "LAST", "ERROR"]
    assert row.split()[:3] == ["crm", "paused", "4"]


async def test_nothing_is_claimed_before_the_states_are_read(tmp_path: Path) -> None:
    """A restarted relay must not send one attempt to a paused endpoint before it has read
    that the endpoint is paused."""
    clock = Clock()
    alerts = Endpoint(clock)
    store, (monitor, _) = await monitors_on_one_store(
        tmp_path, clock, alerts, subscribed=lambda: True
    )
    try:
        assert monitor.mode("sick", clock()) == "hold"  # not read yet
        await monitor.step()
        assert monitor.mode("sick", clock()) == "claim"
        assert await store.health_write("endpoint", "sick", HealthRow("paused", 0, "{}"), clock())
        restarted = Monitor(store, monitor.settings, Metrics(clock), replica="r3", clock=clock)
        assert restarted.mode("sick", clock()) == "hold"
        await restarted.step()
        assert restarted.mode("sick", clock()) == "hold"  # paused, as stored
    finally:
        await store.close()
        assert alerts.receiver is not None
        await alerts.receiver.close()


class FlakyStore(SQLiteStore):
    """The real SQLite store, whose health writes fail while ``down`` (a store outage)."""

    down = False

    async def health_write(self, *args: Any, **kwargs: Any) -> bool:
        if self.down:
            raise StoreUnavailableError("the store is down")
        return await super().health_write(*args, **kwargs)


async def test_a_transition_during_a_store_outage_is_stored_when_it_returns(
    tmp_path: Path,
) -> None:
    clock = Clock()
    settings = load_settings(
        {
            "RELAY_ENDPOINTS": json.dumps([{"name": "sick", "url": "http://sick.test/h"}]),
            "RELAY_ALERT_URL": "http://alerts.test/a",
            "RELAY_SIGNING_SECRET": SECRET,
            "RELAY_BREAKER_THRESHOLD": "2",
        }
    )
    store = FlakyStore(tmp_path / "f.db")
    await store.open(daemon=False)
    try:
        monitor = Monitor(store, settings, Metrics(clock), replica="r1", clock=clock)
        await store.append([user_event(u, 1) for u in USERS[:2]], targets_of_sick(), clock())
        for claim in await store.claim("sick", clock(), 10):
            monitor.observe("sick", claim, SendResult(None, 1.0), probe=False, error="timed out")
        store.down = True
        with pytest.raises(StoreUnavailableError):
            await monitor.step()
        assert monitor.state("sick") == "active"
        store.down = False
        await monitor.step()
        assert monitor.state("sick") == "open"
        (body,) = await stored_alerts(store, clock)
        assert body["type"] == "endpoint.opened"
        assert body["data"]["last_error"] == "timed out"
    finally:
        await store.close()
