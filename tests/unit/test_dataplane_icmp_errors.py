"""ICMP errors in the userspace dataplane's flow cache (services/kernel/flows.py;
docs/flow-sessions.md "ICMP errors"): an error belongs to the session of the flow whose
packet it carries (RFC 792, RFC 4443 2.4), counted there the way back, and never opens a
session of its own; one about no flow the cache holds is dropped and counted.

Packets are built with scapy; what the cache publishes is applied to a real `SessionTable`
with the flow service's own code, so the table is what `show` would print.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.compat import raw
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6EchoRequest,
    ICMPv6PacketTooBig,
    IPv6,
)

from ikefarm.services.kernel.flows import FlowCache
from ikefarm.shared.flow.settings import FlowSettings
from ikefarm.shared.flow.table import SessionTable
from tests.unit.test_dataplane_flows import drain

A, B, ROUTER = "10.100.0.1", "10.200.0.7", "10.200.0.254"
A6, B6 = "fd00:100::1", "fd00:200::7"


def cache(**options: object) -> FlowCache:
    return FlowCache(FlowSettings(**options), "kernel-test")  # type: ignore[arg-type]


def feed(flows: FlowCache, data: bytes, now: float = 0.0) -> bool:
    return flows.packet(data, now, "ikefarm0", "vpn-a", "c-net")


def udp(src: str = A, dst: str = B, sport: int = 5000, dport: int = 53) -> bytes:
    ip = IPv6(src=src, dst=dst) if ":" in src else IP(src=src, dst=dst)
    return raw(ip / UDP(sport=sport, dport=dport) / b"query")


def error(about: bytes, src: str, *, kind: int = 3, code: int = 3, keep: int = 8) -> bytes:
    """An ICMPv4 error from `src` carrying `about`'s IP header and `keep` octets after it."""
    header = (about[0] & 0x0F) * 4
    original = IP(about)
    return raw(IP(src=src, dst=original.src) / ICMP(type=kind, code=code) / about[: header + keep])


def error6(about: bytes, src: str, *, too_big: bool = False) -> bytes:
    original = IPv6(about)
    kind = ICMPv6PacketTooBig(mtu=1280) if too_big else ICMPv6DestUnreach(code=4)
    return raw(IPv6(src=src, dst=original.src) / kind / about)


def table_after(flows: FlowCache) -> SessionTable:
    table = SessionTable(FlowSettings())
    drain(flows, table, 10.0)
    return table


def test_port_unreachable_is_counted_in_the_udp_session_and_opens_none() -> None:
    flows = cache()
    query = udp()
    assert feed(flows, query)
    unreachable = error(query, B)
    assert feed(flows, unreachable)
    assert len(flows) == 1  # no ICMP flow
    (entry,) = set(flows.entries.values())
    assert (entry.packets_in, entry.packets_out) == (1, 1)
    assert entry.bytes_out == len(unreachable)
    (session,) = table_after(flows).sessions()
    assert session.protocol == 17 and session.packets_out == 1


def test_an_error_from_a_router_on_the_way_belongs_to_the_session_too() -> None:
    flows = cache()
    query = udp()
    assert feed(flows, query)
    assert feed(flows, error(query, ROUTER, kind=11, code=0))  # time exceeded
    assert feed(flows, error(query, ROUTER, kind=3, code=4))  # fragmentation needed
    assert len(flows) == 1
    assert flows.counters["flow.drop.icmp_error"] == 0


def test_an_error_about_the_answer_direction_counts_the_other_way() -> None:
    flows = cache()
    assert feed(flows, udp())
    answer = udp(B, A, 53, 5000)
    assert feed(flows, answer)
    assert feed(flows, error(answer, A))  # A's port went away: the error goes from A to B
    (entry,) = set(flows.entries.values())
    assert (entry.packets_in, entry.packets_out) == (2, 1)


