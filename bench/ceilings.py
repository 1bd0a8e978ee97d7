"""What bounds ingest on this machine, piece by piece: ``python -m bench.ceilings``.

Each piece of the feed -> committed path is timed alone, then put together two ways, so
that a target for ingest can be checked against what the parts allow before any tuning:

- ``parse``: the simulator's frames through ``parse_frame`` and ``prepare``, no I/O.
- ``log``: the contract's ``event.stored`` line (INFO, one per event), formatted and written.
- ``store``: ``SQLiteStore.append`` of those events in batches of 500 on the store's own
  thread with nothing else running (the event loop idle): the store's ceiling.
- ``one process``: the relay's ``FeedClient`` reading ``relay simulate`` at full speed,
  ``prepare``, the log line and ``append``: the daemon's ingest without delivery, metrics or
  admin, in one interpreter as ``relay run`` has it.
- ``two processes``: the same with the store in a child process (forked before any thread
  starts), fed pickled batches through a pipe: what a second interpreter would give (its
  memory is not measured here: a forked child shares this process's heap).

Every figure is per event; compare only figures of one run (the machine is shared).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import pickle
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path

from bench.procs import free_port, http_get, wait_until
from relay.app import log_stored
from relay.events import Message, NewEvent, parse_frame, prepare
from relay.feed import FeedClient, FeedOptions
from relay.logs import Redactor, setup_logging
from relay.metrics import Metrics
from relay.simulator import Simulator
from relay.store.records import Target
from relay.store.sqlite import SQLiteStore
from relay.store.worker import Priority

API_KEY = "bench-ceilings-key"
TARGETS = (Target("bench"),)
BATCH = 500


def frames(count: int, users: int) -> list[str]:
    sim = Simulator(users=users, record=False)
    now = time.time()
    return [sim._next_message(now)[1] for _ in range(count)]


def prepared(texts: Sequence[str]) -> list[NewEvent]:
    out: list[NewEvent] = []
    for text in texts:
        message = parse_frame(text)
        assert isinstance(message, Message), message
        out.append(prepare(message, seal_key=None))
    return out


async def store_alone(events: Sequence[NewEvent], path: Path) -> float:
    """CPU seconds of the store's thread for ``events``, nothing else running."""
    store = SQLiteStore(path)
    await store.open(daemon=True)

    def work() -> float:
        conn = store._conn
        assert conn is not None
        start = time.thread_time()
        for i in range(0, len(events), BATCH):
            store._append(conn, events[i : i + BATCH], TARGETS, time.time())
        return time.thread_time() - start

    try:
        return await store._worker.run(Priority.INGEST, work)
    finally:
        await store.close()


def store_child(conn: Connection, path: str) -> None:
    """The two-process variant's store: append each pickled batch; reply with its CPU time."""

    async def serve() -> None:
        store = SQLiteStore(path)
        await store.open(daemon=True)
        start = time.process_time()
        while data := await asyncio.to_thread(conn.recv_bytes):
            await store.append(pickle.loads(data), TARGETS, time.time())
        conn.send(time.process_time() - start)
        await store.close()

    asyncio.run(serve())


class _Ingest:
    """The feed's handler: prepare, commit (here or in the child), log each event."""

    def __init__(self, count: int, store: SQLiteStore | None, pipe: Connection | None) -> None:
        self.count = count
        self.store = store
        self.pipe = pipe
        self.got = 0
        self.first: float | None = None
        self.done = asyncio.Event()

    async def on_messages(self, messages: list[Message]) -> None:
        if self.first is None:
            self.first = time.perf_counter()
        events = [prepare(m, seal_key=None) for m in messages]
        if self.pipe is not None:
            await asyncio.to_thread(self.pipe.send_bytes, pickle.dumps(events))
        else:
            assert self.store is not None
            await self.store.append(events, TARGETS, time.time())
        for event in events:
            log_stored(event, 1)
        self.got += len(events)
        if self.got >= self.count:
            self.done.set()

    async def on_bad_frame(self, frame: object) -> None:
        raise AssertionError(f"the simulator sent a bad frame: {frame}")

    async def on_subscribed(self) -> None:
        pass


def feed_run(count: int, users: int, path: Path, *, split: bool) -> dict[str, float]:
    """Ingest ``count`` events from ``relay simulate`` at full speed: rate and CPU."""
    pipe = child = None
    if split:  # fork now, before this process starts any thread
        pipe, theirs = multiprocessing.Pipe()
        child = multiprocessing.get_context("fork").Process(
            target=store_child, args=(theirs, str(path))
        )
        child.start()
    port = free_port()
    sim = subprocess.Popen(
        [sys.executable, "-m", "relay", "simulate", "--port", str(port), "--api-key", API_KEY]
        + ["--users", str(users), "--count", str(count)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: http_get(port, "/")[0] == 404, timeout=30, what="the simulator")

        async def run() -> dict[str, float]:
            store = None if split else SQLiteStore(path)
            if store is not None:
                await store.open(daemon=True)
            handler = _Ingest(count, store, pipe)
            options = FeedOptions(url=f"ws://127.0.0.1:{port}/ws", api_key=API_KEY)
            feed = FeedClient(options, handler, Metrics())
            cpu = time.process_time()
            task = asyncio.create_task(feed.run())
            await handler.done.wait()
            out = {"cpu_s": time.process_time() - cpu}
            if pipe is not None:
                pipe.send_bytes(b"")
                out["store_cpu_s"] = await asyncio.to_thread(pipe.recv)
            assert handler.first is not None
            out["rate"] = count / (time.perf_counter() - handler.first)
            await feed.stop()
            task.cancel()
            if store is not None:
                await store.close()
            return out

        return asyncio.run(run())
    finally:
        sim.terminate()
        sim.wait()
        if child is not None:
            child.join(10)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ceilings", description=__doc__)
    parser.add_argument("--count", type=int, default=100_000, help="events (100,000)")
    parser.add_argument("--users", type=int, default=1000, help="simulated users (1,000)")
    args = parser.parse_args(argv)
    n = args.count
    with tempfile.TemporaryDirectory() as scratch, open("/dev/null", "w") as null:
        setup_logging("INFO", "json", Redactor([API_KEY]), stream=null)
        texts = frames(n, args.users)
        start = time.process_time()
        events = prepared(texts)
        parse_us = (time.process_time() - start) / n * 1e6
        start = time.process_time()
        for event in events:
            log_stored(event, 1)
        log_us = (time.process_time() - start) / n * 1e6
        store_us = asyncio.run(store_alone(events, Path(scratch, "alone.db"))) / n * 1e6
        one = feed_run(n, args.users, Path(scratch, "one.db"), split=False)
        two = feed_run(n, args.users, Path(scratch, "two.db"), split=True)

    def rate(us: float) -> str:
        return f"{1e6 / us:,.0f}/s"

    print(f"Ingest ceilings, {n:,} events, {args.users:,} users (CPU per event; rate if alone)")
    print(f"  parse + prepare          {parse_us:6.1f} us  {rate(parse_us)}")
    print(f"  event.stored log line    {log_us:6.1f} us  {rate(log_us)}")
    print(f"  store append (alone)     {store_us:6.1f} us  {rate(store_us)}")
    print(
        f"  one process              {one['cpu_s'] / n * 1e6:6.1f} us  "
        f"{one['rate']:,.0f}/s committed"
    )
    print(
        f"  two processes            feed {two['cpu_s'] / n * 1e6:.1f} us + store "
        f"{two['store_cpu_s'] / n * 1e6:.1f} us  {two['rate']:,.0f}/s committed"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
