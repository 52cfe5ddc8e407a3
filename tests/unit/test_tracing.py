"""Tracing setup: spans stay cheap on the bus path and still carry their ids."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from ikefarm.shared.observability import tracing


@pytest.fixture
def _restore_provider() -> Iterator[None]:
    previous = tracing._provider
    yield
    tracing._provider = previous
    tracing._tracers.clear()


@pytest.mark.usefixtures("_restore_provider")
def test_without_an_exporter_spans_record_nothing_but_propagate_their_ids() -> None:
    tracing.configure_tracing("ike", "ike-test")
    parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    context = tracing.extract_context({"traceparent": parent})
    with tracing.tracer().start_as_current_span("ike.datagram", context=context) as span:
        assert not span.is_recording()
        headers = tracing.inject_headers()
    version, trace_id, span_id, _flags = headers["traceparent"].split("-")
    assert version == "00" and trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert span_id != "00f067aa0ba902b7" and int(span_id, 16) != 0  # a span of its own


@pytest.mark.usefixtures("_restore_provider")
def test_with_an_exporter_spans_are_recorded_and_exported() -> None:
    exporter = InMemorySpanExporter()
    provider = tracing.configure_tracing("ike", "ike-test", exporter=exporter)
    with tracing.tracer().start_as_current_span("ike.datagram") as span:
        assert span.is_recording()
    provider.force_flush()
    assert [s.name for s in exporter.get_finished_spans()] == ["ike.datagram"]


@pytest.mark.usefixtures("_restore_provider")
def test_a_tracer_is_made_once_per_provider_and_a_swapped_provider_gets_its_own() -> None:
    tracing.configure_tracing("ike", "ike-test")
    first = tracing.tracer()
    assert tracing.tracer() is first
    assert tracing.tracer("other") is not first
    exporter = InMemorySpanExporter()
    swapped = TracerProvider()
    swapped.add_span_processor(SimpleSpanProcessor(exporter))
    tracing._provider = swapped  # as the service tests swap in their own provider
    with tracing.tracer().start_as_current_span("swapped"):
        pass
    assert [s.name for s in exporter.get_finished_spans()] == ["swapped"]
