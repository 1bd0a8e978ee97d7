"""Tracing (CONTRACT.md 6b): spans exported over OTLP/HTTP to a real receiver, or nothing at all.

The OTLP receiver is a small aiohttp server on port 0 decoding what the relay's exporter sends
with opentelemetry-proto; the relay runs in-process against the simulator and the webhook
receiver. Whether OpenTelemetry is loaded at all is checked in subprocesses, since this
process may have imported it for another test.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from conftest import EnvBuilder, run_relay
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from relay import tracing
from relay.errors import ConfigError
from relay.receiver import Receiver
from relay.simulator import Simulator

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class ExportedSpan:
    name: str
    trace_id: str
    span_id: str
    attributes: dict[str, Any]
    links: list[tuple[str, str]]
    error: bool
    resource: dict[str, Any]


def _value(value: AnyValue) -> Any:
    return getattr(value, value.WhichOneof("value") or "string_value")


class OtlpReceiver:
    """An OTLP/HTTP trace endpoint (POST /v1/traces, protobuf) that keeps every span."""

    def __init__(self) -> None:
        self.spans: list[ExportedSpan] = []
        self.requests = 0
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/traces", self._export)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _export(self, request: web.Request) -> web.Response:
        data = await request.read()
        encoding = request.headers.get("content-encoding", "")
        if encoding == "gzip":
            data = gzip.decompress(data)
        elif encoding == "deflate":
            data = zlib.decompress(data)
        message = ExportTraceServiceRequest()
        message.ParseFromString(data)
        self.requests += 1
        for resource_spans in message.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    self.spans.append(
                        ExportedSpan(
                            name=span.name,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            attributes={a.key: _value(a.value) for a in span.attributes},
                            links=[(lk.trace_id.hex(), lk.span_id.hex()) for lk in span.links],
                            error=span.status.code == span.status.STATUS_CODE_ERROR,
                            resource=resource,
                        )
                    )
        body = ExportTraceServiceResponse().SerializeToString()
        return web.Response(body=body, content_type="application/x-protobuf")

    def named(self, name: str) -> list[ExportedSpan]:
        return [s for s in self.spans if s.name == name]


@pytest.fixture
async def otlp(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[OtlpReceiver]:
    """A running OTLP receiver, and the standard variables pointing the relay at it."""
    receiver = OtlpReceiver()
    await receiver.start()
    for name in ("OTEL_SDK_DISABLED", "OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url)
    try:
        yield receiver
    finally:
        await receiver.close()


@pytest.mark.parametrize(
    ("environ", "on"),
    [
        ({}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": ""}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "TRUE"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "false"}, True),
        ({"OTEL_SERVICE_NAME": "x"}, False),
    ],
)
def test_enabled_only_by_an_exporter_endpoint(environ: dict[str, str], on: bool) -> None:
    assert tracing.enabled(environ) is on


_PROBE = """
import json, sys
from relay.app import Relay
from relay.config import load_settings
settings = load_settings({
    "RELAY_API_KEY": "k" * 20,
    "RELAY_ENDPOINTS": "http://127.0.0.1:9/hook",
    "RELAY_ALLOW_UNSIGNED": "true",
    "RELAY_STORE": "sqlite:///" + sys.argv[1],
}, for_run=True)
relay = Relay(settings)
attempt = relay.tracing.deliver("hook", "evt_1", 1)
headers = {}
attempt.inject(headers)
print(json.dumps({
    "loaded": sorted(m for m in sys.modules if m.split(".")[0] in ("opentelemetry", "google")),
    "headers": headers,
}))
"""

#: FastAPI (from 0.16x) imports OpenTelemetry's API for its own request spans, whether or not
#: anyone traces: that much is loaded before the relay decides anything.
_FRAMEWORK = """
import json, sys
import fastapi.applications, fastapi.routing
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("opentelemetry", "google"))))
"""


def _python(code: str, *args: str, **otel: str) -> Any:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(otel)
    out = subprocess.run(
        [sys.executable, "-c", code, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(out.stdout)


def _probe(tmp_path: Path, **otel: str) -> dict[str, Any]:
    result: dict[str, Any] = _python(_PROBE, str(tmp_path / "relay.db"), **otel)
    return result


def _tracing_code(modules: list[str]) -> list[str]:
    """The SDK, its exporters, protobuf: what only exporting spans needs."""
    heavy = ("opentelemetry.sdk", "opentelemetry.exporter", "opentelemetry.proto", "google")
    return [m for m in modules if m.startswith(heavy)]


@pytest.mark.slow
def test_without_the_variable_no_tracing_code_is_loaded_and_no_traceparent(
    tmp_path: Path,
) -> None:
    framework = set(_python(_FRAMEWORK))
    off = _probe(tmp_path)
    disabled = _probe(
        tmp_path, OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:9", OTEL_SDK_DISABLED="true"
    )
    for probe in (off, disabled):
        assert probe["headers"] == {}
        assert _tracing_code(probe["loaded"]) == []
        assert set(probe["loaded"]) <= framework  # the relay itself loaded nothing more
    # The same probe sees the SDK, the exporter and a traceparent once asked to trace.
    on = _probe(tmp_path, OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:9")
    assert "opentelemetry.sdk.trace" in on["loaded"]
    assert "opentelemetry.exporter.otlp.proto.http.trace_exporter" in on["loaded"]
    assert set(on["headers"]) == {"traceparent"}


@pytest.mark.slow
def test_otel_propagators_is_honoured(tmp_path: Path) -> None:
    endpoint = "http://127.0.0.1:9"
    none = _probe(tmp_path, OTEL_EXPORTER_OTLP_ENDPOINT=endpoint, OTEL_PROPAGATORS="none")
    assert none["headers"] == {}
    both = _probe(
        tmp_path, OTEL_EXPORTER_OTLP_ENDPOINT=endpoint, OTEL_PROPAGATORS="tracecontext,baggage"
    )
    assert list(both["headers"]) == ["traceparent"]


def test_off_is_shared_and_inert() -> None:
    attempt = tracing.OFF.deliver("hook", "evt_1", 1)
    headers: dict[str, str] = {}
    attempt.inject(headers)
    attempt.finish(204, None)
    with tracing.OFF.source("relay.ingest") as span:
        span.set("relay.messages", 3)
        tracing.OFF.stored(["evt_1"])
    assert headers == {}
    assert attempt is tracing.OFF.deliver("other", "evt_2", 2)


async def test_links_are_bounded(otlp: OtlpReceiver, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tracing, "LINKS_KEPT", 3)
    traced = tracing.from_environment()
    with traced.source("relay.ingest"):
        traced.stored([f"evt_{n}" for n in range(5)])
    traced.stored(["evt_9"])  # outside any source: nothing to link to
    await traced.close()
    kept = traced._links  # type: ignore[attr-defined]
    assert list(kept) == ["evt_2", "evt_3", "evt_4"]


def _traceparent(value: str) -> tuple[str, str]:
    version, trace_id, span_id, flags = value.split("-")
    assert version == "00" and int(flags, 16) & 1  # sampled
    return trace_id, span_id


@pytest.mark.parametrize("sim", [{"count": 30, "users": 6}], indirect=True)
async def test_spans_links_and_traceparent_reach_a_real_otlp_receiver(
    otlp: OtlpReceiver, sim: Simulator, receiver: Receiver, relay_env: EnvBuilder
) -> None:
    endpoints = [
        {"name": "main", "url": receiver.url + "/webhooks/sfox"},
        # Nothing listens there: every attempt is a connection error, dead at once.
        {"name": "gone", "url": "http://127.0.0.1:9/hook", "retry_schedule": "0s"},
    ]
    # No breaker: every event is attempted once on "gone" too (one span per attempt).
    env = relay_env(RELAY_ENDPOINTS=json.dumps(endpoints), RELAY_BREAKER_THRESHOLD="100000")
    async with run_relay(env) as relay:
        await receiver.wait_for(30, timeout=10)
        report = await relay.reconciler.run_once(emit_all=True)
        emitted = report.emitted
        assert emitted > 0
        total = 30 + emitted
        await receiver.wait_for(total, timeout=10)
    # The relay's stop flushed every span.
    ingest = {(s.trace_id, s.span_id): s for s in otlp.named("relay.ingest")}
    reconcile = {(s.trace_id, s.span_id): s for s in otlp.named("relay.reconcile")}
    deliver = otlp.named("relay.deliver")
    assert ingest and len(reconcile) == 1
    assert sum(s.attributes["relay.stored"] for s in ingest.values()) == 30
    assert sum(s.attributes["relay.messages"] for s in ingest.values()) == 30
    assert next(iter(reconcile.values())).attributes["relay.emitted"] == emitted
    assert {s.resource["service.name"] for s in otlp.spans} == {"sfox-relay"}

    # One span per attempt to "main" (all 204) and to "gone" (all connection errors).
    by_endpoint: dict[str, list[ExportedSpan]] = {"main": [], "gone": []}
    for span in deliver:
        by_endpoint[span.attributes["relay.endpoint"]].append(span)
    assert len(by_endpoint["main"]) == total and len(by_endpoint["gone"]) == total
    for span in by_endpoint["main"]:
        assert span.attributes["http.response.status_code"] == 204
        assert span.attributes["relay.attempt"] == 1
        assert not span.error
    for span in by_endpoint["gone"]:
        assert "http.response.status_code" not in span.attributes
        assert span.attributes["relay.error"] == "connection failed"
        assert span.error
    # Endpoints are named, never located.
    for span in otlp.spans:
        for value in span.attributes.values():
            assert "127.0.0.1" not in str(value) and "webhooks" not in str(value)

    # The request the receiver got carries the traceparent of the span exported for it, and
    # that span links to the batch (or reconciliation) that stored its event.
    spans = {(s.trace_id, s.span_id): s for s in deliver}
    sources = {"feed": ingest, "reconcile": reconcile}
    assert len(receiver.received) == total
    for got in receiver.received:
        span = spans[_traceparent(got.headers["traceparent"])]
        assert span.attributes["relay.event_id"] == got.headers["webhook-id"]
        assert span.attributes["relay.endpoint"] == "main"
        assert len(span.links) == 1
        assert span.links[0] in sources[got.headers["relay-source"]]
    assert len({got.headers["traceparent"] for got in receiver.received}) == total


async def test_service_name_comes_from_otel_service_name(
    otlp: OtlpReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_SERVICE_NAME", "relay-eu")
    traced = tracing.from_environment()
    traced.deliver("hook", "evt_1", 1).finish(500, None)
    await traced.close()
    (span,) = otlp.spans
    assert span.resource["service.name"] == "relay-eu"
    assert span.error and span.attributes["http.response.status_code"] == 500
    assert span.links == []  # no source stored evt_1 in this process


def test_without_the_extra_tracing_is_a_configuration_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)
    with pytest.raises(ConfigError) as caught:
        tracing.from_environment()
    assert caught.value.variable == "OTEL_EXPORTER_OTLP_ENDPOINT"
    assert "sfox-relay[otel]" in caught.value.reason


async def test_an_alert_is_stored_under_a_relay_alert_span_its_attempt_links_to(
    otlp: OtlpReceiver, sim: Simulator, receiver: Receiver, relay_env: EnvBuilder
) -> None:
    endpoints = [{"name": "gone", "url": "http://127.0.0.1:9/hook"}]
    env = relay_env(
        RELAY_ENDPOINTS=json.dumps(endpoints),
        RELAY_ALERT_URL=receiver.url + "/alerts",
        RELAY_BREAKER_THRESHOLD="2",
    )
    async with run_relay(env):
        await receiver.wait_for(1, timeout=15)  # endpoint.opened, at the alert endpoint
    (got,) = [r for r in receiver.received if json.loads(r.body)["type"] == "endpoint.opened"]
    assert got.headers["relay-source"] == "relay"
    alert_spans = {(s.trace_id, s.span_id): s for s in otlp.named("relay.alert")}
    assert alert_spans
    delivered = {(s.trace_id, s.span_id): s for s in otlp.named("relay.deliver")}
    span = delivered[_traceparent(got.headers["traceparent"])]
    assert span.attributes["relay.endpoint"] == "alerts"
    assert span.attributes["relay.event_id"] == got.headers["webhook-id"]
    assert len(span.links) == 1 and span.links[0] in alert_spans
