"""Ingress against a real nats-server and real UDP sockets on loopback (IPv4 and IPv6)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from ikefarm.proto import envelope, subjects
from ikefarm.proto.messages import (
    Datagram,
    IkeLoad,
    InitRoute,
    OutboundDatagram,
    Stats,
    StatsRequest,
)
from ikefarm.proto.sharding import spi_for_shard
from ikefarm.services.ingress.service import IngressService
from ikefarm.shared.bus.embedded import EmbeddedNats
from ikefarm.shared.bus.runtime import Runtime, subscriptions_in_place
from ikefarm.shared.config.loader import load_config
from ikefarm.shared.ikev2.constants import NON_ESP_MARKER, ExchangeType, NotifyType
from ikefarm.shared.ikev2.message import Message, encode_message, parse_message
from ikefarm.shared.ikev2.payloads import NoncePayload
from tests.harness.ports import udp_ports

SPI_I = bytes.fromhex("a1a2a3a4a5a6a7a8")
# shards the tests below route to; their stand-in owners report for them (ingress forwards
# only to a shard some worker reports)
OWNED_SHARDS = (3, 7, 12)


def ike(
    exchange: ExchangeType = ExchangeType.IKE_SA_INIT,
    spi_i: bytes = SPI_I,
    spi_r: bytes = bytes(8),
    message_id: int = 0,
) -> bytes:
    # a new IKE_SA_INIT carries Ni, which the DoS gate reads (its cookie covers it)
    new_init = exchange == ExchangeType.IKE_SA_INIT and spi_r == bytes(8)
    return encode_message(
        Message(
            exchange_type=exchange,
            spi_i=spi_i,
            spi_r=spi_r,
            message_id=message_id,
            is_initiator=True,
            is_response=False,
            payloads=[NoncePayload(bytes(32))] if new_init else [],
        )
    )


@dataclass
class Farm:
    runtime: Runtime
    nc: Client
    ike_port: int
    natt_port: int
    received: asyncio.Queue[Msg]

    @property
    def service(self) -> IngressService:
        assert isinstance(self.runtime.service, IngressService)
        return self.runtime.service

    async def next(self, timeout: float = 10.0) -> tuple[str, Datagram, Msg]:
        try:
            msg = await asyncio.wait_for(self.received.get(), timeout)
        except TimeoutError:
            counters = dict(self.runtime.counters)
            raise AssertionError(f"ingress published nothing; its counters: {counters}") from None
        return msg.subject, envelope.unpack(msg.data, Datagram), msg


async def wait_until(predicate: Callable[[], Any], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def stand_in_workers(nc: Client, *shards: int, interval: float = 1.0) -> AsyncIterator[None]:
    """The load reports (IkeLoad) ike workers owning `shards` publish, every half `interval`,
    while the block runs: for tests where a plain subscriber stands in for the worker."""
    seq = itertools.count(1)

    async def report() -> None:
        while True:
            for shard in shards:
                load = IkeLoad(f"stand-in-{shard}", shard, next(seq), 0, 0, interval)
                await nc.publish(subjects.IKE_LOAD, envelope.pack(load))
            await asyncio.sleep(interval / 2)

    task = asyncio.create_task(report())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.fixture
async def farm(nats_server: EmbeddedNats, tmp_path: Path) -> AsyncIterator[Farm]:
    ike_port, natt_port = udp_ports(2)
    path = tmp_path / "ingress.toml"
    path.write_text(
        '[ingress]\nlisten = ["127.0.0.1", "::1"]\n'
        f"ike-port = {ike_port}\nnatt-port = {natt_port}\n"
        # no userspace dataplane beside it: ESP-in-UDP reaches ingress, which drops it
        '[kernel]\nbackend = "memory"\n'
    )
    runtime = Runtime(IngressService, load_config(path), nats_server.url, instance="ingress-0")
    await runtime.start()
    nc = await nats.connect(nats_server.url)
    received: asyncio.Queue[Msg] = asyncio.Queue()

    async def collect(msg: Msg) -> None:
        await received.put(msg)

    await nc.subscribe(subjects.IKE_INIT, cb=collect)
    await nc.subscribe("ikefarm.ike.shard.*.datagram", cb=collect)
    await subscriptions_in_place(nc)
    try:
        async with stand_in_workers(nc, *OWNED_SHARDS):
            yield Farm(runtime, nc, ike_port, natt_port, received)
    finally:
        await nc.close()
        await runtime.stop()


@pytest.fixture
def peer() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(10)
    yield sock
    sock.close()


async def test_ike_sa_init_goes_to_the_init_queue_with_addresses(
    farm: Farm, peer: socket.socket
) -> None:
    peer.sendto(ike(), ("127.0.0.1", farm.ike_port))
    subject, datagram, _msg = await farm.next()
    assert subject == "ikefarm.ike.init"
    assert datagram.data == ike()
    assert (datagram.local_address, datagram.local_port) == ("127.0.0.1", farm.ike_port)
    assert (datagram.remote_address, datagram.remote_port) == peer.getsockname()
    assert farm.runtime.counters["routed.init"] == 1


async def test_natt_port_strips_the_marker_and_drops_keepalives_and_esp(
    farm: Farm, peer: socket.socket
) -> None:
    target = ("127.0.0.1", farm.natt_port)
    peer.sendto(b"\xff", target)  # NAT-keepalive (RFC 3948 2.3)
    peer.sendto(bytes.fromhex("0000abcd00000001") + bytes(32), target)  # ESP-in-UDP
    peer.sendto(NON_ESP_MARKER + ike(), target)
    subject, datagram, _msg = await farm.next()
    assert subject == subjects.IKE_INIT
    assert datagram.data == ike() and datagram.local_port == farm.natt_port
    await wait_until(lambda: farm.runtime.counters["esp_in_udp"] == 1)
    assert farm.runtime.counters["nat_keepalive"] == 1
    assert farm.received.empty()


async def test_later_datagrams_go_to_the_shard_in_our_spi(farm: Farm, peer: socket.socket) -> None:
    ours = spi_for_shard(7, bytes.fromhex("0102030405ff"))
    auth = ike(ExchangeType.IKE_AUTH, SPI_I, ours, message_id=1)
    peer.sendto(NON_ESP_MARKER + auth, ("127.0.0.1", farm.natt_port))
    subject, datagram, _msg = await farm.next()
    assert subject == "ikefarm.ike.shard.7.datagram"
    assert datagram.data == auth and datagram.local_port == farm.natt_port
    assert farm.runtime.counters["routed.shard"] == 1


async def test_learned_init_route_pins_retransmissions_to_a_shard(
    farm: Farm, peer: socket.socket
) -> None:
    address, port = peer.getsockname()
    route = InitRoute(spi_i=SPI_I, remote_address=address, remote_port=port, shard=3, lifetime=30)
    await farm.nc.publish(subjects.INGRESS_INIT_ROUTE, envelope.pack(route))
    await farm.nc.publish(subjects.INGRESS_INIT_ROUTE, b"not msgpack")
    await wait_until(lambda: farm.runtime.counters["init_route_learned"] == 1)
    assert farm.runtime.counters["bus_dropped.bad_encoding"] == 1

    peer.sendto(ike(), ("127.0.0.1", farm.ike_port))
    subject, _datagram, _msg = await farm.next()
    assert subject == subjects.ike_shard(3)
    # another initiator SPI from the same peer is a new IKE_SA_INIT
    peer.sendto(ike(spi_i=bytes.fromhex("b1b2b3b4b5b6b7b8")), ("127.0.0.1", farm.ike_port))
    subject, _datagram, _msg = await farm.next()
    assert subject == subjects.IKE_INIT

    stats = await farm.nc.request(
        subjects.instance_endpoint("ingress", "ingress-0", "stats"),
        envelope.pack(StatsRequest()),
        timeout=2,
    )
    gauges = envelope.unpack_reply(stats.data, Stats).gauges
    assert gauges["sockets"] == 4 and gauges["init_routes"] == 1


async def test_ipv6_datagrams_carry_ipv6_addresses(farm: Farm) -> None:
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as peer6:
        peer6.bind(("::1", 0))
        peer6.settimeout(3)
        peer6.sendto(ike(), ("::1", farm.ike_port))
        subject, datagram, _msg = await farm.next()
        assert subject == subjects.IKE_INIT
        assert (datagram.local_address, datagram.local_port) == ("::1", farm.ike_port)
        assert datagram.remote_address == "::1"
        assert datagram.remote_port == peer6.getsockname()[1]

        reply = ike(ExchangeType.IKE_SA_INIT, SPI_I, spi_for_shard(1, bytes(5) + b"\x01"))
        await farm.nc.publish(
            subjects.INGRESS_SEND,
            envelope.pack(
                OutboundDatagram("::1", farm.natt_port, "::1", peer6.getsockname()[1], reply)
            ),
        )
        data = await asyncio.to_thread(peer6.recv, 65535)
        assert data == NON_ESP_MARKER + reply


async def test_outbound_datagrams_leave_from_their_local_endpoint(
    farm: Farm, peer: socket.socket
) -> None:
    address, port = peer.getsockname()
    await farm.nc.publish(
        subjects.INGRESS_SEND,
        envelope.pack(OutboundDatagram("127.0.0.1", farm.ike_port, address, port, b"on 500")),
    )
    data, source = await asyncio.to_thread(peer.recvfrom, 65535)
    assert data == b"on 500" and source == ("127.0.0.1", farm.ike_port)

    await farm.nc.publish(
        subjects.INGRESS_SEND,
        envelope.pack(OutboundDatagram("127.0.0.1", farm.natt_port, address, port, b"on 4500")),
    )
    data, source = await asyncio.to_thread(peer.recvfrom, 65535)
    assert data == NON_ESP_MARKER + b"on 4500" and source == ("127.0.0.1", farm.natt_port)

    # no socket on that endpoint: counted, nothing sent, the service keeps going
    for local in (("192.0.2.1", farm.ike_port), ("127.0.0.1", 9)):
        await farm.nc.publish(
            subjects.INGRESS_SEND, envelope.pack(OutboundDatagram(*local, address, port, b"x"))
        )
    await farm.nc.publish(
        subjects.INGRESS_SEND,
        envelope.pack(OutboundDatagram("127.0.0.1", farm.ike_port, "::1", port, b"x")),
    )
    await wait_until(lambda: farm.runtime.counters["send_no_socket"] == 2)
    await wait_until(lambda: farm.runtime.counters["send_bad_address"] == 1)
    await farm.nc.publish(
        subjects.INGRESS_SEND,
        envelope.pack(OutboundDatagram("127.0.0.1", farm.ike_port, address, port, b"still")),
    )
    data = await asyncio.to_thread(peer.recv, 65535)
    assert data == b"still"
    assert farm.runtime.counters["sent"] == 3


async def test_garbage_is_counted_and_the_service_keeps_working(
    farm: Farm, peer: socket.socket
) -> None:
    ike_target = ("127.0.0.1", farm.ike_port)
    peer.sendto(b"garbage", ike_target)
    wrong_version = bytearray(ike())
    wrong_version[17] = 0x10
    peer.sendto(bytes(wrong_version), ike_target)
    peer.sendto(ike(spi_i=bytes(8)), ike_target)
    peer.sendto(NON_ESP_MARKER + b"short", ("127.0.0.1", farm.natt_port))
    await wait_until(lambda: farm.runtime.counters["dropped.truncated_header"] == 2)
    await wait_until(lambda: farm.runtime.counters["dropped.invalid_major_version"] == 1)
    await wait_until(lambda: farm.runtime.counters["dropped.zero_spi"] == 1)
    peer.sendto(ike(), ike_target)
    subject, _datagram, _msg = await farm.next()
    assert subject == subjects.IKE_INIT
    assert farm.runtime.counters["received"] == 5


async def test_each_ike_datagram_starts_a_span_the_worker_continues(
    farm: Farm, peer: socket.socket
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
        ours = spi_for_shard(12, bytes.fromhex("0a0b0c0d0e0f"))
        peer.sendto(ike(ExchangeType.INFORMATIONAL, SPI_I, ours, 5), ("127.0.0.1", farm.ike_port))
        _subject, _datagram, msg = await farm.next()
    finally:
        tracing._provider = previous
    (span,) = [s for s in exporter.get_finished_spans() if s.name == "ingress.datagram"]
    attributes = dict(span.attributes or {})
    assert attributes["ike.exchange_type"] == "INFORMATIONAL"
    assert attributes["ike.message_id"] == 5
    assert attributes["ike.spi_i"] == SPI_I.hex() and attributes["ike.spi_r"] == ours.hex()
    assert attributes["ikefarm.route"] == "shard" and attributes["ikefarm.shard"] == 12
    trace_id = format(span.context.trace_id, "032x")
    assert msg.headers and msg.headers["traceparent"].split("-")[1] == trace_id


def _udp_sockets(port: int) -> list[str]:
    """Local addresses of the UDP sockets bound to `port`, from the kernel's socket table.

    Keyed by socket inode: a read of the table races other sockets coming and going
    and may list one socket twice."""
    found: dict[str, str] = {}
    for table, size in (("/proc/net/udp", 4), ("/proc/net/udp6", 16)):
        with contextlib.suppress(FileNotFoundError), open(table) as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                local, inode = fields[1], fields[9]
                address_hex, port_hex = local.split(":")
                if int(port_hex, 16) != port:
                    continue
                raw = bytes.fromhex(address_hex)
                # the kernel prints each 32-bit word in host (little-endian) order
                words = b"".join(raw[i : i + 4][::-1] for i in range(0, size, 4))
                family = socket.AF_INET if size == 4 else socket.AF_INET6
                found[inode] = socket.inet_ntop(family, words)
    return sorted(found.values())


async def test_sockets_exist_only_on_the_configured_addresses(farm: Farm) -> None:
    for port in (farm.ike_port, farm.natt_port):
        assert _udp_sockets(port) == ["127.0.0.1", "::1"]
    # SO_REUSEPORT: a second ingress instance may share the endpoint
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as second:
        second.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        second.bind(("127.0.0.1", farm.ike_port))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as intruder, pytest.raises(OSError):
        intruder.bind(("127.0.0.1", farm.ike_port))
    assert farm.service.gauges()["sockets"] == 4


async def test_default_addresses_are_the_enabled_vpn_local_addresses(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    ike_port, natt_port = udp_ports(2)
    path = tmp_path / "vpn.toml"
    path.write_text(
        f"[ingress]\nike-port = {ike_port}\nnatt-port = {natt_port}\n\n"
        '[[ike.pre-shared-key]]\nsecret = "ingress-test-psk"\n\n'
        '[[ike.vpn]]\nname = "a"\nlocal-address = "127.0.0.1"\n\n'
        '[[ike.vpn]]\nname = "b"\nlocal-address = "127.0.0.1"\n\n'
        '[[ike.vpn]]\nname = "off"\nenabled = false\nlocal-address = "::1"\n'
    )
    runtime = Runtime(IngressService, load_config(path), nats_server.url, instance="ingress-v")
    await runtime.start()
    try:
        assert _udp_sockets(ike_port) == ["127.0.0.1"]
        assert _udp_sockets(natt_port) == ["127.0.0.1"]
    finally:
        await runtime.stop()
    assert _udp_sockets(ike_port) == []


async def test_two_instances_share_the_endpoints_and_both_learn_init_routes(
    farm: Farm, tmp_path: Path, nats_server: EmbeddedNats
) -> None:
    path = tmp_path / "second.toml"
    path.write_text(
        f'[ingress]\nlisten = ["127.0.0.1"]\nike-port = {farm.ike_port}\n'
        f"natt-port = {farm.natt_port}\n"
    )
    second = Runtime(IngressService, load_config(path), nats_server.url, instance="ingress-1")
    await second.start()  # binds the same endpoints: SO_REUSEPORT on both sides
    try:
        route = InitRoute(spi_i=SPI_I, remote_address="::1", remote_port=500, shard=4, lifetime=9)
        await farm.nc.publish(subjects.INGRESS_INIT_ROUTE, envelope.pack(route))
        await wait_until(lambda: farm.runtime.counters["init_route_learned"] == 1)
        await wait_until(lambda: second.counters["init_route_learned"] == 1)
    finally:
        await second.stop()


async def test_a_version_3_ike_sa_init_gets_invalid_major_version_rate_limited(
    farm: Farm, peer: socket.socket
) -> None:
    """RFC 7296 2.5: answered from the socket it reached (NAT-T port: with the non-ESP
    marker), in version 2, never handed to a worker; a burst is cut by the token bucket."""
    version_3 = bytearray(ike())
    version_3[17] = 0x30
    peer.sendto(bytes(version_3), ("127.0.0.1", farm.ike_port))
    answer, source = await asyncio.to_thread(peer.recvfrom, 2048)
    assert source == ("127.0.0.1", farm.ike_port)
    parsed = parse_message(answer)
    assert parsed.header.major_version == 2 and parsed.header.is_response
    assert parsed.header.spi_i == SPI_I and parsed.header.exchange_type == ExchangeType.IKE_SA_INIT
    assert parsed.message is not None
    assert [p.notify_type for p in parsed.message.payloads] == [NotifyType.INVALID_MAJOR_VERSION]
    peer.sendto(NON_ESP_MARKER + bytes(version_3), ("127.0.0.1", farm.natt_port))
    answer, source = await asyncio.to_thread(peer.recvfrom, 2048)
    assert source == ("127.0.0.1", farm.natt_port)
    assert answer.startswith(NON_ESP_MARKER)
    assert parse_message(answer[len(NON_ESP_MARKER) :]).header.major_version == 2
    counters = farm.runtime.counters
    for _ in range(40):
        peer.sendto(bytes(version_3), ("127.0.0.1", farm.ike_port))
    await wait_until(
        lambda: (
            counters["invalid_major_version_sent"] + counters["invalid_major_version_rate_limited"]
            == 42
        )
    )
    assert counters["invalid_major_version_rate_limited"] > 0
    assert counters["dropped.invalid_major_version"] == 42
    assert farm.received.empty()  # no worker saw any of them
