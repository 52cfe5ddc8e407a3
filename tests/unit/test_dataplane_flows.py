"""The userspace dataplane's per-flow cache and its batches (services/kernel/flows.py).

Packets are built with scapy; batches are checked and applied with the flow service's own
code (`shared/flow/events.py` on a real `SessionTable`), so what the dataplane sends is what
the table takes.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import pytest
from scapy.compat import raw
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6

from ikefarm.proto.messages import FlowTuple, FlowVerdict, FlowVerdicts
from ikefarm.services.kernel.dataplane import Dataplane
from ikefarm.services.kernel.flows import (
    MAX_ITEMS,
    PROMPT,
    REFRESH,
    REFUSED_HOLD,
    FlowCache,
    parse,
    reverse,
)
from ikefarm.shared.flow.events import apply_batch, check_batch
from ikefarm.shared.flow.settings import FlowSettings
from ikefarm.shared.flow.table import ESTABLISHED, HANDSHAKE, SessionTable
from tests.unit.test_userspace_dataplane import packet, tunnel_pair

A, B = "10.100.0.1", "10.200.0.7"


def tcp(src: str, dst: str, flags: str, sport: int = 40000, dport: int = 80) -> bytes:
    return raw(IP(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags=flags))


def udp(src: str, dst: str, sport: int = 5000, dport: int = 53, size: int = 10) -> bytes:
    return raw(IP(src=src, dst=dst) / UDP(sport=sport, dport=dport) / (b"x" * size))


def cache(**settings: object) -> FlowCache:
    return FlowCache(FlowSettings(**settings), "kernel-test")  # type: ignore[arg-type]


def feed(flows: FlowCache, data: bytes, now: float = 0.0) -> bool:
    return flows.packet(data, now, "ikefarm0", "vpn-a", "c-net")


def drain(flows: FlowCache, table: SessionTable, now: float) -> int:
    """Publish what is due into the table as the flow service would; the number of items."""
    items = 0
    for batch in flows.batches(now):
        items += len(batch.opened) + len(batch.changes) + len(batch.refreshes)
        assert items and len(batch.opened) + len(batch.changes) + len(batch.refreshes) <= MAX_ITEMS
        apply_batch(table, check_batch(batch), now)
    return items


def test_parse_tuples_of_each_protocol() -> None:
    key, flags = parse(tcp(A, B, "S")) or ((), 0)
    assert key == (6, bytes([10, 100, 0, 1]), 40000, bytes([10, 200, 0, 7]), 80) and flags == 2
    assert parse(udp(A, B))[0][2:5:2] == (5000, 53)  # type: ignore[index]
    echo = parse(raw(IP(src=A, dst=B) / ICMP(id=77)))
    assert echo is not None and echo[0][2] == echo[0][4] == 77  # identifier as both ports
    six = parse(raw(IPv6(src="2001:db8::1", dst="2001:db8::2") / ICMPv6EchoRequest(id=9)))
    assert six is not None and six[0][0] == 58 and six[0][2] == 9
    assert parse(b"") is None and parse(b"\x45\x00") is None and parse(b"\x60" * 20) is None


def test_a_flow_is_one_entry_both_ways_with_counters_and_one_session() -> None:
    flows, table = cache(), SessionTable(FlowSettings())
    request, reply = udp(A, B, size=10), udp(B, A, 53, 5000, size=100)
    for now in range(3):
        assert feed(flows, request, now) and feed(flows, reply, now)
    assert len(flows) == 1 and len(flows.entries) == 2  # both tuples, one entry
    assert drain(flows, table, 2 + REFRESH) == 2  # one opened, one refresh
    (session,) = table.sessions()
    assert session.init == (17, A, 5000, B, 53)
    assert (session.packets_in, session.bytes_in) == (3, 3 * len(request))
    assert (session.packets_out, session.bytes_out) == (3, 3 * len(reply))
    assert (session.ingress, session.egress, session.policy) == ("ikefarm0", "vpn-a", "c-net")


def test_nothing_per_packet_on_the_bus() -> None:
    flows, table = cache(), SessionTable(FlowSettings())
    assert feed(flows, udp(A, B), 0.0)
    assert flows.batches(0.0) == []  # the opened one waits PROMPT for company
    for i in range(10_000):
        feed(flows, udp(A, B), PROMPT + i * 1e-5)
    assert drain(flows, table, PROMPT) == 1  # the opened
    assert drain(flows, table, PROMPT + 0.01) == 0  # no refresh before REFRESH
    assert drain(flows, table, REFRESH + 1) == 1  # 10,000 packets: one refresh
    assert next(table.sessions()).packets_in == 10_001
    assert drain(flows, table, 2 * REFRESH + 2) == 0  # quiet flow: nothing


def test_batches_are_bounded_and_in_order() -> None:
    flows, table = cache(), SessionTable(FlowSettings())
    for port in range(3 * MAX_ITEMS // 2):
        feed(flows, udp(A, B, sport=1024 + port), 0.0)
    batches = flows.batches(PROMPT)
    assert [len(b.opened) for b in batches] == [MAX_ITEMS, MAX_ITEMS // 2]
    assert batches[1].seq == batches[0].seq + 1
    for batch in batches:
        apply_batch(table, check_batch(batch), PROMPT)
    assert len(table) == 3 * MAX_ITEMS // 2


def _calls(action: Callable[[], object]) -> int:
    """Python and C function calls made by `action` (a cost measure that is not a time)."""
    calls = 0

    def profile(_frame: object, event: str, _arg: object) -> None:
        nonlocal calls
        calls += event in ("call", "c_call")

    sys.setprofile(profile)
    try:
        action()
    finally:
        sys.setprofile(None)
    return calls


def test_the_cost_of_a_packet_does_not_grow_with_the_flows() -> None:
    small, large = cache(), cache()
    for port in range(10):
        feed(small, udp(A, B, sport=port), 0.0)
    for port in range(20_000):
        feed(large, udp(A, B, sport=port), 0.0)
    data = udp(B, A, 53, 5)  # the answer of an existing flow
    feed(small, data, 1.0), feed(large, data, 1.0)  # warm
    assert _calls(lambda: feed(small, data, 2.0)) == _calls(lambda: feed(large, data, 2.0))
    new = udp(A, B, sport=60000)
    assert _calls(lambda: feed(small, new, 3.0)) == _calls(lambda: feed(large, new, 3.0))


def test_tcp_handshake_fin_and_rst_are_reported_once() -> None:
    flows, table = cache(), SessionTable(FlowSettings())
    assert feed(flows, tcp(A, B, "S"), 0.0)
    drain(flows, table, PROMPT)
    assert next(table.sessions()).state == HANDSHAKE
    feed(flows, tcp(B, A, "SA", 80, 40000), 0.1)
    feed(flows, tcp(A, B, "A"), 0.1)
    feed(flows, tcp(A, B, "PA"), 0.1)
    batches = flows.batches(0.1 + PROMPT)
    assert [c.change for b in batches for c in b.changes] == ["established"]
    for batch in batches:
        apply_batch(table, check_batch(batch), 0.2)
    assert next(table.sessions()).state == ESTABLISHED
    feed(flows, tcp(B, A, "FA", 80, 40000), 1.0)
    feed(flows, tcp(B, A, "FA", 80, 40000), 1.0)  # a retransmitted FIN: no second event
    feed(flows, tcp(A, B, "R"), 1.0)
    feed(flows, tcp(A, B, "R"), 1.0)
    changes = [(c.change, c.direction) for b in flows.batches(1.0 + PROMPT) for c in b.changes]
    assert changes == [("fin", "out"), ("rst", "in")]


def test_a_tcp_first_packet_that_is_no_syn_is_dropped_unless_no_syn_check() -> None:
    flows = cache()
    assert not feed(flows, tcp(A, B, "A"))
    assert flows.counters["flow.drop.no_syn"] == 1 and len(flows) == 0
    relaxed = cache(no_syn_check=True)
    assert feed(relaxed, tcp(A, B, "A"))
    assert [o.tcp_flags for b in relaxed.batches(PROMPT) for o in b.opened] == ["A"]


def verdicts(seq: int, *items: tuple[tuple[int, str, int, str, int], str], full: bool = False):
    return FlowVerdicts(
        seq=seq,
        closed=[FlowVerdict(FlowTuple(*key), reason) for key, reason in items],
        table_full=full,
    )


def test_a_cleared_tcp_flow_is_cut_and_a_cleared_udp_flow_reopens() -> None:
    flows = cache()
    feed(flows, tcp(A, B, "S"))
    feed(flows, udp(A, B))
    flows.batches(PROMPT)
    applied = flows.verdicts(
        verdicts(1, ((6, A, 40000, B, 80), "cleared"), ((17, B, 53, A, 5000), "cleared")), 1.0
    )
    assert applied == 2 and len(flows) == 0  # the answer's tuple finds the flow too
    assert not feed(flows, tcp(B, A, "A", 80, 40000), 1.1)  # its next packets: dropped
    assert not feed(flows, tcp(A, B, "PA"), 1.1)
    assert flows.counters["flow.drop.no_syn"] == 2
    assert feed(flows, udp(A, B), 1.2)  # a new session for the UDP flow
    assert [o.init.sport for b in flows.batches(2.0) for o in b.opened] == [5000]


def test_refused_flows_are_dropped_and_a_full_table_refuses_new_ones_only() -> None:
    flows = cache()
    feed(flows, udp(A, B, sport=1))
    feed(flows, udp(A, B, sport=2))
    flows.batches(PROMPT)
    flows.verdicts(verdicts(1, ((17, A, 2, B, 53), "max-sessions"), full=True), 1.0)
    assert feed(flows, udp(A, B, sport=1), 1.1)  # the existing flow keeps working
    assert feed(flows, udp(B, A, 53, 1), 1.1)
    assert not feed(flows, udp(A, B, sport=2), 1.1)  # the refused one is dropped
    assert not feed(flows, udp(A, B, sport=3), 1.1)  # no new flow while full
    assert flows.counters["flow.drop.refused"] == 1
    assert flows.counters["flow.drop.table_full"] == 1
    flows.verdicts(verdicts(2, full=False), 2.0)
    assert feed(flows, udp(A, B, sport=3), 2.1)
    assert not feed(flows, udp(A, B, sport=2), 2.1)  # still held
    assert feed(flows, udp(A, B, sport=2), 2.1 + REFUSED_HOLD)  # asks again


def test_tunnel_sessions_are_reported_and_never_cut() -> None:
    flows = cache()
    gw = Dataplane(flows=flows, clock=lambda: 5.0)
    peer = Dataplane()
    ours, theirs = tunnel_pair(1, "10.100.0.0/24", "10.200.0.0/24")
    ours.label, ours.policy = "vpn-a", "c-net"
    gw.add(ours)
    peer.add(theirs)
    send = gw.outbound(packet(A, B))
    assert send is not None
    back = peer.outbound(packet(B, A))
    assert back is not None and gw.inbound(back.esp) is not None
    table = SessionTable(FlowSettings())
    drain(flows, table, 5.0 + REFRESH)
    by_role = {s.tunnel: s for s in table.sessions()}
    tunnel, inner = by_role[True], by_role[False]
    assert tunnel.init == (17, "192.0.2.2", 4500, "192.0.2.1", 4500)
    assert tunnel.packets_in == 1 and tunnel.packets_out == 1
    assert inner.init == (1, A, 3, B, 3) and (inner.ingress, inner.egress) == ("ikefarm0", "vpn-a")
    flows.verdicts(verdicts(1, (tunnel.init, "cleared")), 6.0)  # aged, say: not cut
    assert gw.inbound(peer.outbound(packet(B, A, seq=2)).esp) is not None  # type: ignore[union-attr]
    assert [o.tunnel for b in flows.batches(7.0) for o in b.opened] == [True]
    assert ours.outer is not None
    flows.verdicts(verdicts(2, (tunnel.init, "max-sessions"), full=True), 8.0)
    flows.tunnel_packet(ours.outer, 100, True, 8.5)  # a full table: not asked again at once
    assert flows.batches(9.0) == [] and flows.sweep(100.0) == 0
    flows.tunnel_packet(ours.outer, 100, True, 8.0 + REFUSED_HOLD)
    assert [o.tunnel for b in flows.batches(9.0 + REFUSED_HOLD) for o in b.opened] == [True]
    gw.remove(1)
    assert ours.outer is None and len(flows) == 1  # the inner flow stays until it ages


def test_malformed_verdicts_change_nothing() -> None:
    flows = cache()
    feed(flows, udp(A, B))
    bad = [
        verdicts(1, ((17, A, 5000, B, 53), "because")),
        verdicts(1, ((17, A, 70000, B, 53), "cleared")),
        verdicts(1, ((17, A, 5000, "2001:db8::1", 53), "cleared")),
        verdicts(1, ((17, "not an address", 5000, B, 53), "cleared")),
        verdicts(1, ((17, 174325761, 5000, B, 53), "cleared")),  # an address as a number
        verdicts(-1),
    ]
    for message in bad:
        with pytest.raises(ValueError):
            flows.verdicts(message, 1.0)
    assert len(flows) == 1 and not flows.table_full and flows.verdict_seq == 0


def test_the_sweep_forgets_silent_flows_a_bounded_number_at_a_time() -> None:
    flows = cache(udp=10, tcp=10, icmp=10, other=10)
    for port in range(600):
        feed(flows, udp(A, B, sport=port), 0.0)
    assert flows.sweep(1.0) == 0
    assert flows.sweep(100.0) == 256 and len(flows) == 600 - 256
    while flows.sweep(100.0):
        pass
    assert len(flows) == 0 and not flows.entries
    assert reverse(reverse((17, b"a", 1, b"b", 2))) == (17, b"a", 1, b"b", 2)
