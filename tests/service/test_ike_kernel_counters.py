"""Kernel counters reach the ike worker over a real nats-server: no DPD while traffic flows;
`flush kernel` removes a child from the dataplane and its worker deletes it with the peer.

Ingress, ike, keystore and kernel services on a nats-server, an initiator engine on real
UDP sockets (the churn test's peer). The kernel service runs the `memory` backend, the
test double of docs/kernel-netlink.md: it carries no packet, so the test records what a
dataplane would have counted on the child (`MemoryKernel.record_traffic`, the recorded
counters feed) and the service publishes its batches as with a real dataplane.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import msgpack
import nats
import pytest

from ikefarm.proto import envelope, subjects
from ikefarm.proto.messages import KernelFlushResult
from ikefarm.services.ike.service import IkeService
from ikefarm.services.kernel.memory import MemoryKernel
from ikefarm.services.kernel.service import KernelService
from ikefarm.shared.bus.embedded import EmbeddedNats
from ikefarm.shared.bus.runtime import Runtime
from ikefarm.shared.ikev2.sa import IkeSaState
from ikefarm.shared.ikev2.show import format_details, ike_sa_row
from tests.service.test_ike_churn import Peer, farm_services
from tests.service.test_ingress_service import wait_until

pytestmark = pytest.mark.timeout(120)

DPD_DELAY = 3.0  # the kernel service batches every second (a third, at least 1 s)


class Gateway:
    def __init__(self, runtimes: list[Runtime], peer: Peer) -> None:
        self.kernel, self.ike = runtimes[1], runtimes[2]
        self.peer = peer

    @property
    def worker(self) -> IkeService:
        assert isinstance(self.ike.service, IkeService)
        return self.ike.service

    @property
    def backend(self) -> MemoryKernel:
        service = self.kernel.service
        assert isinstance(service, KernelService) and isinstance(service.backend, MemoryKernel)
        return service.backend


@pytest.fixture
async def gateway(nats_server: EmbeddedNats, tmp_path: Path) -> AsyncIterator[Gateway]:
    dpd = f'ike-policy = {{ dpd-delay = "{DPD_DELAY:g}s" }}'
    async with farm_services(nats_server.url, tmp_path, extra_vpn=dpd) as (runtimes, peer):
        yield Gateway(runtimes, peer)


async def _established(gateway: Gateway) -> int:
    """Bring up the peer's SA; the unique id of the child the kernel service installed."""
    peer = gateway.peer
    now = asyncio.get_running_loop().time()
    peer.run(peer.engine.initiate("hq", "net", now), now)
    await wait_until(
        lambda: any(sa.state == IkeSaState.ESTABLISHED for sa in gateway.worker.engine.sas.values())
    )
    await wait_until(lambda: gateway.backend.child_count == 1)
    ((unique_id, _keys),) = gateway.backend.child_sa_keys()
    return unique_id


async def test_no_dpd_check_while_inbound_traffic_is_counted(gateway: Gateway) -> None:
    unique_id = await _established(gateway)
    assert gateway.kernel.service.counters_interval == 1.0  # type: ignore[union-attr]
    engine = gateway.worker.engine
    loop = asyncio.get_running_loop()
    # traffic for three DPD delays: the worker must never send a check
    until = loop.time() + 3 * DPD_DELAY
    while loop.time() < until:
        gateway.backend.record_traffic(
            unique_id, bytes_in=840, packets_in=10, bytes_out=420, packets_out=5
        )
        await asyncio.sleep(0.25)
    assert engine.counters["dpd_checks"] == 0
    assert engine.counters["dpd_traffic_seen"] >= 2
    assert gateway.kernel.counters["counters.batches"] >= 2
    assert gateway.ike.counters["kernel_counters.children"] >= 2
    # show ike-sa details has what the kernel counted (once the last batch is in)
    (sa,) = engine.sas.values()
    await wait_until(lambda: sa.children[0].bytes_out == gateway.backend._traffic[unique_id][2])
    bytes_in, packets_in, bytes_out, packets_out = gateway.backend._traffic[unique_id]
    assert packets_in > 0 and bytes_in == 84 * packets_in
    text = format_details([ike_sa_row(sa, loop.time())])
    assert f"{bytes_in} bytes, {packets_in} packets" in text
    assert f"{bytes_out} bytes, {packets_out} packets" in text
    # traffic stops: the liveness check comes
    await wait_until(lambda: engine.counters["dpd_checks"] >= 1, timeout=4 * DPD_DELAY)
    await wait_until(lambda: engine.counters["liveness_confirmed"] >= 1)


async def test_outbound_traffic_alone_does_not_hold_dpd_back(gateway: Gateway) -> None:
    unique_id = await _established(gateway)
    engine = gateway.worker.engine
    loop = asyncio.get_running_loop()
    until = loop.time() + 3 * DPD_DELAY
    while loop.time() < until and engine.counters["dpd_checks"] == 0:
        gateway.backend.record_traffic(unique_id, bytes_out=420, packets_out=5)
        await asyncio.sleep(0.25)
    assert engine.counters["dpd_checks"] >= 1
    assert engine.counters["dpd_traffic_seen"] == 0


async def _cli(url: str, *words: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "ikefarm.shared.cli.main", *words, "--nats", url]
    return await asyncio.to_thread(
        subprocess.run, argv, capture_output=True, text=True, timeout=60, check=False
    )


async def test_flush_kernel_removes_the_child_and_its_worker_deletes_it_with_the_peer(
    gateway: Gateway, nats_server: EmbeddedNats
) -> None:
    unique_id = await _established(gateway)
    # words the CLI refuses before asking anyone
    for words in (
        ["flush", "kernel"],
        ["flush", "kernel", "spi", "1"],
        ["flush", "kernel", "reqid", "0"],
    ):
        refused = await _cli(nats_server.url, *words)
        assert refused.returncode == 2 and "expected unique-id N" in refused.stderr
    other = await _cli(nats_server.url, "flush", "kernel", "unique-id", str(unique_id + 1000))
    assert other.returncode == 0 and "No kernel SA to flush." in other.stdout
    assert gateway.backend.child_count == 1

    done = await _cli(nats_server.url, "flush", "kernel", "unique-id", str(unique_id))
    assert done.returncode == 0, done.stderr
    assert f"Flushed 1 child SA(s) from the kernel: #{unique_id}" in done.stdout
    assert gateway.backend.child_count == 0 and gateway.backend.sad == {}
    # the owning worker heard the hard EXPIRE and deleted the child with the peer
    (peer_sa,) = gateway.peer.engine.sas.values()
    await wait_until(lambda: not peer_sa.children)
    (sa,) = gateway.worker.engine.sas.values()
    assert sa.children == [] and sa.state == IkeSaState.ESTABLISHED
    assert gateway.worker.engine.counters["kernel_expire.hard"] == 1
    assert gateway.kernel.counters["flush.children"] == 1


async def test_a_malformed_flush_is_refused(gateway: Gateway, nats_server: EmbeddedNats) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        for body in ({"selector": "everything"}, {"selector": "reqid", "value": -1},
                     {"selector": "unique-id", "value": 0}, {"selector": 3}):  # fmt: skip
            raw = msgpack.packb(
                {"v": envelope.SCHEMA_VERSION, "kind": "kernel-flush", "body": body}
            )
            reply = await nc.request(subjects.KERNEL_FLUSH, raw, timeout=5)
            with pytest.raises(envelope.BusError):
                envelope.unpack_reply(reply.data, KernelFlushResult)
    finally:
        await nc.close()
    assert gateway.kernel.counters["flush.invalid"] >= 3
