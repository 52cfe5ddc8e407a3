"""The kernel service's memory backend over a real nats-server: SAD/SPD, refusals, no keys out."""

from __future__ import annotations

import dataclasses
import io
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import msgpack
import nats
import pytest
from nats.aio.client import Client

from ikefarm.proto import envelope, subjects
from ikefarm.proto.envelope import BusError
from ikefarm.proto.messages import (
    ChildDelete,
    ChildInstall,
    ChildUpdate,
    KernelAck,
    KernelShowRequest,
    KernelState,
    RouteSourceReply,
    RouteSourceRequest,
    TransportKeyReply,
    TransportKeyRequest,
)
from ikefarm.services.kernel import backends
from ikefarm.services.kernel.service import BackendNotAvailable, KernelService
from ikefarm.shared.bus.child_keys import ChildKeys, seal_child_keys
from ikefarm.shared.bus.embedded import EmbeddedNats
from ikefarm.shared.bus.runtime import Runtime
from ikefarm.shared.config.loader import parse_config
from ikefarm.shared.ikev2.constants import EncrId
from ikefarm.shared.observability.logging import configure_logging

EXAMPLE_TEXT = (
    Path(__file__).resolve().parents[2] / "ops" / "examples" / "psk-responder.toml"
).read_text()

ENCR_KEY_IN = bytes(range(0x10, 0x34))  # 36 octets: AES-256 + 4-octet GCM salt
ENCR_KEY_OUT = bytes(range(0x40, 0x64))
KEYS = (ENCR_KEY_IN, ENCR_KEY_OUT)

MEMORY = parse_config('[kernel]\nbackend = "memory"\n')


def child(unique_id: int = 1, spi_in: str = "c0000001", spi_out: str = "c1000001") -> ChildInstall:
    return ChildInstall(
        unique_id=unique_id,
        ike_unique_id=10,
        name="net",
        vpn="rw",
        reqid=unique_id,
        protocol="esp",
        mode="tunnel",
        local_address="192.0.2.1",
        local_port=4500,
        remote_address="198.51.100.2",
        remote_port=4501,
        spi_in=bytes.fromhex(spi_in),
        spi_out=bytes.fromhex(spi_out),
        encr_id=EncrId.AES_GCM_16,
        encr_key_bits=256,
        integ_id=None,
        esn=False,
        replay_window=32,
        udp_encap=True,
        local_ts=["10.100.0.0/24"],
        remote_ts=["10.200.0.0/24", "10.201.0.0/24"],
    )


def delete_of(install: ChildInstall) -> ChildDelete:
    return ChildDelete(
        unique_id=install.unique_id,
        reqid=install.reqid,
        spi_in=install.spi_in,
        spi_out=install.spi_out,
        local_address=install.local_address,
        remote_address=install.remote_address,
    )


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    """Everything the service logs up to level 3 (one below the key-material level)."""
    stream = io.StringIO()
    configure_logging("kernel", "kernel-0", {"daemon": {"default": 3}}, stream=stream)
    yield stream
    configure_logging("kernel", "kernel-0", {"daemon": {"default": "disable"}})


@pytest.fixture
async def kernel(nats_server: EmbeddedNats, log_stream: io.StringIO) -> AsyncIterator[Runtime]:
    runtime = Runtime(KernelService, MEMORY, nats_server.url, instance="kernel-0")
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


async def sealed(nc: Client, request: ChildInstall) -> ChildInstall:
    """`request` with ENCR_KEY_IN/OUT sealed to the kernel service, as an ike worker sends it."""
    raw = await ask(nc, subjects.KERNEL_TRANSPORT_KEY, envelope.pack(TransportKeyRequest()))
    public = envelope.unpack_reply(raw, TransportKeyReply).public_key
    keys = ChildKeys(ENCR_KEY_IN, ENCR_KEY_OUT, b"", b"")
    ephemeral, sealed_keys = seal_child_keys(public, request.spi_in, request.spi_out, keys)
    return dataclasses.replace(request, ephemeral=ephemeral, sealed_keys=sealed_keys)


async def install(nc: Client, request: ChildInstall) -> KernelAck:
    payload = envelope.pack(await sealed(nc, request))
    assert not any(key in payload for key in KEYS)
    raw = await ask(nc, subjects.KERNEL_CHILD_INSTALL, payload)
    assert not any(key in raw for key in KEYS)
    return envelope.unpack_reply(raw, KernelAck)


