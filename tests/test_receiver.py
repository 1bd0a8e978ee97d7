"""The local webhook receiver, exercised with real HTTP clients over loopback."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # pytest puts tests/ on sys.path, not the repository root
    sys.path.insert(0, str(ROOT))

from bench.certs import make_certs  # noqa: E402
from relay.receiver import Received, Receiver, Response, _serve, main  # noqa: E402
from relay.signing import sign  # noqa: E402

KEY = b"k" * 32
OTHER_KEY = b"o" * 32
BODY = b'{"sequence":1,"recipient":"u1","timestamp":1732000000000000000,"payload":{"a":1}}'


def signed_headers(
    body: bytes = BODY, *, key: bytes = KEY, msg_id: str = "evt_1", ts: int | None = None
) -> dict[str, str]:
    ts = int(time.time()) if ts is None else ts
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": sign([key], msg_id, ts, body),
        "relay-source": "feed",
        "content-type": "application/json",
    }


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with Receiver() as r:
        yield r


async def raw_exchange(port: int, payload: bytes, *, read_until_close: bool = True) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        await writer.drain()
        if read_until_close:
            return await asyncio.wait_for(reader.read(), 5)
        return await asyncio.wait_for(reader.read(65536), 5)
    finally:
        writer.close()


async def test_records_a_delivery_and_answers_204(receiver: Receiver) -> None:
    async with httpx.AsyncClient() as client:
        before = time.time_ns()
        reply = await client.post(
            f"{receiver.url}/hook?x=1", content=BODY, headers=signed_headers()
        )
    assert reply.status_code == 204
    assert reply.content == b""
    [got] = receiver.received
    assert got.webhook_id == "evt_1"
    assert got.source == "feed"
    assert got.headers["content-type"] == "application/json"
    assert got.body == BODY
    assert got.json["timestamp"] == 1732000000000000000
    assert got.path == "/hook?x=1"
    assert got.method == "POST"
    assert got.verified is None  # no keys
    assert got.arrived_ns >= before
    assert receiver.count == 1
    assert receiver.url == f"http://127.0.0.1:{receiver.port}"


async def test_keep_alive_reuses_one_connection(receiver: Receiver) -> None:
    async with httpx.AsyncClient() as client:
        for i in range(20):
            reply = await client.post(receiver.url, content=BODY)
            assert reply.status_code == 204
            assert receiver.count == i + 1
    assert receiver.connections == 1


async def test_keep_alive_with_aiohttp_and_concurrency(receiver: Receiver) -> None:
    connector = aiohttp.TCPConnector(limit_per_host=4)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def post(i: int) -> int:
            async with session.post(receiver.url, data=b'{"i":%d}' % i) as reply:
                return reply.status

        statuses = await asyncio.gather(*(post(i) for i in range(200)))
    assert set(statuses) == {204}
    assert sorted(r.json["i"] for r in receiver.received) == list(range(200))
    assert receiver.connections <= 4


async def test_pipelined_requests_answer_in_order() -> None:
    delays = {b"/a": 0.05, b"/b": 0.0, b"/c": 0.01}

    def behaviour(r: Received) -> Response:
        return Response(200, body=r.path.encode(), delay=delays[r.path.encode()])

    async with Receiver(behaviour=behaviour) as receiver:
        requests = b"".join(
            b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi" % p for p in delays
        )
        reply = await raw_exchange(
            receiver.port, requests + b"GET /c HTTP/1.1\r\nConnection: close\r\n\r\n"
        )
    assert re.findall(rb"\r\n\r\n(/\w)", reply) == [b"/a", b"/b", b"/c", b"/c"]
    assert reply.count(b"HTTP/1.1 200 OK") == 4
    assert receiver.connections == 1
    assert [r.method for r in receiver.received] == ["POST", "POST", "POST", "GET"]


async def test_verifies_good_signatures() -> None:
    async with Receiver(keys=[OTHER_KEY, KEY]) as receiver, httpx.AsyncClient() as client:
        reply = await client.post(receiver.url, content=BODY, headers=signed_headers())
    assert reply.status_code == 204
    assert receiver.received[0].verified is True


@pytest.mark.parametrize(
    "headers",
    [
        signed_headers(key=OTHER_KEY),  # wrong key
        signed_headers(b"something else"),  # body tampered
        signed_headers(ts=int(time.time()) - 301),  # outside 5 min tolerance
        {"webhook-id": "evt_1", "webhook-timestamp": "soon", "webhook-signature": "v1,xx"},
        {},  # unsigned
    ],
    ids=["wrong-key", "tampered", "stale", "bad-timestamp", "unsigned"],
)
async def test_bad_signature_answers_401_and_is_recorded(headers: dict[str, str]) -> None:
    called: list[Received] = []

    def behaviour(r: Received) -> Response:
        called.append(r)
        return Response()

    async with (
        Receiver(keys=[KEY], behaviour=behaviour) as receiver,
        httpx.AsyncClient() as client,
    ):
        reply = await client.post(receiver.url, content=BODY, headers=headers)
    assert reply.status_code == 401
    [got] = receiver.received
    assert got.verified is False
    assert called == []  # the behaviour is not consulted for a forged request


async def test_verification_uses_the_injected_clock() -> None:
    ts = 1_000_000
    async with (
        Receiver(keys=[KEY], clock=lambda: ts + 299.0) as receiver,
        httpx.AsyncClient() as client,
    ):
        reply = await client.post(receiver.url, content=BODY, headers=signed_headers(ts=ts))
    assert reply.status_code == 204
    assert receiver.received[0].verified is True
    assert receiver.received[0].timestamp == ts


async def test_behaviour_status_headers_body() -> None:
    def behaviour(r: Received) -> Response:
        status = int(r.path.strip("/"))
        return Response(status, headers={"Retry-After": "7", "X-Seen": r.webhook_id}, body=b"no")

    async with Receiver(behaviour=behaviour) as receiver, httpx.AsyncClient() as client:
        for status in (200, 301, 410, 429, 503):
            reply = await client.post(
                f"{receiver.url}/{status}", content=BODY, headers={"webhook-id": "evt_9"}
            )
            assert reply.status_code == status
            assert reply.headers["retry-after"] == "7"
            assert reply.headers["x-seen"] == "evt_9"
            assert reply.content == b"no"
    assert receiver.count == 5


async def test_async_behaviour_and_delay() -> None:
    async def behaviour(r: Received) -> Response:
        await asyncio.sleep(0)
        return Response(202, delay=0.2)

    async with Receiver(behaviour=behaviour) as receiver, httpx.AsyncClient() as client:
        started = time.monotonic()
        reply = await client.post(receiver.url, content=BODY)
        elapsed = time.monotonic() - started
        assert reply.status_code == 202
        assert elapsed >= 0.2
        with pytest.raises(httpx.ReadTimeout):
            await client.post(receiver.url, content=BODY, timeout=0.05)


async def test_close_resets_the_connection() -> None:
    attempts = 0

    def behaviour(r: Received) -> Response:
        nonlocal attempts
        attempts += 1
        return Response(close=True) if attempts == 1 else Response(200)

    async with Receiver(behaviour=behaviour) as receiver:
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.ClientError):
                async with session.post(receiver.url, data=BODY) as reply:
                    await reply.read()
            async with session.post(receiver.url, data=BODY) as reply:
                assert reply.status == 200  # the receiver keeps serving new connections
        async with httpx.AsyncClient() as client:
            with pytest.raises(httpx.TransportError):
                attempts = 0
                await client.post(receiver.url, content=BODY)
    assert receiver.count == 3


async def test_behaviour_errors_answer_500_and_are_counted() -> None:
    def broken(r: Received) -> Response:
        raise RuntimeError("boom")

    async def broken_async(r: Received) -> Response:
        raise RuntimeError("boom")

    def wrong_type(r: Received) -> Response:
        return "nope"  # type: ignore[return-value]

    for behaviour in (broken, broken_async, wrong_type):
        async with Receiver(behaviour=behaviour) as receiver, httpx.AsyncClient() as client:
            reply = await client.post(receiver.url, content=BODY)
            assert reply.status_code == 500
            assert receiver.errors == 1


async def test_wait_for(receiver: Receiver) -> None:
    await receiver.wait_for(0, timeout=0.01)
    with pytest.raises(TimeoutError, match="received 0 of 1"):
        await receiver.wait_for(1, timeout=0.05)

    async def send(n: int) -> None:
        async with httpx.AsyncClient() as client:
            for _ in range(n):
                await asyncio.sleep(0.01)
                await client.post(receiver.url, content=BODY)

    sender = asyncio.create_task(send(3))
    await asyncio.gather(receiver.wait_for(2, timeout=5), receiver.wait_for(3, timeout=5))
    assert receiver.count >= 3
    await sender
    assert receiver._waiters == []


async def test_record_false_still_counts() -> None:
    async with Receiver(record=False) as receiver, httpx.AsyncClient() as client:
        for _ in range(3):
            assert (await client.post(receiver.url, content=BODY)).status_code == 204
    assert receiver.count == 3
    assert receiver.received == []


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n", 411),
        (b"POST / HTTP/1.1\r\nContent-Length: nope\r\n\r\n", 400),
        (b"garbage\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nno colon here\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nContent-Length: 99999\r\n\r\n", 413),
        (b"POST / HTTP/1.1\r\nX: " + b"a" * 70000, 431),
    ],
    ids=["chunked", "bad-length", "bad-request-line", "bad-header", "too-large", "huge-head"],
)
async def test_malformed_requests_are_refused_and_closed(request_bytes: bytes, status: int) -> None:
    async with Receiver(max_body=1000) as receiver:
        reply = await raw_exchange(receiver.port, request_bytes)
    assert reply.startswith(b"HTTP/1.1 %d " % status)
    assert b"Connection: close" in reply
    assert receiver.count == 0


async def test_http10_closes_and_expect_continue_is_honoured(receiver: Receiver) -> None:
    reply = await raw_exchange(receiver.port, b"POST / HTTP/1.0\r\nContent-Length: 2\r\n\r\nhi")
    assert reply == b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n"

    reader, writer = await asyncio.open_connection("127.0.0.1", receiver.port)
    writer.write(b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
    assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5) == (
        b"HTTP/1.1 100 Continue\r\n\r\n"
    )
    writer.write(b"hi")
    assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5) == (
        b"HTTP/1.1 204 No Content\r\n\r\n"
    )
    writer.close()
    assert receiver.received[-1].body == b"hi"


async def test_close_with_pending_answers_and_open_connections() -> None:
    receiver = Receiver(behaviour=lambda r: Response(delay=10))
    await receiver.start()
    async with httpx.AsyncClient() as client:
        pending = asyncio.create_task(client.post(receiver.url, content=BODY))
        await receiver.wait_for(1, timeout=5)
        await receiver.close()
        with pytest.raises(httpx.TransportError):
            await pending
    await receiver.close()  # idempotent


async def test_https(tmp_path: Path) -> None:
    pki = make_certs(tmp_path)
    client_ctx = pki.client_context()
    receiver = Receiver(keys=[KEY])
    await receiver.start(ssl=pki.server_context())
    async with receiver, httpx.AsyncClient(verify=client_ctx) as client:
        assert receiver.url.startswith("https://127.0.0.1:")
        for _ in range(3):
            reply = await client.post(receiver.url, content=BODY, headers=signed_headers())
            assert reply.status_code == 204
    assert [r.verified for r in receiver.received] == [True, True, True]
    assert receiver.connections == 1


async def test_serve_counts_until_signalled(capsys: pytest.CaptureFixture[str]) -> None:
    args = argparse.Namespace(
        host="127.0.0.1", port=0, secret=[], interval=0.05, cert=None, key=None, client_ca=None
    )
    serving = asyncio.create_task(_serve(args))
    for _ in range(100):
        await asyncio.sleep(0.01)
        url = capsys.readouterr().out.strip()
        if url:
            break
    async with httpx.AsyncClient() as client:
        for _ in range(2):
            assert (await client.post(url, content=BODY)).status_code == 204
    await asyncio.sleep(0.1)
    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.wait_for(serving, 5)
    captured = capsys.readouterr()
    assert captured.out.strip() == "count=2"
    assert "count=2 rate=" in captured.err


async def test_serve_mutual_tls(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pki = make_certs(tmp_path)
    args = argparse.Namespace(
        host="127.0.0.1",
        port=0,
        secret=[],
        interval=0,
        cert=str(pki.server_cert),
        key=str(pki.server_key),
        client_ca=str(pki.ca),
    )
    serving = asyncio.create_task(_serve(args))
    for _ in range(100):
        await asyncio.sleep(0.01)
        url = capsys.readouterr().out.strip()
        if url:
            break
    assert url.startswith("https://")
    async with httpx.AsyncClient(verify=pki.client_context(with_client_cert=True)) as client:
        assert (await client.post(url, content=BODY)).status_code == 204
    async with httpx.AsyncClient(verify=pki.client_context()) as client:
        with pytest.raises(httpx.TransportError):  # no client certificate: refused
            await client.post(url, content=BODY)
    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.wait_for(serving, 5)
    assert capsys.readouterr().out.strip() == "count=1"


def test_tls_options_go_together(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--cert", "c.pem"], ["--key", "k.pem"], ["--client-ca", "ca.pem"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
    assert "--cert and --key go together" in capsys.readouterr().err


@pytest.mark.slow
def test_command_line_entry_point() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "relay.receiver", "--port", "0", "--interval", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        for _ in range(2):
            assert httpx.post(url, content=json.dumps({"a": 1})).status_code == 204
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
    assert out.strip() == "count=2"
    assert proc.returncode == 0


async def test_slow_answers_pause_reading_then_serve_everything() -> None:
    """A peer pipelining megabytes behind a slow answer is paused, not buffered without bound."""

    def behaviour(r: Received) -> Response:
        return Response(delay=0.1 if r.path == "/slow" else 0.0)

    body = b"x" * 60_000
    n = 40  # 2.4 MB queued behind the slow request
    async with Receiver(behaviour=behaviour) as receiver:
        head = b"POST /slow HTTP/1.1\r\nContent-Length: 0\r\n\r\n"
        one = b"POST /fast HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        last = b"GET /fast HTTP/1.1\r\nConnection: close\r\n\r\n"
        reply = await raw_exchange(receiver.port, head + one * n + last)
    assert reply.count(b"HTTP/1.1 204 No Content") == n + 2
    assert receiver.count == n + 2


async def test_repeated_headers_and_odd_statuses(receiver: Receiver) -> None:
    reply = await raw_exchange(
        receiver.port,
        b"POST / HTTP/1.1\r\nX-A: 1\r\nx-a: 2\r\nConnection: close\r\n\r\n",
    )
    assert reply.startswith(b"HTTP/1.1 204 ")
    assert receiver.received[0].headers["x-a"] == "1, 2"

    async with (
        Receiver(behaviour=lambda r: Response(599, body=b"odd")) as odd,
        httpx.AsyncClient() as client,
    ):
        reply_599 = await client.post(odd.url, content=BODY)
    assert reply_599.status_code == 599
    assert reply_599.reason_phrase == "Unknown"
    assert reply_599.content == b"odd"


async def test_fast_path_without_recording_closes_when_asked() -> None:
    async with Receiver(record=False) as receiver:
        reply = await raw_exchange(receiver.port, b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert reply == b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n"
    assert receiver.count == 1
