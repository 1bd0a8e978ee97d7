"""The example receivers (examples/receivers/) against relay-demo traffic, end to end.

The simulator and the relay run in this event loop; each example receiver runs as the
subprocess an operator would start. The relay delivers with the ``encrypt`` policy, so each
receiver verifies signatures, deduplicates, decrypts tokens and keeps the newest state per
user; the test then compares what it holds with what the simulator says each user is now.
"""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import new_key, new_whsec

from relay.simulator import Simulator

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "receivers"
NODE = shutil.which("node")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def node_ready() -> str | None:
    """Why the Node example cannot run here, or None (node_modules installed if missing)."""
    if NODE is None:
        return "node is not installed (.ci/run installs it)"
    if not (EXAMPLES / "node" / "node_modules" / "express").is_dir():
        npm = shutil.which("npm")
        if npm is None:
            return "npm is not installed (.ci/run installs it)"
        done = subprocess.run(  # noqa: S603 - a fixed command line
            [npm, "install", "--no-audit", "--no-fund"],
            cwd=EXAMPLES / "node",
            capture_output=True,
            timeout=300,
            check=False,
        )
        if done.returncode != 0:
            return f"npm install failed: {done.stderr.decode(errors='replace')[-300:]}"
    return None


def command(kind: str) -> list[str]:
    if kind == "python":
        return [sys.executable, str(EXAMPLES / "python" / "receiver.py")]
    assert NODE is not None
    return [NODE, str(EXAMPLES / "node" / "server.js")]


async def start_receiver(kind: str, env: Mapping[str, str]) -> tuple[Any, str]:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        *command(kind),
        env={**os.environ, **env, "PORT": str(port)},
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(trust_env=False, timeout=1) as http:
        for _ in range(300):
            if proc.returncode is not None:
                err = await proc.stderr.read() if proc.stderr else b""
                raise AssertionError(f"{kind} receiver exited: {err.decode(errors='replace')}")
            try:
                await http.get(url + "/users")
                return proc, url
            except httpx.TransportError:
                await asyncio.sleep(0.05)
    proc.kill()
    raise AssertionError(f"{kind} receiver did not start")


@pytest.fixture(params=["python", "node"])
async def example(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    if request.param == "node" and (why := node_ready()) is not None:
        pytest.skip(why)
    yield request.param


async def test_an_example_receiver_keeps_the_newest_state_of_every_user(
    example: str, sim: Simulator, relay_env: Any, run_relay: Any, eventually: Any
) -> None:
    secret, token_key = new_whsec(), new_key()
    proc, url = await start_receiver(example, {"WEBHOOK_SECRET": secret, "TOKEN_KEY": token_key})
    try:
        endpoint = {"url": url + "/webhooks/sfox", "user_token": "encrypt", "token_key": token_key}
        env = relay_env(
            RELAY_ENDPOINTS=json.dumps([endpoint]),
            RELAY_SIGNING_SECRET=secret,
            RELAY_TOKEN_KEY=new_key(),
        )
        async with (
            run_relay(env) as relay,
            httpx.AsyncClient(trust_env=False, timeout=5) as http,
        ):

            async def all_in() -> dict[str, Any] | None:
                held = (await http.get(url + "/users")).json()
                return held if held["deliveries"] == len(sim.sent) == 40 else None

            held = await eventually(all_in, 15)
            # A replayed delivery is a duplicate to the receiver: counted once, state kept.
            [first] = await relay.store.list_deliveries(limit=1)
            number = int(first.id.removeprefix("dlv_"))
            assert await relay.store.replay(ids=[number], now=relay.clock()) == 1
            relay.dispatcher.wake()

            async def replayed() -> bool:
                found = await relay.store.get_delivery(number)
                return found is not None and found.info.state == "delivered"

            await eventually(replayed, 10)
            again = (await http.get(url + "/users")).json()
        assert again == held

        expected = sim.users
        assert set(held["users"]) == set(expected)
        newest: dict[str, dict[str, Any]] = {}
        for message in sim.sent:
            newest[message["payload"]["user_id"]] = message  # the simulator sends in order
        for user_id, state in held["users"].items():
            assert state["status"] == expected[user_id]["status"]
            assert state["requirements"] == expected[user_id]["requirements"]
            assert str(state["sfox_timestamp"]) == str(newest[user_id]["timestamp"])
            assert state["token"] == newest[user_id]["payload"]["user_token"]["token"]
    finally:
        proc.terminate()
        await proc.wait()


def test_the_python_example_verifies_a_backlog_without_a_timestamp_tolerance(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A 6-hour-old delivery (a backlog after an outage) verifies with the README's check,
    which the example uses; standardwebhooks' own verify refuses anything over 5 minutes."""
    from standardwebhooks import Webhook
    from standardwebhooks.webhooks import WebhookVerificationError

    from relay.signing import sign

    secret = new_whsec()
    key = base64.b64decode(secret.removeprefix("whsec_"))
    old = int(time.time()) - 6 * 3600
    body = b'{"payload":{}}'
    headers = {
        "webhook-id": "evt_1",
        "webhook-timestamp": str(old),
        "webhook-signature": sign((key,), "evt_1", old, body),
    }
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body, headers)
    monkeypatch.setenv("WEBHOOK_SECRET", f"{new_whsec()} {secret}")  # during a rotation
    monkeypatch.delenv("TOKEN_KEY", raising=False)
    spec = importlib.util.spec_from_file_location("receiver", EXAMPLES / "python" / "receiver.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.verified(headers, body)
    assert not module.verified({**headers, "webhook-timestamp": str(old + 1)}, body)
    assert not module.verified(headers, body + b" ")