async def delete(nc: Client, request: ChildDelete) -> KernelAck:
    raw = await ask(nc, subjects.KERNEL_CHILD_DELETE, envelope.pack(request))
    return envelope.unpack_reply(raw, KernelAck)


def update_of(install: ChildInstall, **changes: object) -> ChildUpdate:
    moved = ChildUpdate(
        unique_id=install.unique_id,
        ike_unique_id=install.ike_unique_id,
        reqid=install.reqid,
        spi_in=install.spi_in,
        spi_out=install.spi_out,
        local_address="192.0.2.1",
        local_port=4500,
        remote_address="203.0.113.9",
        remote_port=4500,
        udp_encap=False,
    )
    return dataclasses.replace(moved, **changes)  # type: ignore[arg-type]


async def update(nc: Client, request: ChildUpdate) -> KernelAck:
    raw = await ask(nc, subjects.KERNEL_CHILD_UPDATE, envelope.pack(request))
    return envelope.unpack_reply(raw, KernelAck)


async def show(nc: Client) -> tuple[KernelState, bytes]:
    raw = await ask(nc, subjects.KERNEL_SHOW, envelope.pack(KernelShowRequest()))
    return envelope.unpack_reply(raw, KernelState), raw


async def test_install_show_delete(
    kernel: Runtime, client: Client, log_stream: io.StringIO
) -> None:
    assert await install(client, child()) == KernelAck(ok=True)
    state, raw = await show(client)
    assert state.backend == "memory"
    sas = {(sa["spi"], sa["direction"]): sa for sa in state.sas}
    assert set(sas) == {("c0000001", "in"), ("c1000001", "out")}
    inbound, outbound = sas[("c0000001", "in")], sas[("c1000001", "out")]
    assert (inbound["src"], inbound["dst"]) == ("198.51.100.2", "192.0.2.1")
    assert (outbound["src"], outbound["dst"]) == ("192.0.2.1", "198.51.100.2")
    assert (outbound["src_port"], outbound["dst_port"]) == (4500, 4501)
    for sa in (inbound, outbound):
        assert sa["reqid"] == 1 and sa["mode"] == "tunnel" and sa["encap"] is True
        assert sa["encr_id"] == EncrId.AES_GCM_16 and sa["encr"] == "AES_GCM_16"
        assert sa["encr_key_bits"] == 256 and sa["encr_key_length"] == 36
        assert sa["integ_id"] is None and sa["integ_key_length"] == 0
        assert not any("key" in name and isinstance(v, bytes) for name, v in sa.items())
    # tunnel mode: out, in and fwd for each selector pair
    policies = {(p["direction"], p["src"], p["dst"]) for p in state.policies}
    assert policies == {
        ("out", "10.100.0.0/24", "10.200.0.0/24"),
        ("in", "10.200.0.0/24", "10.100.0.0/24"),
        ("fwd", "10.200.0.0/24", "10.100.0.0/24"),
        ("out", "10.100.0.0/24", "10.201.0.0/24"),
        ("in", "10.201.0.0/24", "10.100.0.0/24"),
        ("fwd", "10.201.0.0/24", "10.100.0.0/24"),
    }
    assert all(p["reqid"] == 1 for p in state.policies)
    assert not any(key in raw for key in KEYS)
    assert kernel.service is not None and kernel.service.gauges()["sas"] == 2

    assert await delete(client, delete_of(child())) == KernelAck(ok=True)
    state, _raw = await show(client)
    assert state.sas == [] and state.policies == []
    assert kernel.counters["child_install.ok"] == 1 and kernel.counters["child_delete.ok"] == 1

    logged = log_stream.getvalue()
    assert '"event": "child_installed"' in logged and '"event": "child_deleted"' in logged
    assert '"subsystem": "kernel"' in logged and '"backend": "memory"' in logged
    for key in KEYS:
        assert key.hex() not in logged and repr(key) not in logged


async def test_transport_mode_has_no_forward_policy(kernel: Runtime, client: Client) -> None:
    transport = dataclasses.replace(child(), mode="transport", local_ts=[], remote_ts=[])
    assert await install(client, transport) == KernelAck(ok=True)
    state, _raw = await show(client)
    assert {(p["direction"], p["src"], p["dst"]) for p in state.policies} == {
        ("out", "192.0.2.1/32", "198.51.100.2/32"),
        ("in", "198.51.100.2/32", "192.0.2.1/32"),
    }


