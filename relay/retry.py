"""The retry policy, pure: an attempt's outcome -> delivered, retry at a time, or dead.

2xx is success. Timeouts, connection errors, 408, 425, 429 and 5xx are retried on the
endpoint's schedule: the delay before attempt *n* is ``schedule[n-1]``, so the schedule's
length is the attempt limit. A ``Retry-After`` (seconds or HTTP date, capped at one hour)
stretches the delay, never shortens it; +-10% jitter spreads retries of an outage's backlog.
Any other 3xx/4xx is permanent: a receiver that rejects the request will reject it again -
unless the endpoint lists it in ``retry_statuses`` (a receiver that answers 401 or 404 while
it deploys or rotates its secret), in which case it is retried like a 5xx. A failure the
sender marks permanent (a message larger than a broker accepts) is permanent too.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Collection, Sequence
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


def is_retryable(
    status: int | None, retry_statuses: Collection[int] = (), *, permanent: bool = False
) -> bool:
    """None (no response: timeout, connection error), 408/425/429/5xx and the endpoint's own
    ``retry_statuses`` are worth retrying - unless the sender marked the failure
    ``permanent`` (a message a broker refuses as too large): such a failure is not the
    endpoint's fault either, so health counts it as none."""
    if permanent:
        return False
    return (
        status is None or status in _RETRYABLE or 500 <= status <= 599 or status in retry_statuses
    )


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (at most :data:`RETRY_AFTER_CAP`), or
    None when absent or unreadable.

    The one parser for every ``Retry-After`` the relay obeys (endpoints and sFOX's REST API):
    a value of 400 digits is a float of infinity, and a reconciler that slept on it held the
    reconcile lock forever.
    """
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        digits = value.lstrip("0") or "0"
        # More digits than the cap has mean more than the cap (and float() says inf).
        seconds = float(digits) if len(digits) <= 10 else RETRY_AFTER_CAP
    else:
        try:
            when = parsedate_to_datetime(value)
            seconds = when.timestamp() - now if when.tzinfo is not None else math.nan
        except (TypeError, ValueError, OverflowError):  # e.g. a year no calendar holds
            return None
    if not math.isfinite(seconds):
        return None
    return min(max(0.0, seconds), RETRY_AFTER_CAP)


def decide(
    *,
    status: int | None,
    attempt: int,
    schedule: Sequence[float],
    now: float,
    retry_after: str | None = None,
    rand: Callable[[], float] = random.random,
    retry_statuses: Collection[int] = (),
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
    if not is_retryable(status, retry_statuses):
        return Decision("dead", now, f"permanent: HTTP {status}")
    if attempt >= len(schedule):
        return Decision("dead", now, f"gave up after {attempt} attempts")
    delay = schedule[attempt]
    wait = parse_retry_after(retry_after, now)
    if wait is not None:
        delay = max(delay, wait)
    delay *= 0.9 + 0.2 * rand()
    return Decision("pending", now + delay, "retry")
