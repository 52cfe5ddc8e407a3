"""The UDP sockets ingress owns: which local endpoints (`shared/udp_endpoints.py`), and how
each is opened."""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path

from ikefarm.shared.esp.steering import attach_filter, not_esp_in_udp
from ikefarm.shared.udp_endpoints import LocalEndpoint, listen_addresses, local_endpoints
from ikefarm.shared.xfrm_socket import bypass_policies, decapsulate_esp_in_udp

__all__ = ["LocalEndpoint", "listen_addresses", "local_endpoints", "open_udp_socket"]

# asked of the kernel for each socket (it caps the size at net.core.rmem_max): a flood's
# burst waits here rather than being lost before ingress reads it
RECEIVE_BUFFER = 2 << 20


def open_udp_socket(
    address: str,
    port: int,
    *,
    drop_esp: bool = False,
    kernel_esp: bool = False,
    require_bypass: bool = False,
) -> socket.socket:
    """A non-blocking UDP socket bound to (address, port), SO_REUSEPORT set so several
    ingress instances of one farm can share the endpoint (the kernel spreads datagrams by
    flow); `shared/udp_endpoints.claim` keeps other farms off it.

    `drop_esp` (the NAT-T port when the kernel service runs the userspace dataplane,
    which reads ESP-in-UDP itself): a socket filter drops ESP-in-UDP in the kernel
    (`shared/esp/steering.py`), so ingress never wakes up for a data packet.
    `kernel_esp` (the NAT-T port when the kernel may hold the ESP SAs): `UDP_ENCAP`, the
    kernel decapsulates ESP-in-UDP itself. Every socket gets the per-socket XFRM policy
    bypass (`shared/xfrm_socket.py`); without CAP_NET_ADMIN it is refused, which raises
    only when `require_bypass` (the netlink backend) and is skipped otherwise, where no
    policy of ours can catch IKE. The rule: docs/kernel-netlink.md, "The IKE sockets"."""
    version = ipaddress.ip_address(address).version
    family = socket.AF_INET6 if version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
        if drop_esp:
            attach_filter(sock, not_esp_in_udp())
        if kernel_esp:
            decapsulate_esp_in_udp(sock)
        try:
            bypass_policies(sock)
        except PermissionError:
            if require_bypass:
                raise
        if family == socket.AF_INET6:
            # "::" must not also take the IPv4 wildcard: IPv4 has sockets of its own
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.setblocking(False)
        sock.bind((address, port))
    except OSError:
        sock.close()
        raise
    return sock


def socket_statistics(socks: list[socket.socket]) -> dict[str, int]:
    """What the kernel lost before ingress read it: `drops` of these sockets (a full receive
    buffer, from /proc/net/udp{,6}), the network namespace's UDP `RcvbufErrors` and
    `InErrors` (/proc/net/snmp{,6}), and the receive buffer the kernel granted (the
    smallest). For `ikefarm stats`; read on request, never per datagram."""
    inodes = {os.fstat(s.fileno()).st_ino for s in socks if s.fileno() >= 0}
    stats = {"drops": 0, "rcvbuf_errors": 0, "in_errors": 0}
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            # sl local rem st tx:rx tr:when retrnsmt uid timeout inode ref pointer drops
            if len(fields) >= 13 and fields[9].isdigit() and int(fields[9]) in inodes:
                stats["drops"] += int(fields[12])
    for table, prefix in (("/proc/net/snmp", "Udp:"), ("/proc/net/snmp6", "Udp6")):
        try:
            text = Path(table).read_text()
        except OSError:
            continue
        stats["rcvbuf_errors"] += _snmp(text, prefix, "RcvbufErrors")
        stats["in_errors"] += _snmp(text, prefix, "InErrors")
    buffers = [s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) for s in socks if s.fileno() >= 0]
    stats["receive_buffer"] = min(buffers) if buffers else 0
    return stats


def _snmp(text: str, prefix: str, name: str) -> int:
    """One counter of /proc/net/snmp (a names line, then a values line, per protocol) or
    /proc/net/snmp6 (one "Udp6Name value" line each)."""
    lines = [line.split() for line in text.splitlines() if line.startswith(prefix)]
    if prefix.endswith(":"):
        if len(lines) >= 2 and name in lines[0]:
            index = lines[0].index(name)
            value = lines[1][index] if index < len(lines[1]) else "0"
            return int(value) if value.isdigit() else 0
        return 0
    for fields in lines:
        if len(fields) == 2 and fields[0] == prefix + name and fields[1].isdigit():
            return int(fields[1])
    return 0
