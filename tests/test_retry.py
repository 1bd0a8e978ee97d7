"""The retry policy (relay/retry.py), as tables (the README, "Retries")."""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import format_datetime

import pytest

from relay.retry import RETRY_AFTER_CAP, Decision, decide, is_retryable, parse_retry_after

SCHEDULE = (0.0, 5.0, 300.0, 1800.0, 7200.0)
NOW = 1_717_005_327.0  # 2024-05-29T17:55:27Z
HTTP_NOW = "Wed, 29 May 2024 17:55:27 GMT"  # == NOW


def _http_date(offset: float) -> str:
    return format_datetime(datetime.fromtimestamp(NOW + offset, UTC), usegmt=True)


def test_http_now_is_now() -> None:
    assert _http_date(0) == HTTP_NOW


def _delay(decision: Decision) -> float:
    assert decision.state == "pending"
    assert decision.reason == "retry"
    return decision.next_at - NOW


# --- success and permanent failures -----------------------------------------------------------


@pytest.mark.parametrize("status", [200, 201, 202, 204, 299])
@pytest.mark.parametrize("attempt", [1, 5, 99])
def test_2xx_is_delivered(status: int, attempt: int) -> None:
    decision = decide(status=status, attempt=attempt, schedule=SCHEDULE, now=NOW, rand=lambda: 0.5)
    assert decision == Decision("delivered", NOW, "success")


@pytest.mark.parametrize("status", [100, 199, 300, 301, 302, 303, 304, 307, 308, 400, 401, 403,
                                    404, 405, 409, 410, 413, 422, 499])  # fmt: skip
def test_other_3xx_4xx_is_dead_at_once(status: int) -> None:
    decision = decide(
        status=status, attempt=1, schedule=SCHEDULE, now=NOW, retry_after="10", rand=lambda: 0.5
    )
    assert decision == Decision("dead", NOW, f"permanent: HTTP {status}")


@pytest.mark.parametrize(
    ("status", "attempt", "expected"),
    [
        # A failure the sender marks permanent (a message a broker refuses as too large) is
        # dead at once, on any attempt, whatever Retry-After says; None would be retried.
        (None, 1, Decision("dead", NOW, "permanent: refused by the destination")),
        (None, 3, Decision("dead", NOW, "permanent: refused by the destination")),
        (503, 1, Decision("dead", NOW, "permanent: refused by the destination")),
        (413, 1, Decision("dead", NOW, "permanent: refused by the destination")),
        # A success stays a success.
        (200, 1, Decision("delivered", NOW, "success")),
    ],
)
def test_permanent_flag_is_dead_at_once(
    status: int | None, attempt: int, expected: Decision
) -> None:
    decision = decide(
        status=status,
        attempt=attempt,
        schedule=SCHEDULE,
        now=NOW,
        retry_after="10",
        rand=lambda: 0.5,
        permanent=True,
    )
    assert decision == expected


@pytest.mark.parametrize("status", [None, 500, 503, 429, 408, 200, 404])
def test_a_permanent_failure_is_never_retryable(status: int | None) -> None:
    assert is_retryable(status, permanent=True) is False


@pytest.mark.parametrize("status", [None, 500, 429])
def test_without_the_permanent_flag_the_same_outcome_is_retried(status: int | None) -> None:
    decision = decide(status=status, attempt=1, schedule=SCHEDULE, now=NOW, rand=lambda: 0.5)
    assert decision.state == "pending"


# --- retryable outcomes --------------------------------------------------------------------------

RETRYABLE = [408, 425, 429, 500, 502, 503, 504, 599, None]


@pytest.mark.parametrize("status", RETRYABLE)
@pytest.mark.parametrize(
    ("rand", "factor"),
    [(0.0, 0.9), (0.5, 1.0), (0.999, 1.0998)],
    ids=["low", "mid", "high"],
)
@pytest.mark.parametrize("attempt", [1, 2, 3, 4])
def test_retryable_uses_the_schedule_with_jitter(
    status: int | None, rand: float, factor: float, attempt: int
) -> None:
    decision = decide(status=status, attempt=attempt, schedule=SCHEDULE, now=NOW, rand=lambda: rand)
    step = SCHEDULE[attempt]  # the delay before attempt n+1 is schedule[n]
    delay = _delay(decision)
    assert delay == pytest.approx(step * factor, rel=1e-12, abs=1e-6)
    assert step * 0.9 <= delay < step * 1.1 or step == delay == 0.0


