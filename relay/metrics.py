"""Every Prometheus metric the README lists, in one registry per relay.

A registry per :class:`Metrics` instance (not the global default) so tests and the demo can
run several relays in one process. Labels carry endpoint names, never URLs.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from relay import __version__

__all__ = ["FEED_STATES", "Metrics"]

# No `_created` series: one more sample per counter that no dashboard reads.
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]

#: The feed client's states, one ``relay_feed_state`` series each.
FEED_STATES = (
    "connecting",
    "authenticating",
    "subscribing",
    "subscribed",
    "backing_off",
    "auth_failed",
    "stopped",
)


class Metrics:
    """The relay's metrics; components receive this object and update it."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._clock = clock
        self._last_message_at: float | None = None
        r = self.registry
        self.feed_connected = Gauge(
            "relay_feed_connected", "1 while subscribed to the sFOX feed", registry=r
        )
        self.feed_state = Gauge(
            "relay_feed_state",
            "The feed client's state (1 for the current one)",
            ["state"],
            registry=r,
        )
        self.feed_last_message_age = Gauge(
            "relay_feed_last_message_age_seconds",
            "Seconds since the last frame from sFOX (-1 before the first)",
            registry=r,
        )
        self.feed_last_message_age.set_function(self._last_message_age)
        self.feed_messages = Counter(
            "relay_feed_messages", "Data messages received from the feed", registry=r
        )
        self.feed_reconnects = Counter(
            "relay_feed_reconnects", "Connections opened to sFOX after the first", registry=r
        )
        self.feed_sequence_gaps = Counter(
            "relay_feed_sequence_gaps", "Sequence numbers skipped by the feed", registry=r
        )
        self.feed_bad_frames = Counter(
            "relay_feed_bad_frames",
            "Malformed frames received, quarantined and skipped",
            registry=r,
        )
        self.events_stored = Counter(
            "relay_events_stored", "Events committed to the store", registry=r
        )
        self.events_duplicate = Counter(
            "relay_events_duplicate", "Events already in the store (same event id)", registry=r
        )
        self.deliveries = Counter(
            "relay_deliveries",
            "Delivery attempts by outcome (success, retry, dead, superseded)",
            ["endpoint", "outcome"],
            registry=r,
        )
        self.delivery_duration = Histogram(
            "relay_delivery_duration_seconds",
            "Time from request start to response, per attempt",
            ["endpoint"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.outbox_pending = Gauge(
            "relay_outbox_pending", "Deliveries not yet delivered or dead", ["endpoint"], registry=r
        )
        self.outbox_oldest_age = Gauge(
            "relay_outbox_oldest_age_seconds",
            "Age of the oldest pending delivery",
            ["endpoint"],
            registry=r,
        )
        self.outbox_dead = Gauge(
            "relay_outbox_dead",
            "Dead deliveries in the store now (until replayed or purged)",
            ["endpoint"],
            registry=r,
        )
        self.build_info = Gauge(
            "relay_build_info", "Always 1; the running version", ["version"], registry=r
        )
        self.build_info.labels(version=__version__).set(1)
        self.reconcile_runs = Counter(
            "relay_reconcile_runs", "Reconciliation runs by outcome", ["outcome"], registry=r
        )
        self.reconcile_events = Counter(
            "relay_reconcile_events", "Events emitted by reconciliation", registry=r
        )
        self.reconcile_last_success = Gauge(
            "relay_reconcile_last_success_timestamp_seconds",
            "Unix time of the last successful reconciliation (0 before the first)",
            registry=r,
        )
        self.endpoint_state = Gauge(
            "relay_endpoint_state",
            "Each endpoint's health state (1 for the current one): active, open, paused, disabled",
            ["endpoint", "state"],
            registry=r,
        )
        self.alerts = Counter(
            "relay_alerts", "Operational events raised (one per transition)", ["type"], registry=r
        )
        self.set_feed_state("stopped")

    def _last_message_age(self) -> float:
        if self._last_message_at is None:
            return -1.0
        return max(0.0, self._clock() - self._last_message_at)

    def frame_received(self) -> None:
        """Note that sFOX sent something (for the last-message age)."""
        self._last_message_at = self._clock()

    def set_feed_state(self, state: str) -> None:
        """One series per state; 1 for the current one."""
        for name in FEED_STATES:
            self.feed_state.labels(state=name).set(1 if name == state else 0)
        self.feed_connected.set(1 if state == "subscribed" else 0)

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)
