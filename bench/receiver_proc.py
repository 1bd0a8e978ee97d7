"""The benchmark's webhook endpoint, alone in its process: ``relay.receiver.Receiver`` + a log.

Every request is answered 204 at once. For each one it keeps two integers: the arrival time
(``time.time_ns()``) and the latency, arrival minus the body's ``"timestamp"`` (nanoseconds,
set by the simulator when it sent the message; both processes read the same clock). It keeps
no bodies (``record=False``), so 100,000 deliveries cost a few megabytes, not hundreds.

``GET /__bench/stats`` answers the counts as JSON (the harness polls it); SIGTERM, SIGINT or
``--expect N`` arrivals write everything to ``--out`` and end the process.

    python -m bench.receiver_proc --port 8099 --out /tmp/arrivals.json
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import json
import re
import signal
from typing import Any

from relay.receiver import Received, Receiver, Response

__all__ = ["STATS_PATH", "Recorder", "main"]

STATS_PATH = "/__bench/stats"
_TIMESTAMP = re.compile(rb'"timestamp":(\d+)')
_SEQUENCE = re.compile(rb'"sequence":(\d+)')
_OK = Response(204)


class Recorder:
    """The receiver's behaviour: notes each webhook and answers 204 (stats for the harness)."""

    def __init__(self, *, timeline: bool, expect: int | None, done: asyncio.Event) -> None:
        self.count = 0
        self.signed = 0
        self.keys: set[bytes | str] = set()
        self.arrivals = array.array("q")
        self.latencies = array.array("q")
        self.timeline = timeline
        self.expect = expect
        self.done = done

    def __call__(self, request: Received) -> Response:
        if request.method == "GET" and request.path == STATS_PATH:
            body = json.dumps(self.stats()).encode()
            return Response(200, {"Content-Type": "application/json"}, body)
        self.count += 1
        arrived = request.arrived_ns
        body = request.body
        if request.signature:
            self.signed += 1
        # A webhook is identified by its webhook-id; the naive baseline sends none, so by the
        # feed's sequence number then (unique per simulator run).
        if request.webhook_id:
            self.keys.add(request.webhook_id)
        else:
            sequence = _SEQUENCE.search(body)
            if sequence is not None:
                self.keys.add(sequence[1])
        if self.timeline:
            self.arrivals.append(arrived)
            stamp = _TIMESTAMP.search(body)
            if stamp is not None:
                self.latencies.append(arrived - int(stamp[1]))
        if self.expect is not None and len(self.keys) >= self.expect:
            self.done.set()
        return _OK

    def stats(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "unique": len(self.keys),
            "signed": self.signed,
            "first_ns": self.arrivals[0] if self.arrivals else None,
            "last_ns": self.arrivals[-1] if self.arrivals else None,
        }

    def dump(self) -> dict[str, Any]:
        return {
            **self.stats(),
            "arrivals_ns": self.arrivals.tolist(),
            "latencies_ns": self.latencies.tolist(),
        }


async def _serve(args: argparse.Namespace) -> None:
    done = asyncio.Event()
    recorder = Recorder(timeline=not args.no_timeline, expect=args.expect, done=done)
    receiver = Receiver(behaviour=recorder, record=False)
    await receiver.start("127.0.0.1", args.port)
    print(receiver.url, flush=True)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, done.set)
    try:
        await done.wait()
    finally:
        await receiver.close()
        with open(args.out, "w") as out:
            json.dump(recorder.dump(), out)
        print(f"count={recorder.count} unique={len(recorder.keys)}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.receiver_proc", description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", required=True, help="JSON file written on exit")
    parser.add_argument("--expect", type=int, default=None, help="exit after N distinct")
    parser.add_argument(
        "--no-timeline", action="store_true", help="count only (for the wrk limit run)"
    )
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
