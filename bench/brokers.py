"""Broker destinations next to HTTP: ``python -m bench.brokers [--events N] [--quick]``.

Two figures per destination, each from this one run:

- the relay's sustained delivery rate: the simulator sends N events at full speed to a
  ``relay run`` whose one endpoint is that destination (the bench receiver for HTTP); the
  rate is N over the time between the relay's first and last confirmed delivery
  (``relay_deliveries_total{outcome="success"}`` polled every 50 ms), with the relay's peak
  RSS; the destination's message count is checked afterwards;
- the destination's own limit: the same ~650-byte body published with the broker's client
  alone (confirmed publishes, 64 at a time, as the relay's max_in_flight), and through the
  relay's own sender alone (its overhead over the client).

Writes bench/results/brokers.md (and .json). Loopback only; RabbitMQ 127.0.0.1:5672,
NATS 127.0.0.1:4222, Redis 127.0.0.1:6379 (a broker that does not answer is skipped).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.procs import Procs, json_safe, metric, wait_until  # noqa: E402
from bench.run import (  # noqa: E402
    FULL,
    MB,
    SIGNING_SECRET,
    Bench,
    _sample_body,
    start_receiver,
    start_relay,
    start_simulator,
)
from relay.brokers import open_sender  # noqa: E402
from relay.brokers.consume import Tap  # noqa: E402
from relay.signing import decode_secret, sign  # noqa: E402

BROKERS = {
    "RabbitMQ": ("127.0.0.1", 5672, "amqp://guest:guest@127.0.0.1:5672/?routing_key={name}"),
    "NATS JetStream": ("127.0.0.1", 4222, "nats://127.0.0.1:4222/{subject}"),
    "Redis Streams": ("127.0.0.1", 6379, "redis://127.0.0.1:6379/0?stream={name}"),
}
CONCURRENCY = 64
RESULTS = ROOT / "bench" / "results"


def _answers(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1.0).close()
    except OSError:
        return False
    return True


def _url(template: str) -> str:
    name = f"relay-bench-{os.getpid()}-{os.urandom(3).hex()}"
    return template.format(name=name, subject=name.replace("-", "_").replace("relay_", "relay."))


def _relay_rate(
    bench: Bench, endpoint_url: str, n: int, label: str
) -> tuple[float | None, int | None]:
    """(events/s delivered, peak RSS) of a relay sending ``n`` live events to the endpoint."""
    with bench.procs(label.replace(" ", "-").lower()) as procs:
        sim = start_simulator(bench, procs, count=n)
        relay = start_relay(
            bench,
            procs,
            sim_port=sim,
            endpoint_url=endpoint_url,
            schedule="0s,1s,1s,1s,1s",
            store=bench.store(label.replace(" ", "-").lower()),
        )
        timeline: list[tuple[float, float]] = []

        def poll() -> bool:
            done = metric(relay.metrics(), "relay_deliveries_total", outcome="success")
            timeline.append((time.monotonic(), done))
            return done >= n

        wait_until(poll, timeout=60 + n / 200, what=f"{n:,} deliveries", procs=procs, interval=0.05)
        relay.stop()
        started = next(t for t, done in timeline if done > 0)
        finished = next(t for t, done in timeline if done >= n)
        return n / max(finished - started, 0.05), relay.rss.peak()


async def _publish_all(
    publish: Callable[[int], Awaitable[None]], n: int, concurrency: int = CONCURRENCY
) -> float:
    """Messages/s for ``n`` publishes, ``concurrency`` at a time."""
    queue = iter(range(n))

    async def worker() -> None:
        for i in queue:
            await publish(i)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return n / (time.perf_counter() - start)


async def _client_alone(broker: str, url: str, body: bytes, n: int) -> float:
    """The broker's own client, no relay code: confirmed publishes, 64 at a time."""
    async with Tap(url, consume=False) as tap:
        target = tap.target
        if broker == "RabbitMQ":
            import aio_pika

            connection = await aio_pika.connect(target.url)
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)

            async def publish(i: int) -> None:
                message = aio_pika.Message(
                    body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT, message_id=str(i)
                )
                await channel.default_exchange.publish(message, tap._queue.name, mandatory=True)

            rate = await _publish_all(publish, n)
            await connection.close()
        elif broker == "NATS JetStream":
            import nats

            client = await nats.connect(servers=[target.url])
            js = client.jetstream()
            subject = target.subject  # type: ignore[union-attr]

            async def publish(i: int) -> None:
                await js.publish(subject, body, headers={"Nats-Msg-Id": str(i)})

            rate = await _publish_all(publish, n)
            await client.close()
        else:
            from redis.asyncio import BlockingConnectionPool, Redis

            pool = BlockingConnectionPool.from_url(target.url, max_connections=1, timeout=None)
            redis = Redis(connection_pool=pool)
            stream = target.stream  # type: ignore[union-attr]

            async def publish(i: int) -> None:
                await redis.xadd(stream, {"body": body, "webhook-id": str(i)})

            rate = await _publish_all(publish, n)
            await redis.aclose(close_connection_pool=True)
        held = await tap.held()
        if held != n:
            raise RuntimeError(f"{broker}: {held} of {n} messages held after the client run")
    return rate


