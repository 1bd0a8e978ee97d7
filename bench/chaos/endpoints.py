"""Chaos, endpoints: receivers that fail, redirect, answer huge, gzip or hostile bodies, and
an event at the size limit."""

from __future__ import annotations

import contextlib
import gzip
import math
import random
import statistics
import warnings
from pathlib import Path
from typing import Any

from bench.audit import audit, expected_event_id, sqlite_deliveries
from bench.chaos.harness import (
    DELIVERY_TIMEOUT,
    OK,
    SCHEDULE_STEPS,
    Decide,
    Outcome,
    RelayProcess,
    _endpoint,
    _is_control,
    _sim,
    count,
    fresh_message,
    open_view,
    relay_env,
    rows,
    sent_ids,
    settle,
    sqlite_probe,
)
from bench.procs import eventually, in_process, new_whsec
from relay.receiver import Received, Response

BIG_TEXT = b"x" * (10 * 1024 * 1024)
BIG_BINARY = b"\xfe\xff" * (5 * 1024 * 1024)
PERMANENT = {301, 410}


def chaos_decider(rng: random.Random, redirect_to: str) -> Decide:
    """A misbehaving endpoint: every answer drawn at random."""

    def decide(r: Received) -> Response:
        x = rng.random()
        if x < 0.30:
            return Response(500, body=b'{"error":"upstream exploded"}')
        if x < 0.37:
            return Response(204, delay=DELIVERY_TIMEOUT + 0.5)  # past the relay's timeout
        if x < 0.44:
            return Response(429, headers={"Retry-After": "1"})
        if x < 0.51:
            return Response(close=True)  # a connection reset
        if x < 0.54:
            return Response(503, body=BIG_TEXT)
        if x < 0.56:
            return Response(200, body=BIG_TEXT)
        if x < 0.59:
            return Response(410, body=b"gone")
        if x < 0.62:
            return Response(301, headers={"Location": redirect_to})
        return OK

    return decide


async def endpoint_faults(
    workdir: Path, *, events: int, rate: float = 200.0, users: int = 40, seed: int = 3
) -> Outcome:
    """``relay run`` with two endpoints: one fails in every way an endpoint can, the other is
    healthy and must get everything promptly regardless."""
    rng = random.Random(seed)
    secret = new_whsec()
    async with contextlib.AsyncExitStack() as stack:
        sim = await _sim(stack, rate=rate, users=users, count=events, seed=seed)
        healthy = await _endpoint(stack, "healthy", [secret])
        chaos = await _endpoint(
            stack, "chaos", [secret], chaos_decider(rng, healthy.receiver.url + "/redirected")
        )
        db = workdir / "endpoints.db"
        env = relay_env(sim, [chaos, healthy], secret, f"sqlite:///{db}")
        proc = await RelayProcess.start(env, workdir / "endpoints.log")
        try:
            await eventually(sim.finished.is_set, 60, "the simulator sent everything")
            await settle(sqlite_probe(sim, db), timeout=90)
        finally:
            proc.terminate()
            code = await proc.wait()

        deliveries, stored = sqlite_deliveries(db)

        def dead_ok(d: Any) -> bool:
            return d.endpoint == chaos.name and (
                d.last_status in PERMANENT or d.attempts >= SCHEDULE_STEPS
            )

        report = audit(
            "endpoint faults: 500, timeout, 429, reset, 10 MB, 410, 301",
            deliveries,
            chaos.arrivals + healthy.arrivals,
            endpoints=[chaos.name, healthy.name],
            stored_events=stored,
            sent=sent_ids(sim),
            must_store_sent=True,
            dead_ok=dead_ok,
        )
        received_at = dict(rows(db, "SELECT event_id, received_at FROM events"))
        latencies = [
            at / 1e9 - received_at[event_id]
            for event_id, at in healthy.arrival_times().items()
            if event_id in received_at
        ]
        excerpt = rows(
            db,
            "SELECT MAX(length(CAST(excerpt AS BLOB))), MAX(length(excerpt)) FROM attempts",
        )[0]
        statuses = dict(
            rows(db, "SELECT COALESCE(status, 0), COUNT(*) FROM attempts GROUP BY status")
        )
        facts = {
            "exit_code": code,
            "healthy_max_latency_s": round(max(latencies), 3) if latencies else math.nan,
            "healthy_p50_latency_s": round(statistics.median(latencies), 3),
            "healthy_strays": list(healthy.strays),
            "excerpt_max_bytes": excerpt[0] or 0,
            "excerpt_max_chars": excerpt[1] or 0,
            "attempt_statuses": statuses,
            "dead_by_status": dict(
                rows(
                    db,
                    "SELECT last_status, COUNT(*) FROM deliveries WHERE state = 'dead' "
                    "GROUP BY last_status",
                )
            ),
        }
        if code != 0 or "Traceback" in proc.output():
            report.problem(f"relay run exited {code}:\n{proc.output()[-2000:]}")
        if healthy.strays:
            report.problem(f"a redirect was followed: {healthy.strays[:3]}")
        if facts["excerpt_max_bytes"] > 1024:
            report.problem(
                f"a stored response excerpt is {facts['excerpt_max_bytes']} bytes (> 1 KiB)"
            )
        report.notes.append(
            f"healthy endpoint latency max {facts['healthy_max_latency_s']}s, "
            f"p50 {facts['healthy_p50_latency_s']}s; {report.dead} dead at the chaos endpoint "
            f"(by last status {facts['dead_by_status']}); largest stored excerpt "
            f"{facts['excerpt_max_bytes']} bytes"
        )
        return Outcome(report, facts)


