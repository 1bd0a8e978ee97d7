"""Chaos in CI: the scenarios of ``bench/chaos/`` at small sizes, each ending with the audit
of ``bench/audit.py`` (every stored event delivered to every endpoint, per-user order, no
duplicates but those in flight at a kill -9, no secret anywhere).

``python -m bench.chaos`` runs the same scenarios at full size and writes
``bench/results/chaos.md``. Findings the relay still has are ``xfail(strict=True)`` with
"BUG:" and where to fix them, so that the fix turns them into failures to un-mark.
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # pytest puts tests/ on sys.path, not the repository root
    sys.path.insert(0, str(ROOT))

from bench import chaos  # noqa: E402
from bench.audit import Arrival, StoredDelivery, audit, find_leaks  # noqa: E402


def assert_clean(outcome: chaos.Outcome) -> None:
    """The scenario's audit found nothing wrong."""
    assert outcome.report.ok, outcome.report.explain()


async def skip_unless_possible(scenario: Awaitable[chaos.Outcome]) -> chaos.Outcome:
    """Run a scenario; skip (with its reason) when this sandbox cannot simulate the fault."""
    try:
        return await scenario
    except chaos.ScenarioSkipped as skip:
        pytest.skip(str(skip))


# -- the audit audits -------------------------------------------------------------------------


def stored(
    event_id: str, ts: int, *, user: str = "u1", state: str = "delivered", ord: int = 0
) -> StoredDelivery:
    return StoredDelivery(event_id, "ep", user, (ts, ord), state, 1, 204)


def test_audit_passes_a_clean_run() -> None:
    rows = [stored("e1", 1), stored("e2", 2), stored("e3", 3, user="u2")]
    got = [Arrival("ep", "e1", True), Arrival("ep", "e3", True), Arrival("ep", "e2", True)]
    report = audit("clean", rows, got, endpoints=["ep"], sent=["e1", "e2", "e3"])
    assert report.ok, report.explain()
    assert (report.stored, report.delivered, report.lost) == (3, 3, 0)


def test_audit_counts_unacknowledged_pending_and_unjustified_dead_as_lost() -> None:
    rows = [stored("e1", 1), stored("e2", 2, state="pending"), stored("e3", 3, state="dead")]
    got = [Arrival("ep", "e1", False), Arrival("ep", "e3", False)]
    report = audit("lossy", rows, got, endpoints=["ep"])
    assert report.lost == 3 and not report.ok
    assert audit("dead ok", rows[2:], got[1:], endpoints=["ep"], dead_ok=lambda d: True).ok


def test_audit_finds_missing_fan_out_and_vanished_events() -> None:
    report = audit(
        "fan-out", [stored("e1", 1)], [Arrival("ep", "e1", True)], endpoints=["ep", "other"]
    )
    assert report.lost == 1
    report = audit("vanished", [], [], endpoints=["ep"], committed=["e9"])
    assert report.lost == 1


def test_audit_allows_duplicates_only_for_deliveries_in_flight_at_a_kill() -> None:
    rows = [stored("e1", 1), stored("e2", 2)]
    got = [Arrival("ep", e, True) for e in ("e1", "e1", "e2", "e2")]
    report = audit("dups", rows, got, endpoints=["ep"], crashed_in_flight=[("ep", "e1")])
    assert (report.duplicates, report.unexpected_duplicates) == (2, 1)


def test_audit_finds_order_violations_per_user_only() -> None:
    rows = [stored("e1", 1), stored("e2", 2), stored("x1", 3, user="u2")]
    got = [Arrival("ep", "x1", True), Arrival("ep", "e2", True), Arrival("ep", "e1", True)]
    report = audit("order", rows, got, endpoints=["ep"])
    assert report.order_violations == 2  # first acknowledged and first attempted


def test_audit_orders_lanes_by_sfox_timestamp_then_store_order() -> None:
    rows = [stored("late", 1, ord=9), stored("early", 2, ord=1), stored("tie", 2, ord=5)]
    got = [Arrival("ep", e, True) for e in ("late", "early", "tie")]
    assert audit("order", rows, got, endpoints=["ep"]).ok
    swapped = [Arrival("ep", e, True) for e in ("early", "late", "tie")]
    assert audit("order", rows, swapped, endpoints=["ep"]).order_violations == 2


