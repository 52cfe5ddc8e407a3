"""RFC 3948 2 classification done by the kernel: classic BPF socket filters for port 4500.

IKE and ESP-in-UDP share the NAT-T port. Ingress owns the UDP socket; the
userspace dataplane reads ESP-in-UDP from a raw UDP socket. Two mirror
filters split the traffic without a per-packet hop between the services:

- `esp_in_udp_only` (raw IPv4 socket, the packet starts at the IP header; and
  `esp_in_udp_only_ipv6` for a raw IPv6 socket, where it starts at the UDP
  header): UDP to the NAT-T port with at least an ESP header (8 octets) of
  payload and a non-zero first word (the SPI);
- `not_esp_in_udp` (ingress's UDP sockets, IPv4 and IPv6, the packet starts at
  the UDP header): everything else, that is IKE behind the non-ESP marker, NAT
  keepalives and short junk, which ingress classifies and counts
  (`classify_udp_encap`).

A datagram the filter refuses is dropped for that socket only.
"""

from __future__ import annotations

import ctypes
import socket
import struct

__all__ = ["attach_filter", "esp_in_udp_only", "esp_in_udp_only_ipv6", "not_esp_in_udp"]

Instruction = tuple[int, int, int, int]  # code, jump if true, jump if false, k

_SO_ATTACH_FILTER = 26  # SOL_SOCKET, linux/asm-generic/socket.h
_LD_H_ABS, _LD_W_ABS = 0x28, 0x20
_LD_H_IND, _LD_W_IND, _LDX_MSH = 0x48, 0x40, 0xB1
_JEQ, _JGE, _RET = 0x15, 0x35, 0x06
_ACCEPT, _DROP = (_RET, 0, 0, 0x40000), (_RET, 0, 0, 0)
_MIN_UDP_LENGTH = 8 + 8  # UDP header, SPI and sequence number


def esp_in_udp_only(natt_port: int) -> list[Instruction]:
    """For a raw IPv4 UDP socket: ESP-in-UDP to `natt_port` only."""
    return [
        (_LDX_MSH, 0, 0, 0),  # X = IP header length
        (_LD_H_IND, 0, 0, 2),  # A = UDP destination port
        (_JEQ, 0, 4, natt_port),
        (_LD_H_IND, 0, 0, 4),  # A = UDP length
        (_JGE, 0, 2, _MIN_UDP_LENGTH),
        (_LD_W_IND, 0, 0, 8),  # A = first payload word: the SPI, or the non-ESP marker
        (_JEQ, 0, 1, 0),
        _DROP,
        _ACCEPT,
    ]


def esp_in_udp_only_ipv6(natt_port: int) -> list[Instruction]:
    """For a raw IPv6 UDP socket (the packet starts at the UDP header): as `esp_in_udp_only`."""
    return [
        (_LD_H_ABS, 0, 0, 2),  # A = UDP destination port
        (_JEQ, 0, 4, natt_port),
        (_LD_H_ABS, 0, 0, 4),  # A = UDP length
        (_JGE, 0, 2, _MIN_UDP_LENGTH),
        (_LD_W_ABS, 0, 0, 8),  # A = first payload word
        (_JEQ, 0, 1, 0),
        _DROP,
        _ACCEPT,
    ]


def not_esp_in_udp() -> list[Instruction]:
    """For ingress's NAT-T UDP socket: everything `esp_in_udp_only` does not take."""
    return [
        (_LD_H_ABS, 0, 0, 4),  # A = UDP length
        (_JGE, 0, 2, _MIN_UDP_LENGTH),
        (_LD_W_ABS, 0, 0, 8),  # A = first payload word
        (_JEQ, 0, 1, 0),
        _ACCEPT,
        _DROP,
    ]


def attach_filter(sock: socket.socket, program: list[Instruction]) -> None:
    """SO_ATTACH_FILTER: struct sock_fprog {len, filter pointer} over struct sock_filter[]."""
    code = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *i) for i in program))
    sock.setsockopt(
        socket.SOL_SOCKET,
        _SO_ATTACH_FILTER,
        struct.pack("HL", len(program), ctypes.addressof(code)),
    )
