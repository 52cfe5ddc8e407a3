"""The kernel's UDP counters as ingress reads them for `status` (services/ingress/sockets.py)."""

from __future__ import annotations

import socket

from ikefarm.services.ingress.sockets import _snmp, socket_statistics

SNMP = """Ip: Forwarding DefaultTTL InReceives
Ip: 1 64 100
Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors InCsumErrors
Udp: 500 3 17 480 15 0 2
UdpLite: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors InCsumErrors
UdpLite: 0 0 0 0 0 0 0
"""
SNMP6 = """Udp6InDatagrams                  	12
Udp6InErrors                     	4
Udp6RcvbufErrors                 	3
UdpLite6RcvbufErrors             	9
"""


def test_counters_are_read_by_name_for_udp_not_udplite() -> None:
    assert _snmp(SNMP, "Udp:", "RcvbufErrors") == 15
    assert _snmp(SNMP, "Udp:", "InErrors") == 17
    assert _snmp(SNMP6, "Udp6", "RcvbufErrors") == 3
    assert _snmp(SNMP6, "Udp6", "InErrors") == 4
    assert _snmp("", "Udp:", "RcvbufErrors") == 0
    assert _snmp("Udp: RcvbufErrors\nUdp: x\n", "Udp:", "RcvbufErrors") == 0  # not a number


def test_a_fresh_socket_has_dropped_nothing() -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind(("127.0.0.1", 0))
        stats = socket_statistics([sock])
        assert stats["drops"] == 0 and stats["receive_buffer"] > 0
        assert stats["rcvbuf_errors"] >= 0 and stats["in_errors"] >= stats["rcvbuf_errors"]
    finally:
        sock.close()
    assert socket_statistics([])["receive_buffer"] == 0
