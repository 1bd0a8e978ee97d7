"""``python -m bench``: sfox-relay side by side with a naive relay and this machine's limits.

Scenarios, each with its own processes (simulator, receiver, relay or baseline, wrk):

- ``wrk``: the receiver's limit, ``wrk -t1 -c32`` POSTing a ~650-byte JSON body.
- ``idle``: start-up time to ``/readyz`` 200 and the resident set of an idle relay.
- ``ingest``: the simulator at full speed into ``relay run`` whose endpoint waits an hour
  (``RELAY_RETRY_SCHEDULE=1h``): events committed per second, and the RSS with that backlog.
- ``drain``: N events stored while the endpoint's port is closed, then the receiver starts:
  deliveries per second from the stored backlog.
- ``live``: the simulator at full speed through the relay, then through the naive baseline, to
  the receiver: events per second end to end, the same feed for both.
- ``latency``: 200 events/s for 30 s through each: receiver arrival minus the simulator's send
  timestamp, p50/p95/p99/max.
- ``busy``: the latency scenario again, with one core kept busy by another process (a CPU-bound
  loop pinned to CPU 0) for the relay and for the baseline alike: the tail when the machine is
  shared, as it is in production.
- ``reconnect``: the simulator aborts the connection after 300 messages; time from the drop to
  subscribed again (``relay_feed_connected`` polled every 10 ms); the baseline just exits.
- ``pg``: only with ``SFOX_RELAY_BENCH_PG`` set to a PostgreSQL URL (it creates and drops its own
  databases there): the live feed through 1 and through 3 replicas (RELAY_REPLICAS=3, distinct
  webhook-ids and duplicates counted at the receiver), and p99 latency at 200 events/s with 1
  replica, next to the SQLite figures of the same run; skipped with a note otherwise.

Exit status: 0 when the harness worked (targets missed or not), 1 when it failed (a process
crashed, nothing arrived, a bounded wait ran out), 130 when interrupted.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import math
import os
import platform
import re
import secrets
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from bench.procs import (
    LOOPBACK,
    ROOT,
    HarnessError,
    Proc,
    Procs,
    RssSampler,
    child_env,
    free_port,
    http_get,
    json_safe,
    metric,
    parse_metrics,
    wait_until,
)
from bench.receiver_proc import STATS_PATH
from bench.report import (
    Ratio,
    Row,
    fmt_mb,
    fmt_ms,
    fmt_rate,
    fmt_ratio,
    markdown,
    percentile,
    plot,
    ratio_text,
    rows_as_json,
)

__all__ = ["main"]

PY = sys.executable
API_KEY = "bench-" + secrets.token_hex(8)
SIGNING_SECRET = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
#: Stored while the endpoint is down: retried every second for two minutes, then drained.
DRAIN_SCHEDULE = ",".join(["0s"] + ["1s"] * 120)
SCENARIOS = ("wrk", "idle", "ingest", "drain", "live", "latency", "busy", "reconnect", "pg")
LATENCY_RATE = 200
DROP_EVERY = 300
MB = 2**20

# Targets (PERFORMANCE.md / the project's goals).
TARGET_VS_NAIVE = 3.0
TARGET_VS_LIMIT = 0.5
TARGET_INGEST = 20_000.0
TARGET_P99_NS = 20e6
#: Live delivery while the feed is still being stored, as a share of the rate after.
TARGET_WHILE_INGESTING = 0.7
#: p99 with one core kept busy: at most this many times the baseline's, and below the bound.
TARGET_BUSY_VS_NAIVE = 2.0
TARGET_BUSY_P99_NS = 10e6
TARGET_RSS = 80 * MB
TARGET_RSS_GROWTH = 20 * MB
TARGET_RESUBSCRIBE = 2.0
#: Above this share of the machine's CPU used by other processes, the run is called noisy.
OTHERS_NOISY = 0.10


@dataclass(frozen=True, slots=True)
class Sizes:
    wrk_seconds: int
    live: int
    drain: int
    backlog: int
    latency_seconds: int
    reconnects: int
    idle_seconds: float


FULL = Sizes(
    wrk_seconds=10,
    live=50_000,
    drain=50_000,
    backlog=100_000,
    latency_seconds=30,
    reconnects=5,
    idle_seconds=3.0,
)
QUICK = Sizes(
    wrk_seconds=3,
    live=5_000,
    drain=10_000,
    backlog=20_000,
    latency_seconds=10,
    reconnects=2,
    idle_seconds=1.5,
)


class Incomplete(HarnessError):
    """A bounded wait ran out with partial progress: the figure is kept, marked incomplete."""


@dataclass
class Bench:
    """What every scenario shares: sizes, the scratch directory, results and notes."""

    sizes: Sizes
    users: int
    tmp: Path
    profile: bool
    #: Where --profile's summaries go (--results).
    out: Path = ROOT / "bench" / "results"
    results: dict[str, Any] = field(default_factory=dict)
    series: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    ready_times: list[float] = field(default_factory=list)
    load_at_start: tuple[float, float, float] | None = None
    cpu_at_start: tuple[float, float, float] | None = None  # machine busy, own, monotonic

    def procs(self, scenario: str) -> Procs:
        directory = self.tmp / scenario
        directory.mkdir(parents=True, exist_ok=True)
        return Procs(directory)

    def store(self, scenario: str, name: str = "relay") -> Path:
        return self.tmp / scenario / f"{name}.db"


# -- the participants -------------------------------------------------------------------------


def start_simulator(
    bench: Bench,
    procs: Procs,
    *,
    count: int | None,
    rate: float | None = None,
    drop_every: int | None = None,
) -> int:
    """``relay simulate`` on a free port; returns the port once it answers HTTP."""
    port = free_port()
    argv = [PY, "-m", "relay", "simulate", "--port", str(port), "--api-key", API_KEY]
    argv += ["--users", str(bench.users)]
    if count is not None:
        argv += ["--count", str(count)]
    if rate is not None:
        argv += ["--rate", str(rate)]
    if drop_every is not None:
        argv += ["--drop-every", str(drop_every)]
    procs.start("simulator", argv, child_env())
    wait_until(
        lambda: http_get(port, "/")[0] == 404,  # its REST side: anything but /v1/ is a 404
        timeout=30,
        what="the simulator to listen",
        procs=procs,
    )
    return port


@dataclass
class ReceiverHandle:
    proc: Proc
    port: int
    out: Path

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}/hook"

    def stats(self) -> dict[str, Any]:
        status, body = http_get(self.port, STATS_PATH)
        if status != 200:
            return {}
        stats: dict[str, Any] = json.loads(body)
        return stats

    def unique(self) -> int:
        return int(self.stats().get("unique", 0))

    def finish(self) -> dict[str, Any]:
        """Stop the receiver and read what it recorded."""
        rc = self.proc.stop()
        try:
            data: dict[str, Any] = json.loads(self.out.read_text())
        except (OSError, ValueError):
            raise HarnessError(
                f"the receiver (exit code {rc}) wrote no results:\n{self.proc.tail()}"
            ) from None
        return data


def start_receiver(
    procs: Procs, name: str = "receiver", *, port: int | None = None, timeline: bool = True
) -> ReceiverHandle:
    port = port or free_port()
    out = procs.log_dir / f"{name}.json"
    argv = [PY, "-m", "bench.receiver_proc", "--port", str(port), "--out", str(out)]
    if not timeline:
        argv.append("--no-timeline")
    handle = ReceiverHandle(procs.start(name, argv, child_env()), port, out)
    wait_until(
        lambda: http_get(port, STATS_PATH)[0] == 200,
        timeout=30,
        what="the receiver to listen",
        procs=procs,
    )
    return handle


@dataclass
class RelayHandle:
    proc: Proc
    admin_port: int
    rss: RssSampler
    ready_s: float

    def metrics(self) -> list[Any]:
        status, body = http_get(self.admin_port, "/metrics")
        return parse_metrics(body.decode()) if status == 200 else []

    def stored(self) -> float:
        return metric(self.metrics(), "relay_events_stored_total")

    def vm_hwm(self) -> int | None:
        """The kernel's peak resident set of the process (``VmHWM``), when readable."""
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return None

    def stop(self) -> None:
        self.rss.stop()
        self.proc.stop(grace=20)


