"""Chaos, the feed: rejected keys, drops, garbage frames, slow handshakes and stalls, at fast
timings in this loop and (full run only) at the contract's own timings with ``relay run``."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

from bench.audit import AuditReport, audit, sqlite_deliveries
from bench.chaos.harness import (
    Endpoint,
    Outcome,
    RelayProcess,
    _endpoint,
    _sim,
    count,
    fast_feed,
    relay_env,
    sent_ids,
    settle,
    sqlite_probe,
    store_bytes,
)
from bench.procs import eventually, in_process, new_whsec
from relay.simulator import FAKE_TOKEN, Faults, Simulator

#: sFOX allows 40 requests a minute per IP, so ~20 connections (authenticate, subscribe): FEED.md.
SFOX_CONNECTIONS_A_MINUTE = 20


async def feed_faults(
    workdir: Path,
    *,
    phase: float,
    drops: float,
    rejections: int = 2,
    rate: float = 300.0,
    seed: int = 2,
) -> Outcome:
    """One relay, in this loop with fast feed timings, through: rejected keys, drops with
    garbage frames, handshakes slower than the timeout, a stall with no pongs; then audit that
    every well-formed message the simulator sent was stored and delivered."""
    secret = new_whsec()
    facts: dict[str, Any] = {}
    # Long runs reach sFOX's 20 connections a minute: the relay then waits up to a minute.
    wait = 15 if drops < 10 else 75
    async with contextlib.AsyncExitStack() as stack:
        sim = await _sim(
            stack, rate=rate, users=40, count=None, seed=seed, faults=Faults(reject_auth=rejections)
        )
        sink = await _endpoint(stack, "sink", [secret])
        db = workdir / "feed.db"
        env = relay_env(sim, [sink], secret, f"sqlite:///{db}")
        options = fast_feed(sim)
        t0 = time.monotonic()
        timeline: list[tuple[str, float]] = []

        def mark(what: str) -> None:
            timeline.append((what, round(time.monotonic() - t0, 1)))

        async with in_process(env, feed_options=options) as running:
            mark("started")
            # Rejected keys: each retry waits auth_retry_after; then subscribed.
            await eventually(lambda: sim.subscribed > 0, wait, "subscribed after the rejections")
            times = sim.connection_times
            facts["auth_gaps"] = [round(times[i + 1] - times[i], 2) for i in range(rejections)]
            facts["auth_retry_after"] = options.auth_retry_after
            mark("subscribed after rejections")

            # Drops (each connection lives 1.2 s) with garbage frames in between; kept up long
            # enough (full run), the reconnections reach sFOX's limit of 20 a minute.
            sim.faults.drop_every = int(rate * 1.2)
            sim.faults.bad_every = 37
            await asyncio.sleep(drops)

            # Handshakes slower than the relay waits: it gives up, backs off, tries again.
            before = sim.connections
            mark("drops done")
            sim.faults.handshake_delay = options.handshake_timeout * 1.5
            await eventually(lambda: sim.connections >= before + 2, wait, "handshake timeouts")
            mark("handshake timeouts seen")
            sim.faults.handshake_delay = options.handshake_timeout / 4
            await eventually(lambda: sim.subscribed > 0, wait, "subscribed after slow handshakes")
            await asyncio.sleep(phase / 2)

            mark("slow handshakes done")
            # A stall: the server stops sending and answering pings; keepalive must notice.
            sim.faults.drop_every = None
            await eventually(lambda: sim.subscribed > 0, wait, "subscribed before the stall")
            before = sim.connections
            sim.faults.stall_after = 1
            await eventually(lambda: sim.subscribed == 0, 5, "the connection stalled")
            stalled_at = time.monotonic()
            sim.faults.stall_after = None  # that connection stays stalled; the next ones not
            await eventually(lambda: sim.connections > before, wait, "a reconnection after a stall")
            facts["stall_detected_s"] = round(time.monotonic() - stalled_at, 2)
            await eventually(lambda: sim.subscribed > 0, wait, "subscribed after the stall")
            await asyncio.sleep(phase / 2)

            mark("stall done")
            sim.pause()
            await settle(sqlite_probe(sim, db), timeout=30)
            mark("settled")
            facts["alive"] = running.alive()
            facts["bad_frames_counted"] = running.metric("relay_feed_bad_frames_total")
            facts["reconnects"] = running.metric("relay_feed_reconnects_total")
        facts["connections"] = sim.connections
        facts["timeline"] = timeline
        report = _feed_audit(
            "feed faults: rejected key, drops, garbage, slow handshakes, a stall",
            sim,
            sink,
            db,
            facts,
        )
        report.notes.append(
            f"{facts['connections']} connections (at most {facts['connections_per_minute']} "
            f"a minute), {int(facts['bad_frames_counted'])} bad frames counted and "
            f"{facts['bad_frames_quarantined']} quarantined, stall seen after "
            f"{facts['stall_detected_s']}s (timings /30)"
        )
        return Outcome(report, facts)


def _feed_audit(
    title: str,
    sim: Simulator,
    sink: Endpoint,
    db: Path,
    facts: dict[str, Any],
    *,
    registry: bool = True,
) -> AuditReport:
    """What both feed scenarios check once the feed is quiet, written once: every message the
    simulator sent stored and delivered, sFOX's limit of connections a minute kept, each bad
    frame counted and quarantined, no user token of a bad frame in the store files, retries after
    a rejected key no sooner than ``facts["auth_retry_after"]``. ``registry=False``: the
    relay's count of bad frames cannot be read (``relay run``), so the quarantine stands for it."""
    limit = SFOX_CONNECTIONS_A_MINUTE
    facts["bad_frames_quarantined"] = count(db, "SELECT COUNT(*) FROM bad_frames")
    if not registry:
        facts["bad_frames_counted"] = facts["bad_frames_quarantined"]
    facts["connections_per_minute"] = sim.max_connections_per_minute()
    facts["requests_per_minute"] = sim.max_requests_per_minute()
    facts["fake_token_stored"] = any(
        FAKE_TOKEN.encode() in data for data in store_bytes(db.parent, db.name).values()
    )
    deliveries, events = sqlite_deliveries(db)
    report = audit(
        title,
        deliveries,
        sink.arrivals,
        endpoints=[sink.name],
        stored_events=events,
        sent=sent_ids(sim),
        must_store_sent=True,
    )
    if facts.get("alive") is False:
        report.problem("the relay stopped running")
    if facts["connections_per_minute"] > limit:
        report.problem(f"{facts['connections_per_minute']} connections in a minute (> {limit})")
    if facts["requests_per_minute"] > 2 * limit:
        report.problem(f"{facts['requests_per_minute']} requests in a minute (> {2 * limit})")
    if facts["bad_frames_counted"] != facts["bad_frames_quarantined"]:
        report.problem(
            f"{facts['bad_frames_counted']} bad frames counted, "
            f"{facts['bad_frames_quarantined']} quarantined"
        )
    if facts["fake_token_stored"]:
        report.problem("a bad frame's user token is in the store files")
    for gap in facts.get("auth_gaps", []):
        if gap < facts["auth_retry_after"] - 0.05:
            report.problem(f"retried {gap}s after a rejected key (< {facts['auth_retry_after']}s)")
    return report


