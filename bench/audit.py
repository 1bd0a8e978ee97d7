"""The chaos audit: what the store holds against what the endpoints received, and what leaked.

Written once, used by ``bench/chaos/`` (the full run) and ``tests/test_chaos.py`` (its short
version in CI). It checks the README from the outside, after a scenario has drained:

- every event the relay stored has a delivery for every matching endpoint, and each of those
  ended acknowledged by that endpoint (a 2xx seen at the receiver), or dead where the scenario
  made the endpoint refuse it for good; anything else is *lost*;
- for each endpoint and user, the first acknowledged (and the first attempted) deliveries
  follow the lane's order: sFOX's timestamp, then the order the store received them; a
  ``superseded`` delivery is fine only where a later one of its lane was delivered;
- an endpoint acknowledged the same event twice only if that delivery was in flight when the
  relay was killed;
- optionally, every well-formed message the feed sent was stored, and nothing else was;
- no secret appears in any captured output.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "Arrival",
    "AuditReport",
    "StoredDelivery",
    "audit",
    "expected_event_id",
    "find_leaks",
    "in_flight",
    "postgres_deliveries",
    "sqlite_deliveries",
]

#: Problems listed in a report (the counters still count every one).
_MAX_PROBLEMS = 20


@dataclass(frozen=True, slots=True)
class StoredDelivery:
    """One row of the outbox, as the audit needs it."""

    event_id: str
    endpoint: str
    user_id: str | None
    position: tuple[int, int]
    """Its place in the (endpoint, user) lane: sFOX timestamp (the delivery's ``ts``), then
    store order (``ord``)."""
    state: str
    """Internal state: waiting, pending, inflight, delivered, dead, superseded."""
    attempts: int
    last_status: int | None
    last_error: str | None = None


@dataclass(frozen=True, slots=True)
class Arrival:
    """One request an endpoint received, in arrival order."""

    endpoint: str
    webhook_id: str
    ok: bool
    """The endpoint answered 2xx in time: the relay may take it as delivered."""
    at_ns: int = 0


@dataclass
class AuditReport:
    """One row of the chaos table, plus what went wrong in words."""

    scenario: str
    sent: int
    stored: int
    delivered: int = 0
    """(endpoint, event) pairs some endpoint acknowledged."""
    dead: int = 0
    superseded: int = 0
    """Not sent: a later event of the same lane had been delivered (CONTRACT section 5)."""
    lost: int = 0
    duplicates: int = 0
    unexpected_duplicates: int = 0
    order_violations: int = 0
    leaks: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (
            self.lost
            or self.unexpected_duplicates
            or self.order_violations
            or self.leaks
            or self.problems
        )

    def problem(self, text: str) -> None:
        if len(self.problems) < _MAX_PROBLEMS:
            self.problems.append(text)
        elif len(self.problems) == _MAX_PROBLEMS:
            self.problems.append("(more problems not listed)")

    def row(self) -> dict[str, Any]:
        """The table's columns."""
        return {
            "scenario": self.scenario,
            "events sent": self.sent,
            "stored": self.stored,
            "delivered": self.delivered,
            "lost": self.lost,
            "duplicates": self.duplicates,
            "order violations": self.order_violations,
            "leaks": self.leaks,
        }

    def explain(self) -> str:
        """Everything in the report, for an assertion message or the bench's log."""
        lines = [f"{self.scenario}: {self.row()} dead={self.dead} superseded={self.superseded}"]
        if self.unexpected_duplicates:
            lines.append(f"  unexpected duplicates: {self.unexpected_duplicates}")
        lines += [f"  problem: {p}" for p in self.problems]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def audit(
    scenario: str,
    deliveries: Iterable[StoredDelivery],
    arrivals: Iterable[Arrival],
    *,
    endpoints: Collection[str],
    stored_events: Collection[str] | None = None,
    sent: Sequence[str] | None = None,
    must_store_sent: bool = False,
    crashed_in_flight: Collection[tuple[str, str]] = (),
    committed: Collection[str] = (),
    dead_ok: Callable[[StoredDelivery], bool] | None = None,
    leaks: Sequence[str] = (),
) -> AuditReport:
    """Compare the outbox with what the endpoints received.

    Args:
        scenario: the table row's name.
        deliveries: every delivery the store holds, after the relay drained.
        arrivals: every request each endpoint received, in arrival order.
        endpoints: the endpoints every stored event must reach (no filters configured).
        stored_events: event ids the store holds (default: those of ``deliveries``); an event
            with no delivery for some endpoint is lost for it.
        sent: ids of the well-formed messages the feed sent (None: not checked).
        must_store_sent: a sent message missing from the store counts as lost (not when the
            relay was killed: what it had read but not committed is reconciliation's job).
        crashed_in_flight: (endpoint, event id) pairs in flight when the relay was killed:
            the only ones an endpoint may acknowledge twice.
        committed: event ids seen in the store earlier (e.g. right after a kill): each must
            still be there.
        dead_ok: which dead deliveries the scenario caused on purpose (default: none).
        leaks: findings of :func:`find_leaks`.
    """
    rows = list(deliveries)
    got = list(arrivals)
    events = set(stored_events) if stored_events is not None else {d.event_id for d in rows}
    report = AuditReport(scenario, sent=len(sent) if sent is not None else 0, stored=len(events))
    report.leaks = len(leaks)
    for leak in leaks:
        report.problem(f"leak: {leak}")

    acked: Counter[tuple[str, str]] = Counter()
    tried: set[tuple[str, str]] = set()
    for arrival in got:
        key = (arrival.endpoint, arrival.webhook_id)
        tried.add(key)
        if arrival.ok:
            acked[key] += 1
    report.delivered = len(acked)

    # 1. every stored event, every endpoint: acknowledged, or dead on purpose.
    by_key = {(d.endpoint, d.event_id): d for d in rows}
    newest: dict[tuple[str, str], tuple[int, int]] = {}
    for d in rows:
        if d.state == "delivered" and d.user_id is not None:
            lane = (d.endpoint, d.user_id)
            newest[lane] = max(newest.get(lane, d.position), d.position)
    for event_id in sorted(events):
        for endpoint in sorted(endpoints):
            if (endpoint, event_id) not in by_key:
                report.lost += 1
                report.problem(f"{event_id} stored without a delivery to {endpoint}")
    for d in rows:
        key = (d.endpoint, d.event_id)
        if d.state == "delivered":
            if not acked[key]:
                report.lost += 1
                report.problem(f"{d.event_id} marked delivered, {d.endpoint} never acknowledged")
        elif d.state == "superseded":
            report.superseded += 1
            top = newest.get((d.endpoint, d.user_id or ""))
            if top is None or top <= d.position:
                report.lost += 1
                report.problem(f"{d.event_id} superseded at {d.endpoint} by nothing delivered")
        elif d.state == "dead":
            report.dead += 1
            if dead_ok is None or not dead_ok(d):
                report.lost += 1
                report.problem(
                    f"{d.event_id} dead at {d.endpoint} after {d.attempts} attempts "
                    f"(last status {d.last_status}, last error {d.last_error})"
                )
        else:
            report.lost += 1
            report.problem(f"{d.event_id} still {d.state} at {d.endpoint} after draining")

    # 2. duplicates: only deliveries in flight at a kill may be acknowledged twice.
    allowed = set(crashed_in_flight)
    for key, count in acked.items():
        if count > 1:
            report.duplicates += count - 1
            if key not in allowed:
                report.unexpected_duplicates += count - 1
                report.problem(f"{key[1]} acknowledged {count} times by {key[0]}")
    strangers = {key for key in tried if key not in by_key}
    for endpoint, event_id in sorted(strangers):
        report.problem(f"{endpoint} received {event_id}, which the store does not hold")

    # 3. per-user order: first acknowledgements and first attempts follow the lanes.
    for which, keep in (("acknowledged", True), ("attempted", False)):
        seen: set[tuple[str, str]] = set()
        highest: dict[tuple[str, str], tuple[tuple[int, int], str]] = {}
        for arrival in got:
            if keep and not arrival.ok:
                continue
            key = (arrival.endpoint, arrival.webhook_id)
            if key in seen:
                continue
            seen.add(key)
            found = by_key.get(key)
            if found is None or found.user_id is None:
                continue
            lane = (found.endpoint, found.user_id)
            latest = highest.get(lane)
            if latest is not None and found.position < latest[0]:
                report.order_violations += 1
                report.problem(
                    f"{found.endpoint}, user {found.user_id}: {found.event_id} first {which} "
                    f"after {latest[1]}, which comes later in its lane"
                )
            else:
                highest[lane] = (found.position, found.event_id)

    vanished = set(committed) - events
    if vanished:
        report.lost += len(vanished)
        report.problem(f"{len(vanished)} committed events vanished, e.g. {min(vanished)}")

    # 4. the feed: stored is what was sent, all of it when nothing was killed.
    if sent is not None:
        sent_ids = set(sent)
        phantom = events - sent_ids
        if phantom:
            report.problem(f"{len(phantom)} stored events were never sent, e.g. {min(phantom)}")
        missing = sent_ids - events
        if missing and must_store_sent:
            report.lost += len(missing)
            report.problem(f"{len(missing)} sent messages never stored, e.g. {min(missing)}")
        elif missing:
            report.notes.append(
                f"{len(missing)} sent messages were read but not yet committed when the relay "
                "was killed (not stored; recovering them is reconciliation's job)"
            )
    return report


def expected_event_id(message: Mapping[str, Any]) -> str:
    """The README's event id of a feed message, written out independently of the
    relay: ``evt_`` + SHA-256 of the canonical recipient, timestamp and token-less payload."""
    payload = {k: v for k, v in message["payload"].items() if k != "user_token"}
    basis = {
        "recipient": message["recipient"],
        "timestamp": message["timestamp"],
        "payload": payload,
    }
    canonical = json.dumps(basis, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "evt_" + hashlib.sha256(canonical.encode()).hexdigest()


def find_leaks(
    secrets: Mapping[str, str | bytes],
    outputs: Mapping[str, str | bytes],
    *,
    min_length: int = 6,
) -> list[str]:
    """Every (secret, place) where a secret shows up, e.g. ``"admin token in /metrics"``.

    Args:
        secrets: what must never appear, by a name to report: text (searched as UTF-8) or raw
            bytes; values shorter than ``min_length`` are skipped (they would match by chance).
        outputs: everything captured, by where it came from (text, or raw bytes of a file).
    """
    found = []
    for where, text in outputs.items():
        blob = text if isinstance(text, bytes) else text.encode("utf-8", "replace")
        for name, secret in secrets.items():
            needle = secret if isinstance(secret, bytes) else secret.encode()
            if len(needle) >= min_length and needle in blob:
                found.append(f"{name} in {where}")
    return found


# -- reading the store ------------------------------------------------------------------------

_DELIVERIES_SQL = """
    SELECT e.event_id, d.endpoint, d.user_id, d.ts, d.ord, d.state, d.attempts, d.last_status,
        d.last_error
    FROM deliveries d JOIN events e ON e.seq = d.event_seq ORDER BY d.ts, d.ord, d.id
"""


def _row(row: Sequence[Any]) -> StoredDelivery:
    return StoredDelivery(
        event_id=row[0],
        endpoint=row[1],
        user_id=row[2],
        position=(int(row[3]), int(row[4])),
        state=row[5],
        attempts=int(row[6]),
        last_status=row[7],
        last_error=row[8],
    )


def _sqlite(db: Path, sql: str) -> list[Any]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10.0)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def sqlite_deliveries(db: Path) -> tuple[list[StoredDelivery], set[str]]:
    """Every delivery and every stored event id of a SQLite store (read-only, beside a
    running daemon)."""
    rows = [_row(r) for r in _sqlite(db, _DELIVERIES_SQL)]
    events = {r[0] for r in _sqlite(db, "SELECT event_id FROM events")}
    return rows, events


def in_flight(db: Path) -> set[tuple[str, str]]:
    """(endpoint, event id) of the deliveries a SQLite store has in flight (read after a kill)."""
    rows = _sqlite(
        db,
        "SELECT d.endpoint, e.event_id FROM deliveries d JOIN events e ON e.seq = d.event_seq "
        "WHERE d.state = 'inflight'",
    )
    return {(r[0], r[1]) for r in rows}


async def postgres_deliveries(url: str, schema: str) -> tuple[list[StoredDelivery], set[str]]:
    """The same, from a PostgreSQL store kept in ``schema``."""
    import asyncpg

    conn = await asyncpg.connect(url, timeout=10, server_settings={"search_path": schema})
    try:
        rows = [_row(tuple(r)) for r in await conn.fetch(_DELIVERIES_SQL)]
        events = {r[0] for r in await conn.fetch("SELECT event_id FROM events")}
    finally:
        await conn.close()
    return rows, events
