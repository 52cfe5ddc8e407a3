"""The userspace dataplane's own per-flow cache, and its batches to the flow service.

docs/flow-sessions.md ("Where sessions come from", `dataplane`). The flow service owns the
session table, the timers and the commands; the dataplane keeps only what it needs per
packet, here:

- `FlowCache.packet(...)`: one dict lookup by 5-tuple (both directions of a flow are keys of
  the same entry), counters each way, the TCP handshake/FIN/RST noted; a verdict-refused
  flow's packets and new flows while the table is full are dropped here and counted.
- `FlowCache.batches(now)`: what goes on the bus, `FlowEvents` of at most `MAX_ITEMS` items:
  first packets and TCP state changes promptly (`PROMPT` s after the first pending one),
  refreshes (counter totals) of the flows that saw traffic, every `REFRESH` s. Nothing per
  packet: a flow that saw ten thousand packets since the last refresh is one item.
- `FlowCache.verdicts(message)`: `FlowVerdicts` from the flow service, checked whole
  before any is applied (a malformed message changes nothing, counted).
- Tunnel sessions: the gateway's own ESP flow of each child (ESP in UDP on the NAT-T ports,
  which IKE shares, or IP protocol 50), reported with `tunnel=True`; a verdict never cuts
  them (the next ESP packet reports them again).

- TCP checks (docs/flow-sessions.md "TCP checks"): `FlowCache.packet` drops a TCP segment
  whose sequence number is far outside its session's window (`flow.drop.tcp_sequence`,
  unless `no-sequence-check`); `clamp_mss` lowers the MSS option of a SYN or SYN-ACK to
  `tcp-mss`. Both read a bounded number of header bytes.
- ICMP errors (docs/flow-sessions.md "ICMP errors"): counted in the session of the flow
  whose packet they carry, never a flow of their own; about no flow held: dropped
  (`flow.drop.icmp_error`).

Sans-I/O: callers pass `now` (monotonic seconds). Per packet the work is a header parse and
O(1) dict work whatever the number of flows; `sweep(now)` forgets flows idle past every
timeout the flow service could apply, a bounded number per call.
"""

from __future__ import annotations

import ipaddress
from collections import Counter, deque
from collections.abc import Iterator

from ikefarm.proto.messages import (
    FlowChange,
    FlowEvents,
    FlowOpen,
    FlowRefresh,
    FlowTuple,
    FlowVerdicts,
)
from ikefarm.shared.flow.settings import FlowSettings

TCP, UDP, ICMP, ICMP6, ESP, SCTP = 6, 17, 1, 58, 50, 132
PORTED = (TCP, UDP, SCTP)
ECHO = {ICMP: (8, 0), ICMP6: (128, 129)}  # echo request/reply types: identifier as ports
# error types that carry the header of the packet they report on: destination unreachable,
# source quench, redirect, time exceeded, parameter problem (RFC 792); destination
# unreachable, packet too big, time exceeded, parameter problem (RFC 4443 2.1, 3)
ERRORS = {ICMP: (3, 4, 5, 11, 12), ICMP6: (1, 2, 3, 4)}
NOT_A_FLOW: Key = (-1, b"", 0, b"", 0)  # an ICMP error whose embedded packet is unreadable
FIN, SYN, RST, ACK = 0x01, 0x02, 0x04, 0x10
FLAG_LETTERS = ((FIN, "F"), (SYN, "S"), (RST, "R"), (0x08, "P"), (ACK, "A"), (0x20, "U"))

PROMPT = 0.05  # s: opened flows and TCP changes wait at most this long for a batch
REFRESH = 1.0  # s between refresh batches (well below the 4 s minimum timeouts)
MAX_ITEMS = 512  # items per FlowEvents message (about 100 KB, far below the envelope's bound)
SWEEP = 256  # entries looked at per sweep call
REFUSED_HOLD = 10.0  # s a refused flow's packets are dropped without asking again
GRACE = 60.0  # s past the longest timeout before the cache forgets a silent flow itself
CLOSING = ("aged", "cleared", "handshake-timeout", "leaf")
REFUSING = ("max-sessions", "no-syn")
MAX_VERDICTS = 65536

