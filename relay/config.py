"""Configuration: every knob typed, validated and documented once (see the README).

Values come from ``RELAY_*`` environment variables, ``<NAME>_FILE`` files for secrets, and an
optional TOML file named by ``RELAY_CONFIG``; the environment wins over the file. The parsing
lives in pydantic validators, which raise :class:`_Invalid` (a ``ValueError`` that may carry the
variable's name); :func:`load_settings` turns the first error into one :class:`ConfigError`.
Reasons never echo a value, because any value may be a secret.
"""

from __future__ import annotations

import base64
import binascii
import functools
import ipaddress
import json
import math
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from contextvars import ContextVar
from typing import Any, Literal, Self
from urllib.parse import urlsplit

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

from relay import fields as payload_fields
from relay import tls
from relay.brokers import target as brokers
from relay.errors import ConfigError
from relay.events import KNOWN_FEEDS
from relay.masking import MASK, mask_url, url_secrets
from relay.signing import decode_secret

__all__ = [
    "EndpointConfig",
    "LogFormat",
    "Settings",
    "TokenPolicy",
    "describe",
    "load_settings",
    "parse_duration",
    "secret_values",
    "warnings",
]

TokenPolicy = Literal["strip", "forward", "encrypt"]
LogFormat = Literal["json", "console"]

PREFIX = "RELAY_"
NOT_SET = "(not set)"

# Defaults as the README writes them.
DEFAULT_RETRY_SCHEDULE = "0s,5s,5m,30m,2h,5h,10h,10h"
DEFAULT_DELIVERY_TIMEOUT = "15s"
#: RELAY_RECONCILE_INTERVAL below this is a configuration error (CONTRACT.md section 5a).
MIN_RECONCILE_INTERVAL = 10.0

_NOT_A_DURATION = "not a duration: expected e.g. 250ms, 5s, 5m, 2h, 7d"
_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_POLICIES = ("strip", "forward", "encrypt")
_MIN_SECRET_BYTES = 16
#: The user statuses sFOX is known to send (sfox/FEED.md); `statuses` filters naming another
#: are allowed (sFOX may add one) but warned about, since they most likely match nothing.
KNOWN_STATUSES = frozenset({"PENDING", "VERIFIED", "UNSUPPORTED"})
_PLAINTEXT_SCHEMES = frozenset({"http", "amqp", "nats", "redis", "ws"})
_PG_SCHEMA = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
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
# RELAY_ALERT_URL as an object: what an alert endpoint may set (CONTRACT.md 5c).
_ALERT_KEYS = frozenset(
    [
        "url",
        "name",
        "secret",
        "headers",
        "timeout",
        "retry_schedule",
        "ca_file",
        "client_cert",
        "client_key",
        "proxy",
    ]
)
DEFAULT_ALERT_NAME = "alerts"
# The known input keys (the variables' names without RELAY_, lower-cased; also the TOML keys)
# are the Settings fields, so a new setting needs no second registration; these are the
# fields whose input key differs from their name.
_FIELD_VARIABLES = {
    "signing_secrets": "SIGNING_SECRET",
    "admin_host": "ADMIN_ADDR",
    "admin_port": "ADMIN_ADDR",
}
# Inputs that may hold secrets, so each can also be read from the file <NAME>_FILE names.
_FILE_INPUTS = frozenset(
    {"api_key", "signing_secret", "token_key", "admin_token", "endpoints", "store", "alert_url"}
)
# RELAY_* variables that are not settings but are read all the same.
_OTHER_VARIABLES = frozenset({"CONFIG"})
# Validators that read durations: the fields they check refuse a bare number in any input
# (environment, TOML, JSON), so that `20` never means seconds in one place and not another.
_DURATION_VALIDATORS = frozenset(
    {
        "_check_duration",
        "_check_schedule",
        "_check_reconcile_interval",
        "_check_timeout",
        "_check_disable_after",
    }
)

# The environment load_settings() was given; Settings() alone reads os.environ.
_ENVIRON: ContextVar[Mapping[str, str] | None] = ContextVar("relay_config_environ", default=None)
# While load_settings() runs: problems the sources found (unknown keys, unit-less durations),
# reported with the validation errors, and the input keys the TOML file supplied (the
# environment did not override them), so that their errors name the TOML key.
_PROBLEMS: ContextVar[list[tuple[str, str]] | None] = ContextVar(
    "relay_config_problems", default=None
)
_FROM_TOML: ContextVar[dict[str, str] | None] = ContextVar("relay_config_toml", default=None)


