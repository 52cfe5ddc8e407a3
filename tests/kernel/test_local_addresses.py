"""Our addresses watched for MOBIKE (services/kernel/addresses.py, pyroute2) in a namespace:
what appeared, what went away, and the source address the routing table picks toward a
peer (docs/mobike.md)."""

from __future__ import annotations

import pytest

from ikefarm.services.kernel.addresses import AddressWatch
from tests.harness.netns import Namespace

pytestmark = pytest.mark.kernel


async def test_added_and_gone_addresses_and_the_route_source(netns: Namespace) -> None:
    netns.run(["ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p"])
    netns.run(["ip", "link", "set", "eth0", "up"])
    netns.run(["ip", "link", "set", "eth0p", "up"])
    netns.run(["sysctl", "-qw", "net.ipv4.conf.eth0.promote_secondaries=1"])
    netns.add_address("eth0", "192.0.2.1/24")
    changes: list[tuple[list[str], list[str], list[str]]] = []

    async def changed(present: list[str], added: list[str], gone: list[str]) -> None:
        changes.append((present, added, gone))

    watch = AddressWatch(changed, netns=netns.name)
    try:
        await watch.poll()  # the first read only learns the set
        assert changes == [] and watch.present is not None and "192.0.2.1" in watch.present
        assert await watch.source_toward("192.0.2.2") == "192.0.2.1"
        await watch.poll()
        assert changes == []  # nothing changed

        netns.add_address("eth0", "192.0.2.5/24")
        netns.run(["ip", "addr", "del", "192.0.2.1/24", "dev", "eth0"])
        await watch.poll()
        ((present, added, gone),) = changes
        assert added == ["192.0.2.5"] and gone == ["192.0.2.1"] and "192.0.2.5" in present
        assert await watch.source_toward("192.0.2.2") == "192.0.2.5"
        assert await watch.source_toward("203.0.113.1") == ""  # no route there
    finally:
        await watch.stop()
