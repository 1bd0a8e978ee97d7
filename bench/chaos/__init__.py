"""Chaos: real parts, real faults, then an audit of the store against what the endpoints got.

The harness (``harness.py``) holds what every scenario shares; each sibling module holds the
scenarios of one theme; ``runner.py`` runs them all (``python -m bench.chaos``) and writes
``bench/results/chaos.md``. This package re-exports what tests use as ``chaos.<name>``
(``from bench import chaos``), so they need not know which module a scenario lives in.
"""

from __future__ import annotations

from bench.chaos.admin import admin_tricks
from bench.chaos.configs import config_fuzz
from bench.chaos.crash import crash_loop
from bench.chaos.endpoints import (
    endpoint_faults,
    excerpt_size,
    gzip_answers,
    hostile_retry_after,
    large_event,
)
from bench.chaos.feed import feed_faults, feed_faults_real_timings
from bench.chaos.harness import CI, FULL, Outcome, ScenarioSkipped, Sizes
from bench.chaos.health import endpoint_health
from bench.chaos.hostile import hostile_frames
from bench.chaos.leaks import leak_audit
from bench.chaos.replicas import replicas_broadcast
from bench.chaos.runner import main
from bench.chaos.stores import postgres_cut, quarantine_while_down, store_full

__all__ = [
    "CI",
    "FULL",
    "Outcome",
    "ScenarioSkipped",
    "Sizes",
    "admin_tricks",
    "config_fuzz",
    "crash_loop",
    "endpoint_faults",
    "endpoint_health",
    "excerpt_size",
    "feed_faults",
    "feed_faults_real_timings",
    "gzip_answers",
    "hostile_frames",
    "hostile_retry_after",
    "large_event",
    "leak_audit",
    "main",
    "postgres_cut",
    "quarantine_while_down",
    "replicas_broadcast",
    "store_full",
]
