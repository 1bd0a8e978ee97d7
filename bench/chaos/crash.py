"""Chaos, crashes: the relay killed (-9 or TERM) again and again while events flow."""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import uuid
from pathlib import Path

from bench.audit import audit
from bench.chaos.harness import (
    Outcome,
    PostgresView,
    RelayProcess,
    ScenarioSkipped,
    SqliteView,
    _endpoint,
    _sim,
    postgres_available,
    relay_env,
    sent_ids,
    settle,
)
from bench.procs import eventually, new_whsec
from relay.receiver import Response

KILL_MODES = ["kill", "term, then kill", "term, term"]


async def crash_loop(
    workdir: Path,
    *,
    kills: int,
    rate: float = 200.0,
    tail: float = 1.0,
    users: int = 50,
    seed: int = 1,
    postgres: bool = False,
    dwell: float = 2.5,
) -> Outcome:
    """kill -9 the daemon at random points under a steady feed (some during the phased
    shutdown SIGTERM starts, some by a second SIGTERM, which exits at once), restart it on the
    same store each time; at the end stop the feed, let the last daemon drain, audit.

    ``postgres``: the same on a PostgreSQL store, with a 3 s lease (a killed daemon's claims
    wait for it before the next one takes them over).
    """
    rng = random.Random(seed)
    secret = new_whsec()
    view: SqliteView | PostgresView
    if postgres:
        reason = await postgres_available()
        if reason is not None:
            raise ScenarioSkipped(reason)
        view = PostgresView(f"relay_chaos_{uuid.uuid4().hex[:10]}")
        await view.create()
    else:
        view = SqliteView(workdir / "crash.db")
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(view.close)
        sim = await _sim(stack, rate=rate, users=users, count=None, seed=seed)
        fast = await _endpoint(stack, "fast", [secret])
        slow = await _endpoint(
            stack, "slow", [secret], lambda r: Response(204, delay=rng.uniform(0.0, 0.08))
        )
        env = relay_env(sim, [fast, slow], secret, view.url, RELAY_LEASE="3s")
        crashed: set[tuple[str, str]] = set()
        committed: set[str] = set()
        outputs: list[str] = []
        killed_while_subscribed = 0
        modes: dict[str, int] = {}
        early_terms = 0
        for n in range(kills):
            subscribes = sim.subscribes
            proc = await RelayProcess.start(env, workdir / f"crash-{n}.log")
            # A random point: one kill in four during start-up (imports, migrations, the
            # handshake), the others anywhere in the steady state.
            if n >= len(KILL_MODES) and rng.random() < 0.25:
                await asyncio.sleep(rng.uniform(0.2, 2.0))
            else:

                def resubscribed(before: int = subscribes) -> bool:
                    return sim.subscribes > before

                with contextlib.suppress(AssertionError):
                    await eventually(resubscribed, 15)
                await asyncio.sleep(rng.uniform(0.1, dwell))
            killed_while_subscribed += sim.subscribed > 0
            mode = KILL_MODES[n] if n < len(KILL_MODES) else rng.choice(KILL_MODES * 2 + ["kill"])
            modes[mode] = modes.get(mode, 0) + 1
            if mode == "kill":
                proc.kill()
                allowed = {-signal.SIGKILL}
            elif mode == "term, then kill":  # kill -9 during the phased shutdown
                proc.terminate()
                await asyncio.sleep(rng.uniform(0.05, 0.5))
                proc.kill()
                allowed = {0, -signal.SIGKILL, -signal.SIGTERM}
            else:  # a second signal exits at once
                proc.terminate()
                await asyncio.sleep(rng.uniform(0.01, 0.2))
                proc.terminate()
                allowed = {0, 1, -signal.SIGTERM}
            code = await proc.wait()
            outputs.append(proc.output())
            # Python's default action: SIGTERM before the relay installed its handlers (still
            # importing; nothing open yet).
            early_terms += code == -signal.SIGTERM
            if code not in allowed:
                raise AssertionError(f"relay run exited {code} ({mode}):\n{outputs[-1]}")
            crashed |= await view.in_flight()
            committed |= await view.event_ids()
        last = await RelayProcess.start(env, workdir / "crash-final.log")
        await eventually(lambda: sim.subscribed > 0, 20, last.output)
        await asyncio.sleep(tail)
        sim.pause()

        async def probe() -> tuple[int, int, int]:
            return (len(sim.sent), *await view.counts())

        await settle(probe, timeout=60)
        last.terminate()
        code = await last.wait()
        outputs.append(last.output())

        deliveries, events = await view.deliveries()
        report = audit(
            f"crash loop ({view.name}): {kills} kills at {rate:g} events/s",
            deliveries,
            fast.arrivals + slow.arrivals,
            endpoints=[fast.name, slow.name],
            stored_events=events,
            sent=sent_ids(sim),
            crashed_in_flight=crashed,
            committed=committed,
        )
        if code != 0:
            report.problem(f"the last daemon exited {code} on SIGTERM")
        for text in outputs:
            if "Traceback" in text:
                report.problem("a daemon printed a traceback:\n" + text[-2000:])
                break
        per_minute = sim.max_connections_per_minute()
        report.notes.append(
            f"kills by kind {modes} (SIGTERMs that landed during start-up, before the "
            f"handlers, ending the process by Python's default action: {early_terms}); "
            f"{len(crashed)} deliveries in flight at the kills; {killed_while_subscribed} kills "
            f"while subscribed; {sim.connections} feed connections, at most {per_minute} in a "
            "minute (each restart is a new process with a fresh limiter)"
        )
        return Outcome(
            report,
            {
                "exit_code": code,
                "in_flight_at_kills": len(crashed),
                "killed_while_subscribed": killed_while_subscribed,
                "modes": modes,
                "connections_per_minute": per_minute,
            },
        )
