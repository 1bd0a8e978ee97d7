"""Chaos, replicas: several relays on one PostgreSQL store, each event delivered once."""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid
from pathlib import Path
from typing import Any

from bench.audit import AuditReport, audit
from bench.chaos.harness import (
    Outcome,
    PostgresView,
    RelayProcess,
    ScenarioSkipped,
    _endpoint,
    _sim,
    postgres_available,
    relay_env,
    sent_ids,
    settle,
)
from bench.procs import eventually, new_whsec


async def replicas_broadcast(
    workdir: Path,
    *,
    runs: int,
    seconds: float,
    rate: float = 150.0,
    users: int = 20,
    window: str = "1s",
) -> Outcome:
    """Three ``relay run`` replicas on one PostgreSQL store, one simulator broadcasting each
    message to every subscribed replica (CONTRACT section 7). While the feed runs, the second
    and the third replica each lose their connection once and subscribe again: what they
    receive next includes users' later events, whose earlier ones only the first replica
    has (it stores them a moment later). Repeated ``runs`` times on a fresh schema; each run
    is audited, a lane's order being sFOX's timestamp at the receiver. ``window`` is
    ``RELAY_REORDER_WINDOW``: with a tiny one, the late replicas' events go out before the
    earlier ones are stored, which then arrive too late and are superseded (counted).
    """
    reason = await postgres_available()
    if reason is not None:
        raise ScenarioSkipped(reason)
    total = AuditReport(
        f"replicas: 3 on PostgreSQL, a broadcast feed, resubscriptions ({runs} runs, "
        f"window {window})",
        0,
        0,
    )
    facts: dict[str, Any] = {"runs": runs, "runs_with_violations": 0}
    for run in range(runs):
        report = await _broadcast_once(
            workdir, run, count=int(rate * seconds), rate=rate, users=users, window=window
        )
        for name in ("sent", "stored", "delivered", "dead", "superseded", "lost", "duplicates"):
            setattr(total, name, getattr(total, name) + getattr(report, name))
        total.unexpected_duplicates += report.unexpected_duplicates
        total.order_violations += report.order_violations
        facts["runs_with_violations"] += bool(report.order_violations)
        for problem in report.problems:
            total.problem(f"run {run + 1}: {problem}")
    total.notes.append(
        f"{runs} runs: {total.order_violations} order violations in "
        f"{facts['runs_with_violations']} runs; {total.superseded} deliveries superseded"
    )
    return Outcome(total, facts)


async def _broadcast_once(
    workdir: Path, run: int, *, count: int, rate: float, users: int, window: str
) -> AuditReport:
    rng = random.Random(run)
    secret = new_whsec()
    view = PostgresView(f"relay_chaos_{uuid.uuid4().hex[:10]}")
    await view.create()
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(view.close)
        sim = await _sim(stack, rate=rate, users=users, count=count, seed=run)
        sim.pause()  # until every replica listens
        sink = await _endpoint(stack, "sink", [secret])
        env = relay_env(
            sim, [sink], secret, view.url, RELAY_REPLICAS="3", RELAY_REORDER_WINDOW=window
        )
        procs = [
            await RelayProcess.start(env, workdir / f"broadcast-{run}-{n}.log") for n in range(3)
        ]

        async def probe() -> tuple[int, ...]:
            return (len(sim.sent), *await view.counts())

        try:
            await sim.wait_subscribed(3, timeout=30)
            sim.resume()
            stream = count / rate
            for index in rng.sample([1, 2], 2):  # never the first: it receives everything
                await asyncio.sleep(rng.uniform(0.1, stream / 3))
                sim.disconnect(index)
            await eventually(sim.finished.is_set, stream + 20, "the feed sent everything")
            await settle(probe, timeout=30)
            await eventually(lambda: sim.subscribed == 3, 10, "every replica subscribed again")
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                await proc.wait()
        deliveries, events = await view.deliveries()
    return audit(
        "replicas broadcast",
        deliveries,
        sink.arrivals,
        endpoints=[sink.name],
        stored_events=events,
        sent=sent_ids(sim),
        must_store_sent=True,
    )
