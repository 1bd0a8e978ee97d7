"""Broker URLs, pure: which broker, where, and what a message there carries (CONTRACT 4b).

Parsing is shared by configuration (a bad URL is refused at start-up, naming
``RELAY_ENDPOINTS[i].url``) and by the senders (which connect to what it names). Reasons never
echo the URL: it may carry a password.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote, urlsplit

__all__ = [
    "BROKER_SCHEMES",
    "PLAINTEXT_SCHEMES",
    "TLS_SCHEMES",
    "AmqpTarget",
    "NatsTarget",
    "RedisTarget",
    "Target",
    "NAME",
    "default_name",
    "slug",
    "is_broker",
    "message_headers",
    "parse",
]

AMQP_SCHEMES = ("amqp", "amqps")
NATS_SCHEMES = ("nats", "tls")
REDIS_SCHEMES = ("redis", "rediss")
BROKER_SCHEMES = AMQP_SCHEMES + NATS_SCHEMES + REDIS_SCHEMES
TLS_SCHEMES = ("amqps", "tls", "rediss")
PLAINTEXT_SCHEMES = ("amqp", "nats", "redis")
# Schemes of Redis deployments the relay cannot publish to with one connection.
_REDIS_TOPOLOGIES = ("redis+sentinel", "redis-sentinel", "sentinel", "redis+cluster")
_DEFAULT_PORTS = {
    "amqp": 5672,
    "amqps": 5671,
    "nats": 4222,
    "tls": 4222,
    "redis": 6379,
    "rediss": 6379,
}
_QUERY_KEYS = {"amqp": ("exchange", "routing_key"), "redis": ("stream", "maxlen"), "nats": ()}
# The order CONTRACT 4b gives; the endpoint's own headers follow. HTTP-only headers
# (user-agent, sfox-timestamp) are not part of a message.
MESSAGE_HEADERS = (
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
    "relay-source",
    "content-type",
    "traceparent",
)
_SUBJECT_TOKEN = re.compile(r"[^\s.*>]+")
_SLUG = re.compile(r"[^A-Za-z0-9._:-]")
#: What an endpoint name is made of (CONTRACT 3).
NAME = re.compile(r"[A-Za-z0-9._:-]+")


def slug(text: str) -> str:
    """``text`` as an endpoint name: every character outside :data:`NAME`'s set becomes -."""
    return _SLUG.sub("-", text)


@dataclass(frozen=True, slots=True)
class AmqpTarget:
    """RabbitMQ: publish to ``exchange`` ('' is the default exchange) with ``routing_key``
    (None: the event's feed name)."""

    url: str  # for the client: scheme, credentials, host, port and vhost, no query
    host: str
    port: int
    exchange: str
    routing_key: str | None
    tls: bool


@dataclass(frozen=True, slots=True)
class NatsTarget:
    """NATS JetStream: publish to ``subject``; a stream bound to it stores the message."""

    url: str  # scheme, credentials, host and port: the server to connect to
    host: str
    port: int
    subject: str
    tls: bool


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """Redis Streams: ``XADD stream [MAXLEN ~ maxlen] *`` on database ``db``."""

    url: str  # scheme, credentials, host, port and database, no query
    host: str
    port: int
    db: int
    stream: str
    maxlen: int | None
    tls: bool


Target = AmqpTarget | NatsTarget | RedisTarget


def is_broker(url: str) -> bool:
    """Whether ``url`` names a message broker rather than an HTTP endpoint."""
    return url.partition(":")[0].strip().lower() in BROKER_SCHEMES + _REDIS_TOPOLOGIES


