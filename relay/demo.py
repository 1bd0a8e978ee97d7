"""``relay demo``: the whole pipeline on one machine, no credentials.

The built-in sFOX simulator feeds a real ``relay run`` (same code, a temporary SQLite store),
which delivers to a local receiver that verifies every Standard Webhooks signature. The demo
prints what arrived, per user in order, and exits 0 only if everything checked out.

With ``--to URL`` (a broker, CONTRACT 4b) the relay publishes there instead, and the demo
consumes the messages back with the broker's own client and checks them the same way. The
demo declares its own queue or stream for that (and removes it afterwards); the relay itself
never declares anything.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import sys
import tempfile
import time
from collections import defaultdict
from typing import TextIO

from relay.app import Relay
from relay.config import load_settings
from relay.receiver import Received, Receiver
from relay.signing import SignatureError, decode_secret, verify
from relay.simulator import Simulator

__all__ = ["run_demo"]


def _short(user_id: str) -> str:
    return user_id if len(user_id) <= 24 else user_id[:21] + "..."


def _report(received: list[Received], expected: int, out: TextIO) -> bool:
    by_user: dict[str, list[Received]] = defaultdict(list)
    for item in received:
        by_user[item.json["payload"]["user_id"]].append(item)
    ordered = all(
        [r.json["timestamp"] for r in items] == sorted(r.json["timestamp"] for r in items)
        for items in by_user.values()
    )
    verified = sum(1 for r in received if r.verified)
    tokens = sum(1 for r in received if "user_token" in r.json["payload"])
    latencies = sorted((r.arrived_ns - r.json["timestamp"]) / 1e6 for r in received)
    print(f"{'USER':<25} {'STATUS TRAIL':<32} {'SIGNED':<7} {'SOURCE'}", file=out)
    for user_id, items in by_user.items():
        trail = " -> ".join(str(r.json["payload"].get("status")) for r in items)
        signed = "yes" if all(r.verified for r in items) else "NO"
        sources = ",".join(sorted({r.source or "?" for r in items}))
        print(f"{_short(user_id):<25} {trail:<32} {signed:<7} {sources}", file=out)
    print(file=out)
    p50 = latencies[len(latencies) // 2] if latencies else 0.0
    print(
        f"{expected} events sent by the simulator, {len(received)} deliveries received, "
        f"{verified} signatures verified, {len(by_user)} users, per-user order "
        f"{'kept' if ordered else 'BROKEN'}, {tokens} user tokens forwarded (policy: strip), "
        f"median latency {p50:.1f} ms",
        file=out,
    )
    return ordered and verified == len(received) and len(received) >= expected and tokens == 0


async def run_demo(
    *,
    events: int = 60,
    keep_running: bool = False,
    stop: asyncio.Event | None = None,
    out: TextIO = sys.stdout,
    timeout: float = 60.0,
    to: str | None = None,
) -> int:
    """Run the demo; 0 when every event arrived signed and in order.

    ``to`` is a broker URL to publish to (and read back from) instead of the local receiver.
    """
    if to is not None:
        return await _run_broker_demo(to, events=events, out=out, timeout=timeout)
    stop = stop or asyncio.Event()
    secret = "whsec_" + base64.b64encode(os.urandom(24)).decode()
    api_key = base64.b16encode(os.urandom(16)).decode()
    with tempfile.TemporaryDirectory(prefix="relay-demo-") as tmp:
        async with (
            Simulator(
                api_key=api_key,
                users=max(1, events // 2),
                count=None if keep_running else events,
                rate=5.0 if keep_running else 500.0,
            ) as sim,
            Receiver(keys=[decode_secret(secret)]) as receiver,
        ):
            settings = load_settings(
                {
                    "RELAY_API_KEY": api_key,
                    "RELAY_WS_URL": sim.ws_url,
                    "RELAY_API_URL": sim.api_url,
                    "RELAY_ENDPOINTS": receiver.url + "/webhooks/sfox",
                    "RELAY_SIGNING_SECRET": secret,
                    "RELAY_STORE": f"sqlite:///{tmp}/relay.db",
                    "RELAY_ADMIN_ADDR": "127.0.0.1:0",
                    "RELAY_RECONCILE_INTERVAL": "off",
                    "RELAY_LOG_LEVEL": "WARNING",
                    "RELAY_LOG_FORMAT": "console",
                },
                for_run=True,
            )
            relay = Relay(settings)
            task = asyncio.create_task(relay.run())
            print(
                f"simulator {sim.ws_url} -> relay (store {tmp}/relay.db) -> receiver "
                f"{receiver.url}/webhooks/sfox",
                file=out,
            )
            try:
                if keep_running:
                    await _follow(receiver, stop, task, out)
                else:
                    await _wait(receiver, events, stop, task, timeout)
            finally:
                relay.request_stop()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            ok = _report(receiver.received, 0 if keep_running else events, out)
    return 0 if ok else 1


async def _wait(
    receiver: Receiver, events: int, stop: asyncio.Event, task: asyncio.Task[None], timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while receiver.count < events and not stop.is_set() and not task.done():
        if time.monotonic() > deadline:
            print(f"timed out: {receiver.count} of {events} deliveries", file=sys.stderr)
            return
        with contextlib.suppress(TimeoutError):
            await receiver.wait_for(events, timeout=0.2)
    if task.done():
        task.result()


async def _follow(
    receiver: Receiver, stop: asyncio.Event, task: asyncio.Task[None], out: TextIO
) -> None:
    shown = 0
    while not stop.is_set() and not task.done():
        for item in receiver.received[shown:]:
            payload = item.json["payload"]
            print(
                f"{item.webhook_id[:16]}  {_short(payload['user_id']):<25} "
                f"{payload.get('status')!s:<12} signed={'yes' if item.verified else 'NO'}",
                file=out,
                flush=True,
            )
        shown = len(receiver.received)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.5)


async def _run_broker_demo(url: str, *, events: int, out: TextIO, timeout: float) -> int:
    """The demo through a broker: simulator -> relay -> broker -> the demo's consumer."""
    from relay.brokers.consume import Tap

    secret = "whsec_" + base64.b64encode(os.urandom(24)).decode()
    key = decode_secret(secret)
    api_key = base64.b16encode(os.urandom(16)).decode()
    with tempfile.TemporaryDirectory(prefix="relay-demo-") as tmp:
        async with (
            Simulator(api_key=api_key, users=max(1, events // 2), count=events, rate=500.0) as sim,
            Tap(url) as tap,
        ):
            settings = load_settings(
                {
                    "RELAY_API_KEY": api_key,
                    "RELAY_WS_URL": sim.ws_url,
                    "RELAY_API_URL": sim.api_url,
                    "RELAY_ENDPOINTS": url,
                    "RELAY_SIGNING_SECRET": secret,
                    "RELAY_STORE": f"sqlite:///{tmp}/relay.db",
                    "RELAY_ADMIN_ADDR": "127.0.0.1:0",
                    "RELAY_RECONCILE_INTERVAL": "off",
                    "RELAY_LOG_LEVEL": "WARNING",
                    "RELAY_LOG_FORMAT": "console",
                },
                for_run=True,
            )
            name = settings.endpoints[0].name
            print(f"simulator {sim.ws_url} -> relay -> {name} -> demo consumer", file=out)
            relay = Relay(settings)
            task = asyncio.create_task(relay.run())
            try:
                consumed = await tap.read(events, timeout=timeout)
                consumed += await tap.settle(0.3)
            finally:
                relay.request_stop()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
    received = []
    for message in consumed:
        headers = dict(message.headers)
        webhook_id = headers.get("webhook-id", "")
        timestamp = int(headers.get("webhook-timestamp", "0") or 0)
        signature = headers.get("webhook-signature", "")
        try:
            verify([key], webhook_id, timestamp, message.body, signature, now=time.time())
            verified = True
        except SignatureError:
            verified = False
        received.append(
            Received(
                webhook_id=webhook_id,
                timestamp=timestamp,
                signature=signature,
                source=headers.get("relay-source"),
                headers=headers,
                body=message.body,
                path=name,
                arrived_ns=message.arrived_ns,
                verified=verified,
            )
        )
    return 0 if _report(received, events, out) else 1
