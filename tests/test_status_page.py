"""The status page (``GET /``) in a real headless Chromium against a running relay.

The page holds no data: it reads ``/api/*`` with the admin token, here handed over in the URL
fragment (``/#token=...``, never sent to the server) instead of the interactive prompt. The
browser is driven over the DevTools protocol (tests/cdp.py): real clicks and key presses,
every request the page makes recorded. Screenshots land in the test's directory (and, with
``SFOX_RELAY_SCREENSHOTS=<dir>``, there too, for the README).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from cdp import CHROMIUM, Page, PageError, chromium
from conftest import EnvBuilder, ReceiverFactory

from relay import service
from relay.receiver import Received, Response
from relay.simulator import Simulator

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install chromium)"),
]

ADMIN_TOKEN = "adm-Status+Page/Token=9"  # characters that need care in a fragment
MESSAGES = 40
REPLAY_ALL = '[aria-label^="Replay all"]'
CONFIRM_OPEN = "document.getElementById('confirm').open"

TABLE = """((id) => [...document.querySelectorAll('#' + id + ' tr')]
  .map((tr) => [...tr.cells].map((c) => c.textContent.trim())))"""


def save(shot: Path, data: bytes) -> None:
    """Keep a screenshot beside the test's files, and where SFOX_RELAY_SCREENSHOTS says."""
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(data) > 20_000, len(data)  # a rendered page, not a blank canvas
    if target := os.environ.get("SFOX_RELAY_SCREENSHOTS"):
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(target) / shot.name)


async def table(page: Page, ident: str) -> list[list[str]]:
    rows: list[list[str]] = await page.eval(f"{TABLE}({json.dumps(ident)})")
    return rows


async def click_until(page: Page, selector: str, condition: str, tries: int = 3) -> None:
    """Click ``selector`` until ``condition`` holds: the page rebuilds a table when its data
    changes (every 5 s at most), and a click that lands mid-rebuild hits nothing."""
    for attempt in range(tries):
        await page.click(selector)
        try:
            await page.wait_for(condition, timeout=3)
            return
        except PageError:
            if attempt == tries - 1:
                raise


async def open_page(page: Page, origin: str, fragment: str) -> None:
    await page.goto(f"{origin}/#{fragment}")
    await page.wait_for("document.body && document.body.dataset.loaded === '1'")


@pytest.fixture
async def running(
    sim: Simulator,
    make_receiver: ReceiverFactory,
    relay_env: EnvBuilder,
    run_relay: Any,
    eventually: Any,
) -> Any:
    """A relay with a good endpoint (crm) and one answering 410 to all (archive), settled."""
    good = await make_receiver()

    def gone(_: Received) -> Response:
        return Response(410, body=b"no such hook")

    failing = await make_receiver(behaviour=gone)
    endpoints = [
        {"name": "crm", "url": good.url + "/hooks/sfox"},
        {"name": "archive", "url": failing.url + "/hooks/sfox"},
    ]
    env = relay_env(RELAY_ENDPOINTS=json.dumps(endpoints), RELAY_ADMIN_TOKEN=ADMIN_TOKEN)
    async with run_relay(env) as relay:
        await good.wait_for(MESSAGES, timeout=15)
        await failing.wait_for(MESSAGES, timeout=15)

        async def settled() -> bool:
            stats = {e.endpoint: e for e in await relay.store.endpoint_stats()}
            return (
                "crm" in stats
                and "archive" in stats
                and stats["crm"].delivered == MESSAGES
                and stats["archive"].dead == MESSAGES
            )

        await eventually(settled, 10)
        yield relay, good, failing


