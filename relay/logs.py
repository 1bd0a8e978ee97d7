"""Structured logs (one JSON object per line, or console text) with redaction in front.

Redaction masks secrets, never words. Structurally first: a field whose name says it holds a
secret (``api_key``, ``token``, ``authorization``...) is masked wherever it is printed, URLs
have their credentials masked (:func:`relay.masking.mask_url`), and values shaped like a user
token, a JWT or a bearer credential are masked. Then, as a safety net over the fully formatted
line (message, fields, exception text and reprs), every configured secret of 12 or more
characters is masked wherever it appears. A shorter secret (a header value such as
``production``) is only masked structurally, so it cannot blank that word out of every line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, TextIO

import orjson

from relay.masking import MASK, mask_long_hex, mask_url

__all__ = ["ConsoleFormatter", "JsonFormatter", "Redactor", "setup_logging"]

_MASK = MASK
#: The shortest configured secret the substring safety net masks (shorter ones are words).
MIN_SECRET_LENGTH = 12
#: Field names (any case, also nested in dicts) whose value is a secret however short.
_SECRET_FIELDS = frozenset(
    {
        "api_key",
        "apikey",
        "token",
        "user_token",
        "admin_token",
        "token_key",
        "secret",
        "signing_secret",
        "password",
        "authorization",
    }
)
#: Standard LogRecord attributes; anything else on a record is a structured field.
_RESERVED = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
    "color_message",  # uvicorn's ANSI-coloured twin of msg
}
# sFOX user tokens (long hex; event ids, evt_ + hex, are not secrets): mask_long_hex.
# JWT-shaped bearer tokens, and Authorization header values; each scanned for only when a
# cheap substring test says it may be there (every log line pays for these).
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}")
_BEARER = re.compile(r"(?i)(?:(?<=bearer )|(?<=basic ))[A-Za-z0-9._~+/=-]{8,}")
#: A URL with user info or a query (the parts mask_url may mask), up to a delimiter.
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s\"'<>\\]*[@?][^\s\"'<>\\]*")


class Redactor:
    """Replaces known secrets and secret-shaped strings in text."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets: list[str] = []
        self.add(secrets)

    def add(self, secrets: Iterable[str]) -> None:
        """Register more secret values; the substring net ignores those shorter than
        :data:`MIN_SECRET_LENGTH` (they are masked only where a field holds them)."""
        known = set(self._secrets)
        for secret in secrets:
            if secret and len(secret) >= MIN_SECRET_LENGTH:
                known.add(secret)
                known.add(orjson.dumps(secret).decode()[1:-1])  # as it appears inside JSON
        # Longest first, so a secret containing another is masked whole.
        self._secrets = sorted(known, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, _MASK)
        text = mask_long_hex(text)
        if "eyJ" in text:
            text = _JWT.sub(_MASK, text)
        lowered = text.lower()
        if "bearer " in lowered or "basic " in lowered:  # websockets' DEBUG log prints headers
            text = _BEARER.sub(_MASK, text)
        if "://" in text:
            text = _URL.sub(lambda m: mask_url(m[0], strict=True), text)
        return text


def _masked(key: str, value: Any) -> Any:
    """``value`` with whatever a secret-named field holds masked, at any depth."""
    if key.lower() in _SECRET_FIELDS:
        return _MASK
    if isinstance(value, dict):
        return {k: _masked(str(k), v) for k, v in value.items()}
    return value


#: Field name -> whether it names a secret; names come from the code, so this stays small.
_SECRET_NAMES: dict[str, bool] = {}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for k, v in record.__dict__.items():
        if v is None or k in _RESERVED:
            continue
        secret = _SECRET_NAMES.get(k)
        if secret is None:
            secret = k.lower() in _SECRET_FIELDS
            if len(_SECRET_NAMES) < 4096:
                _SECRET_NAMES[k] = secret
        fields[k] = _MASK if secret else _masked(k, v) if isinstance(v, dict) else v
    return fields


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, the record's fields, exc."""

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self._redact = redactor
        self._second = -1
        self._prefix = ""

    def _timestamp(self, created: float) -> str:
        """ISO 8601 in UTC to the millisecond; the date and time are formatted once a second."""
        second = int(created)
        if second != self._second:
            self._prefix = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
            self._second = second
        return f"{self._prefix}.{int((created - second) * 1000):03d}+00:00"

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": self._timestamp(record.created),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        line.update(_fields(record))
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        try:
            text = orjson.dumps(line, default=str, option=orjson.OPT_NON_STR_KEYS).decode()
        except TypeError:  # an integer beyond 64 bits
            text = json.dumps(line, default=str, ensure_ascii=False)
        return self._redact(text)


class ConsoleFormatter(logging.Formatter):
    """``date time level logger: msg key=value ...`` for people at a terminal (local time;
    the date too, since a terminal's scrollback or a saved log spans days)."""

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self._redact = redactor

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.fromtimestamp(record.created).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
        fields = " ".join(f"{k}={v}" for k, v in _fields(record).items() if k != "event")
        text = f"{when} {record.levelname:<7} {record.name}: {record.getMessage()}"
        if fields:
            text += f"  {fields}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return self._redact(text)


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that writes the event loop's lines together, once per loop iteration.

    Every event logs a line when it is stored and another when it is delivered; written one
    by one, each line was a system call (and a chance for the store's thread to take the GIL
    and keep it for a switch interval) on the event loop's thread. A line logged on the
    loop's thread is queued and written when the callbacks already scheduled have run: within
    the same iteration, in order. Lines from other threads, or with no loop running, are
    written at once (after what is queued). ``flush()`` writes what is queued; logging's
    shutdown at exit calls it, so only a SIGKILL can lose the last iteration's lines.
    """

    _relay = True

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._queued: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + self.terminator
        except Exception:
            self.handleError(record)
            return
        loop = asyncio._get_running_loop()
        with self.lock:  # type: ignore[union-attr]  # set by Handler.__init__
            if loop is None:
                self._write([*self._queued, line])
                self._queued.clear()
                return
            self._queued.append(line)
            if len(self._queued) > 1:
                return
        loop.call_soon(self.flush)

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            queued, self._queued = self._queued, []
            self._write(queued)

    def _write(self, lines: list[str]) -> None:
        try:
            if lines:
                self.stream.write("".join(lines))
            if hasattr(self.stream, "flush"):
                self.stream.flush()
        except Exception:  # a closed or broken stream: as StreamHandler, never the caller's end
            self.handleError(None)

    def handleError(self, record: logging.LogRecord | None) -> None:  # noqa: N802 (stdlib name)
        what = f"log record from {record.name}" if record is not None else "log lines"
        with contextlib.suppress(Exception):
            self.stream.write(
                f'{{"level":"ERROR","logger":"relay.logs","msg":"{what} '
                f'could not be formatted or written and were dropped"}}\n'
            )


def setup_logging(
    level: str, fmt: str, redactor: Redactor, *, stream: TextIO | None = None
) -> logging.Handler:
    """Send every log record to ``stream`` (stderr), redacted, in the chosen format."""
    # The logging HOWTO's optimisations: no line of ours prints the caller, thread or process,
    # and finding the caller walks the stack on every record (every event logs at INFO).
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    handler = _Handler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter(redactor) if fmt == "json" else ConsoleFormatter(redactor))
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_relay", False):
            old.flush()
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for noisy in ("websockets", "aiohttp", "httpx", "httpcore", "uvicorn", "asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    return handler
