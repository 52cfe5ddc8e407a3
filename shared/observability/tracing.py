"""OpenTelemetry setup and W3C `traceparent` propagation through NATS headers.

One trace per IKE exchange: ingress starts the span when a datagram arrives and
every hop (ike, keystore, kernel) continues it from the `traceparent` header of
the bus message it handles.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_propagator = TraceContextTextMapPropagator()
_provider: TracerProvider | None = None
# one Tracer per name and provider: get_tracer builds a new one each call (~9 us), and
# tracer() runs once per datagram and bus message
_tracers: dict[str, tuple[TracerProvider, trace.Tracer]] = {}


def configure_tracing(
    service: str, instance: str, otlp_endpoint: str = "", exporter: SpanExporter | None = None
) -> TracerProvider:
    """Install a tracer provider; spans are exported only when an endpoint or exporter is given."""
    global _provider
    resource = Resource.create(
        {"service.name": f"ikefarm-{service}", "service.instance.id": instance}
    )
    provider = TracerProvider(resource=resource)
    if exporter is None and otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=otlp_endpoint.rstrip("/") + "/v1/traces")
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    _provider = provider
    return provider


def tracer(name: str = "ikefarm") -> trace.Tracer:
    if _provider is None:
        return trace.get_tracer(name)
    found = _tracers.get(name)
    if found is None or found[0] is not _provider:  # a provider installed since
        found = _tracers[name] = (_provider, _provider.get_tracer(name))
    return found[1]


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