async def test_status_page_shows_live_numbers_and_charts(running: Any, tmp_path: Path) -> None:
    relay, _, _ = running
    origin = f"http://127.0.0.1:{relay.admin.port}"
    async with chromium(tmp_path / "profile") as browser:
        page = await browser.new_page()
        await open_page(page, origin, "token=" + quote(ADMIN_TOKEN, safe=""))
        assert await page.eval("document.getElementById('error').textContent") == ""
        assert await page.eval("document.getElementById('feed').textContent") == "subscribed"
        assert await page.eval("document.getElementById('store').textContent") == "writable"
        assert (await page.eval("document.getElementById('version').textContent")).startswith("v")
        assert await page.eval("document.getElementById('updated').textContent") != "never"
        age = await page.eval("document.getElementById('feed-age').title")
        assert age.endswith("Z")  # the absolute time on hover, the relative one shown
        header, *rows = await table(page, "endpoints")
        assert header[:6] == ["Endpoint", "Pending", "Delivered", "Dead", "Success rate", "State"]
        by_name = {row[0]: row for row in rows}
        assert set(by_name) == {"crm", "archive"}
        assert by_name["crm"][1:5] == ["0", str(MESSAGES), "0", "100.0%"]
        assert by_name["archive"][1:5] == ["0", "0", str(MESSAGES), "0.0%"]
        assert f"Replay dead ({MESSAGES})" in by_name["archive"][8]
        _, *dead = await table(page, "dead")
        assert len(dead) == 10  # the page asks for the 10 most recent
        assert all(row[1] == "archive" and row[3] == "410" for row in dead)
        # The token was read from the fragment and dropped from the address bar and the page.
        assert ADMIN_TOKEN not in await page.eval("location.href")
        assert ADMIN_TOKEN not in await page.eval("document.documentElement.outerHTML")

        # Charts: the history the relay keeps, drawn as SVG, with the deliveries in it.
        await page.wait_for(
            "[...document.querySelectorAll('polyline.delivered')]"
            ".some((p) => Number(p.dataset.max) > 0)"
        )
        captions = await page.eval(
            "[...document.querySelectorAll('figcaption')].map((f) => f.textContent)"
        )
        assert "Feed messages / s" in captions
        assert {"crm: deliveries / s", "archive: deliveries / s"} <= set(captions)
        assert await page.eval(
            "[...document.querySelectorAll('polyline.failed')].some((p) => p.dataset.max > 0)"
        )
        save(tmp_path / "status-page.png", await page.screenshot(tmp_path / "status-page.png"))

        # Each endpoint's state, and pause / resume from the page (the relay's own state).
        state = "document.querySelector('tr[data-endpoint=\"crm\"] .pill').textContent"
        assert await page.eval(state) == "active"
        await click_until(page, '[aria-label="Pause crm"]', f"{state} === 'paused'", tries=5)
        listed = {e["name"]: e for e in await service.endpoints(relay.store, relay.settings)}
        assert listed["crm"]["state"] == "paused" and listed["archive"]["state"] == "active"
        await click_until(page, '[aria-label="Resume crm"]', f"{state} === 'active'", tries=5)
        listed = {e["name"]: e for e in await service.endpoints(relay.store, relay.settings)}
        assert listed["crm"]["state"] == "active"

        # Usable at 375 px: nothing wider than the screen but the tables' own scroll boxes.
        await page.resize(375, 800)
        await page.wait_for("document.documentElement.clientWidth === 375")
        assert await page.eval("document.documentElement.scrollWidth") <= 375
        save(tmp_path / "status-375.png", await page.screenshot(tmp_path / "status-375.png"))

        # Nothing left the origin: every request went to the relay itself.
        assert page.requests and all(url.startswith(origin + "/") for url in page.requests), (
            page.requests
        )
        assert page.console_errors == []

        # With a wrong token the page shows no data.
        wrong = await browser.new_page()
        await wrong.goto(f"{origin}/#token=not-the-token")
        await wrong.wait_for("document.getElementById('error').textContent.includes('refused')")
        assert (await table(wrong, "endpoints"))[1:] == []


