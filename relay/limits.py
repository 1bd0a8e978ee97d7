"""File descriptors: raise the limit, keep admin clients to their share, survive running out.

Every connection costs a descriptor: admin clients, deliveries, the feed, the store. Idle admin
connections once took all 1,024 of a default limit, and deliveries then failed with "Too many
open files", each failure using an attempt. So (CONTRACT.md section 6): the soft limit is
raised to the hard one at start-up; the admin port holds at most :func:`admin_connection_cap`
connections, a quarter of the limit and never more than 256, so the rest stays for the relay's
own work; and a delivery that could not even open its socket is released without using an
attempt (:func:`out_of_descriptors` tells). Messages about running out are logged through a
:class:`Throttle`: at a bounded rate, with a count of the ones held back.
"""

from __future__ import annotations

import errno
import logging
import resource
import time
from collections.abc import Callable

__all__ = [
    "ADMIN_MAX_CONNECTIONS",
    "Throttle",
    "admin_connection_cap",
    "nofile_limit",
    "out_of_descriptors",
    "raise_nofile_limit",
]

log = logging.getLogger("relay.limits")

ADMIN_MAX_CONNECTIONS = 256
_OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE)


def nofile_limit() -> int:
    """The soft limit on open descriptors (a large number when unlimited)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def raise_nofile_limit() -> int:
    """Raise the soft descriptor limit to the hard one; return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:  # e.g. a hard limit above the kernel's nr_open
            log.warning(
                "cannot raise the file descriptor limit: %s",
                exc,
                extra={"event": "limits.nofile_unchanged", "soft": soft, "hard": hard},
            )
    limit = nofile_limit()
    log.debug("file descriptor limit %d", limit, extra={"event": "limits.nofile", "soft": limit})
    return limit


def admin_connection_cap(limit: int) -> int:
    """How many connections the admin port may hold with ``limit`` descriptors in all."""
    return max(4, min(ADMIN_MAX_CONNECTIONS, limit // 4))


def out_of_descriptors(exc: BaseException) -> bool:
    """True if ``exc`` (or what caused it) is the process or system running out of descriptors.

    Client libraries wrap the ``OSError`` (aiohttp's ``ClientConnectorError``, httpx's
    ``ConnectError``), so the whole cause chain is searched.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _OUT_OF_DESCRIPTORS:
            return True
        wrapped = getattr(current, "os_error", None)  # aiohttp keeps it here, not as a cause
        if isinstance(wrapped, OSError) and wrapped.errno in _OUT_OF_DESCRIPTORS:
            return True
        current = current.__cause__ or current.__context__
    return False


class Throttle:
    """Lets one message through per ``every`` seconds and counts the ones held back."""

    def __init__(self, every: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.every = every
        self._clock = clock
        self._last: float | None = None
        self.suppressed = 0

    def allow(self) -> int | None:
        """The number held back since the last one let through, or None to hold this back."""
        now = self._clock()
        if self._last is not None and now - self._last < self.every:
            self.suppressed += 1
            return None
        self._last = now
        held, self.suppressed = self.suppressed, 0
        return held
