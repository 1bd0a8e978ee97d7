"""OpenTelemetry tracing (CONTRACT.md 6b) behind a facade that costs nothing when it is off.

Tracing is on when ``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is
set and ``OTEL_SDK_DISABLED`` is not ``true``. Only then is OpenTelemetry imported (the
``sfox-relay[otel]`` extra): without it the relay loads no tracing code and sends no
``traceparent``, and every call below is an empty method on :data:`OFF`.

Spans:

- ``relay.ingest``: one per committed feed batch; ``relay.reconcile``: one per reconciliation
  run (and ``relay.alert`` for operational events). These are *sources*: the events stored
  while one is current remember its span context.
- ``relay.deliver``: one per delivery attempt, a root span linked to the source that stored
  its event, whose W3C ``traceparent`` (or whatever ``OTEL_PROPAGATORS`` selects) every request
  of the attempt carries. Endpoints are named by name, never by URL.

The link from an attempt to its source is kept in this process only, in a bounded map (the
last :data:`LINKS_KEPT` events stored): a retry hours later, a delivery claimed by another
replica, or one after a restart carries no link. Persisting span contexts in the store would
cost a column and a migration on every backend for a link that trace backends drop within
days anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

from relay.errors import ConfigError

if TYPE_CHECKING:  # types only: importing OpenTelemetry is what "off" must never do
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span as OtelSpan
    from opentelemetry.trace import SpanContext, Tracer

__all__ = ["LINKS_KEPT", "OFF", "Attempt", "Source", "Tracing", "enabled", "from_environment"]

#: How many stored events remember the span that stored them (about 220 bytes each).
LINKS_KEPT = 16_384
SERVICE_NAME = "sfox-relay"


def enabled(environ: Mapping[str, str]) -> bool:
    """Whether the standard variables ask for traces to be exported."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return bool(
        environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


class Source:
    """The span of a batch, reconciliation or alert; this base records nothing."""

    __slots__ = ()

    def set(self, key: str, value: int | str) -> None:
        """Add an attribute once the batch knows it (how many were stored)."""


class Attempt:
    """The span of one delivery attempt; this base records and sends nothing."""

    __slots__ = ()

    def inject(self, headers: dict[str, str]) -> None:
        """Add the attempt's propagation headers (``traceparent``) to an outgoing request."""

    def finish(self, status: int | None, error: str | None) -> None:
        """End the span with the endpoint's answer or the failure."""


_SOURCE = Source()
_ATTEMPT = Attempt()


class Tracing:
    """Tracing switched off: every method returns at once. :func:`from_environment` decides."""

    @contextlib.contextmanager
    def source(self, name: str) -> Iterator[Source]:
        """Make ``name`` (``relay.ingest``, ``relay.reconcile``...) current while storing."""
        yield _SOURCE

    def stored(self, event_ids: Iterable[str]) -> None:
        """Remember that the current source stored these events (their attempts link to it)."""

    def deliver(self, endpoint: str, event_id: str, attempt: int) -> Attempt:
        """Start the span of one attempt; call :meth:`Attempt.finish` when it is over."""
        return _ATTEMPT

    async def close(self) -> None:
        """Export what is still buffered."""


#: The tracing of a relay that was not asked to trace.
OFF = Tracing()


def from_environment() -> Tracing:
    """:data:`OFF`, or an OTLP/HTTP exporting tracer configured by the ``OTEL_*`` variables."""
    if not enabled(os.environ):
        return OFF
    try:
        return _Otel()
    except ImportError:
        traces = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
        variable = traces if os.environ.get(traces) else "OTEL_EXPORTER_OTLP_ENDPOINT"
        raise ConfigError(
            variable, "tracing needs OpenTelemetry: pip install 'sfox-relay[otel]'"
        ) from None


class _OtelSource(Source):
    __slots__ = ("_span",)

    def __init__(self, span: OtelSpan) -> None:
        self._span = span

    def set(self, key: str, value: int | str) -> None:
        self._span.set_attribute(key, value)


class _OtelAttempt(Attempt):
    __slots__ = ("_otel", "_span")

    def __init__(self, otel: _Otel, span: OtelSpan) -> None:
        self._otel = otel
        self._span = span

    def inject(self, headers: dict[str, str]) -> None:
        otel = self._otel
        otel.inject(headers, context=otel.in_context(self._span))

    def finish(self, status: int | None, error: str | None) -> None:
        span = self._span
        if status is not None:
            span.set_attribute("http.response.status_code", status)
        if error is not None:
            # Only the kind ("connection failed", "timeout after 15s"): the detail may name
            # the endpoint's host (asyncio's "Connect call failed ('10.0.0.7', 443)"); it
            # stays with the delivery's attempts in the store.
            error = error.partition(":")[0]
            span.set_attribute("relay.error", error)
        if status is None or status >= 300:
            span.set_status(self._otel.error, error or f"HTTP {status}")
        span.end()


class _Otel(Tracing):
    """The SDK with a batching OTLP/HTTP exporter; its own provider, not the global one."""

    def __init__(self) -> None:
        from opentelemetry import propagate
        from opentelemetry.context import Context
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace import (
            Link,
            SpanKind,
            StatusCode,
            get_current_span,
            set_span_in_context,
        )

        from relay import __version__

        resource = Resource.create({"service.version": __version__})
        if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
            # OTEL_SERVICE_NAME (or service.name in OTEL_RESOURCE_ATTRIBUTES) wins when set.
            resource = resource.merge(Resource({"service.name": SERVICE_NAME}))
        self._provider: TracerProvider = TracerProvider(resource=resource)
        self._provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        self._tracer: Tracer = self._provider.get_tracer("relay", __version__)
        self._links: OrderedDict[str, SpanContext] = OrderedDict()
        self._root = Context()
        self._link = Link
        self._client = SpanKind.CLIENT
        self._current = get_current_span
        # What each attempt needs, bound once: the hot path does no imports or lookups.
        self.inject = propagate.inject  # the propagators OTEL_PROPAGATORS names
        self.in_context = set_span_in_context
        self.error = StatusCode.ERROR

    @contextlib.contextmanager
    def source(self, name: str) -> Iterator[Source]:
        with self._tracer.start_as_current_span(name, context=self._root) as span:
            yield _OtelSource(span)

    def stored(self, event_ids: Iterable[str]) -> None:
        context = self._current().get_span_context()
        if not context.is_valid:
            return
        links = self._links
        for event_id in event_ids:
            links[event_id] = context
            links.move_to_end(event_id)
        while len(links) > LINKS_KEPT:
            links.popitem(last=False)

    def deliver(self, endpoint: str, event_id: str, attempt: int) -> Attempt:
        source = self._links.get(event_id)
        span = self._tracer.start_span(
            "relay.deliver",
            context=self._root,
            kind=self._client,
            attributes={
                "relay.endpoint": endpoint,
                "relay.event_id": event_id,
                "relay.attempt": attempt,
            },
            links=[self._link(source)] if source is not None else None,
        )
        return _OtelAttempt(self, span)

    async def close(self) -> None:
        # The SDK exports from its own thread and flushes synchronously.
        await asyncio.to_thread(self._provider.shutdown)
