"""Dataplane event batches and conntrack messages, decoded into the session table."""

from __future__ import annotations

import socket

import pytest
from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple, nfct_msg

from ikefarm.proto import envelope
from ikefarm.proto.messages import FlowChange, FlowEvents, FlowOpen, FlowRefresh, FlowTuple
from ikefarm.shared.flow.conntrack import apply_dump, apply_event, parse_entry
from ikefarm.shared.flow.events import EventError, apply_batch, check_batch, verdicts
from ikefarm.shared.flow.settings import FlowSettings
from ikefarm.shared.flow.table import ESTABLISHED, HANDSHAKE, TIME_WAIT, SessionTable

SSH = FlowTuple(6, "10.200.0.2", 40000, "10.100.0.2", 22)
SSH_BACK = FlowTuple(6, "10.100.0.2", 22, "10.200.0.2", 40000)


def batch(**lists: list[object]) -> FlowEvents:
    return FlowEvents(instance="kernel-0", seq=1, **lists)  # type: ignore[arg-type]


def test_a_batch_round_trips_the_envelope_and_applies_in_order() -> None:
    events = batch(
        opened=[FlowOpen(init=SSH, ingress="tun0", egress="eth1", policy="p", tcp_flags="S")],
        changes=[
            FlowChange(init=SSH, change="established"),
            FlowChange(init=SSH, change="fin", direction="in"),
            FlowChange(init=SSH_BACK, change="fin", direction="in"),  # the other end's FIN
        ],
        refreshes=[FlowRefresh(SSH, 0.5, 10, 1000, 8, 900)],
    )
    decoded = envelope.unpack(envelope.pack(events), FlowEvents)
    table = SessionTable(FlowSettings(time_wait_state=10))
    result = apply_batch(table, check_batch(decoded), 50.0)
    assert result.opened == 1 and result.unknown == 0
    (session,) = table.by_id.values()
    assert session.state == TIME_WAIT and session.fins == 3
    assert (session.packets_in, session.bytes_out) == (10, 900)
    assert session.remaining(50.0) == 10


def test_first_packet_flags_decide_the_handshake() -> None:
    table = SessionTable(FlowSettings(no_syn_check=True))
    apply_batch(
        table,
        check_batch(batch(opened=[FlowOpen(init=SSH, ingress="a", egress="b", tcp_flags="A")])),
        0.0,
    )
    assert next(iter(table.by_id.values())).state == ESTABLISHED
    table = SessionTable(FlowSettings())
    result = apply_batch(
        table,
        check_batch(batch(opened=[FlowOpen(init=SSH, ingress="a", egress="b", tcp_flags="SA")])),
        0.0,
    )
    assert len(table) == 0 and [r.reason for r in result.refused] == ["no-syn"]
    assert verdicts([], result.refused)[0].init == SSH


def opening(init: FlowTuple) -> FlowEvents:
    return batch(opened=[FlowOpen(init=init, ingress="", egress="")])


@pytest.mark.parametrize(
    ("events", "code"),
    [
        (opening(FlowTuple(6, "10.0.0.1", 1, "::2", 2)), "bad_address"),
        (opening(FlowTuple(6, "10.0.0.1", 70000, "10.0.0.2", 2)), "bad_tuple"),
        (opening(FlowTuple(47, "10.0.0.1", 5, "10.0.0.2", 0)), "bad_tuple"),
        (batch(opened=[FlowOpen(init=SSH, ingress="x" * 65, egress="")]), "bad_name"),
        (batch(opened=[FlowOpen(init=SSH, ingress="a\x00", egress="")]), "bad_name"),
        (batch(opened=[FlowOpen(init=SSH, ingress="", egress="", tcp_flags="Z")]), "bad_flags"),
        (batch(opened=[FlowOpen(init=SSH, ingress="", egress="", age=float("nan"))]), "bad_time"),
        (batch(changes=[FlowChange(init=SSH, change="fin", direction="sideways")]), "bad_change"),
        (batch(refreshes=[FlowRefresh(SSH, 0.0, -1, 0, 0, 0)]), "bad_counter"),
        (batch(refreshes=[FlowRefresh(SSH, float("inf"), 1, 0, 0, 0)]), "bad_time"),
        (FlowEvents(instance="", seq=1), "bad_name"),
    ],
)  # fmt: skip
def test_malformed_items_refuse_the_batch(events: FlowEvents, code: str) -> None:
    with pytest.raises(EventError) as caught:
        check_batch(events)
    assert caught.value.code == code


