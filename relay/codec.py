"""JSON exactly as the contract wants it: integers exact, compact, or canonical for ids.

Frames are parsed with the standard library: ``orjson`` would silently turn a 20-digit
integer into a float. Serialising uses ``orjson`` where its bytes are provably the standard
library's (it is several times faster) and the standard library for the rest.
"""

from __future__ import annotations

import json
import math
from typing import Any

import orjson

__all__ = ["canonical_json", "compact_json", "loads"]


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-JSON number {name}")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError("number out of range")
    return value


def loads(data: str | bytes) -> Any:
    """Parse JSON exactly: integers of any size stay ints; NaN, Infinity and numbers that
    overflow a float (``1e400``) are rejected rather than silently changed."""
    return json.loads(data, parse_constant=_reject_constant, parse_float=_finite_float)


def compact_json(obj: Any) -> bytes:
    """Compact UTF-8 JSON, keys in their current order."""
    try:
        # A copy: orjson's result keeps the 4 KiB block it was written into, and a batch of
        # a thousand events held that way left the heap ~8 MB bigger (bench: RSS).
        return bytes(memoryview(orjson.dumps(obj)))
    except TypeError:  # an integer beyond 64 bits: the standard library keeps it exact
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _has_float(obj: Any) -> bool:
    if isinstance(obj, float):
        return True
    if isinstance(obj, dict):
        return any(_has_float(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return any(_has_float(v) for v in obj)
    return False


def canonical_json(obj: Any) -> bytes:
    """Sorted keys, no spaces, UTF-8, integers exact: the input of every event id.

    Byte for byte ``json.dumps(obj, sort_keys=True, separators=(",", ":"),
    ensure_ascii=False).encode()``, so anyone can recompute an id with the standard library.
    orjson (twice as fast; it runs twice per event) writes the same bytes for every code
    point, for integers within 64 bits and for keys sorted by UTF-8 bytes, which is code point
    order (tests/test_codec.py checks all three). Floats it writes differently (``1e+16``):
    a document with one, and what orjson refuses (wider integers, a lone surrogate), goes to
    the standard library.
    """
    if not _has_float(obj):
        try:
            return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)
        except TypeError:
            pass
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
