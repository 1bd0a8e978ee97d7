"""The CLI never misleads an operator (issue 20): read and re-queue commands never create a
store, `replay` needs a scope, unknown ids are errors, `retry`, `--json`, `--event-id`, the
admin address is checked before anything is created, `relay check` writes nothing.

``relay`` runs as a subprocess; the store is prepared in-process through the store API.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import new_key, new_whsec
from store_suite import CRM, dead, retry, user_event

from bench.procs import relay_cli as cli
from bench.procs import start_relay_run
from relay.receiver import Receiver
from relay.simulator import Simulator
from relay.store.sqlite import SQLiteStore

pytestmark = pytest.mark.slow

NOW = time.time()  # the CLI's own clock is real: a retry an hour from now is waiting


def env_for(db: Path, **more: str) -> dict[str, str]:
    return {
        "RELAY_API_KEY": "k" * 40,
        "RELAY_ENDPOINTS": "http://127.0.0.1:9/hook",
        "RELAY_SIGNING_SECRET": new_whsec(),
        "RELAY_STORE": f"sqlite:///{db}",
        "RELAY_ADMIN_ADDR": "127.0.0.1:0",
        "RELAY_RECONCILE_INTERVAL": "off",
        **more,
    }


async def make_store(db: Path) -> tuple[str, str]:
    """A store with one dead delivery and one waiting for a retry an hour away; their ids."""
    store = SQLiteStore(db)
    await store.open(daemon=False)
    try:
        a, b = user_event("usr_a", 1), user_event("usr_b", 2)
        await store.append([a, b], [CRM], NOW)
        [first] = await store.claim("crm", NOW, 1)
        [second] = await store.claim("crm", NOW, 1)
        await store.record([dead(first, NOW + 1), retry(second, NOW + 1, NOW + 3600)], NOW + 1)
        return f"dlv_{first.delivery_id}", first.event_id
    finally:
        await store.close()


@pytest.mark.parametrize(
    "args",
    [
        ("deliveries", "list"),
        ("deliveries", "show", "dlv_1"),
        ("deliveries", "replay", "--all"),
        ("deliveries", "retry"),
        ("reconcile", "--dry-run"),
        ("check",),
    ],
)
async def test_read_commands_never_create_a_store(tmp_path: Path, args: tuple[str, ...]) -> None:
    db = tmp_path / "elsewhere" / "relay.db"
    done = await cli(*args, env=env_for(db))
    assert done.code == 1, done.stdout + done.stderr
    assert str(db) in done.stderr and "RELAY_STORE" in done.stderr
    assert "Traceback" not in done.stderr
    assert not db.parent.exists()


async def test_replay_needs_ids_a_filter_or_all_and_unknown_ids_are_errors(
    tmp_path: Path,
) -> None:
    db = tmp_path / "relay.db"
    dead_id, _ = await make_store(db)
    env = env_for(db)

    bare = await cli("deliveries", "replay", env=env)
    assert bare.code == 1 and "--all" in bare.stderr
    unknown = await cli("deliveries", "replay", dead_id, "dlv_999999", env=env)
    assert unknown.code == 1 and "dlv_999999" in unknown.stderr
    assert "re-queued" not in unknown.stdout
    everything = await cli("deliveries", "replay", "--all", env=env)
    assert everything.code == 0, everything.stderr
    assert everything.stdout.strip() == "re-queued 1 deliveries"
    assert f"relay: store sqlite:///{db}" in everything.stderr


async def test_retry_makes_a_waiting_retry_due_now_without_an_attempt(tmp_path: Path) -> None:
    db = tmp_path / "relay.db"
    await make_store(db)
    before = (
        sqlite3.connect(db)
        .execute("SELECT attempts FROM deliveries WHERE state = 'pending'")
        .fetchall()
    )

    done = await cli("deliveries", "retry", "--user-id", "usr_b", env=env_for(db))

    assert done.code == 0, done.stderr
    assert done.stdout.strip() == "made 1 deliveries due now"
    conn = sqlite3.connect(db)
    rows = conn.execute(
        "SELECT attempts, next_at FROM deliveries WHERE state = 'pending'"
    ).fetchall()
    assert [r[0] for r in rows] == [r[0] for r in before] == [1]
    assert rows[0][1] < NOW + 3600


async def test_list_and_show_as_json_and_by_event_id(tmp_path: Path) -> None:
    db = tmp_path / "relay.db"
    dead_id, event_id = await make_store(db)
    env = env_for(db)

    listed = await cli("deliveries", "list", "--json", env=env)
    assert listed.code == 0, listed.stderr
    items = [json.loads(line) for line in listed.stdout.splitlines()]
    assert len(items) == 2
    assert {"id", "event_id", "state", "endpoint", "user_id", "last_status", "attempts"} <= set(
        items[0]
    )
    one = await cli("deliveries", "list", "--json", "--event-id", event_id, env=env)
    [item] = [json.loads(line) for line in one.stdout.splitlines()]
    assert (item["id"], item["state"], item["attempts"]) == (dead_id, "dead", 1)

    table = await cli("deliveries", "list", "--event-id", event_id, env=env)
    header, row = table.stdout.splitlines()
    assert header.split()[:5] == ["ID", "EVENT", "ID", "STATE", "ENDPOINT"]
    assert row.split()[:6] == [dead_id, event_id, "dead", "crm", "usr_a", "410"]

    shown = await cli("deliveries", "show", "--json", dead_id, env=env)
    [line] = shown.stdout.splitlines()
    assert json.loads(line)["attempt_log"][0]["status"] == 410


async def test_admin_address_in_use_exits_1_in_one_line_creating_nothing(tmp_path: Path) -> None:
    db = tmp_path / "relay.db"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = await cli("run", env=env_for(db, RELAY_ADMIN_ADDR=f"127.0.0.1:{port}"))
    assert done.code == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert f"127.0.0.1:{port}" in lines[0] and "RELAY_ADMIN_ADDR" in lines[0]
    assert list(tmp_path.iterdir()) == []


async def test_check_writes_nothing(tmp_path: Path) -> None:
    db = tmp_path / "relay.db"
    await make_store(db)
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.execute("DELETE FROM meta WHERE key = 'nothing'")
    conn.close()
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    done = await cli("check", env=env_for(db))

    assert done.code == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["store_state"]["status"] == "ok"
    assert report["warnings"] == []
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == files


async def test_every_configuration_error_is_one_line(tmp_path: Path) -> None:
    env = env_for(
        tmp_path / "relay.db", RELAY_REPLICAS="many", RELAY_ADMIN_TOKN="x", RELAY_LEASE="60"
    )
    done = await cli("check", env=env)
    assert done.code == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 3, done.stderr
    assert all(line.startswith("relay: configuration error: RELAY_") for line in lines)
    assert "Traceback" not in done.stderr


async def test_check_shows_the_warnings(tmp_path: Path) -> None:
    db = tmp_path / "relay.db"
    await make_store(db)
    endpoints = [
        {"url": "https://a.example/hook", "statuses": ["verified", "DONE"]},
        {"url": "http://b.example/hook", "user_token": "forward"},
    ]
    env = env_for(db, RELAY_ENDPOINTS=json.dumps(endpoints), RELAY_TOKEN_KEY=new_key())
    done = await cli("check", env=env)
    assert done.code == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["endpoints"][0]["statuses"] == ["DONE", "VERIFIED"]
    [unknown, plaintext] = report["warnings"]
    assert "RELAY_ENDPOINTS[0].statuses" in unknown and "'DONE'" in unknown
    assert "RELAY_ENDPOINTS[1].user_token" in plaintext and "plaintext" in plaintext


async def test_run_logs_the_warnings_and_its_store_at_start_up(
    sim: Simulator, receiver: Receiver, relay_env: Any, tmp_path: Path
) -> None:
    endpoint = {"url": receiver.url + "/webhooks/sfox", "statuses": ["verified", "DONE"]}
    env = relay_env(RELAY_ENDPOINTS=json.dumps([endpoint]), RELAY_LOG_LEVEL="INFO")
    log = tmp_path / "run.log"
    proc = await start_relay_run(env, log)
    try:
        await receiver.wait_for(1, timeout=15)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    text = log.read_text()
    assert (
        "WARNING relay.config: RELAY_ENDPOINTS[0].statuses: sFOX is not known to send 'DONE'"
        in text
    )
    assert re.search(rf"relay started .*store=sqlite:///{re.escape(str(tmp_path))}/relay\.db", text)
    assert "event.stored" not in text  # console lines show the event as the message
    assert re.search(
        r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} INFO    relay\.app: event stored", text, re.M
    )
