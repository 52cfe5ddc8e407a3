"""Under `[kernel] backend = "auto"` ingress learns from the kernel service which backend
runs and sets `UDP_ENCAP` on its NAT-T socket only for netlink (docs/kernel-netlink.md, "The
IKE sockets"): told by the kernel's start event (ingress started first) or by the answer to
its ask (the kernel service ran already); a malformed or unknown answer changes nothing."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import nats
import pytest

from ikefarm.proto import envelope, subjects
from ikefarm.proto.messages import KernelBackend
from ikefarm.services.ingress.service import IngressService
from ikefarm.shared.bus.embedded import EmbeddedNats
from ikefarm.shared.bus.runtime import Runtime, subscriptions_in_place
from ikefarm.shared.config.loader import load_config
from ikefarm.shared.xfrm_socket import SOL_UDP, UDP_ENCAP
from tests.harness import prerequisites
from tests.harness.ports import udp_ports


def ingress_runtime(nats_server: EmbeddedNats, tmp_path: Path, backend: str) -> Runtime:
    ike_port, natt_port = udp_ports(2)
    path = tmp_path / "ingress.toml"
    path.write_text(
        f'[kernel]\nbackend = "{backend}"\n'
        f'[ingress]\nlisten = ["127.0.0.1", "::1"]\nike-port = {ike_port}\n'
        f"natt-port = {natt_port}\n"
    )
    return Runtime(IngressService, load_config(path), nats_server.url, instance="ingress-b")


def encap(runtime: Runtime) -> dict[tuple[str, bool], int]:
    service = runtime.service
    assert isinstance(service, IngressService)
    return {
        (p.endpoint.address, p.endpoint.natt): p.sock.getsockopt(SOL_UDP, UDP_ENCAP)
        for p in service.endpoints.values()
    }


def natt_only(value: int) -> dict[tuple[str, bool], int]:
    return {(a, natt): value if natt else 0 for a in ("127.0.0.1", "::1") for natt in (False, True)}


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


@pytest.fixture
async def bus(nats_server: EmbeddedNats) -> AsyncIterator[Any]:
    nc = await nats.connect(nats_server.url)
    try:
        yield nc
    finally:
        await nc.close()


async def test_auto_follows_the_kernel_services_start_event(
    nats_server: EmbeddedNats, tmp_path: Path, bus: Any
) -> None:
    runtime = ingress_runtime(nats_server, tmp_path, "auto")
    await runtime.start()
    try:
        # no kernel service yet: no UDP_ENCAP (the steering filter keeps ESP off ingress)
        assert encap(runtime) == natt_only(0)
        await bus.publish(subjects.EVENT_KERNEL_BACKEND, envelope.pack(KernelBackend("netlink")))
        await until(lambda: encap(runtime) == natt_only(2))
        # a restarted kernel service that became userspace: the option goes away again
        await bus.publish(subjects.EVENT_KERNEL_BACKEND, envelope.pack(KernelBackend("userspace")))
        await until(lambda: encap(runtime) == natt_only(0))
        # unknown names and malformed events change nothing, counted or dropped
        await bus.publish(subjects.EVENT_KERNEL_BACKEND, envelope.pack(KernelBackend("bogus")))
        await bus.publish(subjects.EVENT_KERNEL_BACKEND, b"\x81\xa1x\x01")
        await bus.publish(subjects.EVENT_KERNEL_BACKEND, b"not msgpack")
        await until(lambda: runtime.counters["kernel_backend.unknown"] == 1)
        assert encap(runtime) == natt_only(0)
        assert runtime.service.gauges()["natt_udp_encap"] is False  # type: ignore[union-attr]
    finally:
        await runtime.stop()


@pytest.mark.parametrize(("answer", "expected"), [("netlink", 2), ("userspace", 0)])
async def test_auto_asks_a_running_kernel_service(
    nats_server: EmbeddedNats, tmp_path: Path, bus: Any, answer: str, expected: int
) -> None:
    async def kernel(msg: Any) -> None:  # stands in for the kernel service's endpoint
        await msg.respond(envelope.pack_reply(KernelBackend(answer)))

    await bus.subscribe(subjects.KERNEL_BACKEND, cb=kernel)
    await subscriptions_in_place(bus)
    runtime = ingress_runtime(nats_server, tmp_path, "auto")
    await runtime.start()
    try:
        await until(lambda: runtime.service.kernel_backend == answer)  # type: ignore[union-attr]
        assert encap(runtime) == natt_only(expected)
    finally:
        await runtime.stop()


@pytest.mark.parametrize(("backend", "expected"), [("netlink", 2), ("userspace", 0)])
async def test_a_configured_backend_is_not_asked(
    nats_server: EmbeddedNats, tmp_path: Path, bus: Any, backend: str, expected: int
) -> None:
    if backend == "netlink" and os.geteuid() != 0:
        prerequisites.missing("needs root: netlink requires the IKE sockets' policy bypass")
    runtime = ingress_runtime(nats_server, tmp_path, backend)
    await runtime.start()
    try:
        assert encap(runtime) == natt_only(expected)
        # an event from some kernel service does not override the configured backend
        other = "userspace" if backend == "netlink" else "netlink"
        await bus.publish(subjects.EVENT_KERNEL_BACKEND, envelope.pack(KernelBackend(other)))
        await asyncio.sleep(0.3)
        assert encap(runtime) == natt_only(expected)
    finally:
        await runtime.stop()