class _Invalid(ValueError):
    """A validation failure whose reason is safe to show; pydantic keeps it in the error's ctx.

    ``variable`` overrides the name pydantic's error location would give, for checks that
    span fields or sit inside an endpoint.
    """

    def __init__(
        self, reason: str, variable: str | None = None, others: tuple[_Invalid, ...] = ()
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.variable = variable
        self.others = others


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


def _rate(value: object) -> float:
    """Attempts per second: a positive, finite number (or its text)."""
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise _Invalid("expected attempts per second, a positive number") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Invalid("expected attempts per second, a positive number")
    rate = float(value)
    if not math.isfinite(rate) or rate <= 0:
        raise _Invalid("must be a positive number of attempts per second")
    return rate


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
            key = decode_secret(part)
        except ValueError as exc:  # its message never contains the secret
            raise _Invalid(f"{where}: {exc}") from None
        if len(key) < _MIN_SECRET_BYTES:
            raise _Invalid(
                f"{where}: shorter than {_MIN_SECRET_BYTES} bytes once decoded "
                "(generate one with: echo whsec_$(openssl rand -base64 32))"
            )
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
        elif text.startswith("{"):
            raise _Invalid("one JSON object: give endpoint objects as a JSON list, [{...}]")
        else:
            urls = [url.strip() for url in text.split(",") if url.strip()]
            if any(len(url.split()) > 1 for url in urls):
                raise _Invalid("URLs separated by spaces: separate them with a comma")
            return [{"url": url} for url in urls]
    if isinstance(value, Mapping):
        raise _Invalid("one object: give endpoint objects as a list (in TOML, [[endpoints]])")
    if isinstance(value, list | tuple):
        return list(value)
    raise _Invalid("expected comma-separated URLs or a JSON list of endpoint objects")


# -- URLs shown and scrubbed ---------------------------------------------------------------------


def _default_name(url: object) -> str | None:
    """A slug of ``url``'s host (with any port) and path, or of a broker's destination;
    never its credentials; None if unparsable."""
    text = url.get_secret_value() if isinstance(url, SecretStr) else url
    if not isinstance(text, str):
        return None
    if brokers.is_broker(text):
        try:
            return brokers.default_name(brokers.parse(text.strip()))
        except ValueError:
            return None  # the url validator reports it
    former = former_default_name(text)
    return None if former is None else brokers.slug(former)


def former_default_name(url: str) -> str | None:
    """What an http(s) endpoint was named by default before names were slugs: its host (with
    any port) and path as they are. Deliveries stored under it are renamed at start-up."""
    try:
        parts = urlsplit(url.strip())
    except ValueError:
        return None
    host = parts.netloc.rpartition("@")[2].lower()
    return f"{host}{parts.path.rstrip('/')}" if host else None


def endpoint_renames(settings: Settings) -> list[tuple[str, str]]:
    """(former default name, name now) of each http(s) endpoint whose work may be stored
    under its former default name (CONTRACT 3: a migration renames those deliveries)."""
    names = {ep.name for ep in settings.all_endpoints}
    renames = []
    for endpoint in settings.all_endpoints:
        url = endpoint.url.get_secret_value()
        former = None if brokers.is_broker(url) else former_default_name(url)
        if former is not None and former != endpoint.name and former not in names:
            renames.append((former, endpoint.name))
    return renames


def _is_postgres(store: SecretStr) -> bool:
    return store.get_secret_value().startswith(("postgresql://", "postgres://"))


def _scheme_of(info: ValidationInfo) -> str | None:
    """The endpoint URL's scheme, when the URL (validated before) is valid."""
    url = info.data.get("url")
    return urlsplit(url.get_secret_value()).scheme if isinstance(url, SecretStr) else None


def _needs_tls(info: ValidationInfo) -> None:
    scheme = _scheme_of(info)
    if scheme is not None and scheme not in tls.TLS_SCHEMES:
        raise _Invalid(f"{scheme}:// has no TLS (use https://, or leave {info.field_name} out)")


# -- models --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _decoded_keys(secrets: tuple[str, ...]) -> tuple[bytes, ...]:
    return tuple(decode_secret(secret) for secret in secrets)


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
    retry_statuses: frozenset[int] = frozenset()
    rate_limit: float | None = None  # attempts per second across replicas
    fields: tuple[str, ...] | None = None
    ca_file: str | None = None
    client_cert: str | None = None
    client_key: str | None = Field(default=None, validate_default=True)
    proxy: SecretStr | None = None

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
        name = _text(value)
        if not brokers.NAME.fullmatch(name):
            raise _Invalid("only letters, digits and . _ : - (e.g. crm-prod)")
        return name

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

    @field_validator("statuses")
    @classmethod
    def _upper_statuses(cls, value: frozenset[str] | None) -> frozenset[str] | None:
        # sFOX sends upper case; "verified" must not silently match nothing.
        return None if value is None else frozenset(status.upper() for status in value)

    @field_validator("retry_statuses", mode="before")
    @classmethod
    def _check_retry_statuses(cls, value: object) -> frozenset[int]:
        if (
            not isinstance(value, list | tuple | set | frozenset)
            or not value
            or not all(isinstance(code, int) and not isinstance(code, bool) for code in value)
        ):
            raise _Invalid("expected a non-empty list of HTTP status codes, e.g. [401, 404]")
        if any(not 300 <= code <= 499 for code in value):
            raise _Invalid("only 3xx/4xx codes: 5xx, 408, 425 and 429 are always retried")
        return frozenset(value)

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

    @field_validator("rate_limit", mode="before")
    @classmethod
    def _check_rate_limit(cls, value: object) -> float | None:
        return None if value is None else _rate(value)

    @field_validator("fields", mode="before")
    @classmethod
    def _check_fields(cls, value: object) -> tuple[str, ...] | None:
        if value is None:
            return None
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise _Invalid('expected a list of payload keys, e.g. ["user_id", "status"]')
        paths = tuple(dict.fromkeys(v.strip() for v in value))
        try:
            payload_fields.parse(paths)
        except ValueError as exc:  # its reason names a position, never a value
            raise _Invalid(str(exc)) from None
        return paths

    @field_validator("ca_file", "client_cert", mode="before")
    @classmethod
    def _check_tls_file(cls, value: object, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        path = _text(value)
        _needs_tls(info)
        check = tls.check_ca_file if info.field_name == "ca_file" else tls.check_client_cert
        try:
            check(path)
        except ValueError as exc:  # names the path, never the file's contents
            raise _Invalid(str(exc)) from None
        return path

    @field_validator("client_key", mode="before")
    @classmethod
    def _check_client_key(cls, value: object, info: ValidationInfo) -> str | None:
        if "client_cert" not in info.data:
            return None  # client_cert is invalid, and that error is the one reported
        cert = info.data["client_cert"]
        if value is None:
            if cert is not None:
                raise _Invalid("required with client_cert: the certificate's PEM private key")
            return None
        path = _text(value)
        if cert is None:
            raise _Invalid("given without client_cert")
        try:
            tls.check_client_key(path, cert)
        except ValueError as exc:
            raise _Invalid(str(exc)) from None
        return path

    @field_validator("proxy", mode="before")
    @classmethod
    def _check_proxy(cls, value: object, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        scheme = _scheme_of(info)
        if scheme is not None and scheme not in ("http", "https"):
            raise _Invalid(f"only for http(s) endpoints, not {scheme}://")
        if _secret_text(value).lower() == "none":
            return "none"
        return _url(value, ("http", "https"), 'an http(s) proxy URL or "none"')

    @property
    def field_tree(self) -> payload_fields.FieldTree | None:
        """``fields`` as the tree :func:`relay.fields.select` walks (parsed once, cached)."""
        return None if self.fields is None else payload_fields.compiled(self.fields)

    @property
    def display_url(self) -> str:
        """The URL for logs and `relay check`: userinfo and query values masked."""
        return mask_url(self.url.get_secret_value(), strict=True)

    @property
    def signing_keys(self) -> tuple[bytes, ...]:
        """Decoded HMAC keys, in the order the signatures are written (decoded once per
        value: every delivery signs, and decoding took 5 us of the event loop each time)."""
        return _decoded_keys(tuple(secret.get_secret_value() for secret in self.secrets))


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
        keys = _input_keys()
        for key in keys:
            variable = self._prefix + key.upper()
            path = self._environ.get(variable + "_FILE") if key in _FILE_INPUTS else None
            if path:
                values[key] = _read_secret_file(variable + "_FILE", path)
            elif self._environ.get(variable):
                values[key] = self._environ[variable]
            elif key == "api_key" and self._environ.get("ENTERPRISE_API_KEY"):
                values[key] = self._environ["ENTERPRISE_API_KEY"]  # the name sFOX's docs use
        known = {self._prefix + name for name in _OTHER_VARIABLES}
        for key in keys:
            known.add(self._prefix + key.upper())
            if key in _FILE_INPUTS:
                known.add(self._prefix + key.upper() + "_FILE")
        for variable in sorted(self._environ):
            # (Empty counts as unset here too: compose files pass `VAR=` through.)
            if (
                variable.startswith(self._prefix)
                and variable not in known
                and self._environ[variable]
            ):
                _problem(variable, "unknown variable (a typo? see the README for every setting)")
        return _to_fields(values)


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
        where = os.path.basename(self._path)
        keys = _input_keys()
        durations = _duration_keys(Settings)
        values: dict[str, Any] = {}
        for key, value in data.items():
            if key.endswith("_file") and key.removesuffix("_file") in _FILE_INPUTS:
                continue
            if key not in keys:
                _problem(f"{key} in {where}", "unknown key (a typo? see the README)")
            elif key in durations and _unitless(value):
                _problem(f"{key} in {where}", _NOT_A_DURATION + " (a number needs a unit)")
            else:
                values[key] = value
        for key, path in data.items():  # a *_file key wins over its plain twin, as in the env
            plain = key.removesuffix("_file")
            if key.endswith("_file") and plain in _FILE_INPUTS and plain in keys:
                if not isinstance(path, str) or not path:
                    raise ConfigError(f"{key} in {where}", "expected a file path")
                values[plain] = _read_secret_file(f"{key} in {where}", path)
            elif key.endswith("_file") and plain in _FILE_INPUTS:
                _problem(f"{key} in {where}", "unknown key (a typo? see the README)")
        origin = _FROM_TOML.get()
        if origin is not None:
            origin.update(dict.fromkeys(values, where))
        return _to_fields(values)


def _input_keys() -> tuple[str, ...]:
    """The input keys, in field order: Settings' fields under their variables' names."""
    names = (_FIELD_VARIABLES.get(field, field.upper()).lower() for field in Settings.model_fields)
    return tuple(dict.fromkeys(names))


def _to_fields(values: Mapping[str, Any]) -> dict[str, Any]:
    """Input keys to model keys (``admin_addr`` stays: a model validator splits it)."""
    return {("signing_secrets" if key == "signing_secret" else key): v for key, v in values.items()}


def _duration_keys(model: type[BaseModel]) -> frozenset[str]:
    """Input keys of ``model`` that a duration validator checks."""
    fields: set[str] = set()
    for name, decorator in model.__pydantic_decorators__.field_validators.items():
        if name in _DURATION_VALIDATORS:
            fields.update(decorator.info.fields)
    return frozenset(_FIELD_VARIABLES.get(f, f.upper()).lower() for f in fields)


def _unitless(value: object) -> bool:
    """A bare number (or a list holding one) where a duration with a unit is due."""
    if isinstance(value, list | tuple):
        return any(_unitless(item) for item in value)
    return isinstance(value, int | float) and not isinstance(value, bool)


def _problem(name: str, reason: str) -> None:
    """Note a configuration error found while reading the inputs (reported with the rest)."""
    problems = _PROBLEMS.get()
    if problems is None:  # Settings() outside load_settings(): fail at once
        raise ConfigError(name, reason)
    problems.append((name, reason))


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

    Defaults are the README's, written in its syntax. Frozen: the running daemon shares one
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
    #: PostgreSQL: what a replica stores this long after a (re)subscription is held as long,
    #: so that other replicas' earlier events of the same users come first (SQLite: unused).
    reorder_window: float = parse_duration("1s")
    replicas: int = 1
    reconcile_interval: float | None = parse_duration("15m")
    log_level: str = "INFO"
    log_format: LogFormat = "json"
    pg_schema: str = "public"
    breaker_threshold: int = 5
    breaker_cooldown: float = parse_duration("30s")
    disable_after: float | None = parse_duration("5d")

    @property
    def store_schema(self) -> str | None:
        """The schema to open the PostgreSQL store in: RELAY_PG_SCHEMA when it was given;
        else None, so that a search_path the URL names (``options=-csearch_path%3D...``) is
        honoured, and PostgreSQL's default (``public``) otherwise."""
        return self.pg_schema if "pg_schema" in self.model_fields_set else None

    # Last: their validators fill each endpoint's defaults from the fields above.
    endpoints: tuple[EndpointConfig, ...] = ()
    alert_url: EndpointConfig | None = None

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

    @field_validator(
        "retention",
        "delivery_timeout",
        "shutdown_grace",
        "lease",
        "reorder_window",
        "breaker_cooldown",
        mode="before",
    )
    @classmethod
    def _check_duration(cls, value: object) -> float:
        return _duration(value)

    @field_validator("retry_schedule", mode="before")
    @classmethod
    def _check_schedule(cls, value: object) -> tuple[float, ...]:
        return _schedule(value)

    @field_validator("replicas", "breaker_threshold", mode="before")
    @classmethod
    def _check_replicas(cls, value: object) -> int:
        return _positive_int(value)

    @field_validator("disable_after", mode="before")
    @classmethod
    def _check_disable_after(cls, value: object) -> float | None:
        if value is None or (isinstance(value, str) and value.strip().lower() == "off"):
            return None
        return _duration(value)

    @field_validator("reconcile_interval", mode="before")
    @classmethod
    def _check_reconcile_interval(cls, value: object) -> float | None:
        if value is None or (isinstance(value, str) and value.strip().lower() == "off"):
            return None
        interval = _duration(value)
        if interval < MIN_RECONCILE_INTERVAL:
            # Each run lists every user over sFOX's REST API, whose limits are per IP.
            raise _Invalid(f"below the minimum of {MIN_RECONCILE_INTERVAL:g}s (or 'off')")
        return interval

    @field_validator("log_level", mode="before")
    @classmethod
    def _check_log_level(cls, value: object) -> str:
        level = value.strip().upper() if isinstance(value, str) else None
        if level not in _LOG_LEVELS:
            raise _Invalid("expected one of DEBUG, INFO, WARNING, ERROR")
        return level

    @field_validator("pg_schema", mode="before")
    @classmethod
    def _check_pg_schema(cls, value: object) -> str:
        name = _text(value)
        if not _PG_SCHEMA.fullmatch(name):
            raise _Invalid("expected a PostgreSQL identifier: letters, digits, _ (at most 63)")
        return name

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
        # A global default that failed validation is reported on its own; the endpoints are
        # still checked (with the contract's default in its place) so every error shows.
        defaults = {key: info.data[field] for key, field in sources.items() if field in info.data}
        endpoints: list[EndpointConfig] = []
        errors: list[_Invalid] = []
        names: dict[str, int] = {}
        for index, item in enumerate(items):
            where = f"{PREFIX}ENDPOINTS[{index}]"
            try:
                endpoint = (
                    item if isinstance(item, EndpointConfig) else _endpoint(item, where, defaults)
                )
            except _Invalid as exc:
                errors += [exc, *exc.others]
                continue
            if endpoint.name in names:
                errors.append(
                    _Invalid(
                        f"same name as {PREFIX}ENDPOINTS[{names[endpoint.name]}]; "
                        'names must be unique (set "name")',
                        f"{where}.name",
                    )
                )
            names[endpoint.name] = index
            endpoints.append(endpoint)
        if errors:
            raise _Invalid(errors[0].reason, errors[0].variable, tuple(errors[1:]))
        return tuple(endpoints)

    @field_validator("alert_url", mode="before")
    @classmethod
    def _check_alert_url(cls, value: object, info: ValidationInfo) -> EndpointConfig | None:
        where = f"{PREFIX}ALERT_URL"
        if value is None or isinstance(value, EndpointConfig):
            return value
        if isinstance(value, str) and value.strip().startswith("{"):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise _Invalid(
                    f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})", where
                ) from None
        if isinstance(value, str):
            value = {"url": value.strip()}
        if not isinstance(value, Mapping):
            raise _Invalid("expected an http(s) URL or an endpoint object", where)
        for key in value:
            if key not in _ALERT_KEYS:
                raise _Invalid(f"unknown key {str(key)!r} for the alert endpoint", where)
        if any(f not in info.data for f in ("delivery_timeout", "retry_schedule")):
            raise _Invalid("not checked: an earlier setting is invalid")
        defaults = {
            "name": DEFAULT_ALERT_NAME,
            "timeout": info.data["delivery_timeout"],
            "retry_schedule": info.data["retry_schedule"],
            "secrets": info.data.get("signing_secrets", ()),
        }
        endpoint = _endpoint(value, where, defaults)
        taken = {e.name for e in info.data.get("endpoints", ())}
        if endpoint.name in taken:
            raise _Invalid(
                'same name as an endpoint of RELAY_ENDPOINTS; names must be unique (set "name")',
                f"{where}.name",
            )
        return endpoint

    @model_validator(mode="after")
    def _check_together(self) -> Self:
        """Rules that span variables, each reported under the variable to change."""
        if self.alert_url is not None and not self.alert_url.secrets and not self.allow_unsigned:
            raise _Invalid(
                f"required: {PREFIX}ALERT_URL has no secret of its own (or set "
                f"{PREFIX}ALLOW_UNSIGNED=true to send unsigned alerts)",
                PREFIX + "SIGNING_SECRET",
            )
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
        return mask_url(self.store.get_secret_value())

    @property
    def all_endpoints(self) -> tuple[EndpointConfig, ...]:
        """The endpoints, and the alert endpoint last when there is one (it is dispatched
        like the others, but receives operational events only)."""
        return self.endpoints if self.alert_url is None else (*self.endpoints, self.alert_url)

    @property
    def needs_token_storage(self) -> bool:
        """Whether some endpoint needs user tokens kept (encrypted) until delivery."""
        return any(endpoint.user_token != "strip" for endpoint in self.endpoints)


def _endpoint(item: object, where: str, defaults: Mapping[str, object]) -> EndpointConfig:
    """One endpoint object from the configuration, with the global defaults filled in."""
    if not isinstance(item, Mapping):
        raise _Invalid("expected an object with at least a url", where)
    known = {("secret" if field == "secrets" else field) for field in EndpointConfig.model_fields}
    durations = _duration_keys(EndpointConfig)
    errors = [_Invalid(f"unknown key {str(key)!r}", where) for key in item if key not in known]
    errors += [
        _Invalid(_NOT_A_DURATION + " (a number needs a unit)", f"{where}.{key}")
        for key, value in item.items()
        if key in durations and _unitless(value)
    ]
    data = {
        ("secrets" if key == "secret" else key): v
        for key, v in item.items()
        if v is not None and key in known and not (key in durations and _unitless(v))
    }
    for key, default in defaults.items():
        data.setdefault(key, default)
    try:
        endpoint = EndpointConfig.model_validate(data)
    except ValidationError as exc:
        for error in exc.errors(include_url=False, include_input=False):
            loc = str(error["loc"][0]) if error["loc"] else None
            name = "secret" if loc == "secrets" else loc
            errors.append(_Invalid(_reason(error), f"{where}.{name}" if name else where))
    if errors:
        raise _Invalid(errors[0].reason, errors[0].variable, tuple(errors[1:]))
    return endpoint


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


def _errors(exc: ValidationError) -> list[tuple[str, str]]:
    """Every error, in field order (deterministic), as (variable, reason)."""
    found: list[tuple[str, str]] = []
    for error in exc.errors(include_url=False, include_input=False):
        cause = (error.get("ctx") or {}).get("error")
        if isinstance(cause, _Invalid) and cause.variable:
            found += [(e.variable or cause.variable, e.reason) for e in (cause, *cause.others)]
            continue
        field = str(error["loc"][0]) if error["loc"] else "CONFIG"
        found.append((PREFIX + _FIELD_VARIABLES.get(field, field.upper()), _reason(error)))
    return found


def _labelled(variable: str, toml: Mapping[str, str]) -> str:
    """``variable`` as the operator wrote it: a key the TOML file gave is named as such
    (``shutdown_grace in relay.toml``, ``endpoints[0].url in relay.toml``)."""
    match = re.fullmatch(re.escape(PREFIX) + r"([A-Z_]+)(.*)", variable)
    if match is None or match[1].lower() not in toml:
        return variable
    key = match[1].lower()
    return f"{key}{match[2]} in {toml[key]}"


# -- entry points --------------------------------------------------------------------------------


def load_settings(environ: Mapping[str, str] | None = None, *, for_run: bool = False) -> Settings:
    """The validated configuration, or ConfigError naming the first bad variable.

    Args:
        environ: the variables to read; ``os.environ`` when None.
        for_run: also require what only `relay run` needs (an API key and an endpoint).
    """
    problems: list[tuple[str, str]] = []
    toml: dict[str, str] = {}
    environ_map = os.environ if environ is None else environ
    tokens = (
        _ENVIRON.set(environ_map),
        _PROBLEMS.set(problems),
        _FROM_TOML.set(toml),
    )
    settings: Settings | None = None
    try:
        settings = Settings()
    except ValidationError as exc:  # not chained: its text quotes the input values
        for key in list(toml):  # the environment won over these
            variable = PREFIX + key.upper()
            if environ_map.get(variable) or environ_map.get(variable + "_FILE"):
                del toml[key]
        problems += [(_labelled(name, toml), why) for name, why in _errors(exc)]
    finally:
        _FROM_TOML.reset(tokens[2])
        _PROBLEMS.reset(tokens[1])
        _ENVIRON.reset(tokens[0])
    if problems or settings is None:
        unique = tuple(dict.fromkeys(problems))
        raise ConfigError(*unique[0], more=unique[1:]) from None
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
        "ws_url": mask_url(settings.ws_url, strict=True),
        "api_url": mask_url(settings.api_url, strict=True),
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
        "reorder_window": _format_duration(settings.reorder_window),
        "replicas": settings.replicas,
        "reconcile_interval": "off"
        if settings.reconcile_interval is None
        else _format_duration(settings.reconcile_interval),
        "log_level": settings.log_level,
        "log_format": settings.log_format,
        "pg_schema": settings.pg_schema,
        "breaker_threshold": settings.breaker_threshold,
        "breaker_cooldown": _format_duration(settings.breaker_cooldown),
        "disable_after": "off"
        if settings.disable_after is None
        else _format_duration(settings.disable_after),
        "alert_url": None if settings.alert_url is None else _describe_endpoint(settings.alert_url),
    }


