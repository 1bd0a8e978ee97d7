"""The admin HTTP port (see the README): health, readiness, metrics and ``/api/*``.

Most tests drive :func:`relay.admin.create_app` in-process through httpx's ASGI transport, over
a real SQLite outbox in ``tmp_path`` holding a few events in every state. Path tricks go through
real uvicorn (:class:`relay.admin.AdminServer`) on port 0 with raw HTTP, because an HTTP client
would normalise the very paths under test. One test runs a whole relay and reads its port.
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import json
import os
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import CONTRACT_METRICS, EnvBuilder

import relay.admin
from relay import __version__, service
from relay.admin import AdminServer, create_app
from relay.config import Settings, load_settings
from relay.metrics import Metrics
from relay.receiver import Receiver
from relay.simulator import Simulator
from relay.store.base import Attempt, Outcome, Target
from relay.store.sqlite import SQLiteStore

pytest.register_assert_rewrite("store_suite")

from store_suite import (  # noqa: E402
    SEAL_KEY,
    TOKEN,
    USER_A,
    token_event,
    user_event,
)

USER_B = "client_5b1f0c2e-7d3a-4a8e-9c61-2f4e8d9b0a17"
USER_C = "client_c3d2e1f0-1a2b-4c3d-8e9f-0a1b2c3d4e5f"
USER_D = "client_d4e5f6a7-b8c9-4d0e-9f1a-2b3c4d5e6f70"

NOW = 1_717_005_400.0
ADMIN_TOKEN = "adm-7Hq2kLp9xV3mWn8R"
PASSWORD = "pw-Zq81xTk4"  # inside the endpoint URL: must never be shown
QUERY_SECRET = "qs-Lm52bNv7Yc"
CRM_URL = f"https://relay:{PASSWORD}@crm.example/hook?key={QUERY_SECRET}"


#: Every /api route, as (method, path) with a real delivery id where one is needed.
API_ROUTES = (
    ("GET", "/api/status"),
    ("GET", "/api/endpoints"),
    ("GET", "/api/history"),
    ("POST", "/api/endpoints/crm/pause"),
    ("POST", "/api/endpoints/crm/resume"),
    ("GET", "/api/deliveries"),
    ("GET", "/api/deliveries/dlv_1"),
    ("POST", "/api/deliveries/dlv_1/replay"),
    ("POST", "/api/deliveries/replay"),
    ("POST", "/api/deliveries/retry"),
)

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def settings_for(*, admin_token: str | None = ADMIN_TOKEN) -> Settings:
    env = {
        "RELAY_ENDPOINTS": json.dumps([{"name": "crm", "url": CRM_URL}]),
        "RELAY_SIGNING_SECRET": "whsec_" + base64.b64encode(b"k" * 32).decode(),
        "RELAY_TOKEN_KEY": base64.b64encode(SEAL_KEY).decode(),
    }
    if admin_token is not None:
        env["RELAY_ADMIN_TOKEN"] = admin_token
    return load_settings(env)


class Seeded:
    """What the seeded store holds, by name.

    Endpoint ``crm`` is configured; ``old`` was removed from the configuration and still holds
    pending deliveries. For ``crm``: a1 and d1 delivered, b1 dead (410), c1 (with a sealed
    user token) dead (400), a2 pending behind a1. For ``old``: all five pending.
    """

    def __init__(self, store: SQLiteStore) -> None:
        self.store = store
        self.ids: dict[str, str] = {}

    async def fill(self) -> None:
        events = {
            "a1": user_event(USER_A, 1),
            "b1": user_event(USER_B, 2),
            "c1": token_event(USER_C, 3, seal_key=SEAL_KEY),
            "d1": user_event(USER_D, 4),
            "a2": user_event(USER_A, 5, status="VERIFIED"),
        }
        await self.store.append(list(events.values()), [Target("crm"), Target("old")], NOW)
        by_event = {e.event_id: name for name, e in events.items()}
        for info in await self.store.list_deliveries(limit=100):
            self.ids[f"{info.endpoint}:{by_event[info.event_id]}"] = info.id
        claims = {c.event_id: c for c in await self.store.claim("crm", NOW + 1, 10)}
        assert {by_event[e] for e in claims} == {"a1", "b1", "c1", "d1"}
        at = NOW + 2

        def verdict(name: str, state: str, status: int, excerpt: str | None) -> Outcome:
            claim = claims[events[name].event_id]
            attempt = Attempt(at, status, 0.042, None, excerpt)
            return Outcome(claim.delivery_id, state, at, attempt)  # type: ignore[arg-type]

        await self.store.record(
            [
                verdict("a1", "delivered", 200, None),
                verdict("b1", "dead", 410, "gone for good"),
                verdict("c1", "dead", 400, "bad request"),
                verdict("d1", "delivered", 204, None),
            ],
            at,
        )


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    store = SQLiteStore(tmp_path / "relay.db")
    await store.open(daemon=True)
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
async def seeded(store: SQLiteStore) -> Seeded:
    data = Seeded(store)
    await data.fill()
    return data


class Harness:
    """The admin app's injected dependencies, changeable by the test."""

    def __init__(self) -> None:
        self.checks = {"feed": True, "store": True}
        self.replays = 0
        self.metrics = Metrics(lambda: NOW)

    def on_replay(self) -> None:
        self.replays += 1


