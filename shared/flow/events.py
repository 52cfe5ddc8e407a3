"""The dataplane's batched session events, checked and then applied to the table.

`check_batch` validates a whole `FlowEvents` batch (addresses, families, protocol and port
ranges, names, counters, ages) and raises `EventError` with a stable code at the first
problem; only a batch that passed is applied (`apply_batch`), so a malformed one changes
nothing. Sans-I/O: the caller passes `now`.
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass, field

from ikefarm.proto.messages import FlowEvents, FlowTuple, FlowVerdict
from ikefarm.shared.flow.settings import ICMP, ICMP6, TCP, UDP
from ikefarm.shared.flow.table import (
    INIT,
    REPLY,
    Closed,
    FiveTuple,
    Refused,
    Session,
    SessionTable,
)

MAX_BATCH_ITEMS = 65536  # per list; the envelope's 1 MiB bound comes first in practice
MAX_NAME_CHARS = 64  # interface, tunnel, policy names
MAX_COUNTER = (1 << 64) - 1
MAX_AGE = 86400.0  # an event older than a day in its own batch is not believed
CHANGES = ("established", "fin", "rst")
DIRECTIONS = {"in": INIT, "out": REPLY}
PORTED = (TCP, UDP, 132)  # protocols whose tuples carry ports (SCTP too)


class EventError(ValueError):
    """A malformed batch; `code` is the drop reason counted by the service."""

    def __init__(self, code: str, text: str) -> None:
        super().__init__(f"{code}: {text}")
        self.code = code
        self.text = text


def five_tuple(raw: FlowTuple, where: str) -> FiveTuple:
    for name in ("protocol", "sport", "dport"):
        value = getattr(raw, name)
        limit = 255 if name == "protocol" else 65535
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
            raise EventError("bad_tuple", f"{where}.{name} out of range 0-{limit}")
    try:
        src = ipaddress.ip_address(raw.src)
        dst = ipaddress.ip_address(raw.dst)
    except (ValueError, TypeError):
        raise EventError("bad_address", f"{where}: not an IP address") from None
    if src.version != dst.version:
        raise EventError("bad_address", f"{where}: source and destination of different families")
    if raw.protocol not in (*PORTED, ICMP, ICMP6) and (raw.sport or raw.dport):
        raise EventError("bad_tuple", f"{where}: protocol {raw.protocol} carries no ports")
    return (raw.protocol, str(src), raw.sport, str(dst), raw.dport)


def to_flow_tuple(key: FiveTuple) -> FlowTuple:
    return FlowTuple(protocol=key[0], src=key[1], sport=key[2], dst=key[3], dport=key[4])


def _name(value: str, where: str, *, empty: bool = True) -> str:
    if not isinstance(value, str) or len(value) > MAX_NAME_CHARS or not value.isprintable():
        raise EventError("bad_name", f"{where}: at most {MAX_NAME_CHARS} printable characters")
    if not empty and not value:
        raise EventError("bad_name", f"{where}: must not be empty")
    return value


def _age(value: float, where: str) -> float:
    if not isinstance(value, float | int) or isinstance(value, bool):
        raise EventError("bad_time", f"{where}: not a number")
    if not math.isfinite(value) or not 0 <= value <= MAX_AGE:
        raise EventError("bad_time", f"{where}: must be 0-{MAX_AGE:g} s")
    return float(value)


def _counter(value: int, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COUNTER:
        raise EventError("bad_counter", f"{where}: must be 0-2^64-1")
    return value


@dataclass
class CheckedBatch:
    opened: list[tuple[FiveTuple, FiveTuple | None, dict[str, object], bool, float]]
    changes: list[tuple[FiveTuple, str, int, float]]
    refreshes: list[tuple[FiveTuple, float, tuple[int, int, int, int]]]


def check_batch(batch: FlowEvents) -> CheckedBatch:
    """Every item checked before any is applied; EventError at the first problem."""
    _name(batch.instance, "instance", empty=False)
    lists = (batch.opened, batch.changes, batch.refreshes)
    if any(len(items) > MAX_BATCH_ITEMS for items in lists):
        raise EventError("too_many", f"at most {MAX_BATCH_ITEMS} items per list")
    checked = CheckedBatch([], [], [])
    for index, item in enumerate(batch.opened):
        where = f"opened[{index}]"
        init = five_tuple(item.init, f"{where}.init")
        reply = five_tuple(item.reply, f"{where}.reply") if item.reply is not None else None
        if reply is not None and (reply[0] != init[0]):
            raise EventError("bad_tuple", f"{where}: reply of another protocol")
        flags = item.tcp_flags
        if not isinstance(flags, str) or len(flags) > 8 or set(flags) - set("SAFRPUEC"):
            raise EventError("bad_flags", f"{where}.tcp_flags: letters of SAFRPUEC")
        attributes: dict[str, object] = {
            "ingress": _name(item.ingress, f"{where}.ingress"),
            "egress": _name(item.egress, f"{where}.egress"),
            "policy": _name(item.policy, f"{where}.policy"),
            "tunnel": bool(item.tunnel),
            "resource_manager": bool(item.resource_manager),
        }
        syn = "S" in flags and "A" not in flags
        checked.opened.append((init, reply, attributes, syn, _age(item.age, f"{where}.age")))
    for index, change in enumerate(batch.changes):
        where = f"changes[{index}]"
        if change.change not in CHANGES:
            raise EventError("bad_change", f"{where}.change: one of {', '.join(CHANGES)}")
        if change.direction not in DIRECTIONS:
            raise EventError("bad_change", f"{where}.direction: in or out")
        checked.changes.append(
            (
                five_tuple(change.init, f"{where}.init"),
                change.change,
                DIRECTIONS[change.direction],
                _age(change.age, f"{where}.age"),
            )
        )
    for index, refresh in enumerate(batch.refreshes):
        where = f"refreshes[{index}]"
        counters = (
            _counter(refresh.packets_in, f"{where}.packets_in"),
            _counter(refresh.bytes_in, f"{where}.bytes_in"),
            _counter(refresh.packets_out, f"{where}.packets_out"),
            _counter(refresh.bytes_out, f"{where}.bytes_out"),
        )
        key = five_tuple(refresh.init, f"{where}.init")
        checked.refreshes.append((key, _age(refresh.idle, f"{where}.idle"), counters))
    return checked


@dataclass
class Applied:
    opened: int = 0
    refused: list[Refused] = field(default_factory=list)
    unknown: int = 0  # changes and refreshes for sessions the table does not hold


def apply_batch(table: SessionTable, batch: CheckedBatch, now: float) -> Applied:
    result = Applied()
    for init, reply, attributes, syn, age in batch.opened:
        outcome = table.open(
            init,
            now - age,
            reply=reply,
            syn=syn,
            ingress=str(attributes["ingress"]),
            egress=str(attributes["egress"]),
            policy=str(attributes["policy"]),
            tunnel=bool(attributes["tunnel"]),
            resource_manager=bool(attributes["resource_manager"]),
        )
        if isinstance(outcome, Refused):
            result.refused.append(outcome)
        else:
            result.opened += 1
    for key, change, direction, age in batch.changes:
        when = now - age
        session: Session | None
        if change == "established":
            session = table.handshake_done(key, when)
        elif change == "fin":
            session = table.fin(key, when, _direction(table, key, direction))
        else:
            session = table.rst(key, when)
        result.unknown += session is None
    for key, idle, counters in batch.refreshes:
        result.unknown += table.refresh(key, now - idle, counters) is None
    return result


def _direction(table: SessionTable, key: FiveTuple, direction: int) -> int:
    """The end that sent the FIN: the event's direction relative to the session's own."""
    session = table.lookup(key)
    if session is not None and key != session.init and key == session.reply:
        return INIT if direction == REPLY else REPLY
    return direction


def verdicts(closed: list[Closed], refused: list[Refused]) -> list[FlowVerdict]:
    """What the dataplane must forget: closed sessions (not multicast leaves, which share
    their template's tuple) and refused flows."""
    out = [
        FlowVerdict(init=to_flow_tuple(c.session.init), reason=c.reason)
        for c in closed
        if c.session.kind != "leaf"
    ]
    out += [FlowVerdict(init=to_flow_tuple(r.key), reason=r.reason) for r in refused]
    return out
