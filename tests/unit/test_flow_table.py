"""The flow-session table, one knob of `[flow]` at a time (seed 003; docs/flow-sessions.md)."""

from __future__ import annotations

import ipaddress

import pytest

from ikefarm.shared.flow.filters import FilterError, parse_words
from ikefarm.shared.flow.settings import Application, FlowSettings
from ikefarm.shared.flow.show import format_sessions, format_summary, row_problem, session_row
from ikefarm.shared.flow.table import (
    AGED,
    CLEARED,
    ESTABLISHED,
    HANDSHAKE,
    HANDSHAKE_TIMEOUT,
    INIT,
    LEAF,
    REFUSED_FULL,
    REFUSED_NO_SYN,
    REPLY,
    TEMPLATE,
    TEMPLATE_GONE,
    TIME_WAIT,
    Refused,
    Session,
    SessionTable,
)

TCP_KEY = (6, "10.200.0.2", 40000, "10.100.0.2", 22)
UDP_KEY = (17, "10.200.0.2", 40001, "10.100.0.2", 53)
ICMP_KEY = (1, "10.200.0.2", 7, "10.100.0.2", 7)
GRE_KEY = (47, "10.200.0.2", 0, "10.100.0.2", 0)


def udp(n: int) -> tuple[int, str, int, str, int]:
    return (17, "10.200.0.2", 10000 + n, "10.100.0.2", 53)


def opened(table: SessionTable, key: tuple[int, str, int, str, int], now: float = 0.0, **kw):
    session = table.open(key, now, **kw)
    assert isinstance(session, Session), session
    return session


def closed_ids(closed) -> set[int]:
    return {c.session.id for c in closed}


# --- protocol timeouts ([flow.session-timeouts]) ---------------------------------------------


def test_protocol_timeouts_defaults_are_the_seeds() -> None:
    settings = FlowSettings()
    assert (settings.tcp, settings.udp, settings.icmp, settings.other) == (1800, 60, 60, 1800)
    assert settings.invalidated == 4 and settings.tcp_initial_timeout == 20


@pytest.mark.parametrize(
    ("key", "expected"), [(UDP_KEY, 30), (ICMP_KEY, 15), (GRE_KEY, 90)], ids=["udp", "icmp", "gre"]
)
def test_each_protocol_ages_after_its_own_timeout(key, expected) -> None:
    table = SessionTable(FlowSettings(udp=30, icmp=15, other=90))
    session = opened(table, key, 100.0)
    assert session.timeout == expected and session.remaining(100.0) == expected
    assert table.tick(100.0 + expected - 0.5) == []
    closed = table.tick(100.0 + expected)
    assert [(c.session.id, c.reason) for c in closed] == [(session.id, AGED)]
    assert len(table) == 0 and key not in table.by_key


def test_established_tcp_uses_the_tcp_timeout() -> None:
    table = SessionTable(FlowSettings(tcp=300))
    session = opened(table, TCP_KEY, 0.0)
    table.handshake_done(TCP_KEY, 1.0)
    assert session.state == ESTABLISHED and session.timeout == 300
    assert table.tick(300.5) == []
    assert closed_ids(table.tick(301.0)) == {session.id}


def test_refresh_moves_the_deadline_and_reply_direction_finds_the_session() -> None:
    table = SessionTable(FlowSettings(udp=10))
    session = opened(table, UDP_KEY, 0.0)
    reply_key = (17, "10.100.0.2", 53, "10.200.0.2", 40001)
    assert table.refresh(reply_key, 8.0, (3, 300, 2, 200)) is session
    assert (session.packets_in, session.bytes_in, session.packets_out, session.bytes_out) == (
        3,
        300,
        2,
        200,
    )
    assert table.tick(12.0) == []  # would have aged at 10 without the refresh
    assert closed_ids(table.tick(18.0)) == {session.id}