@pytest.fixture
def harness() -> Harness:
    return Harness()


@pytest.fixture
async def make_client(
    seeded: Seeded, harness: Harness
) -> AsyncIterator[Callable[..., httpx.AsyncClient]]:
    clients: list[httpx.AsyncClient] = []

    def make(settings: Settings | None = None) -> httpx.AsyncClient:
        app = create_app(
            store=seeded.store,
            settings=settings or settings_for(),
            metrics=harness.metrics,
            readiness=lambda: dict(harness.checks),
            feed_state=lambda: "subscribed",
            in_flight=lambda: 3,
            on_replay=harness.on_replay,
            clock=lambda: NOW + 100,
        )
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://admin")
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.aclose()


@pytest.fixture
def client(make_client: Callable[..., httpx.AsyncClient]) -> httpx.AsyncClient:
    return make_client()


# -- health, readiness, metrics -------------------------------------------------------------


async def test_healthz_answers_200_even_when_not_ready(
    client: httpx.AsyncClient, harness: Harness
) -> None:
    harness.checks = {"feed": False, "store": False}
    response = await client.get("/healthz")
    assert response.status_code == 200


@pytest.mark.parametrize(
    ("feed_ok", "store_ok", "failing"),
    [
        (True, True, []),
        (False, True, ["feed"]),
        (True, False, ["store"]),
        (False, False, ["feed", "store"]),
    ],
)
async def test_readyz_names_each_failing_check(
    client: httpx.AsyncClient,
    harness: Harness,
    feed_ok: bool,
    store_ok: bool,
    failing: list[str],
) -> None:
    harness.checks = {"feed": feed_ok, "store": store_ok}
    response = await client.get("/readyz")

    assert response.status_code == (503 if failing else 200)
    body = response.json()
    assert body["ready"] is (not failing)
    assert sorted(k for k, v in body["checks"].items() if v != "ok") == failing
    assert set(body["checks"]) == {"feed", "store"}


async def test_readyz_names_a_supervised_task_that_is_down(
    client: httpx.AsyncClient, harness: Harness
) -> None:
    harness.checks = {"feed": True, "store": True, "task.recorder": False}
    response = await client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["checks"]["task.recorder"] == "failing"


# -- the admin origin holds the token: nothing else may run in it -----------------------------


@pytest.mark.parametrize("path", ["/api/docs", "/api/redoc", "/docs", "/redoc"])
async def test_no_api_browser_is_served(client: httpx.AsyncClient, path: str) -> None:
    response = await client.get(path)
    assert response.status_code in (401, 404), path
    assert "swagger" not in response.text.lower() and "cdn" not in response.text.lower()


