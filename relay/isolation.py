"""A store error caused by one item affects that item alone, never its batch.

Feed frames are committed in groups and delivery verdicts are recorded in groups; a value the
store refuses (one the input boundary should have stopped, or one no boundary foresaw) would
otherwise fail the whole group, again on every retry: a lost batch, a dead recorder, a stalled
relay. :func:`write_isolating` splits a refused group in halves until the refused items stand
alone, writes everything else, and hands each refused item to the caller, who quarantines or
marks it. It is store-agnostic: it sits above the :class:`~relay.store.base.Store` Protocol.

``StoreUnavailableError`` is not a refusal: the store is down, and the caller waits for it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from relay.errors import StoreUnavailableError

__all__ = ["write_isolating"]

T = TypeVar("T")
R = TypeVar("R")


async def write_isolating(
    items: Sequence[T],
    write: Callable[[Sequence[T]], Awaitable[R]],
    refused: Callable[[T, Exception], Awaitable[None]],
) -> list[R]:
    """``write(items)``; if the store refuses it, write each half the same way.

    Returns the results of the writes that succeeded, in item order; ``refused`` is awaited
    once per item the store refused on its own. Items keep their order (a half is written
    only after the one before it). ``StoreUnavailableError`` and anything that is not an
    ``Exception`` (cancellation) propagate.
    """
    if not items:
        return []
    try:
        return [await write(items)]
    except StoreUnavailableError:
        raise
    except Exception as exc:  # a data error: whose, bisection finds out
        if len(items) == 1:
            await refused(items[0], exc)
            return []
    middle = len(items) // 2
    first = await write_isolating(items[:middle], write, refused)
    return first + await write_isolating(items[middle:], write, refused)
