"""Ingress sends NAT-keepalives (RFC 3948 2.3) as one 0xFF octet from the NAT-T port, no marker."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import msgpack
import nats
import pytest

from ikefarm.proto import envelope, subjects
from ikefarm.proto.messages import OutboundDatagram
from ikefarm.services.ingress.service import IngressService
from ikefarm.shared.bus.embedded import EmbeddedNats
from ikefarm.shared.bus.runtime import Runtime
from ikefarm.shared.config.loader import load_config
from ikefarm.shared.ikev2.constants import NON_ESP_MARKER
from tests.harness.ports import udp_ports


@pytest.fixture
async def ingress(
    nats_server: EmbeddedNats, tmp_path: Path
) -> AsyncIterator[tuple[Runtime, int, int]]:
    ike_port, natt_port = udp_ports(2)
    path = tmp_path / "ingress.toml"
    path.write_text(
        f'[ingress]\nlisten = ["127.0.0.1"]\nike-port = {ike_port}\nnatt-port = {natt_port}\n'
    )
    runtime = Runtime(IngressService, load_config(path), nats_server.url, instance="ingress-k")
    await runtime.start()
    try:
        yield runtime, ike_port, natt_port
    finally:
        await runtime.stop()


@pytest.fixture
def peer() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(10)
    yield sock
    sock.close()


async def until(predicate, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def test_keepalive_leaves_the_natt_socket_bare_and_bad_ones_are_refused(
    nats_server: EmbeddedNats, ingress: tuple[Runtime, int, int], peer: socket.socket
) -> None:
    runtime, ike_port, natt_port = ingress
    address, port = peer.getsockname()
    nc = await nats.connect(nats_server.url)
    try:
        keepalive = OutboundDatagram("127.0.0.1", natt_port, address, port, b"\xff", True)
        await nc.publish(subjects.INGRESS_SEND, envelope.pack(keepalive))
        data, source = await asyncio.to_thread(peer.recvfrom, 65535)
        assert data == b"\xff" and source == ("127.0.0.1", natt_port)
        assert runtime.counters["sent_nat_keepalive"] == 1

        # a keepalive that is not one octet of 0xFF, or not from the NAT-T port: refused
        for bad in (
            OutboundDatagram("127.0.0.1", natt_port, address, port, b"\xff\xff", True),
            OutboundDatagram("127.0.0.1", natt_port, address, port, b"", True),
            OutboundDatagram("127.0.0.1", ike_port, address, port, b"\xff", True),
        ):
            await nc.publish(subjects.INGRESS_SEND, envelope.pack(bad))
        # a malformed flag is a bus error, counted
        body = {
            "local_address": "127.0.0.1",
            "local_port": natt_port,
            "remote_address": address,
            "remote_port": port,
            "data": b"\xff",
            "nat_keepalive": "yes",
        }
        await nc.publish(
            subjects.INGRESS_SEND, msgpack.packb({"v": 1, "kind": "datagram-out", "body": body})
        )
        await until(lambda: runtime.counters["send_bad_keepalive"] == 3)
        await until(lambda: runtime.counters["bus_dropped.bad_field"] == 1)

        # an IKE message on the same socket still gets its non-ESP marker
        ike = OutboundDatagram("127.0.0.1", natt_port, address, port, b"ike message")
        await nc.publish(subjects.INGRESS_SEND, envelope.pack(ike))
        assert await asyncio.to_thread(peer.recv, 65535) == NON_ESP_MARKER + b"ike message"
        assert runtime.counters["sent_nat_keepalive"] == 1 and runtime.counters["sent"] == 1
    finally:
        await nc.close()
