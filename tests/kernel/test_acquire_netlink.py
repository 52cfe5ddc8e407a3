"""start-action = trap with the netlink backend: the kernel's own ACQUIRE makes the ike worker
initiate.

A real ike worker (shard 0) and the kernel service with the netlink backend
programming a namespace the test creates (tests/kernel/test_netlink_service.py),
over a real nats-server. The worker installs the trap of its `start-action =
trap` policy into the kernel's SPD at start; a ping toward the remote subnet
makes the kernel raise ACQUIRE; the worker initiates that child once (the IKE
datagrams go to an ingress that is not running here: the SA stays half-open).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from ikefarm.services.ike.service import IkeService
from ikefarm.shared.bus.embedded import EmbeddedNats
from ikefarm.shared.bus.runtime import Runtime
from ikefarm.shared.config.loader import parse_config
from tests.engine_helpers import INITIATOR_TOML
from tests.harness.netns import Namespace
from tests.kernel.test_netlink_service import (  # noqa: F401 (kernel, log_stream: fixtures)
    kernel,
    log_stream,
    veth_toward,
)
from tests.service.test_ike_acquire import until

pytestmark = pytest.mark.kernel

# the initiator of tests/engine_helpers.py: vpn "hq" 192.0.2.2 -> 192.0.2.1, policy "net"
# 10.200.0.0/24 === 10.100.0.0/24, start-action trap by default; this process's own kernel
# service is the namespaced one of the fixture (memory here only keeps the worker off the host)
WORKER = parse_config(
    '[kernel]\nbackend = "memory"\n' + INITIATOR_TOML.format(extra="", extra_vpn="")
)


@pytest.fixture
async def worker(nats_server: EmbeddedNats, kernel: Runtime) -> AsyncIterator[Runtime]:  # noqa: F811
    runtime = Runtime(IkeService, WORKER, nats_server.url, instance="ike-0", options={"shard": 0})
    await runtime.start()
    try:
        yield runtime
    finally:
        await runtime.stop()


async def test_a_packet_on_the_start_trap_makes_the_worker_initiate(
    worker: Runtime,
    kernel: Runtime,  # noqa: F811
    netns: Namespace,
) -> None:
    veth_toward(netns, "10.200.0.1/24", "10.100.0.0/24")
    await until(lambda: kernel.counters["trap_install.ok"] == 1, "the start trap in the kernel")
    policies = netns.run(["ip", "xfrm", "policy", "list"]).stdout
    assert "src 10.200.0.0/24 dst 10.100.0.0/24" in policies
    await asyncio.to_thread(netns.ping, "10.100.0.9", timeout=1.0)
    await until(lambda: worker.counters["acquire.initiated"] == 1, "the worker initiating")
    assert kernel.counters["event.acquire"] >= 1
    service = worker.service
    assert isinstance(service, IkeService)
    (sa,) = service.engine.sas.values()
    assert sa.vpn is not None and sa.vpn.name == "hq" and sa.remote.address == "192.0.2.1"
