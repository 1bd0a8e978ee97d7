"""How many messages/s the sFOX simulator sends from one core to one client.

The simulator runs in this process (one core); the client runs in a child process so its
work is not counted against the simulator. The client authenticates, subscribes, and counts
data frames without parsing them.

    .venv/bin/python bench/simulator_speed.py [--count 200000] [--users 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import time

from websockets.asyncio.client import connect

from relay.simulator import Simulator

API_KEY = "bench-key"


async def _consume(url: str, count: int) -> tuple[float, float]:
    async with connect(url, compression=None, max_queue=1024, max_size=2**22) as ws:
        await ws.send(json.dumps({"type": "authenticate", "apiKey": API_KEY, "enterprise": "true"}))
        await ws.recv()
        await ws.send(json.dumps({"type": "subscribe", "feeds": ["private.enterprise.users"]}))
        await ws.recv()
        await ws.recv()
        first = time.perf_counter()
        for _ in range(count - 1):
            await ws.recv()
        return first, time.perf_counter()


def _client(url: str, count: int, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    first, last = asyncio.run(_consume(url, count))
    out.put(last - first)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200_000)
    parser.add_argument("--users", type=int, default=1000)
    args = parser.parse_args()
    async with Simulator(api_key=API_KEY, users=args.users, count=args.count, record=False) as sim:
        ctx = multiprocessing.get_context("spawn")
        out: multiprocessing.Queue = ctx.Queue()  # type: ignore[type-arg]
        proc = ctx.Process(target=_client, args=(sim.ws_url, args.count, out))
        cpu0 = time.process_time()
        proc.start()
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
