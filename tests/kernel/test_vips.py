"""VIPs assigned to us, put on an interface with services/kernel/vips.py (pyroute2) in a
namespace, read back with iproute2 (seed 004 `install-vip-on`, docs/vip-pools.md)."""

from __future__ import annotations

import pytest

from ikefarm.proto.messages import VipAddress
from ikefarm.services.kernel.memory import KernelRefusal
from ikefarm.services.kernel.vips import VipAddresses
from tests.harness.netns import Namespace

pytestmark = pytest.mark.kernel


def _veth(ns: Namespace, name: str, peer: str, cidr: str) -> None:
    ns.run(["ip", "link", "add", name, "type", "veth", "peer", "name", peer])
    ns.run(["ip", "link", "set", name, "up"])
    ns.add_address(name, cidr)


def _vip(install: bool, address: str, owner: int = 1, interface: str = "") -> VipAddress:
    return VipAddress(install, address, "192.0.2.1", interface, owner)


async def test_a_vip_goes_on_the_interface_of_the_ike_address_and_leaves_with_its_last_sa(
    netns: Namespace,
) -> None:
    _veth(netns, "eth0", "eth0p", "192.0.2.1/24")
    vips = VipAddresses(touch_kernel=True, netns=netns.name)
    try:
        await vips.apply(_vip(True, "10.77.0.10", owner=1))
        await vips.apply(_vip(True, "10.77.0.10", owner=2))  # a reauthentication's new SA
        assert "10.77.0.10/32" in netns.addresses("eth0")
        await vips.apply(_vip(False, "10.77.0.10", owner=1))
        assert "10.77.0.10/32" in netns.addresses("eth0")  # still held by SA 2
        await vips.apply(_vip(False, "10.77.0.10", owner=2))
        assert "10.77.0.10/32" not in netns.addresses("eth0")
        await vips.apply(_vip(False, "10.77.0.10", owner=2))  # again: nothing to do
        assert vips.show() == []
    finally:
        vips.close()


async def test_install_vip_on_names_the_interface(netns: Namespace) -> None:
    _veth(netns, "eth0", "eth0p", "192.0.2.1/24")
    _veth(netns, "vip0", "vip0p", "198.51.100.1/24")  # (no dummy module on this kernel)
    vips = VipAddresses(touch_kernel=True, netns=netns.name)
    try:
        await vips.apply(_vip(True, "2001:db8:77::10", interface="vip0"))
        assert any(a.startswith("2001:db8:77::10/128") for a in netns.addresses("vip0"))
        assert not any("2001:db8:77" in a for a in netns.addresses("eth0"))
        with pytest.raises(KernelRefusal, match="no interface"):
            await vips.apply(_vip(True, "10.77.0.11", interface="nosuch0"))
        with pytest.raises(KernelRefusal, match="no interface"):
            await vips.apply(VipAddress(True, "10.77.0.12", "198.51.100.9", "", 3))
        with pytest.raises(KernelRefusal, match="not an address"):
            await vips.apply(VipAddress(True, "10.77.0.300", "192.0.2.1", "", 3))
    finally:
        vips.close()


async def test_the_memory_backend_only_records(netns: Namespace) -> None:
    vips = VipAddresses(touch_kernel=False)
    await vips.apply(_vip(True, "10.77.0.10"))
    assert vips.show() == [{"address": "10.77.0.10", "ifindex": 0, "ike_sas": [1]}]
