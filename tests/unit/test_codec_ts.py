"""Traffic selector helpers: building, narrowing (RFC 7296 2.9), containment, strongSwan text."""

from __future__ import annotations

import ipaddress

import pytest

from ikefarm.shared.ikev2.constants import TsType
from ikefarm.shared.ikev2.payloads import TrafficSelector

TS = TrafficSelector
TCP, UDP, ICMP = 6, 17, 1


def test_from_network() -> None:
    ts = TS.from_network("10.0.0.0/24")
    assert ts.ts_type == TsType.TS_IPV4_ADDR_RANGE
    assert (ts.start_address, ts.end_address) == (
        ipaddress.ip_address("10.0.0.0"),
        ipaddress.ip_address("10.0.0.255"),
    )
    assert (ts.ip_protocol, ts.start_port, ts.end_port) == (0, 0, 65535)
    assert TS.from_network("10.0.0.7/24") == ts  # host bits dropped
    v6 = TS.from_network(ipaddress.ip_network("2001:db8::/32"), TCP, (22, 22))
    assert v6.ts_type == TsType.TS_IPV6_ADDR_RANGE and v6.version == 6
    assert TS.any() == TS.from_network("0.0.0.0/0") and TS.any(6) == TS.from_network("::/0")


@pytest.mark.parametrize(
    ("ts", "text"),
    [
        (TS.from_network("10.0.0.0/24"), "10.0.0.0/24"),
        (TS.from_network("192.0.2.1/32"), "192.0.2.1/32"),
        (TS.from_network("0.0.0.0/0"), "0.0.0.0/0"),
        (TS.from_network("2001:db8::/64"), "2001:db8::/64"),
        (TS.from_range("10.0.0.1", "10.0.0.5"), "10.0.0.1..10.0.0.5"),
        (TS.from_network("10.0.0.0/24", TCP), "10.0.0.0/24[tcp]"),
        (TS.from_network("10.0.0.0/24", TCP, (80, 80)), "10.0.0.0/24[tcp/80]"),
        (TS.from_network("10.0.0.0/24", UDP, (500, 4500)), "10.0.0.0/24[udp/500-4500]"),
        (TS.from_network("10.0.0.0/24", 99), "10.0.0.0/24[99]"),
        (TS.from_network("10.0.0.0/24", 0, (53, 53)), "10.0.0.0/24[53]"),
        (TS.from_network("10.0.0.0/24", UDP, (65535, 0)), "10.0.0.0/24[udp/OPAQUE]"),
    ],
)
def test_str_like_strongswan(ts: TrafficSelector, text: str) -> None:
    assert str(ts) == text


def test_to_network_and_networks() -> None:
    assert TS.from_network("10.0.0.0/24").to_network() == ipaddress.ip_network("10.0.0.0/24")
    odd = TS.from_range("10.0.0.1", "10.0.0.6")
    assert odd.to_network() is None
    assert [str(n) for n in odd.networks()] == [
        "10.0.0.1/32",
        "10.0.0.2/31",
        "10.0.0.4/31",
        "10.0.0.6/32",
    ]
    backwards = TS.from_range("10.0.0.9", "10.0.0.1")
    assert backwards.is_empty and backwards.networks() == [] and backwards.to_network() is None


def test_intersect_narrows_addresses() -> None:
    wide = TS.from_network("10.0.0.0/16")
    narrow = TS.from_network("10.0.5.0/24")
    assert wide.intersect(narrow) == narrow
    assert narrow.intersect(wide) == narrow
    partial = TS.from_range("10.0.5.128", "10.0.6.10")
    assert narrow.intersect(partial) == TS.from_range("10.0.5.128", "10.0.5.255")
    assert narrow.intersect(TS.from_network("10.1.0.0/24")) is None


def test_intersect_protocols_and_ports() -> None:
    any_proto = TS.from_network("10.0.0.0/24")
    http = TS.from_network("10.0.0.0/24", TCP, (80, 80))
    assert any_proto.intersect(http) == http
    assert http.intersect(any_proto) == http
    assert http.intersect(TS.from_network("10.0.0.0/24", UDP)) is None
    web = TS.from_network("10.0.0.0/24", TCP, (0, 1023))
    high = TS.from_network("10.0.0.0/24", TCP, (1000, 2000))
    assert web.intersect(high) == TS.from_network("10.0.0.0/24", TCP, (1000, 1023))
    assert http.intersect(TS.from_network("10.0.0.0/24", TCP, (443, 443))) is None


def test_intersect_opaque_ports() -> None:
    opaque = TS.from_network("10.0.0.0/24", UDP, (65535, 0))
    any_port = TS.from_network("10.0.0.0/24", UDP)
    assert opaque.intersect(any_port) == opaque
    assert any_port.intersect(opaque) == opaque
    assert opaque.intersect(opaque) == opaque
    assert opaque.intersect(TS.from_network("10.0.0.0/24", UDP, (53, 53))) is None


def test_intersect_different_families() -> None:
    assert TS.any(4).intersect(TS.any(6)) is None


def test_contains() -> None:
    wide = TS.from_network("10.0.0.0/16")
    assert wide.contains(TS.from_network("10.0.1.0/24", TCP, (22, 22)))
    assert wide.contains(wide)
    assert not TS.from_network("10.0.1.0/24").contains(wide)
    assert not TS.from_network("10.0.0.0/16", TCP).contains(TS.from_network("10.0.1.0/24"))
    ports = TS.from_network("10.0.0.0/16", TCP, (1000, 2000))
    assert ports.contains(TS.from_network("10.0.1.0/24", TCP, (1500, 1600)))
    assert not ports.contains(TS.from_network("10.0.1.0/24", TCP, (900, 1600)))
    opaque = TS.from_network("10.0.0.0/16", TCP, (65535, 0))
    assert wide.contains(opaque) and opaque.contains(opaque)
    assert not ports.contains(opaque) and not opaque.contains(ports)
    assert not wide.contains(TS.any(6))
    assert not wide.contains(TS.from_range("10.0.0.9", "10.0.0.1"))  # empty


def test_icmp_type_code_ranges_use_the_same_arithmetic() -> None:
    # RFC 7296 3.13.1 / RFC 4301: ICMP type in the high octet, code in the low
    echo_request = TS.from_network("10.0.0.0/24", ICMP, (0x0800, 0x08FF))
    all_icmp = TS.from_network("10.0.0.0/24", ICMP)
    assert all_icmp.contains(echo_request)
    assert all_icmp.intersect(echo_request) == echo_request


def test_contains_address() -> None:
    ts = TS.from_network("10.0.0.0/24")
    assert ts.contains_address("10.0.0.9")
    assert not ts.contains_address("10.0.1.9")
    assert not ts.contains_address("2001:db8::1")
