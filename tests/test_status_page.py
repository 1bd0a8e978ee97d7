"""The status page (``GET /``) in a real headless Chromium against a running relay.

The page holds no data: it reads ``/api/*`` with the admin token, here handed over in the URL
fragment (``/#token=...``, never sent to the server) instead of the interactive prompt.
Chromium runs as an asyncio subprocess so the relay, in this event loop, keeps answering it.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from conftest import EnvBuilder, ReceiverFactory

from relay.receiver import Received, Response
from relay.simulator import Simulator

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ADMIN_TOKEN = "adm-Status+Page/Token=9"  # characters that need care in a fragment
MESSAGES = 40


class Tables(HTMLParser):
    """Every table of the page (by id) as rows of cell texts, and the text of elements by id."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.by_id: dict[str, str] = {}
        self._table: str | None = None
        self._row: list[str] | None = None
        self._cell: list[str] | None = None
        self._open_ids: list[tuple[str, str, list[str]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        ident = dict(attrs).get("id")
        if ident:
            self._open_ids.append((tag, ident, []))
        if tag == "table" and ident:
            self._table = ident
            self.tables[ident] = []
        elif tag == "tr" and self._table:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None and self._table:
            self.tables[self._table].append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None
        if self._open_ids and self._open_ids[-1][0] == tag:
            _, ident, text = self._open_ids.pop()
            self.by_id[ident] = "".join(text).strip()

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)
        for _, _, text in self._open_ids:
            text.append(data)


async def chromium(*args: str, profile: Path, timeout: float = 30.0) -> tuple[int, str, str]:
    """Run headless Chromium once; (exit code, stdout, stderr)."""
    assert CHROMIUM is not None
    proc = await asyncio.create_subprocess_exec(
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=3000",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.communicate()
        raise AssertionError(f"chromium still running after {timeout}s") from None
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install chromium)")
async def test_status_page_shows_live_numbers_in_chromium(
    sim: Simulator,
    make_receiver: ReceiverFactory,
    relay_env: EnvBuilder,
    run_relay: Any,
    eventually: Any,
    tmp_path: Path,
) -> None:
    good = await make_receiver()

    def gone(_: Received) -> Response:
        return Response(410, body=b"no such hook")

    failing = await make_receiver(behaviour=gone)
    endpoints = [
        {"name": "crm", "url": good.url + "/hooks/sfox"},
        {"name": "archive", "url": failing.url + "/hooks/sfox"},
    ]
    env = relay_env(RELAY_ENDPOINTS=json.dumps(endpoints), RELAY_ADMIN_TOKEN=ADMIN_TOKEN)
    async with run_relay(env) as running:
        await good.wait_for(MESSAGES, timeout=15)
        await failing.wait_for(MESSAGES, timeout=15)

        async def settled() -> bool:
            stats = {e.endpoint: e for e in await running.store.endpoint_stats()}
            return (
                "crm" in stats
                and "archive" in stats
                and stats["crm"].delivered == MESSAGES
                and stats["archive"].dead == MESSAGES
            )

        await eventually(settled, 10)
        page = f"http://127.0.0.1:{running.admin.port}/#token={quote(ADMIN_TOKEN, safe='')}"

        code, dom, err = await chromium("--dump-dom", page, profile=tmp_path / "profile-dom")
        assert code == 0, err[-2000:]
        parsed = Tables()
        parsed.feed(dom)
        assert parsed.by_id.get("error") == "", (parsed.by_id, err[-2000:])
        assert parsed.by_id["feed"] == "subscribed"
        assert parsed.by_id["store"] == "writable"
        assert parsed.by_id["version"].startswith("v")
        assert parsed.by_id["updated"] != "never"
        header, *rows = parsed.tables["endpoints"]
        assert header[:4] == ["Endpoint", "Pending", "Delivered", "Dead"]
        by_name = {row[0]: row for row in rows}
        assert set(by_name) == {"crm", "archive"}
        assert by_name["crm"][1:5] == ["0", str(MESSAGES), "0", "100.0%"]
        assert by_name["archive"][1:5] == ["0", "0", str(MESSAGES), "0.0%"]
        _, *dead = parsed.tables["dead"]
        assert len(dead) == 10  # the page asks for the 10 most recent
        assert all(row[1] == "archive" and row[3] == "410" for row in dead)
        assert ADMIN_TOKEN not in dom  # the fragment was read and dropped

        # With a wrong token the page shows no data. (Without any token it would wait for its
        # prompt, which headless Chromium never answers.)
        wrong = f"http://127.0.0.1:{running.admin.port}/#token=not-the-token"
        code, dom, err = await chromium("--dump-dom", wrong, profile=tmp_path / "profile-wrong")
        assert code == 0, err[-2000:]
        parsed = Tables()
        parsed.feed(dom)
        assert "token was refused" in parsed.by_id["error"]
        assert parsed.tables["endpoints"][1:] == [] and parsed.tables["dead"][1:] == []

        shot = tmp_path / "page.png"
        code, _, err = await chromium(
            f"--screenshot={shot}",
            "--window-size=1280,900",
            "--hide-scrollbars",
            page,
            profile=tmp_path / "profile-shot",
        )
        assert code == 0, err[-2000:]
        data = shot.read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
        assert len(data) > 20_000, len(data)  # a rendered page, not a blank canvas
