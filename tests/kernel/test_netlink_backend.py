"""The netlink backend (services/kernel/netlink.py) programming a namespace's kernel.

This machine's kernel has XFRM policies but no ESP states (`CONFIG_INET_ESP`
off). The real socket is used throughout; only where a test needs an installed
ESP state does `EspStatesRecorded` stand in for the kernel's SAD, a fake for
exactly what this machine cannot have: it records SAs instead of sending
them, while policies, SPD thresholds and routes still go to the real kernel.
"""

from __future__ import annotations

import dataclasses
import errno
import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from ikefarm.proto.messages import (
    ChildCounters,
    ChildDelete,
    ChildInstall,
    ChildUpdate,
    TrapRemove,
)
from ikefarm.services.kernel import xfrm
from ikefarm.services.kernel.backends import probe_esp
from ikefarm.services.kernel.memory import KernelRefusal
from ikefarm.services.kernel.netlink import (
    NetlinkKernel,
    NetlinkOptions,
    PolicyOptions,
    selector_parts,
)
from ikefarm.shared.config.loader import parse_config
from ikefarm.shared.ikev2.constants import EncrId, IntegId
from tests.harness.netns import Namespace
from tests.service.test_kernel_memory import ENCR_KEY_IN, ENCR_KEY_OUT, delete_of
from tests.service.test_kernel_memory import child as memory_child
from tests.service.test_kernel_traps import trap

pytestmark = pytest.mark.kernel

KEY_IN, KEY_OUT = ENCR_KEY_IN, ENCR_KEY_OUT


def child(unique_id: int = 1, **changes: Any) -> ChildInstall:
    """The memory tests' child in VPN hq, reqid 3, with ESN and a 1024-packet window."""
    base = memory_child(
        unique_id,
        spi_in=f"{0xC0000000 + unique_id:08x}",
        spi_out=f"{0xC1000000 + unique_id:08x}",
    )
    fields: dict[str, Any] = {
        "vpn": "hq",
        "reqid": 3,
        "esn": True,
        "replay_window": 1024,
        # the keys as the kernel service hands them to its backend, once opened
        "encr_key_in": KEY_IN,
        "encr_key_out": KEY_OUT,
    }
    return dataclasses.replace(base, **(fields | changes))


class EspStatesRecorded(xfrm.XfrmSocket):
    """FAKE SAD for this kernel without ESP states: SAs are recorded, not sent.

    Everything else (policies, SPD info) goes to the real kernel in the namespace.
    """

    def __init__(self, netns: str) -> None:
        super().__init__(netns)
        self.states: dict[tuple[str, int], xfrm.SaSpec] = {}

    def add_sa(self, spec: xfrm.SaSpec, *, update: bool = False) -> None:
        self.states[(spec.dst, spec.spi)] = spec

    def delete_sa(self, src: str | None, dst: str, spi: int, *_a: Any, **_k: Any) -> None:
        if self.states.pop((dst, spi), None) is None:
            raise xfrm.XfrmError(errno.ESRCH, "XFRM_MSG_DELSA")

    def get_sa(self, src: str | None, dst: str, spi: int, *_a: Any, **_k: Any) -> xfrm.SaInfo:
        raise xfrm.XfrmError(errno.ESRCH, "XFRM_MSG_GETSA")

    def migrate(
        self,
        selector: xfrm.Selector,
        direction: str,
        migrations: Any,
        *,
        encap: xfrm.Encap | None = None,
        if_id: int = 0,
    ) -> None:
        """The real kernel moves the policy's templates; the recorded SAs move here, as the
        kernel's would (an SA whose addresses and reqid the migration names)."""
        super().migrate(selector, direction, migrations, encap=encap, if_id=if_id)
        for m in migrations:
            for (dst, spi), spec in list(self.states.items()):
                if (spec.src, dst, spec.reqid) == (m.old_src, m.old_dst, m.reqid):
                    del self.states[(dst, spi)]
                    moved = dataclasses.replace(
                        spec, src=m.new_src, dst=m.new_dst, encap=encap or spec.encap
                    )
                    self.states[(m.new_dst, spi)] = moved


