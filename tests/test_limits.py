"""What an admin client can hold, and running out of file descriptors (CONTRACT.md section 6).

Real sockets throughout: the admin server in this loop with short bounds, and a ``relay run``
subprocess under a tiny RLIMIT_NOFILE, where idle admin connections once took every
descriptor and deliveries then failed with "Too many open files", each using an attempt.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import httpx
import pytest
from conftest import EnvBuilder, ReceiverFactory, eventually, query, store_path

from relay.admin import AdminServer, create_app
from relay.config import load_settings
from relay.errors import RelayError
from relay.limits import Throttle, admin_connection_cap, out_of_descriptors
from relay.metrics import Metrics
from relay.receiver import Receiver, Response
from relay.simulator import Simulator
from relay.store.sqlite import SQLiteStore

RELAY = (sys.executable, "-m", "relay")

# -- pure parts -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("limit", "cap"),
    [(1024, 256), (1 << 20, 256), (512, 128), (128, 32), (24, 6), (8, 4)],
)
def test_admin_connections_get_a_quarter_of_the_descriptors_at_most_256(
    limit: int, cap: int
) -> None:
    assert admin_connection_cap(limit) == cap


def test_out_of_descriptors_is_found_through_the_client_libraries_wrapping() -> None:
    emfile = OSError(errno.EMFILE, "Too many open files")
    assert out_of_descriptors(emfile)
    assert out_of_descriptors(OSError(errno.ENFILE, "File table overflow"))
    try:
        try:
            raise emfile
        except OSError as exc:
            raise httpx.ConnectError("[Errno 24] Too many open files") from exc
    except httpx.ConnectError as wrapped:
        assert out_of_descriptors(wrapped)
    key = aiohttp.client_reqrep.ConnectionKey(
        "h", 80, False, True, None, None, None
    )  # aiohttp keeps the OSError on the exception, not as its cause
    assert out_of_descriptors(aiohttp.ClientConnectorError(key, emfile))
    refused = OSError(errno.ECONNREFUSED, "Connection refused")
    assert not out_of_descriptors(aiohttp.ClientConnectorError(key, refused))
    assert not out_of_descriptors(httpx.ConnectError("connection refused"))


def test_a_throttle_lets_one_through_per_period_and_counts_the_rest() -> None:
    now = [0.0]
    throttle = Throttle(10.0, clock=lambda: now[0])
    assert throttle.allow() == 0
    assert [throttle.allow() for _ in range(1000)] == [None] * 1000
    now[0] = 10.0
    assert throttle.allow() == 1000
    assert throttle.allow() is None


# -- the admin server's bounds, in this loop --------------------------------------------------


@pytest.fixture
async def admin(tmp_path: Path) -> AsyncIterator[AdminServer]:
    store = SQLiteStore(tmp_path / "relay.db")
    await store.open(daemon=False)
    settings = load_settings(
        {"RELAY_ENDPOINTS": "http://127.0.0.1:9/hooks", "RELAY_ALLOW_UNSIGNED": "true"},
        for_run=False,
    )
    app = create_app(
        store=store,
        settings=settings,
        metrics=Metrics(),
        readiness=lambda: {"feed": True, "store": True},
        feed_state=lambda: "subscribed",
    )
    server = AdminServer(app, "127.0.0.1", 0, max_connections=3, header_timeout=0.3)
    await server.start()
    serving = asyncio.create_task(server.serve())
    yield server
    await server.stop()
    await serving
    await store.close()


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    """True if the server closes the connection within ``seconds`` (EOF, or a reset)."""
    try:
        async with asyncio.timeout(seconds):
            return await reader.read() == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


async def test_a_connection_whose_headers_do_not_arrive_in_time_is_closed(
    admin: AdminServer,
) -> None:
    idle_r, idle_w = await asyncio.open_connection("127.0.0.1", admin.port)
    slow_r, slow_w = await asyncio.open_connection("127.0.0.1", admin.port)
    slow_w.write(b"GET /healthz HTTP/1.1\r\nHost: a\r\n")  # ... and never the blank line
    started = time.monotonic()
    assert await closed_within(idle_r, 3)
    assert await closed_within(slow_r, 3)
    assert 0.25 <= time.monotonic() - started < 3
    for writer in (idle_w, slow_w):
        writer.close()
    await eventually(lambda: admin.connections == 0)


async def test_each_request_on_a_kept_alive_connection_gets_its_headers_time(
    admin: AdminServer,
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", admin.port)
    for _ in range(3):
        await asyncio.sleep(0.2)  # within the 0.3 s each time, 0.6 s in all
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
        assert head.startswith(b"HTTP/1.1 200"), head
        assert b"\r\ndate: " in head.lower()
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
    assert await closed_within(reader, 3)  # idle again after the last response
    writer.close()


async def test_connections_beyond_the_cap_are_closed_at_once_and_logged_once(
    admin: AdminServer, caplog: pytest.LogCaptureFixture
) -> None:
    held = [await asyncio.open_connection("127.0.0.1", admin.port) for _ in range(3)]
    await eventually(lambda: admin.connections == 3)
    extra = [await asyncio.open_connection("127.0.0.1", admin.port) for _ in range(20)]
    for reader, _ in extra:
        assert await closed_within(reader, 0.25)
    refused = [r for r in caplog.records if getattr(r, "event", None) == "admin.refused"]
    assert len(refused) == 1
    assert admin.connections == 3

    held[0][1].write(b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert (await held[0][0].read()).startswith(b"HTTP/1.1 200")
    await eventually(lambda: admin.connections == 2)
    reader, writer = await asyncio.open_connection("127.0.0.1", admin.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert (await asyncio.wait_for(reader.read(), 2)).startswith(b"HTTP/1.1 200")
    for _, w in [*held, *extra, (reader, writer)]:
        w.close()


async def test_an_admin_address_in_use_is_a_relay_error_naming_the_variable(
    admin: AdminServer,
) -> None:
    app = create_app(
        store=SQLiteStore(Path("/nonexistent/unused.db")),
        settings=load_settings(
            {"RELAY_ENDPOINTS": "http://127.0.0.1:9/hooks", "RELAY_ALLOW_UNSIGNED": "true"},
            for_run=False,
        ),
        metrics=Metrics(),
        readiness=dict,
        feed_state=lambda: "stopped",
    )
    taken = AdminServer(app, "127.0.0.1", admin.port)
    with pytest.raises(RelayError, match=rf"RELAY_ADMIN_ADDR 127.0.0.1:{admin.port}: .*in use"):
        await taken.start()


# -- a real EMFILE ----------------------------------------------------------------------------

_SENDERS_UNDER_EMFILE = textwrap.dedent(
    """
    import asyncio, json, resource, socket, sys
    from relay.transport import AiohttpSender, HttpxSender

    async def main() -> None:
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        url = "http://127.0.0.1:%d/hooks" % server.sockets[0].getsockname()[1]
        senders = [AiohttpSender(), HttpxSender()]
        held = []
        try:
            while True:
                held.append(socket.socket())
        except OSError:
            pass
        results = [await s.post(url, b"{}", {}, 5.0) for s in senders]
        for sock in held:
            sock.close()
        print(json.dumps([[r.attempted, r.error] for r in results]))
        for s in senders:
            await s.close()
        server.close()

    asyncio.run(main())
    """
)


def test_both_senders_say_nothing_was_attempted_under_a_real_emfile() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _SENDERS_UNDER_EMFILE],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    assert results == [[False, "not sent: out of file descriptors"]] * 2


# -- a relay process with a handful of descriptors -------------------------------------------


@pytest.fixture
async def receiver(make_receiver: ReceiverFactory) -> Receiver:
    """A receiver that answers after 0.1 s and asks for the connection to be closed: every
    delivery needs a socket of its own, ~10 at once (one per user), more than are left."""
    slow_close = Response(204, headers={"Connection": "close"}, delay=0.1)
    return await make_receiver(behaviour=lambda _: slow_close)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def soft_and_hard(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no 'Max open files' line")


@pytest.mark.slow
@pytest.mark.parametrize("sim", [{"count": 200, "rate": 100.0}], indirect=True)
async def test_idle_admin_connections_never_cost_a_delivery_attempt(
    sim: Simulator, receiver: Receiver, relay_env: EnvBuilder, tmp_path: Path
) -> None:
    """With 24 descriptors in all (soft limit 16, raised at start-up), 300 idle admin
    connections; deliveries meet EMFILE meanwhile, yet each is delivered with one attempt."""
    port = free_port()
    env = relay_env(
        RELAY_ADMIN_ADDR=f"127.0.0.1:{port}", RELAY_LOG_LEVEL="INFO", RELAY_LOG_FORMAT="json"
    )
    child = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    log = tmp_path / "relay.log"

    def few_descriptors() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (16, 24))

    with log.open("wb") as sink:
        proc = await asyncio.create_subprocess_exec(
            *RELAY,
            "run",
            env={**child, **env, "PYTHONUNBUFFERED": "1"},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=sink,
            stderr=asyncio.subprocess.STDOUT,
            preexec_fn=few_descriptors,
        )
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:

        async def listening() -> bool:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                return False
            writer.close()
            return True

        await eventually(listening, 15, message=log.read_text)
        assert soft_and_hard(proc.pid) == (24, 24)
        for _ in range(300):
            idle.append(await asyncio.open_connection("127.0.0.1", port))
        await receiver.wait_for(200, timeout=30)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0, log.read_text()
    finally:
        for _, writer in idle:
            writer.close()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

    rows = query(store_path(env), "SELECT state, attempts, COUNT(*) FROM deliveries GROUP BY 1, 2")
    assert [tuple(r) for r in rows] == [("delivered", 1, 200)]
    attempts = query(store_path(env), "SELECT COUNT(*) FROM attempts")[0][0]
    assert attempts == 200
    events = Counter(json.loads(line).get("event") for line in log.read_text().splitlines())
    assert events["dispatch.unsent"] >= 1, events  # deliveries did meet EMFILE
    per_event = events["event.stored"] + events["delivery.succeeded"]  # one INFO line each
    assert sum(events.values()) - per_event < 100, events  # and the log stayed small
    assert events["admin.refused"] <= 5 and events["admin.accept_error"] <= 5, events


async def test_relay_run_on_an_admin_address_in_use_exits_1_and_creates_nothing(
    relay_env: EnvBuilder, tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = relay_env(RELAY_ADMIN_ADDR=f"127.0.0.1:{port}")
        child = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
        proc = await asyncio.create_subprocess_exec(
            *RELAY,
            "run",
            env={**child, **env},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1, err
    assert f"RELAY_ADMIN_ADDR 127.0.0.1:{port}: cannot listen there" in err.decode()
    assert not store_path(env).exists()