async def test_find_by_webhook_id_shows_attempts_and_replay_reaches_the_receiver(
    running: Any, tmp_path: Path, eventually: Any
) -> None:
    relay, good, failing = running
    origin = f"http://127.0.0.1:{relay.admin.port}"
    webhook_id = good.received[3].webhook_id  # what the CRM logged
    async with chromium(tmp_path / "profile") as browser:
        page = await browser.new_page()
        # A link from a log or an alert: #token=<t>&q=<webhook-id> fills the box and runs it.
        await open_page(page, origin, f"token={quote(ADMIN_TOKEN, safe='')}&q={webhook_id}")
        await page.wait_for("document.querySelector('article.delivery')")
        cards = await page.eval(
            "[...document.querySelectorAll('article.delivery')].map((a) => a.textContent)"
        )
        # Both endpoints got the event: one delivery each, each with its attempt.
        assert len(cards) == 2 and all(webhook_id in card for card in cards), cards
        assert await page.eval("document.getElementById('q').value") == webhook_id
        assert await page.eval("location.hash") == f"#q={webhook_id}"
        attempts = await page.eval(
            "[...document.querySelectorAll('table.attempts tbody tr')]"
            ".map((tr) => tr.cells[2].textContent)"
        )
        assert sorted(attempts) == ["204", "410"], attempts
        assert "no such hook" in " ".join(cards)  # the response excerpt, shown as text
        save(tmp_path / "find.png", await page.screenshot(tmp_path / "find.png"))

        # By keyboard: focus the box, type a user_id, press Enter.
        user_id = json.loads(good.received[0].body)["payload"]["user_id"]
        await page.eval("document.getElementById('q').select()")
        await page.type(user_id)
        await page.press("Enter")
        await page.wait_for(f"location.hash === '#q={user_id}'")
        await page.wait_for(
            "document.getElementById('found-summary').textContent.includes('deliveries for')"
        )
        users = await page.eval(
            "[...document.querySelectorAll('article.delivery')].map((a) => a.textContent)"
        )
        assert users and all(user_id in card for card in users)

        # Replay the dead delivery of that webhook-id from its card, after the confirmation.
        before = len(failing.received)
        await page.goto(f"{origin}/#q={webhook_id}")
        await page.wait_for(
            "document.getElementById('found-summary').textContent === "
            f"'2 deliveries for {webhook_id}'"
        )
        await page.click("article.delivery button")
        await page.wait_for("document.getElementById('confirm').open")
        text = await page.eval("document.getElementById('confirm-text').textContent")
        assert "Replay delivery dlv_" in text
        await page.click("#confirm-ok")
        await page.wait_for("!document.getElementById('confirm').open")
        await page.wait_for(
            "document.getElementById('found-summary').textContent.startsWith('re-queued')"
        )
        summary = await page.eval("document.getElementById('found-summary').textContent")
        assert summary == "re-queued 1", summary

        async def replayed() -> bool:
            return webhook_id in [r.webhook_id for r in failing.received[before:]]

        async def state() -> str:
            found = await relay.store.list_deliveries(endpoint="archive", event_id=webhook_id)
            return repr(found)

        try:
            await eventually(replayed, 10)
        except AssertionError:
            raise AssertionError(await state()) from None
        await page.wait_for(
            "document.getElementById('found-summary').textContent === 're-queued 1'"
        )

        # All dead of an endpoint: the confirmation says how many, cancelling sends nothing.
        await page.wait_for("document.querySelector('[aria-label^=\"Replay all\"]')")
        await click_until(
            page, '[aria-label^="Replay all"]', "document.getElementById('confirm').open"
        )
        text = await page.eval("document.getElementById('confirm-text').textContent")
        dead_now = MESSAGES - 1 if text.startswith(f"Replay all {MESSAGES - 1} ") else MESSAGES
        assert text.startswith(f"Replay all {dead_now} dead deliveries of archive"), text
        await page.click("#confirm-cancel")
        await page.wait_for("!document.getElementById('confirm').open")
        count = len(failing.received)
        await click_until(
            page, '[aria-label^="Replay all"]', "document.getElementById('confirm').open"
        )
        await page.click("#confirm-ok")
        await eventually(lambda: len(failing.received) >= count + dead_now - 1, 15)
        assert page.requests and all(url.startswith(origin + "/") for url in page.requests)
        assert page.console_errors == []
