"""SA churn through the whole worker: ingress, ike, keystore and kernel over a real
nats-server, and an initiator engine behind a (loopback) NAT on real UDP sockets.

The initiator claims the gateway's own ports as its source, so both sides detect a
NAT and it floats to the NAT-T port after IKE_SA_INIT (RFC 7296 2.23), as a peer behind
a NAT does. After many handshakes, each deleted again, the worker must hold what it held
after the first few: the engine's tables and the adapter's own (tasks, waiting commands,
initiation watches, per-ingress counts).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ikefarm.services.ike.service import IkeService
from ikefarm.services.ingress.service import IngressService
from ikefarm.services.kernel.service import KernelService
from ikefarm.services.keystore.service import KeystoreService
from ikefarm.shared.bus.embedded import EmbeddedNats
from ikefarm.shared.bus.runtime import Runtime
from ikefarm.shared.config.loader import parse_config
from ikefarm.shared.ikev2.constants import NON_ESP_MARKER
from ikefarm.shared.ikev2.effects import Effect, Endpoint, KeystoreRequest, SendDatagram
from ikefarm.shared.ikev2.engine import IkeEngine
from ikefarm.shared.ikev2.policy import engine_policy
from ikefarm.shared.ikev2.sa import IkeSaState
from tests.engine_helpers import (
    INITIATOR_TOML,
    RESPONDER_TOML,
    assert_bounded_caches,
    container_sizes,
    keystore_stand_in,
)
from tests.harness.ports import udp_ports
from tests.service.test_ingress_service import wait_until

pytestmark = pytest.mark.timeout(120)

PSK = b"shared-secret-0123456789"
WARM_UP = 5
CYCLES = 40
LOOPBACK = "127.0.0.1"


class _Socket(asyncio.DatagramProtocol):
    def __init__(self, peer: Peer, natt: bool) -> None:
        self.peer = peer
        self.natt = natt
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.peer.received(self, data, addr)


@dataclass
class Peer:
    """The initiator: an engine whose datagrams leave from two real sockets (IKE, NAT-T)."""

    engine: IkeEngine
    gateway_ports: tuple[int, int]  # (IKE, NAT-T) of the gateway, claimed as ours too
    sockets: dict[bool, _Socket] = field(default_factory=dict)

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        for natt in (False, True):
            _transport, protocol = await loop.create_datagram_endpoint(
                lambda natt=natt: _Socket(self, natt), local_addr=(LOOPBACK, 0)
            )
            self.sockets[natt] = protocol

    def close(self) -> None:
        for protocol in self.sockets.values():
            if protocol.transport is not None:
                protocol.transport.close()

    def run(self, effects: list[Effect], now: float) -> None:
        for effect in effects:
            if isinstance(effect, KeystoreRequest):
                reply = keystore_stand_in(PSK, effect.request, effect.operation)
                self.run(self.engine.keystore_reply(effect.request_id, reply, now), now)
            elif isinstance(effect, SendDatagram):
                natt = effect.local.port == self.gateway_ports[1]
                transport = self.sockets[natt].transport
                assert transport is not None
                data = NON_ESP_MARKER + effect.data if natt else effect.data
                transport.sendto(data, (effect.remote.address, effect.remote.port))

    def received(self, protocol: _Socket, data: bytes, addr: tuple[Any, ...]) -> None:
        if protocol.natt:
            if not data.startswith(NON_ESP_MARKER):
                return
            data = data[len(NON_ESP_MARKER) :]
        now = asyncio.get_running_loop().time()
        local = Endpoint(LOOPBACK, self.gateway_ports[protocol.natt])
        self.run(self.engine.receive(data, local, Endpoint(addr[0], addr[1]), now), now)


@dataclass
class Farm:
    ingress: Runtime
    ike: Runtime
    peer: Peer

    @property
    def worker(self) -> IkeService:
        assert isinstance(self.ike.service, IkeService)
        return self.ike.service


@contextlib.asynccontextmanager
async def farm_services(
    url: str, tmp_path: Path, *, extra_vpn: str = ""
) -> AsyncIterator[tuple[list[Runtime], Peer]]:
    """Keystore, kernel (memory backend), ike worker of shard 1 and ingress on loopback, and
    the initiator engine on its sockets; `extra_vpn` goes into the gateway's VPN."""
    ike_port, natt_port = udp_ports(2)
    ports = f'[ingress]\nlisten = ["{LOOPBACK}"]\nike-port = {ike_port}\nnatt-port = {natt_port}\n'
    gateway = parse_config(
        ports
        + f'[keystore]\nstore-file = "{tmp_path / "keystore.bin"}"\n'
        + '[kernel]\nbackend = "memory"\n'
        + RESPONDER_TOML.format(extra="", extra_vpn=extra_vpn).replace("192.0.2.1", LOOPBACK)
    )
    runtimes = [
        Runtime(KeystoreService, gateway, url, instance="keystore-0"),
        Runtime(KernelService, gateway, url, instance="kernel-0"),
        Runtime(IkeService, gateway, url, instance="ike-1", options={"shard": 1}),
        Runtime(IngressService, gateway, url, instance="ingress-0"),
    ]
    initiator = parse_config(
        ports
        + INITIATOR_TOML.format(extra="", extra_vpn="")
        .replace("192.0.2.2", LOOPBACK)
        .replace("192.0.2.1", LOOPBACK)
    )
    peer = Peer(IkeEngine(engine_policy(initiator), shard=2), (ike_port, natt_port))
    started: list[Runtime] = []
    try:
        for runtime in runtimes:
            await runtime.start()
            started.append(runtime)
        await peer.open()
        yield runtimes, peer
    finally:
        peer.close()
        for runtime in reversed(started):
            await runtime.stop()