async def excerpt_size(workdir: Path) -> Outcome:
    """An endpoint answering 10 MB that is not UTF-8: every stored response excerpt must stay
    within 1 KiB (the README, "Dead deliveries")."""
    secret = new_whsec()
    async with contextlib.AsyncExitStack() as stack:
        sim = await _sim(stack, count=6, users=6)
        binary = await _endpoint(
            stack, "binary", [secret], lambda r: Response(502, body=BIG_BINARY)
        )
        db = workdir / "excerpt.db"
        # The endpoint fails for good and every delivery must run out of its schedule: an open
        # breaker would hold them instead (probes use no attempt), so it stays out of the way.
        env = relay_env(
            sim,
            [binary],
            secret,
            f"sqlite:///{db}",
            RELAY_RETRY_SCHEDULE="0s,50ms",
            RELAY_BREAKER_THRESHOLD="1000000",
        )
        async with in_process(env):
            await eventually(sim.finished.is_set, 10, "the simulator sent everything")
            await settle(sqlite_probe(sim, db), timeout=20)
        sizes = [r[0] for r in rows(db, "SELECT length(CAST(excerpt AS BLOB)) FROM attempts")]
        deliveries, events = sqlite_deliveries(db)
        report = audit(
            "endpoint answers 10 MB of non-UTF-8 bytes",
            deliveries,
            binary.arrivals,
            endpoints=[binary.name],
            stored_events=events,
            sent=sent_ids(sim),
            must_store_sent=True,
            dead_ok=lambda d: d.attempts >= 2,
        )
    biggest = max(sizes, default=0)
    if biggest > 1024:
        report.problem(f"a stored response excerpt is {biggest} bytes (> 1 KiB)")
    report.notes.append(f"{len(sizes)} attempts; largest stored excerpt {biggest} bytes")
    return Outcome(report, {"excerpt_max_bytes": biggest, "attempts": len(sizes)})


#: A gzip-compressed error page, as a proxy in front of an endpoint may send it whatever the
#: request asked for: binary, NUL bytes and all.
GZIP_ERROR_PAGE = gzip.compress(
    b"<html><body>502 Bad Gateway</body></html>" + bytes(range(256)) * 16
)


async def gzip_answers(workdir: Path, *, store: str = "sqlite", events: int = 20) -> Outcome:
    """An endpoint that answers each event's first attempt 502 with a gzip-compressed body:
    the relay must ask for uncompressed answers, store every excerpt without control
    characters (PostgreSQL refuses NUL: every verdict then failed to record, and every
    delivery stayed in flight), and deliver everything on the retry."""
    view = await open_view(workdir, store, "gzip")
    secret = new_whsec()
    seen: set[str] = set()
    encodings: set[str] = set()

    def decide(r: Received) -> Response:
        encodings.add(r.headers.get("accept-encoding", "(none)"))
        if r.webhook_id in seen:
            return OK
        seen.add(r.webhook_id)
        headers = {"content-encoding": "gzip", "content-type": "text/html"}
        return Response(502, headers=headers, body=GZIP_ERROR_PAGE)

    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(view.close)
        sim = await _sim(stack, count=events, users=5)
        odd = await _endpoint(stack, "gzip", [secret], decide)
        env = relay_env(sim, [odd], secret, view.url, RELAY_RETRY_SCHEDULE="0s,50ms,100ms")
        async with in_process(env) as running:
            await eventually(sim.finished.is_set, 10, "the simulator sent everything")
            with contextlib.suppress(AssertionError):  # the audit says what is left
                await settle(view.counts, timeout=15)
            alive = running.alive()
        deliveries, stored = await view.deliveries()
        excerpts = await view.excerpts()
    report = audit(
        f"endpoint answers gzip-compressed binary ({view.name})",
        deliveries,
        odd.arrivals,
        endpoints=[odd.name],
        stored_events=stored,
        sent=sent_ids(sim),
        must_store_sent=True,
    )
    dirty = sum(any(_is_control(c) for c in e) for e in excerpts)
    if not alive:
        report.problem("the relay stopped running")
    if dirty:
        report.problem(f"{dirty} stored excerpts hold a control character")
    if len(excerpts) < events:
        report.problem(f"{len(excerpts)} excerpts recorded for {events} failed attempts")
    if encodings != {"identity"}:
        report.problem(f"the relay asked for accept-encoding {sorted(encodings)}")
    report.notes.append(f"{len(excerpts)} excerpts, none with a control character: {not dirty}")
    facts = {"excerpts": len(excerpts), "dirty": dirty, "encodings": sorted(encodings)}
    return Outcome(report, facts)


