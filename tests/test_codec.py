"""Canonical JSON (event ids) is the standard library's, byte for byte, whoever writes it."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.codec import canonical_json


def stdlib(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def test_every_code_point_is_written_as_the_standard_library_writes_it() -> None:
    chars = (chr(cp) for cp in range(0x110000) if not 0xD800 <= cp <= 0xDFFF)
    text = "".join(chars)
    assert canonical_json([text, {text: 1}]) == stdlib([text, {text: 1}])
    for cp in range(0x110000):
        if not 0xD800 <= cp <= 0xDFFF:
            assert canonical_json(chr(cp)) == stdlib(chr(cp)), hex(cp)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=400, deadline=None)
@given(json_values)
def test_any_json_value_is_canonicalised_as_the_standard_library_does(value: Any) -> None:
    """Keys sorted by code point (astral ones too), integers beyond 64 bits, floats."""
    assert canonical_json(value) == stdlib(value)


def test_what_orjson_refuses_or_writes_differently_goes_to_the_standard_library() -> None:
    for value in (2**64, -(2**63) - 1, {"t": 1e16}, [0.1, 5e-324]):
        assert canonical_json(value) == stdlib(value)
    for unencodable in ("\ud800", {"\ud800": 1}):  # as before: no id for a lone surrogate
        with pytest.raises(UnicodeEncodeError):
            stdlib(unencodable)
        with pytest.raises(UnicodeEncodeError):
            canonical_json(unencodable)