def test_audit_accepts_superseded_only_behind_a_delivered_later_event() -> None:
    rows = [stored("old", 1, state="superseded"), stored("new", 2)]
    report = audit("superseded", rows, [Arrival("ep", "new", True)], endpoints=["ep"])
    assert report.ok and report.superseded == 1
    alone = audit("alone", rows[:1], [], endpoints=["ep"])
    assert alone.lost == 1


def test_audit_compares_the_feed_with_the_store() -> None:
    rows = [stored("e1", 1)]
    got = [Arrival("ep", "e1", True)]
    assert audit("feed", rows, got, endpoints=["ep"], sent=["e1", "e2"], must_store_sent=True).lost
    relaxed = audit("kill", rows, got, endpoints=["ep"], sent=["e1", "e2"])
    assert relaxed.ok and relaxed.notes
    assert not audit("phantom", rows, got, endpoints=["ep"], sent=[]).ok


def test_find_leaks_names_secret_and_place() -> None:
    found = find_leaks(
        {"admin token": "adm-123456", "short": "ab"},
        {"log": "x adm-123456 y ab", "store": b"\x00adm-12345\x00", "metrics": "nothing"},
    )
    assert found == ["admin token in log"]


# -- 1. crash loop ----------------------------------------------------------------------------


@pytest.mark.slow
async def test_crash_loop_loses_nothing_committed(tmp_path: Path) -> None:
    sizes = chaos.CI
    outcome = await chaos.crash_loop(
        tmp_path,
        kills=sizes.kills,
        rate=sizes.crash_rate,
        tail=sizes.crash_tail,
        dwell=sizes.crash_dwell,
    )
    assert_clean(outcome)
    assert outcome.report.stored > 300
    assert outcome.facts["exit_code"] == 0


# -- 2. feed faults ---------------------------------------------------------------------------


async def test_feed_faults_keep_every_well_formed_event_within_sfox_limits(
    tmp_path: Path,
) -> None:
    sizes = chaos.CI
    outcome = await chaos.feed_faults(
        tmp_path, phase=sizes.feed_phase, drops=sizes.feed_drops, rejections=sizes.feed_rejections
    )
    assert_clean(outcome)
    facts = outcome.facts
    assert facts["alive"]
    assert facts["connections"] >= 5  # rejected, dropped, timed out, stalled
    assert facts["connections_per_minute"] <= 20
    assert min(facts["auth_gaps"]) >= facts["auth_retry_after"] - 0.05
    assert facts["bad_frames_counted"] == facts["bad_frames_quarantined"] > 0
    assert not facts["fake_token_stored"]
    assert facts["stall_detected_s"] < 5


# -- 3. endpoint faults -----------------------------------------------------------------------


@pytest.mark.slow
async def test_endpoint_faults_do_not_hold_back_a_healthy_endpoint(tmp_path: Path) -> None:
    outcome = await chaos.endpoint_faults(
        tmp_path, events=chaos.CI.endpoint_events, rate=chaos.CI.endpoint_rate
    )
    assert_clean(outcome)
    facts = outcome.facts
    assert facts["healthy_max_latency_s"] < 1.0, facts
    assert facts["healthy_strays"] == []  # 301 never followed
    assert facts["excerpt_max_bytes"] <= 1024
    assert {301, 410} <= set(facts["dead_by_status"]), facts


async def test_excerpt_of_a_non_utf8_body_fits_in_1_kib(tmp_path: Path) -> None:
    outcome = await chaos.excerpt_size(tmp_path)
    assert_clean(outcome)


async def test_a_retry_after_beyond_any_calendar_never_wedges_a_delivery(tmp_path: Path) -> None:
    outcome = await chaos.hostile_retry_after(tmp_path, patience=2.0)
    assert_clean(outcome)


async def test_an_event_under_1_mib_is_delivered_and_one_over_is_a_bad_frame(
    tmp_path: Path,
) -> None:
    outcome = await chaos.large_event(tmp_path)
    assert_clean(outcome)
    assert outcome.facts["bad"] == outcome.facts["kept"] == 1