async def test_duplicate_spi_and_unknown_child_are_refused(kernel: Runtime, client: Client) -> None:
    assert (await install(client, child())).ok
    duplicate_in = child(unique_id=2, spi_out="c1000002")
    assert await install(client, duplicate_in) == KernelAck(ok=False, error="spi exists")
    duplicate_out = child(unique_id=3, spi_in="c0000003")
    assert await install(client, duplicate_out) == KernelAck(ok=False, error="spi exists")
    assert kernel.counters["child_install.spi_exists"] == 2
    state, _raw = await show(client)
    assert len(state.sas) == 2  # the refused installs left nothing behind

    unknown = delete_of(child(unique_id=99, spi_in="deadbeef", spi_out="deadbee0"))
    assert await delete(client, unknown) == KernelAck(ok=False, error="not found")
    assert kernel.counters["child_delete.not_found"] == 1
    assert (await delete(client, delete_of(child()))).ok
    assert await delete(client, delete_of(child())) == KernelAck(ok=False, error="not found")
    assert kernel.counters["child_delete.not_found"] == 2


async def test_update_moves_both_sas_and_the_policy_templates(
    kernel: Runtime, client: Client, log_stream: io.StringIO
) -> None:
    """MOBIKE (RFC 4555 3.5): the peer moved; the child's SAs follow, encapsulation off."""
    assert (await install(client, child())).ok
    assert await update(client, update_of(child())) == KernelAck(ok=True)
    state, _raw = await show(client)
    sas = {sa["direction"]: sa for sa in state.sas}
    assert (sas["in"]["spi"], sas["out"]["spi"]) == ("c0000001", "c1000001")
    assert (sas["in"]["src"], sas["in"]["dst"]) == ("203.0.113.9", "192.0.2.1")
    assert (sas["out"]["src"], sas["out"]["dst"]) == ("192.0.2.1", "203.0.113.9")
    assert (sas["out"]["src_port"], sas["out"]["dst_port"]) == (4500, 4500)
    assert sas["in"]["encap"] is False and sas["out"]["encap"] is False
    assert sas["in"]["encr_key_length"] == 36  # the SA itself is the same
    for policy in state.policies:
        outbound = policy["direction"] == "out"
        expected = ("192.0.2.1", "203.0.113.9") if outbound else ("203.0.113.9", "192.0.2.1")
        assert (policy["tmpl_src"], policy["tmpl_dst"]) == expected
    assert kernel.counters["child_update.ok"] == 1
    assert '"event": "child_moved"' in log_stream.getvalue()


async def test_update_of_an_unknown_child_or_other_spis_is_refused(
    kernel: Runtime, client: Client
) -> None:
    assert (await install(client, child())).ok
    unknown = update_of(child(), unique_id=99)
    assert await update(client, unknown) == KernelAck(ok=False, error="not found")
    other = update_of(child(), spi_out=bytes.fromhex("deadbeef"))
    refused = await update(client, other)
    assert not refused.ok and "SPIs" in refused.error
    family = update_of(child(), local_address="2001:db8::1", remote_address="2001:db8::9")
    assert not (await update(client, family)).ok
    assert kernel.counters["child_update.not_found"] == 1
    assert kernel.counters["child_update.spi_mismatch"] == 1
    assert kernel.counters["child_update.family"] == 1
    state, _raw = await show(client)
    assert {sa["src"] for sa in state.sas} == {"192.0.2.1", "198.51.100.2"}  # unchanged


async def test_route_source_without_mobike_answers_nothing(kernel: Runtime, client: Client) -> None:
    """No VPN has mobike: the addresses are not watched and no source is named."""
    raw = await ask(
        client, subjects.KERNEL_ROUTE_SOURCE, envelope.pack(RouteSourceRequest("192.0.2.2"))
    )
    assert envelope.unpack_reply(raw, RouteSourceReply) == RouteSourceReply("")


def _without(field: str) -> bytes:
    body = envelope._to_wire(child())
    del body[field]
    return msgpack.packb({"v": 1, "kind": "child-install", "body": body})


