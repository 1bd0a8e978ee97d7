"""Configuration: every knob typed, validated and documented once (CONTRACT.md section 3).

Values come from ``RELAY_*`` environment variables, ``<NAME>_FILE`` files for secrets, and an
optional TOML file named by ``RELAY_CONFIG``; the environment wins over the file. The parsing
lives in pydantic validators, which raise :class:`_Invalid` (a ``ValueError`` that may carry the
variable's name); :func:`load_settings` turns the first error into one :class:`ConfigError`.
Reasons never echo a value, because any value may be a secret.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import math
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from contextvars import ContextVar
from typing import Any, Literal, Self
from urllib.parse import unquote, urlsplit, urlunsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretBytes,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from relay.brokers import target as brokers
from relay.errors import ConfigError
from relay.events import KNOWN_FEEDS
from relay.signing import decode_secret

__all__ = [
    "EndpointConfig",
    "LogFormat",
    "Settings",
    "TokenPolicy",
    "describe",
    "load_settings",
    "parse_duration",
    "plaintext_forwarding",
    "secret_values",
]

TokenPolicy = Literal["strip", "forward", "encrypt"]
LogFormat = Literal["json", "console"]

PREFIX = "RELAY_"
NOT_SET = "(not set)"
MASK = "***"

# Defaults as CONTRACT.md writes them.
DEFAULT_RETRY_SCHEDULE = "0s,5s,5m,30m,2h,5h,10h,10h"
DEFAULT_DELIVERY_TIMEOUT = "15s"

_NOT_A_DURATION = "not a duration: expected e.g. 250ms, 5s, 5m, 2h, 7d"
_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_POLICIES = ("strip", "forward", "encrypt")
_BAD_KEY = "not base64 of exactly 32 bytes (e.g. from: openssl rand -base64 32)"
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Headers the relay sets itself: an endpoint overriding them would break the signed delivery.
_RESERVED_HEADERS = frozenset(
    [
        "content-type",
        "content-length",
        "host",
        "webhook-id",
        "webhook-timestamp",
        "webhook-signature",
    ]
)
_ENDPOINT_KEYS = frozenset(
    [
        "name",
        "url",
        "secret",
        "user_token",
        "token_key",
        "feeds",
        "statuses",
        "headers",
        "timeout",
        "retry_schedule",
        "max_in_flight",
    ]
)
# Input keys: the variables' names without RELAY_, lower-cased (also the TOML keys).
_KEYS = (
    "api_key",
    "ws_url",
    "api_url",
    "feeds",
    "endpoints",
    "signing_secret",
    "allow_unsigned",
    "user_token",
    "token_key",
    "store",
    "retention",
    "admin_addr",
    "admin_token",
    "retry_schedule",
    "delivery_timeout",
    "shutdown_grace",
    "lease",
    "replicas",
    "reconcile_interval",
    "log_level",
    "log_format",
)
# The model key for an input key, where they differ.
_KEY_FIELDS = {"signing_secret": "signing_secrets"}
# Inputs that may hold secrets, so each can also be read from the file <NAME>_FILE names.
_FILE_INPUTS = frozenset(
    {"api_key", "signing_secret", "token_key", "admin_token", "endpoints", "store"}
)
# Settings fields whose variable is not simply RELAY_ + the upper-cased field name.
_FIELD_VARIABLES = {
    "signing_secrets": "SIGNING_SECRET",
    "admin_host": "ADMIN_ADDR",
    "admin_port": "ADMIN_ADDR",
}

# The environment load_settings() was given; Settings() alone reads os.environ.
_ENVIRON: ContextVar[Mapping[str, str] | None] = ContextVar("relay_config_environ", default=None)


class _Invalid(ValueError):
    """A validation failure whose reason is safe to show; pydantic keeps it in the error's ctx.

    ``variable`` overrides the name pydantic's error location would give, for checks that
    span fields or sit inside an endpoint.
    """

    def __init__(self, reason: str, variable: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.variable = variable


# -- value parsers (pure; raise _Invalid) -------------------------------------------------------


def parse_duration(text: str) -> float:
    """Seconds in ``text`` (``250ms``, ``5s``, ``5m``, ``2h``, ``7d``); ValueError otherwise.

    Units are required, so that ``15`` is never silently read as seconds or milliseconds.
    """
    match = _DURATION.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise ValueError(_NOT_A_DURATION)
    number, unit = float(match[1]), match[2]
    seconds = number / 1000 if unit == "ms" else number * _UNIT_SECONDS[unit]
    if not math.isfinite(seconds):
        raise ValueError(_NOT_A_DURATION)
    return seconds


def _format_duration(seconds: float) -> str:
    """The shortest duration text for ``seconds``, so `relay check` reads like the input."""
    if seconds == 0:
        return "0s"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    millis = seconds * 1000
    return f"{int(millis)}ms" if millis == int(millis) else f"{seconds:g}s"


def _duration(value: object, *, zero_ok: bool = False) -> float:
    """A duration from text, or a number of seconds (TOML, JSON or Python), never a bool."""
    if isinstance(value, str):
        try:
            seconds = parse_duration(value)
        except ValueError:
            raise _Invalid(_NOT_A_DURATION) from None
    elif isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
        if not math.isfinite(seconds):
            raise _Invalid(_NOT_A_DURATION)
    else:
        raise _Invalid(_NOT_A_DURATION)
    if seconds < 0:
        raise _Invalid("must not be negative")
    if seconds == 0 and not zero_ok:
        raise _Invalid("must be more than 0s")
    return seconds


def _schedule(value: object) -> tuple[float, ...]:
    """Delays before each attempt: a comma-separated string or a list; 0s allowed."""
    if isinstance(value, str):
        items: list[object] = [part.strip() for part in value.split(",")]
        if items == [""]:
            items = []
    elif isinstance(value, list | tuple):
        items = list(value)
    else:
        raise _Invalid("expected a comma-separated list of durations, e.g. 0s,5s,5m")
    if not items:
        raise _Invalid("empty: give at least one delay, e.g. 0s")
    steps = []
    for number, item in enumerate(items, 1):
        try:
            steps.append(_duration(item, zero_ok=True))
        except _Invalid as exc:
            raise _Invalid(f"step {number}: {exc.reason}") from None
    return tuple(steps)


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise _Invalid("expected a string")
    text = value.strip()
    if not text:
        raise _Invalid("empty")
    return text


def _secret_text(value: object) -> str:
    return _text(value.get_secret_value() if isinstance(value, SecretStr) else value)


def _bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _BOOLS:
        return _BOOLS[value.strip().lower()]
    raise _Invalid("expected true or false (also 1/0, yes/no)")


def _choice(value: object, options: tuple[str, ...]) -> str:
    """One of ``options``, matched case-insensitively."""
    choice = value.strip().lower() if isinstance(value, str) else None
    if choice not in options:
        raise _Invalid(f"expected one of {', '.join(options)}")
    return choice


def _positive_int(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and re.fullmatch(r"[0-9]+", value.strip()):
        number = int(value)
    else:
        raise _Invalid("expected a whole number")
    if number < 1:
        raise _Invalid("must be at least 1")
    return number


def _url(value: object, schemes: tuple[str, ...], what: str) -> str:
    """``value`` if it parses as a URL of one of ``schemes`` with a host; never echoed back."""
    text = _secret_text(value)
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError for a malformed port
    except ValueError:
        raise _Invalid(f"not {what}") from None
    if parts.scheme not in schemes or not parts.hostname or any(c <= " " for c in text):
        raise _Invalid(f"not {what}")
    return text


def _signing_secrets(value: object) -> tuple[str, ...]:
    """``whsec_`` secrets: space-separated text or a list, in signing order, deduplicated."""
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if isinstance(value, str):
        if not value.strip():
            raise _Invalid("empty")
        parts = value.split()
    elif isinstance(value, list | tuple):
        parts = []
        for item in value:
            item = item.get_secret_value() if isinstance(item, SecretStr) else item
            if not isinstance(item, str):
                raise _Invalid("expected whsec_ secrets as strings")
            parts.append(item.strip())
    else:
        raise _Invalid("expected whsec_ secrets, space-separated")
    for number, part in enumerate(parts, 1):
        where = f"secret {number} of {len(parts)}"
        if not part.startswith("whsec_"):
            raise _Invalid(f"{where}: not whsec_ followed by base64")
        try:
            decode_secret(part)
        except ValueError as exc:  # its message never contains the secret
            raise _Invalid(f"{where}: {exc}") from None
    return tuple(dict.fromkeys(parts))


def _token_key(value: object) -> bytes:
    """32 key bytes: base64 text (standard or URL-safe alphabet), or raw bytes from Python."""
    if isinstance(value, SecretBytes):
        value = value.get_secret_value()
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if isinstance(value, bytes):
        key = value
    elif isinstance(value, str):
        text = value.strip().replace("-", "+").replace("_", "/")
        try:
            key = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise _Invalid(_BAD_KEY) from None
    else:
        raise _Invalid(_BAD_KEY)
    if len(key) != 32:
        raise _Invalid(_BAD_KEY)
    return key


def _store(value: object) -> str:
    text = _secret_text(value)
    if text.startswith("sqlite:///") and len(text) > len("sqlite:///"):
        return text
    if text.startswith(("postgresql://", "postgres://")):
        try:
            urlsplit(text).port  # noqa: B018 - raises ValueError for a malformed port
        except ValueError:
            raise _Invalid("not a valid postgresql:// URL") from None
        return text
    raise _Invalid("expected sqlite:///path or postgresql://...")


def _admin_addr(value: object) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port``; a bare IPv6 address is ambiguous, so it is refused."""
    text = _text(value)
    host, _, port = text.rpartition(":")
    if not host or not re.fullmatch(r"[0-9]{1,5}", port):
        raise _Invalid("expected host:port, e.g. 127.0.0.1:8080 or [::1]:8080")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise _Invalid("not an IPv6 address inside [ ]") from None
    elif any(c in host for c in ":[]") or any(c <= " " for c in host):
        raise _Invalid("expected host:port, e.g. 127.0.0.1:8080 or [::1]:8080")
    if int(port) > 65535:
        raise _Invalid("port must be 0-65535")
    return host, int(port)