@pytest.fixture
def gateway(netns: Namespace) -> Namespace:
    """192.0.2.1/24 on eth0; the peer 198.51.100.2 behind router 192.0.2.254."""
    netns.run(["ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p"])
    netns.run(["ip", "link", "set", "eth0", "up"])
    netns.run(["ip", "link", "set", "eth0p", "up"])
    netns.add_address("eth0", "192.0.2.1/24")
    netns.run(["ip", "route", "add", "198.51.100.0/24", "via", "192.0.2.254"])
    return netns


@pytest.fixture
async def real(gateway: Namespace) -> AsyncIterator[NetlinkKernel]:
    backend = NetlinkKernel(NetlinkOptions(), netns=gateway.name)
    yield backend
    backend.close()


def faked(gateway: Namespace, **options: Any) -> NetlinkKernel:
    return NetlinkKernel(
        NetlinkOptions(**options), netns=gateway.name, socket=EspStatesRecorded(gateway.name)
    )


@pytest.fixture
def esp_faked(gateway: Namespace) -> Iterator[NetlinkKernel]:
    backend = faked(
        gateway,
        install_routes=True,
        policies={("hq", "net"): PolicyOptions(priority=1000, rekey_time=3600, life_time=3960)},
    )
    yield backend
    backend.close()


def policies(ns: Namespace) -> str:
    return ns.run(["ip", "xfrm", "policy", "show"]).stdout


async def test_child_the_kernel_refuses_is_reported_counted_and_leaves_nothing(
    gateway: Namespace, real: NetlinkKernel
) -> None:
    accepted, why = probe_esp(gateway.name)
    request = child()
    if accepted:
        pytest.skip(f"this kernel takes ESP states ({why}); the refusal path needs one without")
    with pytest.raises(KernelRefusal) as refused:
        await real.install(request)
    assert refused.value.code in ("kernel_enosys", "kernel_eprotonosupport")
    assert refused.value.text.startswith("kernel refused XFRM_MSG_NEWSA: ")
    assert KEY_IN.hex() not in refused.value.text and KEY_OUT.hex() not in refused.value.text
    assert real.refusals == 1
    assert (real.child_count, len(real.sad), real.policy_count) == (0, 0, 0)
    assert policies(gateway).strip() == ""
    assert gateway.run(["ip", "xfrm", "state"]).stdout.strip() == ""
    # the same child can be asked for again (nothing half-installed blocks it)
    with pytest.raises(KernelRefusal):
        await real.install(request)
    assert real.refusals == 2


async def test_trap_policies_are_programmed_and_removed(
    gateway: Namespace, real: NetlinkKernel
) -> None:
    await real.install_trap(trap())
    shown = policies(gateway)
    for direction, src, dst in (
        ("out", "10.100.0.0/24", "10.200.0.0/24"),
        ("in", "10.200.0.0/24", "10.100.0.0/24"),
        ("fwd", "10.200.0.0/24", "10.100.0.0/24"),
    ):
        assert re.search(rf"src {src} dst {dst} \n\s+dir {direction} priority \d+", shown), shown
    assert shown.count("proto esp reqid 3 mode tunnel") == 3
    assert real.policy_count == 3

    # replaced with wider selectors: the new ones in, the old ones out
    await real.install_trap(trap(remote_ts=["10.200.0.0/16"]))
    shown = policies(gateway)
    assert "dst 10.200.0.0/16" in shown and "dst 10.200.0.0/24" not in shown
    await real.remove_trap(TrapRemove(vpn="hq", name="net", reqid=3))
    assert policies(gateway).strip() == ""
    assert real.policy_count == 0