# (protocol, packed source, source port, packed destination, destination port)
Key = tuple[int, bytes, int, bytes, int]

# TCP handshake progress of an entry
_SYN_SENT, _SYN_ACKED, _DONE = 1, 2, 3

# Sequence check: the window scale option is not tracked; every advertised window is taken at
# the largest scale RFC 7323 2.3 allows (14), and a segment up to that much before the last
# ACK (a retransmission) is accepted too (docs/flow-sessions.md "TCP checks").
MAX_SCALE = 14
MSS_KIND, EOL, NOP = 2, 0, 1


def reverse(key: Key) -> Key:
    return (key[0], key[3], key[4], key[1], key[2])


def parse(packet: bytes) -> tuple[Key, int] | None:
    """(5-tuple, TCP flags) of an IPv4/IPv6 packet; None when too short for its header.

    Ports for TCP/UDP/SCTP, the echo identifier as both ports for ICMP echo (as the flow
    table expects), 0 otherwise and for fragments after the first. IPv6 extension headers
    are not walked: the protocol is the first Next Header.
    """
    if not packet:
        return None
    version = packet[0] >> 4
    if version == 4:
        header = (packet[0] & 0x0F) * 4
        if header < 20 or len(packet) < header:
            return None
        protocol, src, dst = packet[9], packet[12:16], packet[16:20]
        if int.from_bytes(packet[6:8], "big") & 0x1FFF:  # a later fragment: no ports
            return (protocol, src, 0, dst, 0), 0
    elif version == 6:
        if len(packet) < 40:
            return None
        header, protocol, src, dst = 40, packet[6], packet[8:24], packet[24:40]
    else:
        return None
    transport = packet[header : header + 14]
    if protocol in PORTED and len(transport) >= 4:
        sport, dport = int.from_bytes(transport[0:2], "big"), int.from_bytes(transport[2:4], "big")
        flags = transport[13] if protocol == TCP and len(transport) >= 14 else 0
        return (protocol, src, sport, dst, dport), flags
    if protocol in ECHO and len(transport) >= 6 and transport[0] in ECHO[protocol]:
        ident = int.from_bytes(transport[4:6], "big")
        return (protocol, src, ident, dst, ident), 0
    return (protocol, src, 0, dst, 0), 0


def _tcp_offset(packet: bytes) -> int | None:
    """Where the TCP header of an IPv4/IPv6 packet starts (not a later fragment), or None."""
    version = packet[0] >> 4 if packet else 0
    if version == 4:
        header = (packet[0] & 0x0F) * 4
        if header < 20 or len(packet) < header or packet[9] != TCP:
            return None
        if int.from_bytes(packet[6:8], "big") & 0x1FFF:
            return None
    elif version == 6 and len(packet) >= 40 and packet[6] == TCP:
        header = 40
    else:
        return None
    return header if len(packet) >= header + 20 else None


def clamp_mss(packet: bytes, mss: int) -> bytes:
    """`packet` with the MSS option of a TCP SYN (or SYN-ACK) lowered to `mss` when larger,
    the TCP checksum fixed incrementally (RFC 1624 eqn. 3); any other packet unchanged (the
    same object). The options are walked within the header's data offset, at most 40 bytes."""
    start = _tcp_offset(packet)
    if start is None or not packet[start + 13] & SYN:
        return packet
    end = start + (packet[start + 12] >> 4) * 4
    if end > len(packet):
        return packet
    at = start + 20
    while at < end:
        kind = packet[at]
        if kind == EOL:
            break
        if kind == NOP:
            at += 1
            continue
        if at + 1 >= end:
            break
        length = packet[at + 1]
        if length < 2 or at + length > end:
            break
        if kind == MSS_KIND and length == 4:
            old = int.from_bytes(packet[at + 2 : at + 4], "big")
            if old <= mss:
                return packet
            out = bytearray(packet)
            out[at + 2 : at + 4] = mss.to_bytes(2, "big")
            old_word, new_word = old, mss
            if (at + 2 - start) & 1:  # straddles two 16-bit words: the sum sees it swapped
                old_word, new_word = _swap(old), _swap(mss)
            check = int.from_bytes(packet[start + 16 : start + 18], "big")
            total = (~check & 0xFFFF) + (~old_word & 0xFFFF) + new_word
            total = (total & 0xFFFF) + (total >> 16)
            total = (total & 0xFFFF) + (total >> 16)
            out[start + 16 : start + 18] = (~total & 0xFFFF).to_bytes(2, "big")
            return bytes(out)
        at += length
    return packet