def test_refresh_of_an_unknown_flow_changes_nothing() -> None:
    table = SessionTable(FlowSettings())
    assert table.refresh(UDP_KEY, 1.0, (1, 1, 1, 1)) is None
    assert len(table) == 0


# --- [[flow.application]] inactivity timeouts ------------------------------------------------


def test_application_timeout_overrides_the_protocol_and_is_tied_to_its_policy() -> None:
    app = Application("mc", 17, 53, 500, frozenset({"trust-to-untrust"}))
    wide = Application("udp-any", 17, 0, 120)
    table = SessionTable(FlowSettings(applications=(app, wide)))
    tied = opened(table, UDP_KEY, 0.0, policy="trust-to-untrust")
    other_policy = opened(table, udp(1), 0.0, policy="other")
    other_port = opened(table, (17, "10.200.0.2", 9, "10.100.0.2", 9999), 0.0, policy="other")
    assert (tied.application, tied.timeout) == ("mc", 500)
    # same port, another policy: the protocol-wide application applies
    assert (other_policy.application, other_policy.timeout) == ("udp-any", 120)
    assert (other_port.application, other_port.timeout) == ("udp-any", 120)
    plain = SessionTable(FlowSettings())
    assert opened(plain, UDP_KEY).timeout == 60


def test_application_timeout_applies_to_tcp_once_the_handshake_is_done() -> None:
    app = Application("ssh-long", 6, 22, 7200)
    table = SessionTable(FlowSettings(applications=(app,)))
    session = opened(table, TCP_KEY, 0.0)
    assert session.timeout == 20
    table.handshake_done(TCP_KEY, 1.0)
    assert session.timeout == 7200 and session.application == "ssh-long"


# --- tcp-initial-timeout ---------------------------------------------------------------------


def test_unanswered_syn_goes_after_tcp_initial_timeout() -> None:
    table = SessionTable(FlowSettings(tcp_initial_timeout=4))
    session = opened(table, TCP_KEY, 0.0)
    assert session.state == HANDSHAKE and session.timeout == 4
    assert table.tick(3.9) == []
    closed = table.tick(4.0)
    assert [(c.session.id, c.reason) for c in closed] == [(session.id, HANDSHAKE_TIMEOUT)]


def test_each_handshake_packet_restarts_the_initial_timer() -> None:
    table = SessionTable(FlowSettings(tcp_initial_timeout=20))
    session = opened(table, TCP_KEY, 0.0)
    table.refresh(TCP_KEY, 15.0)  # a SYN retransmission
    assert table.tick(30.0) == []
    assert session.remaining(30.0) == 5
    assert closed_ids(table.tick(35.0)) == {session.id}


def test_handshake_done_replaces_the_initial_timeout() -> None:
    table = SessionTable(FlowSettings(tcp_initial_timeout=20, tcp=1800))
    session = opened(table, TCP_KEY, 0.0)
    table.handshake_done(TCP_KEY, 1.0)
    assert table.tick(100.0) == [] and session.remaining(100.0) == 1701


# --- no-syn-check ----------------------------------------------------------------------------


def test_non_syn_first_packet_is_refused_without_no_syn_check() -> None:
    table = SessionTable(FlowSettings())
    refused = table.open(TCP_KEY, 0.0, syn=False)
    assert isinstance(refused, Refused) and refused.reason == REFUSED_NO_SYN
    assert len(table) == 0 and table.counters["refused.no-syn"] == 1


def test_no_syn_check_opens_an_established_session_from_any_packet() -> None:
    table = SessionTable(FlowSettings(no_syn_check=True, tcp=900))
    session = opened(table, TCP_KEY, 0.0, syn=False)
    assert session.state == ESTABLISHED and session.timeout == 900


# --- rst-invalidate-session, fin-invalidate-session, time-wait-state -------------------------


def established(table: SessionTable) -> Session:
    session = opened(table, TCP_KEY, 0.0)
    table.handshake_done(TCP_KEY, 1.0)
    return session


