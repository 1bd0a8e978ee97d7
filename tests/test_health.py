"""The breaker's rules, pure (relay/health.py), as tables (CONTRACT.md 5b)."""

from __future__ import annotations

import dataclasses

import pytest

from relay import alerts, health
from relay.health import Health, Policy, Result

POLICY = Policy(threshold=5, cooldown=30.0, disable_after=3600.0)


def fail(user: str | None, at: float = 0.0, *, probe: bool = False, **kw: object) -> Result:
    return Result(user, 503, None, retried=True, at=at, probe=probe, **kw)  # type: ignore[arg-type]


def ok(
    user: str | None = "u1", at: float = 0.0, *, status: int = 204, probe: bool = False
) -> Result:
    return Result(user, status, None, retried=False, at=at, probe=probe)


def run(results: list[Result], start: Health | None = None) -> tuple[Health, list[str]]:
    h = start or Health()
    seen = []
    for r in results:
        h, alert = health.fold(h, [r], POLICY)
        if alert:
            seen.append(alert)
    return h, seen


@pytest.mark.parametrize(
    ("users", "state"),
    [
        (["a", "b", "a", "b"], "active"),  # below the threshold
        (["a", "b", "a", "b", "a"], "open"),  # threshold, two users
        (["a"] * 5, "active"),  # one poisonous user never opens it
        (["a"] * 9, "active"),
        (["a"] * 9 + ["b"], "open"),  # ... until a second user fails too
        ([None, "a", None, "a", None], "open"),  # events without a user count as one user
    ],
)
def test_opens_after_threshold_failures_spanning_two_users(
    users: list[str | None], state: str
) -> None:
    h, _ = run([fail(u, at=i) for i, u in enumerate(users)])
    assert h.state == state


@pytest.mark.parametrize("status", [200, 204, 400, 404, 410])
def test_any_answer_but_a_retried_failure_resets_the_count(status: int) -> None:
    h, _ = run([fail("a"), fail("b"), fail("a"), fail("b"), ok(status=status)])
    assert (h.state, h.failures) == ("active", 0)
    h, _ = run([fail("a"), fail("b"), fail("a"), fail("b")], h)
    assert h.state == "active"


def test_opening_schedules_the_first_probe_after_the_cooldown() -> None:
    h, alerts_seen = run([fail(u, at=100.0) for u in "ababa"])
    assert alerts_seen == ["endpoint.opened"]
    assert (h.state, h.since, h.probe_at) == ("open", 100.0, 130.0)
    assert health.start_probe(h, 129.9, 10) is None
    assert health.start_probe(h, 130.0, 10) is not None


def test_probe_delays_double_up_to_ten_minutes() -> None:
    h, _ = run([fail(u, at=0.0) for u in "ababa"])
    delays = []
    now = h.probe_at
    for _ in range(8):
        started = health.start_probe(h, now, 10)
        assert started is not None
        assert health.start_probe(started, now, 10) is None  # one probe at a time
        h, alert = health.fold(started, [fail("a", at=now, probe=True)], POLICY)
        assert alert is None
        delays.append(h.probe_at - now)
        now = h.probe_at
    assert delays == [60, 120, 240, 480, 600, 600, 600, 600]


def test_a_cooldown_above_ten_minutes_is_the_cap() -> None:
    policy = Policy(threshold=2, cooldown=900.0)
    h, _ = health.fold(Health(), [fail("a"), fail("b")], policy)
    h, _ = health.fold(h, [fail("a", at=900.0, probe=True)], policy)
    assert h.probe_at == 1800.0


def test_no_probe_before_retry_after() -> None:
    h, _ = run([fail(u, at=0.0) for u in "abab"] + [fail("a", at=0.0, not_before=500.0)])
    assert h.probe_at == 500.0
    h, _ = health.fold(h, [fail("a", at=500.0, probe=True, not_before=2000.0)], POLICY)
    assert h.probe_at == 2000.0


def test_probes_rotate_over_users() -> None:
    h, _ = run([fail(u) for u in "ababa"])
    h, _ = health.fold(h, [fail("u7", at=30, probe=True)], POLICY)
    assert h.cursor == "u7"


@pytest.mark.parametrize("status", [204, 400])
def test_a_probe_answered_otherwise_closes_the_breaker(status: int) -> None:
    h, _ = run([fail(u) for u in "ababa"])
    h, alert = health.fold(h, [ok(at=31.0, status=status, probe=True)], POLICY)
    assert alert == "endpoint.recovered"
    assert (h.state, h.failures, h.since) == ("active", 0, 31.0)


def test_open_too_long_is_disabled_and_disabled_ignores_everything() -> None:
    h, _ = run([fail(u) for u in "ababa"])
    assert health.tick(h, 3599.0, POLICY) == (h, None)
    h, alert = health.tick(h, 3600.0, POLICY)
    assert (h.state, alert) == ("disabled", "endpoint.disabled")
    assert health.start_probe(h, 10_000.0, 10) is None
    h2, alert = health.fold(h, [ok(), fail("a"), fail("b")], POLICY)
    assert (h2.state, alert) == ("disabled", None)
    never = Policy(threshold=5, cooldown=30.0, disable_after=None)
    assert health.tick(dataclasses.replace(h, state="open"), 1e12, never)[1] is None


@pytest.mark.parametrize(
    ("state", "action", "after", "alert"),
    [
        ("active", "pause", "paused", "endpoint.paused"),
        ("open", "pause", "paused", "endpoint.paused"),
        ("disabled", "pause", "paused", "endpoint.paused"),
        ("paused", "pause", "paused", None),
        ("paused", "resume", "active", "endpoint.resumed"),
        ("open", "resume", "active", "endpoint.resumed"),
        ("disabled", "resume", "active", "endpoint.resumed"),
        ("active", "resume", "active", None),
    ],
)
def test_operator_actions_are_idempotent(
    state: health.State, action: str, after: str, alert: str | None
) -> None:
    before = Health(state=state, failures=3, probe_at=9.0)
    h, made = health.operate(before, action, 50.0)  # type: ignore[arg-type]
    assert (h.state, made) == (after, alert)
    if alert is None:
        assert h == before
    elif after == "active":
        assert (h.failures, h.probe_at) == (0, 0.0)


def test_paused_ignores_results_of_attempts_in_flight() -> None:
    h, alert = health.fold(Health(state="paused"), [fail(u) for u in "ababab"], POLICY)
    assert (h.state, alert, h.last_status) == ("paused", None, 503)


def test_stored_form_round_trips_and_tolerates_newer_keys() -> None:
    h, _ = run([fail(u, at=3.0) for u in "ababa"])
    data = health.to_data(h)
    assert health.from_data("open", 7, {**data, "future": 1}) == dataclasses.replace(h, version=7)
    assert health.from_data("weird", 1, {}).state == "active"
    assert health.display_state(None, True) == "active"
    assert health.display_state(h, False) == "removed"


def test_alert_ids_are_derived_from_the_transition() -> None:
    a = alerts.alert_id("endpoint", "crm", 3, "endpoint.opened")
    assert a == alerts.alert_id("endpoint", "crm", 3, "endpoint.opened")
    assert a != alerts.alert_id("endpoint", "crm", 4, "endpoint.opened")
    event = alerts.alert_event(a, "endpoint.opened", 0.5, {"endpoint": "crm"})
    assert event.body == (
        b'{"type":"endpoint.opened","timestamp":"1970-01-01T00:00:00.500Z",'
        b'"data":{"endpoint":"crm"}}'
    )
    assert (event.source, event.user_id, event.has_token) == ("relay", None, False)