async def feed_faults_real_timings(workdir: Path, *, rate: float = 100.0) -> Outcome:
    """The same at the contract's own timings, with ``relay run``: one rejected key (the
    retry must wait 60 s) and one stall (noticed after 20-30 s without a pong). Full run only."""
    secret = new_whsec()
    facts: dict[str, Any] = {}
    async with contextlib.AsyncExitStack() as stack:
        sim = await _sim(stack, rate=rate, users=40, count=None, faults=Faults(reject_auth=1))
        sink = await _endpoint(stack, "sink", [secret])
        db = workdir / "feed-real.db"
        env = relay_env(sim, [sink], secret, f"sqlite:///{db}")
        proc = await RelayProcess.start(env, workdir / "feed-real.log")
        try:
            await eventually(lambda: sim.subscribed > 0, 90, "subscribed after a rejected key")
            times = sim.connection_times
            facts["auth_gaps"] = [round(times[1] - times[0], 2)]
            facts["auth_retry_after"] = 60.0
            await asyncio.sleep(3)
            before = sim.connections
            sim.faults.stall_after = 1
            await eventually(lambda: sim.subscribed == 0, 5, "the connection stalled")
            stalled_at = time.monotonic()
            sim.faults.stall_after = None  # that connection stays stalled; the next ones not
            await eventually(lambda: sim.connections > before, 60, "a reconnection after a stall")
            facts["stall_detected_s"] = round(time.monotonic() - stalled_at, 1)
            await eventually(lambda: sim.subscribed > 0, 30, "subscribed after the stall")
            sim.faults.bad_every = 50
            await asyncio.sleep(3)
            sim.pause()
            await settle(sqlite_probe(sim, db), timeout=60)
        finally:
            proc.terminate()
            code = await proc.wait()
        facts["exit_code"] = code
        report = _feed_audit(
            "feed faults at real timings: rejected key (60 s), stall (30 s)",
            sim,
            sink,
            db,
            facts,
            registry=False,
        )
        if code != 0 or "Traceback" in proc.output():
            report.problem(f"relay run exited {code}:\n{proc.output()[-2000:]}")
        # Seen 20-30 s after the stall (a ping every 10 s, 20 s for its pong), plus the 5 s
        # close timeout and the first backoff (under 2 s) before the new connection.
        if not 19 <= facts["stall_detected_s"] <= 40:
            report.problem(f"reconnected {facts['stall_detected_s']}s after a stall, not 20-37 s")
        report.notes.append(
            f"retried {facts['auth_gaps'][0]}s after the rejected key; reconnected "
            f"{facts['stall_detected_s']}s after a stall"
        )
        return Outcome(report, facts)