def test_rst_invalidate_drops_the_timeout_to_the_invalidated_value() -> None:
    table = SessionTable(FlowSettings(rst_invalidate_session=True, invalidated=4))
    session = established(table)
    table.rst(TCP_KEY, 10.0)
    assert not session.valid and session.remaining(10.0) == 4
    assert closed_ids(table.tick(14.0)) == {session.id}


def test_rst_without_invalidate_leaves_the_session() -> None:
    table = SessionTable(FlowSettings(tcp=1800))
    session = established(table)
    table.rst(TCP_KEY, 10.0)
    assert session.valid and session.remaining(10.0) == 1791


def test_fin_invalidate_from_either_end() -> None:
    for direction in (INIT, REPLY):
        table = SessionTable(FlowSettings(fin_invalidate_session=True, invalidated=3))
        session = established(table)
        table.fin(TCP_KEY, 10.0, direction)
        assert not session.valid and session.remaining(10.0) == 3


def test_close_without_fin_invalidate_terminates_after_both_fins() -> None:
    table = SessionTable(FlowSettings(invalidated=4))
    session = established(table)
    table.fin(TCP_KEY, 10.0, INIT)
    assert session.valid and session.state == "fin-wait"
    table.fin(TCP_KEY, 11.0, REPLY)
    assert not session.valid and session.state == TIME_WAIT and session.remaining(11.0) == 4


def test_time_wait_state_holds_a_closed_session_that_long() -> None:
    table = SessionTable(FlowSettings(time_wait_state=30))
    session = established(table)
    table.fin(TCP_KEY, 10.0, INIT)
    table.fin(TCP_KEY, 10.0, REPLY)
    assert session.valid and session.state == TIME_WAIT and session.remaining(10.0) == 30
    table.refresh(TCP_KEY, 20.0)  # a retransmitted FIN/ACK restarts time-wait
    assert table.tick(45.0) == []
    assert closed_ids(table.tick(50.0)) == {session.id}


def test_time_wait_state_applies_to_rst_without_rst_invalidate() -> None:
    table = SessionTable(FlowSettings(time_wait_state=10))
    session = established(table)
    table.rst(TCP_KEY, 5.0)
    assert session.state == TIME_WAIT and session.remaining(5.0) == 10


def test_invalidated_session_is_not_revived_by_traffic() -> None:
    table = SessionTable(FlowSettings(rst_invalidate_session=True))
    session = established(table)
    table.rst(TCP_KEY, 10.0)
    table.refresh(TCP_KEY, 13.0, (9, 9, 9, 9))
    assert session.packets_in == 9  # counters are still taken
    assert closed_ids(table.tick(14.0)) == {session.id}


# --- max-sessions ----------------------------------------------------------------------------


def test_max_sessions_refuses_and_counts_while_existing_sessions_keep_working() -> None:
    table = SessionTable(FlowSettings(max_sessions=3, udp=60))
    sessions = [opened(table, udp(n), 0.0) for n in range(3)]
    refused = table.open(udp(3), 1.0)
    assert isinstance(refused, Refused) and refused.reason == REFUSED_FULL
    assert table.counters["refused.max-sessions"] == 1
    assert table.refresh(udp(0), 50.0) is sessions[0]
    assert closed_ids(table.tick(60.0)) == {sessions[1].id, sessions[2].id}
    assert isinstance(table.open(udp(3), 61.0), Session)
    assert table.summary(61.0)["failed_sessions"] == 1


def test_a_cleared_flow_opens_a_new_session_with_a_new_id() -> None:
    table = SessionTable(FlowSettings())
    first = opened(table, UDP_KEY)
    assert len(table.clear(parse_words("clear", ["protocol", "udp"])[0])) == 1
    second = opened(table, UDP_KEY, 1.0)
    assert second.id != first.id and len(table) == 1


# --- aggressive aging ------------------------------------------------------------------------


