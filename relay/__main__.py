"""The ``relay`` command: parses, builds, runs. The logic lives in the modules it calls.

Exit codes: 0 clean, 2 configuration error (one line per error, each naming its variable),
1 anything else (one clear line). Commands that only read or re-queue never create a store.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from relay import __version__
from relay.config import Settings, describe, load_settings, secret_values, warnings
from relay.errors import ConfigError, RelayError, StoreError
from relay.logs import Redactor, setup_logging

if TYPE_CHECKING:
    from relay.store import Store

__all__ = ["main"]


def _settings(*, for_run: bool) -> Settings:
    return load_settings(for_run=for_run)


def _logging(settings: Settings) -> Redactor:
    redactor = Redactor(secret_values(settings))
    setup_logging(settings.log_level, settings.log_format, redactor)
    for warning in warnings(settings):
        logging.getLogger("relay.config").warning(warning, extra={"event": "config.warning"})
    return redactor


def _store(
    settings: Settings, *, create: bool, read_only: bool = False, daemon: bool = False
) -> Store:
    """The configured store, named on stderr (masked; the daemon names it in its
    ``relay.started`` line, once the admin port is bound and the store open). Unless
    ``create``, a missing SQLite file is an error: a command run from the wrong directory
    must not show an empty store."""
    from relay.store import open_store

    url = settings.store.get_secret_value()
    shown = settings.store_display
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///")).absolute()
        shown = f"sqlite:///{path}"
        if not create and not path.is_file():
            raise StoreError(
                f"no store at {path} (RELAY_STORE={settings.store_display}); "
                "set RELAY_STORE to the daemon's store, or start `relay run` to create it"
            )
    if not daemon:
        print(f"relay: store {shown}", file=sys.stderr)
    return open_store(url, lease=settings.lease, schema=settings.store_schema, read_only=read_only)


def _run_until_signal(
    make: Callable[[], Coroutine[Any, Any, int]], stop: Callable[[], None]
) -> int:
    """Run a coroutine; the first SIGTERM/SIGINT asks it to stop, a second exits at once."""

    async def runner() -> int:
        loop = asyncio.get_running_loop()
        signals = {"count": 0}

        def on_signal() -> None:
            signals["count"] += 1
            if signals["count"] > 1:
                for handler in logging.getLogger().handlers:
                    handler.flush()  # the lines queued this loop iteration
                os._exit(1)  # committed data is safe: the store is durable
            stop()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        return await make()

    return asyncio.run(runner())


# -- commands -------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from relay.app import Relay

    settings = _settings(for_run=True)
    _logging(settings)
    relay = Relay(settings, store=_store(settings, create=True, daemon=True))

    async def run() -> int:
        await relay.run()
        return 0

    return _run_until_signal(run, relay.request_stop)


def cmd_check(args: argparse.Namespace) -> int:
    settings = _settings(for_run=True)
    report: dict[str, Any] = describe(settings)
    report["warnings"] = warnings(settings)
    report["store_state"] = asyncio.run(_store_state(settings))
    print(json.dumps(report, indent=2, sort_keys=False))
    if report["store_state"]["status"] == "missing":
        print(f"relay: {report['store_state']['error']}", file=sys.stderr)
        return 1
    return 0


async def _store_state(settings: Settings) -> dict[str, Any]:
    """What the store holds for endpoints no longer configured (their work is kept, unsent).

    Opened read-only: checking a configuration never writes (not even a migration).
    """
    from relay import service

    try:
        store = _store(settings, create=False, read_only=True)
    except StoreError as exc:
        return {"status": "missing", "error": str(exc)}
    try:
        await store.open(daemon=False)
        listed = await service.endpoints(store, settings)
    except RelayError as exc:
        return {"status": f"unavailable: {exc}"}
    finally:
        await store.close()
    removed = [e for e in listed if not e["configured"]]
    return {
        "status": "ok",
        "pending": {e["name"]: e["pending"] for e in listed if e["pending"]},
        "removed_endpoints_with_work": [
            {"name": e["name"], "pending": e["pending"], "dead": e["dead"]} for e in removed
        ],
    }


def cmd_demo(args: argparse.Namespace) -> int:
    from relay.demo import run_demo

    if args.to is not None:
        from relay.brokers.target import parse

        if args.keep_running:
            raise ConfigError("--to", "publishes a fixed number of events: no --keep-running")
        try:
            parse(args.to)
        except ValueError as exc:  # its reason never quotes the URL
            raise ConfigError("--to", str(exc)) from None
    stop = asyncio.Event()
    return _run_until_signal(
        lambda: run_demo(events=args.events, keep_running=args.keep_running, stop=stop, to=args.to),
        stop.set,
    )


def simulate_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``relay simulate`` (here, not in relay.simulator: every command builds
    the parser, and ``relay run`` should not load the simulator, 1.5 MB, to do so)."""
    default_key = os.environ.get("RELAY_API_KEY") or os.environ.get("ENTERPRISE_API_KEY")
    parser.add_argument("--host", default="127.0.0.1", help="listen address")
    parser.add_argument("--port", type=int, default=8765, help="listen port (feed and REST)")
    parser.add_argument(
        "--api-key",
        default=default_key or "sim-key",
        help="key clients must send (default: $RELAY_API_KEY, $ENTERPRISE_API_KEY or sim-key)",
    )
    parser.add_argument("--rate", type=float, default=None, help="messages/s (default: max)")
    parser.add_argument("--users", type=int, default=50, help="distinct users in play at once")
    parser.add_argument("--count", type=int, default=None, help="messages to send, then idle")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument(
        "--drop-every",
        type=int,
        default=None,
        metavar="N",
        help="abort each connection after N data messages",
    )
    parser.add_argument(
        "--stall-after",
        type=int,
        default=None,
        metavar="N",
        help="stop sending and answering pings after N data messages",
    )
    parser.add_argument(
        "--bad-every",
        type=int,
        default=None,
        metavar="N",
        help="send a malformed frame every N data messages",
    )
    parser.add_argument(
        "--reject-auth",
        type=int,
        default=0,
        metavar="K",
        help="reject the first K authenticate requests",
    )
    parser.add_argument(
        "--handshake-delay",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="delay before each success reply",
    )
    parser.add_argument(
        "--lose-while-disconnected",
        action="store_true",
        help="keep generating while nobody is subscribed; those are lost",
    )
    parser.add_argument(
        "--rest-status",
        type=int,
        default=None,
        metavar="STATUS",
        help="answer every REST call with this HTTP status",
    )