@pytest.mark.parametrize("store", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_a_gzip_binary_answer_never_stalls_recording(tmp_path: Path, store: str) -> None:
    outcome = await skip_unless_possible(chaos.gzip_answers(tmp_path, store=store))
    assert_clean(outcome)
    assert outcome.facts["encodings"] == ["identity"]
    assert outcome.facts["dirty"] == 0


# -- 4. store faults --------------------------------------------------------------------------


async def test_sqlite_disk_full_holds_the_feed_and_resumes(tmp_path: Path) -> None:
    outcome = await skip_unless_possible(chaos.store_full(tmp_path, outage=chaos.CI.store_outage))
    assert_clean(outcome)
    facts = outcome.facts
    assert facts["alive_during_outage"]
    assert facts["store_check_during_outage"] == {"feed": "ok", "store": "failing"}
    assert facts["readyz_200_during_outage"] == 0
    assert facts["stored_growth_in_second_half"] == 0
    assert facts["taken_growth_in_second_half"] == 0  # the feed is held


async def test_a_bad_frame_during_a_store_outage_is_still_kept(tmp_path: Path) -> None:
    outcome = await skip_unless_possible(chaos.quarantine_while_down(tmp_path))
    assert_clean(outcome)


@pytest.mark.postgres
async def test_replicas_keep_per_user_order_when_subscribing_mid_feed(tmp_path: Path) -> None:
    """Section 7: three replicas, one broadcast feed, two of them subscribing while it runs."""
    outcome = await skip_unless_possible(
        chaos.replicas_broadcast(
            tmp_path, runs=chaos.CI.broadcast_runs, seconds=chaos.CI.broadcast_seconds
        )
    )
    assert_clean(outcome)
    assert outcome.report.order_violations == 0
    assert outcome.report.stored == outcome.report.sent


@pytest.mark.postgres
async def test_postgres_cut_holds_the_feed_and_resumes(tmp_path: Path) -> None:
    outcome = await skip_unless_possible(chaos.postgres_cut(tmp_path, outage=chaos.CI.store_outage))
    assert_clean(outcome)
    assert outcome.facts["alive_during_outage"]
    assert outcome.facts["readyz_200_during_outage"] == 0
    assert outcome.facts["taken_growth_in_second_half"] == 0


# -- 5. hostile input -------------------------------------------------------------------------


@pytest.mark.parametrize("store", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_hostile_frames_are_counted_quarantined_and_never_crash(
    tmp_path: Path, store: str
) -> None:
    outcome = await skip_unless_possible(
        chaos.hostile_frames(tmp_path, frames=chaos.CI.fuzz_frames, store=store)
    )
    assert_clean(outcome)
    facts = outcome.facts
    assert facts["generated"] >= chaos.CI.fuzz_frames * 0.9
    assert facts["kinds"]["good"] and facts["kinds"]["bad"]
    assert facts["quarantined"] == facts["must_count"] == facts["bad_frames_counted"]


@pytest.mark.slow
async def test_invalid_configuration_is_refused_naming_the_variable(tmp_path: Path) -> None:
    outcome = await chaos.config_fuzz(tmp_path, examples=chaos.CI.config_examples)
    assert_clean(outcome)


async def test_admin_api_answers_no_data_without_the_token(tmp_path: Path) -> None:
    outcome = await chaos.admin_tricks(tmp_path)
    assert_clean(outcome)
    assert outcome.facts["requests"] > 100


# -- 6. leak audit ----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("log_format", ["json", "console"])
async def test_no_secret_in_logs_metrics_api_cli_or_store(tmp_path: Path, log_format: str) -> None:
    # In-process through relay.logs.setup_logging, as `relay run` does; the full run also
    # searches a real daemon's stderr.
    outcome = await chaos.leak_audit(tmp_path, log_format=log_format, daemon=False, events=60)
    assert_clean(outcome)
    assert outcome.facts["leaks"] == []
    assert outcome.facts["log_lines"] > 100  # DEBUG really was on
    assert outcome.facts["bad_frames"] >= 6  # every kind of garbage, FAKE_TOKEN's included
    assert outcome.facts["tokens"] > 0


@pytest.mark.slow
async def test_no_secret_leaks_through_an_endpoint_echoing_requests(tmp_path: Path) -> None:
    outcome = await chaos.leak_audit(
        tmp_path, log_format="json", echo=True, daemon=False, events=24
    )
    assert_clean(outcome)


async def test_endpoint_health_under_faults(tmp_path: Path) -> None:
    outcome = await chaos.endpoint_health(tmp_path, events=chaos.CI.endpoint_events)
    assert_clean(outcome)
    facts = outcome.facts
    assert facts["alerts"]["endpoint.opened"] >= 1
    assert facts["paused"]["changed"] and facts["resumed"]["changed"]
