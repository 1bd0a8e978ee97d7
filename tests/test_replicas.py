"""Several `relay run` replicas on one PostgreSQL store (see the README).

Real processes, a real simulator and receiver, a fresh database per test. Skipped when the
server at ``SFOX_RELAY_TEST_PG`` does not answer.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
from conftest import eventually, expected_event_id

from relay.receiver import Receiver, Response
from relay.simulator import Simulator

pytestmark = [pytest.mark.postgres, pytest.mark.slow]


def replica_env(
    sim: Simulator, receiver: Receiver, db: str, n: int, **extra: str
) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "RELAY_API_KEY": sim.api_key,
        "RELAY_WS_URL": sim.ws_url,
        "RELAY_API_URL": sim.api_url,
        "RELAY_ENDPOINTS": receiver.url + "/hook",
        "RELAY_ALLOW_UNSIGNED": "true",
        "RELAY_STORE": db,
        "RELAY_ADMIN_ADDR": "127.0.0.1:0",
        "RELAY_REPLICAS": "3",
        "RELAY_RECONCILE_INTERVAL": "off",
        "RELAY_LOG_LEVEL": "WARNING",
        "RELAY_LOG_FORMAT": "console",
        **extra,
    }


@pytest.fixture
def replicas(tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def start(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as stderr:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "relay", "run"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )


async def audit(sim: Simulator, receiver: Receiver, db: str) -> tuple[set[str], Counter[str]]:
    """Every simulator message delivered (or superseded); per user, first deliveries in lane
    order: sFOX's timestamp, then the order the store received them (CONTRACT section 5).

    With several replicas, two events of one user sent a few milliseconds apart can be
    committed by different replicas in either order; the lanes still follow the timestamps.
    """
    sent = [m for m in sim.sent if m.get("recipient") == "private.enterprise.users"]
    expected = {expected_event_id(m) for m in sent}
    arrivals = Counter(r.webhook_id for r in receiver.received)
    first: dict[str, list[str]] = defaultdict(list)
    for item in receiver.received:
        lane = first[item.json["payload"]["user_id"]]
        if item.webhook_id not in lane:
            lane.append(item.webhook_id)
    conn = await asyncpg.connect(db)
    try:
        rows = await conn.fetch(
            "SELECT d.user_id, e.event_id, d.state FROM deliveries d "
            "JOIN events e ON e.seq = d.event_seq ORDER BY d.ts, d.ord, d.id"
        )
    finally:
        await conn.close()
    superseded = {row["event_id"] for row in rows if row["state"] == "superseded"}
    missing = expected - set(arrivals) - superseded
    stored: dict[str, list[str]] = defaultdict(list)
    for row in rows:
        if row["state"] != "superseded":
            stored[row["user_id"]].append(row["event_id"])
    for user_id, ids in stored.items():
        got = first[user_id]
        assert got == ids[: len(got)], f"lane order broken for {user_id}"
    return missing, arrivals


async def test_three_replicas_deliver_every_event_once_in_order(
    make_sim, make_receiver, database: str, replicas: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    sim = await make_sim(count=600, users=40, rate=300.0)
    receiver = await make_receiver()
    for n in range(3):
        replicas.append(start(replica_env(sim, receiver, database, n), tmp_path / f"r{n}.log"))
    await eventually(lambda: len({r.webhook_id for r in receiver.received}) >= 600, timeout=30)
    await asyncio.sleep(0.5)  # anything extra would show up now
    missing, arrivals = await audit(sim, receiver, database)
    assert not missing
    assert max(arrivals.values()) == 1  # each event stored once, delivered once
    assert sim.subscribed == 3  # every replica holds its own subscription
    for proc in replicas:
        proc.send_signal(signal.SIGTERM)
    assert [proc.wait(timeout=20) for proc in replicas] == [0, 0, 0]


async def test_a_killed_replicas_claims_are_taken_over_within_the_lease(
    make_sim, make_receiver, database: str, replicas: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    sim = await make_sim(count=400, users=40, rate=200.0)

    async def slow(_: object) -> Response:
        return Response(204, delay=0.2)  # keep deliveries in flight when the kill comes

    receiver = await make_receiver(behaviour=slow)
    extra = {"RELAY_LEASE": "3s", "RELAY_DELIVERY_TIMEOUT": "1s"}
    for n in range(3):
        replicas.append(
            start(replica_env(sim, receiver, database, n, **extra), tmp_path / f"r{n}.log")
        )
    await eventually(lambda: receiver.count >= 100, timeout=30)
    replicas[0].kill()  # SIGKILL: its claims stay in flight in the store until the lease ends
    replicas[0].wait(timeout=10)
    await eventually(lambda: len({r.webhook_id for r in receiver.received}) >= 400, timeout=30)
    missing, arrivals = await audit(sim, receiver, database)
    assert not missing
    duplicates = [event_id for event_id, n in arrivals.items() if n > 1]
    # Only what the killed replica had claimed without a committed verdict may arrive twice:
    # requests in flight and verdicts queued for its recorder, together at most twice
    # max_in_flight (64). In flight alone was 65 once, on a loaded machine.
    assert len(duplicates) <= 2 * 64
    for proc in replicas[1:]:
        proc.send_signal(signal.SIGTERM)
    assert [proc.wait(timeout=20) for proc in replicas[1:]] == [0, 0]