def warnings(settings: Settings) -> list[str]:
    """What is allowed but most likely a mistake: logged at start-up, shown by `relay check`.

    Lines name the variable and never a secret.
    """
    found: list[str] = []
    for index, endpoint in enumerate(settings.endpoints):
        where = f"{PREFIX}ENDPOINTS[{index}]"
        for status in sorted((endpoint.statuses or frozenset()) - KNOWN_STATUSES):
            found.append(
                f"{where}.statuses: sFOX is not known to send {status!r} "
                f"(known: {', '.join(sorted(KNOWN_STATUSES))}); this filter may match nothing"
            )
        scheme = urlsplit(endpoint.url.get_secret_value()).scheme
        if endpoint.user_token == "forward" and scheme in _PLAINTEXT_SCHEMES:
            found.append(
                f"{where}.user_token: forward sends user tokens in plaintext ({scheme}://); "
                "use https or the encrypt policy"
            )
    return found


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
        "retry_statuses": sorted(endpoint.retry_statuses),
        "rate_limit": endpoint.rate_limit,
        "fields": None if endpoint.fields is None else list(endpoint.fields),
        "ca_file": endpoint.ca_file,
        "client_cert": endpoint.client_cert,
        "client_key": endpoint.client_key,
        "proxy": _proxy_display(endpoint.proxy),
    }