@pytest.fixture
async def farm(nats_server: EmbeddedNats, tmp_path: Path) -> AsyncIterator[Farm]:
    async with farm_services(nats_server.url, tmp_path) as (runtimes, peer):
        yield Farm(runtimes[3], runtimes[2], peer)


async def _handshake_and_delete(farm: Farm) -> None:
    peer, worker = farm.peer, farm.worker
    now = asyncio.get_running_loop().time()
    peer.run(peer.engine.initiate("hq", "net", now), now)

    def established() -> bool:
        return any(sa.state == IkeSaState.ESTABLISHED for sa in peer.engine.sas.values())

    await wait_until(established)
    (sa,) = peer.engine.sas.values()
    assert sa.nat_local and sa.remote.port == peer.gateway_ports[1]  # it floated to NAT-T
    now = asyncio.get_running_loop().time()
    peer.run(peer.engine.delete_ike(sa, now, "flushed"), now)
    await wait_until(lambda: not peer.engine.sas and not worker.engine.sas)


def _worker_sizes(worker: IkeService) -> dict[str, int]:
    out: dict[str, int] = {}
    seen = {id(worker.engine.policy)}  # configuration, read-only
    container_sizes(worker.engine, "engine", seen, out)
    container_sizes(worker.watches, "watches", seen, out)
    out["tasks"] = len(worker._tasks)
    out["waiting"] = len(worker._waiting)
    out["inits_answered"] = len(worker.inits_answered)
    out["counter names"] = len(worker.runtime.counters)
    return out


async def test_a_worker_holds_after_many_handshakes_what_it_held_after_a_few(
    farm: Farm,
) -> None:
    worker = farm.worker
    for _ in range(WARM_UP):
        await _handshake_and_delete(farm)
    await wait_until(lambda: not worker._tasks)  # kernel deletes acknowledged
    baseline = _worker_sizes(worker)
    for _ in range(CYCLES):
        await _handshake_and_delete(farm)
    await wait_until(lambda: not worker._tasks)
    after = _worker_sizes(worker)

    changed = {path: (baseline.get(path), after.get(path)) for path in baseline.keys() | after}
    assert {p: sizes for p, sizes in changed.items() if sizes[0] != sizes[1]} == {}
    assert_bounded_caches(worker.engine)
    assert worker.engine.counters["ike_sa_deleted_by_peer"] == WARM_UP + CYCLES
    assert farm.ingress.counters["dropped.shard_unowned"] == 0


async def _handshake_unique_ids(farm: Farm) -> set[int]:
    """Establish and delete one SA; the unique ids the worker gave its IKE SA and child."""
    peer, worker = farm.peer, farm.worker
    now = asyncio.get_running_loop().time()
    peer.run(peer.engine.initiate("hq", "net", now), now)
    await wait_until(
        lambda: any(
            sa.state == IkeSaState.ESTABLISHED and sa.children for sa in worker.engine.sas.values()
        )
    )
    ids = {sa.unique_id for sa in worker.engine.sas.values()}
    ids |= {child.unique_id for sa in worker.engine.sas.values() for child in sa.children}
    await wait_until(
        lambda: any(sa.state == IkeSaState.ESTABLISHED for sa in peer.engine.sas.values())
    )
    (sa,) = peer.engine.sas.values()
    now = asyncio.get_running_loop().time()
    peer.run(peer.engine.delete_ike(sa, now, "flushed"), now)
    await wait_until(lambda: not peer.engine.sas and not worker.engine.sas)
    return ids


async def test_a_restarted_worker_never_reuses_an_earlier_life_s_unique_ids(
    farm: Farm, nats_server: EmbeddedNats
) -> None:
    first_life = await _handshake_unique_ids(farm) | await _handshake_unique_ids(farm)
    assert len(first_life) == 4  # two IKE SAs, two children
    await farm.ike.stop()
    farm.ike = Runtime(
        IkeService, farm.ike.config, nats_server.url, instance="ike-1", options={"shard": 1}
    )
    await farm.ike.start()
    try:
        second_life = await _handshake_unique_ids(farm)
        assert min(second_life) > max(first_life)
        assert farm.worker.unique_ids.overrun == 0
    finally:
        await farm.ike.stop()
