"""Routes and PBR rules programmed with services/kernel/routes.py, read back with iproute2."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import pytest

from ikefarm.services.kernel.routes import Route, RouteError, Routes
from tests.harness.netns import Namespace

pytestmark = pytest.mark.kernel


def _veth(ns: Namespace, name: str, peer: str, cidr: str | None = None) -> None:
    ns.run(["ip", "link", "add", name, "type", "veth", "peer", "name", peer])
    ns.run(["ip", "link", "set", name, "up"])
    ns.run(["ip", "link", "set", peer, "up"])
    if cidr:
        ns.add_address(name, cidr)


@pytest.fixture
def gateway(netns: Namespace) -> Namespace:
    """The IKE side: 192.0.2.1/24 on eth0, the peer 198.51.100.2 behind router 192.0.2.254."""
    _veth(netns, "eth0", "eth0p", "192.0.2.1/24")
    netns.run(["ip", "route", "add", "198.51.100.0/24", "via", "192.0.2.254"])
    return netns


@pytest.fixture
async def routes(gateway: Namespace) -> AsyncIterator[Routes]:
    programmer = Routes(gateway.name)
    yield programmer
    programmer.close()


async def test_install_routes_table_220_via_the_peer_next_hop_and_pbr_rule(
    gateway: Namespace, routes: Routes
) -> None:
    via, oif = await routes.via_peer("198.51.100.2")
    assert via == "192.0.2.254"
    route = Route("10.2.0.0/16", 220, via, oif)
    await routes.add(route)
    await routes.ensure_rule(socket.AF_INET, 220, 220)
    shown = gateway.run(["ip", "route", "show", "table", "220"]).stdout
    assert "10.2.0.0/16 via 192.0.2.254 dev eth0 proto static" in shown
    rules = gateway.run(["ip", "rule"]).stdout
    assert "220:\tfrom all lookup 220" in rules

    await routes.add(route)  # the rekeyed child: same route, one more user
    await routes.remove(route)
    assert "10.2.0.0/16" in gateway.run(["ip", "route", "show", "table", "220"]).stdout
    await routes.remove(route)
    assert gateway.run(["ip", "route", "show", "table", "220"]).stdout.strip() == ""

    await routes.remove_rules()
    assert "lookup 220" not in gateway.run(["ip", "rule"]).stdout


async def test_pbr_rule_at_another_priority_and_table(gateway: Namespace, routes: Routes) -> None:
    await routes.ensure_rule(socket.AF_INET, 230, 231)
    await routes.ensure_rule(socket.AF_INET, 230, 231)  # once only
    rules = gateway.run(["ip", "rule"]).stdout
    assert rules.count("lookup 230") == 1
    assert "231:\tfrom all lookup 230" in rules
    await routes.ensure_rule(socket.AF_INET6, 230, 231)
    assert "231:\tfrom all lookup 230" in gateway.run(["ip", "-6", "rule"]).stdout


async def test_inject_routes_via_an_interface_in_another_vrf_and_table(
    gateway: Namespace, routes: Routes
) -> None:
    with Namespace("trusted") as trusted:
        _veth(trusted, "svti100", "svti100p")
        gw, oif = await routes.next_hop("svti100", trusted.name)
        assert gw is None and oif is not None
        route = Route("10.9.0.0/16", 300, gw, oif, vrf=trusted.name)
        await routes.add(route)
        shown = trusted.run(["ip", "route", "show", "table", "300"]).stdout
        assert "10.9.0.0/16 dev svti100 proto static" in shown
        assert "10.9.0.0/16" not in gateway.run(["ip", "route", "show", "table", "all"]).stdout
        await routes.remove(route)
        assert "10.9.0.0/16" not in trusted.run(["ip", "route", "show", "table", "all"]).stdout


async def test_inject_routes_via_an_address_in_the_main_table(
    gateway: Namespace, routes: Routes
) -> None:
    gw, oif = await routes.next_hop("192.0.2.77", None)
    await routes.add(Route("10.8.0.0/16", 254, gw, oif))
    shown = gateway.run(["ip", "route", "show"]).stdout
    assert "10.8.0.0/16 via 192.0.2.77 dev eth0 proto static" in shown


async def test_unresolvable_next_hops_are_refused_clearly(routes: Routes) -> None:
    with pytest.raises(RouteError, match="next-hop interface svti404 does not exist"):
        await routes.next_hop("svti404", None)
    with pytest.raises(RouteError, match="l3vrf vrf-blue"):
        await routes.l3vrf_table("vrf-blue", None)
    with pytest.raises(RouteError, match=r"route to 10\.7\.0\.0/16 table 220"):
        await routes.add(Route("10.7.0.0/16", 220, "203.0.113.1", None))  # not on-link
    assert routes.route_count == 0