# --- conntrack messages (the kernel test drives the real ones) --------------------------------


def ct_message(state: int | None, packets: int = 0, with_reply: bool = True) -> nfct_msg:
    orig = NFCTAttrTuple(
        family=socket.AF_INET, saddr="192.0.2.2", daddr="192.0.2.1", proto=6, sport=40000, dport=22
    )
    attrs = {"tuple_orig": orig}
    if with_reply:
        attrs["tuple_reply"] = orig.reverse()
    msg = nfct_msg.create_from(**attrs)
    if state is not None:
        tcp = {"attrs": [["CTA_PROTOINFO_TCP_STATE", state]]}
        msg["attrs"].append(["CTA_PROTOINFO", {"attrs": [["CTA_PROTOINFO_TCP", tcp]]}])
    if packets:
        for side in ("CTA_COUNTERS_ORIG", "CTA_COUNTERS_REPLY"):
            counters = [["CTA_COUNTERS_PACKETS", packets], ["CTA_COUNTERS_BYTES", packets * 60]]
            msg["attrs"].append([side, {"attrs": counters}])
    msg["attrs"].append(["CTA_TIMEOUT", 120])
    return msg


def decoded(msg: nfct_msg) -> nfct_msg:
    """The message as the kernel would hand it over: encoded, then decoded by pyroute2."""
    msg.encode()
    out = nfct_msg(msg.data)
    out.decode()
    return out


def test_conntrack_states_drive_the_table() -> None:
    table = SessionTable(FlowSettings(time_wait_state=30))
    entry = parse_entry(decoded(ct_message(1)))  # SYN_SENT
    assert entry is not None and entry.init == (6, "192.0.2.2", 40000, "192.0.2.1", 22)
    apply_event(table, "new", entry, 0.0, (500, 4500))
    (session,) = table.by_id.values()
    assert session.state == HANDSHAKE
    apply_event(table, "update", parse_entry(decoded(ct_message(3))), 1.0, ())  # type: ignore[arg-type]
    assert session.state == ESTABLISHED
    apply_event(table, "update", parse_entry(decoded(ct_message(7))), 2.0, ())  # type: ignore[arg-type]
    assert session.state == TIME_WAIT and session.remaining(2.0) == 30
    gone, _ = apply_event(table, "destroy", entry, 3.0, ())
    assert [c.reason for c in gone] == ["source"] and len(table) == 0


def test_dump_opens_refreshes_and_forgets() -> None:
    table = SessionTable(FlowSettings())
    entry = parse_entry(decoded(ct_message(3, packets=5)))
    assert entry is not None and entry.counters == (5, 300, 5, 300)
    closed, refused, short = apply_dump(table, [entry], 10.0, ())
    assert not closed and not refused and len(table) == 1
    (session,) = table.by_id.values()
    assert session.state == ESTABLISHED and session.packets_out == 5
    # the kernel gives it 120 s, the table 1800: the caller is told to extend the entry
    assert [s for _e, s in short] == [session]
    closed, _, _ = apply_dump(table, [], 20.0, ())
    assert [c.reason for c in closed] == ["source"]


def test_malformed_conntrack_messages_are_ignored() -> None:
    assert parse_entry(decoded(ct_message(3, with_reply=False))) is None
    empty = nfct_msg()
    empty.encode()
    assert parse_entry(decoded(empty)) is None
    assert parse_entry(None) is None
