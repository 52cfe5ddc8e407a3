"""The two port-4500 socket filters (shared/esp/steering.py) on real loopback sockets.

Ingress's UDP socket with `not_esp_in_udp` and the dataplane's raw UDP socket
with `esp_in_udp_only` share the NAT-T port: every datagram reaches exactly
one of them (IKE behind the non-ESP marker, keepalives and short junk ingress;
ESP-in-UDP the dataplane), and the raw socket sees nothing sent to another port.
"""

from __future__ import annotations

import os
import socket
import time

import pytest

from ikefarm.services.ingress.sockets import open_udp_socket
from ikefarm.shared.esp.steering import attach_filter, esp_in_udp_only, esp_in_udp_only_ipv6
from tests.harness import prerequisites


@pytest.fixture(autouse=True)
def _root() -> None:
    if os.geteuid() != 0:
        prerequisites.missing("needs root: a raw UDP socket (CAP_NET_RAW)")


DATAGRAMS = {
    "keepalive": b"\xff",
    "ike": bytes(4) + bytes(28),  # non-ESP marker, then an IKE header's worth
    "esp": bytes.fromhex("c0ffee01") + (1).to_bytes(4, "big") + bytes(40),
    "esp_header_only": bytes.fromhex("00000100") + bytes(4),  # SPI 256, just 8 octets
    "short_junk": b"\x01\x02\x03\x04\x05",  # not zero, too short for ESP: ingress counts it
    "marker_only": bytes(4),
}


def drain(sock: socket.socket) -> list[bytes]:
    out = []
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        try:
            out.append(sock.recv(65535))
        except BlockingIOError:
            time.sleep(0.02)
    return out


def free_port(address: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.bind((address, 0))
        return int(probe.getsockname()[1])


@pytest.mark.parametrize("address", ["127.0.0.1", "::1"])
def test_each_datagram_reaches_exactly_one_side(address: str) -> None:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    port, other_port = free_port(address), free_port(address)
    ingress = open_udp_socket(address, port, drop_esp=True)
    bystander = open_udp_socket(address, other_port)
    raw = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_UDP)
    program = esp_in_udp_only(port) if family == socket.AF_INET else esp_in_udp_only_ipv6(port)
    attach_filter(raw, program)
    raw.setblocking(False)
    raw.bind((address, 0))
    sender = socket.socket(family, socket.SOCK_DGRAM)
    try:
        for payload in DATAGRAMS.values():
            sender.sendto(payload, (address, port))
        sender.sendto(DATAGRAMS["esp"], (address, other_port))  # not the NAT-T port
        at_ingress = drain(ingress)
        # a raw IPv4 socket reads the IP header too, a raw IPv6 socket from the UDP header on
        header = (lambda p: (p[0] & 0x0F) * 4 + 8) if family == socket.AF_INET else (lambda p: 8)
        at_dataplane = [packet[header(packet) :] for packet in drain(raw)]
    finally:
        for sock in (ingress, bystander, raw, sender):
            sock.close()
    esp = {DATAGRAMS["esp"], DATAGRAMS["esp_header_only"]}
    assert sorted(at_dataplane) == sorted(esp)
    assert sorted(at_ingress) == sorted(p for p in DATAGRAMS.values() if p not in esp)


def test_without_the_userspace_dataplane_ingress_still_sees_esp() -> None:
    port = free_port()
    ingress = open_udp_socket("127.0.0.1", port)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sender.sendto(DATAGRAMS["esp"], ("127.0.0.1", port))
        assert drain(ingress) == [DATAGRAMS["esp"]]  # counted as esp_in_udp by the router
    finally:
        ingress.close()
        sender.close()
