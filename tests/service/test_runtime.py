"""The service runtime against a real nats-server: discovery, envelopes, bad input, reconnect."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import msgpack
import nats
import pytest

from ikefarm.proto import envelope, subjects
from ikefarm.proto.envelope import BusError, BusMessage, message
from ikefarm.proto.messages import Ping, Pong, Stats, StatsRequest
from ikefarm.shared.bus.embedded import EmbeddedNats
from ikefarm.shared.bus.runtime import Runtime, ServiceBase, subscriptions_in_place
from ikefarm.shared.cli.status import discover
from ikefarm.shared.config.loader import parse_config


@message("test-echo-request")
class EchoRequest(BusMessage):
    text: str
    repeat: int


@message("test-echo-reply")
class EchoReply(BusMessage):
    text: str


class EchoService(ServiceBase):
    name = "kernel"  # any known service name; discovery lists it as ikefarm-kernel

    async def setup(self) -> None:
        await self.runtime.add_endpoint("echo", EchoRequest, self.echo)

    async def echo(self, request: EchoRequest, _msg: Any) -> EchoReply:
        if request.repeat < 0:
            raise ValueError("negative")
        return EchoReply(request.text * request.repeat)


@pytest.fixture
async def echo_runtime(nats_server: EmbeddedNats):  # type: ignore[no-untyped-def]
    runtime = Runtime(EchoService, parse_config(""), nats_server.url, instance="echo-0")
    await runtime.start()
    try:
        yield runtime
    finally:
        await runtime.stop()


async def ask(url: str, subject: str, payload: bytes) -> Any:
    nc = await nats.connect(url)
    try:
        reply = await nc.request(subject, payload, timeout=2)
        return reply
    finally:
        await nc.close()


async def test_endpoint_round_trip_and_discovery(
    echo_runtime: Runtime, nats_server: EmbeddedNats
) -> None:
    reply = await ask(nats_server.url, "ikefarm.kernel.echo", envelope.pack(EchoRequest("ab", 3)))
    assert envelope.unpack_reply(reply.data, EchoReply) == EchoReply("ababab")

    pong = await ask(
        nats_server.url, subjects.service_endpoint("kernel", "ping"), envelope.pack(Ping())
    )
    assert envelope.unpack_reply(pong.data, Pong).instance == "echo-0"

    nc = await nats.connect(nats_server.url)
    try:
        info = json.loads((await nc.request("$SRV.INFO.ikefarm-kernel", b"", timeout=2)).data)
        assert info["name"] == "ikefarm-kernel" and info["metadata"]["instance"] == "echo-0"
        assert {e["name"] for e in info["endpoints"]} >= {"echo", "ping", "stats"}
        rows = await discover(nc, window=0.3)
    finally:
        await nc.close()
    assert [(r.name, r.instance) for r in rows] == [("kernel", "echo-0")]
    assert rows[0].requests >= 2


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"\xc1 not msgpack", "bad_encoding"),
        (msgpack.packb([1, 2, 3]), "bad_encoding"),
        (
            msgpack.packb(
                {"v": 99, "kind": "test-echo-request", "body": {"text": "a", "repeat": 1}}
            ),
            "bad_version",
        ),
        (
            msgpack.packb({"v": 1, "kind": "test-echo-request", "body": {"text": "a"}}),
            "missing_field",
        ),
        (
            msgpack.packb({"v": 1, "kind": "test-echo-request", "body": {"text": 1, "repeat": 1}}),
            "bad_field",
        ),
        (msgpack.packb({"v": 1, "kind": "ping", "body": {}}), "wrong_kind"),
        (envelope.pack(EchoRequest("a", -1)), "internal_error"),
    ],
)
async def test_bad_input_gets_structured_error_and_service_keeps_serving(
    echo_runtime: Runtime, nats_server: EmbeddedNats, payload: bytes, code: str
) -> None:
    reply = await ask(nats_server.url, "ikefarm.kernel.echo", payload)
    with pytest.raises(BusError) as refused:
        envelope.unpack_reply(reply.data)
    assert refused.value.code == code
    assert reply.headers and reply.headers.get("Nats-Service-Error") == code
    assert echo_runtime.counters[f"bus_refused.{code}"] == 1
    good = await ask(nats_server.url, "ikefarm.kernel.echo", envelope.pack(EchoRequest("x", 2)))
    assert envelope.unpack_reply(good.data, EchoReply).text == "xx"
    stats = await ask(
        nats_server.url,
        subjects.instance_endpoint("kernel", "echo-0", "stats"),
        envelope.pack(StatsRequest()),
    )
    decoded = envelope.unpack_reply(stats.data, Stats)
    assert decoded.errors == 1 and decoded.counters[f"bus_refused.{code}"] == 1


async def test_event_subscription_drops_bad_messages_and_continues(
    echo_runtime: Runtime, nats_server: EmbeddedNats
) -> None:
    seen: list[str] = []

    async def on_echo(request: EchoRequest, _msg: Any) -> None:
        seen.append(request.text)

    await echo_runtime.subscribe("ikefarm.test.events", EchoRequest, on_echo)
    nc = await nats.connect(nats_server.url)
    try:
        await nc.publish("ikefarm.test.events", b"garbage")
        await nc.publish(
            "ikefarm.test.events", msgpack.packb({"v": 1, "kind": "test-echo-request", "body": {}})
        )
        await nc.publish("ikefarm.test.events", envelope.pack(EchoRequest("ok", 1)))
        await nc.flush()
        for _ in range(50):
            if seen:
                break
            await asyncio.sleep(0.02)
    finally:
        await nc.close()
    assert seen == ["ok"]
    assert echo_runtime.counters["bus_dropped.bad_encoding"] == 1
    assert echo_runtime.counters["bus_dropped.missing_field"] == 1


async def test_traceparent_is_continued_from_headers(
    echo_runtime: Runtime, nats_server: EmbeddedNats
) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from ikefarm.shared.observability import tracing

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    previous = tracing._provider
    tracing._provider = provider
    try:
        trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
        nc = await nats.connect(nats_server.url)
        try:
            await nc.request(
                "ikefarm.kernel.echo",
                envelope.pack(EchoRequest("t", 1)),
                timeout=2,
                headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"},
            )
        finally:
            await nc.close()
    finally:
        tracing._provider = previous
    spans = [s for s in exporter.get_finished_spans() if s.name == "kernel.echo"]
    assert spans and format(spans[0].context.trace_id, "032x") == trace_id
    assert format(spans[0].parent.span_id, "016x") == "00f067aa0ba902b7"


def test_envelope_rejects_what_it_cannot_use() -> None:
    with pytest.raises(BusError) as too_big:
        envelope.unpack(b"\x00" * (envelope.MAX_MESSAGE_BYTES + 1), Ping)
    assert too_big.value.code == "too_large"
    assert envelope.unpack(envelope.pack(EchoRequest("a", 1)), EchoRequest) == EchoRequest("a", 1)
    with pytest.raises(BusError, match=r"boom: it broke"):
        envelope.unpack_reply(envelope.pack_error("boom", "it broke"))


async def test_a_request_to_a_service_restarting_is_asked_again_with_backoff(
    nats_server: EmbeddedNats,
) -> None:
    """`retry_for`: a service that is not there yet (no responders: the request reached
    nobody) is asked again until it answers; without it, or past it, the error is raised."""
    from nats.errors import NoRespondersError

    asker = Runtime(EchoService, parse_config(""), nats_server.url, instance="asker-0")
    asker.nc = await nats.connect(nats_server.url)
    subject = "ikefarm.test.echo-later"
    try:
        with pytest.raises(NoRespondersError):
            await asker.request(subject, EchoRequest("a", 1), EchoReply, timeout=1.0)
        with pytest.raises(NoRespondersError):
            await asker.request(subject, EchoRequest("a", 1), EchoReply, retry_for=0.3)
        assert asker.counters["bus_request_retried"] >= 2  # 50 ms, 100 ms, ...

        responder = await nats.connect(nats_server.url)

        async def answer(msg: Any) -> None:
            decoded = envelope.unpack(msg.data, EchoRequest)
            await msg.respond(envelope.pack_reply(EchoReply(decoded.text * decoded.repeat)))

        async def come_back_later() -> None:
            await asyncio.sleep(0.5)
            await responder.subscribe(subject, cb=answer)

        before = asker.counters["bus_request_retried"]
        later = asyncio.create_task(come_back_later())
        reply = await asker.request(subject, EchoRequest("ab", 2), EchoReply, retry_for=5.0)
        await later
        assert reply == EchoReply("abab")
        assert asker.counters["bus_request_retried"] > before
        await responder.close()
    finally:
        await asker.nc.close()


async def test_a_request_that_timed_out_is_asked_again_only_when_idempotent(
    nats_server: EmbeddedNats,
) -> None:
    """An answer that never came (the instance died with the request in hand) may have had
    its effect: asked again only for an idempotent request."""
    asker = Runtime(EchoService, parse_config(""), nats_server.url, instance="asker-1")
    asker.nc = await nats.connect(nats_server.url)
    silent = await nats.connect(nats_server.url)
    seen: list[bytes] = []

    async def swallow(msg: Any) -> None:
        seen.append(msg.data)  # takes the request, answers nothing

    subject = "ikefarm.test.silent"
    try:
        await silent.subscribe(subject, cb=swallow)
        await subscriptions_in_place(silent)
        with pytest.raises(TimeoutError):
            await asker.request(subject, EchoRequest("a", 1), EchoReply, timeout=0.2, retry_for=2)
        assert len(seen) == 1 and asker.counters["bus_request_retried"] == 0
        with pytest.raises(TimeoutError):
            await asker.request(
                subject, EchoRequest("a", 1), EchoReply, timeout=0.2, retry_for=1, idempotent=True
            )
        assert len(seen) >= 3 and asker.counters["bus_request_retried"] >= 2
    finally:
        await silent.close()
        await asker.nc.close()
