"""The kernel service with the netlink backend, over a real nats-server, programming a namespace.

The service runs in this process, so its backend is pointed at a namespace the
test creates (the service itself would program the namespace it runs in).
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
from collections.abc import AsyncIterator, Iterator
from typing import Any, ClassVar

import pytest
from nats.aio.client import Client

from ikefarm.proto import envelope, subjects
from ikefarm.proto.messages import (
    KernelAck,
    KernelAcquire,
    KernelShowRequest,
    KernelState,
    TrapRemove,
)
from ikefarm.services.kernel.backends import Choice, probe_esp
from ikefarm.services.kernel.netlink import NetlinkKernel, NetlinkOptions
from ikefarm.services.kernel.service import KernelService
from ikefarm.shared.bus.embedded import EmbeddedNats
from ikefarm.shared.bus.runtime import Runtime
from ikefarm.shared.config.loader import parse_config
from ikefarm.shared.observability.logging import configure_logging
from tests.harness.netns import Namespace
from tests.kernel.test_netlink_backend import KEY_IN, KEY_OUT, child, trap
from tests.service.test_kernel_memory import sealed

pytestmark = pytest.mark.kernel
NETLINK = parse_config('[kernel]\nbackend = "netlink"\n')


class NamespacedKernelService(KernelService):
    """KernelService whose netlink backend programs `netns` instead of this process's own."""

    netns: ClassVar[str] = ""

    def _make_backend(self, choice: Choice) -> Any:
        assert choice.backend == "netlink"
        return NetlinkKernel(NetlinkOptions(), netns=self.netns)


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    configure_logging("kernel", "kernel-nl", {"daemon": {"default": 3}}, stream=stream)
    yield stream
    configure_logging("kernel", "kernel-nl", {"daemon": {"default": "disable"}})


@pytest.fixture
async def kernel(
    nats_server: EmbeddedNats, netns: Namespace, log_stream: io.StringIO
) -> AsyncIterator[Runtime]:
    NamespacedKernelService.netns = netns.name
    runtime = Runtime(NamespacedKernelService, NETLINK, nats_server.url, instance="kernel-nl")
    await runtime.start()
    try:
        yield runtime
    finally:
        await runtime.stop()


@pytest.fixture
def client(nats_client: Client) -> Client:
    return nats_client


async def ask(nc: Client, subject: str, message: Any, answer: type[Any]) -> tuple[Any, bytes]:
    raw = (await nc.request(subject, envelope.pack(message), timeout=5)).data
    return envelope.unpack_reply(raw, answer), raw


async def test_trap_and_refused_child_over_the_bus(
    kernel: Runtime, client: Client, netns: Namespace, log_stream: io.StringIO
) -> None:
    ack, _ = await ask(client, subjects.KERNEL_TRAP_INSTALL, trap(), KernelAck)
    assert ack == KernelAck(ok=True)
    assert netns.run(["ip", "xfrm", "policy"]).stdout.count("reqid 3 mode tunnel") == 3
    state, _ = await ask(client, subjects.KERNEL_SHOW, KernelShowRequest(), KernelState)
    assert state.backend == "netlink" and [t["reqid"] for t in state.traps] == [3]

    accepted, why = probe_esp(netns.name)
    request = await sealed(client, dataclasses.replace(child(), encr_key_in=b"", encr_key_out=b""))
    ack, raw = await ask(client, subjects.KERNEL_CHILD_INSTALL, request, KernelAck)
    if accepted:
        assert ack.ok, f"this kernel takes ESP states ({why}) but refused the child: {ack}"
    else:
        assert not ack.ok
        assert ack.error.startswith("kernel refused XFRM_MSG_NEWSA: ")
        counters = kernel.counters
        assert (
            counters["child_install.kernel_enosys"]
            + counters["child_install.kernel_eprotonosupport"]
            == 1
        )
        assert "child_install_refused" in log_stream.getvalue()
        # the refused child's share of the trap's selectors was given back, the trap stays
        assert netns.run(["ip", "xfrm", "policy"]).stdout.count("reqid 3 mode tunnel") == 3
    for key in (KEY_IN, KEY_OUT):
        assert key not in raw and key.hex() not in log_stream.getvalue()

    ack, _ = await ask(
        client, subjects.KERNEL_TRAP_REMOVE, TrapRemove(vpn="hq", name="net", reqid=3), KernelAck
    )
    assert ack.ok
    assert netns.run(["ip", "xfrm", "policy"]).stdout.strip() == ""
    started = [line for line in log_stream.getvalue().splitlines() if "kernel_backend" in line]
    assert (
        started and '"backend": "netlink"' in started[0] and '"reason": "configured"' in started[0]
    )
    assert '"level": 1' in started[0]


def veth_toward(netns: Namespace, address: str, remote: str) -> None:
    """A veth pair up in `netns`, `address` on one end and `remote` routed out of it."""
    for argv in (
        ["ip", "link", "add", "v0", "type", "veth", "peer", "name", "v1"],
        ["ip", "link", "set", "v0", "up"],
        ["ip", "link", "set", "v1", "up"],
        ["ip", "addr", "add", address, "dev", "v0"],
        ["ip", "route", "add", remote, "dev", "v0"],
    ):
        netns.run(argv)


async def test_traffic_on_a_trap_publishes_an_acquire_event(
    kernel: Runtime, client: Client, netns: Namespace
) -> None:
    """A packet toward the trap's remote selector: the kernel's ACQUIRE goes out on the bus."""
    veth_toward(netns, "10.100.0.1/24", "10.200.0.0/24")
    received: asyncio.Queue[bytes] = asyncio.Queue()

    async def on_event(msg: Any) -> None:
        await received.put(msg.data)

    await client.subscribe(subjects.EVENT_KERNEL_ACQUIRE, cb=on_event)
    await client.flush()
    ack, _ = await ask(client, subjects.KERNEL_TRAP_INSTALL, trap(), KernelAck)
    assert ack.ok
    await asyncio.to_thread(netns.ping, "10.200.0.9", timeout=1.0)
    event = envelope.unpack(await asyncio.wait_for(received.get(), timeout=10), KernelAcquire)
    assert event == KernelAcquire(
        backend="netlink",
        reqid=3,
        local_address="192.0.2.1",
        remote_address="198.51.100.2",
        local_ts="10.100.0.1/32",
        remote_ts="10.200.0.9/32",
    )
    assert kernel.counters["event.acquire"] >= 1
