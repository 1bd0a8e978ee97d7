"""Chaos, endpoint health: a flaky endpoint and a rate-limited one beside a healthy one, whose
deliveries must not wait behind theirs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import statistics
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import httpx

from bench.audit import audit, sqlite_deliveries
from bench.chaos.harness import (
    DELIVERY_TIMEOUT,
    OK,
    Outcome,
    _endpoint,
    _sim,
    relay_env,
    rows,
    sent_ids,
    settle,
    sqlite_probe,
)
from bench.procs import eventually, in_process, new_whsec
from relay.receiver import Received, Response


def busiest_second(times_ns: Sequence[int]) -> int:
    """The most arrivals in any one-second window."""
    times = sorted(times_ns)
    best = j = 0
    for i, start in enumerate(times):
        while j < len(times) and times[j] < start + 1_000_000_000:
            j += 1
        best = max(best, j - i)
    return best


async def endpoint_health(
    workdir: Path, *, events: int, outage: float = 2.0, rate: float = 100.0, limit: int = 40
) -> Outcome:
    """Endpoint health under faults (CONTRACT.md 5b, 5c): ``flaky`` fails every way a
    retried failure can (5xx, 429 with Retry-After, resets, timeouts) for ``outage`` seconds,
    then recovers; ``limited`` is healthy under a rate limit and is paused and resumed by an
    operator mid-run; ``healthy`` must not notice; operational events go to ``alerts``.
    Nothing may go dead or out of order, the flaky endpoint sees only probes while open, the
    limit holds at the receiver, and each transition raises exactly one alert."""
    secret = new_whsec()
    rng = random.Random(11)
    began = {"at": math.inf}

    def flaky_decide(r: Received) -> Response:
        if time.monotonic() - began["at"] >= outage:
            return OK
        x = rng.random()
        if x < 0.4:
            return Response(503)
        if x < 0.6:
            return Response(429, headers={"Retry-After": "0"})
        if x < 0.8:
            return Response(close=True)
        return Response(204, delay=DELIVERY_TIMEOUT + 0.2)

    async with contextlib.AsyncExitStack() as stack:
        sim = await _sim(stack, rate=rate, users=30, count=events, seed=11)
        flaky = await _endpoint(stack, "flaky", [secret], flaky_decide)
        limited = await _endpoint(stack, "limited", [secret])
        healthy = await _endpoint(stack, "healthy", [secret])
        alerts = await _endpoint(stack, "alerts", [secret])
        db = workdir / "health.db"
        env = relay_env(
            sim,
            [flaky.config(), limited.config(rate_limit=limit), healthy.config()],
            secret,
            f"sqlite:///{db}",
            RELAY_ALERT_URL=alerts.url,
            RELAY_ADMIN_TOKEN="chaos-health-admin-token-000000",
            RELAY_RETRY_SCHEDULE="0s,50ms,100ms",  # three attempts: a breaker must save them
        )
        states: list[tuple[float, str]] = []
        async with in_process(env, health_poll=0.05) as running:
            began["at"] = time.monotonic()

            async def watch() -> None:
                while True:
                    state = running.relay.monitor.state("flaky")
                    if not states or states[-1][1] != state:
                        states.append((time.monotonic() - began["at"], state))
                    await asyncio.sleep(0.01)

            watcher = asyncio.create_task(watch())
            headers = {"Authorization": "Bearer chaos-health-admin-token-000000"}
            try:
                async with httpx.AsyncClient(base_url=running.admin, headers=headers) as http:
                    await asyncio.sleep(0.5)
                    paused = (await http.post("/api/endpoints/limited/pause")).json()
                    await asyncio.sleep(1.0)  # attempts in flight finish
                    while_paused = len(limited.arrivals)
                    await asyncio.sleep(0.5)
                    quiet = len(limited.arrivals) - while_paused
                    resumed = (await http.post("/api/endpoints/limited/resume")).json()
                await eventually(sim.finished.is_set, 60, "the simulator sent everything")
                # The limited endpoint takes events / limit seconds at least.
                await settle(sqlite_probe(sim, db), timeout=30 + 1.5 * events / limit)
                await eventually(lambda: len(alerts.arrivals) >= 4, 10, "the alerts")
                await asyncio.sleep(0.3)
            finally:
                watcher.cancel()

        deliveries, stored = sqlite_deliveries(db)
        alert_events = {d.event_id for d in deliveries if d.endpoint == alerts.name}
        report = audit(
            "endpoint health: breaker, probes, pause/resume, rate limit, alerts",
            [d for d in deliveries if d.endpoint != alerts.name],
            flaky.arrivals + limited.arrivals + healthy.arrivals,
            endpoints=[flaky.name, limited.name, healthy.name],
            stored_events=stored - alert_events,
            sent=sent_ids(sim),
            must_store_sent=True,
        )
        types = Counter(
            json.loads(body)["type"]
            for (body,) in rows(
                db,
                "SELECT e.body FROM events e JOIN deliveries d ON d.event_seq = e.seq "
                "WHERE d.endpoint = 'alerts'",
            )
        )
        opened = [t for t, state in states if state == "open"]
        closed = [t for t, state in states if state == "active" and opened and t > opened[0]]
        flaky_times = [a.at_ns / 1e9 for a in flaky.arrivals]
        wall_began = time.time() - (time.monotonic() - began["at"])
        during_open = []
        for start in opened:
            end = min([t for t in closed if t > start] or [math.inf])
            during_open += [t for t in flaky_times if start + 0.05 < t - wall_began < end - 0.05]
        received_at = dict(rows(db, "SELECT event_id, received_at FROM events"))
        latencies = sorted(
            at / 1e9 - received_at[event_id]
            for event_id, at in healthy.arrival_times().items()
            if event_id in received_at
        )
        facts = {
            "healthy_p50_latency_s": round(statistics.median(latencies), 3),
            "healthy_max_latency_s": round(latencies[-1], 3),
            "states": states,
            "alerts": dict(types),
            "attempts_while_open": len(during_open),
            "flaky_attempts": len(flaky.arrivals),
            "limited_busiest_second": busiest_second([a.at_ns for a in limited.arrivals]),
            "paused": paused,
            "resumed": resumed,
            "arrivals_while_paused": quiet,
        }
        if types["endpoint.opened"] < 1 or types["endpoint.recovered"] != types["endpoint.opened"]:
            report.problem(f"alerts do not pair up: {dict(types)}")
        if types["endpoint.paused"] != 1 or types["endpoint.resumed"] != 1:
            report.problem(f"pause/resume alerts: {dict(types)}")
        if quiet:
            report.problem(f"{quiet} attempts reached a paused endpoint")
        if facts["limited_busiest_second"] > limit + 1:
            report.problem(f"rate limit {limit}/s: {facts['limited_busiest_second']} in a second")
        # Probes after 0.1, 0.2, 0.4 ... s, never more than one at a time: few per open spell.
        if len(during_open) > 8 * max(1, len(opened)):
            report.problem(f"{len(during_open)} attempts while open: not only probes")
        report.notes.append(
            f"flaky endpoint: {len(flaky.arrivals)} attempts, {len(during_open)} while open "
            f"({len(opened)} open spells); states {states}; alerts {dict(types)}; limited "
            f"endpoint's busiest second {facts['limited_busiest_second']} (limit {limit}/s), "
            f"{quiet} arrivals while paused; healthy endpoint latency p50 "
            f"{facts['healthy_p50_latency_s']}s, max {facts['healthy_max_latency_s']}s"
        )
        return Outcome(report, facts)
