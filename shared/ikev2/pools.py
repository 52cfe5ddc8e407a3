"""Virtual IP pools (`[[ike.pool]]`, vSR seed 004): which addresses a pool hands out and
which configuration attributes go with them (RFC 7296 3.15.1).

A pool's `address` entries are single addresses, ranges `a-b` and subnets, of either
family. `Pool` numbers the addresses of one family 0..size-1 in the order the entries
list them, so a lease store can walk a pool from any index without materialising it;
nothing here grows with the pool's size. A subnet hands out every address but its
network and broadcast ones (IPv4 subnets larger than /31; for IPv6 only the
Subnet-Router anycast address, RFC 4291 2.6.1, is skipped).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

from ikefarm.shared.ikev2.constants import CfgAttribute
from ikefarm.shared.ikev2.payloads.config import ConfigAttribute

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _block(entry: str) -> tuple[int, int, int]:
    """(version, first, last) of one pool entry as integers."""
    if "-" in entry:
        first_text, last_text = entry.split("-", 1)
        first, last = ipaddress.ip_address(first_text), ipaddress.ip_address(last_text)
        if first.version != last.version or int(first) > int(last):
            raise ValueError(f"bad range {entry}")
        return first.version, int(first), int(last)
    if "/" in entry:
        network = ipaddress.ip_network(entry, strict=False)
        low, high = int(network.network_address), int(network.broadcast_address)
        if network.version == 4 and network.prefixlen < 31:
            low, high = low + 1, high - 1
        elif network.version == 6 and network.prefixlen < 127:
            low += 1
        return network.version, low, high
    address = ipaddress.ip_address(entry)
    return address.version, int(address), int(address)


@dataclass(frozen=True)
class Pool:
    """One `[[ike.pool]]`: its address blocks per family and the attributes it lists."""

    name: str
    blocks: tuple[tuple[int, int, int], ...] = ()  # (version, first, last), config order
    dns: tuple[str, ...] = ()
    nbns: tuple[str, ...] = ()
    dhcp: tuple[str, ...] = ()
    subnet: tuple[str, ...] = ()
    netmask: tuple[str, ...] = ()
    _sizes: dict[int, int] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_config(cls, item: Any) -> Pool:
        """From a loaded `[[ike.pool]]` item (attribute names as the schema's, `_` for `-`)."""
        blocks = tuple(_block(entry) for entry in item.address)
        return cls(
            name=item.name,
            blocks=blocks,
            dns=tuple(item.dns),
            nbns=tuple(item.nbns),
            dhcp=tuple(item.dhcp),
            subnet=tuple(item.subnet),
            netmask=tuple(item.netmask),
        )

    def size(self, version: int) -> int:
        if version not in self._sizes:
            self._sizes[version] = sum(
                last - first + 1 for v, first, last in self.blocks if v == version
            )
        return self._sizes[version]

    def address_at(self, version: int, index: int) -> Address:
        """The `index`-th address of the family (IndexError outside 0..size-1)."""
        if index < 0:
            raise IndexError(index)
        for v, first, last in self.blocks:
            if v != version:
                continue
            if index <= last - first:
                return ipaddress.ip_address(first + index)
            index -= last - first + 1
        raise IndexError(index)

    def index_of(self, address: Address | str) -> int | None:
        """The address's index in its family, or None when the pool does not hold it."""
        address = ipaddress.ip_address(address)
        value, base = int(address), 0
        for v, first, last in self.blocks:
            if v != address.version:
                continue
            if first <= value <= last:
                return base + value - first
            base += last - first + 1
        return None

    def attributes(self, versions: set[int]) -> list[ConfigAttribute]:
        """The pool's DNS, NBNS, DHCP, SUBNET and NETMASK for the families assigned."""
        out: list[ConfigAttribute] = []
        kinds = (
            (self.dns, CfgAttribute.INTERNAL_IP4_DNS, CfgAttribute.INTERNAL_IP6_DNS),
            (self.nbns, CfgAttribute.INTERNAL_IP4_NBNS, CfgAttribute.INTERNAL_IP6_NBNS),
            (self.dhcp, CfgAttribute.INTERNAL_IP4_DHCP, CfgAttribute.INTERNAL_IP6_DHCP),
        )
        for values, four, six in kinds:
            for text in values:
                address = ipaddress.ip_address(text)
                if address.version in versions:
                    kind = four if address.version == 4 else six
                    out.append(ConfigAttribute.from_address(kind, address))
        for text in self.subnet:
            network = ipaddress.ip_network(text, strict=False)
            if network.version in versions:
                out.append(ConfigAttribute.subnet(network))
        for text in self.netmask:
            mask = ipaddress.ip_address(text)
            if mask.version in versions:
                kind = (
                    CfgAttribute.INTERNAL_IP4_NETMASK
                    if mask.version == 4
                    else CfgAttribute.INTERNAL_IP6_NETMASK
                )
                out.append(ConfigAttribute.from_address(kind, mask))
        return out


def pools_from_config(items: Any) -> dict[str, Pool]:
    return {item.name: Pool.from_config(item) for item in items}