def _swap(word: int) -> int:
    return ((word & 0xFF) << 8) | (word >> 8)


def _in_window(seq: int, ack: int, window: int) -> bool:
    """RFC 793 3.3 segment acceptability, generously: `seq` within the largest window the
    other side advertised (taken at scale MAX_SCALE) after its last ACK, or up to that much
    before the ACK (a retransmission, or an ACK seen out of order); modulo 2^32."""
    bound = max(window, 1) << MAX_SCALE
    distance = (seq - ack) & 0xFFFFFFFF
    return distance <= bound or 0x100000000 - distance <= bound


def icmp_error(packet: bytes, key: Key) -> tuple[Key, int] | None:
    """For an ICMP/ICMPv6 error (`key` is its parse()): the 5-tuple of the packet it reports
    on, as that packet went, and where that packet's transport header starts in `packet`
    (RFC 792: an error carries the IP header and the first 8 octets of data of what it
    reports on; RFC 4443 2.4 (c): as much of it as fits). None when `packet` is not an error;
    (NOT_A_FLOW, 0) when the embedded packet is short of those 8 octets, of the other family,
    or was not sent by the error's destination (an error goes back to the source)."""
    protocol, v6 = key[0], len(key[1]) == 16
    if (protocol == ICMP6) != v6:
        return None
    if v6:
        header = 40
    else:
        header = (packet[0] & 0x0F) * 4
        if int.from_bytes(packet[6:8], "big") & 0x1FFF:  # a later fragment
            return None
    if len(packet) < header + 8 or packet[header] not in ERRORS[protocol]:
        return None
    start = header + 8
    inner = parse(packet[start : start + 68])  # at most a 60-octet IPv4 header and 8 more
    if inner is None:
        return NOT_A_FLOW, 0
    embedded = inner[0]
    transport = start + (40 if v6 else (packet[start] & 0x0F) * 4)
    if len(embedded[1]) != len(key[1]) or embedded[1] != key[3] or len(packet) < transport + 8:
        return NOT_A_FLOW, 0
    return embedded, transport


def flag_letters(flags: int) -> str:
    return "".join(letter for bit, letter in FLAG_LETTERS if flags & bit)


def flow_tuple(key: Key) -> FlowTuple:
    return FlowTuple(
        protocol=key[0],
        src=str(ipaddress.ip_address(key[1])),
        sport=key[2],
        dst=str(ipaddress.ip_address(key[3])),
        dport=key[4],
    )


def packed(address: str) -> bytes:
    return ipaddress.ip_address(address).packed


class FlowEntry:
    """One flow the dataplane has seen. `init` is its first packet's tuple; "in" counters
    are that direction's, "out" the answer's."""

    __slots__ = (
        "bytes_in",
        "bytes_out",
        "dirty",
        "egress",
        "fins",
        "first",
        "handshake",
        "ingress",
        "init",
        "last",
        "packets_in",
        "packets_out",
        "peer_ack",
        "policy",
        "refused",
        "reported",
        "rst",
        "syn",
        "tunnel",
        "users",
    )

    def __init__(self, init: Key, now: float, ingress: str, egress: str, policy: str) -> None:
        self.init = init
        self.first = self.last = now
        self.ingress, self.egress, self.policy = ingress, egress, policy
        self.packets_in = self.bytes_in = self.packets_out = self.bytes_out = 0
        self.dirty = False  # saw traffic since the last refresh batch
        self.reported = False  # its `opened` is queued or sent
        self.refused = 0.0  # until when its packets are dropped (a refusal verdict)
        self.syn = ""  # the first packet's TCP flags
        self.handshake = 0
        self.fins = 0  # 1: a FIN went the init way, 2: the other way
        self.rst = False
        self.tunnel = False
        self.users = 0  # children sharing a tunnel session
        # sequence check (TCP only, made at the first ACK): per direction (index 1 the init
        # way, 2 the answer), the other side's last ACK and largest window, None until it
        # sent one
        self.peer_ack: list[tuple[int, int] | None] | None = None