def cmd_simulate(args: argparse.Namespace) -> int:
    from relay import simulator

    task: dict[str, asyncio.Task[int]] = {}

    async def run() -> int:
        task["t"] = asyncio.current_task()  # type: ignore[assignment]
        try:
            return await simulator.run_from_args(args)
        except asyncio.CancelledError:
            return 0

    def cancel() -> None:
        task["t"].cancel()

    return _run_until_signal(run, cancel)


def _filters(args: argparse.Namespace) -> dict[str, Any]:
    return {"endpoint": args.endpoint, "user_id": args.user_id, "event_id": args.event_id}


def cmd_deliveries(args: argparse.Namespace) -> int:
    from relay.store.base import parse_delivery_id

    if args.action == "list" and args.before and parse_delivery_id(args.before) is None:
        print(f"relay: --before: not a delivery id: {args.before!r}", file=sys.stderr)
        return 2
    if args.action == "replay" and not (
        args.ids or args.all or any(_filters(args).values()) or args.state
    ):
        print(
            "relay: replay needs delivery ids, a filter (--state, --endpoint, --user-id, "
            "--event-id), or --all to re-queue every finished delivery",
            file=sys.stderr,
        )
        return 1
    settings = _settings(for_run=False)
    store = _store(settings, create=False)

    async def run() -> int:
        await store.open(daemon=False)
        try:
            return await _deliveries(args, store)
        finally:
            await store.close()

    return asyncio.run(run())