def start_relay(
    bench: Bench,
    procs: Procs,
    *,
    name: str = "relay",
    sim_port: int,
    endpoint_url: str,
    schedule: str,
    store: Path | str,
) -> RelayHandle:
    """``relay run`` signing every delivery, with its admin port polled for readiness."""
    return start_relays(
        bench,
        procs,
        names=[name],
        sim_port=sim_port,
        endpoint_url=endpoint_url,
        schedule=schedule,
        store=store,
    )[0]


def start_relays(
    bench: Bench,
    procs: Procs,
    *,
    names: list[str],
    sim_port: int,
    endpoint_url: str,
    schedule: str,
    store: Path | str,
) -> list[RelayHandle]:
    """One ``relay run`` per name on one store, all started before any is waited for.

    ``store`` is a SQLite file or a PostgreSQL URL; with several names, RELAY_REPLICAS is
    their number and each has its own admin port. Only SQLite starts count in the start-up
    figure.
    """
    launched: list[tuple[str, Proc, int, float]] = []
    for name in names:
        admin = free_port()
        env = child_env(
            {
                "RELAY_API_KEY": API_KEY,
                "RELAY_WS_URL": f"ws://{LOOPBACK}:{sim_port}/ws",
                "RELAY_API_URL": f"http://{LOOPBACK}:{sim_port}",
                "RELAY_ENDPOINTS": json.dumps([{"name": "bench", "url": endpoint_url}]),
                "RELAY_SIGNING_SECRET": SIGNING_SECRET,
                "RELAY_ALLOW_UNSIGNED": "false",
                "RELAY_STORE": store if isinstance(store, str) else f"sqlite:///{store}",
                "RELAY_REPLICAS": str(len(names)),
                "RELAY_ADMIN_ADDR": f"{LOOPBACK}:{admin}",
                "RELAY_RECONCILE_INTERVAL": "off",
                "RELAY_RETRY_SCHEDULE": schedule,
                "RELAY_SHUTDOWN_GRACE": "5s",
            }
        )
        started = time.monotonic()
        launched.append((name, procs.start(name, [PY, "-m", "relay", "run"], env), admin, started))
    handles: list[RelayHandle] = []
    for name, proc, admin, started in launched:
        rss = RssSampler(proc.pid)
        wait_until(
            _ready_check(admin),
            timeout=60,
            what=f"{name} to be ready (/readyz 200)",
            procs=procs,
            interval=0.02,
        )
        ready = time.monotonic() - started
        if not isinstance(store, str):
            bench.ready_times.append(ready)
        handles.append(RelayHandle(proc, admin, rss, ready))
    return handles


def _ready_check(admin: int) -> Callable[[], bool]:
    return lambda: http_get(admin, "/readyz")[0] == 200


def start_naive(procs: Procs, sim_port: int, url: str, name: str = "naive") -> Proc:
    env = child_env({"ENTERPRISE_API_KEY": API_KEY})
    argv = [PY, "-m", "bench.baselines.naive", f"ws://{LOOPBACK}:{sim_port}/ws", url]
    return procs.start(name, argv, env)


def closed_url() -> str:
    """An endpoint URL on a port where nothing listens (yet)."""
    return f"http://{LOOPBACK}:{free_port()}/hook"


def wait_delivered(
    receiver: ReceiverHandle,
    n: int,
    *,
    timeout: float,
    procs: Procs,
    what: str,
    on_poll: Callable[[], None] | None = None,
) -> None:
    """Wait for ``n`` distinct webhooks; Incomplete (not fatal) if some but not all came."""

    def delivered() -> bool:
        if on_poll is not None:
            on_poll()
        return receiver.unique() >= n

    try:
        wait_until(
            delivered,
            timeout=timeout,
            what=what,
            procs=procs,
            interval=0.1,
        )
    except HarnessError as exc:
        got = receiver.unique()
        if "timed out" in str(exc) and got > 0:
            raise Incomplete(f"{what}: {got:,} of {n:,} within {timeout:.0f}s") from None
        raise


def rate_of(arrivals: list[int]) -> float | None:
    """Arrivals per second between the first and the last one."""
    if len(arrivals) < 2 or arrivals[-1] <= arrivals[0]:
        return None
    return (len(arrivals) - 1) / ((arrivals[-1] - arrivals[0]) / 1e9)


def _watch_stored(relay: RelayHandle, n: int, when: list[int]) -> Callable[[], None]:
    """A poll step noting (once, in ``when``) the wall time the relay had ``n`` events stored."""

    def poll() -> None:
        if not when and relay.stored() >= n:
            when.append(time.time_ns())

    return poll


def _lag_behind_storing(store: Path, until: float) -> dict[str, Any] | None:
    """How long each event stored before ``until`` (epoch seconds) waited from its commit to
    its first delivery attempt, from the relay's own SQLite store: a delivery's ``created_at``
    (the time its batch was handed to the store) and its first attempt's ``at``."""
    try:
        conn = sqlite3.connect(f"file:{store}?mode=ro", uri=True)
    except sqlite3.Error:
        return None
    try:
        waits = sorted(
            wait
            for (wait,) in conn.execute(
                "SELECT a.at - d.created_at FROM deliveries d JOIN attempts a "
                "ON a.delivery_id = d.id AND a.n = 1 WHERE d.created_at <= ?",
                (until,),
            )
        )
    except sqlite3.Error:
        return None
    finally:
        conn.close()
    if not waits:
        return None
    return {
        "events": len(waits),
        "wait_s_p50": percentile(waits, 50),
        "wait_s_p99": percentile(waits, 99),
        "wait_s_max": waits[-1],
    }


#: The least share of the live feed delivered after storing ended for that phase's rate to
#: stand for "delivery alone"; below it the drain scenario's rate of the same run does.
AFTER_SHARE = 0.1


def _split_at(arrivals: list[int], t_ns: int) -> dict[str, Any]:
    """Delivery rates while the feed was still being ingested, and after."""
    before = [t for t in arrivals if t <= t_ns]
    after = [t for t in arrivals if t > t_ns]
    ingest_s = (t_ns - arrivals[0]) / 1e9
    return {
        "ingesting_s": ingest_s,
        "delivered_while_ingesting": len(before),
        "delivered_after_ingest": len(after),
        "events_per_s_while_ingesting": len(before) / ingest_s if ingest_s > 0 else None,
        "events_per_s_after_ingest": rate_of(after),
    }


def _enough_after(live: dict[str, Any]) -> bool:
    """Whether enough of the live feed was delivered after storing ended to rate that phase."""
    after = live.get("delivered_after_ingest", 0)
    return bool(after) and after >= AFTER_SHARE * live.get("events", 0)


def _delivery_alone(r: dict[str, Any]) -> tuple[float | None, str]:
    """The relay's delivery rate with no feed to store, and where it comes from: the live
    run after storing ended, when enough was left to deliver then; else (delivery kept pace
    with storing) the drain scenario of the same run."""
    live = r.get("live_relay", {})
    if _enough_after(live):
        return live.get("events_per_s_after_ingest"), "after storing"
    return _get(r, "drain", "events_per_s"), "drain: delivery kept pace, little was left after"