def test_time_exceeded_for_a_ping_belongs_to_the_echo_session() -> None:
    flows = cache()
    ping = raw(IP(src=A, dst=B, ttl=1) / ICMP(type=8, id=77, seq=1) / b"abcdefgh")
    assert feed(flows, ping)
    assert feed(flows, error(ping, ROUTER, kind=11, code=0))
    assert len(flows) == 1
    (session,) = table_after(flows).sessions()
    assert session.init[2] == session.init[4] == 77 and session.packets_out == 1


def test_icmpv6_errors_belong_to_their_session() -> None:
    flows = cache()
    query = udp(A6, B6)
    assert feed(flows, query)
    assert feed(flows, error6(query, B6))
    assert feed(flows, error6(query, "fd00:200::fe", too_big=True))
    assert len(flows) == 1
    (entry,) = set(flows.entries.values())
    assert entry.packets_out == 2


def test_an_error_about_no_known_flow_is_dropped_and_counted() -> None:
    flows = cache()
    assert not feed(flows, error(udp(), B))
    assert not feed(flows, error6(udp(A6, B6), B6))
    assert len(flows) == 0 and flows.counters["flow.drop.icmp_error"] == 2
    assert table_after(flows).by_key == {}


def test_an_error_not_sent_to_the_source_of_what_it_carries_is_dropped() -> None:
    flows = cache()
    query = udp()
    assert feed(flows, query)
    forged = raw(IP(src=B, dst="10.100.0.9") / ICMP(type=3, code=3) / query[:28])
    assert not feed(flows, forged)
    truncated = error(query, B, keep=4)  # short of RFC 792's 8 octets
    assert not feed(flows, truncated)
    assert flows.counters["flow.drop.icmp_error"] == 2
    assert len(flows) == 1


def test_other_icmp_messages_still_make_their_own_session() -> None:
    flows = cache()
    assert feed(flows, raw(IP(src=A, dst=B) / ICMP(type=13)))  # a timestamp request
    assert feed(flows, raw(IPv6(src=A6, dst=B6) / ICMPv6EchoRequest(id=3)))
    assert len(flows) == 2


def test_an_error_about_a_tcp_segment_is_checked_against_its_window() -> None:
    """RFC 5927 4.1: an error quoting a sequence number far outside the window is not about
    this connection's data (a blind attack), dropped; `no-sequence-check` lets it through."""
    for check in (True, False):
        flows = cache(no_sequence_check=not check)

        def seg(src: str, dst: str, flags: str, seq: int, ack: int) -> bytes:
            ports = (40000, 80) if src == A else (80, 40000)
            return raw(IP(src=src, dst=dst) / TCP(sport=ports[0], dport=ports[1], flags=flags,
                                                 seq=seq, ack=ack, window=512))  # fmt: skip

        assert feed(flows, seg(A, B, "S", 1000, 0))
        assert feed(flows, seg(B, A, "SA", 5000, 1001))
        assert feed(flows, seg(A, B, "A", 1001, 5001))
        assert feed(flows, error(seg(A, B, "PA", 1001, 5001), B, code=4))  # in the window
        far = error(seg(A, B, "PA", 1001 + 2**31, 5001), ROUTER, code=4)
        assert feed(flows, far) is not check
        assert flows.counters["flow.drop.tcp_sequence"] == (1 if check else 0)
        assert len(flows) == 1


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 255), st.integers(0, 255), st.binary(max_size=80))
def test_any_icmp_body_never_crashes_and_an_error_never_opens_a_session(
    kind: int, code: int, body: bytes
) -> None:
    flows = cache()
    query = udp()
    assert feed(flows, query)
    errors = (3, 4, 5, 11, 12)
    for data, is_error in (
        (raw(IP(src=B, dst=A) / ICMP(type=kind, code=code) / body), kind in errors),
        (raw(IP(src=B, dst=A) / ICMP(type=3, code=code) / (query[:20] + body)), True),
        (raw(IPv6(src=B6, dst=A6) / ICMPv6DestUnreach(code=code % 7) / body), True),
    ):
        before = len(flows)
        feed(flows, data)
        assert len(flows) == before if is_error else len(flows) <= before + 1
