"""Operational events (CONTRACT.md 5c), pure: a transition -> the event stored for it.

An alert is an ordinary stored event with ``source`` ``relay`` (its deliveries carry
``relay-source: relay``), delivered to the alert endpoint only. Its id is derived from the
transition it reports (what changed, and the state row's version that recorded it), so the
replicas that race to record one transition produce one event id, and the store's dedupe by
event id keeps it once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from relay.codec import canonical_json, compact_json
from relay.events import NewEvent

__all__ = ["ALERT_RECIPIENT", "alert_event", "alert_id", "rfc3339"]

ALERT_RECIPIENT = "relay.alerts"


def rfc3339(ts: float) -> str:
    """UTC, millisecond precision, ``Z`` suffix."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def alert_id(kind: str, subject: str, version: int, type_: str) -> str:
    """``evt_`` + SHA-256 of the transition: the state row and the version it reached."""
    basis = {"alert": type_, "kind": kind, "subject": subject, "version": version}
    return "evt_" + hashlib.sha256(canonical_json(basis)).hexdigest()


def alert_event(event_id: str, type_: str, at: float, data: Mapping[str, Any]) -> NewEvent:
    """The stored event: body ``{"type", "timestamp", "data"}``, no user, no token."""
    body = compact_json({"type": type_, "timestamp": rfc3339(at), "data": dict(data)})
    return NewEvent(
        event_id=event_id,
        source="relay",
        recipient=ALERT_RECIPIENT,
        user_id=None,
        status=None,
        requirements=None,
        body=body,
        has_token=False,
    )
