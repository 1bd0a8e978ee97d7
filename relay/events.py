"""Pure event logic: feed frame -> typed message -> stored event, and event ids.

Nothing here does I/O; JSON goes through :mod:`relay.codec` so integers stay exact.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeGuard

from relay import tokens
from relay.codec import canonical_json, compact_json, loads
from relay.masking import mask_long_hex

__all__ = [
    "KNOWN_FEEDS",
    "MAX_DEPTH",
    "MAX_FIELD_CHARS",
    "MAX_FRAME_BYTES",
    "USERS_FEED",
    "BadFrame",
    "Control",
    "Message",
    "NewEvent",
    "Source",
    "event_id",
    "parse_frame",
    "prepare",
    "reconcile_event",
    "reconcile_event_id",
    "redact",
    "routes",
    "stored_excerpt",
    "user_problem",
    "without_controls",
]

USERS_FEED = "private.enterprise.users"
#: The enterprise feeds sFOX documents; all share one envelope.
KNOWN_FEEDS = frozenset(
    {
        USERS_FEED,
        f"{USERS_FEED}.balances",
        f"{USERS_FEED}.open-orders",
        f"{USERS_FEED}.trades",
    }
)
Source = Literal["feed", "reconcile", "relay"]  # relay: operational events (alerts)

#: Keys whose values are credentials wherever they appear in a frame.
_SECRET_KEYS = frozenset({"user_token", "token", "apiKey", "api_key", "apikey"})
_REDACTED = "[redacted]"
_MAX_BAD_FRAME = 64 * 1024

# -- the input boundary (CONTRACT.md section 5, "Bad input never stops the relay") --------
# Whatever enters the store passes these checks first, so that no store, index, hash or
# recursion limit downstream ever meets a value it cannot take: feed frames here in
# :func:`parse_frame`, REST users through :func:`user_problem`, endpoint responses through
# :func:`stored_excerpt`.

#: A frame larger than this (UTF-8 bytes) is a bad frame.
MAX_FRAME_BYTES = 1024 * 1024
#: ``user_id``, ``status`` and ``recipient`` longer than this (code points) are refused: they
#: are indexed columns, and PostgreSQL refuses index rows over ~2.7 kB.
MAX_FIELD_CHARS = 256
#: JSON nested deeper than this (the message object is level 1) is refused: hashing and
#: serialising recurse, and Python's recursion limit is ~1,000 frames.
MAX_DEPTH = 64
#: What a stored response excerpt is cut to (UTF-8 bytes).
EXCERPT_BYTES = 1024

#: Unicode category Cc: C0 controls, DEL and C1 controls (NUL included).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
_SPACES = str.maketrans({"\t": " ", "\n": " ", "\r": " "})


def without_controls(text: str) -> str:
    """``text`` with no control character: tab and line breaks become spaces (they separate
    words), every other one U+FFFD. PostgreSQL refuses NUL in text, and a terminal or log
    viewer that prints a stored value must not be driven by it."""
    if not _CONTROL.search(text):
        return text
    return _CONTROL.sub("\ufffd", text.translate(_SPACES))


def _text_problem(name: str, value: str) -> str | None:
    if len(value) <= MAX_FIELD_CHARS and value.isprintable():  # the common case, in C
        return None
    if len(value) > MAX_FIELD_CHARS:
        return f"{name} longer than {MAX_FIELD_CHARS} characters"
    if _CONTROL.search(value):
        return f"{name} holds a control character"
    return None


def _deeper_than(obj: Any, limit: int) -> bool:
    """Whether ``obj`` nests more than ``limit`` levels (``obj`` itself is level 1).

    Iterative, so it cannot itself hit the recursion limit it guards against.
    """
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        value, level = stack.pop()
        if isinstance(value, dict):
            children: Iterable[Any] = value.values()
        elif isinstance(value, list):
            children = value
        else:
            continue
        if level > limit:
            return True
        stack.extend((child, level + 1) for child in children)
    return False


def _may_nest_deeper(data: str | bytes, limit: int) -> bool:
    """Cheap pre-check: fewer opening brackets than ``limit`` cannot nest deeper than it."""
    if isinstance(data, bytes):
        return data.count(b"{") + data.count(b"[") > limit
    return data.count("{") + data.count("[") > limit


def _frame_bytes(data: str | bytes) -> int:
    if isinstance(data, bytes) or len(data) * 4 <= MAX_FRAME_BYTES:
        return len(data)  # (a str this short cannot be over the limit in UTF-8)
    return len(data.encode("utf-8", "surrogatepass"))


def _payload_problem(payload: Mapping[str, Any]) -> str | None:
    """Why a users-feed payload cannot be stored (its fields; depth and encoding aside)."""
    user_id = payload.get("user_id")
    status = payload.get("status")
    if not isinstance(user_id, str) or not user_id:
        return "payload.user_id missing or not a string"
    problem = _text_problem("payload.user_id", user_id)
    if problem:
        return problem
    if status is not None:
        if not isinstance(status, str):
            return "payload.status not a string"
        problem = _text_problem("payload.status", status)
        if problem:
            return problem
    if "requirements" in payload and not isinstance(payload["requirements"], dict):
        return "payload.requirements not an object"
    token = payload.get("user_token")
    if token is not None and not isinstance(token, dict):
        return "payload.user_token not an object"
    return None


def user_problem(user: object) -> str | None:
    """Why a REST user cannot be stored, or None: the feed's rule for the message it becomes.

    A reconciled event's body holds the user as its payload, so the user is nesting level 2.
    """
    if not isinstance(user, dict):
        return "not a JSON object"
    problem = _payload_problem(user)
    if problem:
        return problem
    if _deeper_than(user, MAX_DEPTH - 1):
        return f"nested deeper than {MAX_DEPTH} levels"
    try:
        compact_json(user)
    except (TypeError, ValueError, UnicodeEncodeError):  # e.g. a lone surrogate "\ud800"
        return "not JSON: unencodable string"
    return None


def stored_excerpt(text: str | None, redact: Callable[[str], str]) -> str | None:
    """What is stored of a response body: redacted first (a secret cut in two would escape
    the redactor), then without control characters, then cut to :data:`EXCERPT_BYTES` of
    UTF-8 (never in the middle of a character)."""
    if not text:
        return None
    clean = without_controls(redact(text))
    return clean.encode()[:EXCERPT_BYTES].decode("utf-8", "ignore") or None


@dataclass(frozen=True, slots=True)
class Message:
    """A data message from the feed: parsed, validated, otherwise untouched."""

    raw: dict[str, Any]
    sequence: int | None
    recipient: str
    timestamp: int
    user_id: str | None
    status: str | None


@dataclass(frozen=True, slots=True)
class Control:
    """A reply to one of our requests: ``success`` or ``error``."""

    type: str
    action: str | None
    message: str | None
    raw: dict[str, Any]


@dataclass(frozen=True, slots=True)
class BadFrame:
    """A frame that is not a valid message: kept (redacted) for inspection, then skipped."""

    reason: str
    text: str


def _is_int(value: object) -> TypeGuard[int]:
    """An integer, and not a bool (which Python counts as one)."""
    return isinstance(value, int) and not isinstance(value, bool)


def parse_frame(data: str | bytes) -> Message | Control | BadFrame:
    """Classify one WebSocket frame, at the input boundary. Never raises."""
    size = _frame_bytes(data)
    if size > MAX_FRAME_BYTES:
        reason = f"frame of {size:,} bytes, over the {MAX_FRAME_BYTES:,}-byte limit"
        return BadFrame(reason, redact(data[: 4 * _MAX_BAD_FRAME]))  # its head, by pattern
    try:
        obj = loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        return BadFrame(f"not JSON: {type(exc).__name__}", redact(data))
    if not isinstance(obj, dict):
        return BadFrame(f"not a JSON object: {type(obj).__name__}", redact(data))
    if _may_nest_deeper(data, MAX_DEPTH) and _deeper_than(obj, MAX_DEPTH):
        return BadFrame(f"nested deeper than {MAX_DEPTH} levels", redact(data))
    try:
        compact_json(obj)
    except (TypeError, ValueError, UnicodeEncodeError):  # e.g. a lone surrogate "\ud800"
        return BadFrame("not JSON: unencodable string", redact(data))
    kind = obj.get("type")
    if kind in ("success", "error") and "recipient" not in obj:
        return _control(obj)
    return _message(obj, data)


def _control(obj: dict[str, Any]) -> Control:
    payload = obj.get("payload")
    payload = payload if isinstance(payload, dict) else {}
    action = obj.get("action", payload.get("action"))
    text = obj.get("message", payload.get("message"))
    return Control(
        type=str(obj["type"]),
        action=action if isinstance(action, str) else None,
        message=text if isinstance(text, str) else None,
        raw=obj,
    )


def _message(obj: dict[str, Any], data: str | bytes) -> Message | BadFrame:
    def bad(reason: str) -> BadFrame:
        return BadFrame(reason, redact(data))

    recipient = obj.get("recipient")
    payload = obj.get("payload")
    timestamp = obj.get("timestamp")
    sequence = obj.get("sequence")
    if not isinstance(recipient, str) or not recipient:
        return bad("recipient missing or not a string")
    problem = None if recipient in KNOWN_FEEDS else _text_problem("recipient", recipient)
    if problem:
        return bad(problem)
    if not isinstance(payload, dict):
        return bad("payload missing or not an object")
    if not _is_int(timestamp):
        return bad("timestamp missing or not an integer")
    if sequence is not None and not _is_int(sequence):
        return bad("sequence not an integer")
    user_id: str | None = None
    status: str | None = None
    if recipient == USERS_FEED:
        problem = _payload_problem(payload)  # depth and encoding: checked above
        if problem:
            return bad(problem)
        user_id = payload["user_id"]
        status = payload.get("status")
    return Message(obj, sequence, recipient, timestamp, user_id, status)


def _redact_value(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: (_REDACTED if k in _SECRET_KEYS else _redact_value(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact_value(v) for v in value]
    if isinstance(value, str):
        return mask_long_hex(value, _REDACTED)
    return value


_TOKEN_TEXT = re.compile(
    r'("(?:user_token|token|apiKey|api_key|apikey)"\s*:\s*)'
    r'("(?:[^"\\]|\\.)*"?|\{[^{}]*\}?|[^,}\]\s]+)',
)


def redact(data: str | bytes | Mapping[str, Any]) -> str:
    """Text of a frame with every credential removed, bounded in size.

    Parsed JSON is redacted structurally; anything else by pattern (quoted token values and
    long hex strings, which is what sFOX user tokens look like).
    """
    if isinstance(data, Mapping):
        return _redact_parsed(data) or _redact_text(compact_json(dict(data)).decode())
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    try:
        parsed = loads(text)
    except (ValueError, RecursionError):
        return _redact_text(text)
    return _redact_parsed(parsed) or _redact_text(text)


def _redact_parsed(obj: Any) -> str | None:
    """Structural redaction, or None for what is too deep to walk safely (then by pattern).

    JSON escapes C0 controls; DEL and C1 ones it leaves, so they are replaced here.
    """
    if _deeper_than(obj, MAX_DEPTH):
        return None
    try:
        return without_controls(compact_json(_redact_value(obj)).decode()[:_MAX_BAD_FRAME])
    except (TypeError, ValueError, UnicodeEncodeError):  # a lone surrogate
        return None


def _redact_text(text: str) -> str:
    text = _TOKEN_TEXT.sub(lambda m: f'{m.group(1)}"{_REDACTED}"', text[: 4 * _MAX_BAD_FRAME])
    return without_controls(mask_long_hex(text, _REDACTED))[:_MAX_BAD_FRAME]


def event_id(message: Mapping[str, Any]) -> str:
    """``evt_`` + SHA-256 of the canonical recipient, timestamp and token-less payload.

    Never the sequence: one message seen twice is one event; PENDING then VERIFIED with equal
    sequence and timestamp are two.
    """
    payload = {k: v for k, v in message["payload"].items() if k != "user_token"}
    basis = {
        "recipient": message["recipient"],
        "timestamp": message["timestamp"],
        "payload": payload,
    }
    return "evt_" + hashlib.sha256(canonical_json(basis)).hexdigest()


def reconcile_event_id(user_id: str, status: Any, requirements: Any, after: str | None) -> str:
    """Id of a reconciled change: the same change after the same state is one event."""
    basis = {"user_id": user_id, "status": status, "requirements": requirements, "after": after}
    return "evt_" + hashlib.sha256(canonical_json(basis)).hexdigest()


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event ready to store: its body holds no plaintext token."""

    event_id: str
    source: Source
    recipient: str
    user_id: str | None
    status: str | None
    requirements: str | None  # canonical JSON, for reconciliation's comparison
    body: bytes
    has_token: bool
    #: For reconciled events: the event id of the user state this one replaces. The store
    #: appends the event only while that is still the user's state (no double emission).
    after: str | None = None