def parse(url: str) -> Target:
    """The broker ``url`` names; ValueError with a reason safe to show otherwise."""
    scheme = url.partition(":")[0].strip().lower()
    if scheme in _REDIS_TOPOLOGIES:
        raise ValueError("Redis Sentinel and Cluster URLs are not supported: name one server")
    if "," in url.partition("?")[0]:
        raise ValueError("one broker host is required (server lists are not supported)")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ValueError("not a valid broker URL") from None
    if scheme not in BROKER_SCHEMES or any(c <= " " for c in url) or parts.fragment:
        raise ValueError("not a valid broker URL")
    host = parts.hostname or ""
    if not host:
        raise ValueError("one broker host is required (server lists are not supported)")
    port = port or _DEFAULT_PORTS[scheme]
    family = {"amqps": "amqp", "tls": "nats", "rediss": "redis"}.get(scheme, scheme)
    query = _query(parts.query, _QUERY_KEYS[family])
    base = f"{scheme}://{parts.netloc}"
    tls = scheme in TLS_SCHEMES
    if family == "amqp":
        vhost = parts.path[1:] if parts.path.startswith("/") else parts.path
        routing_key = query.get("routing_key")
        if routing_key == "":
            raise ValueError("routing_key is empty (leave it out for the event's feed name)")
        return AmqpTarget(
            url=f"{base}/{vhost}" if vhost else base,
            host=host,
            port=port,
            exchange=query.get("exchange", ""),
            routing_key=routing_key,
            tls=tls,
        )
    if family == "nats":
        subject = unquote(parts.path.lstrip("/"))
        if not subject:
            raise ValueError("a subject is required, e.g. nats://host:4222/sfox.users")
        if not all(_SUBJECT_TOKEN.fullmatch(token) for token in subject.split(".")):
            raise ValueError("not a subject to publish to (no '*', '>', spaces or empty tokens)")
        return NatsTarget(url=base, host=host, port=port, subject=subject, tls=tls)
    db_text = parts.path.strip("/") or "0"
    if not db_text.isascii() or not db_text.isdigit():
        raise ValueError("the path must be a database number, e.g. /0")
    stream = query.get("stream", "")
    if not stream:
        raise ValueError("stream is required, e.g. redis://host:6379/0?stream=sfox-users")
    maxlen = query.get("maxlen")
    if maxlen is not None and not (maxlen.isascii() and maxlen.isdigit() and int(maxlen) > 0):
        raise ValueError("maxlen must be a whole number above 0")
    return RedisTarget(
        url=f"{base}/{int(db_text)}",
        host=host,
        port=port,
        db=int(db_text),
        stream=stream,
        maxlen=int(maxlen) if maxlen is not None else None,
        tls=tls,
    )


def _query(query: str, allowed: tuple[str, ...]) -> dict[str, str]:
    """The query's parameters; an unknown or repeated one is refused (by name, never value)."""
    values: dict[str, str] = {}
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name not in allowed:
            known = ", ".join(allowed) or "none"
            raise ValueError(f"unknown query parameter {name!r} (known: {known})")
        if name in values:
            raise ValueError(f"query parameter {name!r} given twice")
        values[name] = value
    return values


def default_name(target: Target) -> str:
    """Host, port and destination, slugged (CONTRACT 3 ``name``); never any credentials."""
    pieces = [f"{target.host}:{target.port}"]
    if isinstance(target, AmqpTarget):
        pieces += [p for p in (target.exchange, target.routing_key) if p]
    elif isinstance(target, NatsTarget):
        pieces.append(target.subject)
    else:
        pieces.append(target.stream)
    return slug("-".join(pieces))


def message_headers(headers: Mapping[str, str], own: Iterable[str]) -> list[tuple[str, str]]:
    """A message's headers: CONTRACT 4b's, in its order, then the endpoint's ``own`` names.

    ``headers`` is what the dispatcher built for the attempt (HTTP's set); names it holds
    that a message does not carry (user-agent) are left out.
    """
    pairs = [(name, headers[name]) for name in MESSAGE_HEADERS if name in headers]
    taken = set(MESSAGE_HEADERS)
    for name in own:
        if name in headers and name.lower() not in taken:
            pairs.append((name, headers[name]))
    return pairs