async def _deliveries(args: argparse.Namespace, store: Store) -> int:
    from relay import service

    if args.action == "list":
        page = await service.list_deliveries(
            store, state=args.state, limit=args.limit, before=args.before, **_filters(args)
        )
        if args.json:
            for item in page.items:
                print(json.dumps(service.info_json(item)))
        else:
            print(service.format_table(page.items))
        if page.next_cursor:
            print(f"(more: --before {page.next_cursor})", file=sys.stderr)
        return 0
    if args.action == "show":
        detail = await service.get_delivery(store, args.id)
        if detail is None:
            print(f"relay: no delivery {args.id}", file=sys.stderr)
            return 1
        shown = service.detail_json(detail)
        print(json.dumps(shown) if args.json else json.dumps(shown, indent=2))
        return 0
    if args.action == "purge":
        removed = await service.purge(store, retention=args.older_than, now=time.time())
        print(f"purged {removed} deliveries and events")
        return 0
    if args.action == "retry":
        count = await service.retry_now(store, now=time.time(), **_filters(args))
        print(f"made {count} deliveries due now")
        return 0
    if args.ids and (unknown := await service.unknown_ids(store, args.ids)):
        print(f"relay: no delivery {', '.join(unknown)} (nothing re-queued)", file=sys.stderr)
        return 1
    count = await service.replay(
        store, ids=args.ids or None, state=args.state, now=time.time(), **_filters(args)
    )
    print(f"re-queued {count} deliveries")
    if args.ids and count < len(args.ids):
        print(
            f"relay: {len(args.ids) - count} of the ids named are still pending (not re-queued)",
            file=sys.stderr,
        )
    return 0


def cmd_endpoints(args: argparse.Namespace) -> int:
    from relay import service

    settings = _settings(for_run=False)
    store = _store(settings, create=False)

    async def run() -> int:
        await store.open(daemon=False)
        try:
            if args.action == "list":
                listed = await service.endpoints(store, settings)
                if args.json:
                    for item in listed:
                        print(json.dumps(item))
                else:
                    print(_endpoint_table(listed))
                return 0
            done = await service.endpoint_action(
                store, settings, args.name, args.action, now=time.time()
            )
            if done is None:
                print(f"relay: no endpoint named {args.name!r}", file=sys.stderr)
                return 1
            if args.json:
                print(json.dumps(done))
            else:
                print(f"{done['name']}: {done['state']}{'' if done['changed'] else ' (unchanged)'}")
            return 0
        finally:
            await store.close()

    return asyncio.run(run())


def _endpoint_table(listed: Sequence[dict[str, Any]]) -> str:
    header = ("NAME", "STATE", "PENDING", "OLDEST", "LAST ERROR")
    rows = [
        (
            e["name"],
            e["state"],
            str(e["pending"]),
            "-" if e["oldest_pending_age_s"] is None else f"{e['oldest_pending_age_s']:.0f}s",
            (e["last_error"] or "-")[:60],
        )
        for e in listed
    ]
    widths = [max(len(r[n]) for r in [header, *rows]) for n in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in [header, *rows]
    )


def cmd_reconcile(args: argparse.Namespace) -> int:
    from relay.app import Ingest, reconciler_for, seal_key_of, targets_of
    from relay.metrics import Metrics

    settings = _settings(for_run=True)
    _logging(settings)
    store = _store(settings, create=not args.dry_run)
    metrics = Metrics()
    ingest = Ingest(
        store, targets_of(settings), metrics, seal_key_of(settings), on_stored=lambda: None
    )
    reconciler = reconciler_for(settings, store, ingest, metrics, interval=None)

    async def run() -> int:
        await store.open(daemon=False)
        try:
            report = await reconciler.run_once(emit_all=args.emit_all, dry_run=args.dry_run)
        finally:
            await reconciler.close()
            await store.close()
        for change in report.changes:
            print(f"{change.user_id}  {change.before or '(new)'} -> {change.after}")
        verb = "would emit" if args.dry_run else "emitted"
        if report.outcome == "baseline":
            print(f"baseline recorded for {report.baseline} users (nothing emitted)")
        elif report.outcome == "success":
            count = len(report.changes) if args.dry_run else report.emitted
            print(f"{report.users} users, {len(report.changes)} changed, {verb} {count} events")
        elif report.outcome == "skipped":
            print("another replica is reconciling; nothing done")
        else:
            print(f"relay: reconciliation failed: {report.error}", file=sys.stderr)
            return 1
        return 0

    return asyncio.run(run())


