"""Per-socket IPsec settings for the IKE sockets when the kernel holds the ESP SAs
(docs/kernel-netlink.md, "The IKE sockets").

- `bypass_policies`: a per-socket XFRM policy that allows everything, in and out, so no
  IPsec policy of the SPD (e.g. a site-to-site selector covering the peer's own address)
  ever catches IKE itself. The socket option carries one `struct xfrm_userpolicy_info`
  (168 octets, the kernel's user API layout) with only the selector's family, the
  direction and the action (allow) set.
- `decapsulate_esp_in_udp`: `UDP_ENCAP` = `UDP_ENCAP_ESPINUDP` (RFC 3948) on the NAT-T
  socket: the kernel takes ESP-in-UDP (a datagram without the four zero octets of the
  non-ESP marker) itself and hands only IKE to the socket; set only while the netlink
  backend runs (ingress asks the kernel service which backend `auto` became).

Setting a socket policy needs CAP_NET_ADMIN in the socket's network namespace.
"""

from __future__ import annotations

import socket
import struct

__all__ = [
    "USERPOLICY_INFO_SIZE",
    "bypass_policies",
    "decapsulate_esp_in_udp",
    "userpolicy_info",
]

# <linux/in.h>, <linux/in6.h>, <linux/udp.h>, <linux/xfrm.h>
IP_XFRM_POLICY = 17
IPV6_XFRM_POLICY = 35
SOL_UDP = 17
UDP_ENCAP = 100
UDP_ENCAP_ESPINUDP = 2
XFRM_POLICY_IN = 0
XFRM_POLICY_OUT = 1
XFRM_POLICY_ALLOW = 0

USERPOLICY_INFO_SIZE = 168

# struct xfrm_userpolicy_info: selector (addresses, ports and masks, family, prefix
# lengths, protocol, ifindex, user: 56), lifetime_cfg (8 x u64: 64), lifetime_cur
# (4 x u64: 32), priority, index, dir, action, flags, share, padding to 8 octets
_USERPOLICY_INFO = struct.Struct("=16s16sHHHHHBBB3xiI8Q4QIIBBBB4x")
if _USERPOLICY_INFO.size != USERPOLICY_INFO_SIZE:
    raise AssertionError(f"xfrm_userpolicy_info is {_USERPOLICY_INFO.size} octets, not 168")


def userpolicy_info(family: int, direction: int, action: int = XFRM_POLICY_ALLOW) -> bytes:
    """An all-zero policy but for the selector's family, the direction and the action."""
    zeros = (0,) * 12
    return _USERPOLICY_INFO.pack(
        b"", b"", 0, 0, 0, 0, family, 0, 0, 0, 0, 0, *zeros, 0, 0, direction, action, 0, 0
    )


def bypass_policies(sock: socket.socket) -> None:
    """Let this socket's traffic pass the SPD in both directions (raises OSError, EPERM
    without CAP_NET_ADMIN)."""
    if sock.family == socket.AF_INET6:
        level, option = socket.IPPROTO_IPV6, IPV6_XFRM_POLICY
    elif sock.family == socket.AF_INET:
        level, option = socket.IPPROTO_IP, IP_XFRM_POLICY
    else:
        raise ValueError(f"no XFRM socket policy for address family {sock.family}")
    for direction in (XFRM_POLICY_OUT, XFRM_POLICY_IN):
        sock.setsockopt(level, option, userpolicy_info(sock.family, direction))


def decapsulate_esp_in_udp(sock: socket.socket, on: bool = True) -> None:
    """Have the kernel decapsulate ESP-in-UDP arriving on this UDP socket (`on`), or stop
    (encapsulation type 0: every datagram reaches the socket as UDP again). Without ESP
    states the kernel answers such a datagram with an ICMP destination unreachable, so
    only a socket whose kernel holds the ESP SAs may carry it."""
    sock.setsockopt(SOL_UDP, UDP_ENCAP, UDP_ENCAP_ESPINUDP if on else 0)
