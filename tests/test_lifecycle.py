"""Store lifecycle: versioned migrations, retention, purge on demand."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import EnvBuilder, eventually, run_relay

from relay.events import parse_frame, prepare
from relay.receiver import Receiver
from relay.simulator import Simulator
from relay.store.base import Target
from relay.store.sqlite import MIGRATIONS, SQLiteStore

FRAME = (
    '{"sequence":1,"recipient":"private.enterprise.users","timestamp":1717005327995988841,'
    '"payload":{"user_id":"client_1","status":"PENDING","requirements":{"sms":true}}}'
)


def write_v1_store(path: Path) -> None:
    """A store as version 1 of the schema left it, with one pending delivery in it."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
    for statement in MIGRATIONS[0].split(";"):
        if statement.strip():
            conn.execute(statement)
    conn.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    conn.execute(
        "INSERT INTO events (event_id, source, recipient, user_id, status, body, has_token, "
        "received_at) VALUES ('evt_old', 'feed', 'private.enterprise.users', 'client_1', "
        "'PENDING', ?, 0, 1.0)",
        (FRAME.encode(),),
    )
    conn.execute(
        "INSERT INTO deliveries (event_seq, endpoint, user_id, ord, state, next_at, created_at, "
        "updated_at) VALUES (1, 'crm', 'client_1', 1, 'pending', 1.0, 1.0, 1.0)"
    )
    conn.close()


async def test_a_store_written_by_schema_v1_is_upgraded_at_start_up(tmp_path: Path) -> None:
    path = tmp_path / "relay.db"
    write_v1_store(path)
    store = SQLiteStore(path)
    await store.open(daemon=True)
    try:
        claims = await store.claim("crm", time.time(), 10)
        assert [c.event_id for c in claims] == ["evt_old"]  # the old work survived
        assert await store.purge(delivered_before=0, dead_before=0, batch=10) == 0
    finally:
        await store.close()
    conn = sqlite3.connect(path)
    version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    conn.close()
    assert version == (str(len(MIGRATIONS)),)
    assert {"deliveries_finished", "events_received"} <= indexes


async def test_migrations_apply_once(tmp_path: Path) -> None:
    for _ in range(2):
        store = SQLiteStore(tmp_path / "relay.db")
        await store.open(daemon=True)
        await store.close()
    conn = sqlite3.connect(tmp_path / "relay.db")
    rows = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchall()
    conn.close()
    assert rows == [(str(len(MIGRATIONS)),)]


def page_count(db: Path) -> int:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        used: int = conn.execute("PRAGMA page_count").fetchone()[0]
        free: int = conn.execute("PRAGMA freelist_count").fetchone()[0]
        return used - free
    finally:
        conn.close()


@pytest.mark.slow
@pytest.mark.parametrize("sim", [{"count": None, "users": 200, "rate": 300.0}], indirect=True)
async def test_the_store_stops_growing_once_retention_applies(
    sim: Simulator, receiver: Receiver, relay_env: EnvBuilder, tmp_path: Path
) -> None:
    env = relay_env(RELAY_RETENTION="1s")
    db = tmp_path / "relay.db"
    async with run_relay(env):
        await eventually(lambda: receiver.count > 300)
        await asyncio.sleep(3.0)  # retention reaches a steady state (slower on a loaded box)
        received_early = receiver.count
        sizes = []
        for _ in range(16):
            sizes.append(page_count(db))
            await asyncio.sleep(0.5)
        received_late = receiver.count
    assert received_late - received_early > 1200  # the feed kept flowing meanwhile
    early, late = max(sizes[:5]), max(sizes[-5:])
    # Without retention the same run doubles the store in this window (checked by hand).
    assert late <= early * 1.5, sizes
    conn = sqlite3.connect(db)
    rows = conn.execute("SELECT COUNT(*) FROM deliveries").fetchone()[0]
    conn.close()
    assert rows < 4 * 500 * 1  # about rate x retention, not everything ever received


async def test_purge_on_demand_from_the_cli(tmp_path: Path) -> None:
    path = tmp_path / "relay.db"
    store = SQLiteStore(path)
    await store.open(daemon=True)
    message = parse_frame(FRAME)
    assert not isinstance(message, str)
    event = prepare(message, seal_key=None)  # type: ignore[arg-type]
    old = time.time() - 5 * 86400
    await store.append([event], [Target("crm")], old)
    from relay.store.base import Attempt, Outcome

    claims = await store.claim("crm", old, 1)
    await store.record(
        [Outcome(claims[0].delivery_id, "delivered", old, Attempt(old, 204, 0.01))], old
    )
    await store.close()
    env = {
        "RELAY_STORE": f"sqlite:///{path}",
        "RELAY_ENDPOINTS": "http://127.0.0.1:9/x",
        "RELAY_ALLOW_UNSIGNED": "true",
        "PATH": "/usr/bin:/bin",
    }
    keep = subprocess.run(
        [sys.executable, "-m", "relay", "deliveries", "purge", "--older-than", "7d"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert keep.returncode == 0, keep.stderr
    assert "purged 0" in keep.stdout
    purge = subprocess.run(
        [sys.executable, "-m", "relay", "deliveries", "purge", "--older-than", "3d"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert purge.returncode == 0, purge.stderr
    assert "purged 2" in purge.stdout  # the delivery and its event
    bad = subprocess.run(
        [sys.executable, "-m", "relay", "deliveries", "purge", "--older-than", "soon"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert bad.returncode == 2


async def test_relay_check_reports_removed_endpoints_that_still_hold_work(tmp_path: Path) -> None:
    path = tmp_path / "relay.db"
    store = SQLiteStore(path)
    await store.open(daemon=True)
    message = parse_frame(FRAME)
    await store.append([prepare(message, seal_key=None)], [Target("gone")], time.time())  # type: ignore[arg-type]
    await store.close()
    env = {
        "RELAY_API_KEY": "check-api-key-123456",
        "RELAY_STORE": f"sqlite:///{path}",
        "RELAY_ENDPOINTS": "http://127.0.0.1:9/still-here",
        "RELAY_ALLOW_UNSIGNED": "true",
        "PATH": "/usr/bin:/bin",
    }
    done = subprocess.run(
        [sys.executable, "-m", "relay", "check"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    state = json.loads(done.stdout)["store_state"]
    assert state["removed_endpoints_with_work"] == [{"name": "gone", "pending": 1, "dead": 0}]
    assert "check-api-key-123456" not in done.stdout + done.stderr