def test_jitter_bounds_exactly() -> None:
    def delay(r: float) -> float:
        return decide(status=503, attempt=2, schedule=SCHEDULE, now=0.0, rand=lambda: r).next_at

    assert delay(0.0) == 270.0  # 300 * 0.9
    assert delay(0.5) == 300.0
    assert 329.9 < delay(0.999) < 330.0  # 300 * 1.0998, strictly under 1.1


@pytest.mark.parametrize("status", RETRYABLE)
@pytest.mark.parametrize("attempt", [5, 6, 50])
def test_schedule_exhausted_is_dead(status: int | None, attempt: int) -> None:
    decision = decide(status=status, attempt=attempt, schedule=SCHEDULE, now=NOW, rand=lambda: 0.5)
    assert decision == Decision("dead", NOW, f"gave up after {attempt} attempts")


def test_last_attempt_of_the_schedule_still_retries() -> None:
    decision = decide(status=500, attempt=4, schedule=SCHEDULE, now=NOW, rand=lambda: 0.5)
    assert decision == Decision("pending", NOW + 7200.0, "retry")


@pytest.mark.parametrize(
    ("schedule", "attempt", "state"),
    [((0.0,), 1, "dead"), ((), 1, "dead"), ((0.0, 1.0), 1, "pending"), ((0.0, 1.0), 2, "dead")],
)
def test_schedule_length_is_the_attempt_limit(
    schedule: tuple[float, ...], attempt: int, state: str
) -> None:
    decision = decide(status=None, attempt=attempt, schedule=schedule, now=NOW, rand=lambda: 0.5)
    assert decision.state == state


def test_default_rand_stays_within_jitter() -> None:
    for _ in range(200):
        delay = _delay(decide(status=500, attempt=1, schedule=SCHEDULE, now=NOW))
        assert 4.5 <= delay < 5.5


# --- Retry-After -------------------------------------------------------------------------------

RETRY_AFTER = [
    # (id, attempt, header, delay before jitter)
    ("seconds stretch", 1, "120", 120.0),
    ("seconds with spaces", 1, "  120 ", 120.0),
    ("seconds never shorten", 2, "10", 300.0),
    ("zero", 1, "0", 5.0),
    ("equal to the step", 1, "5", 5.0),
    ("cap exactly", 1, "3600", 3600.0),
    ("seconds capped", 1, "7200", RETRY_AFTER_CAP),
    ("huge seconds capped", 1, "9" * 40, RETRY_AFTER_CAP),
    ("cap never shortens a long step", 4, "99999", 7200.0),
    ("date stretches", 1, _http_date(600), 600.0),
    ("date now", 1, HTTP_NOW, 5.0),
    ("date in the past", 2, _http_date(-600), 300.0),
    ("date capped", 1, _http_date(86400), RETRY_AFTER_CAP),
    ("date with numeric zone", 1, "Wed, 29 May 2024 20:05:27 +0200", 600.0),
    ("obsolete RFC 850 date", 1, "Wednesday, 29-May-24 18:05:27 GMT", 600.0),
    ("date without zone (-0000) ignored", 1, "Wed, 29 May 2024 18:05:27 -0000", 5.0),
    ("garbage ignored", 1, "soon", 5.0),
    ("fraction ignored", 1, "1.5", 5.0),
    ("negative ignored", 1, "-30", 5.0),
    ("empty ignored", 1, "", 5.0),
    ("blank ignored", 1, "   ", 5.0),
    ("absent", 1, None, 5.0),
]  # fmt: skip


