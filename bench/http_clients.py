"""HTTP client spike for the dispatcher: which client can POST signed webhooks fastest?

Measures POST throughput of ~600-byte signed JSON bodies at fixed concurrency against
``relay.receiver`` running in a separate process (pinned to another core when possible), for:

  (a) ``httpx.AsyncClient`` with its default transport (httpcore)
  (b) ``httpx.AsyncClient(transport=httpx_aiohttp.AiohttpTransport(...))``
  (b2) the same transport driven directly with ``httpx.Request`` (no ``AsyncClient`` layer)
  (c) ``aiohttp.ClientSession`` + ``TCPConnector(limit_per_host=N)``, reading at most 1 KiB

then checks what the dispatcher needs from aiohttp's client: no redirects, HTTPS_PROXY /
NO_PROXY (``trust_env=True``), SSL_CERT_FILE, a per-request total timeout, and a bounded read
of a 10 MB answer.

    .venv/bin/python bench/http_clients.py                  # everything (about 1.5 min)
    .venv/bin/python bench/http_clients.py --duration 3 --rounds 1 --no-checks

Loopback only; every loop is bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import httpx
import httpx_aiohttp
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.certs import make_certs  # noqa: E402
from relay.receiver import Received, Receiver, Response  # noqa: E402
from relay.signing import sign  # noqa: E402

KEY = b"bench-key-0123456789abcdef012345"
EXCERPT = 1024

Post = Callable[[], Awaitable[int]]


def sample_body() -> bytes:
    """A ~600-byte sFOX users-feed message, compact JSON (what the dispatcher sends)."""
    message = {
        "sequence": 1234567,
        "recipient": "enterprise_users",
        "timestamp": 1732627200123456789,
        "payload": {
            "event": "user_status_changed",
            "partner_user_id": "partner-user-000000000042",
            "status": "VERIFIED",
            "previous_status": "PENDING",
            "account_type": "individual",
            "kyc": {"level": 2, "country": "US", "state": "NY", "review": "auto"},
            "email_verified": True,
            "phone_verified": True,
            "created_at": "2026-11-26T12:00:00.000Z",
            "updated_at": "2026-11-26T12:34:56.789Z",
            "limits": {"daily_withdrawal_usd": "50000.00", "daily_deposit_usd": "250000.00"},
            "tags": ["institutional", "api", "otc"],
            "note": "x" * 120,
        },
    }
    return json.dumps(message, separators=(",", ":")).encode()


BODY = sample_body()
TS = int(time.time())
HEADERS = {
    "content-type": "application/json",
    "user-agent": "sfox-relay/bench",
    "webhook-id": "evt_" + "ab" * 32,
    "webhook-timestamp": str(TS),
    "webhook-signature": sign([KEY], "evt_" + "ab" * 32, TS, BODY),
    "relay-source": "feed",
}


# --- clients under test -------------------------------------------------------------------


@contextlib.asynccontextmanager
async def httpx_default(url: str, concurrency: int) -> AsyncIterator[Post]:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=10.0) as client:

        async def post() -> int:
            return (await client.post(url, content=BODY, headers=HEADERS)).status_code

        yield post


@contextlib.asynccontextmanager
async def httpx_aiohttp_transport(url: str, concurrency: int) -> AsyncIterator[Post]:
    transport = httpx_aiohttp.AiohttpTransport(limits=httpx.Limits(max_connections=concurrency))
    async with httpx.AsyncClient(transport=transport, timeout=10.0) as client:

        async def post() -> int:
            return (await client.post(url, content=BODY, headers=HEADERS)).status_code

        yield post


@contextlib.asynccontextmanager
async def httpx_aiohttp_transport_direct(url: str, concurrency: int) -> AsyncIterator[Post]:
    """(b) without httpx.AsyncClient: shows what the client layer alone costs."""
    transport = httpx_aiohttp.AiohttpTransport(limits=httpx.Limits(max_connections=concurrency))
    extensions = {"timeout": {"connect": 10.0, "read": 10.0, "write": 10.0, "pool": 10.0}}
    async with transport:

        async def post() -> int:
            request = httpx.Request(
                "POST", url, content=BODY, headers=HEADERS, extensions=extensions
            )
            response = await transport.handle_async_request(request)
            try:
                await response.aread()
            finally:
                await response.aclose()
            return response.status_code

        yield post


async def read_excerpt(response: aiohttp.ClientResponse, limit: int = EXCERPT) -> bytes:
    """At most ``limit`` bytes of the body, without buffering the rest."""
    excerpt = b""
    while len(excerpt) < limit:
        chunk = await response.content.read(limit - len(excerpt))
        if not chunk:
            break
        excerpt += chunk
    return excerpt


@contextlib.asynccontextmanager
async def aiohttp_raw(url: str, concurrency: int) -> AsyncIterator[Post]:
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=concurrency)
    timeout = aiohttp.ClientTimeout(total=10.0)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def post() -> int:
            async with session.post(
                url, data=BODY, headers=HEADERS, allow_redirects=False
            ) as response:
                await read_excerpt(response)
                return response.status

        yield post


CLIENTS: dict[str, Callable[[str, int], contextlib.AbstractAsyncContextManager[Post]]] = {
    "(a) httpx default": httpx_default,
    "(b) httpx + httpx_aiohttp": httpx_aiohttp_transport,
    "(b2) AiohttpTransport direct": httpx_aiohttp_transport_direct,
    "(c) aiohttp raw": aiohttp_raw,
}


# --- the throughput loop ------------------------------------------------------------------


@dataclass
class Result:
    client: str
    concurrency: int
    requests: int
    seconds: float
    errors: int
    latencies: list[float] = field(repr=False)
    client_cpu: float  # fraction of one core
    receiver_cpu: float

    @property
    def rate(self) -> float:
        return self.requests / self.seconds

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def measure(
    name: str, url: str, concurrency: int, warmup: float, duration: float, receiver: psutil.Process
) -> Result:
    factory = CLIENTS[name]
    me = psutil.Process()
    latencies: list[float] = []
    state = {"measuring": False, "stop": False, "requests": 0, "errors": 0, "total": 0}

    async with factory(url, concurrency) as post:

        async def worker() -> None:
            while not state["stop"]:
                started = time.perf_counter()
                try:
                    status = await post()
                except Exception:
                    status = 0
                state["total"] += 1
                if state["measuring"]:
                    latencies.append(time.perf_counter() - started)
                    state["requests"] += 1
                    if not 200 <= status < 300:
                        state["errors"] += 1

        async with asyncio.TaskGroup() as group:
            for _ in range(concurrency):
                group.create_task(worker())
            await asyncio.sleep(warmup)
            cpu0, rcpu0, t0 = (
                sum(me.cpu_times()[:2]),
                sum(receiver.cpu_times()[:2]),
                time.perf_counter(),
            )
            state["measuring"] = True
            await asyncio.sleep(duration)
            state["measuring"] = False
            seconds = time.perf_counter() - t0
            cpu1, rcpu1 = sum(me.cpu_times()[:2]), sum(receiver.cpu_times()[:2])
            state["stop"] = True
    return Result(
        name,
        concurrency,
        state["requests"],
        seconds,
        state["errors"],
        latencies,
        (cpu1 - cpu0) / seconds,
        (rcpu1 - rcpu0) / seconds,
    )


@contextlib.contextmanager
def receiver_process(pin: bool) -> Iterator[tuple[str, psutil.Process]]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "relay.receiver", "--port", "0", "--interval", "0"],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        if not url.startswith("http://"):
            raise RuntimeError(f"receiver did not start: {url!r}")
        if pin and hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) >= 2:
            os.sched_setaffinity(proc.pid, {1})
            os.sched_setaffinity(0, {0})
        yield url, psutil.Process(proc.pid)
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
        print(f"receiver process: {out.strip()} (requests it answered)")


def run_throughput(args: argparse.Namespace) -> None:
    print(
        f"POST {len(BODY)}-byte signed JSON, warmup {args.warmup}s + {args.duration}s per cell, "
        f"{args.rounds} round(s), cpus={os.cpu_count()}, python {sys.version.split()[0]}, "
        f"httpx {httpx.__version__}, aiohttp {aiohttp.__version__}"
    )
    results: dict[tuple[str, int], list[Result]] = {}
    with receiver_process(not args.no_pin) as (url, receiver):
        for round_ in range(args.rounds):
            for name in CLIENTS:
                for concurrency in args.concurrency:
                    result = asyncio.run(
                        measure(name, url, concurrency, args.warmup, args.duration, receiver)
                    )
                    results.setdefault((name, concurrency), []).append(result)
                    print(
                        f"  round {round_ + 1} {name:<27} c={concurrency:<3} "
                        f"{result.rate:8.0f} req/s  p50 {result.percentile(0.5):6.2f} ms  "
                        f"p99 {result.percentile(0.99):6.2f} ms  errors {result.errors}  "
                        f"client cpu {result.client_cpu:4.0%}  receiver cpu "
                        f"{result.receiver_cpu:4.0%}",
                        flush=True,
                    )
    print()
    print(f"| client | {' | '.join(f'c={c} req/s (median)' for c in args.concurrency)} | p99 ms |")
    print(f"|---|{'---|' * len(args.concurrency)}---|")
    for name in CLIENTS:
        cells = []
        p99s = []
        for concurrency in args.concurrency:
            runs = results[(name, concurrency)]
            cells.append(f"{statistics.median(r.rate for r in runs):,.0f}")
            p99s.append(f"{statistics.median(r.percentile(0.99) for r in runs):.1f}")
        print(f"| {name} | {' | '.join(cells)} | {' / '.join(p99s)} |")
    receiver_capacity = [
        r.rate / r.receiver_cpu for runs in results.values() for r in runs if r.receiver_cpu > 0
    ]
    if receiver_capacity:
        print(
            f"\nreceiver cost: {statistics.median(receiver_capacity):,.0f} req per receiver "
            "CPU-second (its capacity on one core)"
        )


# --- capability checks for aiohttp's client ------------------------------------------------


def check(label: str, ok: bool, detail: str) -> bool:
    print(f"  [{'ok' if ok else 'FAIL'}] {label}: {detail}")
    return ok


@contextlib.contextmanager
def env(**values: str | None) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


async def stalled_body_server() -> tuple[asyncio.Server, int]:
    """Answers 200 with Content-Length 100, sends 3 bytes, then stalls (tests total timeout)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc")
            await writer.drain()
            await asyncio.wait_for(reader.read(), 5)  # until the client gives up
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def run_checks() -> bool:
    print(f"\naiohttp client capability checks (aiohttp {aiohttp.__version__}):")
    ok = True
    ten_mb = b"x" * (10 * 1024 * 1024)

    def behaviour(r: Received) -> Response:
        if r.path == "/redirect":
            return Response(302, headers={"Location": "/elsewhere"})
        if r.path == "/slow":
            return Response(204, delay=2.0)
        if r.path == "/big":
            return Response(200, headers={"Content-Type": "text/plain"}, body=ten_mb)
        return Response(204)

    async with (
        Receiver(behaviour=behaviour) as target,
        Receiver(
            behaviour=lambda r: Response(403 if r.method == "CONNECT" else 200, body=b"via proxy")
        ) as proxy,
    ):
        # 1. redirects are answers, not instructions
        async with (
            aiohttp.ClientSession() as session,
            session.post(target.url + "/redirect", data=BODY, allow_redirects=False) as r,
        ):
            status, location = r.status, r.headers.get("Location")
        followed = [x.path for x in target.received if x.path == "/elsewhere"]
        ok &= check(
            "allow_redirects=False",
            status == 302 and not followed,
            f"status {status}, Location {location!r}, followed: {bool(followed)}",
        )

        # 2. proxies from the environment (trust_env=True), NO_PROXY honoured
        proxy_env = {
            "HTTP_PROXY": proxy.url,
            "HTTPS_PROXY": proxy.url,
            "NO_PROXY": "127.0.0.1,localhost",
            "http_proxy": None,
            "https_proxy": None,
            "no_proxy": None,
            "ALL_PROXY": None,
            "all_proxy": None,
        }
        with env(**proxy_env):
            async with aiohttp.ClientSession(trust_env=True) as session:
                async with session.post("http://webhook.invalid/hook", data=BODY) as r:
                    http_via = (r.status, await r.read())
                try:
                    async with session.post("https://webhook.invalid/hook", data=BODY) as r:
                        https_outcome = f"status {r.status}"
                except aiohttp.ClientHttpProxyError as exc:
                    https_outcome = f"{type(exc).__name__} {exc.status}"
                before = target.count
                async with session.post(target.url + "/direct", data=BODY) as r:
                    direct = r.status == 204 and target.count == before + 1
        seen = [(x.method, x.path) for x in proxy.received]
        ok &= check(
            "HTTP_PROXY via trust_env",
            http_via == (200, b"via proxy") and ("POST", "http://webhook.invalid/hook") in seen,
            f"proxy saw {seen[:1]}",
        )
        ok &= check(
            "HTTPS_PROXY via trust_env (CONNECT tunnel)",
            ("CONNECT", "webhook.invalid:443") in seen,
            f"proxy saw {seen[1:2]}, client got {https_outcome}",
        )
        ok &= check("NO_PROXY=127.0.0.1 goes direct", direct, f"direct={direct}")

        # 3. per-request total timeout, covering the body read too
        async with aiohttp.ClientSession() as session:
            started = time.monotonic()
            try:
                async with session.post(
                    target.url + "/slow", data=BODY, timeout=aiohttp.ClientTimeout(total=0.3)
                ) as r:
                    outcome = f"status {r.status}"
            except TimeoutError as exc:
                outcome = f"{type(exc).__module__}.{type(exc).__name__}"
            waited = time.monotonic() - started
        ok &= check(
            "ClientTimeout(total=0.3) on a 2 s answer",
            "Timeout" in outcome and waited < 1.0,
            f"{outcome} after {waited:.2f}s (isinstance TimeoutError)",
        )
        server, port = await stalled_body_server()
        async with server, aiohttp.ClientSession() as session:
            started = time.monotonic()
            try:
                async with session.post(
                    f"http://127.0.0.1:{port}/", data=BODY, timeout=aiohttp.ClientTimeout(total=0.3)
                ) as r:
                    await read_excerpt(r)
                    outcome = "read finished"
            except TimeoutError as exc:
                outcome = f"{type(exc).__module__}.{type(exc).__name__}"
            waited = time.monotonic() - started
        ok &= check(
            "total timeout also bounds a stalled body",
            "Timeout" in outcome and waited < 1.0,
            f"{outcome} after {waited:.2f}s",
        )

        # 4. bounded excerpt of a 10 MB answer
        async with aiohttp.ClientSession() as session:
            started = time.monotonic()
            async with session.post(target.url + "/big", data=BODY) as r:
                await asyncio.sleep(0.3)  # give the socket time to fill every buffer it will
                excerpt = await read_excerpt(r)
                buffered = r.content.total_bytes
                r.close()  # unread payload: drop the connection rather than drain 10 MB
            waited = time.monotonic() - started
        ok &= check(
            "1 KiB excerpt of a 10 MB body",
            len(excerpt) == EXCERPT and buffered < 1024 * 1024,
            f"read {len(excerpt)} B; the stream had taken in {buffered / 1024:.0f} KiB of "
            f"10240 KiB (flow control paused the socket); {waited:.2f}s",
        )

    # 5. SSL_CERT_FILE
    with tempfile.TemporaryDirectory() as tmp:
        pki = make_certs(Path(tmp))
        ca = pki.ca
        tls = Receiver()
        await tls.start(ssl=pki.server_context())
        async with tls:

            async def get(ctx: ssl.SSLContext | bool) -> str:
                try:
                    async with (
                        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as session,
                        session.post(tls.url, data=BODY) as r,
                    ):
                        return f"status {r.status}"
                except aiohttp.ClientConnectorCertificateError:
                    return "certificate not trusted"

            with env(SSL_CERT_FILE=str(ca)):
                default_after_import = await get(True)
                built_after = await get(ssl.create_default_context())
            with env(SSL_CERT_FILE=None):
                without = await get(ssl.create_default_context())
            child = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                "import asyncio, sys, aiohttp\n"
                "async def main():\n"
                "    async with aiohttp.ClientSession() as s, s.post(sys.argv[1]) as r:\n"
                "        print(r.status)\n"
                "asyncio.run(main())\n",
                tls.url,
                env=dict(os.environ, SSL_CERT_FILE=str(ca)),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            out, err = await asyncio.wait_for(child.communicate(), 30)
            child_outcome = (
                f"status {out.decode().strip()}"
                if child.returncode == 0
                else err.decode().strip().splitlines()[-1][:80]
            )
        ok &= check(
            "SSL_CERT_FILE with ssl.create_default_context() built after it is set",
            built_after == "status 204" and without == "certificate not trusted",
            f"with: {built_after}; without: {without}",
        )
        print(
            f"  [info] aiohttp's own default context (ssl=True): env set after import -> "
            f"{default_after_import}; env set before import (child process) -> {child_outcome}"
        )

    # 6. what httpx_aiohttp does with the same knobs
    with env(**proxy_env):
        plain = httpx.AsyncClient(transport=httpx_aiohttp.AiohttpTransport())
        wrapped = httpx_aiohttp.HttpxAiohttpClient()
        mounts = {
            "AsyncClient(transport=AiohttpTransport())": plain,
            "HttpxAiohttpClient()": wrapped,
        }
        for label, client in mounts.items():
            proxied = sorted(str(p.pattern) for p in client._mounts)
            print(f"  [info] {label}: env proxy mounts {proxied or 'none'}")
            await client.aclose()
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per cell")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (median kept)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--no-pin", action="store_true", help="do not pin client/receiver cores")
    parser.add_argument("--no-checks", action="store_true")
    parser.add_argument("--checks-only", action="store_true")
    args = parser.parse_args()
    if not args.checks_only:
        run_throughput(args)
    if not args.no_checks and not asyncio.run(run_checks()):
        sys.exit(1)


if __name__ == "__main__":
    main()
