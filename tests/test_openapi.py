"""The admin API against its own OpenAPI document, with schemathesis (CONTRACT.md section 6).

A running relay (in this event loop, with delivered events in its store) is fuzzed by the
``schemathesis run --checks all`` command in a subprocess: every status code and body a route
answers must be one the document names, valid data must be accepted and invalid data refused.
The run is deterministic (fixed seed) and bounded in examples and time.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import EnvBuilder

from relay.receiver import Receiver

pytestmark = pytest.mark.slow

ADMIN_TOKEN = "adm-0123456789abcdef0123456789abcdef"
SCHEMATHESIS = shutil.which("schemathesis", path=os.path.dirname(sys.executable))


@pytest.mark.skipif(SCHEMATHESIS is None, reason="schemathesis is in the dev extras")
async def test_schemathesis_finds_nothing_in_the_admin_api(
    receiver: Receiver, relay_env: EnvBuilder, run_relay: Any, tmp_path: Path
) -> None:
    assert SCHEMATHESIS is not None
    env = relay_env(RELAY_ADMIN_TOKEN=ADMIN_TOKEN)
    async with run_relay(env) as relay:
        await receiver.wait_for(40, timeout=15)
        base = f"http://127.0.0.1:{relay.admin.port}"
        proc = await asyncio.create_subprocess_exec(
            SCHEMATHESIS,
            "run",
            f"{base}/api/openapi.json",
            "--checks",
            "all",
            "--header",
            f"Authorization: Bearer {ADMIN_TOKEN}",
            "--max-examples",
            "15",
            "--seed",
            "1",
            "--generation-deterministic",
            "--max-time",
            "40",
            "--workers",
            "1",
            "--request-timeout",
            "5",
            "--no-color",
            # Endpoint names are free text in a path: most generated ones ("/", "..") are
            # not URL paths at all, and schemathesis would stop on its own filter (not a
            # finding about the API).
            "--suppress-health-check",
            "filter_too_much",
            cwd=tmp_path,
            env={**os.environ, "NO_COLOR": "1", "SCHEMATHESIS_HOOKS": ""},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            async with asyncio.timeout(90):
                out, _ = await proc.communicate()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    report = out.decode(errors="replace")
    assert proc.returncode == 0, report
