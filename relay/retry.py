"""The retry policy, pure: an attempt's outcome -> delivered, retry at a time, or dead.

2xx is success. Timeouts, connection errors, 408, 425, 429 and 5xx are retried on the
endpoint's schedule: the delay before attempt *n* is ``schedule[n-1]``, so the schedule's
length is the attempt limit. A ``Retry-After`` (seconds or HTTP date, capped at one hour)
stretches the delay, never shortens it; +-10% jitter spreads retries of an outage's backlog.
Any other 3xx/4xx is permanent: a receiver that rejects the request will reject it again, as
is a failure the sender marks permanent (a message larger than a broker accepts).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Literal

__all__ = ["RETRY_AFTER_CAP", "Decision", "decide", "is_retryable", "parse_retry_after"]

RETRY_AFTER_CAP = 3600.0
_RETRYABLE = frozenset({408, 425, 429})


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do with a delivery after one attempt."""

    state: Literal["delivered", "pending", "dead"]
    next_at: float
    reason: str


def is_retryable(status: int | None, permanent: bool = False) -> bool:
    """None (no response: timeout, connection error) and 408/425/429/5xx are worth retrying,
    unless the sender marked the failure ``permanent`` (a message a broker refuses as too
    large): such a failure is not the endpoint's fault either, so health counts it as none."""
    if permanent:
        return False
    return status is None or status in _RETRYABLE or 500 <= status <= 599


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header, or None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, OverflowError):  # e.g. a year no calendar holds
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - now)


def decide(
    *,
    status: int | None,
    attempt: int,
    schedule: Sequence[float],
    now: float,
    retry_after: str | None = None,
    rand: Callable[[], float] = random.random,
    permanent: bool = False,
) -> Decision:
    """The verdict on attempt number ``attempt`` (1-based) that ended with ``status``.

    ``status`` is None when no response arrived. ``rand`` returns a float in [0, 1).
    ``permanent`` is the sender's word that retrying cannot help, whatever the status.
    """
    if status is not None and 200 <= status <= 299:
        return Decision("delivered", now, "success")
    if permanent:
        return Decision("dead", now, "permanent: refused by the destination")
    if not is_retryable(status):
        return Decision("dead", now, f"permanent: HTTP {status}")
    if attempt >= len(schedule):
        return Decision("dead", now, f"gave up after {attempt} attempts")
    delay = schedule[attempt]
    wait = parse_retry_after(retry_after, now)
    if wait is not None:
        delay = max(delay, min(wait, RETRY_AFTER_CAP))
    delay *= 0.9 + 0.2 * rand()
    return Decision("pending", now + delay, "retry")
