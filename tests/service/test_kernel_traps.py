"""Trap policies in the kernel service's memory backend (dpd-action trap), over a real nats-server;
and UDP encapsulation recorded with the NAT-T ports."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import msgpack
import nats
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nats.aio.client import Client

from ikefarm.proto import envelope, subjects
from ikefarm.proto.envelope import BusError
from ikefarm.proto.messages import (
    ChildInstall,
    KernelAck,
    KernelShowRequest,
    KernelState,
    TrapInstall,
    TrapRemove,
)
from ikefarm.services.kernel.memory import InvalidChild, KernelRefusal, MemoryKernel
from ikefarm.services.kernel.service import KernelService
from ikefarm.shared.bus.embedded import EmbeddedNats
from ikefarm.shared.bus.runtime import Runtime
from ikefarm.shared.config.loader import parse_config
from ikefarm.shared.ikev2.constants import EncrId

MEMORY = parse_config('[kernel]\nbackend = "memory"\n')


def trap(reqid: int = 3, **changes: Any) -> TrapInstall:
    base = TrapInstall(
        vpn="hq",
        name="net",
        reqid=reqid,
        mode="tunnel",
        local_address="192.0.2.1",
        remote_address="198.51.100.2",
        local_ts=["10.100.0.0/24"],
        remote_ts=["10.200.0.0/24"],
    )
    return dataclasses.replace(base, **changes)


@pytest.fixture
async def kernel(nats_server: EmbeddedNats) -> AsyncIterator[Runtime]:
    runtime = Runtime(KernelService, MEMORY, nats_server.url, instance="kernel-t")
    await runtime.start()
    try:
        yield runtime
    finally:
        await runtime.stop()


@pytest.fixture
async def client(nats_server: EmbeddedNats) -> AsyncIterator[Client]:
    nc = await nats.connect(nats_server.url)
    yield nc
    await nc.close()


async def ask(nc: Client, subject: str, payload: bytes) -> bytes:
    return (await nc.request(subject, payload, timeout=2)).data


async def state(nc: Client) -> KernelState:
    raw = await ask(nc, subjects.KERNEL_SHOW, envelope.pack(KernelShowRequest()))
    return envelope.unpack_reply(raw, KernelState)


async def test_install_show_replace_remove(kernel: Runtime, client: Client) -> None:
    ack = envelope.unpack_reply(
        await ask(client, subjects.KERNEL_TRAP_INSTALL, envelope.pack(trap())), KernelAck
    )
    assert ack.ok
    (shown,) = (await state(client)).traps
    assert (shown["vpn"], shown["name"], shown["reqid"]) == ("hq", "net", 3)
    assert shown["local_ts"] == ["10.100.0.0/24"] and shown["remote_ts"] == ["10.200.0.0/24"]
    assert [p["direction"] for p in shown["policies"]] == ["out", "in", "fwd"]
    out = shown["policies"][0]
    assert (out["src"], out["dst"], out["tmpl_src"], out["tmpl_dst"]) == (
        "10.100.0.0/24",
        "10.200.0.0/24",
        "192.0.2.1",
        "198.51.100.2",
    )
    # installing again replaces it (one trap per security policy)
    moved = trap(remote_address="198.51.100.3")
    assert envelope.unpack_reply(
        await ask(client, subjects.KERNEL_TRAP_INSTALL, envelope.pack(moved)), KernelAck
    ).ok
    (shown,) = (await state(client)).traps
    assert shown["remote"] == "198.51.100.3"
    removal = envelope.pack(TrapRemove("hq", "net", 3))
    assert envelope.unpack_reply(
        await ask(client, subjects.KERNEL_TRAP_REMOVE, removal), KernelAck
    ).ok
    assert (await state(client)).traps == []
    again = envelope.unpack_reply(
        await ask(client, subjects.KERNEL_TRAP_REMOVE, removal), KernelAck
    )
    assert not again.ok and again.error == "no trap with this reqid"
    assert kernel.counters["trap_install.ok"] == 2 and kernel.counters["trap_remove.not_found"] == 1


@pytest.mark.parametrize(
    ("subject", "payload", "code"),
    [
        (subjects.KERNEL_TRAP_INSTALL, b"\xc1", "bad_encoding"),
        (
            subjects.KERNEL_TRAP_INSTALL,
            msgpack.packb({"v": 1, "kind": "trap-install", "body": {"vpn": "hq"}}),
            "missing_field",
        ),
        (subjects.KERNEL_TRAP_INSTALL, envelope.pack(trap(mode="beet")), "bad_field"),
        (subjects.KERNEL_TRAP_INSTALL, envelope.pack(trap(reqid=0)), "bad_field"),
        (subjects.KERNEL_TRAP_INSTALL, envelope.pack(trap(local_ts=[])), "bad_field"),
        (subjects.KERNEL_TRAP_INSTALL, envelope.pack(trap(remote_address="::1")), "bad_field"),
        (subjects.KERNEL_TRAP_INSTALL, envelope.pack(trap(local_address="nope")), "bad_field"),
        (subjects.KERNEL_TRAP_INSTALL, envelope.pack(TrapRemove("hq", "net", 1)), "wrong_kind"),
        (
            subjects.KERNEL_TRAP_REMOVE,
            msgpack.packb({"v": 1, "kind": "trap-remove", "body": {"vpn": "hq"}}),
            "missing_field",
        ),
        (
            subjects.KERNEL_TRAP_REMOVE,
            msgpack.packb({"v": 9, "kind": "trap-remove", "body": {}}),
            "bad_version",
        ),
    ],
)
async def test_malformed_trap_requests_get_structured_errors(
    kernel: Runtime, client: Client, subject: str, payload: bytes, code: str
) -> None:
    with pytest.raises(BusError) as refused:
        envelope.unpack_reply(await ask(client, subject, payload))
    assert refused.value.code == code
    assert kernel.counters[f"bus_refused.{code}"] == 1
    # still serving
    assert envelope.unpack_reply(
        await ask(client, subjects.KERNEL_TRAP_INSTALL, envelope.pack(trap())), KernelAck
    ).ok
    assert len((await state(client)).traps) == 1


selectors = st.lists(st.text(max_size=140), max_size=70)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.text(max_size=10),
    st.integers(-5, 2**33),
    st.text(max_size=40),
    st.text(max_size=40),
    selectors,
    selectors,
)
def test_the_backend_takes_a_trap_or_refuses_it_never_raises_otherwise(
    mode: str, reqid: int, local: str, remote: str, local_ts: list[str], remote_ts: list[str]
) -> None:
    backend = MemoryKernel()
    request = trap(
        mode=mode,
        reqid=reqid,
        local_address=local,
        remote_address=remote,
        local_ts=local_ts,
        remote_ts=remote_ts,
    )
    try:
        backend.install_trap(request)
    except InvalidChild:
        assert backend.traps == {}
        return
    assert list(backend.traps) == [reqid]
    with pytest.raises(KernelRefusal):
        backend.remove_trap(TrapRemove("hq", "net", reqid + 1))


def test_udp_encapsulation_is_recorded_with_the_nat_t_ports() -> None:
    backend = MemoryKernel()
    backend.install(
        ChildInstall(
            unique_id=7,
            ike_unique_id=6,
            name="net",
            vpn="hq",
            reqid=1,
            protocol="esp",
            mode="tunnel",
            local_address="192.0.2.1",
            local_port=4500,
            remote_address="198.51.100.9",
            remote_port=14500,
            spi_in=bytes.fromhex("c0000001"),
            spi_out=bytes.fromhex("c1000001"),
            encr_id=EncrId.AES_GCM_16,
            encr_key_bits=256,
            integ_id=None,
            encr_key_in=bytes(36),
            encr_key_out=bytes(36),
            integ_key_in=b"",
            integ_key_out=b"",
            esn=False,
            replay_window=32,
            udp_encap=True,
            local_ts=["10.100.0.0/24"],
            remote_ts=["10.200.0.0/24"],
        )
    )
    sas, _policies = backend.show()
    by_direction = {sa["direction"]: sa for sa in sas}
    assert by_direction["in"]["encap"] and by_direction["out"]["encap"]
    assert (by_direction["in"]["src_port"], by_direction["in"]["dst_port"]) == (14500, 4500)
    assert (by_direction["out"]["src_port"], by_direction["out"]["dst_port"]) == (4500, 14500)