async def test_the_status_page_forbids_framing_and_other_origins(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get("/")
    assert response.status_code == 200
    policy = dict(
        part.strip().split(" ", 1)
        for part in response.headers["content-security-policy"].split(";")
    )
    assert policy["frame-ancestors"] == "'none'"
    assert policy["default-src"] == "'self'"
    assert policy["object-src"] == "'none'" and policy["base-uri"] == "'none'"
    for directive in ("script-src", "style-src"):
        assert "'unsafe-inline'" not in policy[directive] and "http" not in policy[directive]
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics", "/api/endpoints"])
async def test_every_answer_says_nosniff_and_no_framing(
    client: httpx.AsyncClient, path: str
) -> None:
    response = await client.get(path)
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["x-frame-options"] == "DENY"
    assert "frame-ancestors 'none'" in response.headers["content-security-policy"]


def metric_families(text: str) -> dict[str, str]:
    """``# TYPE`` lines: metric name -> type."""
    return dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE))


async def test_metrics_has_every_contract_metric(client: httpx.AsyncClient) -> None:
    response = await client.get("/metrics")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    families = metric_families(response.text)
    missing = [name for name in CONTRACT_METRICS if name not in families]
    assert not missing, f"missing from /metrics: {missing}"
    assert families["relay_delivery_duration_seconds"] == "histogram"
    assert all(families[n] == "counter" for n in CONTRACT_METRICS if n.endswith("_total"))
    # One relay_feed_state series per state, 1 for the current one.
    states = re.findall(r'^relay_feed_state\{state="(\w+)"\} (\S+)$', response.text, re.M)
    assert len(states) >= 5 and [s for s, v in states if float(v) == 1.0] == ["stopped"]
    assert families["relay_outbox_dead"] == "gauge"
    assert f'relay_build_info{{version="{__version__}"}} 1.0' in response.text
    assert "_created" not in response.text


async def test_metrics_label_endpoints_by_name(client: httpx.AsyncClient, harness: Harness) -> None:
    harness.metrics.deliveries.labels(endpoint="crm", outcome="success").inc()
    harness.metrics.delivery_duration.labels(endpoint="crm").observe(0.01)
    text = (await client.get("/metrics")).text

    assert 'relay_deliveries_total{endpoint="crm",outcome="success"} 1.0' in text
    for value in re.findall(r'endpoint="([^"]*)"', text):
        assert value == "crm"
    assert PASSWORD not in text and QUERY_SECRET not in text


# -- /api authentication --------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path"), API_ROUTES)
async def test_api_answers_403_without_an_admin_token_configured(
    make_client: Callable[..., httpx.AsyncClient], method: str, path: str
) -> None:
    client = make_client(settings_for(admin_token=None))
    for headers in ({}, AUTH, {"Authorization": "Bearer "}):
        response = await client.request(method, path, headers=headers)
        assert response.status_code == 403, (headers, response.text)
        assert "RELAY_ADMIN_TOKEN" in response.json()["detail"]
    assert (await client.get("/healthz")).status_code == 200


BAD_AUTHORIZATION = (
    None,
    "",
    "Bearer",
    "Bearer ",
    "Bearer wrong-token",
    f"Bearer {ADMIN_TOKEN}x",
    f"Bearer {ADMIN_TOKEN[:-1]}",
    f"Bearer  {ADMIN_TOKEN}",
    f"Bearer {ADMIN_TOKEN} extra",
    ADMIN_TOKEN,
    f"Token {ADMIN_TOKEN}",
    f"Basic {ADMIN_TOKEN}",
    "Basic " + base64.b64encode(f"admin:{ADMIN_TOKEN}".encode()).decode(),
)


@pytest.mark.parametrize(("method", "path"), API_ROUTES)
async def test_api_answers_401_to_a_missing_or_wrong_token(
    client: httpx.AsyncClient, seeded: Seeded, method: str, path: str
) -> None:
    for authorization in BAD_AUTHORIZATION:
        headers = {} if authorization is None else {"Authorization": authorization}
        response = await client.request(method, path, headers=headers)
        assert response.status_code == 401, (authorization, response.text)
        assert response.headers["www-authenticate"] == "Bearer"
        assert ADMIN_TOKEN not in response.text
    # Nothing was replayed by the refused requests.
    assert len(await seeded.store.list_deliveries(state="dead")) == 2


@pytest.mark.parametrize(("method", "path"), API_ROUTES)
async def test_api_answers_200_with_the_token(
    client: httpx.AsyncClient, method: str, path: str
) -> None:
    for scheme in ("Bearer", "bearer"):
        response = await client.request(
            method, path, headers={"Authorization": f"{scheme} {ADMIN_TOKEN}"}
        )
        assert response.status_code == 200, response.text


