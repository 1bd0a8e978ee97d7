"""JSON exactly as the contract wants it: integers exact, compact, or canonical for ids.

Frames are parsed with the standard library: ``orjson`` would silently turn a 20-digit
integer into a float. Serialising uses ``orjson`` where it can (it is several times faster)
and falls back to the standard library for integers beyond 64 bits.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

__all__ = ["canonical_json", "compact_json", "loads"]


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-JSON number {name}")


def loads(data: str | bytes) -> Any:
    """Parse JSON exactly: integers of any size stay ints; NaN/Infinity are rejected."""
    return json.loads(data, parse_constant=_reject_constant)


def compact_json(obj: Any) -> bytes:
    """Compact UTF-8 JSON, keys in their current order."""
    try:
        return orjson.dumps(obj)
    except TypeError:  # an integer beyond 64 bits: the standard library keeps it exact
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def canonical_json(obj: Any) -> bytes:
    """Sorted keys, no spaces, UTF-8, integers exact: the input of every event id."""
    try:
        return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)
    except TypeError:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