def _filter(value: object) -> frozenset[str] | None:
    if value is None:
        return None
    if (
        isinstance(value, list | tuple | set | frozenset)
        and value
        and all(isinstance(item, str) and item.strip() for item in value)
    ):
        return frozenset(item.strip() for item in value)
    raise _Invalid("expected a non-empty list of strings (leave it out for all)")


def _known_feeds(names: Iterable[str]) -> None:
    """sFOX answers an unknown feed with an error at subscribe time, in a reconnect loop: a
    typo is refused here instead."""
    if unknown := sorted(set(names) - KNOWN_FEEDS):
        raise _Invalid(
            f"unknown feed {unknown[0]!r}; sFOX's enterprise feeds are "
            + ", ".join(sorted(KNOWN_FEEDS))
        )


def _headers(value: object) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise _Invalid("expected an object of header names to values")
    headers: dict[str, str] = {}
    for name, raw in value.items():
        if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name):
            raise _Invalid("not a valid header name")
        if name.lower() in _RESERVED_HEADERS:
            raise _Invalid(f"header {name!r} is set by the relay")
        text = raw.get_secret_value() if isinstance(raw, SecretStr) else raw
        if not isinstance(text, str) or any(c in text for c in "\r\n\0"):
            raise _Invalid(f"header {name!r}: the value must be a string on one line")
        headers[name] = text
    return headers