async def test_svti_ids_become_policy_if_ids(gateway: Namespace) -> None:
    backend = NetlinkKernel(
        NetlinkOptions(policies={("hq", "net"): PolicyOptions(svti_id_in=7, svti_id_out=8)}),
        netns=gateway.name,
    )
    try:
        await backend.install_trap(trap())
        shown = policies(gateway)
        split = re.split(r"^(?=src )", shown, flags=re.M)
        blocks = {re.findall(r"dir (\w+)", b)[0]: b for b in split if b.strip()}
        assert "if_id 0x8" in blocks["out"], shown
        assert "if_id 0x7" in blocks["in"] and "if_id 0x7" in blocks["fwd"], shown
    finally:
        await backend.remove_trap(TrapRemove(vpn="hq", name="net", reqid=3))
        backend.close()
    assert policies(gateway).strip() == ""


async def test_spd_hash_thresholds_from_the_config(gateway: Namespace) -> None:
    config = parse_config(
        '[kernel]\nbackend = "netlink"\n'
        "[ike.global-options]\nsp-hash-ipv4 = { local = 16, remote = 24 }\n"
        "sp-hash-ipv6 = { local = 56, remote = 64 }\n"
    )
    backend = NetlinkKernel.from_config(config, netns=gateway.name)
    try:
        shown = gateway.run(["ip", "-s", "-s", "xfrm", "policy", "count"]).stdout
        assert "SPD IPv4 thresholds: local 16 remote 24" in shown
        assert "SPD IPv6 thresholds: local 56 remote 64" in shown
    finally:
        backend.close()


async def test_child_sas_policies_and_install_routes_with_esp_states_faked(
    gateway: Namespace, esp_faked: NetlinkKernel
) -> None:
    request = child()
    await esp_faked.install(request)
    states = esp_faked.xfrm.states  # type: ignore[attr-defined]
    sa_in = states[("192.0.2.1", 0xC0000001)]
    sa_out = states[("198.51.100.2", 0xC1000001)]
    assert (sa_in.src, sa_out.src, sa_in.reqid, sa_out.reqid) == (
        "198.51.100.2",
        "192.0.2.1",
        3,
        3,
    )
    assert sa_in.aead == xfrm.Algorithm("rfc4106(gcm(aes))", KEY_IN, 128)
    assert sa_out.aead == xfrm.Algorithm("rfc4106(gcm(aes))", KEY_OUT, 128)
    assert (sa_in.esn, sa_in.replay_window) == (True, 1024)
    assert sa_in.encap == xfrm.Encap(4501, 4500) and sa_out.encap == xfrm.Encap(4500, 4501)
    assert (sa_in.lifetime.soft_seconds, sa_in.lifetime.hard_seconds) == (3600, 3960)

    shown = policies(gateway)
    assert shown.count("dir out priority 1000") == 2
    assert shown.count("dir fwd priority 1000") == 2
    assert shown.count("tmpl src 192.0.2.1 dst 198.51.100.2") == 2
    assert shown.count("tmpl src 198.51.100.2 dst 192.0.2.1") == 4
    table = gateway.run(["ip", "route", "show", "table", "220"]).stdout
    assert "10.200.0.0/24 via 192.0.2.254 dev eth0 proto static" in table
    assert "10.201.0.0/24 via 192.0.2.254 dev eth0 proto static" in table
    assert "220:\tfrom all lookup 220" in gateway.run(["ip", "rule"]).stdout

    # a rekey: the successor shares selectors and routes; the old child's delete keeps them
    successor = child(2)
    await esp_faked.install(successor)
    assert esp_faked.policy_count == 6
    await esp_faked.delete(delete_of(request))
    assert policies(gateway).count("dir out priority 1000") == 2
    assert "10.200.0.0/24" in gateway.run(["ip", "route", "show", "table", "220"]).stdout
    await esp_faked.delete(delete_of(successor))
    assert policies(gateway).strip() == ""
    assert gateway.run(["ip", "route", "show", "table", "220"]).stdout.strip() == ""
    assert states == {}


