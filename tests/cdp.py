"""Headless Chromium driven over the DevTools protocol, for the status-page tests.

A small client on the ``websockets`` library the relay already depends on: start the browser
with ``--remote-debugging-port=0``, open a page, evaluate JavaScript in it, record every request
it makes, take screenshots. Chromium runs as an asyncio subprocess so the relay under test, in
the same event loop, keeps answering it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--remote-debugging-port=0",
    "--remote-allow-origins=*",
)


class PageError(AssertionError):
    """The page threw, or a condition did not hold in time."""


class Page:
    """One tab: every request it sent is in :attr:`requests`."""

    def __init__(self, browser: Browser, session: str) -> None:
        self._browser = browser
        self._session = session
        self.requests: list[str] = []
        self.console_errors: list[str] = []

    async def send(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return await self._browser.send(method, params, session=self._session)

    def on_event(self, method: str, params: dict[str, Any]) -> None:
        if method == "Network.requestWillBeSent":
            self.requests.append(params["request"]["url"])
        elif method == "Runtime.exceptionThrown":
            self.console_errors.append(json.dumps(params["exceptionDetails"])[:2000])
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            self.console_errors.append(params["entry"].get("text", ""))

    async def goto(self, url: str) -> None:
        await self.send("Page.navigate", {"url": url})

    async def eval(self, expression: str) -> Any:
        """The value of ``expression`` in the page (promises awaited)."""
        result = await self.send(
            "Runtime.evaluate",
            {"expression": expression, "awaitPromise": True, "returnByValue": True},
        )
        if "exceptionDetails" in result:
            raise PageError(json.dumps(result["exceptionDetails"])[:2000])
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 15.0) -> None:
        """Poll ``expression`` until it is truthy in JavaScript's sense."""
        deadline = asyncio.get_running_loop().time() + timeout
        last: Any = None
        while asyncio.get_running_loop().time() < deadline:
            try:
                if await self.eval(f"!!({expression})"):
                    return
            except PageError as exc:
                last = exc
            await asyncio.sleep(0.1)
        raise PageError(f"not true after {timeout}s: {expression} (last error: {last})")

    async def click(self, selector: str) -> None:
        """A real mouse click in the middle of the element ``selector`` finds."""
        box = await self.eval(
            "(() => { const e = document.querySelector(" + json.dumps(selector) + ");"
            " if (!e) return null; e.scrollIntoView({block: 'center'});"
            " const r = e.getBoundingClientRect();"
            " return {x: r.x + r.width / 2, y: r.y + r.height / 2}; })()"
        )
        if box is None:
            raise PageError(f"no element {selector}")
        for kind in ("mousePressed", "mouseReleased"):
            await self.send(
                "Input.dispatchMouseEvent",
                {"type": kind, "x": box["x"], "y": box["y"], "button": "left", "clickCount": 1},
            )

    async def press(self, key: str) -> None:
        """A key press (``Enter``, ``Tab``) sent to the focused element."""
        codes = {"Enter": 13, "Tab": 9}
        for kind in ("keyDown", "keyUp"):
            params: dict[str, Any] = {
                "type": kind,
                "key": key,
                "code": key,
                "windowsVirtualKeyCode": codes[key],
            }
            if kind == "keyDown" and key == "Enter":
                params["text"] = "\r"
            await self.send("Input.dispatchKeyEvent", params)

    async def type(self, text: str) -> None:
        await self.send("Input.insertText", {"text": text})

    async def resize(self, width: int, height: int) -> None:
        await self.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600},
        )

    async def screenshot(self, path: Path) -> bytes:
        shot = await self.send("Page.captureScreenshot", {"format": "png"})
        data = base64.b64decode(shot["data"])
        path.write_bytes(data)
        return data


class Browser:
    """A headless Chromium and its one DevTools connection."""

    def __init__(self, proc: asyncio.subprocess.Process, ws: ClientConnection) -> None:
        self._proc = proc
        self._ws = ws
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._pages: dict[str, Page] = {}
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for raw in self._ws:
            message = json.loads(raw)
            if "id" in message:
                future = self._waiting.pop(message["id"], None)
                if future is not None and not future.done():
                    future.set_result(message)
            elif (page := self._pages.get(message.get("sessionId", ""))) is not None:
                page.on_event(message["method"], message.get("params", {}))

    async def send(
        self, method: str, params: dict[str, Any] | None = None, *, session: str | None = None
    ) -> dict[str, Any]:
        ident = next(self._ids)
        message: dict[str, Any] = {"id": ident, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[ident] = future
        await self._ws.send(json.dumps(message))
        async with asyncio.timeout(30):
            reply = await future
        if "error" in reply:
            raise PageError(f"{method}: {reply['error']}")
        result: dict[str, Any] = reply.get("result", {})
        return result

    async def new_page(self, width: int = 1280, height: int = 900) -> Page:
        target = await self.send("Target.createTarget", {"url": "about:blank"})
        attached = await self.send(
            "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}
        )
        page = Page(self, attached["sessionId"])
        self._pages[attached["sessionId"]] = page
        for domain in ("Page", "Network", "Runtime", "Log"):
            await page.send(f"{domain}.enable")
        await page.resize(width, height)
        return page

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.send("Browser.close")
        await self._ws.close()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._reader
        with contextlib.suppress(ProcessLookupError):
            self._proc.kill()
        await self._proc.wait()


@contextlib.asynccontextmanager
async def chromium(profile: Path) -> AsyncIterator[Browser]:
    """A headless Chromium with its own profile directory, closed afterwards."""
    assert CHROMIUM is not None
    proc = await asyncio.create_subprocess_exec(
        CHROMIUM,
        *_FLAGS,
        f"--user-data-dir={profile}",
        "about:blank",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    url = None
    try:
        async with asyncio.timeout(30):
            while url is None:
                line = (await proc.stderr.readline()).decode(errors="replace")
                if not line:
                    raise PageError("chromium exited before DevTools listened")
                if found := re.search(r"DevTools listening on (ws://\S+)", line):
                    url = found[1]
    except BaseException:
        proc.kill()
        await proc.wait()
        raise
    drain = asyncio.create_task(proc.stderr.read())  # keep its pipe from filling up
    ws = await connect(url, max_size=64 * 1024 * 1024, open_timeout=10)
    browser = Browser(proc, ws)
    try:
        yield browser
    finally:
        await browser.close()
        drain.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await drain
