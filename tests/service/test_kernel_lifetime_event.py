"""A dataplane SA reaching a byte/packet lifetime is published on the bus, once per limit."""

from __future__ import annotations

import asyncio

import nats

from ikefarm.proto import envelope, subjects
from ikefarm.proto.messages import SaEventNotice
from ikefarm.services.kernel.dataplane import Dataplane
from ikefarm.services.kernel.service import KernelService
from ikefarm.shared.bus.embedded import EmbeddedNats
from ikefarm.shared.bus.runtime import Runtime, subscriptions_in_place
from ikefarm.shared.config.loader import parse_config
from ikefarm.shared.esp import Lifetime
from tests.unit.test_userspace_dataplane import packet, tunnel_pair

# the test double: a kernel service here must not program the host (auto would)
MEMORY_BACKEND = '[kernel]\nbackend = "memory"\n'


async def test_soft_and_hard_packet_lifetimes_are_published(nats_server: EmbeddedNats) -> None:
    runtime = Runtime(
        KernelService, parse_config(MEMORY_BACKEND), nats_server.url, instance="kernel-l"
    )
    await runtime.start()
    nc = await nats.connect(nats_server.url)
    events: asyncio.Queue[SaEventNotice] = asyncio.Queue()

    async def collect(msg: object) -> None:
        await events.put(envelope.unpack(msg.data, SaEventNotice))  # type: ignore[attr-defined]

    try:
        await nc.subscribe(subjects.EVENT_CHILD_SA, cb=collect)
        await subscriptions_in_place(nc)  # flush() proves nothing about SUBs
        service = runtime.service
        assert isinstance(service, KernelService)
        dataplane = Dataplane()
        dataplane.on_lifetime = service.on_lifetime
        ours, _ = tunnel_pair(
            5, "10.100.0.0/24", "10.200.0.0/24", lifetime=Lifetime(soft_packets=1, hard_packets=2)
        )
        dataplane.add(ours)
        for seq in range(3):
            assert dataplane.outbound(packet("10.100.0.1", "10.200.0.1", seq=seq)) is not None
        # generous: a loaded CI machine, not a timing claim
        got = [await asyncio.wait_for(events.get(), 30) for _ in range(2)]
        assert [e.kind for e in got] == ["child_sa_lifetime_soft", "child_sa_lifetime_hard"]
        assert all(e.detail["unique_id"] == 5 and e.detail["direction"] == "out" for e in got)
        assert got[0].detail["spi"] == f"{ours.outbound.spi:08x}"
        await asyncio.sleep(0.2)
        assert events.empty()  # once per limit
    finally:
        await nc.close()
        await runtime.stop()
