"""Structured logs (one JSON object per line, or console text) with redaction in front.

Every record passes through :class:`Redactor` after it is fully formatted (message, fields,
exception text and reprs), so a secret cannot reach the sink by any path: configured secrets
are replaced by ``***``, and anything shaped like a user token or an API key field is replaced
too, since user tokens are not known in advance.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, TextIO

import orjson

__all__ = ["ConsoleFormatter", "JsonFormatter", "Redactor", "setup_logging"]

_MASK = "***"
#: Standard LogRecord attributes; anything else on a record is a structured field.
_RESERVED = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
    "color_message",  # uvicorn's ANSI-coloured twin of msg
}
_PATTERNS = (
    # sFOX user tokens are long hex strings; event ids (evt_ + hex) are not secrets.
    # (A JSON escape such as \n before the token counts as a separator.)
    re.compile(r"(?:(?<=\\[nrt])|(?<![0-9A-Za-z_]))[0-9a-fA-F]{40,}(?![0-9A-Za-z])"),
    # JWT-shaped bearer tokens.
    re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"),
    # Credentials inside URLs.
    re.compile(r"(?<=://)[^/@\s:]+:[^/@\s]+(?=@)"),
    # Authorization headers.
    re.compile(r"(?i)(?<=bearer )[A-Za-z0-9._~+/=-]{8,}"),
)


class Redactor:
    """Replaces known secrets and secret-shaped strings in text."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets: list[str] = []
        self.add(secrets)

    def add(self, secrets: Iterable[str]) -> None:
        """Register more secret values (shorter than 4 characters are ignored)."""
        known = set(self._secrets)
        for secret in secrets:
            if secret and len(secret) >= 4:
                known.add(secret)
                known.add(orjson.dumps(secret).decode()[1:-1])  # as it appears inside JSON
        # Longest first, so a secret containing another is masked whole.
        self._secrets = sorted(known, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, _MASK)
        for pattern in _PATTERNS:
            text = pattern.sub(_MASK, text)
        return text


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _RESERVED and v is not None}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, the record's fields, exc."""

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self._redact = redactor

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
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
    """``time level logger: msg key=value ...`` for people at a terminal."""

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self._redact = redactor

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.fromtimestamp(record.created).strftime("%H:%M:%S.%f")[:-3]
        fields = " ".join(f"{k}={v}" for k, v in _fields(record).items() if k != "event")
        text = f"{when} {record.levelname:<7} {record.name}: {record.getMessage()}"
        if fields:
            text += f"  {fields}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return self._redact(text)


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler whose own error report cannot print a record's raw arguments."""

    _relay = True

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (stdlib name)
        self.stream.write(
            f'{{"level":"ERROR","logger":"relay.logs","msg":"log record '
            f'from {record.name} could not be formatted and was dropped"}}\n'
        )


def setup_logging(
    level: str, fmt: str, redactor: Redactor, *, stream: TextIO | None = None
) -> logging.Handler:
    """Send every log record to ``stream`` (stderr), redacted, in the chosen format."""
    handler = _Handler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter(redactor) if fmt == "json" else ConsoleFormatter(redactor))
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_relay", False):
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for noisy in ("websockets", "aiohttp", "httpx", "httpcore", "uvicorn", "asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    return handler