@pytest.mark.parametrize(
    ("attempt", "header", "base"), [pytest.param(*row[1:], id=row[0]) for row in RETRY_AFTER]
)
@pytest.mark.parametrize(("rand", "factor"), [(0.5, 1.0), (0.0, 0.9)], ids=["mid", "low"])
def test_retry_after(
    attempt: int, header: str | None, base: float, rand: float, factor: float
) -> None:
    decision = decide(
        status=429, attempt=attempt, schedule=SCHEDULE, now=NOW, retry_after=header,
        rand=lambda: rand,
    )  # fmt: skip
    # Contract: delay = max(step, Retry-After capped at 1 h), with +-10% jitter.
    assert _delay(decision) == pytest.approx(base * factor, rel=1e-12, abs=1e-6)


@pytest.mark.parametrize("status", [503, None, 408])
def test_retry_after_applies_to_every_retryable_outcome(status: int | None) -> None:
    decision = decide(
        status=status, attempt=1, schedule=SCHEDULE, now=NOW, retry_after="60", rand=lambda: 0.5
    )
    assert decision == Decision("pending", NOW + 60.0, "retry")


def test_retry_after_does_not_extend_an_exhausted_schedule() -> None:
    decision = decide(status=429, attempt=5, schedule=SCHEDULE, now=NOW, retry_after="1")
    assert decision == Decision("dead", NOW, "gave up after 5 attempts")


PARSE = [
    ("absent", None, None),
    ("empty", "", None),
    ("seconds", "42", 42.0),
    ("leading zeros", "007", 7.0),
    ("date ahead", _http_date(90), 90.0),
    ("date behind", _http_date(-90), 0.0),
    ("plus sign", "+5", None),
    ("garbage", "Tuesday", None),
    ("unterminated date", "Wed, 29 May", None),
    ("over the cap", "7200", RETRY_AFTER_CAP),
    ("a date beyond the cap", _http_date(90_000), RETRY_AFTER_CAP),
    ("400 digits (a float of infinity)", "9" * 400, RETRY_AFTER_CAP),
    ("5,000 digits (beyond int())", "1" * 5000, RETRY_AFTER_CAP),
    ("leading zeros, many", "0" * 30 + "12", 12.0),
    ("a year no calendar holds", "Mon, 01 Jan 99999999999 00:00:00 GMT", None),
]


@pytest.mark.parametrize(
    ("header", "seconds"), [pytest.param(*row[1:], id=row[0]) for row in PARSE]
)
def test_parse_retry_after(header: str | None, seconds: float | None) -> None:
    assert parse_retry_after(header, NOW) == seconds


@pytest.mark.parametrize(
    "header", ["²", "٣٠٠", "１２０"], ids=["superscript", "arabic", "fullwidth"]
)
def test_retry_after_non_ascii_digits_ignored(header: str) -> None:
    decision = decide(
        status=503, attempt=1, schedule=SCHEDULE, now=NOW, retry_after=header, rand=lambda: 0.5
    )
    assert decision == Decision("pending", NOW + 5.0, "retry")


# --- is_retryable --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "retryable"),
    [(None, True), (408, True), (425, True), (429, True), (500, True), (599, True),
     (200, False), (301, False), (400, False), (404, False), (409, False), (499, False),
     (600, False), (426, False), (407, False)],
)  # fmt: skip
def test_is_retryable(status: int | None, retryable: bool) -> None:
    assert is_retryable(status) is retryable


@pytest.mark.parametrize(
    ("status", "retry_statuses", "state"),
    [
        (401, {401, 404}, "pending"),
        (404, {401, 404}, "pending"),
        (403, {401, 404}, "dead"),
        (301, {301}, "pending"),
        (401, set(), "dead"),
        (200, {401}, "delivered"),
        (503, {401}, "pending"),
    ],
)
def test_retry_statuses_turn_a_permanent_answer_into_a_retry(
    status: int, retry_statuses: set[int], state: str
) -> None:
    decision = decide(
        status=status,
        attempt=1,
        schedule=SCHEDULE,
        now=NOW,
        rand=lambda: 0.5,
        retry_statuses=retry_statuses,
    )
    assert decision.state == state
    if state == "pending":
        assert decision.next_at == NOW + SCHEDULE[1]


def test_retry_statuses_still_end_with_the_schedule() -> None:
    decision = decide(
        status=401, attempt=len(SCHEDULE), schedule=SCHEDULE, now=NOW, retry_statuses={401}
    )
    assert decision.state == "dead"