def _duration(text: str) -> float:
    from relay.config import parse_duration

    try:
        return parse_duration(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 250ms, 5s, 3d)") from None


# -- parser ---------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relay",
        description="Relay the sFOX users feed as signed webhooks, durably and in order.",
    )
    parser.add_argument("--version", action="version", version=f"sfox-relay {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("run", help="the daemon: feed -> store -> deliveries").set_defaults(fn=cmd_run)
    sub.add_parser("check", help="validate the configuration, print it masked").set_defaults(
        fn=cmd_check
    )

    demo = sub.add_parser("demo", help="the whole pipeline on this machine, no credentials")
    demo.add_argument("--events", type=int, default=60, help="feed messages to relay (60)")
    demo.add_argument("--keep-running", action="store_true", help="keep relaying until Ctrl-C")
    demo.add_argument(
        "--to",
        metavar="URL",
        help="a broker URL (amqp://, nats://, redis://...): publish there and consume it back",
    )
    demo.set_defaults(fn=cmd_demo)

    simulate = sub.add_parser("simulate", help="a standalone sFOX-compatible feed + REST server")
    simulate_arguments(simulate)
    simulate.set_defaults(fn=cmd_simulate)

    deliveries = sub.add_parser("deliveries", help="inspect and replay the outbox")
    actions = deliveries.add_subparsers(dest="action", required=True, metavar="ACTION")
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--endpoint")
    where.add_argument("--user-id")
    where.add_argument("--event-id", help="a webhook-id (evt_...)")
    filters = argparse.ArgumentParser(add_help=False, parents=[where])
    filters.add_argument("--state", choices=["pending", "delivered", "dead", "superseded"])
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="one JSON object per line")
    listing = actions.add_parser("list", parents=[filters, as_json], help="newest first")
    listing.add_argument("--limit", type=int, default=50)
    listing.add_argument("--before", help="the cursor a previous page printed")
    show = actions.add_parser("show", parents=[as_json], help="one delivery with its attempts")
    show.add_argument("id")
    replay = actions.add_parser("replay", parents=[filters], help="re-queue deliveries")
    replay.add_argument("ids", nargs="*", help="delivery ids (else: every match of the filters)")
    replay.add_argument(
        "--all", action="store_true", help="with no ids and no filters: every finished delivery"
    )
    actions.add_parser(
        "retry",
        parents=[where],
        help="make pending deliveries waiting for a retry due now (no attempt used)",
    )
    purge = actions.add_parser(
        "purge", help="delete delivered deliveries (and dead ones twice as old) now"
    )
    purge.add_argument(
        "--older-than", type=_duration, required=True, help="e.g. 3d (dead ones: twice that)"
    )
    deliveries.set_defaults(fn=cmd_deliveries)

    endpoints = sub.add_parser("endpoints", help="endpoint health: list, pause, resume")
    verbs = endpoints.add_subparsers(dest="action", required=True, metavar="ACTION")
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="one JSON object per line")
    verbs.add_parser("list", parents=[as_json], help="state, pending, oldest age, last error")
    for verb, text in (
        ("pause", "attempt nothing until resumed"),
        ("resume", "active again; waiting deliveries due now"),
    ):
        one = verbs.add_parser(verb, parents=[as_json], help=text)
        one.add_argument("name")
    endpoints.set_defaults(fn=cmd_endpoints)

    reconcile = sub.add_parser("reconcile", help="compare with sFOX's REST users list now")
    reconcile.add_argument("--emit-all", action="store_true", help="emit every user's state")
    reconcile.add_argument("--dry-run", action="store_true", help="show, store nothing")
    reconcile.set_defaults(fn=cmd_reconcile)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``relay`` console script and ``python -m relay``."""
    args = _parser().parse_args(argv)
    try:
        code: int = args.fn(args)
    except ConfigError as exc:
        for variable, reason in exc.errors:
            print(f"relay: configuration error: {variable}: {reason}", file=sys.stderr)
        return 2
    except StoreError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 1
    except RelayError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
