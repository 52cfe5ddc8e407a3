"""Kernel conntrack entries as flow sessions (`[flow] source = "netlink"`; docs/flow-sessions.md).

Sans-I/O: `parse_entry` turns one ctnetlink message (a pyroute2 `nfct_msg`, from an NFCT
event or a dump) into a `CtEntry`, or None for what is not a usable session; `apply_event`
and `apply_dump` feed the session table. The sockets live in `services/flow/conntrack.py`.

Mapping (our choices, documented): a conntrack entry is one session, its original tuple the
session's `in` side and its reply tuple the `out` side (NAT shows as it is); ICMP echo has the
identifier as both ports; the TCP state of conntrack drives the table's handshake, FIN and
RST handling; the kernel's accounting gives the counters.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from ikefarm.shared.flow.settings import ICMP, ICMP6, TCP
from ikefarm.shared.flow.table import (
    INIT,
    REPLY,
    SOURCE_GONE,
    Closed,
    FiveTuple,
    Refused,
    Session,
    SessionTable,
)

# ctnetlink message types (linux/netfilter/nfnetlink_conntrack.h), subsystem 1 in the high byte
IPCTNL_MSG_CT_NEW, IPCTNL_MSG_CT_DELETE = 0, 2
NLM_F_CREATE = 0x400
# enum tcp_conntrack (linux/netfilter/nf_conntrack_tcp.h)
TCP_SYN_SENT, TCP_SYN_RECV, TCP_ESTABLISHED, TCP_FIN_WAIT = 1, 2, 3, 4
TCP_CLOSE_WAIT, TCP_LAST_ACK, TCP_TIME_WAIT, TCP_CLOSE, TCP_SYN_SENT2 = 5, 6, 7, 8, 9
HANDSHAKE_STATES = (TCP_SYN_SENT, TCP_SYN_RECV, TCP_SYN_SENT2)
ICMP_ECHO_REQUEST = {ICMP: 8, ICMP6: 128}


@dataclass(frozen=True)
class CtEntry:
    init: FiveTuple
    reply: FiveTuple
    tcp_state: int | None
    counters: tuple[int, int, int, int] | None  # packets/bytes orig, packets/bytes reply
    timeout: int | None  # seconds the kernel still gives it


def _attr(nla: Any, name: str) -> Any:
    try:
        return nla.get_attr(name) if nla is not None else None
    except (AttributeError, KeyError, TypeError):
        return None


def _tuple(nla: Any) -> FiveTuple | None:
    ip = _attr(nla, "CTA_TUPLE_IP")
    proto = _attr(nla, "CTA_TUPLE_PROTO")
    src = _attr(ip, "CTA_IP_V4_SRC") or _attr(ip, "CTA_IP_V6_SRC")
    dst = _attr(ip, "CTA_IP_V4_DST") or _attr(ip, "CTA_IP_V6_DST")
    number = _attr(proto, "CTA_PROTO_NUM")
    if src is None or dst is None or not isinstance(number, int):
        return None
    try:
        src, dst = str(ipaddress.ip_address(src)), str(ipaddress.ip_address(dst))
    except ValueError:
        return None
    if number in (ICMP, ICMP6):
        ident = _attr(proto, "CTA_PROTO_ICMP_ID") or _attr(proto, "CTA_PROTO_ICMPV6_ID") or 0
        return (number, src, ident, dst, ident)
    sport = _attr(proto, "CTA_PROTO_SRC_PORT") or 0
    dport = _attr(proto, "CTA_PROTO_DST_PORT") or 0
    return (number, src, sport, dst, dport)


def _counters(msg: Any) -> tuple[int, int, int, int] | None:
    orig, reply = _attr(msg, "CTA_COUNTERS_ORIG"), _attr(msg, "CTA_COUNTERS_REPLY")
    if orig is None or reply is None:
        return None
    values = tuple(
        _attr(side, name) or 0
        for side in (orig, reply)
        for name in ("CTA_COUNTERS_PACKETS", "CTA_COUNTERS_BYTES")
    )
    return values  # type: ignore[return-value]


def parse_entry(msg: Any) -> CtEntry | None:
    init = _tuple(_attr(msg, "CTA_TUPLE_ORIG"))
    reply = _tuple(_attr(msg, "CTA_TUPLE_REPLY"))
    if init is None or reply is None:
        return None
    tcp = _attr(_attr(msg, "CTA_PROTOINFO"), "CTA_PROTOINFO_TCP")
    state = _attr(tcp, "CTA_PROTOINFO_TCP_STATE")
    timeout = _attr(msg, "CTA_TIMEOUT")
    return CtEntry(
        init=init,
        reply=reply,
        tcp_state=state if isinstance(state, int) else None,
        counters=_counters(msg),
        timeout=timeout if isinstance(timeout, int) else None,
    )


def event_kind(msg: Any) -> str:
    """ "new", "update" or "destroy" for an NFCT event message."""
    header = msg["header"]
    if header["type"] & 0xFF == IPCTNL_MSG_CT_DELETE:
        return "destroy"
    return "new" if header["flags"] & NLM_F_CREATE else "update"


def is_tunnel(key: FiveTuple, tunnel_ports: tuple[int, ...]) -> bool:
    """The gateway's own IKE/ESP flows: ESP, or UDP to or from the IKE / NAT-T ports."""
    protocol, _src, sport, _dst, dport = key
    return protocol == 50 or (protocol == 17 and (sport in tunnel_ports or dport in tunnel_ports))