def _endpoint_items(value: object) -> list[object]:
    """Endpoint inputs: comma-separated URLs, a JSON list (text starting ``[``), or a list."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                parsed: object = json.loads(text)
            except json.JSONDecodeError as exc:  # exc.msg names the problem, not the text
                raise _Invalid(
                    f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
                ) from None
            value = parsed
        else:
            return [{"url": url.strip()} for url in text.split(",") if url.strip()]
    if isinstance(value, list | tuple):
        return list(value)
    raise _Invalid("expected comma-separated URLs or a JSON list of endpoint objects")


# -- URLs shown and scrubbed ---------------------------------------------------------------------


def _userinfo(url: str) -> str:
    netloc = urlsplit(url).netloc
    return netloc.rpartition("@")[0]


def _masked_query(query: str, secret: bool = True) -> str:
    """Query with values masked (all of them, or only ``password`` when ``secret`` is False)."""
    pieces = []
    for piece in query.split("&") if query else []:
        name, eq, _ = piece.partition("=")
        if not eq:
            pieces.append(MASK if secret else piece)
        elif secret or name.lower() == "password":
            pieces.append(f"{name}={MASK}")
        else:
            pieces.append(piece)
    return "&".join(pieces)


def _endpoint_display(url: str) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    netloc = f"{MASK}@{host}" if "@" in parts.netloc else host
    return urlunsplit((parts.scheme, netloc, parts.path, _masked_query(parts.query), ""))


def _store_display(url: str) -> str:
    if not url.startswith(("postgresql://", "postgres://")):
        return url
    parts = urlsplit(url)
    userinfo, at, host = parts.netloc.rpartition("@")
    user, colon, _ = userinfo.partition(":")
    netloc = f"{user}{':' + MASK if colon else ''}{at}{host}"
    query = _masked_query(parts.query, secret=False)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _default_name(url: object) -> str | None:
    """Host (with any port) and path of ``url``, without credentials; None if unparsable."""
    text = url.get_secret_value() if isinstance(url, SecretStr) else url
    if not isinstance(text, str):
        return None
    try:
        parts = urlsplit(text.strip())
    except ValueError:
        return None
    if brokers.is_broker(text):
        try:
            return brokers.default_name(brokers.parse(text.strip()))
        except ValueError:
            return None  # the url validator reports it
    host = parts.netloc.rpartition("@")[2].lower()
    return f"{host}{parts.path.rstrip('/')}" if host else None


def _is_postgres(store: SecretStr) -> bool:
    return store.get_secret_value().startswith(("postgresql://", "postgres://"))


# -- models --------------------------------------------------------------------------------------


class EndpointConfig(BaseModel):
    """One webhook receiver. Immutable, so a running dispatcher never sees it change.

    Built from ``RELAY_ENDPOINTS`` with the global defaults filled in; constructed directly
    (tests, tools) the defaults are the contract's.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: SecretStr
    name: str = ""  # left out, it is derived from the URL (see _name_from_url)
    secrets: tuple[SecretStr, ...] = ()
    user_token: TokenPolicy = "strip"
    token_key: SecretBytes | None = Field(default=None, validate_default=True)
    feeds: frozenset[str] | None = None
    statuses: frozenset[str] | None = None
    headers: dict[str, SecretStr] = Field(default_factory=dict)
    timeout: float = parse_duration(DEFAULT_DELIVERY_TIMEOUT)
    retry_schedule: tuple[float, ...] = _schedule(DEFAULT_RETRY_SCHEDULE)
    max_in_flight: int = Field(default=64, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _name_from_url(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and data.get("name") is None:
            name = _default_name(data.get("url"))
            if name is not None:
                return {**data, "name": name}
        return data

    @field_validator("url", mode="before")
    @classmethod
    def _check_url(cls, value: object) -> str:
        text = _secret_text(value)
        if brokers.is_broker(text):
            try:
                brokers.parse(text)  # section 4b: what each broker's URL must name
            except ValueError as exc:  # its reason never quotes the URL
                raise _Invalid(str(exc)) from None
            return text
        return _url(text, ("http", "https"), "an http(s) URL or a broker URL (section 4b)")

    @field_validator("name", mode="before")
    @classmethod
    def _check_name(cls, value: object) -> str:
        return _text(value)

    @field_validator("secrets", mode="before")
    @classmethod
    def _check_secrets(cls, value: object) -> tuple[str, ...]:
        return _signing_secrets(value)

    @field_validator("user_token", mode="before")
    @classmethod
    def _check_policy(cls, value: object) -> str:
        return _choice(value, _POLICIES)

    @field_validator("token_key", mode="before")
    @classmethod
    def _check_token_key(cls, value: object, info: ValidationInfo) -> bytes | None:
        if value is None:
            if info.data.get("user_token") == "encrypt":
                raise _Invalid("required for the encrypt policy: the receiver's key, base64")
            return None
        return _token_key(value)

    @field_validator("feeds", "statuses", mode="before")
    @classmethod
    def _check_filter(cls, value: object) -> frozenset[str] | None:
        return _filter(value)

    @field_validator("feeds")
    @classmethod
    def _check_known_feeds(cls, value: frozenset[str] | None) -> frozenset[str] | None:
        if value is not None:
            _known_feeds(value)
        return value

    @field_validator("headers", mode="before")
    @classmethod
    def _check_headers(cls, value: object) -> dict[str, str]:
        return _headers(value)

    @field_validator("timeout", mode="before")
    @classmethod
    def _check_timeout(cls, value: object) -> float:
        return _duration(value)

    @field_validator("max_in_flight", mode="before")
    @classmethod
    def _check_max_in_flight(cls, value: object) -> int:
        return _positive_int(value)

    @field_validator("retry_schedule", mode="before")
    @classmethod
    def _check_schedule(cls, value: object) -> tuple[float, ...]:
        return _schedule(value)

    @property
    def display_url(self) -> str:
        """The URL for logs and `relay check`: userinfo and query values masked."""
        return _endpoint_display(self.url.get_secret_value())

    @property
    def signing_keys(self) -> tuple[bytes, ...]:
        """Decoded HMAC keys, in the order the signatures are written."""
        return tuple(decode_secret(secret.get_secret_value()) for secret in self.secrets)


class _EnvironSource(PydanticBaseSettingsSource):
    """``RELAY_*`` variables from an explicit mapping; ``<NAME>_FILE`` wins over ``<NAME>``.

    An empty variable counts as unset, as compose files often pass ``VAR=`` through.
    """

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        super().__init__(settings_cls)
        self._environ = environ
        self._prefix = str(self.config.get("env_prefix") or "")

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        """Unused: values are keyed by input name, not field, so __call__ builds them."""
        return None, field_name, False  # pragma: no cover

    def __call__(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for key in _KEYS:
            target = _KEY_FIELDS.get(key, key)
            variable = self._prefix + key.upper()
            path = self._environ.get(variable + "_FILE") if key in _FILE_INPUTS else None
            if path:
                values[target] = _read_secret_file(variable + "_FILE", path)
            elif self._environ.get(variable):
                values[target] = self._environ[variable]
            elif key == "api_key" and self._environ.get("ENTERPRISE_API_KEY"):
                values[target] = self._environ["ENTERPRISE_API_KEY"]  # the name sFOX's docs use
        return values


class _TomlSource(PydanticBaseSettingsSource):
    """The TOML file ``RELAY_CONFIG`` names: keys are variable names without the prefix."""

    def __init__(self, settings_cls: type[BaseSettings], path: str | None) -> None:
        super().__init__(settings_cls)
        self._path = path
        self._prefix = str(self.config.get("env_prefix") or "")

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        """Unused: values are keyed by input name, not field, so __call__ builds them."""
        return None, field_name, False  # pragma: no cover

    def __call__(self) -> dict[str, Any]:
        if not self._path:
            return {}
        data = _read_toml(self._prefix + "CONFIG", self._path)
        values: dict[str, Any] = {}
        for key, value in data.items():
            if key.endswith("_file") and key.removesuffix("_file") in _FILE_INPUTS:
                continue
            if key not in _KEYS:
                raise ConfigError(self._prefix + "CONFIG", f"unknown key {key!r} in {self._path}")
            values[_KEY_FIELDS.get(key, key)] = value
        for key, path in data.items():  # a *_file key wins over its plain twin, as in the env
            if key.endswith("_file") and key.removesuffix("_file") in _FILE_INPUTS:
                variable = self._prefix + key.upper()
                if not isinstance(path, str) or not path:
                    raise ConfigError(variable, "expected a file path")
                plain = key.removesuffix("_file")
                values[_KEY_FIELDS.get(plain, plain)] = _read_secret_file(variable, path)
        return values


def _read_secret_file(variable: str, path: str) -> str:
    """A secret file's text without its trailing newline; errors name ``variable``."""
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except FileNotFoundError:
        raise ConfigError(variable, f"no such file: {path}") from None
    except OSError as exc:
        raise ConfigError(variable, f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:  # its .object holds the file's bytes: do not chain it
        raise ConfigError(variable, f"{path} is not UTF-8 text") from None
    text = text.rstrip("\r\n")
    if not text.strip():
        raise ConfigError(variable, f"{path} is empty")
    return text


def _read_toml(variable: str, path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as file:
            return tomllib.load(file)
    except FileNotFoundError:
        raise ConfigError(variable, f"no such file: {path}") from None
    except OSError as exc:
        raise ConfigError(variable, f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(variable, f"{path} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:  # its message gives the position, not the text
        raise ConfigError(variable, f"invalid TOML in {path}: {exc}") from None


class Settings(BaseSettings):
    """The relay's whole configuration, built by :func:`load_settings`.

    Defaults are CONTRACT.md's, written in its syntax. Frozen: the running daemon shares one
    instance; ``model_copy(update=...)`` derives variants in tests.
    """

    model_config = SettingsConfigDict(
        env_prefix=PREFIX, extra="forbid", frozen=True, validate_default=True
    )

    api_key: SecretStr | None = None
    ws_url: str = "wss://ws.sfox.com/ws"
    api_url: str = "https://api.sfox.com"
    feeds: tuple[str, ...] = ("private.enterprise.users",)
    signing_secrets: tuple[SecretStr, ...] = ()
    allow_unsigned: bool = False
    user_token: TokenPolicy = "strip"
    token_key: SecretBytes | None = None
    store: SecretStr = SecretStr("sqlite:///relay.db")
    retention: float = parse_duration("7d")
    admin_host: str = "127.0.0.1"
    admin_port: int = 8080
    admin_token: SecretStr | None = None
    retry_schedule: tuple[float, ...] = _schedule(DEFAULT_RETRY_SCHEDULE)
    delivery_timeout: float = parse_duration(DEFAULT_DELIVERY_TIMEOUT)
    shutdown_grace: float = parse_duration("20s")
    lease: float = parse_duration("60s")
    replicas: int = 1
    reconcile_interval: float | None = parse_duration("15m")
    log_level: str = "INFO"
    log_format: LogFormat = "json"
    # Last: its validator fills each endpoint's defaults from the fields above.
    endpoints: tuple[EndpointConfig, ...] = ()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Init kwargs, then the environment (with ``_FILE``), then the TOML file."""
        environ = _ENVIRON.get()
        if environ is None:
            environ = os.environ
        toml_path = environ.get(PREFIX + "CONFIG") or None
        return (
            init_settings,
            _EnvironSource(settings_cls, environ),
            _TomlSource(settings_cls, toml_path),
        )

    @model_validator(mode="before")
    @classmethod
    def _split_admin_addr(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and "admin_addr" in data:
            data = dict(data)
            try:
                data["admin_host"], data["admin_port"] = _admin_addr(data.pop("admin_addr"))
            except _Invalid as exc:
                raise _Invalid(exc.reason, PREFIX + "ADMIN_ADDR") from None
        return data

    @field_validator("api_key", "admin_token", mode="before")
    @classmethod
    def _check_secret(cls, value: object) -> str | None:
        return None if value is None else _secret_text(value)

    @field_validator("ws_url", mode="before")
    @classmethod
    def _check_ws_url(cls, value: object) -> str:
        return _url(value, ("ws", "wss"), "a ws:// or wss:// URL")

    @field_validator("api_url", mode="before")
    @classmethod
    def _check_api_url(cls, value: object) -> str:
        return _url(value, ("http", "https"), "an http(s) URL").rstrip("/")

    @field_validator("feeds", mode="before")
    @classmethod
    def _check_feeds(cls, value: object) -> tuple[str, ...]:
        if isinstance(value, str):
            items: list[object] = list(value.split(","))
        elif isinstance(value, list | tuple):
            items = list(value)
        else:
            raise _Invalid("expected comma-separated feed names")
        if not all(isinstance(item, str) for item in items):
            raise _Invalid("expected feed names as strings")
        names = tuple(dict.fromkeys(str(item).strip() for item in items if str(item).strip()))
        if not names:
            raise _Invalid("empty: give at least one feed")
        _known_feeds(names)
        return names

    @field_validator("signing_secrets", mode="before")
    @classmethod
    def _check_signing_secrets(cls, value: object) -> tuple[str, ...]:
        return _signing_secrets(value)

    @field_validator("allow_unsigned", mode="before")
    @classmethod
    def _check_bool(cls, value: object) -> bool:
        return _bool(value)

    @field_validator("user_token", mode="before")
    @classmethod
    def _check_policy(cls, value: object) -> str:
        return _choice(value, _POLICIES)

    @field_validator("log_format", mode="before")
    @classmethod
    def _check_log_format(cls, value: object) -> str:
        return _choice(value, ("json", "console"))

    @field_validator("token_key", mode="before")
    @classmethod
    def _check_token_key(cls, value: object) -> bytes | None:
        return None if value is None else _token_key(value)

    @field_validator("store", mode="before")
    @classmethod
    def _check_store(cls, value: object) -> str:
        return _store(value)

    @field_validator("retention", "delivery_timeout", "shutdown_grace", "lease", mode="before")
    @classmethod
    def _check_duration(cls, value: object) -> float:
        return _duration(value)

    @field_validator("retry_schedule", mode="before")
    @classmethod
    def _check_schedule(cls, value: object) -> tuple[float, ...]:
        return _schedule(value)

    @field_validator("replicas", mode="before")
    @classmethod
    def _check_replicas(cls, value: object) -> int:
        return _positive_int(value)

    @field_validator("reconcile_interval", mode="before")
    @classmethod
    def _check_reconcile_interval(cls, value: object) -> float | None:
        if value is None or (isinstance(value, str) and value.strip().lower() == "off"):
            return None
        return _duration(value)

    @field_validator("log_level", mode="before")
    @classmethod
    def _check_log_level(cls, value: object) -> str:
        level = value.strip().upper() if isinstance(value, str) else None
        if level not in _LOG_LEVELS:
            raise _Invalid("expected one of DEBUG, INFO, WARNING, ERROR")
        return level

    @field_validator("endpoints", mode="before")
    @classmethod
    def _check_endpoints(cls, value: object, info: ValidationInfo) -> tuple[EndpointConfig, ...]:
        items = _endpoint_items(value)
        sources = {
            "user_token": "user_token",
            "timeout": "delivery_timeout",
            "retry_schedule": "retry_schedule",
            "secrets": "signing_secrets",
        }
        if any(field not in info.data for field in sources.values()):
            # A default failed validation; that error comes first and is the one reported.
            raise _Invalid("not checked: an earlier setting is invalid")
        defaults = {key: info.data[field] for key, field in sources.items()}
        endpoints: list[EndpointConfig] = []
        names: dict[str, int] = {}
        for index, item in enumerate(items):
            where = f"{PREFIX}ENDPOINTS[{index}]"
            endpoint = (
                item if isinstance(item, EndpointConfig) else _endpoint(item, where, defaults)
            )
            if endpoint.name in names:
                raise _Invalid(
                    f"same name as {PREFIX}ENDPOINTS[{names[endpoint.name]}]; "
                    'names must be unique (set "name")',
                    f"{where}.name",
                )
            names[endpoint.name] = index
            endpoints.append(endpoint)
        return tuple(endpoints)

    @model_validator(mode="after")
    def _check_together(self) -> Self:
        """Rules that span variables, each reported under the variable to change."""
        for index, endpoint in enumerate(self.endpoints):
            if not endpoint.secrets and not self.allow_unsigned:
                raise _Invalid(
                    f"required: {PREFIX}ENDPOINTS[{index}] has no secret of its own "
                    f"(or set {PREFIX}ALLOW_UNSIGNED=true to send unsigned webhooks)",
                    PREFIX + "SIGNING_SECRET",
                )
        if self.token_key is None:
            for index, endpoint in enumerate(self.endpoints):
                if endpoint.user_token != "strip":
                    raise _Invalid(
                        f"required: {PREFIX}ENDPOINTS[{index}] has user_token "
                        f"{endpoint.user_token}, and user tokens are encrypted at rest",
                        PREFIX + "TOKEN_KEY",
                    )
        if _is_postgres(self.store):
            # A claim must outlive any attempt, or a second replica could send it too.
            limit = self.lease / 2
            rule = (
                f"must be below half of {PREFIX}LEASE ({_format_duration(self.lease)}) "
                "with a PostgreSQL store"
            )
            if self.delivery_timeout >= limit:
                raise _Invalid(rule, PREFIX + "DELIVERY_TIMEOUT")
            for index, endpoint in enumerate(self.endpoints):
                if endpoint.timeout >= limit:
                    raise _Invalid(rule, f"{PREFIX}ENDPOINTS[{index}].timeout")
        return self

    @property
    def store_display(self) -> str:
        """The store URL with any password masked."""
        return _store_display(self.store.get_secret_value())

    @property
    def needs_token_storage(self) -> bool:
        """Whether some endpoint needs user tokens kept (encrypted) until delivery."""
        return any(endpoint.user_token != "strip" for endpoint in self.endpoints)


def _endpoint(item: object, where: str, defaults: Mapping[str, object]) -> EndpointConfig:
    """One endpoint object from the configuration, with the global defaults filled in."""
    if not isinstance(item, Mapping):
        raise _Invalid("expected an object with at least a url", where)
    url = item.get("url")
    url_text = url.get_secret_value() if isinstance(url, SecretStr) else url
    if item.get("proxy") is not None and isinstance(url_text, str) and brokers.is_broker(url_text):
        raise _Invalid(
            "a broker URL takes no proxy (proxy is for http(s) endpoints)", f"{where}.url"
        )
    for key in item:
        if key not in _ENDPOINT_KEYS:
            raise _Invalid(f"unknown key {str(key)!r}", where)
    data = {("secrets" if key == "secret" else key): v for key, v in item.items() if v is not None}
    for key, default in defaults.items():
        data.setdefault(key, default)
    try:
        return EndpointConfig.model_validate(data)
    except ValidationError as exc:
        error = exc.errors(include_url=False, include_input=False)[0]
        field = str(error["loc"][0]) if error["loc"] else None
        key = "secret" if field == "secrets" else field
        raise _Invalid(_reason(error), f"{where}.{key}" if key else where) from None


def _reason(error: ErrorDetails) -> str:
    """A pydantic error's reason in our words; pydantic's own messages never quote input."""
    cause = (error.get("ctx") or {}).get("error")
    if isinstance(cause, _Invalid):
        return cause.reason
    if error["type"] == "missing":
        return "required"
    # Every field has a validator raising _Invalid, so these are a safety net.
    if error["type"] == "value_error":  # pragma: no cover
        return "invalid value"  # a foreign ValueError might quote the input
    return error["msg"]  # pragma: no cover


def _config_error(exc: ValidationError) -> ConfigError:
    """The first error (fields validate in order, so this is deterministic) as a ConfigError."""
    error = exc.errors(include_url=False, include_input=False)[0]
    cause = (error.get("ctx") or {}).get("error")
    if isinstance(cause, _Invalid) and cause.variable:
        return ConfigError(cause.variable, cause.reason)
    field = str(error["loc"][0]) if error["loc"] else "CONFIG"
    return ConfigError(PREFIX + _FIELD_VARIABLES.get(field, field.upper()), _reason(error))


# -- entry points --------------------------------------------------------------------------------


def load_settings(environ: Mapping[str, str] | None = None, *, for_run: bool = False) -> Settings:
    """The validated configuration, or ConfigError naming the first bad variable.

    Args:
        environ: the variables to read; ``os.environ`` when None.
        for_run: also require what only `relay run` needs (an API key and an endpoint).
    """
    token = _ENVIRON.set(os.environ if environ is None else environ)
    try:
        settings = Settings()
    except ValidationError as exc:  # not chained: its text quotes the input values
        raise _config_error(exc) from None
    finally:
        _ENVIRON.reset(token)
    if for_run and settings.api_key is None:
        raise ConfigError(
            PREFIX + "API_KEY",
            f"required for relay run (or {PREFIX}API_KEY_FILE, or ENTERPRISE_API_KEY)",
        )
    if for_run and not settings.endpoints:
        raise ConfigError(PREFIX + "ENDPOINTS", "required for relay run: at least one URL")
    return settings


def _mask(secret: object | None) -> str:
    return NOT_SET if secret is None else MASK


def _admin_addr_text(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def describe(settings: Settings) -> dict[str, object]:
    """The effective configuration for `relay check`, keyed like the TOML file, secrets masked."""
    return {
        "api_key": _mask(settings.api_key),
        "ws_url": settings.ws_url,
        "api_url": settings.api_url,
        "feeds": list(settings.feeds),
        "endpoints": [_describe_endpoint(endpoint) for endpoint in settings.endpoints],
        "signing_secret": [MASK] * len(settings.signing_secrets) or NOT_SET,
        "allow_unsigned": settings.allow_unsigned,
        "user_token": settings.user_token,
        "token_key": _mask(settings.token_key),
        "store": settings.store_display,
        "retention": _format_duration(settings.retention),
        "admin_addr": _admin_addr_text(settings.admin_host, settings.admin_port),
        "admin_token": _mask(settings.admin_token),
        "retry_schedule": [_format_duration(step) for step in settings.retry_schedule],
        "delivery_timeout": _format_duration(settings.delivery_timeout),
        "shutdown_grace": _format_duration(settings.shutdown_grace),
        "lease": _format_duration(settings.lease),
        "replicas": settings.replicas,
        "reconcile_interval": "off"
        if settings.reconcile_interval is None
        else _format_duration(settings.reconcile_interval),
        "log_level": settings.log_level,
        "log_format": settings.log_format,
    }


def _describe_endpoint(endpoint: EndpointConfig) -> dict[str, object]:
    return {
        "name": endpoint.name,
        "url": endpoint.display_url,
        "secret": [MASK] * len(endpoint.secrets) or NOT_SET,
        "user_token": endpoint.user_token,
        "token_key": _mask(endpoint.token_key),
        "feeds": None if endpoint.feeds is None else sorted(endpoint.feeds),
        "statuses": None if endpoint.statuses is None else sorted(endpoint.statuses),
        "headers": {name: MASK for name in endpoint.headers},
        "timeout": _format_duration(endpoint.timeout),
        "retry_schedule": [_format_duration(step) for step in endpoint.retry_schedule],
        "max_in_flight": endpoint.max_in_flight,
    }


def _url_secrets(url: str, *, query: bool) -> list[str]:
    """Credentials inside ``url``: userinfo, password (raw and decoded), long query values.

    A username next to a password is left out: scrubbing e.g. "relay" would mangle every log
    line. Short query values (``v=2``) are parameters, not credentials, for the same reason.
    """
    found: list[str] = []
    userinfo = _userinfo(url)
    if userinfo:
        user, colon, password = userinfo.partition(":")
        found += [userinfo, password, unquote(password)] if colon else [user, unquote(user)]
    if query:
        for piece in urlsplit(url).query.split("&"):
            value = piece.partition("=")[2] or piece
            if len(value) >= 8:
                found += [value, unquote(value)]
    else:
        for piece in urlsplit(url).query.split("&"):
            name, _, value = piece.partition("=")
            if name.lower() == "password":
                found += [value, unquote(value)]
    return found


def _whsec_parts(secrets: tuple[SecretStr, ...]) -> list[str]:
    found = []
    for secret in secrets:
        text = secret.get_secret_value()
        found += [text, text.removeprefix("whsec_")]
    return found


def _key_texts(key: SecretBytes | None) -> list[str]:
    if key is None:
        return []
    raw = key.get_secret_value()
    return [base64.b64encode(raw).decode(), base64.urlsafe_b64encode(raw).decode()]


def plaintext_forwarding(settings: Settings) -> list[str]:
    """Names of endpoints that get user tokens in the clear over an unencrypted connection
    (``forward`` to ``http://``, ``amqp://``, ``nats://``, ``redis://``): allowed, but worth
    a warning at start-up."""
    plaintext = ("http", *brokers.PLAINTEXT_SCHEMES)
    return [
        endpoint.name
        for endpoint in settings.endpoints
        if endpoint.user_token == "forward"
        and urlsplit(endpoint.url.get_secret_value()).scheme.lower() in plaintext
    ]


def secret_values(settings: Settings) -> list[str]:
    """Every secret string in ``settings``, longest first, for the log redactor to scrub."""
    found: list[str] = []
    for secret in (settings.api_key, settings.admin_token):
        if secret is not None:
            found.append(secret.get_secret_value())
    found += _whsec_parts(settings.signing_secrets)
    found += _key_texts(settings.token_key)
    found += _url_secrets(settings.store.get_secret_value(), query=False)
    for endpoint in settings.endpoints:
        found += _whsec_parts(endpoint.secrets)
        found += _key_texts(endpoint.token_key)
        found += [value.get_secret_value() for value in endpoint.headers.values()]
        found += _url_secrets(endpoint.url.get_secret_value(), query=True)
    unique = {text for text in found if text}
    return sorted(unique, key=lambda text: (-len(text), text))