async def test_mobike_moves_the_policies_templates_and_the_sas(
    gateway: Namespace, esp_faked: NetlinkKernel
) -> None:
    """XFRM_MSG_MIGRATE (RFC 4555 3.5): the real kernel moves every policy's template; the
    SAs (faked here) follow with their SPIs; the child is deleted at its new endpoints."""
    request = child()
    await esp_faked.install(request)
    moved = ChildUpdate(
        unique_id=request.unique_id,
        ike_unique_id=request.ike_unique_id,
        reqid=request.reqid,
        spi_in=request.spi_in,
        spi_out=request.spi_out,
        local_address="192.0.2.1",
        local_port=4500,
        remote_address="198.51.100.9",
        remote_port=4600,
        udp_encap=True,
    )
    sa_in, sa_out = await esp_faked.update(moved)
    assert (sa_in.src, sa_in.dst, sa_out.src, sa_out.dst) == (
        "198.51.100.9",
        "192.0.2.1",
        "192.0.2.1",
        "198.51.100.9",
    )
    shown = policies(gateway)
    assert shown.count("tmpl src 192.0.2.1 dst 198.51.100.9") == 2
    assert shown.count("tmpl src 198.51.100.9 dst 192.0.2.1") == 4
    assert "198.51.100.2" not in shown
    states = esp_faked.xfrm.states  # type: ignore[attr-defined]
    assert states[("198.51.100.9", 0xC1000001)].encap == xfrm.Encap(4500, 4600)
    assert states[("192.0.2.1", 0xC0000001)].src == "198.51.100.9"
    # turning encapsulation off is not something XFRM_MSG_MIGRATE can do
    with pytest.raises(KernelRefusal, match="not implemented"):
        await esp_faked.update(dataclasses.replace(moved, udp_encap=False))
    with pytest.raises(KernelRefusal, match="not found"):
        await esp_faked.update(dataclasses.replace(moved, unique_id=9, spi_in=b"\x0f" * 4))
    await esp_faked.delete(delete_of(request))
    assert states == {} and policies(gateway).strip() == ""


async def test_child_under_its_trap_keeps_the_trap_policies(
    gateway: Namespace, esp_faked: NetlinkKernel
) -> None:
    await esp_faked.install_trap(trap())
    request = child(remote_ts=["10.200.0.0/24"])
    await esp_faked.install(request)
    assert esp_faked.policy_count == 3  # the same three selectors, two users each
    await esp_faked.delete(delete_of(request))
    assert policies(gateway).count("proto esp reqid 3 mode tunnel") == 3
    await esp_faked.remove_trap(TrapRemove(vpn="hq", name="net", reqid=3))
    assert policies(gateway).strip() == ""


async def test_svti_child_gets_inject_routes_and_no_install_routes(gateway: Namespace) -> None:
    gateway.run(["ip", "link", "add", "svti100", "type", "veth", "peer", "name", "svti100p"])
    gateway.run(["ip", "link", "set", "svti100", "up"])
    opts = PolicyOptions(
        svti_id_in=100, svti_id_out=100, inject_routes={"next-hop": "svti100", "table": 300}
    )
    backend = faked(gateway, install_routes=True, policies={("hq", "net"): opts})
    try:
        await backend.install(child())
        states = backend.xfrm.states  # type: ignore[attr-defined]
        assert {spec.if_id for spec in states.values()} == {100}
        shown = gateway.run(["ip", "route", "show", "table", "300"]).stdout
        assert "10.200.0.0/24 dev svti100 proto static" in shown
        assert "10.201.0.0/24 dev svti100 proto static" in shown
        assert "lookup 220" not in gateway.run(["ip", "rule"]).stdout
        await backend.delete(delete_of(child()))
        assert "10.200.0.0/24" not in gateway.run(["ip", "route", "show", "table", "all"]).stdout
    finally:
        backend.close()


