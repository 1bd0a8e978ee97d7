"""Payload field allowlists (CONTRACT.md 4c): what one endpoint is allowed to see.

Pure: an endpoint's ``fields`` (payload keys, dotted for nested ones) become a
:data:`FieldTree` once, at configuration time (:func:`parse`), and :func:`select` applies it to
each payload at delivery. Selection is an allowlist, so a key sFOX adds tomorrow (an address, a
birth date) reaches no endpoint that did not ask for it.

What is sent is exactly the listed paths that exist in the event, with the objects needed to
hold them, in the order received. A listed key whose value is not an object cannot hold a
listed nested key, so the nested key is simply absent. ``user_token`` is not the allowlist's
business: the token policy alone decides it (:mod:`relay.tokens`), so :func:`select` keeps it
wherever it sits at the top of the payload.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["FieldTree", "compiled", "parse", "select"]

#: A key mapped to ``None`` is kept whole; to a tree, only those of its own keys are kept.
FieldTree = Mapping[str, "FieldTree | None"]

_TOKEN = "user_token"


def parse(paths: Iterable[str]) -> FieldTree:
    """The tree of ``paths`` (``["status", "requirements.sms"]``); ValueError with a reason.

    Listing a key and one of its nested keys keeps the whole key, whichever comes first.
    """
    tree: dict[str, Any] = {}
    count = 0
    for path in paths:
        count += 1
        parts = path.split(".")
        if not all(parts):
            raise ValueError(f"field {count}: an empty key in a dotted path")
        if parts[0] == _TOKEN:
            raise ValueError(
                f"field {count}: user_token follows the endpoint's user_token policy; "
                "leave it out of fields"
            )
        node = tree
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            if part in node and node[part] is None:
                break  # an ancestor (or this key) is already kept whole
            if last:
                node[part] = None
            else:
                node = node.setdefault(part, {})
    if count == 0:
        raise ValueError("empty: list at least one payload key (leave fields out for all)")
    return tree


@functools.lru_cache(maxsize=256)
def compiled(paths: tuple[str, ...]) -> FieldTree:
    """:func:`parse`, once per distinct list: the dispatcher asks for it on every delivery."""
    return parse(paths)


def select(payload: Mapping[str, Any], tree: FieldTree) -> dict[str, Any]:
    """The payload keys ``tree`` allows (and ``user_token``), in the order received."""
    kept: dict[str, Any] = {}
    for key, value in payload.items():
        if key == _TOKEN:
            kept[key] = value
        elif key in tree:
            nested = _select(value, tree[key])
            if nested is not _ABSENT:
                kept[key] = nested
    return kept


_ABSENT: Any = object()


def _select(value: Any, tree: FieldTree | None) -> Any:
    if tree is None:
        return value
    if not isinstance(value, dict):
        return _ABSENT
    kept: dict[str, Any] = {}
    for key, item in value.items():
        if key in tree:
            nested = _select(item, tree[key])
            if nested is not _ABSENT:
                kept[key] = nested
    return kept if kept else _ABSENT