async def _sender_alone(url: str, body: bytes, n: int) -> float:
    """The relay's sender for the broker, outside the relay: its overhead over the client."""
    async with Tap(url, consume=False) as tap:
        sender = open_sender(url)
        key = [decode_secret(SIGNING_SECRET)]

        async def publish(i: int) -> None:
            stamp = int(time.time())
            headers = {
                "webhook-id": f"evt_{i}",
                "webhook-timestamp": str(stamp),
                "webhook-signature": sign(key, f"evt_{i}", stamp, body),
                "relay-source": "feed",
                "content-type": "application/json",
            }
            result = await sender.post(url, body, headers, 15.0)
            if result.status != 200:
                raise RuntimeError(result.error)

        rate = await _publish_all(publish, n)
        await sender.close()
        if (held := await tap.held()) != n:
            raise RuntimeError(f"{held} of {n} messages held after the sender run")
    return rate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.brokers", description=__doc__)
    parser.add_argument("--events", type=int, default=20_000, help="events per relay run")
    parser.add_argument("--quick", action="store_true", help="2,000 events per run")
    args = parser.parse_args(argv)
    n = 2_000 if args.quick else args.events
    body = _sample_body()
    rows: list[dict[str, Any]] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="relay-bench-brokers-") as tmp:
        bench = Bench(sizes=FULL, users=1000, tmp=Path(tmp), profile=False)
        with Procs(Path(tmp)) as procs:
            receiver = start_receiver(procs, "http-receiver", timeline=False)
            rate, rss = _relay_rate(bench, receiver.url, n, "HTTP")
            receiver.finish()
        rows.append({"destination": "HTTP (bench receiver)", "relay": rate, "rss": rss})
        for broker, (host, port, template) in BROKERS.items():
            if not _answers(host, port):
                rows.append({"destination": broker, "skipped": f"{host}:{port} does not answer"})
                continue
            url = _url(template)

            async def relay_run(
                url: str = url, broker: str = broker
            ) -> tuple[float | None, int | None]:
                async with Tap(url, consume=False) as tap:
                    result = await asyncio.to_thread(_relay_rate, bench, url, n, broker)
                    if (held := await tap.held()) != n:
                        raise RuntimeError(f"{broker}: {held} of {n} messages after the relay")
                return result

            rate, rss = asyncio.run(relay_run())
            client = asyncio.run(_client_alone(broker, _url(template), body, n))
            sender = asyncio.run(_sender_alone(_url(template), body, n))
            rows.append(
                {
                    "destination": broker,
                    "relay": rate,
                    "rss": rss,
                    "client": client,
                    "sender": sender,
                }
            )
    text = _markdown(rows, n, time.monotonic() - started)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    name = "brokers-quick" if args.quick else "brokers"
    (RESULTS / f"{name}.md").write_text(text)
    (RESULTS / f"{name}.json").write_text(json.dumps(json_safe(rows), indent=2) + "\n")
    return 0


def _markdown(rows: list[dict[str, Any]], n: int, seconds: float) -> str:
    def rate(value: float | None) -> str:
        return "-" if value is None else f"{value:,.0f}/s"

    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    lines = [
        "# Broker destinations next to HTTP",
        "",
        f"`python -m bench.brokers`, {now}, {seconds:.0f} s, {os.cpu_count()} CPUs; "
        f"{n:,} events per relay run; every figure from this one run.",
        "",
        "| destination | relay, live feed at full speed | relay peak RSS | client alone "
        f"({CONCURRENCY} in flight) | relay's sender alone |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        if "skipped" in row:
            lines.append(f"| {row['destination']} | skipped: {row['skipped']} | | | |")
            continue
        rss = row.get("rss")
        lines.append(
            f"| {row['destination']} | {rate(row.get('relay'))} | "
            f"{'-' if rss is None else f'{rss / MB:.1f} MB'} | {rate(row.get('client'))} | "
            f"{rate(row.get('sender'))} |"
        )
    lines += [
        "",
        "Relay: `relay run` (SQLite outbox, every message signed, max_in_flight 64) fed by "
        "`relay simulate` at full speed; rate between its first and last confirmed delivery. "
        "Client alone: the broker's own asyncio client in this process, confirmed publishes "
        "(RabbitMQ publisher confirms, JetStream PubAck, Redis XADD reply on one connection). "
        "Sender alone: relay.brokers' sender, same body and concurrency, no store or feed.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