async def test_cbc_hmac_child_and_unsupported_algorithms(
    gateway: Namespace, esp_faked: NetlinkKernel
) -> None:
    cbc = child(
        encr_id=EncrId.AES_CBC,
        integ_id=IntegId.HMAC_SHA2_256_128,
        encr_key_in=bytes(32),
        encr_key_out=bytes(32),
        integ_key_in=bytes(32),
        integ_key_out=bytes(32),
    )
    await esp_faked.install(cbc)
    spec = esp_faked.xfrm.states[("192.0.2.1", 0xC0000001)]  # type: ignore[attr-defined]
    assert (spec.crypt.name, spec.auth.name, spec.auth.bits) == ("cbc(aes)", "hmac(sha256)", 128)
    await esp_faked.delete(delete_of(cbc))
    with pytest.raises(KernelRefusal) as refused:
        await esp_faked.install(child(3, encr_id=EncrId.DES))
    assert refused.value.code == "unsupported_algorithm"
    assert policies(gateway).strip() == "" and esp_faked.child_count == 0


def test_selector_text_to_xfrm_prefixes() -> None:
    assert [p.network for p in selector_parts("10.0.0.0/24")] == ["10.0.0.0/24"]
    parts = selector_parts("10.0.0.1..10.0.0.6[tcp/80]")
    assert [p.network for p in parts] == [
        "10.0.0.1/32",
        "10.0.0.2/31",
        "10.0.0.4/31",
        "10.0.0.6/32",
    ]
    assert {(p.proto, p.port) for p in parts} == {(6, 80)}
    assert selector_parts("2001:db8::/64[udp]")[0].proto == 17
    with pytest.raises(ValueError, match="single port"):
        selector_parts("10.0.0.0/24[tcp/1000-2000]")


async def test_expire_events_name_the_child_from_the_books(esp_faked: NetlinkKernel) -> None:
    from tests.xfrm_helpers import expire

    await esp_faked.install(child(unique_id=5))
    recorded = esp_faked.xfrm.states[("192.0.2.1", 0xC0000005)]  # type: ignore[attr-defined]
    [(_seq, event)] = list(xfrm.parse_messages(expire(recorded, hard=False)))
    assert isinstance(event, xfrm.Expire)
    message = esp_faked.event_message(event)
    assert (message.unique_id, message.direction, message.hard) == (5, "in", False)
    assert message.spi == (0xC0000005).to_bytes(4, "big") and message.reqid == 3
    stranger = dataclasses.replace(recorded, spi=0x1234)
    [(_seq, unknown)] = list(xfrm.parse_messages(expire(stranger, hard=True)))
    message = esp_faked.event_message(unknown)  # type: ignore[arg-type]
    assert (message.unique_id, message.direction, message.hard) == (0, "", True)


async def test_show_kernel_lists_algorithms_lifetimes_counters_never_keys(
    esp_faked: NetlinkKernel,
) -> None:
    from ikefarm.proto.messages import KernelState
    from ikefarm.shared.cli.main import kernel_lines

    await esp_faked.install(child())
    await esp_faked.install_trap(trap())
    sas, policies_ = esp_faked.show()
    assert {row["counters"] is None for row in sas} == {True}  # the fake SAD has no counters
    sas[0]["counters"] = {"bytes": 1400, "packets": 1, "use_time": 0}  # as GETSA reports them
    text = "\n".join(kernel_lines(KernelState("netlink", sas, policies_, esp_faked.show_traps())))
    # the vSR `show state` layout (seed 004): key value lines, blocks closed by ".."
    block = text.split("sa spi c0000001 direction in\n", 1)[1].split("    ..", 1)[0]
    for line in ("reqid 3", "mode tunnel", "source 198.51.100.2", "destination 192.0.2.1",
                 "aead-alg AES_GCM_16", "esn true", "replay-window 1024"):  # fmt: skip
        assert f"    {line}\n" in block, line
    assert "    bytes 1400\n    packets 1\n" in text
    assert text.count("    rekey-time 3600\n    life-time 3960\n") == 2
    assert "trap vpn hq security-policy net\n    reqid 3\n" in text
    assert "    local-ts subnet 10.100.0.0/24\n    remote-ts subnet 10.200.0.0/24\n" in text
    for key in (KEY_IN, KEY_OUT):
        assert key.hex() not in text and key.hex() not in repr(sas)


