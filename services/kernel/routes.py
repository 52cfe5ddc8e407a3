"""Routes toward the remote traffic selectors of child SAs, through pyroute2's rtnetlink.

Two features of the vSR (seed 004, docs/kernel-netlink.md):

- `install-routes` (global, non-SVTI children only): a route to each remote
  traffic selector in table `routing-table` (220), via the same next hop as the
  route to the IKE peer, and one policy-based-routing rule of priority
  `routing-table-prio` (220) that looks that table up.
- `inject-routes` (per security policy, typically for SVTI children): a route
  to each remote traffic selector via an explicit next hop (an address or an
  interface name), in a VRF (here: the named network namespace), in a table
  (default main, 254) or in the table of an L3VRF device.

Routes are reference-counted: a rekeyed child installs the same routes as the
one it replaces, and only the last user's removal deletes them.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
from collections import Counter
from dataclasses import dataclass
from typing import Any

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

MAIN_TABLE = 254
RT_PROTO_STATIC = 4


class RouteError(Exception):
    """A route or rule the kernel refused, or a next hop that cannot be resolved."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


@dataclass(frozen=True)
class Route:
    """One route: destination prefix, table, next hop (gateway and/or interface), VRF."""

    dst: str
    table: int
    gateway: str | None = None
    oif: int | None = None
    vrf: str | None = None  # network namespace; None = the service's own

    @property
    def family(self) -> int:
        version = ipaddress.ip_network(self.dst, strict=False).version
        return socket.AF_INET if version == 4 else socket.AF_INET6


async def _collect(result: Any) -> list[Any]:
    if hasattr(result, "__aiter__"):
        return [item async for item in result]
    return list(result)


class Routes:
    """Programs routes and PBR rules in the service's namespace (or `netns`) and in VRFs."""

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self._sockets: dict[str | None, AsyncIPRoute] = {}
        self._routes: Counter[Route] = Counter()
        self._rules: set[tuple[int, int, int]] = set()  # (family, table, priority) we added

    @property
    def route_count(self) -> int:
        return len(self._routes)

    async def _ipr(self, vrf: str | None = None) -> AsyncIPRoute:
        key = vrf
        ipr = self._sockets.get(key)
        if ipr is None:
            try:
                ipr = AsyncIPRoute(netns=vrf if vrf is not None else self.netns)
                await ipr.setup_endpoint()
            except (OSError, NetlinkError) as exc:
                where = f"vrf {vrf}" if vrf is not None else "the service namespace"
                raise RouteError(f"cannot open rtnetlink in {where}: {exc}") from None
            self._sockets[key] = ipr
        return ipr

    def close(self) -> None:
        for ipr in self._sockets.values():
            with contextlib.suppress(Exception):
                ipr.close()
        self._sockets.clear()

    async def via_peer(self, peer: str) -> tuple[str | None, int | None]:
        """(gateway, interface index) of the route toward the IKE peer."""
        ipr = await self._ipr()
        try:
            answer = await _collect(await ipr.route("get", dst=peer))
        except NetlinkError as exc:
            raise RouteError(f"no route to the peer {peer}: {exc.args[1]}") from None
        if not answer:
            raise RouteError(f"no route to the peer {peer}")
        return answer[0].get("RTA_GATEWAY"), answer[0].get("RTA_OIF")

    async def next_hop(self, next_hop: str, vrf: str | None) -> tuple[str | None, int | None]:
        """An `inject-routes next-hop`: an address (gateway) or an interface name."""
        try:
            ipaddress.ip_address(next_hop)
        except ValueError:
            ipr = await self._ipr(vrf)
            found = await ipr.link_lookup(ifname=next_hop)
            if not found:
                raise RouteError(f"next-hop interface {next_hop} does not exist") from None
            return None, found[0]
        return next_hop, None

    async def l3vrf_table(self, name: str, vrf: str | None) -> int:
        """The routing table of L3VRF device `name` (its IFLA_VRF_TABLE)."""
        ipr = await self._ipr(vrf)
        try:
            links = await _collect(await ipr.link("get", ifname=name))
        except NetlinkError as exc:
            raise RouteError(f"l3vrf {name}: {exc.args[1]}") from None
        table = (
            links[0].get(("IFLA_LINKINFO", "IFLA_INFO_DATA", "IFLA_VRF_TABLE")) if links else None
        )
        if not table:
            raise RouteError(f"l3vrf {name} is not a VRF device")
        return int(table)

    async def ensure_rule(self, family: int, table: int, priority: int) -> None:
        """The PBR rule `from all lookup <table>` at `priority`, added once."""
        key = (family, table, priority)
        if key in self._rules:
            return
        ipr = await self._ipr()
        existing = await _collect(await ipr.rule("dump", family=family))
        for rule in existing:
            if (
                rule.get("FRA_PRIORITY") == priority
                and (rule.get("FRA_TABLE") or rule["table"]) == table
            ):
                self._rules.add(key)
                return
        try:
            await ipr.rule("add", family=family, table=table, priority=priority)
        except NetlinkError as exc:
            raise RouteError(f"PBR rule priority {priority} table {table}: {exc.args[1]}") from None
        self._rules.add(key)

    async def remove_rules(self) -> None:
        ipr = await self._ipr()
        for family, table, priority in sorted(self._rules):
            with contextlib.suppress(NetlinkError):
                await ipr.rule("del", family=family, table=table, priority=priority)
        self._rules.clear()

    async def add(self, route: Route) -> None:
        """Install `route` (or count one more user of it)."""
        if self._routes[route] == 0:
            ipr = await self._ipr(route.vrf)
            fields: dict[str, Any] = {
                "dst": route.dst,
                "table": route.table,
                "family": route.family,
                "proto": RT_PROTO_STATIC,
            }
            if route.gateway is not None:
                fields["gateway"] = route.gateway
            if route.oif is not None:
                fields["oif"] = route.oif
            try:
                await ipr.route("replace", **fields)
            except NetlinkError as exc:
                raise RouteError(
                    f"route to {route.dst} table {route.table}: {exc.args[1]}"
                ) from None
        self._routes[route] += 1

    async def remove(self, route: Route) -> None:
        """One user less of `route`; the last one deletes it (already gone is fine)."""
        if self._routes[route] == 0:
            del self._routes[route]
            return
        self._routes[route] -= 1
        if self._routes[route]:
            return
        del self._routes[route]
        ipr = await self._ipr(route.vrf)
        with contextlib.suppress(NetlinkError):
            await ipr.route("del", dst=route.dst, table=route.table, family=route.family)

    def show(self) -> list[dict[str, Any]]:
        return [
            {
                "dst": r.dst,
                "table": r.table,
                "gateway": r.gateway,
                "oif": r.oif,
                "vrf": r.vrf,
                "users": n,
            }
            for r, n in self._routes.items()
        ]
