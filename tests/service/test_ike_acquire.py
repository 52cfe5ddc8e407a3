"""start-action = trap between a real ike worker and a real kernel service (memory backend,
the test double: it protects nothing) on a nats-server.

The shard-0 worker installs the trap of each `start-action = trap` policy, also
when the kernel service starts after it; an ACQUIRE on the bus makes it initiate
that child once (duplicates coalesced); malformed ACQUIREs are dropped and
counted, never crash the handler.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import msgpack
import nats
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ikefarm.proto import envelope, subjects
from ikefarm.proto.messages import KernelAcquire, KernelShowRequest, KernelState
from ikefarm.services.ike.service import IkeService
from ikefarm.services.kernel.service import KernelService
from ikefarm.shared.bus.embedded import EmbeddedNats
from ikefarm.shared.bus.runtime import Runtime
from ikefarm.shared.config.loader import parse_config
from tests.engine_helpers import INITIATOR_TOML

# the initiator of tests/engine_helpers.py (vpn "hq", policy "net", start-action trap by
# default) and a VPN whose policy waits for the operator
CONFIG = (
    '[kernel]\nbackend = "memory"\n'
    + INITIATOR_TOML.format(extra="", extra_vpn="")
    + """
[[ike.vpn]]
name = "lab"
local-address = "192.0.2.2"
remote-address = "192.0.2.3"
local-id = "peer.example"
ipsec-policy = { start-action = "none" }
[[ike.vpn.security-policy]]
name = "manual"
local-ts = { subnet = "10.201.0.0/24" }
remote-ts = { subnet = "10.101.0.0/24" }
"""
)


async def until(check: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.fixture
async def farm(nats_server: EmbeddedNats) -> AsyncIterator[tuple[Runtime, Runtime]]:
    config = parse_config(CONFIG)
    worker = Runtime(IkeService, config, nats_server.url, instance="ike-0", options={"shard": 0})
    await worker.start()  # before the kernel service: the worker retries the trap
    kernel = Runtime(KernelService, config, nats_server.url, instance="kernel-a")
    await kernel.start()
    try:
        yield worker, kernel
    finally:
        await kernel.stop()
        await worker.stop()


def reqid_of(worker: Runtime, name: str) -> int:
    service = worker.service
    assert isinstance(service, IkeService)
    (policy,) = [
        p for v in service.engine.policy.vpns for p in v.security_policies if p.name == name
    ]
    return policy.reqid


async def test_the_trap_is_installed_and_an_acquire_initiates_once(
    nats_server: EmbeddedNats, farm: tuple[Runtime, Runtime]
) -> None:
    worker, kernel = farm
    await until(lambda: kernel.counters["trap_install.ok"] == 1, "the trap installed")
    nc = await nats.connect(nats_server.url)
    try:
        reply = await nc.request(subjects.KERNEL_SHOW, envelope.pack(KernelShowRequest()))
        (trap,) = envelope.unpack_reply(reply.data, KernelState).traps
        assert (trap["name"], trap["local_ts"], trap["remote_ts"]) == (
            "net",
            ["10.200.0.0/24"],
            ["10.100.0.0/24"],
        )  # the start-action = none policy has no trap
        acquire = KernelAcquire(
            backend="memory",
            reqid=reqid_of(worker, "net"),
            local_address="192.0.2.2",
            remote_address="192.0.2.1",
            local_ts="10.200.0.5/32",
            remote_ts="10.100.0.9/32",
        )
        for _ in range(3):
            await nc.publish(subjects.EVENT_KERNEL_ACQUIRE, envelope.pack(acquire))
        await nc.flush()
        await until(
            lambda: (
                worker.counters["acquire.initiated"] + worker.counters["acquire.coalesced"] == 3
            ),
            "three ACQUIREs handled",
        )
        assert worker.counters["acquire.initiated"] == 1
        service = worker.service
        assert isinstance(service, IkeService)
        (sa,) = service.engine.sas.values()
        assert sa.vpn is not None and sa.vpn.name == "hq"
    finally:
        await nc.close()


def handled(worker: Runtime) -> int:
    """ACQUIREs the worker dropped as malformed or acted on."""
    prefixes = ("bus_dropped.", "acquire.")
    return sum(n for key, n in list(worker.counters.items()) if key.startswith(prefixes))


INTS = st.integers(min_value=-(2**63), max_value=2**64 - 1)  # what msgpack can carry
BODIES = st.dictionaries(
    st.sampled_from(
        ["backend", "reqid", "local_address", "remote_address", "local_ts", "remote_ts", "x"]
    ),
    st.one_of(
        INTS,
        st.text(max_size=20),
        st.binary(max_size=20),
        st.none(),
        st.lists(INTS, max_size=3),
    ),
)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(body=BODIES)
async def test_malformed_acquires_are_dropped_and_counted(
    nats_server: EmbeddedNats, farm: tuple[Runtime, Runtime], body: dict[str, object]
) -> None:
    worker, _kernel = farm
    nc = await nats.connect(nats_server.url)
    try:
        before = handled(worker)
        payload = msgpack.packb({"v": 1, "kind": "kernel-acquire", "body": body})
        await nc.publish(subjects.EVENT_KERNEL_ACQUIRE, payload)
        await nc.flush()
        await until(lambda: handled(worker) > before, "the ACQUIRE dropped or handled")
        assert worker.counters["handler_failed"] == 0
        service = worker.service
        assert isinstance(service, IkeService)
        assert len(service.engine.sas) <= 1  # at most the one real policy's initiation
    finally:
        await nc.close()
