"""The I/O of the userspace dataplane: its TUN device, routes, and ESP sockets.

- TUN (`/dev/net/tun`, `IFF_TUN | IFF_NO_PI`): inner IP packets, one per read
  and write. Routes for each child's remote traffic selectors point at it
  (pyroute2, in a table of their own, see `Routes`), with a source address
  from the local selectors when this host has one, so traffic the host itself
  originates is protected too.
- ESP (IP protocol 50, RFC 4303): one raw socket per local address.
- ESP in UDP (RFC 3948) on the NAT-T port: ingress owns the UDP socket, where
  IKE arrives behind the non-ESP marker. The dataplane reads ESP-in-UDP from a
  raw UDP socket per local address whose classic BPF filter passes only
  datagrams to the NAT-T port whose first four payload octets (the SPI) are not
  zero and that are long enough for an ESP header (`shared/esp/steering.py`);
  it sends from the NAT-T port through the same raw socket, with a zero UDP
  checksum over IPv4 (RFC 3948 2.1 allows it) and one the kernel computes over
  IPv6. With this backend ingress drops the same datagrams in the kernel with
  the mirror filter, so neither service wakes up for the other's traffic.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import socket
import struct
from typing import Any

from pyroute2 import AsyncIPRoute

from ikefarm.shared.esp.steering import (
    Instruction,
    attach_filter,
    esp_in_udp_only,
    esp_in_udp_only_ipv6,
)

TUN_NAME = "ikefarm0"
# room for outer IP header, UDP, ESP header, IV, padding, trailer and ICV within a 1500-octet
# path: 97 octets at most with AES-GCM over IPv6 in UDP; CBC with HMAC-SHA-512 over IPv6 in
# UDP can take 121, and such packets leave fragmented
TUN_MTU = 1400
_TUNSETIFF = 0x400454CA
_IFF_TUN = 0x0001
_IFF_NO_PI = 0x1000
_UDP_HEADER = struct.Struct("!HHHH")
IPPROTO_ESP = 50
# a burst of ESP waits in the socket while the loop encrypts: room for about 2000 packets
RECEIVE_BUFFER = 4 * 1024 * 1024
_SO_RCVBUFFORCE = 33
_IPV6_CHECKSUM = 7  # linux/in6.h


def _large_receive_buffer(sock: socket.socket) -> None:
    """SO_RCVBUFFORCE (CAP_NET_ADMIN, above net.core.rmem_max), else what SO_RCVBUF gives."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, RECEIVE_BUFFER)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)


