"""How many messages/s the sFOX simulator sends from one core to one client.

The simulator runs in this process (one core, record=False as in load tests). The client runs
in a child process and is deliberately minimal - a blocking socket that performs the opening
handshake, authenticates, subscribes, then only counts WebSocket frames without decoding them -
so that the number measured is the simulator's, not a Python WebSocket client's.

    .venv/bin/python bench/simulator_speed.py [--count 200000] [--users 1000] [--rate R]

Prints the rate seen by the client and the simulator's CPU time per message.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import multiprocessing
import os
import socket
import struct
import time
import urllib.parse

from relay.simulator import Simulator

API_KEY = "bench-key"


def _masked_text(text: str) -> bytes:
    data = text.encode()
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
    assert len(data) < 126
    return bytes([0x81, 0x80 | len(data)]) + mask + masked


def _count_frames(url: str, count: int) -> tuple[float, float]:
    """Handshake, authenticate, subscribe; then time ``count`` data frames."""
    parts = urllib.parse.urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += sock.recv(65536)
    buf = buf.split(b"\r\n\r\n", 1)[1]
    auth = {"type": "authenticate", "apiKey": API_KEY, "enterprise": "true"}
    subscribe = {"type": "subscribe", "feeds": ["private.enterprise.users"]}
    sock.sendall(_masked_text(json.dumps(auth)) + _masked_text(json.dumps(subscribe)))
    frames = -2  # the two replies
    first = last = 0.0
    pos = 0
    while frames < count:
        chunk = sock.recv(1 << 20)
        if not chunk:
            raise ConnectionError("closed early")
        buf = buf[pos:] + chunk
        pos = 0
        end = len(buf)
        while end - pos >= 2:
            length = buf[pos + 1] & 0x7F
            header = 2
            if length == 126:
                if end - pos < 4:
                    break
                length = struct.unpack_from("!H", buf, pos + 2)[0]
                header = 4
            elif length == 127:
                if end - pos < 10:
                    break
                length = struct.unpack_from("!Q", buf, pos + 2)[0]
                header = 10
            if end - pos < header + length:
                break
            if buf[pos] & 0x0F == 0x1:  # a text frame (pings are not counted)
                frames += 1
                if frames == 1:
                    first = time.perf_counter()
            pos += header + length
        last = time.perf_counter()
    sock.close()
    return first, last


def _client(url: str, count: int, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    first, last = _count_frames(url, count)
    out.put(last - first)


async def main() -> None:
    parser = argparse.ArgumentParser(description="Measure the sFOX simulator's send rate.")
    parser.add_argument("--count", type=int, default=200_000)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=None)
    args = parser.parse_args()
    sim = Simulator(
        api_key=API_KEY, users=args.users, count=args.count, rate=args.rate, record=False
    )
    async with sim:
        ctx = multiprocessing.get_context("spawn")
        out: multiprocessing.Queue = ctx.Queue()  # type: ignore[type-arg]
        proc = ctx.Process(target=_client, args=(sim.ws_url, args.count, out))
        proc.start()
        await sim.wait_subscribed(1, timeout=30)
        cpu0 = time.process_time()
        await sim.finished.wait()
        elapsed = await asyncio.to_thread(out.get)
        cpu = time.process_time() - cpu0
        await asyncio.to_thread(proc.join)
    rate = (args.count - 1) / elapsed
    print(
        f"{rate:,.0f} msgs/s ({args.count:,} messages in {elapsed:.2f}s; "
        f"simulator CPU {cpu:.2f}s = {args.count / cpu:,.0f} msgs per CPU-second)"
    )


if __name__ == "__main__":
    asyncio.run(main())
