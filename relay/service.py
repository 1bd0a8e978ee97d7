"""One service layer under the CLI (`relay deliveries`) and the admin API (`/api/*`).

Both present the same records, with the same filters and paging, and neither shows a secret:
endpoints by name, bodies with the user token at most as ``[sealed]``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from relay import monitor
from relay.config import Settings
from relay.health import display_state
from relay.metrics import Metrics
from relay.store.base import (
    DeliveryDetail,
    DeliveryInfo,
    EndpointStats,
    PublicState,
    Store,
    parse_delivery_id,
)

__all__ = [
    "Page",
    "detail_json",
    "endpoint_action",
    "endpoints",
    "format_table",
    "get_delivery",
    "info_json",
    "iso",
    "list_deliveries",
    "purge",
    "replay",
    "retry_now",
    "unknown_ids",
]


@dataclass(frozen=True, slots=True)
class Page:
    """One page of deliveries, newest first; pass ``next_cursor`` as ``before`` for more."""

    items: list[DeliveryInfo]
    next_cursor: str | None


async def list_deliveries(
    store: Store,
    *,
    state: PublicState | None = None,
    endpoint: str | None = None,
    user_id: str | None = None,
    limit: int = 50,
    before: str | None = None,
    event_id: str | None = None,
) -> Page:
    """A page of deliveries matching the filters; ValueError for a malformed ``before``."""
    limit = max(1, min(limit, 500))
    cursor = parse_delivery_id(before) if before else None
    if before and cursor is None:
        raise ValueError(f"not a delivery cursor: {before[:40]!r}")
    items = await store.list_deliveries(
        state=state,
        endpoint=endpoint,
        user_id=user_id,
        limit=limit + 1,
        before=cursor,
        event_id=event_id,
    )
    more = len(items) > limit
    items = items[:limit]
    return Page(items, items[-1].id if more and items else None)


async def get_delivery(store: Store, delivery_id: str) -> DeliveryDetail | None:
    """One delivery with its attempts, or None for an unknown (or malformed) id."""
    number = parse_delivery_id(delivery_id)
    return None if number is None else await store.get_delivery(number)


async def replay(
    store: Store,
    *,
    ids: Sequence[str] | None = None,
    state: PublicState | None = None,
    endpoint: str | None = None,
    user_id: str | None = None,
    event_id: str | None = None,
    now: float,
) -> int:
    """Re-queue finished deliveries; unknown ids are ignored (see :func:`unknown_ids`).
    Returns how many."""
    numbers = None
    if ids is not None:
        numbers = [n for n in (parse_delivery_id(i) for i in ids) if n is not None]
    return await store.replay(
        ids=numbers, state=state, endpoint=endpoint, user_id=user_id, event_id=event_id, now=now
    )


async def unknown_ids(store: Store, ids: Sequence[str]) -> list[str]:
    """The ids among ``ids`` that name no delivery (malformed ones included)."""
    return [i for i in ids if await get_delivery(store, i) is None]


async def retry_now(
    store: Store,
    *,
    endpoint: str | None = None,
    user_id: str | None = None,
    event_id: str | None = None,
    now: float,
) -> int:
    """Make pending deliveries waiting for a scheduled retry due now, without using an
    attempt (an operator who fixed the receiver need not wait hours). Returns how many."""
    return await store.retry_now(endpoint=endpoint, user_id=user_id, event_id=event_id, now=now)


async def purge(
    store: Store, *, retention: float, now: float, batch: int = 500, pause: float = 0.0
) -> int:
    """Delete delivered deliveries older than ``retention`` and dead ones older than twice
    that, with the events only they referred to, in small transactions so the dispatcher's
    own store calls run in between. Returns how many rows went."""
    total = 0
    while True:
        removed = await store.purge(
            delivered_before=now - retention, dead_before=now - 2 * retention, batch=batch
        )
        total += removed
        if removed == 0:
            return total
        await asyncio.sleep(pause)


async def endpoints(store: Store, settings: Settings) -> list[dict[str, Any]]:
    """Every configured endpoint (the alert endpoint last), and every removed one that still
    has work in the store, each with its health state (CONTRACT.md 5b)."""
    stats = {s.endpoint: s for s in await store.endpoint_stats()}
    rows = await store.health_rows(monitor.ENDPOINT)
    listed: list[dict[str, Any]] = []
    for ep in settings.all_endpoints:
        s = stats.pop(ep.name, EndpointStats(ep.name))
        listed.append(
            {
                "name": ep.name,
                "url": ep.display_url,
                "configured": True,
                "state": display_state(monitor.endpoint_health(rows.get(ep.name)), True),
                "alerts": ep is settings.alert_url,
                "user_token": ep.user_token,
                "signed": bool(ep.secrets),
                "max_in_flight": ep.max_in_flight,
                "rate_limit": ep.rate_limit,
                **_stats_json(s),
            }
        )
    for name, s in sorted(stats.items()):
        listed.append(
            {"name": name, "url": None, "configured": False, "state": "removed", **_stats_json(s)}
        )
    return listed


async def endpoint_action(
    store: Store,
    settings: Settings,
    name: str,
    action: Literal["pause", "resume"],
    *,
    now: float,
    metrics: Metrics | None = None,
) -> dict[str, Any] | None:
    """Pause or resume an endpoint (idempotent); None for a name the relay does not know.

    A removed endpoint that still has work may be paused too, so it stays quiet if it
    returns. The running relay applies the change within a second or two.
    """
    configured = {ep.name for ep in settings.all_endpoints}
    if name not in configured and name not in {s.endpoint for s in await store.endpoint_stats()}:
        return None
    after, changed = await monitor.operate(store, settings, name, action, now, metrics=metrics)
    return {"name": name, "state": display_state(after, name in configured), "changed": changed}


def iso(ts: float | None) -> str | None:
    """A unix time as the API shows it (RFC 3339, UTC, seconds)."""
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def _stats_json(s: EndpointStats) -> dict[str, Any]:
    return {
        "pending": s.pending,
        "oldest_pending_age_s": None
        if s.oldest_pending_at is None
        else round(max(0.0, time.time() - s.oldest_pending_at), 1),
        "dead": s.dead,
        "delivered": s.delivered,
        "oldest_pending_at": iso(s.oldest_pending_at),
        "last_success_at": iso(s.last_success_at),
        "last_failure_at": iso(s.last_failure_at),
        "last_error": s.last_error,
    }


def info_json(info: DeliveryInfo) -> dict[str, Any]:
    """A delivery as JSON, with ISO-8601 times."""
    data = asdict(info)
    for key in ("next_attempt_at", "created_at", "updated_at"):
        data[key] = iso(data[key])
    return data


def detail_json(detail: DeliveryDetail) -> dict[str, Any]:
    """A delivery, its event body and its attempts as JSON."""
    return {
        **info_json(detail.info),
        "body": detail.body,
        "attempt_log": [
            {
                "at": iso(a.at),
                "status": a.status,
                "latency_ms": round(a.latency * 1000, 1),
                "error": a.error,
                "response_excerpt": a.excerpt,
            }
            for a in detail.attempts
        ],
    }


def format_table(items: Sequence[DeliveryInfo]) -> str:
    """A plain-text table for the terminal: each delivery's id and event id (webhook-id), so
    that either can be pasted into `show`, `replay` or `--event-id`."""
    header = ("ID", "EVENT ID", "STATE", "ENDPOINT", "USER", "LAST", "ATTEMPTS", "CREATED")
    rows = [
        (
            i.id,
            i.event_id,
            i.state,
            i.endpoint,
            i.user_id or "-",
            str(i.last_status) if i.last_status else (i.last_error or "-")[:30],
            str(i.attempts),
            iso(i.created_at) or "-",
        )
        for i in items
    ]
    widths = [max(len(r[n]) for r in [header, *rows]) for n in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in [header, *rows]
    )