# -- scenarios --------------------------------------------------------------------------------


def scenario_wrk(bench: Bench) -> None:
    wrk = shutil.which("wrk")
    if wrk is None:
        bench.results["wrk"] = {"skipped": "wrk is not installed"}
        bench.notes.append(
            "wrk is not installed, so the receiver-limit row is skipped: "
            "`sudo apt-get install wrk` (Debian/Ubuntu) or `brew install wrk`."
        )
        return
    seconds = bench.sizes.wrk_seconds
    with bench.procs("wrk") as procs:
        receiver = start_receiver(procs, timeline=False)
        body = _sample_body()
        script = procs.log_dir / "post.lua"
        script.write_text(_wrk_script(body))
        argv = [wrk, "-t1", "-c32", f"-d{seconds}s", "--timeout", "5s", "-s", str(script)]
        argv.append(receiver.url)
        done = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=seconds + 30,
            env=child_env(),
            check=False,
        )
        found = re.search(r"Requests/sec:\s+([\d.]+)", done.stdout)
        if done.returncode != 0 or found is None:
            raise HarnessError(f"wrk failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        data = receiver.finish()
        if not data.get("count"):
            raise HarnessError("wrk ran but the receiver counted nothing")
        bench.results["wrk"] = {
            "requests_per_s": float(found[1]),
            "seconds": seconds,
            "body_bytes": len(body),
            "received": data["count"],
        }
        bench.series["wrk_limit"] = float(found[1])


def _sample_body() -> bytes:
    """A users-feed message as the relay delivers it, padded to ~650 bytes."""
    message = {
        "sequence": 5,
        "recipient": "private.enterprise.users",
        "timestamp": time.time_ns(),
        "payload": {
            "user_id": "client_09e487c9-9b75-4ef5-be06-b3e5661f68e5",
            "first_name": "Brando",
            "last_name": "Marks",
            "email": "[email protected]",
            "phone_number": "+12223334444",
            "account_role": "Client",
            "account_type": "individual",
            "status": "VERIFIED",
            "user_token": {
                "token": "2000611ea497d8ae4832c52166e0a26162cbb74716ab2662c50f8b47cdad3979",
                "expires": "2024-05-30T17:55:27.981Z",
                "partner_user_id": "client_09e487c9-9b75-4ef5-be06-b3e5661f68e5",
            },
            "requirements": {"sms": False, "email": False},
        },
    }
    body = json.dumps(message, separators=(",", ":"))
    pad = max(0, 650 - len(body) - len(',"note":""'))
    return (body[:-1] + ',"note":"' + "x" * pad + '"}').encode()


def _wrk_script(body: bytes) -> str:
    """A wrk Lua script POSTing ``body`` with headers shaped like a signed delivery."""
    signature = "v1," + base64.b64encode(secrets.token_bytes(32)).decode()
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "sfox-relay/bench",
        "webhook-id": "evt_" + secrets.token_hex(32),
        "webhook-timestamp": str(int(time.time())),
        "webhook-signature": signature,
        "relay-source": "feed",
    }
    lines = ['wrk.method = "POST"', f"wrk.body = {json.dumps(body.decode())}"]
    lines += [f'wrk.headers["{name}"] = {json.dumps(value)}' for name, value in headers.items()]
    return "\n".join(lines) + "\n"


def scenario_idle(bench: Bench) -> None:
    with bench.procs("idle") as procs:
        sim = start_simulator(bench, procs, count=0)
        relay = start_relay(
            bench,
            procs,
            sim_port=sim,
            endpoint_url=closed_url(),
            schedule="1h",
            store=bench.store("idle"),
        )
        relay.rss.mark("idle")
        time.sleep(bench.sizes.idle_seconds)
        relay.rss.mark("idle")
        bench.results["idle"] = {
            "ready_s": relay.ready_s,
            "rss_idle": relay.rss.peak("idle"),
            "vm_hwm": relay.vm_hwm(),
        }
        relay.stop()


def _poll_stored(relay: RelayHandle, n: int, timeline: list[tuple[float, float]]) -> bool:
    stored = relay.stored()
    timeline.append((time.monotonic(), stored))
    return stored >= n


def _ingest_rate(timeline: list[tuple[float, float]], n: int) -> float | None:
    """Events/s between the first sample with events and the last one before all were in.

    Both ends are mid-flow, so neither start-up nor the idle wait after the last event counts;
    with fewer than two such samples, the first one and the final one.
    """
    flowing = [(t, s) for t, s in timeline if 0 < s < n]
    if len(flowing) >= 2 and flowing[-1][0] - flowing[0][0] >= 0.2:
        (t0, s0), (t1, s1) = flowing[0], flowing[-1]
    else:
        started = [(t, s) for t, s in timeline if s > 0]
        if len(started) < 2:
            return None
        (t0, s0), (t1, s1) = started[0], started[-1]
    return (s1 - s0) / (t1 - t0) if t1 > t0 else None


def scenario_ingest(bench: Bench) -> None:
    n = bench.sizes.backlog
    with bench.procs("ingest") as procs:
        sim = start_simulator(bench, procs, count=n)
        relay = start_relay(
            bench,
            procs,
            sim_port=sim,
            endpoint_url=closed_url(),
            schedule="1h",  # first attempt in an hour: nothing is delivered, all is kept
            store=bench.store("ingest"),
        )
        relay.rss.mark("ingest")
        profiler = _start_profiler(bench, procs, relay, "ingest")
        timeline: list[tuple[float, float]] = []
        wait_until(
            lambda: _poll_stored(relay, n, timeline),
            timeout=60 + n / 1000,
            what=f"{n:,} events stored",
            procs=procs,
        )
        _finish_profiler(bench, profiler)
        relay.rss.mark("backlog")
        time.sleep(1.0)
        relay.rss.mark("backlog")
        samples = relay.metrics()
        bench.results["ingest"] = {
            "events": n,
            "events_per_s": _ingest_rate(timeline, n),
            "stored": metric(samples, "relay_events_stored_total"),
            "attempts": metric(samples, "relay_deliveries_total"),
            "rss_peak_ingest": relay.rss.peak("ingest"),
            "rss_backlog": relay.rss.last("backlog"),
            "vm_hwm": relay.vm_hwm(),
        }
        relay.stop()


def scenario_drain(bench: Bench) -> None:
    n = bench.sizes.drain
    with bench.procs("drain") as procs:
        sim = start_simulator(bench, procs, count=n)
        endpoint_port = free_port()
        relay = start_relay(
            bench,
            procs,
            sim_port=sim,
            endpoint_url=f"http://{LOOPBACK}:{endpoint_port}/hook",
            schedule=DRAIN_SCHEDULE,
            store=bench.store("drain"),
        )
        relay.rss.mark("store")
        timeline: list[tuple[float, float]] = []
        wait_until(
            lambda: _poll_stored(relay, n, timeline),
            timeout=60 + n / 1000,
            what=f"{n:,} events stored while the endpoint is down",
            procs=procs,
        )
        relay.rss.mark("due")
        time.sleep(0.5)
        relay.rss.mark("drain")
        receiver = start_receiver(procs, port=endpoint_port)
        up = time.time_ns()
        profiler = _start_profiler(bench, procs, relay, "drain")
        result: dict[str, Any] = {"events": n}
        try:
            wait_delivered(
                receiver,
                n,
                timeout=60 + n / 200,
                procs=procs,
                what=f"{n:,} stored events delivered",
            )
        except Incomplete as exc:
            result["incomplete"] = str(exc)
            bench.notes.append(f"drain incomplete: {exc}")
        relay.rss.mark("drained")
        samples = relay.metrics()
        data = receiver.finish()
        arrivals = data["arrivals_ns"]
        result.update(
            {
                "delivered": data["unique"],
                "requests": data["count"],
                "signed": data["signed"],
                "events_per_s": rate_of(arrivals),
                "seconds_from_endpoint_up": (arrivals[-1] - up) / 1e9 if arrivals else None,
                "success": metric(samples, "relay_deliveries_total", outcome="success"),
                "rss_due_backlog": relay.rss.last("due"),
                "rss_peak_drain": relay.rss.peak("due", "drain"),
                "vm_hwm": relay.vm_hwm(),
            }
        )
        bench.results["drain"] = result
        bench.series.setdefault("throughput", {})[f"relay, drain of {n:,} stored"] = arrivals
        _finish_profiler(bench, profiler)
        if not data["unique"]:
            raise HarnessError("nothing was delivered from the stored backlog")
        relay.stop()