@pytest.mark.parametrize(
    ("subject", "payload", "code"),
    [
        (subjects.KERNEL_CHILD_INSTALL, b"\xc1 not msgpack", "bad_encoding"),
        (
            subjects.KERNEL_CHILD_INSTALL,
            msgpack.packb({"v": 7, "kind": "child-install", "body": {}}),
            "bad_version",
        ),
        (subjects.KERNEL_CHILD_INSTALL, _without("spi_in"), "missing_field"),
        (
            subjects.KERNEL_CHILD_INSTALL,
            envelope.pack(dataclasses.replace(child(), spi_in=b"\x01")),
            "bad_field",
        ),
        (
            subjects.KERNEL_CHILD_INSTALL,
            envelope.pack(dataclasses.replace(child(), mode="beet")),
            "bad_field",
        ),
        (subjects.KERNEL_CHILD_DELETE, b"\x93\x01\x02", "bad_encoding"),
        (
            subjects.KERNEL_CHILD_DELETE,
            msgpack.packb({"v": 1, "kind": "child-delete", "body": {"unique_id": 1}}),
            "missing_field",
        ),
        (
            subjects.KERNEL_SHOW,
            msgpack.packb({"v": 2, "kind": "kernel-show-request"}),
            "bad_version",
        ),
        (subjects.KERNEL_SHOW, envelope.pack(delete_of(child())), "wrong_kind"),
        (subjects.KERNEL_CHILD_UPDATE, b"\xc1", "bad_encoding"),
        (
            subjects.KERNEL_CHILD_UPDATE,
            msgpack.packb({"v": 1, "kind": "child-update", "body": {"unique_id": 1}}),
            "missing_field",
        ),
        (
            subjects.KERNEL_CHILD_UPDATE,
            envelope.pack(update_of(child(), remote_address="not-an-address")),
            "bad_field",
        ),
        (
            subjects.KERNEL_CHILD_UPDATE,
            envelope.pack(update_of(child(), local_port=70000)),
            "bad_field",
        ),
        (
            subjects.KERNEL_CHILD_UPDATE,
            envelope.pack(update_of(child(), local_address="2001:db8::1")),
            "bad_field",
        ),
        (subjects.KERNEL_ROUTE_SOURCE, envelope.pack(RouteSourceRequest("nope")), "bad_field"),
        (subjects.KERNEL_ROUTE_SOURCE, b"\x92", "bad_encoding"),
    ],
)
async def test_malformed_requests_get_structured_errors(
    kernel: Runtime, client: Client, subject: str, payload: bytes, code: str
) -> None:
    raw = await ask(client, subject, payload)
    with pytest.raises(BusError) as refused:
        envelope.unpack_reply(raw)
    assert refused.value.code == code
    assert not any(key in raw for key in KEYS)
    assert kernel.counters[f"bus_refused.{code}"] == 1
    # still serving
    assert (await install(client, child())).ok
    state, _raw = await show(client)
    assert len(state.sas) == 2


def test_auto_backend_says_what_it_chose_and_why() -> None:
    """`auto` probes the kernel once: netlink where it takes an ESP state, else the userspace
    dataplane, with the kernel's own refusal as the reason (logged at level 1 at start)."""
    accepted, why = backends.probe_esp()
    choice = KernelService.preflight(parse_config(""))  # backend left at its default
    if accepted:
        assert choice == backends.Choice("netlink", f"auto: {why}")
    else:
        assert choice.backend == "userspace"
        assert choice.reason.startswith("auto: kernel refused XFRM_MSG_NEWSA: ")


def test_auto_on_userspace_refuses_what_the_dataplane_cannot_do() -> None:
    if backends.probe_esp()[0]:
        pytest.skip("this kernel takes ESP states: auto picks netlink, which does transport mode")
    config = parse_config(EXAMPLE_TEXT.replace('mode = "tunnel"', 'mode = "transport"'))
    with pytest.raises(BackendNotAvailable, match=r"security-policy\[0\]\.mode"):
        KernelService.preflight(config)


def test_show_rows_never_hold_key_bytes() -> None:
    from ikefarm.services.kernel.memory import MemoryKernel

    backend = MemoryKernel()
    opened = dataclasses.replace(child(), encr_key_in=ENCR_KEY_IN, encr_key_out=ENCR_KEY_OUT)
    sa_in, sa_out = backend.install(opened)
    text = repr(backend) + repr(sa_in) + repr(sa_out) + repr(backend.show())
    for key in KEYS:
        assert key.hex() not in text and repr(key) not in text
    rows: list[dict[str, Any]] = backend.show()[0]
    assert all(not isinstance(value, bytes) for row in rows for value in row.values())