async def test_mixed_family_selectors_pair_only_within_a_family(
    gateway: Namespace, real: NetlinkKernel
) -> None:
    await real.install_trap(trap(local_ts=["10.100.0.0/24", "2001:db8:1::/64"],
                                 remote_ts=["10.200.0.0/24"]))  # fmt: skip
    assert real.policy_count == 3  # the IPv6 local selector has no IPv6 partner
    await real.remove_trap(TrapRemove(vpn="hq", name="net", reqid=3))
    with pytest.raises(ValueError, match="same address family"):
        await real.install_trap(trap(local_ts=["2001:db8:1::/64"]))
    assert policies(gateway).strip() == "" and real.traps == {}


def test_acquire_timeout_becomes_the_namespace_acquire_lifetime(
    gateway: Namespace, ikefarm_argv: list[str]
) -> None:
    """From the service's own namespace (here: a process started in the test namespace)."""
    script = (
        "from ikefarm.services.kernel.netlink import NetlinkKernel\n"
        "from ikefarm.shared.config.loader import parse_config\n"
        "config = parse_config('[ike.global-options]\\nacquire-timeout = 7\\n')\n"
        "backend = NetlinkKernel.from_config(config)\n"
        "print(backend.warnings)\n"
        "backend.close()\n"
    )
    before = gateway.run(["cat", "/proc/sys/net/core/xfrm_acq_expires"]).stdout.strip()
    done = gateway.run([ikefarm_argv[0], "-c", script], timeout=60)
    assert done.stdout.strip() == "[]"
    assert before != "7"
    assert gateway.run(["cat", "/proc/sys/net/core/xfrm_acq_expires"]).stdout.strip() == "7"


class EspStatesCounted(EspStatesRecorded):
    """FAKE SAD (as EspStatesRecorded) whose GETSA answers with counters the test sets,
    as the kernel would after traffic: this kernel cannot hold the ESP states."""

    def __init__(self, netns: str) -> None:
        super().__init__(netns)
        self.counted: dict[int, tuple[int, int]] = {}  # spi -> (bytes, packets)

    def get_sa(self, src: str | None, dst: str, spi: int, *_a: Any, **_k: Any) -> xfrm.SaInfo:
        if (dst, spi) not in self.states:
            raise xfrm.XfrmError(errno.ESRCH, "XFRM_MSG_GETSA")
        octets, packets = self.counted.get(spi, (0, 0))
        zero = dict.fromkeys(
            ("protocol", "reqid", "mode", "family", "flags", "replay_window", "add_time",
             "use_time", "soft_seconds", "hard_seconds", "soft_bytes", "hard_bytes",
             "soft_packets", "hard_packets", "if_id"),
            0,
        )  # fmt: skip
        return xfrm.SaInfo(src=src or "", dst=dst, spi=spi, bytes=octets, packets=packets,
                           algorithms=(), encap=None, esn_window=None, **zero)  # fmt: skip


async def test_moved_counters_reports_the_children_whose_kernel_counters_changed(
    gateway: Namespace,
) -> None:
    sad = EspStatesCounted(gateway.name)
    backend = NetlinkKernel(NetlinkOptions(), netns=gateway.name, socket=sad)
    try:
        await backend.install(child(1))
        await backend.install(child(2))
        assert backend.moved_counters() == []  # nothing counted yet
        sad.counted[0xC0000001] = (840, 10)  # child 1 inbound
        sad.counted[0xC1000001] = (420, 5)
        assert backend.moved_counters() == [ChildCounters(1, 840, 10, 420, 5)]
        assert backend.moved_counters() == []  # unchanged since the last batch
        sad.counted[0xC1000002] = (100, 1)  # child 2 outbound only
        assert backend.moved_counters() == [ChildCounters(2, 0, 0, 100, 1)]
        await backend.delete(ChildDelete(1, 3, bytes.fromhex("c0000001"), b"", "", ""))
        sad.counted[0xC0000001] = (999, 11)
        assert backend.moved_counters() == []  # a deleted child is not reported
    finally:
        backend.close()