class FlowCache:
    """Flows of the userspace dataplane; see the module docstring."""

    def __init__(
        self,
        settings: FlowSettings,
        instance: str,
        counters: Counter[str] | None = None,
    ) -> None:
        self.instance = instance
        self.counters: Counter[str] = counters if counters is not None else Counter()
        self.no_syn_check = settings.no_syn_check
        self.sequence_check = not settings.no_sequence_check
        self.tcp_mss = settings.tcp_mss  # None: no clamping
        self.limit = settings.max_sessions
        timeouts = [settings.tcp, settings.udp, settings.icmp, settings.other]
        timeouts += [app.inactivity_timeout for app in settings.applications]
        self.idle_limit = max(timeouts) + GRACE
        self.entries: dict[Key, FlowEntry] = {}  # both directions of each flow
        self.count = 0  # flows held (entries counted once)
        self.table_full = False  # the flow service's last word
        self.verdict_seq = 0
        self._order: deque[FlowEntry] = deque()  # every flow, for the bounded sweep
        self._opened: list[FlowEntry] = []
        self._changes: list[tuple[Key, str, str, float]] = []  # (init, change, direction, when)
        self._dirty: list[FlowEntry] = []
        self._prompt_since: float | None = None
        self._last_refresh = 0.0
        self._seq = 0

    def __len__(self) -> int:
        return self.count

    # --- per packet ----------------------------------------------------------------------------

    def packet(self, packet: bytes, now: float, ingress: str, egress: str, policy: str) -> bool:
        """Account one inner packet (after decryption, or before encryption); False: drop it
        (counted under `flow.drop.<reason>`)."""
        parsed = parse(packet)
        if parsed is None:
            self.counters["flow.drop.malformed"] += 1
            return False
        key, flags = parsed
        if key[0] in ERRORS and key[2] == 0:
            error = icmp_error(packet, key)
            if error is not None:
                return self._icmp_error(packet, *error, now)
        entry = self.entries.get(key)
        if entry is None:
            entry = self._open(key, flags, now, ingress, egress, policy)
            if entry is None:
                return False
        elif entry.refused:
            if now < entry.refused:
                self.counters["flow.drop.refused"] += 1
                return False
            self._forget(entry)  # held long enough: the next packet asks again
            return self.packet(packet, now, ingress, egress, policy)
        direction = 1 if key is entry.init or key == entry.init else 2
        if (
            flags
            and key[0] == TCP
            and self.sequence_check
            and not self._sequence(entry, packet, flags, direction)
        ):
            self.counters["flow.drop.tcp_sequence"] += 1
            return False
        self._account(entry, direction, len(packet), now)
        if flags and key[0] == TCP:
            self._tcp(entry, flags, direction, now)
        return True

    def _account(self, entry: FlowEntry, direction: int, size: int, now: float) -> None:
        if direction == 1:
            entry.packets_in += 1
            entry.bytes_in += size
        else:
            entry.packets_out += 1
            entry.bytes_out += size
        entry.last = now
        if not entry.dirty:
            entry.dirty = True
            self._dirty.append(entry)

    def _icmp_error(self, packet: bytes, embedded: Key, transport: int, now: float) -> bool:
        """An ICMP error belongs to the session of the flow it reports on (docs/flow-sessions.md
        "ICMP errors"): counted there, the way back from the packet it carries; it never opens
        a session of its own. One about no flow the cache holds, or about a TCP segment outside
        that flow's window (RFC 5927 4.1, with the sequence check on), is dropped."""
        entry = self.entries.get(embedded)
        if entry is None or entry.tunnel:
            self.counters["flow.drop.icmp_error"] += 1
            return False
        if entry.refused:
            self.counters["flow.drop.refused"] += 1
            return False
        sent = 1 if embedded is entry.init or embedded == entry.init else 2
        if embedded[0] == TCP and self.sequence_check and entry.peer_ack is not None:
            known = entry.peer_ack[sent]
            seq = int.from_bytes(packet[transport + 4 : transport + 8], "big")
            if known is not None and not _in_window(seq, *known):
                self.counters["flow.drop.tcp_sequence"] += 1
                return False
        self._account(entry, 3 - sent, len(packet), now)
        return True

    def _sequence(self, entry: FlowEntry, packet: bytes, flags: int, direction: int) -> bool:
        """False: the segment is outside its window (docs/flow-sessions.md "TCP checks").
        Lenient until the other side has sent an ACK; a SYN is not checked (it picks its
        sequence number, so what the other side acknowledged of this direction is forgotten).
        Notes this segment's ACK and the largest window this side advertised, for the other
        direction: a window that shrinks (to zero, say) does not make the data already in
        flight, or its retransmission, look out of window."""
        start = _tcp_offset(packet)
        if start is None:
            return True
        peer_ack = entry.peer_ack
        if flags & SYN:
            if peer_ack is not None:
                peer_ack[direction] = None
        elif peer_ack is not None:
            known = peer_ack[direction]
            seq = int.from_bytes(packet[start + 4 : start + 8], "big")
            if known is not None and not _in_window(seq, *known):
                return False
        if flags & ACK:
            if peer_ack is None:
                peer_ack = entry.peer_ack = [None, None, None]
            ack = int.from_bytes(packet[start + 8 : start + 12], "big")
            window = int.from_bytes(packet[start + 14 : start + 16], "big")
            before = peer_ack[3 - direction]
            if before is not None and before[1] > window and not flags & SYN:
                window = before[1]  # a SYN-ACK starts the other side's numbers afresh
            peer_ack[3 - direction] = (ack, window)
        return True

    def _open(
        self, key: Key, flags: int, now: float, ingress: str, egress: str, policy: str
    ) -> FlowEntry | None:
        if key[0] == TCP and not self.no_syn_check and flags & (SYN | ACK) != SYN:
            # not a SYN: the flow service would refuse it (seed 003 syn check); the packet of
            # a cleared or aged TCP session ends here too
            self.counters["flow.drop.no_syn"] += 1
            return None
        if self.table_full:
            self.counters["flow.drop.table_full"] += 1
            return None
        if self.count >= self.limit * 2:  # refused entries and verdicts in flight included
            self.counters["flow.drop.cache_full"] += 1
            return None
        entry = FlowEntry(key, now, ingress, egress, policy)
        entry.syn = flag_letters(flags) if key[0] == TCP else ""
        if key[0] == TCP and flags & (SYN | ACK) == SYN:
            entry.handshake = _SYN_SENT
        self._add(entry)
        self._queue_open(entry, now)
        self.counters["flow.opened"] += 1
        return entry

    def _add(self, entry: FlowEntry) -> None:
        self.entries[entry.init] = entry
        self.entries[reverse(entry.init)] = entry
        self.count += 1
        self._order.append(entry)

    def _queue_open(self, entry: FlowEntry, now: float) -> None:
        entry.reported = True
        self._opened.append(entry)
        if self._prompt_since is None:
            self._prompt_since = now

    def _tcp(self, entry: FlowEntry, flags: int, direction: int, now: float) -> None:
        """The handshake (SYN, SYN-ACK, then an ACK from the opening end), FIN each way,
        RST: each reported once."""
        if entry.handshake == _SYN_SENT and direction == 2 and flags & (SYN | ACK) == SYN | ACK:
            entry.handshake = _SYN_ACKED
        elif entry.handshake == _SYN_ACKED and direction == 1 and flags & (SYN | ACK) == ACK:
            entry.handshake = _DONE
            self._change(entry, "established", direction, now)
        if flags & FIN and not entry.fins & direction:
            entry.fins |= direction
            self._change(entry, "fin", direction, now)
        if flags & RST and not entry.rst:
            entry.rst = True
            self._change(entry, "rst", direction, now)

    def _change(self, entry: FlowEntry, change: str, direction: int, now: float) -> None:
        self._changes.append((entry.init, change, "in" if direction == 1 else "out", now))
        if self._prompt_since is None:
            self._prompt_since = now

    # --- tunnel sessions -------------------------------------------------------------------------

    def tunnel_up(self, key: Key, now: float, label: str) -> FlowEntry:
        """The outer ESP flow of a child (remote -> local); children sharing it count."""
        entry = self.entries.get(key)
        if entry is None or not entry.tunnel:
            if entry is not None:
                self._forget(entry)
            entry = FlowEntry(key, now, "", "", label)
            entry.tunnel = True
            self._add(entry)
            self._queue_open(entry, now)
        entry.users += 1
        return entry

    def tunnel_down(self, entry: FlowEntry) -> None:
        entry.users -= 1
        if entry.users <= 0 and self.entries.get(entry.init) is entry:
            self._forget(entry)

    def tunnel_packet(self, entry: FlowEntry, size: int, inbound: bool, now: float) -> None:
        """An ESP packet of the tunnel session (inbound: from the peer, the "in" way)."""
        if inbound:
            entry.packets_in += 1
            entry.bytes_in += size
        else:
            entry.packets_out += 1
            entry.bytes_out += size
        entry.last = now
        if not entry.reported:  # the flow service aged or refused it: report it again
            if now >= entry.refused:
                self._queue_open(entry, now)
        elif not entry.dirty:
            entry.dirty = True
            self._dirty.append(entry)

    # --- verdicts -------------------------------------------------------------------------------

    def verdicts(self, message: FlowVerdicts, now: float) -> int:
        """Apply the flow service's verdicts; the number applied. A malformed message is
        refused whole (ValueError, nothing changed)."""
        items = _checked(message)
        if message.seq <= self.verdict_seq:
            self.counters["flow.verdicts.out_of_order"] += 1
        self.verdict_seq = max(self.verdict_seq, message.seq)
        self.table_full = bool(message.table_full)
        applied = 0
        for key, reason in items:
            entry = self.entries.get(key)
            if entry is None:
                self.counters["flow.verdicts.unknown"] += 1
                continue
            applied += 1
            if entry.tunnel:
                entry.reported = False  # never cut: the next ESP packet reports it again
                if reason in REFUSING:  # a full table: not before REFUSED_HOLD s
                    entry.refused = now + REFUSED_HOLD
            elif reason in REFUSING:
                entry.refused = now + REFUSED_HOLD
                self.counters[f"flow.refused.{reason}"] += 1
            else:
                self._forget(entry)
                self.counters[f"flow.closed.{reason}"] += 1
        return applied

    def _forget(self, entry: FlowEntry) -> None:
        for key in (entry.init, reverse(entry.init)):
            if self.entries.get(key) is entry:
                del self.entries[key]
        if entry.users >= 0 and self.count > 0:
            self.count -= 1
        entry.users = -1  # gone: the sweep and the batcher skip it
        entry.reported = True

    def sweep(self, now: float) -> int:
        """Look at up to SWEEP flows (round robin): forget those the cache holds no more (gone,
        a refusal served, silent past every timeout). Returns how many were forgotten."""
        forgotten = 0
        order = self._order
        for _ in range(min(SWEEP, len(order))):
            entry = order.popleft()
            if entry.users < 0:
                continue
            if entry.tunnel:
                order.append(entry)  # until its children are gone
                continue
            if entry.refused and now >= entry.refused:
                self._forget(entry)
            elif now - entry.last > self.idle_limit:
                self._forget(entry)
                self.counters["flow.expired"] += 1
            else:
                order.append(entry)
                continue
            forgotten += 1
        return forgotten

    # --- batches --------------------------------------------------------------------------------

    def batches(self, now: float) -> list[FlowEvents]:
        """What to publish now (possibly nothing): pending opens and changes once PROMPT s
        passed since the first of them (or a batch is full), refreshes every REFRESH s."""
        prompt = self._prompt_since is not None and (
            now - self._prompt_since >= PROMPT
            or len(self._opened) + len(self._changes) >= MAX_ITEMS
        )
        refresh = now - self._last_refresh >= REFRESH and bool(self._dirty)
        if not prompt and not refresh:
            return []
        opened: list[FlowOpen] = []
        for entry in self._opened:
            if entry.users < 0:
                continue  # forgotten before it was reported
            opened.append(self._open_item(entry, now))
        changes = [
            FlowChange(flow_tuple(init), change, direction, _age(now - when))
            for init, change, direction, when in self._changes
        ]
        self._opened, self._changes, self._prompt_since = [], [], None
        refreshes: list[FlowRefresh] = []
        if refresh:
            self._last_refresh = now
            for entry in self._dirty:
                if entry.users < 0 or not entry.dirty:
                    continue
                entry.dirty = False
                refreshes.append(
                    FlowRefresh(
                        init=flow_tuple(entry.init),
                        idle=_age(now - entry.last),
                        packets_in=entry.packets_in,
                        bytes_in=entry.bytes_in,
                        packets_out=entry.packets_out,
                        bytes_out=entry.bytes_out,
                    )
                )
            self._dirty = []
        return list(self._cut(opened, changes, refreshes))

    def _open_item(self, entry: FlowEntry, now: float) -> FlowOpen:
        return FlowOpen(
            init=flow_tuple(entry.init),
            ingress=entry.ingress,
            egress=entry.egress,
            policy=entry.policy,
            tcp_flags=entry.syn,
            tunnel=entry.tunnel,
            age=_age(now - entry.first),
        )

    def _cut(
        self, opened: list[FlowOpen], changes: list[FlowChange], refreshes: list[FlowRefresh]
    ) -> Iterator[FlowEvents]:
        """Messages of at most MAX_ITEMS items, in order: opened, changes, refreshes."""
        items: list[FlowOpen | FlowChange | FlowRefresh] = [*opened, *changes, *refreshes]
        for start in range(0, len(items), MAX_ITEMS):
            chunk = items[start : start + MAX_ITEMS]
            self._seq += 1
            yield FlowEvents(
                instance=self.instance,
                seq=self._seq,
                opened=[i for i in chunk if isinstance(i, FlowOpen)],
                changes=[i for i in chunk if isinstance(i, FlowChange)],
                refreshes=[i for i in chunk if isinstance(i, FlowRefresh)],
            )