def scenario_live(bench: Bench) -> None:
    n = bench.sizes.live
    for who in ("relay", "naive"):
        with bench.procs(f"live-{who}") as procs:
            receiver = start_receiver(procs)
            sim = start_simulator(bench, procs, count=n)
            all_stored: list[int] = []  # time.time_ns() when the relay had stored every event
            store = bench.store(f"live-{who}")  # the relay's (the naive one keeps none)
            on_poll: Callable[[], None] | None = None
            profiler: _Profiler | None = None
            if who == "relay":
                relay = start_relay(
                    bench,
                    procs,
                    sim_port=sim,
                    endpoint_url=receiver.url,
                    schedule="0s,5s,5m,30m,2h,5h,10h,10h",
                    store=store,
                )
                rss = relay.rss
                on_poll = _watch_stored(relay, n, all_stored)
                profiler = _start_profiler(bench, procs, relay, "live")
            else:
                rss = RssSampler(start_naive(procs, sim, receiver.url).pid)
            rss.mark("live")
            result: dict[str, Any] = {"events": n}
            try:
                wait_delivered(
                    receiver,
                    n,
                    timeout=60 + n / 100,
                    procs=procs,
                    what=f"{n:,} events through the {who} at full speed",
                    on_poll=on_poll,
                )
            except Incomplete as exc:
                result["incomplete"] = str(exc)
                bench.notes.append(f"live run incomplete: {exc}")
            _finish_profiler(bench, profiler)
            rss.stop()
            data = receiver.finish()
            arrivals = data["arrivals_ns"]
            result.update(
                {
                    "delivered": data["unique"],
                    "requests": data["count"],
                    "signed": data["signed"],
                    "events_per_s": rate_of(arrivals),
                    "rss_peak": rss.peak("live"),
                }
            )
            if all_stored and arrivals:
                result.update(_split_at(arrivals, all_stored[0]))
                result["lag_behind_storing"] = _lag_behind_storing(store, all_stored[0] / 1e9)
            bench.results[f"live_{who}"] = result
            bench.series.setdefault("throughput", {})[f"{who}, live feed"] = arrivals
            if not data["unique"]:
                raise HarnessError(f"nothing was delivered by the {who}")


def scenario_latency(bench: Bench) -> None:
    _latency(bench, "latency")


def scenario_busy(bench: Bench) -> None:
    _latency(bench, "busy")


def start_cpu_hog(procs: Procs, cpu: int = 0) -> Proc:
    """A process that keeps one CPU busy (pinned to it) until the harness stops it."""
    argv = [PY, "-c", f"import os\nos.sched_setaffinity(0, {{{cpu}}})\nwhile True:\n    pass"]
    return procs.start("cpu-hog", argv, child_env())


def _latency(bench: Bench, label: str) -> None:
    """``LATENCY_RATE`` events/s through the relay, then the baseline (``busy``: beside a hog)."""
    seconds = bench.sizes.latency_seconds
    n = LATENCY_RATE * seconds
    for who in ("relay", "naive"):
        with bench.procs(f"{label}-{who}") as procs:
            if label == "busy":
                start_cpu_hog(procs)
            receiver = start_receiver(procs)
            sim = start_simulator(bench, procs, count=n, rate=LATENCY_RATE)
            if who == "relay":
                relay = start_relay(
                    bench,
                    procs,
                    sim_port=sim,
                    endpoint_url=receiver.url,
                    schedule="0s,5s,5m,30m,2h,5h,10h,10h",
                    store=bench.store(f"{label}-{who}"),
                )
                rss = relay.rss
            else:
                rss = RssSampler(start_naive(procs, sim, receiver.url).pid)
            rss.mark(label)
            result: dict[str, Any] = {"events": n, "rate": LATENCY_RATE, "seconds": seconds}
            try:
                wait_delivered(
                    receiver,
                    n,
                    timeout=seconds + 60,
                    procs=procs,
                    what=f"{n:,} events at {LATENCY_RATE}/s through the {who}",
                )
            except Incomplete as exc:
                result["incomplete"] = str(exc)
                bench.notes.append(f"{label} run incomplete: {exc}")
            rss.stop()
            data = receiver.finish()
            latencies = data["latencies_ns"]
            ordered = sorted(latencies)
            result.update(
                {
                    "delivered": data["unique"],
                    "p50_ns": percentile(ordered, 50),
                    "p95_ns": percentile(ordered, 95),
                    "p99_ns": percentile(ordered, 99),
                    "max_ns": ordered[-1] if ordered else None,
                    "rss_peak": rss.peak(label),
                }
            )
            bench.results[f"{label}_{who}"] = result
            if label == "latency":
                bench.series.setdefault("latency", {})[who] = latencies
                bench.series.setdefault("latency_arrivals", {})[who] = data["arrivals_ns"]
            if not data["unique"]:
                raise HarnessError(f"nothing was delivered by the {who}")


def _resubscribe_time(relay: RelayHandle, procs: Procs) -> float:
    """Seconds from the relay seeing the drop to subscribed again, polled every 10 ms."""
    marks: dict[str, float] = {}

    def resubscribed() -> bool:
        samples = relay.metrics()
        if not samples:
            return False
        now = time.monotonic()
        connected = metric(samples, "relay_feed_connected")
        reconnects = metric(samples, "relay_feed_reconnects_total")
        if "drop" not in marks and (connected == 0 or reconnects >= 1):
            marks["drop"] = now
        if "drop" in marks and connected == 1 and reconnects >= 1:
            marks["back"] = now
            return True
        return False

    wait_until(
        resubscribed,
        timeout=30,
        what="a drop and a resubscription",
        procs=procs,
        interval=0.01,
    )
    return marks["back"] - marks["drop"]


def scenario_reconnect(bench: Bench) -> None:
    times: list[float] = []
    with bench.procs("reconnect") as procs:
        sim = start_simulator(bench, procs, count=None, rate=LATENCY_RATE, drop_every=DROP_EVERY)
        for i in range(bench.sizes.reconnects):
            relay = start_relay(
                bench,
                procs,
                name=f"relay-{i + 1}",
                sim_port=sim,
                endpoint_url=closed_url(),
                schedule="1h",
                store=bench.store("reconnect", f"relay-{i + 1}"),
            )
            times.append(_resubscribe_time(relay, procs))
            relay.stop()
        receiver = start_receiver(procs)
        naive = start_naive(procs, sim, receiver.url)
        rc = naive.wait(DROP_EVERY / LATENCY_RATE + 10)
        naive_seen = receiver.finish()["unique"]
    bench.results["reconnect"] = {
        "drop_every": DROP_EVERY,
        "rate": LATENCY_RATE,
        "seconds": times,
        "median_s": statistics.median(times) if times else None,
        "max_s": max(times) if times else None,
        "naive_exit_code": rc,
        "naive_delivered_before_exit": naive_seen,
    }