def _open(
    table: SessionTable,
    entry: CtEntry,
    now: float,
    tunnel_ports: tuple[int, ...],
    first_packet: bool,
) -> Session | Refused:
    """`first_packet`: a NEW event, whose TCP state says whether the flow began with a SYN
    (no-syn-check decides on the others, like conntrack's mid-stream pickup). An entry found
    by a dump was already running when we looked: it is taken as it is."""
    syn = not first_packet or entry.tcp_state in HANDSHAKE_STATES or entry.tcp_state is None
    session = table.open(
        entry.init, now, reply=entry.reply, syn=syn, tunnel=is_tunnel(entry.init, tunnel_ports)
    )
    if isinstance(session, Session):
        _state(table, session, entry, now)
        if entry.counters is not None:
            table.refresh(entry.init, now, entry.counters)
    return session


def _state(table: SessionTable, session: Session, entry: CtEntry, now: float) -> None:
    """Conntrack's TCP state, as the table's events (FIN direction is approximate: conntrack
    says FIN_WAIT after the first FIN, CLOSE_WAIT/LAST_ACK/TIME_WAIT once both were seen)."""
    state = entry.tcp_state
    if session.protocol != TCP or state is None or state in HANDSHAKE_STATES:
        return
    key = entry.init
    if state == TCP_CLOSE:
        table.handshake_done(key, now)
        table.rst(key, now)
        return
    table.handshake_done(key, now)
    if state == TCP_FIN_WAIT:
        table.fin(key, now, INIT)
    elif state in (TCP_CLOSE_WAIT, TCP_LAST_ACK, TCP_TIME_WAIT):
        table.fin(key, now, INIT)
        table.fin(key, now, REPLY)


def apply_event(
    table: SessionTable, kind: str, entry: CtEntry, now: float, tunnel_ports: tuple[int, ...]
) -> tuple[list[Closed], list[Refused]]:
    """One NFCT event: a new entry opens a session, an update moves its TCP state, a destroy
    (the kernel's own ageing, or `conntrack -D`) removes it."""
    if kind == "destroy":
        return table.forget(entry.init, SOURCE_GONE), []
    session = table.lookup(entry.init)
    if session is None:
        outcome = _open(table, entry, now, tunnel_ports, first_packet=kind == "new")
        return [], [outcome] if isinstance(outcome, Refused) else []
    _state(table, session, entry, now)
    return [], []


def apply_dump(
    table: SessionTable,
    entries: list[CtEntry],
    now: float,
    tunnel_ports: tuple[int, ...],
    started: float | None = None,
) -> tuple[list[Closed], list[Refused], list[tuple[CtEntry, Session]]]:
    """A full dump: entries the table lacks are opened, sessions whose counters moved are
    refreshed, sessions whose entry is gone are removed. Returns what closed, what was
    refused, and the (entry, session) pairs whose kernel timeout is shorter than ours (the
    caller extends those in the kernel, so the table decides when they end). Only sessions
    opened before `started` (when the dump was asked for) can be missing from it."""
    started = now if started is None else started
    seen: set[FiveTuple] = set()
    refused: list[Refused] = []
    short: list[tuple[CtEntry, Session]] = []
    for entry in entries:
        seen.add(entry.init)
        session = table.lookup(entry.init)
        if session is None:
            outcome = _open(table, entry, now, tunnel_ports, first_packet=False)
            if isinstance(outcome, Refused):
                refused.append(outcome)
                continue
            session = outcome
        else:
            _state(table, session, entry, now)
            moved = entry.counters is not None and (
                entry.counters[0] != session.packets_in or entry.counters[2] != session.packets_out
            )
            if moved:
                table.refresh(entry.init, now, entry.counters)
        if entry.timeout is not None and entry.timeout < session.remaining(now):
            short.append((entry, session))
    closed: list[Closed] = []
    gone = [
        s for s in table.sessions() if s.kind != "leaf" and s.init not in seen and s.start < started
    ]
    for session in gone:
        closed += table.forget(session.init, SOURCE_GONE)
    return closed, refused, short
