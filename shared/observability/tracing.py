"""OpenTelemetry setup and W3C `traceparent` propagation through NATS headers.

One trace per IKE exchange: ingress starts the span when a datagram arrives and
every hop (ike, keystore, kernel) continues it from the `traceparent` header of
the bus message it handles.

Spans are on every bus message's path, so they must be cheap: tracers are made
once per provider and name (the SDK's `get_tracer` costs tens of microseconds),
and without an exporter the provider samples nothing: spans still get their
trace and span ids (log lines carry them, `traceparent` propagates them) but
record no attributes or events nobody would read.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_propagator = TraceContextTextMapPropagator()
_provider: TracerProvider | None = None
# (provider, name) -> its tracer; the provider is part of the key, so a provider swapped in
# (a test's in-memory exporter) gets tracers of its own
_tracers: dict[tuple[Any, str], trace.Tracer] = {}


def configure_tracing(
    service: str, instance: str, otlp_endpoint: str = "", exporter: SpanExporter | None = None
) -> TracerProvider:
    """Install a tracer provider; spans are exported only when an endpoint or exporter is given."""
    global _provider
    resource = Resource.create(
        {"service.name": f"ikefarm-{service}", "service.instance.id": instance}
    )
    if exporter is None and otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=otlp_endpoint.rstrip("/") + "/v1/traces")
    if exporter is not None:
        provider = TracerProvider(resource=resource)
        provider.add_span_processor(BatchSpanProcessor(exporter))
    else:  # nothing would read a recorded span: ids only (see the module docstring)
        provider = TracerProvider(resource=resource, sampler=ALWAYS_OFF)
    _provider = provider
    _tracers.clear()
    return provider


def tracer(name: str = "ikefarm") -> trace.Tracer:
    """The tracer `name` of the configured provider (else the global one), made once."""
    source: Any = _provider if _provider is not None else trace
    key = (source, name)
    found = _tracers.get(key)
    if found is None:
        if len(_tracers) > 64:  # providers swapped in and out: forget the old ones
            _tracers.clear()
        found = _tracers[key] = source.get_tracer(name)
    return found


def shutdown_tracing() -> None:
    if _provider is not None:
        _provider.shutdown()


def inject_headers(headers: dict[str, str] | None = None) -> dict[str, str]:
    """Headers carrying the current span as `traceparent` (and `tracestate`)."""
    carrier: dict[str, str] = dict(headers or {})
    _propagator.inject(carrier)
    return carrier


def extract_context(headers: Mapping[str, str] | None) -> otel_context.Context:
    return _propagator.extract(dict(headers or {}))


def traceparent_of(span: Any) -> str:
    carrier: dict[str, str] = {}
    _propagator.inject(carrier, context=trace.set_span_in_context(span))
    return carrier.get("traceparent", "")