def test_aggressive_aging_kicks_in_above_high_and_out_below_low_watermark() -> None:
    settings = FlowSettings(
        max_sessions=10, high_watermark=80, low_watermark=50, early_ageout=20, udp=60
    )
    table = SessionTable(settings)
    for n in range(8):
        opened(table, udp(n), 0.0)
    assert not table.aggressive  # 80% is not above 80%
    opened(table, udp(8), 40.0)  # 9 sessions: 90%
    assert table.aggressive and table.counters["aggressive_aging.on"] == 1
    # at 45 the eight first sessions have 15 s left (< early-ageout 20): invalidated,
    # the ninth has 55 s and stays valid
    table.tick(45.0)
    invalid = [s for s in table.by_id.values() if not s.valid]
    assert len(invalid) == 8 and table.counters["early_ageout"] == 8
    assert all(s.remaining(45.0) == 4 for s in invalid)
    table.tick(49.0)
    assert len(table) == 1 and not table.aggressive  # 10% < 50%: normal aging again
    assert table.counters["aggressive_aging.off"] == 1


def test_without_watermarks_sessions_keep_their_time() -> None:
    table = SessionTable(FlowSettings(max_sessions=4, udp=60))
    for n in range(4):
        opened(table, udp(n), 0.0)
    table.tick(45.0)
    assert not table.aggressive and all(s.valid for s in table.by_id.values())


# --- multicast template and leaves -----------------------------------------------------------

GROUP_KEY = (17, "198.51.100.7", 1024, "239.1.1.1", 5000)


def test_multicast_template_with_two_leaves_and_the_seeds_timeout_rule() -> None:
    app = Application("mcast-long", 17, 5000, 500, frozenset({"leaf-b"}))
    table = SessionTable(FlowSettings(udp=60, applications=(app,)))
    leaf_a = opened(table, GROUP_KEY, 0.0, ingress="eth0", egress="tun-a", policy="leaf-a")
    template = leaf_a.template
    assert template is not None and template.kind == TEMPLATE
    assert template.timeout == 60  # leaf-a has no application timeout: the IP protocol's
    leaf_b = opened(table, GROUP_KEY, 1.0, ingress="eth0", egress="tun-b", policy="leaf-b")
    assert leaf_b.template is template and leaf_b.kind == LEAF
    assert template.timeout == 500  # the highest of the leaves' and the protocol's
    assert leaf_a.remaining(1.0) == -1 and leaf_b.remaining(1.0) == -1
    assert template.remaining(3.0) == 498
    assert len(table) == 3
    rows = [session_row(s, 3.0) for s in (template, leaf_a, leaf_b)]
    text = format_sessions(rows)
    assert f"Session ID: {template.id}, Policy name: N/A, Timeout: 498, Valid" in text
    assert f"Session ID: {leaf_a.id}, Policy name: leaf-a, Timeout: -1, Valid" in text
    closed = table.tick(501.0)
    assert {(c.session.id, c.reason) for c in closed} == {
        (template.id, AGED),
        (leaf_a.id, TEMPLATE_GONE),
        (leaf_b.id, TEMPLATE_GONE),
    }
    assert len(table) == 0


def test_multicast_same_leaf_twice_is_one_leaf() -> None:
    table = SessionTable(FlowSettings())
    first = opened(table, GROUP_KEY, 0.0, egress="tun-a")
    assert opened(table, GROUP_KEY, 1.0, egress="tun-a") is first
    assert len(table) == 2


# --- commands --------------------------------------------------------------------------------