async def open_tun(name: str = TUN_NAME, mtu: int = TUN_MTU) -> tuple[int, int]:
    """(fd, ifindex) of a new non-blocking TUN device `name`, up with `mtu`."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", name.encode(), _IFF_TUN | _IFF_NO_PI))
        async with AsyncIPRoute() as ipr:
            (index,) = await ipr.link_lookup(ifname=name)
            await ipr.link("set", index=index, mtu=mtu, state="up")
    except BaseException:
        os.close(fd)
        raise
    return fd, index


def _raw_socket(
    family: int, protocol: int, address: str, program: list[Instruction] | None = None
) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_RAW, protocol)
    try:
        if program is not None:
            attach_filter(sock, program)
        _large_receive_buffer(sock)
        sock.setblocking(False)
        sock.bind((address, 0))
    except OSError:
        sock.close()
        raise
    return sock


def open_esp_socket(address: str) -> socket.socket:
    """A non-blocking raw IP-protocol-50 socket bound to `address` (IPv4 or IPv6)."""
    family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET
    return _raw_socket(family, IPPROTO_ESP, address)


def open_udp_encap_socket(address: str, natt_port: int) -> socket.socket:
    """A non-blocking raw UDP socket bound to `address` that reads ESP-in-UDP only.

    IPv6 requires a UDP checksum (RFC 8200 8.1): the kernel computes it on send
    (IPV6_CHECKSUM at offset 6) and checks it on receive."""
    if ipaddress.ip_address(address).version == 4:
        return _raw_socket(socket.AF_INET, socket.IPPROTO_UDP, address, esp_in_udp_only(natt_port))
    sock = _raw_socket(
        socket.AF_INET6, socket.IPPROTO_UDP, address, esp_in_udp_only_ipv6(natt_port)
    )
    sock.setsockopt(socket.IPPROTO_IPV6, _IPV6_CHECKSUM, 6)
    return sock


def udp_header(src_port: int, dst_port: int, payload_length: int) -> bytes:
    """RFC 768 header with a zero checksum (RFC 3948 2.1, IPv4; over IPv6 the kernel fills
    it in, see `open_udp_encap_socket`)."""
    return _UDP_HEADER.pack(src_port, dst_port, 8 + payload_length, 0)


class Routes:
    """Routes to the TUN device in a table of their own, reached through a policy rule.

    Like strongSwan's kernel-libipsec the routes live in `table` (the configuration's
    `routing-table`, 220) and a rule `from all lookup <table>` at `priority`
    (`routing-table-prio`, 220) puts it before the main table, for IPv4 and IPv6; no
    route of the main table is touched. The rule is added once (`start()`) and removed
    with the routes (`apply(everything=True)`) unless it was there before.
    Routes are counted: a prefix two children share (a rekey) stays until the last of
    them is gone. `add`/`remove` only count; `apply()` programs the difference
    (pyroute2's netlink calls are coroutines: the backend's install stays synchronous).
    """

    def __init__(self, ifindex: int, table: int = 220, priority: int = 220) -> None:
        self.ifindex = ifindex
        self.table = table
        self.priority = priority
        self._users: dict[str, tuple[int, list[Any]]] = {}  # prefix -> (count, local nets)
        self._installed: set[str] = set()
        self._rules: list[int] = []  # the families whose rule we added

    async def start(self) -> None:
        async with AsyncIPRoute() as ipr:
            for family in (socket.AF_INET, socket.AF_INET6):
                present = [
                    rule
                    async for rule in await ipr.get_rules(family=family)
                    if rule.get("FRA_TABLE") == self.table
                    and rule.get("FRA_PRIORITY") == self.priority
                ]
                if not present:
                    await ipr.rule("add", family=family, table=self.table, priority=self.priority)
                    self._rules.append(family)

    def add(self, prefix: str, local_nets: list[Any]) -> None:
        count, _nets = self._users.get(prefix, (0, local_nets))
        self._users[prefix] = (count + 1, local_nets)

    def remove(self, prefix: str) -> None:
        count, nets = self._users.get(prefix, (0, []))
        if count > 1:
            self._users[prefix] = (count - 1, nets)
        else:
            self._users.pop(prefix, None)

    @staticmethod
    async def _source(ipr: Any, version: int, local_nets: list[Any]) -> str | None:
        """An address of this host inside the local selectors (as strongSwan picks one)."""
        family = socket.AF_INET6 if version == 6 else socket.AF_INET
        async for message in await ipr.get_addr(family=family):
            address = ipaddress.ip_address(message.get("IFA_ADDRESS"))
            if any(address in net for net in local_nets if net.version == version):
                return str(address)
        return None

    async def apply(self, *, everything: bool = False) -> None:
        """Add the routes now wanted, delete those no longer wanted (all, and the rules we
        added, with `everything`)."""
        wanted = set() if everything else set(self._users)
        if wanted == self._installed and not (everything and self._rules):
            return
        async with AsyncIPRoute() as ipr:
            for prefix in sorted(self._installed - wanted):
                with contextlib.suppress(Exception):  # gone already with the TUN device
                    await ipr.route("del", dst=prefix, oif=self.ifindex, table=self.table)
                self._installed.discard(prefix)
            for prefix in sorted(wanted - self._installed):
                network = ipaddress.ip_network(prefix)
                extra: dict[str, Any] = {}
                source = await self._source(ipr, network.version, self._users[prefix][1])
                if source is not None:
                    extra["prefsrc"] = source
                await ipr.route("replace", dst=prefix, oif=self.ifindex, table=self.table, **extra)
                self._installed.add(prefix)
            if everything:
                for family in self._rules:
                    with contextlib.suppress(Exception):
                        await ipr.rule(
                            "del", family=family, table=self.table, priority=self.priority
                        )
                self._rules.clear()
