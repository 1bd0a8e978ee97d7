"""Chaos, the admin port: path tricks, bad tokens and odd requests against a running relay."""

from __future__ import annotations

import asyncio
import base64
import contextlib
from pathlib import Path

from bench.audit import AuditReport
from bench.chaos.harness import Outcome, _endpoint, _sim, count, relay_env
from bench.procs import eventually, in_process, new_key, new_whsec

TRICKY_PATHS = (
    "/api/endpoints",
    "/api/../api/endpoints",
    "//api/endpoints",
    "/%2Fapi/endpoints",
    "/api%2Fendpoints",
    "/api/%2e%2e/api/endpoints",
    "/./api/endpoints",
    "/api/endpoints/",
    "/api/endpoints%00",
    "/API/endpoints",
    "/api/deliveries?limit=500",
    "/api/deliveries/../endpoints",
    "/api/status",
    "/api/openapi.json/../endpoints",
    "/healthz/../api/endpoints",
    "http://127.0.0.1/api/endpoints",
)


async def raw_get(port: int, target: str, headers: str = "") -> tuple[int, str]:
    """One HTTP/1.1 GET sent byte for byte (no client normalises the path)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        request = f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}Connection: close\r\n\r\n"
        writer.write(request.encode("latin-1"))
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0
    return status, body.decode(errors="replace")


async def admin_tricks(workdir: Path) -> Outcome:
    """The admin API under a relay with data in it: no token, wrong tokens and path tricks
    answer 401, 403 or 404, never data."""
    secret = new_whsec()
    token = "adm-" + new_key()
    failures: list[str] = []
    tried = 0
    async with contextlib.AsyncExitStack() as stack:
        sim = await _sim(stack, count=30, users=10)
        sink = await _endpoint(stack, "sink-secret-name", [secret])
        db = workdir / "admin.db"
        env = relay_env(sim, [sink], secret, f"sqlite:///{db}", RELAY_ADMIN_TOKEN=token)
        async with in_process(env) as running:
            await eventually(lambda: count(db, "SELECT COUNT(*) FROM deliveries") >= 30, 15)
            port = running.relay.admin.port
            data_markers = ["sink-secret-name", "evt_", "client_", '"pending"']
            good = await raw_get(port, "/api/endpoints", f"Authorization: Bearer {token}\r\n")
            if good[0] != 200 or "sink-secret-name" not in good[1]:
                failures.append(f"the real token was refused: {good}")
            wrong_tokens = (
                "",
                "Authorization: Bearer \r\n",
                "Authorization: Bearer wrong-token\r\n",
                f"Authorization: Bearer {token[:-1]}\r\n",
                f"Authorization: Bearer {token}x\r\n",
                f"Authorization: Bearer  {token}\r\n",
                f"Authorization: Basic {base64.b64encode(token.encode()).decode()}\r\n",
                f"Authorization: {token}\r\n",
                f"X-Admin-Token: {token}\r\n",
                f"Cookie: token={token}\r\n",
            )
            for headers in wrong_tokens:
                for target in TRICKY_PATHS:
                    status, body = await raw_get(port, target, headers)
                    tried += 1
                    # 307: the framework's slash redirect, to a route that then asks for the
                    # token (the route list is public anyway, in /api/openapi.json).
                    if status not in (307, 400, 401, 403, 404, 405):
                        failures.append(f"{target} with {headers.strip()!r}: {status}")
                    elif any(marker in body for marker in data_markers):
                        failures.append(f"{target} with {headers.strip()!r} showed data")
            # Authorized, path tricks still never escape to anything but /api itself.
            for target in TRICKY_PATHS:
                status, body = await raw_get(port, target, f"Authorization: Bearer {token}\r\n")
                tried += 1
                if status >= 500:
                    failures.append(f"{target} with the token: {status}")
    report = AuditReport("admin API: no/wrong token, path tricks", sent=tried, stored=0)
    for failure in failures:
        report.problem(failure)
    report.notes.append(f"{tried} requests; the 'events sent' column counts them")
    return Outcome(report, {"failures": failures, "requests": tried})
