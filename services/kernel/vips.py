"""VIPs the peer assigned us, on an interface through pyroute2 (seed 004, docs/vip-pools.md).

`install-vip-on` names the interface; unset, the VIP goes on the interface that holds the
local IKE address. IPv4 VIPs are /32, IPv6 ones /128. An address is counted per IKE SA
that installed it, so the same VIP kept across a reauthentication is removed only by the
last SA that holds it. With the `memory` backend nothing on the host is touched: the VIPs
are only recorded (and shown), as the SAs are.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
from typing import Any

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from ikefarm.proto.messages import VipAddress
from ikefarm.services.kernel.memory import KernelRefusal

_EEXIST = 17
_ENOENT = 2
_EADDRNOTAVAIL = 99


async def _collect(result: Any) -> list[Any]:
    if hasattr(result, "__aiter__"):
        return [item async for item in result]
    return list(result)


class VipAddresses:
    def __init__(self, *, touch_kernel: bool, netns: str | None = None) -> None:
        self.touch_kernel = touch_kernel
        self.netns = netns
        self._ipr: AsyncIPRoute | None = None
        # (address, interface index) -> the IKE SAs holding it
        self.installed: dict[tuple[str, int], set[int]] = {}

    async def _socket(self) -> AsyncIPRoute:
        if self._ipr is None:
            ipr = AsyncIPRoute(netns=self.netns) if self.netns else AsyncIPRoute()
            await ipr.setup_endpoint()
            self._ipr = ipr
        return self._ipr

    def close(self) -> None:
        if self._ipr is not None:
            with contextlib.suppress(Exception):
                self._ipr.close()
            self._ipr = None

    async def _interface(self, request: VipAddress) -> int:
        if not self.touch_kernel:
            return 0
        ipr = await self._socket()
        if request.interface:
            found = await _collect(await ipr.link_lookup(ifname=request.interface))
            if not found:
                raise KernelRefusal("no_interface", f"no interface {request.interface!r}")
            return int(found[0])
        local = ipaddress.ip_address(request.local_address)
        family = socket.AF_INET if local.version == 4 else socket.AF_INET6
        for entry in await _collect(await ipr.get_addr(family=family)):
            if entry.get("IFA_ADDRESS") == str(local) or entry.get("IFA_LOCAL") == str(local):
                return int(entry["index"])
        raise KernelRefusal("no_interface", f"no interface holds {local}")

    async def apply(self, request: VipAddress) -> None:
        try:
            address = ipaddress.ip_address(request.address)
            ipaddress.ip_address(request.local_address)
        except ValueError:
            raise KernelRefusal("bad_address", "VIP or local address is not an address") from None
        if len(request.interface) > 15:  # IFNAMSIZ - 1
            raise KernelRefusal("no_interface", "interface name too long")
        try:
            index = await self._interface(request)
            key = (str(address), index)
            holders = self.installed.setdefault(key, set())
            if request.install:
                first = not holders
                holders.add(request.ike_unique_id)
                if first and self.touch_kernel:
                    await self._change("add", address, index)
                return
            holders.discard(request.ike_unique_id)
            if not holders:
                del self.installed[key]
                if self.touch_kernel:
                    await self._change("del", address, index)
        except NetlinkError as exc:
            raise KernelRefusal("netlink", f"VIP {address}: {exc}") from None
        except OSError as exc:
            raise KernelRefusal("netlink", f"VIP {address}: {exc}") from None

    async def _change(self, command: str, address: Any, index: int) -> None:
        ipr = await self._socket()
        prefix = 32 if address.version == 4 else 128
        try:
            await ipr.addr(command, index=index, address=str(address), prefixlen=prefix)
        except NetlinkError as exc:
            if command == "add" and exc.code == _EEXIST:
                return
            if command == "del" and exc.code in (_ENOENT, _EADDRNOTAVAIL):
                return
            raise

    def show(self) -> list[dict[str, Any]]:
        return [
            {"address": address, "ifindex": index, "ike_sas": sorted(holders)}
            for (address, index), holders in sorted(self.installed.items())
        ]