def populated() -> tuple[SessionTable, dict[str, Session]]:
    table = SessionTable(FlowSettings(applications=(Application("dns", 17, 53, 30),)))
    sessions = {
        "tcp": opened(table, TCP_KEY, 0.0, ingress="tun0", egress="eth1", policy="p1"),
        "udp": opened(table, UDP_KEY, 0.0, ingress="tun0", egress="eth1", policy="p1"),
        "icmp": opened(table, ICMP_KEY, 0.0, ingress="tun1", egress="eth1"),
        "ike": opened(
            table, (17, "192.0.2.1", 500, "192.0.2.2", 500), 0.0, egress="eth0", tunnel=True
        ),
        "gate": opened(
            table, (17, "10.200.0.9", 2000, "10.100.0.9", 2001), 0.0, resource_manager=True
        ),
    }
    return table, sessions


def select(table: SessionTable, words: list[str]) -> set[int]:
    return {s.id for s in table.select(parse_words("show", words)[0])}


def test_show_filters() -> None:
    table, s = populated()
    assert select(table, []) == {x.id for x in s.values()}
    assert select(table, ["session-identifier", str(s["udp"].id)]) == {s["udp"].id}
    assert select(table, ["protocol", "icmp"]) == {s["icmp"].id}
    assert select(table, ["protocol", "6"]) == {s["tcp"].id}
    assert select(table, ["destination-port", "53"]) == {s["udp"].id}
    assert select(table, ["application", "dns"]) == {s["udp"].id}
    assert select(table, ["interface", "tun1"]) == {s["icmp"].id}
    assert select(table, ["source-prefix", "10.200.0.0/24"]) == {
        s["tcp"].id,
        s["udp"].id,
        s["icmp"].id,
        s["gate"].id,
    }
    assert select(table, ["destination-prefix", "192.0.2.2"]) == {s["ike"].id}
    assert select(table, ["tunnel"]) == {s["ike"].id}
    assert select(table, ["protocol", "udp", "interface", "tun0"]) == {s["udp"].id}
    assert select(table, ["source-prefix", "2001:db8::/32"]) == set()


def test_clear_all_keeps_tunnel_and_resource_manager_sessions() -> None:
    table, s = populated()
    closed = table.clear(parse_words("clear", ["all"])[0])
    assert closed_ids(closed) == {s["tcp"].id, s["udp"].id, s["icmp"].id}
    assert all(c.reason == CLEARED for c in closed)
    assert set(table.by_id) == {s["ike"].id, s["gate"].id}
    assert closed_ids(table.clear(parse_words("clear", ["resource-manager"])[0])) == {s["gate"].id}


def test_clear_by_protocol_removes_only_that_protocol() -> None:
    table, s = populated()
    closed = table.clear(parse_words("clear", ["protocol", "udp"])[0])
    # the tunnel and resource-manager sessions are UDP too: only `all` spares them
    assert closed_ids(closed) == {s["udp"].id, s["ike"].id, s["gate"].id}
    assert set(table.by_id) == {s["tcp"].id, s["icmp"].id}


def test_clear_template_takes_its_leaves() -> None:
    table = SessionTable(FlowSettings())
    leaf = opened(table, GROUP_KEY, 0.0, egress="tun-a")
    assert leaf.template is not None
    closed = table.clear(parse_words("clear", ["session-identifier", str(leaf.template.id)])[0])
    assert len(closed) == 2 and len(table) == 0


@pytest.mark.parametrize(
    ("verb", "words"),
    [
        ("show", ["protocol"]),
        ("show", ["protocol", "nope"]),
        ("show", ["destination-port", "70000"]),
        ("show", ["source-prefix", "10.0.0.0/33"]),
        ("show", ["session-identifier", "-1"]),
        ("show", ["all"]),
        ("show", ["tunnel", "tunnel"]),
        ("clear", []),
        ("clear", ["all", "protocol", "udp"]),
        ("clear", ["tunnel"]),
        ("clear", ["interface", "a\nb"]),
    ],
)
def test_bad_words_are_refused(verb: str, words: list[str]) -> None:
    with pytest.raises(FilterError):
        parse_words(verb, words)


