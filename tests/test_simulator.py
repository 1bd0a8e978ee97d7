"""The sFOX simulator, spoken to by plain WebSocket and HTTP clients over loopback."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from conftest import eventually
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosedError

from relay.__main__ import simulate_arguments
from relay.events import USERS_FEED, BadFrame, Message, parse_frame
from relay.simulator import (
    FAKE_TOKEN,
    Faults,
    Simulator,
    max_per_window,
    run_from_args,
)

KEY = "sim-test-key"
AUTH = {"type": "authenticate", "apiKey": KEY, "enterprise": "true"}
SUBSCRIBE = {"type": "subscribe", "feeds": [USERS_FEED]}
PAYLOAD_KEYS = [
    "user_id",
    "first_name",
    "last_name",
    "email",
    "phone_number",
    "account_role",
    "account_type",
    "status",
    "user_token",
    "requirements",
]
EXPIRES = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
USER_ID = re.compile(
    r"^client_[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$"
)


@asynccontextmanager
async def simulator(**kwargs: Any) -> AsyncIterator[Simulator]:
    kwargs.setdefault("api_key", KEY)
    async with Simulator(**kwargs) as sim:
        yield sim


async def request(ws: ClientConnection, frame: dict[str, Any]) -> dict[str, Any]:
    await ws.send(json.dumps(frame))
    reply = json.loads(await asyncio.wait_for(ws.recv(), 2))
    assert isinstance(reply, dict)
    return reply


@asynccontextmanager
async def subscribed(sim: Simulator) -> AsyncIterator[ClientConnection]:
    async with connect(sim.ws_url, compression=None, close_timeout=0.5) as ws:
        assert (await request(ws, AUTH))["type"] == "success"
        assert (await request(ws, SUBSCRIBE))["type"] == "success"
        yield ws


async def receive(ws: ClientConnection, n: int, timeout: float = 5.0) -> list[dict[str, Any]]:
    out = []
    async with asyncio.timeout(timeout):
        for _ in range(n):
            out.append(json.loads(await ws.recv()))
    return out


# -- protocol ---------------------------------------------------------------------------


async def test_authenticate_and_subscribe_replies() -> None:
    async with simulator(count=0) as sim, connect(sim.ws_url) as ws:
        reply = await request(ws, AUTH)
        assert reply["type"] == "success"
        assert reply["payload"] == {"action": "authenticate"}
        assert reply["action"] == "authenticate"
        assert isinstance(reply["sequence"], int)
        assert len(str(reply["timestamp"])) == 19
        reply = await request(ws, SUBSCRIBE)
        assert reply["type"] == "success"
        assert reply["action"] == "subscribe"
        assert reply["payload"] == {"action": "subscribe", "feeds": [USERS_FEED]}
        await sim.wait_subscribed(1)
        reply = await request(ws, {"type": "unsubscribe", "feeds": [USERS_FEED]})
        assert reply["payload"] == {"action": "unsubscribe", "feeds": [USERS_FEED]}
        assert sim.subscribed == 0
    assert sim.auth_attempts == 1
    assert sim.subscribes == 1
    assert sim.connections == 1


async def test_boolean_enterprise_flag_is_accepted() -> None:
    async with simulator(count=0) as sim, connect(sim.ws_url) as ws:
        assert (await request(ws, {**AUTH, "enterprise": True}))["type"] == "success"
        assert (await request(ws, SUBSCRIBE))["type"] == "success"


async def test_wrong_key_and_requests_before_auth_get_error_replies() -> None:
    async with simulator(count=0) as sim, connect(sim.ws_url) as ws:
        reply = await request(ws, SUBSCRIBE)
        assert reply["type"] == "error"
        assert reply["payload"]["action"] == "subscribe"
        reply = await request(ws, {**AUTH, "apiKey": "wrong"})
        assert reply["type"] == "error"
        assert reply["payload"]["action"] == "authenticate"
        assert len(str(reply["timestamp"])) == 19
        assert "action" not in reply  # only success replies carry the top-level action
        assert (await request(ws, SUBSCRIBE))["type"] == "error"
        assert (await request(ws, {"type": "dance"}))["type"] == "error"
        await ws.send("not json")
        assert json.loads(await ws.recv())["type"] == "error"
    assert sim.subscribed == 0
    assert sim.auth_attempts == 1


async def test_subscribe_needs_known_feeds_and_enterprise_auth() -> None:
    async with simulator(count=0) as sim, connect(sim.ws_url) as ws:
        assert (await request(ws, {**AUTH, "enterprise": "false"}))["type"] == "success"
        assert (await request(ws, SUBSCRIBE))["type"] == "error"
        assert (await request(ws, AUTH))["type"] == "success"
        assert (await request(ws, {"type": "subscribe", "feeds": ["nope"]}))["type"] == "error"
        assert (await request(ws, {"type": "subscribe", "feeds": []}))["type"] == "error"
        assert (await request(ws, SUBSCRIBE))["type"] == "success"


async def test_no_data_before_subscribe() -> None:
    async with simulator(count=5, faults=Faults(lose_while_disconnected=True)) as sim:
        async with connect(sim.ws_url) as ws:
            await request(ws, AUTH)
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(ws.recv(), 0.2)
        assert sim.finished.is_set()
        assert sim.sent == []  # generated with nobody subscribed: lost


async def test_data_messages_have_the_documented_shape() -> None:
    async with simulator(count=300, users=20, seed=3) as sim, subscribed(sim) as ws:
        messages = await receive(ws, 300)
    before = time.time_ns()
    assert [m["sequence"] for m in messages] == list(range(1, 301))
    for message in messages:
        assert list(message) == ["sequence", "recipient", "timestamp", "payload"]
        assert message["recipient"] == USERS_FEED
        ts = message["timestamp"]
        assert isinstance(ts, int) and len(str(ts)) == 19
        assert before - 60 * 10**9 < ts <= before
        payload = message["payload"]
        assert list(payload) == PAYLOAD_KEYS
        assert USER_ID.match(payload["user_id"])
        assert payload["account_role"] in ("Client", "Advisor")
        assert payload["account_type"] in ("individual", "corporation")
        token = payload["user_token"]
        assert list(token) == ["token", "expires", "partner_user_id"]
        assert re.fullmatch(r"[0-9a-f]{64}", token["token"])
        assert EXPIRES.match(token["expires"])
        assert token["partner_user_id"] == payload["user_id"]
        assert set(payload["requirements"]) == {"sms", "email"}
        assert isinstance(parse_frame(json.dumps(message)), Message)
    assert messages == sim.sent
    assert len({m["payload"]["user_token"]["token"] for m in messages}) == 300


async def test_users_go_from_pending_to_verified() -> None:
    async with simulator(count=600, users=30, seed=1) as sim, subscribed(sim) as ws:
        messages = await receive(ws, 600)
    by_user: dict[str, list[dict[str, Any]]] = {}
    for m in messages:
        by_user.setdefault(m["payload"]["user_id"], []).append(m["payload"])
    finished = 0
    final_statuses = set()
    for states in by_user.values():
        assert states[0]["status"] == "PENDING"
        assert states[0]["requirements"] == {"sms": True, "email": True}
        if states[-1]["status"] != "PENDING":
            finished += 1
            final_statuses.add(states[-1]["status"])
            assert states[-1]["requirements"] == {"sms": False, "email": False}
            assert all(s["status"] == "PENDING" for s in states[:-1])
    assert finished > 100
    assert final_statuses == {"VERIFIED", "UNSUPPORTED"}
    verified = sum(1 for s in by_user.values() if s[-1]["status"] == "VERIFIED")
    unsupported = sum(1 for s in by_user.values() if s[-1]["status"] == "UNSUPPORTED")
    assert unsupported < verified / 3
    # ~30 users in play at once: the first 30 messages can't name more than 30 users.
    assert len({m["payload"]["user_id"] for m in messages[:100]}) <= 30 + 100 // 2


async def test_same_seed_same_users() -> None:
    seen = []
    for _ in range(2):
        async with simulator(count=20, seed=7) as sim, subscribed(sim) as ws:
            messages = await receive(ws, 20)
            seen.append([(m["payload"]["user_id"], m["payload"]["status"]) for m in messages])
    assert seen[0] == seen[1]


async def test_broadcast_to_two_clients() -> None:
    async with simulator(count=200) as sim:
        sim.pause()
        async with subscribed(sim) as one, subscribed(sim) as two:
            await sim.wait_subscribed(2)
            sim.resume()
            first, second = await asyncio.gather(receive(one, 200), receive(two, 200))
    assert first == second
    assert first == sim.sent


async def test_rate_limits_the_generator() -> None:
    async with simulator(rate=200) as sim, subscribed(sim) as ws:
        start = time.monotonic()
        await receive(ws, 40)
        elapsed = time.monotonic() - start
    assert elapsed > 0.12


async def test_generator_waits_while_nobody_is_subscribed() -> None:
    async with simulator(rate=500) as sim:
        async with subscribed(sim) as ws:
            await receive(ws, 10)
        await eventually(lambda: sim.subscribed == 0)
        generated = sim.generated
        await asyncio.sleep(0.2)
        assert sim.generated - generated <= 2  # at most what was already due
        async with subscribed(sim) as ws:
            messages = await receive(ws, 5)
        assert messages[0]["sequence"] <= generated + 3


async def test_lose_while_disconnected() -> None:
    async with simulator(rate=500, faults=Faults(lose_while_disconnected=True)) as sim:
        async with subscribed(sim) as ws:
            first = await receive(ws, 10)
        await eventually(lambda: sim.subscribed == 0)
        await eventually(lambda: sim.generated > first[-1]["sequence"] + 50)
        async with subscribed(sim) as ws:
            later = await receive(ws, 5)
        assert later[0]["sequence"] > first[-1]["sequence"] + 50  # a gap: those were lost
        sent = {m["sequence"] for m in sim.sent}
        assert not sent & set(range(first[-1]["sequence"] + 2, later[0]["sequence"] - 5))
        # ... but the REST state moved on with them.
        user_ids = {m["payload"]["user_id"] for m in sim.sent}
        assert set(sim.users) - user_ids


async def test_count_then_idle_and_finished() -> None:
    async with simulator(count=25) as sim, subscribed(sim) as ws:
        await receive(ws, 25)
        await asyncio.wait_for(sim.finished.wait(), 2)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(ws.recv(), 0.1)
        await ws.ping()  # still open


async def test_publish_sends_the_exact_message() -> None:
    message = {
        "sequence": 7,
        "recipient": USERS_FEED,
        "timestamp": 1717005327995988841,
        "payload": {"user_id": "client_x", "status": "PENDING", "extra": [1, 2]},
        "unknown": True,
    }
    async with simulator(count=0) as sim, subscribed(sim) as ws:
        await sim.publish(message)
        raw = await asyncio.wait_for(ws.recv(), 2)
    assert raw == json.dumps(message, separators=(",", ":"))
    assert sim.sent == [message]
    assert sim.users["client_x"]["advisor_user_id"] is None


async def test_wait_subscribed_times_out() -> None:
    async with simulator(count=0) as sim:
        with pytest.raises(TimeoutError):
            await sim.wait_subscribed(1, timeout=0.05)


# -- faults -----------------------------------------------------------------------------


async def test_drop_every_aborts_without_close_frame() -> None:
    async with simulator(faults=Faults(drop_every=7)) as sim, subscribed(sim) as ws:
        await receive(ws, 7)
        with pytest.raises(ConnectionClosedError) as info:
            await asyncio.wait_for(ws.recv(), 2)
        assert info.value.rcvd is None  # no close frame: the TCP connection just went away


async def test_bad_every_cycles_through_garbage() -> None:
    async with simulator(count=18, faults=Faults(bad_every=3)) as sim, subscribed(sim) as ws:
        frames: list[str | bytes] = []
        async with asyncio.timeout(5):
            while len(frames) < 24:
                frames.append(await ws.recv())
    kinds = [parse_frame(f) for f in frames]
    bad = [k for k in kinds if isinstance(k, BadFrame)]
    assert len(bad) == 6
    assert all(isinstance(k, BadFrame) for k in kinds[3::4])
    reasons = [b.reason for b in bad]
    assert reasons[0].startswith("not JSON")
    assert reasons[1].startswith("not a JSON object")
    assert "payload" in reasons[2]
    assert "not an integer" in reasons[3]
    assert reasons[4].startswith("not JSON") and "Recursion" in reasons[4]
    assert "user_id" in reasons[5]
    assert FAKE_TOKEN in frames[23]
    assert FAKE_TOKEN not in bad[5].text
    assert len(sim.sent) == 18


async def test_reject_auth_then_accept() -> None:
    async with simulator(count=0, faults=Faults(reject_auth=2)) as sim, connect(sim.ws_url) as ws:
        assert (await request(ws, AUTH))["type"] == "error"
        assert (await request(ws, AUTH))["type"] == "error"
        assert (await request(ws, AUTH))["type"] == "success"
    assert sim.auth_attempts == 3


async def test_handshake_delay() -> None:
    async with (
        simulator(count=0, faults=Faults(handshake_delay=0.15)) as sim,
        connect(sim.ws_url) as ws,
    ):
        start = time.monotonic()
        await request(ws, AUTH)
        await request(ws, SUBSCRIBE)
        assert time.monotonic() - start >= 0.3


async def test_stall_stops_data_and_pongs() -> None:
    async with simulator(rate=200, faults=Faults(stall_after=4)) as sim, subscribed(sim) as ws:
        await receive(ws, 4)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(ws.recv(), 0.2)
        pong = await ws.ping()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(pong, 0.2)
        assert sim.subscribed == 0


async def test_faults_can_change_while_running() -> None:
    async with simulator(rate=400) as sim, subscribed(sim) as ws:
        await receive(ws, 3)
        sim.faults.drop_every = 1
        with pytest.raises(ConnectionClosedError):
            await receive(ws, 50)


# -- REST -------------------------------------------------------------------------------


async def test_rest_users_route() -> None:
    async with simulator(count=200, users=20) as sim:
        async with subscribed(sim) as ws:
            await receive(ws, 200)
        headers = {"Authorization": f"Bearer {KEY}"}
        async with httpx.AsyncClient(base_url=sim.api_url) as http:
            assert (await http.get("/v1/enterprise/users")).status_code == 401
            wrong = {"Authorization": "Bearer nope"}
            assert (await http.get("/v1/enterprise/users", headers=wrong)).status_code == 401
            response = await http.get("/v1/enterprise/users", headers=headers)
            assert response.status_code == 200
            assert response.headers["content-type"] == "application/json"
            users = response.json()["data"]
            assert {u["user_id"] for u in users} == {m["payload"]["user_id"] for m in sim.sent}
            latest = {m["payload"]["user_id"]: m["payload"] for m in sim.sent}
            for user in users:
                assert "user_token" not in user
                assert user["advisor_user_id"] is None
                expected = {k: v for k, v in latest[user["user_id"]].items() if k != "user_token"}
                assert {k: v for k, v in user.items() if k != "advisor_user_id"} == expected
            clients = (
                await http.get("/v1/enterprise/users?accountRole=client", headers=headers)
            ).json()["data"]
            advisors = (
                await http.get(
                    "/v1/enterprise/users", params={"accountRole": "advisor"}, headers=headers
                )
            ).json()["data"]
            assert {u["account_role"] for u in clients} == {"Client"}
            assert {u["account_role"] for u in advisors} <= {"Advisor"}
            assert len(clients) + len(advisors) == len(users)
            bad_role = await http.get("/v1/enterprise/users?accountRole=x", headers=headers)
            assert bad_role.status_code == 400
            one = users[0]
            response = await http.get(f"/v1/enterprise/users/{one['user_id']}", headers=headers)
            assert response.json() == {"data": one}
            missing = await http.get("/v1/enterprise/users/client_nobody", headers=headers)
            assert missing.status_code == 404
            assert (await http.get("/v1/other", headers=headers)).status_code == 404
            assert (await http.get("/elsewhere")).status_code == 404
        assert sim.rest_calls == 9
        assert sim.users == {u["user_id"]: u for u in users}


async def test_rest_status_fault() -> None:
    async with simulator(count=0) as sim, httpx.AsyncClient(base_url=sim.api_url) as http:
        headers = {"Authorization": f"Bearer {KEY}"}
        sim.faults.rest_status = 429
        response = await http.get("/v1/enterprise/users", headers=headers)
        assert response.status_code == 429
        assert response.headers["retry-after"] == "60"
        sim.faults.rest_status = 503
        assert (await http.get("/v1/enterprise/users", headers=headers)).status_code == 503
        sim.faults.rest_status = None
        assert (await http.get("/v1/enterprise/users", headers=headers)).json() == {"data": []}
        assert sim.rest_calls == 3


# -- audits and the CLI -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("times", "expected"),
    [([], 0), ([0.0], 1), ([0.0, 59.9], 2), ([0.0, 60.0], 1), ([0, 1, 2, 61, 62], 3)],
)
def test_max_per_window(times: list[float], expected: int) -> None:
    assert max_per_window(times) == expected


async def test_request_and_connection_audit_trail() -> None:
    async with simulator(count=0) as sim:
        for _ in range(3):
            async with subscribed(sim):
                pass
        await eventually(lambda: len(sim.request_times) == 6)
        assert sim.max_requests_per_minute() == 6
        assert sim.max_connections_per_minute() == 3


def test_cli_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RELAY_API_KEY", raising=False)
    monkeypatch.setenv("ENTERPRISE_API_KEY", "from-env")
    parser = argparse.ArgumentParser()
    simulate_arguments(parser)
    args = parser.parse_args([])
    assert (args.host, args.port, args.api_key) == ("127.0.0.1", 8765, "from-env")
    assert args.rate is None and args.count is None and not args.lose_while_disconnected
    args = parser.parse_args(
        ["--rate", "50", "--drop-every", "3", "--lose-while-disconnected", "--reject-auth", "1"]
    )
    assert (args.rate, args.drop_every, args.reject_auth) == (50.0, 3, 1)
    assert args.lose_while_disconnected


async def test_run_from_args_serves_until_cancelled() -> None:
    parser = argparse.ArgumentParser()
    simulate_arguments(parser)
    args = parser.parse_args(["--port", "0", "--api-key", KEY, "--count", "3"])
    task = asyncio.create_task(run_from_args(args))
    await asyncio.sleep(0.1)
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