def _checked(message: FlowVerdicts) -> list[tuple[Key, str]]:
    """Every verdict checked before any is applied; ValueError names the first problem."""
    seq, closed = message.seq, message.closed
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
        raise ValueError("seq must be a non-negative integer")
    if not isinstance(message.table_full, bool):
        raise ValueError("table_full must be a boolean")
    if not isinstance(closed, list) or len(closed) > MAX_VERDICTS:
        raise ValueError(f"closed: a list of at most {MAX_VERDICTS}")
    out: list[tuple[Key, str]] = []
    for index, verdict in enumerate(closed):
        reason = getattr(verdict, "reason", None)
        if reason not in CLOSING and reason not in REFUSING:
            raise ValueError(f"closed[{index}].reason: unknown")
        raw = getattr(verdict, "init", None)
        protocol = getattr(raw, "protocol", None)
        sport, dport = getattr(raw, "sport", None), getattr(raw, "dport", None)
        for value, limit in ((protocol, 255), (sport, 65535), (dport, 65535)):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
                raise ValueError(f"closed[{index}].init: protocol or port out of range")
        try:
            if not isinstance(raw.src, str) or not isinstance(raw.dst, str):  # type: ignore[union-attr]
                raise TypeError
            src, dst = packed(raw.src), packed(raw.dst)  # type: ignore[union-attr]
        except (ValueError, TypeError, AttributeError):
            raise ValueError(f"closed[{index}].init: not an IP address") from None
        if len(src) != len(dst):
            raise ValueError(f"closed[{index}].init: addresses of two families")
        out.append(((protocol, src, sport, dst, dport), reason))  # type: ignore[arg-type]
    return out


def _age(seconds: float) -> float:
    """Seconds as the flow service takes them (0 to a day)."""
    return min(max(seconds, 0.0), 86400.0)