def test_summary_counts_states_protocols_and_table_use() -> None:
    table, _ = populated()
    table.handshake_done(TCP_KEY, 1.0)
    summary = table.summary(1.0)
    assert summary["sessions_in_use"] == 5 and summary["maximum_sessions"] == 1_000_000
    assert summary["by_protocol"] == {"icmp": 1, "tcp": 1, "udp": 3}
    assert summary["valid_sessions"] == 5 and summary["aggressive_aging"] is False
    text = format_summary(summary)
    assert "Sessions-in-use: 5" in text and "Maximum-sessions: 1000000" in text
    pending = SessionTable(FlowSettings())
    opened(pending, TCP_KEY)
    assert pending.summary(0.0)["pending_sessions"] == 1


def test_rows_are_well_formed_and_srx_shaped() -> None:
    table, s = populated()
    table.refresh(UDP_KEY, 2.0, (1, 84, 1, 84))
    row = session_row(s["udp"], 2.0)
    assert row_problem(row) is None
    text = format_sessions([row])
    assert "  In: 10.200.0.2/40001 --> 10.100.0.2/53;udp, If: tun0, Pkts: 1, Bytes: 84" in text
    assert "  Out: 10.100.0.2/53 --> 10.200.0.2/40001;udp, If: eth1, Pkts: 1, Bytes: 84" in text
    assert text.endswith("Total sessions: 1")
    assert row_problem({**row, "in": [17, "x", 1, "10.0.0.1", 2]}) is not None
    assert row_problem({**row, "policy": "a\x1b[2J"}) is not None
    assert row_problem({**row, "timeout": True}) is not None


# --- cost --------------------------------------------------------------------------------------


def test_refresh_pushes_no_timer_and_tick_touches_only_what_is_due() -> None:
    table = SessionTable(FlowSettings(udp=60))
    for n in range(2000):
        opened(table, (17, str(ipaddress.ip_address(0x0A000000 + n)), 1, "10.100.0.2", 53), 0.0)
    heap_size = len(table._heap)
    for n in range(2000):
        table.refresh((17, str(ipaddress.ip_address(0x0A000000 + n)), 1, "10.100.0.2", 53), 30.0)
    assert len(table._heap) == heap_size  # a refresh moves no timer entry
    assert table.tick(59.0) == [] and len(table._heap) == heap_size  # nothing due, nothing done
    assert table.tick(60.0) == [] and len(table._heap) == heap_size  # re-armed at 90, lazily
    assert len(table.tick(90.0)) == 2000 and len(table) == 0


def test_nat_reply_is_its_own_key_and_a_plain_reverse_does_not_match_it() -> None:
    table = SessionTable(FlowSettings())
    init = (17, "10.200.0.2", 40001, "198.51.100.9", 53)
    translated = (17, "198.51.100.9", 53, "192.0.2.1", 61000)  # the answer to the NAT address
    session = opened(table, init, reply=translated)
    assert table.lookup(translated) is session and table.lookup(init) is session
    assert table.lookup((17, "198.51.100.9", 53, "10.200.0.2", 40001)) is None
    plain = opened(table, UDP_KEY)
    assert plain.nat_reply is None and table.lookup(plain.reply) is plain
    assert session_row(session, 0.0)["out"] == list(translated)
    table.clear(parse_words("clear", ["all"])[0])
    assert table.by_key == {}


def test_due_names_what_is_up_and_leaves_it_for_tick() -> None:
    table = SessionTable(FlowSettings(udp=10))
    idle = opened(table, udp(1), 0.0)
    busy = opened(table, udp(2), 0.0)
    table.refresh(udp(2), 5.0)
    assert table.due(10.0) == [idle]
    assert table.due(10.0) == [idle] and len(table) == 2  # nothing removed
    table.refresh(udp(1), 10.0)  # the source found traffic after all
    assert table.tick(10.0) == [] and table.due(15.0) == [busy]
    assert closed_ids(table.tick(20.0)) == {idle.id, busy.id}