async def test_a_trailing_slash_is_not_redirected_before_auth(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/endpoints/")
    assert response.status_code == 404  # no 307 to the real route for an anonymous caller
    assert "location" not in response.headers


def test_a_short_admin_token_is_warned_about_without_showing_it(
    store: SQLiteStore, caplog: pytest.LogCaptureFixture
) -> None:
    for token, warned in (("short-tok", True), (ADMIN_TOKEN, False)):
        caplog.clear()
        create_app(
            store=store,
            settings=settings_for(admin_token=token),
            metrics=Metrics(lambda: NOW),
            readiness=dict,
            feed_state=lambda: "subscribed",
            in_flight=lambda: 0,
        )
        events = [getattr(r, "event", None) for r in caplog.records]
        assert ("admin.weak_token" in events) is warned
        assert token not in caplog.text


def test_the_token_is_compared_in_constant_time() -> None:
    source = inspect.getsource(relay.admin)
    assert "hmac.compare_digest(" in source
    assert not re.search(r"(==|!=)\s*token\b|\btoken\s*(==|!=)", source)


# -- /api/status and /api/endpoints ---------------------------------------------------------


async def test_status(client: httpx.AsyncClient, harness: Harness) -> None:
    harness.checks = {"feed": True, "store": False}
    body = (await client.get("/api/status", headers=AUTH)).json()
    assert body["feed_state"] == "subscribed"
    assert body["ready"] == {"feed": True, "store": False}
    assert body["in_flight"] == 3
    assert body["version"] == relay.__version__
    assert body["feed_last_message_age_s"] is None  # nothing received yet
    assert (body["feed_reconnects"], body["last_reconcile_at"]) == (0, None)
    assert body["replica"].rpartition(":")[2] == str(os.getpid())


async def test_status_shows_the_feed_age_reconnects_and_last_reconciliation(
    client: httpx.AsyncClient, harness: Harness
) -> None:
    harness.metrics.frame_received()  # at NOW; the metrics' clock stays there
    harness.metrics.feed_reconnects.inc(2)
    harness.metrics.reconcile_last_success.set(NOW - 60)
    body = (await client.get("/api/status", headers=AUTH)).json()
    assert body["feed_last_message_age_s"] == 0.0
    assert body["feed_reconnects"] == 2
    assert body["last_reconcile_at"] == service.iso(NOW - 60)


async def test_history_serves_per_second_series_of_the_last_hour(
    client: httpx.AsyncClient, harness: Harness
) -> None:
    history = (await client.get("/api/history?seconds=5", headers=AUTH)).json()
    assert history["step_s"] == 1 and history["end"] - history["start"] == 4
    assert history["feed_messages"] == [0] * 5
    assert (await client.get("/api/history?seconds=0", headers=AUTH)).status_code == 422
    assert (await client.get("/api/history?seconds=3601", headers=AUTH)).status_code == 422
    assert (await client.get("/api/history")).status_code == 401


async def test_endpoints_masks_urls_and_lists_removed_endpoints_with_work(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get("/api/endpoints", headers=AUTH)

    assert response.status_code == 200
    assert PASSWORD not in response.text and QUERY_SECRET not in response.text
    by_name = {e["name"]: e for e in response.json()}
    assert list(by_name) == ["crm", "old"]
    crm, old = by_name["crm"], by_name["old"]
    assert crm["configured"] is True
    assert crm["url"].startswith("https://") and "crm.example/hook" in crm["url"]
    assert (crm["pending"], crm["delivered"], crm["dead"]) == (1, 2, 2)
    assert crm["signed"] is True and crm["user_token"] == "strip"
    assert crm["last_error"] is not None and crm["last_failure_at"] is not None
    assert old["configured"] is False and old["url"] is None
    assert (old["pending"], old["delivered"], old["dead"]) == (5, 0, 0)


# -- /api/deliveries ------------------------------------------------------------------------


async def list_ids(client: httpx.AsyncClient, **params: Any) -> list[str]:
    response = await client.get("/api/deliveries", params=params, headers=AUTH)
    assert response.status_code == 200, response.text
    return [item["id"] for item in response.json()["items"]]


async def test_deliveries_filters(client: httpx.AsyncClient, seeded: Seeded) -> None:
    ids = seeded.ids
    everything = await list_ids(client)
    assert len(everything) == 10
    numbers = [int(i.removeprefix("dlv_")) for i in everything]
    assert numbers == sorted(numbers, reverse=True)  # newest first

    assert set(await list_ids(client, state="dead")) == {ids["crm:b1"], ids["crm:c1"]}
    assert set(await list_ids(client, state="delivered")) == {ids["crm:a1"], ids["crm:d1"]}
    assert len(await list_ids(client, state="pending")) == 6
    assert await list_ids(client, state="superseded") == []
    assert set(await list_ids(client, endpoint="old")) == {i for k, i in ids.items() if "old" in k}
    assert set(await list_ids(client, user_id=USER_A)) == {
        ids["crm:a1"],
        ids["crm:a2"],
        ids["old:a1"],
        ids["old:a2"],
    }
    assert await list_ids(client, user_id=USER_A, endpoint="crm", state="pending") == [
        ids["crm:a2"]
    ]
    assert await list_ids(client, endpoint="nowhere") == []


async def test_deliveries_filter_by_event_id(client: httpx.AsyncClient, seeded: Seeded) -> None:
    detail = (await client.get(f"/api/deliveries/{seeded.ids['crm:b1']}", headers=AUTH)).json()
    found = await list_ids(client, event_id=detail["event_id"])
    assert set(found) == {seeded.ids["crm:b1"], seeded.ids["old:b1"]}
    assert await list_ids(client, event_id="evt_" + "0" * 64) == []


async def test_retry_makes_waiting_retries_due_now(
    client: httpx.AsyncClient, seeded: Seeded, harness: Harness
) -> None:
    [claim] = await seeded.store.claim("crm", NOW + 3, 10)  # a2, now that a1 is delivered
    failed = Attempt(NOW + 4, 503, 0.01)
    await seeded.store.record([Outcome(claim.delivery_id, "pending", NOW + 9999, failed)], NOW + 4)

    none = await client.post(f"/api/deliveries/retry?user_id={USER_B}", headers=AUTH)
    assert none.json() == {"retried": 0}
    response = await client.post("/api/deliveries/retry?endpoint=crm", headers=AUTH)

    assert response.status_code == 200
    assert response.json() == {"retried": 1}
    assert harness.replays == 2
    [again] = await seeded.store.claim("crm", NOW + 100, 10)
    assert (again.delivery_id, again.attempts) == (claim.delivery_id, 1)


async def test_deliveries_show_what_the_cli_shows(
    client: httpx.AsyncClient, seeded: Seeded
) -> None:
    page = (await client.get("/api/deliveries?state=dead&user_id=" + USER_B, headers=AUTH)).json()
    [item] = page["items"]
    assert item["id"] == seeded.ids["crm:b1"]
    assert (item["endpoint"], item["state"], item["attempts"]) == ("crm", "dead", 1)
    assert (item["last_status"], item["source"], item["status"]) == (410, "feed", "PENDING")
    assert item["event_id"].startswith("evt_")
    assert page["next_cursor"] is None


async def test_deliveries_paging_visits_each_delivery_once(client: httpx.AsyncClient) -> None:
    everything = await list_ids(client, limit=500)
    seen: list[str] = []
    cursor: str | None = None
    for _ in range(10):
        params: dict[str, Any] = {"limit": 3}
        if cursor:
            params["before"] = cursor
        page = (await client.get("/api/deliveries", params=params, headers=AUTH)).json()
        assert len(page["items"]) <= 3
        seen += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
        assert cursor == seen[-1]
    assert seen == everything
    # Paging composes with filters.
    assert (
        await list_ids(client, endpoint="old", limit=2, before=everything[0])
        == [i for i in everything[1:] if i in await list_ids(client, endpoint="old")][:2]
    )


@pytest.mark.parametrize(
    "query",
    [
        "state=bogus",
        "state=DEAD",
        "state=waiting",
        "limit=0",
        "limit=-1",
        "limit=501",
        "limit=ten",
        "limit=2.5",
    ],
)
async def test_deliveries_refuses_bad_parameters_with_422(
    client: httpx.AsyncClient, query: str
) -> None:
    response = await client.get(f"/api/deliveries?{query}", headers=AUTH)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and detail.startswith("query."), detail  # as documented


async def test_a_cursor_that_matches_the_documented_pattern_is_accepted(
    client: httpx.AsyncClient,
) -> None:
    document = (await client.get("/api/openapi.json")).json()
    (before,) = [
        p
        for p in document["paths"]["/api/deliveries"]["get"]["parameters"]
        if p["name"] == "before"
    ]
    pattern = next(s["pattern"] for s in before["schema"]["anyOf"] if "pattern" in s)
    for cursor in ("dlv_1", "dlv_000", "dlv_" + "9" * 18):
        assert re.fullmatch(pattern, cursor)
        response = await client.get(f"/api/deliveries?before={cursor}", headers=AUTH)
        assert response.status_code == 200, (cursor, response.text)
    assert not re.search(pattern, "dlv_" + "9" * 19)  # beyond the stores' 64-bit keys


async def test_deliveries_refuses_a_malformed_cursor_with_422(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/deliveries?before=not-a-cursor", headers=AUTH)
    assert response.status_code == 422


async def test_delivery_detail_has_attempts_and_no_plaintext_token(
    client: httpx.AsyncClient, seeded: Seeded
) -> None:
    dead = (await client.get(f"/api/deliveries/{seeded.ids['crm:b1']}", headers=AUTH)).json()
    assert dead["state"] == "dead" and dead["user_id"] == USER_B
    [attempt] = dead["attempt_log"]
    assert attempt["status"] == 410
    assert attempt["response_excerpt"] == "gone for good"
    assert attempt["latency_ms"] == 42.0
    assert json.loads(dead["body"])["payload"]["user_id"] == USER_B

    response = await client.get(f"/api/deliveries/{seeded.ids['crm:c1']}", headers=AUTH)
    assert response.status_code == 200
    assert TOKEN not in response.text
    payload = json.loads(response.json()["body"])["payload"]
    assert payload["user_token"] == "[sealed]"
    assert response.json()["attempt_log"][0]["status"] == 400

    pending = (await client.get(f"/api/deliveries/{seeded.ids['old:a1']}", headers=AUTH)).json()
    assert pending["state"] == "pending" and pending["attempt_log"] == []


@pytest.mark.parametrize(
    "delivery_id",
    [
        "dlv_999999",
        "dlv_0",
        "xyz",
        "dlv_",
        "dlv_-1",
        "dlv_1x",
        "dlv_1.0",
        "1",
        "evt_1",
        "dlv_%20",
        "dlv_²",  # str.isdigit() is true for it, int() refuses it
        "dlv_１",  # a full-width 1: not an alias of dlv_1
        "dlv_9223372036854775807",  # the largest key a store holds: unknown, not an error
        "dlv_9223372036854775808",  # one more than a 64-bit key
        "dlv_99999999999999999999",
        "dlv_" + "9" * 5000,  # beyond what int() parses
    ],
)
async def test_unknown_or_malformed_delivery_ids_answer_404(
    client: httpx.AsyncClient, delivery_id: str
) -> None:
    response = await client.get(f"/api/deliveries/{delivery_id}", headers=AUTH)
    assert response.status_code == 404, response.text
    replay = await client.post(f"/api/deliveries/{delivery_id}/replay", headers=AUTH)
    assert replay.status_code == 404, replay.text


# -- replay ---------------------------------------------------------------------------------


async def test_replay_one_requeues_a_dead_delivery(
    client: httpx.AsyncClient, seeded: Seeded, harness: Harness
) -> None:
    delivery_id = seeded.ids["crm:b1"]
    before = (await client.get(f"/api/deliveries/{delivery_id}", headers=AUTH)).json()
    response = await client.post(f"/api/deliveries/{delivery_id}/replay", headers=AUTH)

    assert response.status_code == 200
    assert response.json() == {"replayed": 1}
    assert harness.replays == 1
    after = (await client.get(f"/api/deliveries/{delivery_id}", headers=AUTH)).json()
    assert after["state"] == "pending"
    assert after["event_id"] == before["event_id"]  # the same webhook-id goes out again
    assert len(after["attempt_log"]) == 1  # the dead attempt stays on record
    assert set(await list_ids(client, state="dead")) == {seeded.ids["crm:c1"]}

    missing = await client.post("/api/deliveries/dlv_999999/replay", headers=AUTH)
    assert missing.status_code == 404


async def test_bulk_replay_requeues_dead_deliveries_matching_the_filters(
    client: httpx.AsyncClient, seeded: Seeded, harness: Harness
) -> None:
    nothing = await client.post("/api/deliveries/replay?endpoint=old", headers=AUTH)
    assert nothing.json() == {"replayed": 0}
    one = await client.post(f"/api/deliveries/replay?state=dead&user_id={USER_C}", headers=AUTH)
    assert one.json() == {"replayed": 1}
    assert set(await list_ids(client, state="dead")) == {seeded.ids["crm:b1"]}

    rest = await client.post("/api/deliveries/replay?state=dead&endpoint=crm", headers=AUTH)
    assert rest.status_code == 200 and rest.json() == {"replayed": 1}
    assert await list_ids(client, state="dead") == []
    assert {seeded.ids["crm:b1"], seeded.ids["crm:c1"]} <= set(
        await list_ids(client, state="pending", endpoint="crm")
    )
    assert harness.replays == 3


@pytest.mark.parametrize("query", ["state=pending", "state=bogus", "state="])
async def test_bulk_replay_refuses_bad_parameters_with_422(
    client: httpx.AsyncClient, query: str
) -> None:
    response = await client.post(f"/api/deliveries/replay?{query}", headers=AUTH)
    assert response.status_code == 422, response.text


# -- OpenAPI --------------------------------------------------------------------------------


async def api_operations(client: httpx.AsyncClient) -> list[tuple[str, str, dict[str, Any]]]:
    response = await client.get("/api/openapi.json")
    assert response.status_code == 200
    spec = response.json()
    operations = [
        (method.upper(), path, operation)
        for path, item in spec["paths"].items()
        for method, operation in item.items()
        if path.startswith("/api/")
    ]
    documented = {
        (m, p.replace("{name}", "crm").replace("{delivery_id}", "dlv_1")) for m, p, _ in operations
    }
    assert documented == set(API_ROUTES)
    return operations


async def test_openapi_documents_200_404_and_422(client: httpx.AsyncClient) -> None:
    for method, path, operation in await api_operations(client):
        codes = set(operation["responses"])
        where = f"{method} {path}: {sorted(codes)}"
        assert "200" in codes, where
        if "{" in path:
            assert "404" in codes, where
        if operation.get("parameters"):
            assert "422" in codes, where


async def test_openapi_documents_401_and_403_on_every_api_route(
    client: httpx.AsyncClient,
) -> None:
    for method, path, operation in await api_operations(client):
        codes = set(operation["responses"])
        assert {"401", "403"} <= codes, f"{method} {path}: {sorted(codes)}"


# -- path tricks, through real uvicorn ------------------------------------------------------


async def raw_request(port: int, method: str, target: str, headers: str = "") -> tuple[int, str]:
    """One HTTP/1.1 request with ``target`` sent byte for byte; (status, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            f"{method} {target} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n"
            f"Content-Length: 0\r\n{headers}\r\n".encode()
        )
        await writer.drain()
        async with asyncio.timeout(5):
            data = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = data.decode("utf-8", "replace").partition("\r\n\r\n")
    return int(head.split()[1]), body


TRICKY_PATHS = (
    "/api/../api/endpoints",
    "/api/./endpoints",
    "/api//endpoints",
    "//api/endpoints",
    "/api/endpoints/",
    "/api/endpoints//",
    "/healthz/../api/endpoints",
    "/metrics/../api/endpoints",
    "/api/%2e%2e/api/endpoints",
    "/api/%2E%2E/api/endpoints",
    "/api%2fendpoints",
    "/api%2Fendpoints",
    "%2Fapi%2Fendpoints",
    "/%61pi/endpoints",
    "/api/endpoints%2f",
    "/api/endpoints%00",
    "/api/endpoints;x=1",
    "/api/endpoints?x=/healthz",
    "/API/endpoints",
    "/api/deliveries%2fdlv_1",
    "/api/deliveries/dlv_1%2f",
    "http://admin/api/endpoints",
)


async def test_path_tricks_never_bypass_auth(seeded: Seeded, harness: Harness) -> None:
    app = create_app(
        store=seeded.store,
        settings=settings_for(),
        metrics=harness.metrics,
        readiness=lambda: dict(harness.checks),
        feed_state=lambda: "subscribed",
    )
    server = AdminServer(app, "127.0.0.1", 0)
    await server.start()
    serving = asyncio.create_task(server.serve())
    try:
        port = server.port
        authorized = f"Authorization: {AUTH['Authorization']}\r\n"
        assert (await raw_request(port, "GET", "/api/endpoints", authorized))[0] == 200
        for target in TRICKY_PATHS:
            status, body = await raw_request(port, "GET", target)
            assert not 200 <= status < 300, (target, status, body)
            assert "crm.example" not in body and '"pending"' not in body, (target, body)
            assert USER_A not in body, (target, body)
        for target in ("/api/deliveries/dlv_2%2freplay", "/api/deliveries%2Freplay"):
            status, body = await raw_request(port, "POST", target)
            assert not 200 <= status < 300, (target, status, body)
        assert len(await seeded.store.list_deliveries(state="dead")) == 2
    finally:
        await server.stop()
        await serving


# -- the whole port of a running relay ------------------------------------------------------


async def test_a_running_relay_serves_the_whole_admin_port(
    sim: Simulator,
    receiver: Receiver,
    relay_env: EnvBuilder,
    run_relay: Any,
    eventually: Any,
) -> None:
    url = receiver.url.replace("://", f"://relay:{PASSWORD}@") + "/webhooks/sfox"
    env = relay_env(RELAY_ENDPOINTS=json.dumps([{"url": url}]), RELAY_ADMIN_TOKEN=ADMIN_TOKEN)
    async with run_relay(env) as running:
        base = f"http://127.0.0.1:{running.admin.port}"
        async with httpx.AsyncClient(base_url=base, trust_env=False, timeout=5) as http:
            await receiver.wait_for(40, timeout=15)
            assert (await http.get("/healthz")).status_code == 200

            async def ready() -> bool:
                return (await http.get("/readyz")).status_code == 200

            await eventually(ready, 10)
            name = f"127.0.0.1:{receiver.port}-webhooks-sfox"

            async def all_delivered() -> Any:
                found = (await http.get("/api/endpoints", headers=AUTH)).json()
                return found if found[0]["delivered"] == 40 else None

            [endpoint] = await eventually(all_delivered, 10)
            assert endpoint["name"] == name and endpoint["configured"] is True
            assert PASSWORD not in json.dumps(endpoint)

            async def metrics_settled() -> str | None:
                text = (await http.get("/metrics")).text
                success = f'relay_deliveries_total{{endpoint="{name}",outcome="success"}} 40.0'
                return text if success in text and "relay_outbox_pending{" in text else None

            text = await eventually(metrics_settled, 10)
            families = metric_families(text)
            assert [n for n in CONTRACT_METRICS if n not in families] == []
            assert "relay_feed_connected 1.0" in text
            assert f'relay_outbox_dead{{endpoint="{name}"}} 0.0' in text
            assert 'relay_feed_state{state="subscribed"} 1.0' in text
            assert PASSWORD not in text
            for value in set(re.findall(r'endpoint="([^"]*)"', text)):
                assert value == name  # a name, never a URL with credentials
            assert "://" not in "".join(re.findall(r"\{[^}]*\}", text))

            status = (await http.get("/api/status", headers=AUTH)).json()
            assert status["feed_state"] == "subscribed"
            page = (await http.get("/api/deliveries?limit=5", headers=AUTH)).json()
            assert len(page["items"]) == 5 and page["next_cursor"] == page["items"][-1]["id"]
            first = page["items"][0]["id"]
            detail = (await http.get(f"/api/deliveries/{first}", headers=AUTH)).json()
            assert detail["state"] == "delivered" and detail["attempt_log"][0]["status"] == 204
            assert (await http.get("/api/endpoints")).status_code == 401
            page_html = await http.get("/")
            assert page_html.status_code == 200 and "<title>sfox-relay</title>" in page_html.text
            assert page_html.headers["cache-control"] == "no-store"