def _proxy_display(proxy: SecretStr | None) -> str | None:
    """``none``, or the proxy URL with its credentials and query values masked."""
    if proxy is None:
        return None
    text = proxy.get_secret_value()
    return text if text == "none" else mask_url(text, strict=True)


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


def secret_values(settings: Settings) -> list[str]:
    """Every secret string in ``settings``, longest first, for the log redactor to scrub."""
    found: list[str] = []
    for secret in (settings.api_key, settings.admin_token):
        if secret is not None:
            found.append(secret.get_secret_value())
    found += _whsec_parts(settings.signing_secrets)
    found += _key_texts(settings.token_key)
    found += url_secrets(settings.store.get_secret_value())
    found += url_secrets(settings.ws_url, strict=True)
    found += url_secrets(settings.api_url, strict=True)
    for endpoint in settings.all_endpoints:
        found += _whsec_parts(endpoint.secrets)
        found += _key_texts(endpoint.token_key)
        found += [value.get_secret_value() for value in endpoint.headers.values()]
        found += url_secrets(endpoint.url.get_secret_value(), strict=True)
        if endpoint.proxy is not None:
            found += url_secrets(endpoint.proxy.get_secret_value(), strict=True)
    unique = {text for text in found if text}
    return sorted(unique, key=lambda text: (-len(text), text))