async def large_event(workdir: Path, *, size: int = 1_040_000) -> Outcome:
    """One event just under the 1 MiB frame limit must be delivered, without a warning on the
    way (the project's tests turn warnings into errors, and a warning raised inside a delivery
    is an "internal error"); one just over it is a bad frame: counted, kept, skipped, and the
    connection lives on (CONTRACT.md section 5)."""
    secret = new_whsec()
    rng = random.Random(9)
    message = fresh_message(rng, 1)
    message["payload"]["notes"] = "n" * size
    too_big = fresh_message(rng, 2)
    too_big["payload"]["notes"] = "n" * (1024 * 1024 + 10_000)
    async with contextlib.AsyncExitStack() as stack:
        sim = await _sim(stack, count=0, users=1)
        sink = await _endpoint(stack, "sink", [secret])
        db = workdir / "large.db"
        env = relay_env(sim, [sink], secret, f"sqlite:///{db}")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            async with in_process(env) as running:
                await eventually(lambda: sim.subscribed > 0, 10, "subscribed")
                await sim.publish(too_big)
                await sim.publish(message)
                with contextlib.suppress(AssertionError):  # the audit says what is left
                    await settle(sqlite_probe(sim, db), timeout=10)
                bad = int(running.metric("relay_feed_bad_frames_total"))
        relayed = [w for w in caught if "relay" in w.filename or "aiohttp" in w.filename]
        deliveries, events = sqlite_deliveries(db)
        quarantined = count(db, "SELECT COUNT(*) FROM bad_frames")
        report = audit(
            f"one event of {size / 1e6:g} MB, one over 1 MiB",
            deliveries,
            sink.arrivals,
            endpoints=[sink.name],
            stored_events=events,
            sent=[expected_event_id(message)],
            must_store_sent=True,
        )
    for w in relayed:
        report.problem(f"{w.category.__name__} during the delivery: {w.message}")
    if bad != 1 or quarantined != 1:
        report.problem(f"the frame over 1 MiB: {bad} counted, {quarantined} quarantined")
    if sim.connections != 1:
        report.problem(f"the relay reconnected: {sim.connections} connections")
    facts = {"warnings": [str(w.message) for w in relayed], "bad": bad, "kept": quarantined}
    return Outcome(report, facts)


#: A Retry-After no calendar holds (year 99,999,999,999).
HOSTILE_RETRY_AFTER = "Mon, 01 Jan 99999999999 00:00:00 GMT"


async def hostile_retry_after(workdir: Path, *, patience: float = 8.0) -> Outcome:
    """An endpoint answering 503 with a ``Retry-After`` date beyond any calendar, once per
    event: each delivery must still be retried (then delivered) or die, never hang."""
    secret = new_whsec()
    seen: set[str] = set()

    def decide(r: Received) -> Response:
        if r.webhook_id in seen:
            return OK
        seen.add(r.webhook_id)
        return Response(503, headers={"Retry-After": HOSTILE_RETRY_AFTER})

    async with contextlib.AsyncExitStack() as stack:
        sim = await _sim(stack, count=10, users=5)
        odd = await _endpoint(stack, "odd", [secret], decide)
        db = workdir / "retry-after.db"
        env = relay_env(sim, [odd], secret, f"sqlite:///{db}")
        async with in_process(env) as running:
            await eventually(sim.finished.is_set, 10, "the simulator sent everything")
            with contextlib.suppress(AssertionError):  # the audit says what is left
                await settle(sqlite_probe(sim, db), timeout=patience)
            alive = running.alive()
        deliveries, events = sqlite_deliveries(db)
        report = audit(
            "endpoint answers Retry-After beyond any calendar",
            deliveries,
            odd.arrivals,
            endpoints=[odd.name],
            stored_events=events,
            sent=sent_ids(sim),
            must_store_sent=True,
            dead_ok=lambda d: True,
        )
    if not alive:
        report.problem("the relay stopped running")
    stuck = sum(d.state != "delivered" for d in deliveries)
    report.notes.append(
        f"{stuck} of {len(deliveries)} deliveries not delivered after {patience:g} s"
    )
    return Outcome(report, {"stuck": stuck, "alive": alive})
