"""Chaos, leaks: every output of a run (logs in each format, stores, metrics, ``relay check``)
searched for the secrets it was given."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import logging
import os
import random
from pathlib import Path

import httpx

from bench.audit import audit, find_leaks, sqlite_deliveries
from bench.chaos.harness import (
    OK,
    SCHEDULE_STEPS,
    Outcome,
    RelayProcess,
    _endpoint,
    _sim,
    cli,
    count,
    fast_feed,
    fresh_message,
    relay_env,
    sent_ids,
    sent_tokens,
    settle,
    sqlite_probe,
    store_bytes,
)
from bench.procs import eventually, in_process, new_key, new_whsec
from relay.config import load_settings, secret_values
from relay.logs import Redactor, setup_logging
from relay.receiver import Received, Response
from relay.simulator import FAKE_TOKEN, Faults


async def leak_audit(
    workdir: Path, *, log_format: str, echo: bool = False, daemon: bool = True, events: int = 120
) -> Outcome:
    """The whole pipeline with known secrets at DEBUG: auth failures, bad frames carrying a
    token, endpoints answering 500 with bodies; then grep every log line, /metrics, every /api
    response, `relay check` and `relay deliveries list|show` for each secret, and the store
    files for plaintext user tokens.

    ``echo``: the failing endpoint's 500 body echoes the request it got (headers and body),
    as debugging error pages do. ``daemon``: also run ``relay run`` itself at DEBUG for a few
    more events and search its whole stderr. Logs must also never show an email or a phone.
    """
    password = "pw-" + base64.b32encode(os.urandom(10)).decode().rstrip("=")
    header_value = "hdr-" + base64.b32encode(os.urandom(10)).decode().rstrip("=")
    admin_token = "adm-" + base64.b32encode(os.urandom(10)).decode().rstrip("=")
    api_key = "key-" + base64.b32encode(os.urandom(10)).decode().rstrip("=")
    signing = [new_whsec(), new_whsec()]
    token_key = new_key()
    receiver_key = new_key()
    stream = io.StringIO()
    outputs: dict[str, str | bytes] = {}
    async with contextlib.AsyncExitStack() as stack:
        sim = await _sim(
            stack,
            api_key=api_key,
            count=events,
            users=20,
            rate=200.0,
            faults=Faults(reject_auth=1, bad_every=max(2, events // 12)),
        )
        rng = random.Random(6)

        def failing(r: Received) -> Response:
            if rng.random() < 0.7:
                return OK
            body = b'{"error":"upstream exploded","trace_id":"t-1"}'
            if echo:
                shown = {k: v for k, v in r.headers.items() if not k.startswith("webhook-")}
                body = json.dumps({"error": "bad", "you_sent": shown}).encode() + r.body
            return Response(500, body=body)

        crm = await _endpoint(stack, "crm", signing, failing)
        vault = await _endpoint(stack, "vault", signing)
        endpoints = [
            {
                **crm.config(),
                "url": crm.url.replace("://", f"://relay:{password}@"),
                "headers": {"X-Partner-Auth": header_value},
                "user_token": "forward",
            },
            {**vault.config(), "user_token": "encrypt", "token_key": receiver_key},
        ]
        db = workdir / "leak.db"
        env = relay_env(
            sim,
            endpoints,
            " ".join(signing),
            f"sqlite:///{db}",
            RELAY_TOKEN_KEY=token_key,
            RELAY_ADMIN_TOKEN=admin_token,
            RELAY_LOG_LEVEL="DEBUG",
            RELAY_LOG_FORMAT=log_format,
        )
        settings = load_settings(env, for_run=True)
        handler = setup_logging(
            settings.log_level,
            settings.log_format,
            Redactor(secret_values(settings)),
            stream=stream,
        )
        root = logging.getLogger()
        # setup_logging changes these; put them back for whoever runs next in this process.
        touched = ["", "websockets", "aiohttp", "httpx", "httpcore", "uvicorn", "asyncio"]
        levels = {name: logging.getLogger(name).level for name in touched}
        try:
            async with (
                in_process(env, feed_options=fast_feed(sim, auth_retry_after=0.5)) as running,
                httpx.AsyncClient(base_url=running.admin, timeout=10) as http,
            ):
                await eventually(sim.finished.is_set, 20, "the simulator sent everything")
                await settle(sqlite_probe(sim, db), timeout=30)
                auth = {"authorization": f"Bearer {admin_token}"}
                for path in ("/metrics", "/readyz", "/healthz", "/api/openapi.json"):
                    outputs[path] = (await http.get(path, headers=auth)).text
                for path in ("/api/status", "/api/endpoints", "/api/deliveries?limit=500"):
                    outputs[path] = (await http.get(path, headers=auth)).text
                    outputs[path + " (no token)"] = (await http.get(path)).text
                items = json.loads(outputs["/api/deliveries?limit=500"])["items"]
                failed = [i for i in items if i["attempts"] > 1][:10] + items[:5]
                for item in failed:
                    path = f"/api/deliveries/{item['id']}"
                    outputs[path] = (await http.get(path, headers=auth)).text
                outputs["/api/deliveries (bad state)"] = (
                    await http.get("/api/deliveries?state=nope", headers=auth)
                ).text
        finally:
            root.removeHandler(handler)
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)
        outputs["log"] = stream.getvalue()
        if daemon:
            proc = await RelayProcess.start(env, workdir / "leak-daemon.log")
            try:
                await eventually(lambda: sim.subscribed > 0, 20, proc.output)
                before = count(db, "SELECT COUNT(*) FROM events")
                for n in range(6):
                    await sim.publish(fresh_message(rng, 10_000 + n))
                await eventually(lambda: count(db, "SELECT COUNT(*) FROM events") >= before + 6, 10)
                await settle(sqlite_probe(sim, db), timeout=30)
            finally:
                proc.terminate()
                await proc.wait()
            outputs["relay run (stderr)"] = proc.output()
        commands = [
            ("check",),
            ("deliveries", "list", "--limit", "500"),
            *(("deliveries", "show", item["id"]) for item in failed[:3]),
        ]
        bad_env = {**env, "RELAY_TOKEN_KEY": token_key[:10]}
        done = await asyncio.gather(
            *(cli(*args, env=env) for args in commands), cli("check", env=bad_env)
        )
        for args, (_, out, err) in zip(
            [*commands, ("check", "(bad token key)")], done, strict=True
        ):
            outputs[f"relay {' '.join(args)}"] = out + err
        for name, data in store_bytes(db.parent, db.name).items():
            outputs[f"store file {name}"] = data
        tokens = sent_tokens(sim)
        deliveries, stored_events = sqlite_deliveries(db)
        bad_frames = count(db, "SELECT COUNT(*) FROM bad_frames")

    secrets = {
        "API key": api_key,
        "signing secret 1": signing[0],
        "signing secret 1 (base64)": signing[0].removeprefix("whsec_"),
        "signing secret 2": signing[1],
        "signing secret 2 (base64)": signing[1].removeprefix("whsec_"),
        "RELAY_TOKEN_KEY": token_key,
        "endpoint token_key": receiver_key,
        "admin token": admin_token,
        "header value": header_value,
        "URL password": password,
        "FAKE_TOKEN": FAKE_TOKEN,
    }
    secrets |= {f"user token {t[:8]}": t for t in tokens}
    leaks = find_leaks(secrets, outputs)
    store_files = {k: v for k, v in outputs.items() if k.startswith("store file")}
    leaks += find_leaks(
        {f"user token {t[:8]} (raw)": bytes.fromhex(t) for t in tokens}, store_files
    )
    personal = {}
    for message in sim.sent:
        payload = message["payload"]
        for key in ("email", "phone_number"):
            if isinstance(payload.get(key), str):
                personal[f"{key} of {payload['user_id'][:15]}"] = payload[key]
    logs = {k: v for k, v in outputs.items() if k in ("log", "relay run (stderr)")}
    leaks += find_leaks(personal, logs)
    report = audit(
        f"leak audit ({log_format} logs{', endpoint echoes requests' if echo else ''})",
        deliveries,
        crm.arrivals + vault.arrivals,
        endpoints=[crm.name, vault.name],
        stored_events=stored_events,
        sent=sent_ids(sim),
        must_store_sent=True,
        dead_ok=lambda d: d.endpoint == crm.name and d.attempts >= SCHEDULE_STEPS,
        leaks=leaks,
    )
    log_lines = sum(str(text).count("\n") for text in logs.values())
    report.notes.append(
        f"{len(secrets)} secrets (incl. {len(tokens)} user tokens) searched in {log_lines} "
        f"log lines and {len(outputs) - 1} other outputs"
    )
    return Outcome(
        report,
        {
            "leaks": leaks,
            "log_lines": log_lines,
            "tokens": len(tokens),
            "outputs": len(outputs),
            "bad_frames": bad_frames,
        },
    )