def _requirements(payload: Mapping[str, Any]) -> str | None:
    req = payload.get("requirements")
    return canonical_json(req).decode() if req is not None else None


def prepare(message: Message, *, seal_key: bytes | None) -> NewEvent:
    """Turn a feed message into the stored form.

    The user token is sealed under ``seal_key`` (``RELAY_TOKEN_KEY``) when some endpoint needs
    it, else stripped: it never reaches the store in plaintext.
    """
    raw = message.raw
    payload = raw["payload"]
    has_token = False
    if "user_token" in payload:
        body_payload = dict(payload)
        if seal_key is None:
            del body_payload["user_token"]
        else:
            body_payload["user_token"] = tokens.seal(payload["user_token"], seal_key)
            has_token = True
        stored = dict(raw)
        stored["payload"] = body_payload
    else:
        stored = raw
    return NewEvent(
        event_id=event_id(raw),
        source="feed",
        recipient=message.recipient,
        user_id=message.user_id,
        status=message.status,
        requirements=_requirements(payload) if message.user_id is not None else None,
        body=compact_json(stored),
        has_token=has_token,
    )


def reconcile_event(user: Mapping[str, Any], *, after: str | None, now_ns: int) -> NewEvent:
    """A stored event for a REST user whose state differs from what the store last saw."""
    user_id = str(user["user_id"])
    requirements = user.get("requirements")
    payload = {
        k: v for k, v in user.items() if k != "user_token"
    }  # REST has none; never forward one
    body = {"sequence": None, "recipient": USERS_FEED, "timestamp": now_ns, "payload": payload}
    status = user.get("status")
    return NewEvent(
        event_id=reconcile_event_id(user_id, status, requirements, after),
        source="reconcile",
        recipient=USERS_FEED,
        user_id=user_id,
        status=status if isinstance(status, str) else None,
        requirements=canonical_json(requirements).decode() if requirements is not None else None,
        body=compact_json(body),
        has_token=False,
        after=after,
    )


class Route(Protocol):
    """What routing needs to know of an endpoint (``config.EndpointConfig`` satisfies it)."""

    @property
    def name(self) -> str: ...
    @property
    def feeds(self) -> frozenset[str] | None: ...
    @property
    def statuses(self) -> frozenset[str] | None: ...


def routes(endpoints: Iterable[Route], event: NewEvent) -> list[str]:
    """Names of the endpoints whose ``feeds`` and ``statuses`` filters admit this event."""
    return [
        ep.name
        for ep in endpoints
        if (ep.feeds is None or event.recipient in ep.feeds)
        and (ep.statuses is None or event.status in ep.statuses)
    ]
