"""Ingress forwards only to shards a live ike worker owns (real nats-server, real worker).

Publishing on NATS is fire-and-forget: a datagram for a shard nobody subscribes to
vanishes. Ingress learns the owned shards from the workers' load reports and drops
(and counts) the rest; the tests subscribe to every shard subject to see that nothing
unowned is published.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from ikefarm.proto import envelope, subjects
from ikefarm.proto.messages import Stats, StatsRequest
from ikefarm.proto.sharding import spi_for_shard
from ikefarm.services.ike.service import IkeService
from ikefarm.services.ingress.service import IngressService
from ikefarm.shared.bus.embedded import EmbeddedNats
from ikefarm.shared.bus.runtime import Runtime, subscriptions_in_place
from ikefarm.shared.config.loader import Config, load_config
from ikefarm.shared.ikev2.constants import ExchangeType
from tests.harness.ports import udp_ports
from tests.service.test_ingress_dos import farm_config
from tests.service.test_ingress_service import SPI_I, ike, stand_in_workers, wait_until

pytestmark = pytest.mark.timeout(60)

WORKER_SHARD = 5
UNOWNED_SHARD = 9
STAND_IN_SHARD = 30


@dataclass
class Setup:
    ingress: Runtime
    config: Config
    nc: Client
    ike_port: int
    published: asyncio.Queue[Msg]
    peer: socket.socket

    @property
    def service(self) -> IngressService:
        assert isinstance(self.ingress.service, IngressService)
        return self.ingress.service

    def owned(self) -> list[int]:
        return list(self.service.gauges()["owned_shards"])

    def send(self, data: bytes) -> None:
        self.peer.sendto(data, ("127.0.0.1", self.ike_port))

    async def next_subject(self) -> str:
        try:
            return (await asyncio.wait_for(self.published.get(), 10)).subject
        except TimeoutError:
            raise AssertionError(f"nothing published: {dict(self.ingress.counters)}") from None


def auth_for(shard: int) -> bytes:
    return ike(ExchangeType.IKE_AUTH, SPI_I, spi_for_shard(shard, bytes.fromhex("0a0b0c0d0e0f")), 1)


@pytest.fixture
async def setup(nats_server: EmbeddedNats, tmp_path: Path) -> AsyncIterator[Setup]:
    ike_port, natt_port = udp_ports(2)
    config = load_config(farm_config(tmp_path, ike_port, natt_port, ""))
    nc = await nats.connect(nats_server.url)
    published: asyncio.Queue[Msg] = asyncio.Queue()

    async def keep(msg: Msg) -> None:
        await published.put(msg)

    await nc.subscribe(subjects.IKE_INIT, cb=keep)
    await nc.subscribe("ikefarm.ike.shard.*.datagram", cb=keep)
    await subscriptions_in_place(nc)
    ingress = Runtime(IngressService, config, nats_server.url, instance="ingress-o")
    await ingress.start()
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.1", 0))
    try:
        yield Setup(ingress, config, nc, ike_port, published, peer)
    finally:
        peer.close()
        await nc.close()
        await ingress.stop()


async def test_only_shards_with_a_reporting_worker_get_datagrams(
    setup: Setup, nats_server: EmbeddedNats
) -> None:
    worker = Runtime(
        IkeService,
        setup.config,
        nats_server.url,
        instance="ike-5",
        options={"shard": WORKER_SHARD},
    )
    await worker.start()
    try:
        await wait_until(lambda: setup.owned() == [WORKER_SHARD])
        # past the first three report intervals: a shard not reported by now has no owner
        await wait_until(lambda: not setup.service.gauges()["owners_learning"])
        setup.send(auth_for(UNOWNED_SHARD))
        setup.send(b"short")
        setup.send(auth_for(WORKER_SHARD))
        # ingress handles datagrams in order: had shard 9's been published, it came first
        assert await setup.next_subject() == subjects.ike_shard(WORKER_SHARD)
        counters = setup.ingress.counters
        assert counters["dropped.shard_unowned"] == 1
        assert counters["dropped.truncated_header"] == 1  # malformed: counted as before
        assert counters["routed.shard"] == 1
        setup.send(ike())  # a new IKE_SA_INIT: the worker exists, any worker takes it
        assert await setup.next_subject() == subjects.IKE_INIT
    finally:
        await worker.stop()

    # the worker stopped reporting: three intervals later its shard has no owner
    await wait_until(lambda: setup.owned() == [])
    setup.send(auth_for(WORKER_SHARD))
    await wait_until(lambda: setup.ingress.counters["dropped.shard_unowned"] == 2)
    setup.send(ike())  # no worker at all
    await wait_until(lambda: setup.ingress.counters["dropped.no_worker"] == 1)
    async with stand_in_workers(setup.nc, STAND_IN_SHARD):
        await wait_until(lambda: setup.owned() == [STAND_IN_SHARD])
        setup.send(auth_for(STAND_IN_SHARD))
        # the first thing published since the worker left: nothing went to shard 5 or init
        assert await setup.next_subject() == subjects.ike_shard(STAND_IN_SHARD)
    assert setup.published.empty()

    # the drops are in the counters `ikefarm status --json` shows
    reply = await setup.nc.request(
        subjects.instance_endpoint("ingress", "ingress-o", "stats"),
        envelope.pack(StatsRequest()),
        timeout=5,
    )
    stats = envelope.unpack_reply(reply.data, Stats)
    assert stats.counters["dropped.shard_unowned"] == 2
    assert stats.counters["dropped.no_worker"] == 1
    assert stats.gauges["owned_shards"] == [STAND_IN_SHARD]


async def test_an_ingress_that_was_stopped_learns_again_before_judging(setup: Setup) -> None:
    async with stand_in_workers(setup.nc, STAND_IN_SHARD, interval=0.2):
        await wait_until(lambda: setup.owned() == [STAND_IN_SHARD])
        await wait_until(lambda: not setup.service.gauges()["owners_learning"])
        setup.send(auth_for(STAND_IN_SHARD))
        # this whole process stalls (as under SIGSTOP): the worker's last report seen is
        # stale by far, its newer ones wait unread behind the datagram
        time.sleep(1.0)  # blocks the event loop on purpose
        assert await setup.next_subject() == subjects.ike_shard(STAND_IN_SHARD)
    assert setup.ingress.counters["owners_relearn"] >= 1
    assert setup.ingress.counters["dropped.shard_unowned"] == 0
