"""Our local addresses, watched for MOBIKE (RFC 4555): which appeared, which went away, and
the source address the routing table picks toward a peer (docs/mobike.md).

The kernel service reads the host's addresses through pyroute2 once a second while some
VPN has `mobike` on (a dump of the address table: its cost grows with the host's
addresses, never with SAs or packets) and publishes a `LocalAddresses` event when the set
changed. The ike workers then ask `source_toward(peer)` (`RouteSourceRequest`) for each of
their MOBIKE SAs whose address went away, or, with `mobike-prefer-best-path`, for each of
them when an address appeared: the routing table's choice is the best path.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from collections.abc import Awaitable, Callable
from typing import Any

from pyroute2 import AsyncIPRoute

POLL_INTERVAL = 1.0  # s between two reads of the address table

Changed = Callable[[list[str], list[str], list[str]], Awaitable[None]]


async def _collect(result: Any) -> list[Any]:
    if hasattr(result, "__aiter__"):
        return [item async for item in result]
    return list(result)


def _usable(address: str) -> bool:
    parsed = ipaddress.ip_address(address)
    return not (parsed.is_loopback or parsed.is_link_local or parsed.is_multicast)


class AddressWatch:
    """Polls the address table; `changed(present, added, gone)` runs when it differs."""

    def __init__(self, changed: Changed, netns: str | None = None) -> None:
        self.changed = changed
        self.netns = netns
        self._ipr: AsyncIPRoute | None = None
        self._task: asyncio.Task[None] | None = None
        self.present: set[str] | None = None
        self.errors = 0

    async def _socket(self) -> AsyncIPRoute:
        if self._ipr is None:
            ipr = AsyncIPRoute(netns=self.netns) if self.netns else AsyncIPRoute()
            await ipr.setup_endpoint()
            self._ipr = ipr
        return self._ipr

    async def addresses(self) -> set[str]:
        ipr = await self._socket()
        found: set[str] = set()
        for entry in await _collect(await ipr.get_addr()):
            address = entry.get("IFA_LOCAL") or entry.get("IFA_ADDRESS")
            if address and _usable(str(address)):
                found.add(str(ipaddress.ip_address(address)))
        return found

    async def poll(self) -> None:
        """One read; the callback runs when the set changed since the last read."""
        now = await self.addresses()
        before, self.present = self.present, now
        if before is None or before == now:
            return
        await self.changed(sorted(now), sorted(now - before), sorted(before - now))

    async def run(self, interval: float = POLL_INTERVAL) -> None:
        while True:
            try:
                await self.poll()
            except asyncio.CancelledError:
                raise
            except Exception:  # a netlink hiccup: try again at the next tick
                self.errors += 1
            await asyncio.sleep(interval)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self.run())

    async def source_toward(self, remote: str) -> str:
        """The source address the routing table picks toward `remote` ("" without a route)."""
        ipr = await self._socket()
        try:
            routes = await _collect(await ipr.route("get", dst=str(ipaddress.ip_address(remote))))
        except Exception:
            return ""
        for route in routes:
            source = route.get("RTA_PREFSRC")
            if source:
                return str(ipaddress.ip_address(source))
        return ""

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        if self._ipr is not None:
            with contextlib.suppress(Exception):
                self._ipr.close()
            self._ipr = None
