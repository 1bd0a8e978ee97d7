"""Chaos: real parts, real faults, then an audit of the store against what the endpoints got.

``python -m bench.chaos`` runs every scenario at full size (a few minutes), prints the table
and writes ``bench/results/chaos.md``; ``--quick`` runs the CI sizes, ``--only NAME`` some.
``tests/test_chaos.py`` runs the same scenarios at CI sizes and asserts on their reports.

Every scenario drives a real simulator (``relay.simulator``), real receivers
(``relay.receiver``), a real store and the relay itself, either as ``relay run`` subprocesses
(where a kill -9 or separate timing matters) or in this event loop (where the scenario needs
short feed timings, the admin port or the metrics registry). Each ends with the audit of
``bench/audit.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from bench.audit import AuditReport
from bench.chaos.admin import admin_tricks
from bench.chaos.configs import config_fuzz
from bench.chaos.crash import crash_loop
from bench.chaos.endpoints import (
    endpoint_faults,
    excerpt_size,
    gzip_answers,
    hostile_retry_after,
    large_event,
)
from bench.chaos.feed import feed_faults, feed_faults_real_timings
from bench.chaos.harness import CI, FULL, Outcome, ScenarioSkipped, Sizes
from bench.chaos.health import endpoint_health
from bench.chaos.hostile import hostile_frames
from bench.chaos.leaks import leak_audit
from bench.chaos.replicas import replicas_broadcast
from bench.chaos.stores import postgres_cut, quarantine_while_down, store_full

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results" / "chaos.md"

COLUMNS = (
    "scenario",
    "events sent",
    "stored",
    "delivered",
    "lost",
    "duplicates",
    "order violations",
    "leaks",
)


NOT_SIMULATED = (
    "the real sFOX: every feed fault is the simulator's (drops, stalls, garbage, rejected keys, "
    "slow handshakes), and its per-IP limits are the simulator's counts of connections and "
    "requests",
    "power loss: kill -9 leaves the page cache to the kernel, so fsync ordering is not tested",
    "disk I/O errors (EIO) and a read-only remount: the SQLite fault is ENOSPC on a 32 MB tmpfs",
    "a PostgreSQL crash, failover or restart: only its TCP connections are cut (by a proxy)",
    "packet loss, latency and partitions below TCP (no netem here): only clean drops, resets "
    "and stalls",
    "frames over the relay's 4 MiB limit (tests/test_feed.py plays one at 10 kB): the relay "
    "closes the connection (1009), counts the frame and quarantines a record of it (not its "
    "text), and reconnects; frames in flight behind it are left to reconciliation",
    "a supervisor restarting a crashing relay faster than sFOX's limits allow: each process "
    "has a fresh connection limiter (the crash loop reports its connections per minute)",
)


def table(reports: Sequence[AuditReport | tuple[str, str]]) -> str:
    """The results table in Markdown (a skipped scenario is a row with its reason)."""
    lines = ["| " + " | ".join(COLUMNS) + " | verdict |", "|" + "---|" * (len(COLUMNS) + 1)]
    for item in reports:
        if isinstance(item, tuple):
            name, reason = item
            lines.append(f"| {name} |" + " |" * (len(COLUMNS) - 1) + f" skipped: {reason} |")
            continue
        row = item.row()
        verdict = "ok" if item.ok else f"FAIL ({len(item.problems)} problems)"
        lines.append("| " + " | ".join(str(row[c]) for c in COLUMNS) + f" | {verdict} |")
    return "\n".join(lines)


def scenarios(sizes: Sizes, *, real_timings: bool) -> dict[str, Callable[[Path], Awaitable[Any]]]:
    s = sizes
    plan: dict[str, Callable[[Path], Awaitable[Any]]] = {
        "crash": lambda w: crash_loop(
            w, kills=s.kills, rate=s.crash_rate, tail=s.crash_tail, dwell=s.crash_dwell
        ),
        "crash-postgres": lambda w: crash_loop(
            w,
            kills=s.kills,
            rate=s.crash_rate,
            tail=s.crash_tail,
            dwell=s.crash_dwell,
            postgres=True,
        ),
        "feed": lambda w: feed_faults(
            w, phase=s.feed_phase, drops=s.feed_drops, rejections=s.feed_rejections
        ),
        "endpoints": lambda w: endpoint_faults(w, events=s.endpoint_events, rate=s.endpoint_rate),
        "endpoint-health": lambda w: endpoint_health(w, events=s.endpoint_events),
        "excerpt": excerpt_size,
        "retry-after": hostile_retry_after,
        "large-event": large_event,
        "store-sqlite": lambda w: store_full(w, outage=s.store_outage),
        "quarantine": quarantine_while_down,
        "store-postgres": lambda w: postgres_cut(w, outage=s.store_outage),
        "replicas-broadcast": lambda w: replicas_broadcast(
            w, runs=s.broadcast_runs, seconds=s.broadcast_seconds
        ),
        "hostile": lambda w: hostile_frames(w, frames=s.fuzz_frames),
        "hostile-postgres": lambda w: hostile_frames(w, frames=s.fuzz_frames, store="postgres"),
        "gzip": gzip_answers,
        "gzip-postgres": lambda w: gzip_answers(w, store="postgres"),
        "config": lambda w: config_fuzz(w, examples=s.config_examples),
        "admin": admin_tricks,
        "leaks-json": lambda w: leak_audit(w, log_format="json"),
        "leaks-console": lambda w: leak_audit(w, log_format="console"),
        "leaks-echo": lambda w: leak_audit(w, log_format="json", echo=True),
    }
    if real_timings:
        plan["feed-real"] = feed_faults_real_timings
    return plan


async def run_all(sizes: Sizes, only: Sequence[str], *, real_timings: bool, write: bool) -> int:
    plan = scenarios(sizes, real_timings=real_timings)
    chosen = [name for name in plan if not only or name in only]
    results: list[AuditReport | tuple[str, str]] = []
    started = time.monotonic()
    for name in chosen:
        t0 = time.monotonic()
        with tempfile.TemporaryDirectory(prefix=f"chaos-{name}-") as tmp:
            try:
                outcome = await plan[name](Path(tmp))
            except ScenarioSkipped as skip:
                print(f"[{name}] skipped: {skip}", flush=True)
                results.append((name, str(skip)))
                continue
            except Exception as exc:  # a scenario that cannot even finish is a failure too
                report = AuditReport(name, sent=0, stored=0)
                report.problem(f"the scenario failed: {type(exc).__name__}: {exc}")
                outcome = Outcome(report)
        outcome.report.notes.append(f"took {time.monotonic() - t0:.1f}s")
        print(outcome.report.explain(), flush=True)
        results.append(outcome.report)
    text = table(results)
    print("\n" + text)
    failed = [r for r in results if isinstance(r, AuditReport) and not r.ok]
    if write:
        write_results(results, text, time.monotonic() - started, sizes)
    return 1 if failed else 0


def write_results(
    results: Sequence[AuditReport | tuple[str, str]], text: str, took: float, sizes: Sizes
) -> None:
    lines = [
        "# Chaos run",
        "",
        f"`python -m bench.chaos` on {socket.gethostname()} ({os.cpu_count()} CPUs), "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {took:.0f}s in all.",
        "Every row ends with the audit of `bench/audit.py`: every stored event delivered to "
        "every matching endpoint (dead only where the scenario refused it for good), per-user "
        "order at the receiver, duplicates only for deliveries in flight at a kill -9, no "
        "secret in any output.",
        "",
        text,
        "",
        "## Details",
        "",
    ]
    for item in results:
        if isinstance(item, tuple):
            lines.append(f"- **{item[0]}**: skipped: {item[1]}")
            continue
        dead = f" {item.dead} dead, each one the scenario meant." if item.dead and item.ok else ""
        lines.append(f"- **{item.scenario}**:{dead}")
        lines += [f"  - {note}" for note in item.notes]
        lines += [f"  - PROBLEM: {p}" for p in item.problems]
    lines += ["", "## Not simulated here", ""]
    lines += [f"- {item}" for item in NOT_SIMULATED]
    lines += ["", f"Sizes: `{sizes}`", ""]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines))
    print(f"\nwrote {RESULTS.relative_to(ROOT)}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="CI sizes, no 90 s real-timing run, no results file"
    )
    parser.add_argument("--only", action="append", default=[], help="run just these scenarios")
    args = parser.parse_args(argv)
    quiet = logging.StreamHandler()
    quiet.setLevel(logging.ERROR)
    logging.getLogger().addHandler(quiet)
    sizes = CI if args.quick else FULL
    full = not args.quick and not args.only  # only a whole full run writes the results
    return asyncio.run(run_all(sizes, args.only, real_timings=not args.quick, write=full))