PG_ENV = "SFOX_RELAY_BENCH_PG"
LIVE_SCHEDULE = "0s,5s,5m,30m,2h,5h,10h,10h"


@contextlib.contextmanager
def pg_database(admin_url: str, label: str) -> Iterator[str]:
    """A fresh PostgreSQL database next to ``admin_url``'s, dropped afterwards; its URL."""
    import asyncio

    import asyncpg

    name = f"relay_bench_{label}_{secrets.token_hex(5)}"

    async def execute(sql: str) -> None:
        conn = await asyncpg.connect(admin_url, timeout=10)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    try:
        asyncio.run(execute(f"CREATE DATABASE {name}"))
    except (OSError, asyncpg.PostgresError) as exc:
        raise HarnessError(f"cannot create a database at {PG_ENV}: {exc!r}") from None
    base, _, rest = admin_url.partition("?")
    url = base.rpartition("/")[0] + f"/{name}" + (f"?{rest}" if rest else "")
    try:
        yield url
    finally:
        with contextlib.suppress(Exception):
            asyncio.run(execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


def _pg_run(
    bench: Bench,
    label: str,
    store: str,
    *,
    n: int,
    replicas: int,
    rate: float | None,
    timeout: float,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The simulator's ``n`` events through ``replicas`` relays on ``store`` to one receiver."""
    with bench.procs(f"pg-{label}") as procs:
        receiver = start_receiver(procs)
        sim = start_simulator(bench, procs, count=n, rate=rate)
        relays = start_relays(
            bench,
            procs,
            names=[f"relay-{i + 1}" for i in range(replicas)],
            sim_port=sim,
            endpoint_url=receiver.url,
            schedule=LIVE_SCHEDULE,
            store=store,
        )
        for relay in relays:
            relay.rss.mark("run")
        result: dict[str, Any] = {"events": n, "replicas": replicas}
        what = f"{n:,} events through {replicas} replica(s) on PostgreSQL ({label})"
        try:
            wait_delivered(receiver, n, timeout=timeout, procs=procs, what=what)
        except Incomplete as exc:
            result["incomplete"] = str(exc)
            bench.notes.append(f"pg {label} incomplete: {exc}")
        if replicas > 1:
            time.sleep(1.0)  # late duplicates, if any, still count
        per_replica = [
            metric(r.metrics(), "relay_deliveries_total", outcome="success") for r in relays
        ]
        for relay in relays:
            relay.rss.stop()
        data = receiver.finish()
        result.update(
            {
                "delivered": data["unique"],
                "requests": data["count"],
                "duplicates": data["count"] - data["unique"],
                "signed": data["signed"],
                "events_per_s": rate_of(data["arrivals_ns"]),
                "successes_per_replica": per_replica,
                "rss_peak": max((r.rss.peak("run") or 0) for r in relays) or None,
            }
        )
        if not data["unique"]:
            raise HarnessError(f"nothing was delivered ({label})")
        return result, data


def scenario_pg(bench: Bench) -> None:
    admin_url = os.environ.get(PG_ENV, "").strip()
    if not admin_url:
        bench.results["pg"] = {"skipped": f"{PG_ENV} is not set"}
        bench.notes.append(
            f"pg: skipped; set {PG_ENV} to a PostgreSQL URL (e.g. "
            "postgresql://postgres@127.0.0.1:5432/test) whose server lets it create and drop "
            "databases."
        )
        return
    n = bench.sizes.live
    seconds = bench.sizes.latency_seconds
    results: dict[str, Any] = {}
    bench.results["pg"] = results
    for label, replicas in (("live-1", 1), ("live-3", 3)):
        with pg_database(admin_url, label.replace("-", "")) as store:
            result, data = _pg_run(
                bench, label, store, n=n, replicas=replicas, rate=None, timeout=60 + n / 100
            )
        results[label] = result
        bench.series.setdefault("throughput", {})[f"relay on PostgreSQL, {replicas} replica(s)"] = (
            data["arrivals_ns"]
        )
    with pg_database(admin_url, "latency") as store:
        m = LATENCY_RATE * seconds
        result, data = _pg_run(
            bench, "latency", store, n=m, replicas=1, rate=LATENCY_RATE, timeout=seconds + 60
        )
    ordered = sorted(data["latencies_ns"])
    result.update(
        {
            "rate": LATENCY_RATE,
            "seconds": seconds,
            "p50_ns": percentile(ordered, 50),
            "p95_ns": percentile(ordered, 95),
            "p99_ns": percentile(ordered, 99),
            "max_ns": ordered[-1] if ordered else None,
        }
    )
    results["latency"] = result
    bench.series.setdefault("latency", {})["relay on PostgreSQL"] = data["latencies_ns"]


# -- py-spy (optional) ------------------------------------------------------------------------


@dataclass
class _Profiler:
    proc: Proc
    out: Path
    label: str


def _start_profiler(bench: Bench, procs: Procs, relay: RelayHandle, label: str) -> _Profiler | None:
    """py-spy on the relay, when ``--profile`` asked for it (else None)."""
    if not bench.profile:
        return None
    spy = shutil.which("py-spy") or str(Path(PY).parent / "py-spy")
    if not Path(spy).exists():
        bench.notes.append("--profile: py-spy is not installed (pip install py-spy)")
        return None
    out = procs.log_dir / f"{label}-profile.raw"
    argv = [spy, "record", "--format", "raw", "--threads", "--rate", "200", "--nonblocking"]
    argv += ["--duration", "60", "--pid", str(relay.proc.pid), "-o", str(out)]
    return _Profiler(procs.start(f"py-spy-{label}", argv, child_env()), out, label)


def _finish_profiler(bench: Bench, profiler: _Profiler | None) -> None:
    if profiler is None:
        return
    # SIGINT makes py-spy write what it has sampled so far.
    with contextlib.suppress(ProcessLookupError):
        profiler.proc.popen.send_signal(signal.SIGINT)
    profiler.proc.wait(20)
    profiler.proc.stop()
    if not profiler.out.exists():
        bench.notes.append(f"--profile: py-spy wrote nothing:\n{profiler.proc.tail()}")
        return
    summary = summarise_profile(profiler.out.read_text(), profiler.label)
    target = bench.out / f"{profiler.label}-profile.txt"
    target.write_text(summary)
    shown = target.relative_to(ROOT) if target.is_relative_to(ROOT) else target
    bench.notes.append(f"py-spy profile of the relay ({profiler.label}): {shown}")


_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def summarise_profile(raw: str, label: str, top: int = 25) -> str:
    """Per-thread, self and inclusive sample shares from py-spy's collapsed stacks."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    threads: dict[str, int] = {}
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if not f.startswith("process ")]
        thread = "?"
        if frames and frames[0].startswith("thread ("):
            thread = re.sub(r"[_-]?\d+(_\d+)?$", "", frames.pop(0).partition(": ")[2]) or "?"
        names = []
        for frame in frames:
            match = _FRAME.match(frame)
            if match is None:
                continue
            path = match["file"]
            short = path.split("site-packages/")[-1].split("/lib/python3")[-1]
            if "/relay/" in path:
                short = "relay/" + path.rsplit("/relay/", 1)[1]
            names.append(f"{match['func']} ({short})")
        if not names:
            continue
        total += count
        threads[thread] = threads.get(thread, 0) + count
        own[names[-1]] = own.get(names[-1], 0) + count
        for name in set(names):
            inclusive[name] = inclusive.get(name, 0) + count
    if not total:
        return "no samples\n"

    def table(counts: dict[str, int], only_relay: bool) -> list[str]:
        items = sorted(counts.items(), key=lambda kv: -kv[1])
        if only_relay:
            items = [kv for kv in items if "(relay/" in kv[0]]
        return [f"{100 * c / total:6.1f}%  {name}" for name, c in items[:top]]

    lines = [
        f"py-spy (--threads, idle excluded): {total} samples of the relay process during "
        f"the {label} scenario; shares are of all active samples.",
        "",
        "Active samples per thread:",
        *table(threads, False),
        "",
        "Self time (where the CPU is; SQLite's C code shows as its Python caller):",
        *table(own, False),
        "",
        "Inclusive time, relay's own functions:",
        *table(inclusive, True),
        "",
    ]
    return "\n".join(lines)


# -- the report -------------------------------------------------------------------------------


def _get(results: dict[str, Any], scenario: str, key: str) -> Any:
    value = results.get(scenario, {}).get(key)
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("PASS" if ok else "MISS")


def build_rows(bench: Bench) -> list[Row]:
    r = bench.results
    s = bench.sizes
    rows: list[Row] = []
    wrk = _get(r, "wrk", "requests_per_s")
    wrk_text = fmt_rate(wrk) if wrk else "-"
    if "wrk" in r:
        rows.append(
            Row(
                "Receiver limit: wrk -t1 -c32, ~650 B POST",
                "-",
                "-",
                wrk_text if wrk else "skipped (no wrk)",
                verdict="-" if wrk else "skipped",
            )
        )

    live_relay = _get(r, "live_relay", "events_per_s")
    live_naive = _get(r, "live_naive", "events_per_s")
    if "live_relay" in r or "live_naive" in r:
        ok = (
            None
            if live_relay is None or live_naive is None
            else (live_relay >= TARGET_VS_NAIVE * live_naive)
        )
        rows.append(
            Row(
                f"Delivery, live feed at full speed, {s.live:,} events (events/s)",
                fmt_rate(live_relay),
                fmt_rate(live_naive),
                wrk_text,
                fmt_ratio(live_relay, live_naive, "naive"),
                f">= {TARGET_VS_NAIVE:g}x naive",
                _verdict(ok),
            )
        )

    during = _get(r, "live_relay", "events_per_s_while_ingesting")
    after, reference = _delivery_alone(r)
    if during is not None or after is not None:
        share = None if during is None or not after else during / after
        rows.append(
            Row(
                "Delivery while the live feed is still being stored, vs delivery alone (events/s)",
                f"{fmt_rate(during)} vs {fmt_rate(after)} ({reference})",
                ratio="-" if share is None else f"{share:.2f}x alone",
                target=f">= {TARGET_WHILE_INGESTING:g}x alone",
                verdict=_verdict(None if share is None else share >= TARGET_WHILE_INGESTING),
            )
        )

    drain = _get(r, "drain", "events_per_s")
    if "drain" in r:
        rows.append(
            Row(
                f"Delivery, drain of {s.drain:,} stored events (events/s)",
                fmt_rate(drain),
                "n/a (keeps no backlog)",
                wrk_text,
                fmt_ratio(drain, wrk, "limit"),
                f">= {TARGET_VS_LIMIT:g}x limit",
                _verdict(None if drain is None or not wrk else drain >= TARGET_VS_LIMIT * wrk),
            )
        )

    ingest = _get(r, "ingest", "events_per_s")
    if "ingest" in r:
        rows.append(
            Row(
                f"Ingest: feed -> committed, {s.backlog:,} events (events/s)",
                fmt_rate(ingest),
                "n/a (stores nothing)",
                target=f">= {TARGET_INGEST:,.0f}/s",
                verdict=_verdict(None if ingest is None else ingest >= TARGET_INGEST),
            )
        )

    if "latency_relay" in r or "latency_naive" in r:
        for key, label in (("p50", "p50"), ("p95", "p95"), ("p99", "p99"), ("max", "max")):
            a = _get(r, "latency_relay", f"{key}_ns")
            b = _get(r, "latency_naive", f"{key}_ns")
            target, ok = "-", None
            if key == "p99":
                target = f"< {TARGET_P99_NS / 1e6:g} ms"
                ok = None if a is None else a < TARGET_P99_NS
            rows.append(
                Row(
                    f"Latency {label} at {LATENCY_RATE} events/s for {s.latency_seconds} s",
                    fmt_ms(a),
                    fmt_ms(b),
                    ratio=fmt_ratio(a, b, "naive"),
                    target=target,
                    verdict=_verdict(ok),
                )
            )

    if "busy_relay" in r or "busy_naive" in r:
        for key in ("p50", "p99", "max"):
            a = _get(r, "busy_relay", f"{key}_ns")
            b = _get(r, "busy_naive", f"{key}_ns")
            target, ok = "-", None
            if key == "p99":
                target = f"<= {TARGET_BUSY_VS_NAIVE:g}x naive and < {TARGET_BUSY_P99_NS / 1e6:g} ms"
                ok = (
                    None
                    if a is None or b is None
                    else a <= TARGET_BUSY_VS_NAIVE * b and a < TARGET_BUSY_P99_NS
                )
            rows.append(
                Row(
                    f"Latency {key} at {LATENCY_RATE} events/s, one core kept busy",
                    fmt_ms(a),
                    fmt_ms(b),
                    ratio=fmt_ratio(a, b, "naive"),
                    target=target,
                    verdict=_verdict(ok),
                )
            )

    if "pg" in r:
        rows += _pg_rows(bench, live_relay)

    idle = _get(r, "idle", "rss_idle")
    rss_rows = [
        ("RSS idle (subscribed, no traffic)", idle, None),
        (
            f"RSS peak, live feed at full speed ({s.live:,} events)",
            _get(r, "live_relay", "rss_peak"),
            _get(r, "live_naive", "rss_peak"),
        ),
        (
            f"RSS peak, {s.drain:,} due deliveries waiting, then draining",
            _get(r, "drain", "rss_peak_drain"),
            None,
        ),
        (f"RSS with a {s.backlog:,}-event backlog", _get(r, "ingest", "rss_backlog"), None),
    ]
    measured = [value for _, value, _ in rss_rows if value is not None]
    for index, (label, value, naive) in enumerate(rss_rows):
        if value is None and naive is None:
            continue
        target, ok = "-", None
        if index == len(rss_rows) - 1:
            growth = None if value is None or idle is None else value - idle
            target = (
                f"all < {TARGET_RSS / MB:.0f} MB; backlog <= idle + {TARGET_RSS_GROWTH / MB:.0f} MB"
            )
            if measured:
                ok = max(measured) < TARGET_RSS and (growth is None or growth <= TARGET_RSS_GROWTH)
            if growth is not None:
                label += f" ({growth / MB:+.1f} MB over idle)"
        rows.append(Row(label, fmt_mb(value), fmt_mb(naive), target=target, verdict=_verdict(ok)))

    if bench.ready_times:
        rows.append(
            Row(
                f"Start-up to /readyz 200 (median of {len(bench.ready_times)} starts)",
                f"{statistics.median(bench.ready_times):.2f} s",
                verdict="-",
            )
        )

    if "reconnect" in r:
        median = _get(r, "reconnect", "median_s")
        worst = _get(r, "reconnect", "max_s")
        count = len(r["reconnect"].get("seconds", []))
        rc = _get(r, "reconnect", "naive_exit_code")
        naive = "no reconnect: exits" if rc not in (None, 0) else "no reconnect"
        rows.append(
            Row(
                f"Resubscribed after a feed drop (median / max of {count})",
                "-" if median is None else f"{median:.2f} s / {worst:.2f} s",
                naive,
                target=f"< {TARGET_RESUBSCRIBE:g} s",
                verdict=_verdict(None if worst is None else worst < TARGET_RESUBSCRIBE),
            )
        )
    return rows


def build_ratios(bench: Bench) -> list[Ratio]:
    """The ratio table: each figure / the baseline's and / wrk's limit, where they apply."""
    r = bench.results
    wrk = _get(r, "wrk", "requests_per_s")
    ratios: list[Ratio] = []
    for label, key, naive_key, field_ in (
        ("live delivery (events/s)", "live_relay", "live_naive", "events_per_s"),
        (
            "live delivery while storing (events/s)",
            "live_relay",
            None,
            "events_per_s_while_ingesting",
        ),
        ("drain (events/s)", "drain", None, "events_per_s"),
        ("ingest (events/s)", "ingest", None, "events_per_s"),
    ):
        value = _get(r, key, field_)
        if value is None:
            continue
        naive = _get(r, naive_key, field_) if naive_key else None
        ratios.append(
            Ratio(label, fmt_rate(value), ratio_text(value, naive), ratio_text(value, wrk))
        )
    for scenario, what in (("latency", "quiet"), ("busy", "one core busy")):
        for key in ("p50", "p99", "max"):
            value = _get(r, f"{scenario}_relay", f"{key}_ns")
            if value is None:
                continue
            naive = _get(r, f"{scenario}_naive", f"{key}_ns")
            ratios.append(Ratio(f"latency {key}, {what}", fmt_ms(value), ratio_text(value, naive)))
    for label, key, naive_key in (
        ("RSS peak, live", "live_relay", "live_naive"),
        ("RSS peak, latency", "latency_relay", "latency_naive"),
    ):
        value = _get(r, key, "rss_peak")
        if value is not None:
            ratios.append(
                Ratio(label, fmt_mb(value), ratio_text(value, _get(r, naive_key, "rss_peak")))
            )
    return ratios


def _pg_rows(bench: Bench, live_sqlite: float | None) -> list[Row]:
    """PostgreSQL figures next to the SQLite ones of the same run (ratio = PostgreSQL/SQLite)."""
    pg = bench.results["pg"]
    if "skipped" in pg:
        return [Row("Delivery on PostgreSQL", f"skipped ({pg['skipped']})", verdict="skipped")]
    rows: list[Row] = []
    for key, replicas in (("live-1", 1), ("live-3", 3)):
        result = pg.get(key)
        if result is None:
            continue
        rate = result.get("events_per_s")
        label = f"Delivery on PostgreSQL, {replicas} replica{'s' if replicas > 1 else ''}"
        label += f", {result['events']:,} events (events/s)"
        target, ok = "-", None
        if replicas > 1:
            dups = result.get("duplicates", 0)
            label += f"; {result.get('delivered', 0):,} distinct, {dups:,} duplicates"
            target = "each event once"
            ok = dups == 0 and result.get("delivered") == result["events"]
        rows.append(
            Row(
                label,
                fmt_rate(rate),
                ratio=fmt_ratio(rate, live_sqlite, "SQLite live"),
                target=target,
                verdict=_verdict(ok),
            )
        )
    latency = pg.get("latency")
    if latency is not None:
        p99 = latency.get("p99_ns")
        if isinstance(p99, float) and math.isnan(p99):
            p99 = None
        rows.append(
            Row(
                f"Latency p99 on PostgreSQL, 1 replica, at {LATENCY_RATE} events/s for "
                f"{latency['seconds']} s",
                fmt_ms(p99),
                ratio=fmt_ratio(p99, _get(bench.results, "latency_relay", "p99_ns"), "SQLite"),
                target=f"< {TARGET_P99_NS / 1e6:g} ms",
                verdict=_verdict(None if p99 is None else p99 < TARGET_P99_NS),
            )
        )
    return rows


def _machine(bench: Bench) -> dict[str, Any]:
    commit = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        ).stdout.strip()
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "loadavg_at_start": bench.load_at_start,
        "loadavg_at_end": _loadavg(),
        "other_processes_cpu_share": _others_share(bench),
        "commit": commit or None,
    }


def _others_share(bench: Bench) -> float | None:
    """The share of all CPUs that processes outside the benchmark used since it started."""
    busy = _cpu_busy_seconds()
    if busy is None or bench.cpu_at_start is None:
        return None
    busy0, own0, wall0 = bench.cpu_at_start
    capacity = (time.monotonic() - wall0) * (os.cpu_count() or 1)
    others = (busy - busy0) - (_own_cpu_seconds() - own0)
    return max(0.0, others / capacity) if capacity > 0 else None


def _loadavg() -> tuple[float, float, float] | None:
    return os.getloadavg() if hasattr(os, "getloadavg") else None


def _others_text(machine: dict[str, Any]) -> str:
    share = machine.get("other_processes_cpu_share")
    if share is None:
        return "CPU used by other processes: unknown."
    text = f"other processes used {100 * share:.0f}% of the machine's CPU meanwhile"
    if share > OTHERS_NOISY:
        return text + " (so every figure here is pessimistic)."
    return text + "."


def _cpu_busy_seconds() -> float | None:
    """CPU seconds the whole machine has spent busy (Linux /proc/stat, steal included)."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(x) for x in stat.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    """CPU seconds of this process and of its children that have ended."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _notes(bench: Bench) -> list[str]:
    r = bench.results
    notes = [
        f"Each participant runs in its own process; the simulator plays {bench.users:,} users "
        "at a time. Compare only figures from one run: this machine is shared and noisy.",
        "Relay: `relay run`, every delivery signed (RELAY_SIGNING_SECRET, "
        "RELAY_ALLOW_UNSIGNED=false), SQLite outbox, reconciliation off. Baseline: "
        "bench/baselines/naive.py (the sFOX docs' example + one awaited httpx POST per message).",
        "Rates are counted at the receiver between its first and last arrival; ingest from "
        "relay_events_stored_total polled every 50 ms; latency = receiver arrival - the "
        "simulator's send timestamp; RSS sampled every 100 ms.",
    ]
    ingest = r.get("ingest", {})
    if ingest.get("attempts"):
        notes.append(f"ingest: {ingest['attempts']:.0f} delivery attempts were made (expected 0)")
    drain = r.get("drain", {})
    if drain.get("seconds_from_endpoint_up"):
        notes.append(
            f"drain: the last of {drain.get('delivered', 0):,} stored events arrived "
            f"{drain['seconds_from_endpoint_up']:.1f} s after the endpoint came up (its first "
            "retry is up to 1.1 s later); "
            f"{drain.get('signed', 0):,} of {drain.get('requests', 0):,} requests were signed."
        )
    live = r.get("live_relay", {})
    if live.get("ingesting_s") is not None:
        notes.append(
            f"live: the relay stored the whole feed {live['ingesting_s']:.1f} s after its first "
            f"delivery; until then it delivered {fmt_rate(live['events_per_s_while_ingesting'])}"
            + (
                f", afterwards {fmt_rate(live['events_per_s_after_ingest'])}"
                if _enough_after(live)
                else f"; {live.get('delivered_after_ingest', 0):,} events were left to deliver "
                "after (delivery kept pace with storing)"
            )
            + " (ingest and delivery share one event loop and one SQLite thread, where "
            "delivery goes first: the store commits the feed in slices while it delivers)."
        )
    lag = live.get("lag_behind_storing") or {}
    if lag.get("wait_s_max") is not None:
        p50, p99, top = (fmt_ms(lag[k] * 1e9) for k in ("wait_s_p50", "wait_s_p99", "wait_s_max"))
        notes.append(
            f"live: from the moment its batch reached the store to its first delivery attempt, "
            f"each of the {lag['events']:,} events stored while the feed was still arriving "
            f"waited {p50} (median), {p99} (p99), at most {top} (the relay's own store: a "
            "delivery's created_at to its first attempt's time)."
        )
    reconnect = r.get("reconnect", {})
    if reconnect.get("seconds"):
        each = ", ".join(f"{t:.2f}" for t in reconnect["seconds"])
        notes.append(
            f"reconnect: the simulator aborts the connection after {DROP_EVERY} messages; "
            f"each sample is a fresh relay's first drop (backoff: full jitter, first retry "
            f"within 1 s): {each} s. The naive baseline exited with code "
            f"{reconnect.get('naive_exit_code')} after relaying "
            f"{reconnect.get('naive_delivered_before_exit', 0)} messages."
        )
    pg = r.get("pg", {})
    if "live-1" in pg or "live-3" in pg or "latency" in pg:
        three = pg.get("live-3", {})
        split = ", ".join(f"{x:,.0f}" for x in three.get("successes_per_replica", []))
        notes.append(
            f"pg: each PostgreSQL figure used a fresh database from {PG_ENV}, the same "
            "simulator feed, receiver and signing as the SQLite rows; the replicas start "
            "together and share one endpoint; ratios are PostgreSQL / SQLite of this run"
            + (f"; successful deliveries per replica (3 replicas): {split}." if split else ".")
        )
    return notes + bench.notes


def write_outputs(
    bench: Bench, mode: str, started: float, results_dir: Path, command: str
) -> tuple[str, int]:
    rows = build_rows(bench)
    stem = {"full": "latest", "quick": "latest-quick"}.get(mode, "latest-partial")
    machine = _machine(bench)
    header = [
        f"`{command}`, "
        f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}, {time.time() - started:.0f} s; "
        f"{machine['cpus']} CPUs, Python {machine['python']}, {machine['platform']}, "
        f"commit {machine['commit']}; {_others_text(machine)}",
    ]
    notes = _notes(bench)
    skipped = plot(results_dir / f"{stem}.png", bench.series)
    if skipped:
        notes.append(skipped)
    else:
        notes.append(f"plot: bench/results/{stem}.png")
    if bench.failures:
        notes += [f"HARNESS FAILURE: {failure}" for failure in bench.failures]
    ratios = build_ratios(bench)
    text = markdown("sfox-relay benchmark", header, rows, notes, ratios)
    (results_dir / f"{stem}.md").write_text(text)
    summary = {
        "mode": mode,
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": time.time() - started,
        "machine": machine,
        "sizes": asdict(bench.sizes),
        "users": bench.users,
        "targets": {
            "delivery_vs_naive": TARGET_VS_NAIVE,
            "delivery_vs_limit": TARGET_VS_LIMIT,
            "ingest_events_per_s": TARGET_INGEST,
            "p99_ms": TARGET_P99_NS / 1e6,
            "rss_mb": TARGET_RSS / MB,
            "rss_growth_mb": TARGET_RSS_GROWTH / MB,
            "resubscribe_s": TARGET_RESUBSCRIBE,
            "delivery_while_ingesting_vs_after": TARGET_WHILE_INGESTING,
            "busy_p99_vs_naive": TARGET_BUSY_VS_NAIVE,
            "busy_p99_ms": TARGET_BUSY_P99_NS / 1e6,
        },
        "results": bench.results,
        "start_up_s": bench.ready_times,
        "rows": rows_as_json(rows),
        "ratios": [asdict(q) for q in ratios],
        "notes": notes,
        "failures": bench.failures,
    }
    (results_dir / f"{stem}.json").write_text(json.dumps(json_safe(summary), indent=2) + "\n")
    return text, len(bench.failures)


# -- main -------------------------------------------------------------------------------------

RUNNERS: dict[str, Callable[[Bench], None]] = {
    "wrk": scenario_wrk,
    "idle": scenario_idle,
    "ingest": scenario_ingest,
    "drain": scenario_drain,
    "live": scenario_live,
    "latency": scenario_latency,
    "busy": scenario_busy,
    "reconnect": scenario_reconnect,
    "pg": scenario_pg,
}


class _Interrupted(BaseException):
    pass


@contextlib.contextmanager
def _signals_interrupt() -> Iterator[None]:
    """SIGTERM (CI cancelling) unwinds like Ctrl-C, so every child is stopped."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise _Interrupted(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Measure sfox-relay next to a naive relay and this machine's limits.",
    )
    parser.add_argument("--quick", action="store_true", help="about a minute, smaller counts")
    parser.add_argument(
        "--only",
        default=",".join(SCENARIOS),
        help=f"comma-separated scenarios (default: all of {','.join(SCENARIOS)})",
    )
    parser.add_argument("--users", type=int, default=1000, help="simulated users in play (1000)")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="py-spy the relay during ingest, drain and live (*-profile.txt beside the results)",
    )
    parser.add_argument(
        "--results",
        type=Path,
        default=ROOT / "bench" / "results",
        help="where latest.md/.json/.png go (--quick: latest-quick.*, --only: latest-partial.*)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = parser.parse_args(argv)
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in RUNNERS]
    if args.users < 1:
        parser.error("--users must be at least 1")
    if unknown:
        parser.error(f"unknown scenario {unknown[0]!r}; choose from {', '.join(SCENARIOS)}")

    mode = "quick" if args.quick else "full"
    if set(chosen) != set(SCENARIOS):
        mode = "partial"  # never overwrites the results of a whole run
    command = " ".join(["python -m bench", *(argv if argv is not None else sys.argv[1:])])
    args.results.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="sfox-relay-bench-"))
    bench = Bench(QUICK if args.quick else FULL, args.users, tmp, args.profile, args.results)
    bench.load_at_start = _loadavg()
    busy = _cpu_busy_seconds()
    if busy is not None:
        bench.cpu_at_start = (busy, _own_cpu_seconds(), time.monotonic())
    started = time.time()
    interrupted = False
    print(f"sfox-relay bench ({mode}); scratch: {tmp}", flush=True)
    try:
        with _signals_interrupt():
            for name in SCENARIOS:
                if name not in chosen:
                    continue
                t0 = time.monotonic()
                print(f"- {name} ...", end=" ", flush=True)
                try:
                    RUNNERS[name](bench)
                    print(f"{time.monotonic() - t0:.0f} s", flush=True)
                except HarnessError as exc:
                    print("FAILED", flush=True)
                    bench.failures.append(f"{name}: {exc}")
                    print(f"  {exc}", file=sys.stderr, flush=True)
                except Exception as exc:  # a bug in the harness: report it, run the rest
                    print("FAILED", flush=True)
                    bench.failures.append(f"{name}: {type(exc).__name__}: {exc}")
                    traceback.print_exc()
    except (KeyboardInterrupt, _Interrupted):
        interrupted = True
        bench.failures.append("interrupted")
        print("\ninterrupted: stopping every child process", file=sys.stderr, flush=True)
    text, failures = write_outputs(bench, mode, started, args.results, command)
    print()
    print(text, flush=True)
    if not args.keep and not failures:
        shutil.rmtree(tmp, ignore_errors=True)
    elif failures:
        print(f"logs kept in {tmp}", file=sys.stderr)
    if interrupted:
        return 130
    return 1 if failures else 0
