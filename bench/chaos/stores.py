"""Chaos, the store: a full SQLite disk, quarantine while it is full, PostgreSQL connections
cut by a proxy."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import random
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from bench.audit import audit, expected_event_id, postgres_deliveries, sqlite_deliveries
from bench.chaos.harness import (
    UNFINISHED,
    Outcome,
    RawFeed,
    ScenarioSkipped,
    _dumps,
    _endpoint,
    _sim,
    count,
    fast_feed,
    fresh_message,
    postgres_available,
    readyz,
    relay_env,
    seconds_until_ready,
    sent_ids,
    settle,
    sqlite_probe,
)
from bench.procs import PG_URL, eventually, in_process, new_whsec
from relay.simulator import Faults


@contextlib.contextmanager
def tmpfs(directory: Path, size: str) -> Iterator[Path]:
    """A small tmpfs mounted at ``directory`` (root only); ScenarioSkipped if refused."""
    directory.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        raise ScenarioSkipped("mounting a tmpfs needs root and mount(8)")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise ScenarioSkipped(f"this sandbox refuses mount -t tmpfs: {done.stderr.strip()}")
    try:
        yield directory
    finally:
        umount = ["umount", str(directory)]
        if subprocess.run(umount, capture_output=True, check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(directory)], capture_output=True, check=False)


def fill(directory: Path) -> Path:
    """Fill the file system under ``directory`` to the last byte; returns the filler file."""
    filler = directory / "filler"
    chunk = b"\0" * 65536
    with filler.open("wb", buffering=0) as out:
        try:
            while True:
                out.write(chunk)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
        with contextlib.suppress(OSError):
            while True:
                out.write(b"\0" * 512)
    return filler


async def store_full(workdir: Path, *, outage: float, rate: float = 200.0) -> Outcome:
    """The SQLite store's file system fills up under a running relay, then frees up again."""
    secret = new_whsec()
    facts: dict[str, Any] = {}
    with tmpfs(workdir / "tmpfs", "32m") as mount:
        async with contextlib.AsyncExitStack() as stack:
            sim = await _sim(stack, rate=rate, users=40, count=None, faults=Faults(bad_every=40))
            sink = await _endpoint(stack, "sink", [secret])
            db = mount / "relay.db"
            env = relay_env(sim, [sink], secret, f"sqlite:///{db}")
            async with (
                in_process(env) as running,
                httpx.AsyncClient(base_url=running.admin, timeout=5) as http,
            ):
                await eventually(lambda: count(db, "SELECT COUNT(*) FROM events") >= 200, 15)
                filler = fill(mount)

                async def down() -> bool:
                    status, checks = await readyz(http)
                    return status == 503 and checks.get("store") == "failing"

                t0 = time.monotonic()
                await eventually(down, 15, "/readyz 503 naming store after the disk filled")
                facts["readyz_503_after_s"] = round(time.monotonic() - t0, 2)
                facts["store_check_during_outage"] = (await readyz(http))[1]
                # The feed is held: after the buffers fill, the simulator can send no more.
                samples: list[tuple[int, int, float]] = []
                ready_codes: list[int] = []
                end = time.monotonic() + outage
                while time.monotonic() < end:
                    stored_now = count(db, "SELECT COUNT(*) FROM events")
                    taken = running.metric("relay_feed_messages_total")
                    samples.append((len(sim.sent), stored_now, taken))
                    ready_codes.append((await readyz(http))[0])
                    await asyncio.sleep(0.1)
                tail = samples[len(samples) // 2 :]
                facts["sent_growth_in_second_half"] = tail[-1][0] - tail[0][0]
                facts["stored_growth_in_second_half"] = tail[-1][1] - tail[0][1]
                facts["taken_growth_in_second_half"] = tail[-1][2] - tail[0][2]
                facts["readyz_200_during_outage"] = ready_codes.count(200)
                facts["readyz_samples"] = len(ready_codes)
                facts["alive_during_outage"] = running.alive()
                filler.unlink()
                facts["recovered_after_s"] = await seconds_until_ready(
                    http, 20, "/readyz 200 once space returned"
                )
                await asyncio.sleep(1.0)
                sim.pause()
                await settle(sqlite_probe(sim, db), timeout=30)
                facts["bad_frames_counted"] = running.metric("relay_feed_bad_frames_total")
            facts["bad_frames_quarantined"] = count(db, "SELECT COUNT(*) FROM bad_frames")
            deliveries, events = sqlite_deliveries(db)
            report = audit(
                "store faults: SQLite disk full, then space returns",
                deliveries,
                sink.arrivals,
                endpoints=[sink.name],
                stored_events=events,
                sent=sent_ids(sim),
                must_store_sent=True,
            )
    if facts["stored_growth_in_second_half"]:
        report.problem("events were stored while the disk was full?")
    if facts["taken_growth_in_second_half"]:
        report.problem(
            f"the feed handed {facts['taken_growth_in_second_half']:.0f} more messages to a "
            "store that could not take them"
        )
    if facts["bad_frames_counted"] != facts["bad_frames_quarantined"]:
        report.problem(
            f"{facts['bad_frames_counted']:.0f} bad frames counted, "
            f"{facts['bad_frames_quarantined']} quarantined (kept)"
        )
    if facts["readyz_200_during_outage"]:
        report.problem(
            f"/readyz answered 200 in {facts['readyz_200_during_outage']} of "
            f"{facts['readyz_samples']} samples while the disk was full"
        )
    report.notes.append(
        f"/readyz 503 {facts['readyz_503_after_s']}s after the disk filled, 200 again "
        f"{facts['recovered_after_s']}s after space returned; in the outage's second half the "
        f"feed handed the store {facts['taken_growth_in_second_half']:.0f} more messages (the "
        f"simulator wrote {facts['sent_growth_in_second_half']} more into socket buffers)"
    )
    return Outcome(report, facts)


async def quarantine_while_down(workdir: Path) -> Outcome:
    """A malformed frame that arrives while the SQLite disk is full must still be kept
    (quarantined) once space returns, like the messages around it."""
    secret = new_whsec()
    rng = random.Random(8)
    with tmpfs(workdir / "tmpfs", "16m") as mount:
        async with contextlib.AsyncExitStack() as stack:
            feed = RawFeed()
            await feed.start()
            stack.push_async_callback(feed.close)
            sink = await _endpoint(stack, "sink", [secret])
            db = mount / "relay.db"
            env = relay_env(feed, [sink], secret, f"sqlite:///{db}")
            messages = [fresh_message(rng, n) for n in range(1, 4)]
            async with in_process(env, feed_options=fast_feed(feed)) as running:
                await asyncio.wait_for(feed.subscribed.wait(), 10)
                await feed.send(_dumps(messages[0]))
                await eventually(lambda: count(db, "SELECT COUNT(*) FROM events") == 1, 10)
                filler = fill(mount)
                await feed.send('{"recipient": "private.enterprise.users", "payload": ')
                await feed.send(_dumps(messages[1]))
                await asyncio.sleep(1.5)
                filler.unlink()
                await feed.send(_dumps(messages[2]))
                await eventually(lambda: count(db, "SELECT COUNT(*) FROM events") == 3, 15)
                await settle(
                    lambda: (count(db, "SELECT COUNT(*) FROM events"), count(db, UNFINISHED)),
                    timeout=15,
                )
                counted = running.metric("relay_feed_bad_frames_total")
            quarantined = count(db, "SELECT COUNT(*) FROM bad_frames")
            deliveries, events = sqlite_deliveries(db)
    report = audit(
        "a malformed frame while the disk is full",
        deliveries,
        sink.arrivals,
        endpoints=[sink.name],
        stored_events=events,
        sent=[expected_event_id(m) for m in messages],
        must_store_sent=True,
    )
    if (counted, quarantined) != (1, 1):
        report.problem(f"{counted:.0f} bad frame counted, {quarantined} quarantined (kept)")
    return Outcome(report, {"counted": counted, "quarantined": quarantined})


class CuttableProxy:
    """A TCP proxy the scenario can cut (every connection dropped, new ones refused at once)
    and restore."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.cut = False
        self.port = 0
        self._server: asyncio.Server | None = None
        self._links: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        self.sever()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def sever(self) -> None:
        """Cut: reset every open connection; refuse new ones until :meth:`restore`."""
        self.cut = True
        for writer in list(self._links):
            writer.transport.abort()
        self._links.clear()

    def restore(self) -> None:
        self.cut = False

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.cut:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._links.update((writer, up_writer))
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        except (OSError, ConnectionError):
            pass
        finally:
            self._links.discard(dst)
            dst.transport.abort()


async def postgres_cut(workdir: Path, *, outage: float, rate: float = 200.0) -> Outcome:
    """The relay's PostgreSQL connections go through a proxy the scenario cuts and restores."""
    reason = await postgres_available()
    if reason is not None:
        raise ScenarioSkipped(reason)
    import asyncpg

    from relay.store.postgres import PostgresStore

    schema = f"relay_chaos_{uuid.uuid4().hex[:10]}"
    parts = httpx.URL(PG_URL)
    secret = new_whsec()
    facts: dict[str, Any] = {}
    proxy = CuttableProxy(parts.host or "127.0.0.1", parts.port or 5432)
    await proxy.start()
    try:
        async with contextlib.AsyncExitStack() as stack:
            sim = await _sim(stack, rate=rate, users=40, count=None)
            sink = await _endpoint(stack, "sink", [secret])
            proxied = str(parts.copy_with(host="127.0.0.1", port=proxy.port))
            env = relay_env(sim, [sink], secret, proxied)
            store = PostgresStore(proxied, schema=schema, lease=10.0, pool_size=4, timeout=3.0)

            async def probe() -> tuple[int, int, int]:
                conn = await asyncpg.connect(
                    PG_URL, timeout=5, server_settings={"search_path": schema}
                )
                try:
                    stored = await conn.fetchval("SELECT COUNT(*) FROM events")
                    active = await conn.fetchval(
                        "SELECT COUNT(*) FROM deliveries "
                        "WHERE state IN ('waiting', 'pending', 'inflight')"
                    )
                finally:
                    await conn.close()
                return len(sim.sent), int(stored), int(active)

            async with (
                in_process(env, store=store) as running,
                httpx.AsyncClient(base_url=running.admin, timeout=5) as http,
            ):

                async def stored_some() -> bool:
                    return (await probe())[1] >= 200

                await eventually(stored_some, 15, "200 events stored through the proxy")
                proxy.sever()

                async def down() -> bool:
                    status, checks = await readyz(http)
                    return status == 503 and checks.get("store") == "failing"

                t0 = time.monotonic()
                await eventually(down, 15, "/readyz 503 naming store while PostgreSQL is cut")
                facts["readyz_503_after_s"] = round(time.monotonic() - t0, 2)
                codes = []
                taken = []
                end = time.monotonic() + outage
                while time.monotonic() < end:
                    codes.append((await readyz(http))[0])
                    taken.append(running.metric("relay_feed_messages_total"))
                    await asyncio.sleep(0.1)
                facts["readyz_200_during_outage"] = codes.count(200)
                facts["taken_growth_in_second_half"] = taken[-1] - taken[len(taken) // 2]
                facts["alive_during_outage"] = running.alive()
                proxy.restore()
                facts["recovered_after_s"] = await seconds_until_ready(
                    http, 30, "/readyz 200 after PostgreSQL came back"
                )
                await asyncio.sleep(1.0)
                sim.pause()
                await settle(probe, timeout=30)
            deliveries, events = await postgres_deliveries(PG_URL, schema)
            report = audit(
                "store faults: PostgreSQL connection cut, then restored",
                deliveries,
                sink.arrivals,
                endpoints=[sink.name],
                stored_events=events,
                sent=sent_ids(sim),
                must_store_sent=True,
            )
    finally:
        await proxy.close()
        with contextlib.suppress(Exception):
            conn = await asyncpg.connect(PG_URL, timeout=5)
            try:
                await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            finally:
                await conn.close()
    if facts["readyz_200_during_outage"]:
        report.problem(f"/readyz answered 200 {facts['readyz_200_during_outage']} times while cut")
    if facts["taken_growth_in_second_half"]:
        report.problem("the feed kept handing messages to a store that could not take them")
    report.notes.append(
        f"/readyz 503 {facts['readyz_503_after_s']}s after the cut, 200 again "
        f"{facts['recovered_after_s']}s after the restore"
    )
    return Outcome(report, facts)
