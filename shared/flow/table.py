"""The flow-session table: sessions, their timers, aggressive aging and the commands.

Semantics are seed 003's (Junos SRX flow-based sessions), described in our words in
docs/flow-sessions.md. Sans-I/O: every call takes `now` (monotonic seconds); what leaves
the table comes back to the caller as `Closed` records, so a dataplane or conntrack can
drop its own state.

Cost: every per-flow operation (open, refresh, state change) is O(1) in the table size
apart from a heap push (O(log n)) when a deadline moves *earlier* (handshake done,
invalidation, FIN). A refresh only moves a deadline later, so it touches no timer: the
heap holds at most one live entry per session, scheduled at or before the session's
deadline, and a popped entry whose session has moved on is pushed again at the new
deadline (lazy timers). `tick(now)` therefore costs in proportion to the entries that
come due, never to the table.
"""

from __future__ import annotations

import heapq
import ipaddress
import itertools
from collections.abc import Iterator
from dataclasses import dataclass

from ikefarm.shared.flow.settings import TCP, Application, FlowSettings, protocol_name

# (protocol, source address, source port, destination address, destination port)
FiveTuple = tuple[int, str, int, str, int]

UNICAST, TEMPLATE, LEAF = "unicast", "template", "leaf"
# TCP states (docs/flow-sessions.md): handshake until both SYNs were acknowledged
HANDSHAKE, ESTABLISHED, FIN_WAIT, TIME_WAIT, ACTIVE = (
    "handshake",
    "established",
    "fin-wait",
    "time-wait",
    "active",
)
INIT, REPLY = 1, 2  # directions: the packet went the session's way (in), or back (out)
NEVER = float("inf")
TUNNEL_ROLE, RESOURCE_MANAGER_ROLE = "tunnel", "resource-manager"

# why a session left the table (Closed.reason) or was never made (refusal counters)
AGED, CLEARED, HANDSHAKE_TIMEOUT, TEMPLATE_GONE = "aged", "cleared", "handshake-timeout", "leaf"
SOURCE_GONE = "source"  # the source (conntrack) removed the flow itself
REFUSED_FULL, REFUSED_NO_SYN = "max-sessions", "no-syn"


def reverse(key: FiveTuple) -> FiveTuple:
    protocol, src, sport, dst, dport = key
    return (protocol, dst, dport, src, sport)


def is_multicast(address: str) -> bool:
    return ipaddress.ip_address(address).is_multicast


class Session:
    """One flow. Counters are totals since the session opened, each direction."""

    __slots__ = (
        "alive",
        "application",
        "bytes_in",
        "bytes_out",
        "deadline",
        "egress",
        "fins",
        "group",
        "id",
        "ingress",
        "init",
        "kind",
        "nat_reply",
        "packets_in",
        "packets_out",
        "policy",
        "role",
        "scheduled",
        "start",
        "state",
        "timeout",
        "valid",
    )

    def __init__(self, session_id: int, init: FiveTuple, reply: FiveTuple, now: float) -> None:
        self.id = session_id
        self.init = init
        # the answer's tuple when it is not the opening one reversed (NAT); None saves a tuple
        self.nat_reply = reply if reply != reverse(init) else None
        self.ingress = ""
        self.egress = ""
        self.policy = ""
        self.application = ""
        self.kind = UNICAST
        self.role = ""  # TUNNEL_ROLE, RESOURCE_MANAGER_ROLE or "" (one slot for both flags)
        # a template's leaves (by egress) or a leaf's template, None for a unicast session:
        # one slot for both keeps a session at 208 bytes (ops/bench/RESULTS.md)
        self.group: dict[str, Session] | Session | None = None
        self.state = ACTIVE
        self.valid = True
        self.fins = 0  # INIT | REPLY: which ends sent a FIN
        self.timeout = 0  # seconds of inactivity the session lives (the one now in force)
        self.deadline = NEVER
        self.scheduled = NEVER  # the time of this session's live heap entry
        self.start = now
        self.packets_in = self.bytes_in = self.packets_out = self.bytes_out = 0
        self.alive = True

    def __lt__(self, other: Session) -> bool:
        """Never: heap entries of equal time and ID (a stale and a live one) stay unordered."""
        return False

    @property
    def template(self) -> Session | None:
        """A leaf's template session."""
        group = self.group
        return group if isinstance(group, Session) else None

    @template.setter
    def template(self, template: Session | None) -> None:
        self.group = template

    @property
    def leaves(self) -> dict[str, Session] | None:
        """A template's leaves, by outgoing interface or tunnel."""
        group = self.group
        return group if isinstance(group, dict) else None

    @leaves.setter
    def leaves(self, leaves: dict[str, Session] | None) -> None:
        self.group = leaves

    @property
    def tunnel(self) -> bool:
        """An IKE/ESP flow of the gateway itself."""
        return self.role is TUNNEL_ROLE

    @property
    def resource_manager(self) -> bool:
        """A flow a dataplane opened on its own behalf (a pinhole)."""
        return self.role is RESOURCE_MANAGER_ROLE

    @property
    def reply(self) -> FiveTuple:
        return self.nat_reply if self.nat_reply is not None else reverse(self.init)

    @property
    def protocol(self) -> int:
        return self.init[0]

    def remaining(self, now: float) -> int:
        """Seconds left, as `show` prints it; -1 for a leaf (it lives as long as its template)."""
        if self.kind == LEAF:
            return -1
        return max(0, int(self.deadline - now + 0.999))


@dataclass(frozen=True)
class Closed:
    """A session that left the table, and why (AGED, CLEARED, HANDSHAKE_TIMEOUT, TEMPLATE_GONE)."""

    session: Session
    reason: str


@dataclass(frozen=True)
class Refused:
    """A new flow the table would not take (REFUSED_FULL, REFUSED_NO_SYN): drop its packet."""

    key: FiveTuple
    reason: str


class SessionTable:
    def __init__(self, settings: FlowSettings) -> None:
        self.settings = settings
        self.by_key: dict[FiveTuple, Session] = {}
        self._count = 0  # sessions held, leaves included
        self._heap: list[tuple[float, int, Session]] = []
        self._ids = itertools.count(1)
        self.aggressive = False
        self.counters: dict[str, int] = {}
        self._apps: dict[tuple[int, int], list[Application]] = {}
        for app in settings.applications:
            self._apps.setdefault((app.protocol, app.destination_port), []).append(app)

    def lookup(self, key: FiveTuple) -> Session | None:
        """The session a packet of either direction belongs to. Only the opening tuple is a
        key (and the answer's, under NAT): the answer of a plain flow is found reversed."""
        session = self.by_key.get(key)
        if session is None:
            session = self.by_key.get(reverse(key))
            if session is not None and session.reply != key:
                return None
        return session

    def sessions(self) -> Iterator[Session]:
        """Every session, in the order they opened (a command's walk, O(table)); there is no
        index by ID, to keep a session small: `session-identifier` walks too."""
        for key, session in self.by_key.items():
            if key is not session.init and key != session.init:
                continue  # a NAT answer's own key
            yield session
            if session.leaves:
                yield from list(session.leaves.values())

    @property
    def by_id(self) -> dict[int, Session]:
        """Sessions by ID, built on demand (commands and tests, not the packet path)."""
        return {session.id: session for session in self.sessions()}

    def __len__(self) -> int:
        return self._count

    def count(self, name: str, by: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + by

    # --- timeouts ----------------------------------------------------------------------------

    def application_for(self, key: FiveTuple, policy: str) -> Application | None:
        """The `[[flow.application]]` matching protocol and destination port for this policy;
        a port-specific one wins over a protocol-wide one (destination-port 0)."""
        for port in (key[4], 0):
            for app in self._apps.get((key[0], port), ()):
                if app.applies_to(policy):
                    return app
        return None

    def _flow_timeout(self, session: Session) -> int:
        app = self.application_for(session.init, session.policy)
        if app is not None:
            return app.inactivity_timeout
        return self.settings.protocol_timeout(session.protocol)

    def _template_timeout(self, template: Session) -> int:
        """Seed 003: one timeout for a multicast group, the highest of the leaf policies'
        application timeouts and the IP protocol timeout."""
        timeout = self.settings.protocol_timeout(template.protocol)
        for leaf in (template.leaves or {}).values():
            app = self.application_for(template.init, leaf.policy)
            if app is not None:
                timeout = max(timeout, app.inactivity_timeout)
        return timeout

    def _set_deadline(self, session: Session, deadline: float) -> None:
        session.deadline = deadline
        if deadline < session.scheduled:
            session.scheduled = deadline
            heapq.heappush(self._heap, (deadline, session.id, session))

    def _restart(self, session: Session, timeout: int, now: float) -> None:
        session.timeout = timeout
        self._set_deadline(session, now + timeout)

    def _invalidate(self, session: Session, now: float) -> None:
        """Mark invalid: the remaining time drops to the invalidated timeout (seed 003: 4 s)."""
        if not session.valid:
            return
        session.valid = False
        self.count("invalidated")
        session.timeout = self.settings.invalidated
        self._set_deadline(session, min(session.deadline, now + self.settings.invalidated))

    # --- the dataplane's events --------------------------------------------------------------

    def open(
        self,
        init: FiveTuple,
        now: float,
        *,
        reply: FiveTuple | None = None,
        ingress: str = "",
        egress: str = "",
        policy: str = "",
        tunnel: bool = False,
        resource_manager: bool = False,
        syn: bool = True,
    ) -> Session | Refused:
        """The first packet of a flow. `syn`: a TCP first packet that is a SYN (the others open
        a session only with no-syn-check). An existing session of that tuple is refreshed."""
        existing = self.lookup(init)
        if existing is not None and existing.kind != TEMPLATE:
            self.refresh(init, now)
            return existing
        if is_multicast(init[3]):
            return self._open_multicast(init, now, ingress, egress, policy, existing)
        if init[0] == TCP and not syn and not self.settings.no_syn_check:
            return self._refuse(init, REFUSED_NO_SYN)
        if self._count >= self.settings.max_sessions:
            return self._refuse(init, REFUSED_FULL)
        reply = reply if reply is not None else reverse(init)
        session = Session(next(self._ids), init, reply, now)
        session.ingress, session.egress, session.policy = ingress, egress, policy
        session.role = TUNNEL_ROLE if tunnel else RESOURCE_MANAGER_ROLE if resource_manager else ""
        app = self.application_for(init, policy)
        session.application = app.name if app is not None else ""
        self._add(session)
        if session.nat_reply is not None:  # NAT: the answer is a key of its own
            self.by_key[session.nat_reply] = session
        if init[0] == TCP and syn:
            session.state = HANDSHAKE
            self._restart(session, self.settings.tcp_initial_timeout, now)
        else:
            session.state = ESTABLISHED if init[0] == TCP else ACTIVE
            self._restart(session, self._flow_timeout(session), now)
        return session

    def _open_multicast(
        self,
        init: FiveTuple,
        now: float,
        ingress: str,
        egress: str,
        policy: str,
        template: Session | None,
    ) -> Session | Refused:
        """A template session per (source, group, ports) and a leaf per outgoing interface or
        tunnel; the leaves die with the template (seed 003)."""
        needed = (template is None) + (template is None or egress not in (template.leaves or {}))
        if self._count + needed > self.settings.max_sessions:
            return self._refuse(init, REFUSED_FULL)
        if template is None:
            template = Session(next(self._ids), init, init, now)
            template.kind, template.ingress, template.leaves = TEMPLATE, ingress, {}
            self._add(template)
        assert template.leaves is not None
        if egress not in template.leaves:
            leaf = Session(next(self._ids), init, reverse(init), now)
            leaf.kind, leaf.template, leaf.ingress, leaf.egress = LEAF, template, ingress, egress
            leaf.policy = policy
            app = self.application_for(init, policy)
            leaf.application = app.name if app is not None else ""
            template.leaves[egress] = leaf
            self._count += 1
            self._check_watermarks()
        if template.valid:  # an invalidated group is not brought back
            self._restart(template, self._template_timeout(template), now)
        return template.leaves[egress]

    def _add(self, session: Session) -> None:
        self._count += 1
        self.by_key[session.init] = session
        self._check_watermarks()

    def _refuse(self, key: FiveTuple, reason: str) -> Refused:
        self.count(f"refused.{reason}")
        return Refused(key, reason)

    def refresh(
        self,
        key: FiveTuple,
        now: float,
        counters: tuple[int, int, int, int] | None = None,
    ) -> Session | None:
        """Traffic was seen at `now` (the dataplane's batched refresh): the timer starts over,
        counters (packets in, bytes in, packets out, bytes out: totals) are taken as they are.
        During the TCP handshake each packet restarts tcp-initial-timeout (seed 003).
        An invalidated session is not brought back by traffic."""
        session = self.lookup(key)
        if session is None:
            return None
        if counters is not None:
            session.packets_in, session.bytes_in, session.packets_out, session.bytes_out = counters
        if session.valid and now + session.timeout > session.deadline:
            self._set_deadline(session, now + session.timeout)
        return session

    def handshake_done(self, key: FiveTuple, now: float) -> Session | None:
        """The three-way handshake completed: the application/protocol timeout takes over."""
        session = self.lookup(key)
        if session is None or session.protocol != TCP or session.state != HANDSHAKE:
            return session
        session.state = ESTABLISHED
        if session.valid:
            self._restart(session, self._flow_timeout(session), now)
        return session

    def fin(self, key: FiveTuple, now: float, direction: int) -> Session | None:
        """A FIN from one end. fin-invalidate-session: invalid at the first FIN, from either
        end. Otherwise the session closes once both ends sent theirs: it is held for
        time-wait-state seconds when set, else terminated (invalidated, seed 003)."""
        session = self.lookup(key)
        if session is None or session.protocol != TCP:
            return session
        session.fins |= direction
        if self.settings.fin_invalidate_session:
            self._invalidate(session, now)
        elif session.fins == INIT | REPLY:
            self._close(session, now)
        elif session.state != TIME_WAIT:
            session.state = FIN_WAIT
        return session

    def rst(self, key: FiveTuple, now: float) -> Session | None:
        """A TCP RST. rst-invalidate-session: invalidated at once. Otherwise the session closes
        into time-wait when time-wait-state is set, and is left as it is when not (an RST
        alone does not end a session, docs/flow-sessions.md)."""
        session = self.lookup(key)
        if session is None or session.protocol != TCP:
            return session
        if self.settings.rst_invalidate_session:
            self._invalidate(session, now)
        elif self.settings.time_wait_state is not None:
            self._close(session, now)
        return session

    def _close(self, session: Session, now: float) -> None:
        wait = self.settings.time_wait_state
        if wait is None:
            session.state = TIME_WAIT
            self._invalidate(session, now)
        elif session.state != TIME_WAIT and session.valid:
            session.state = TIME_WAIT
            session.timeout = wait
            self._set_deadline(session, min(session.deadline, now + wait))

    def forget(self, key: FiveTuple, reason: str) -> list[Closed]:
        """The source dropped the flow itself (conntrack destroyed its entry)."""
        session = self.lookup(key)
        return self._remove(session, reason) if session is not None else []

    # --- time --------------------------------------------------------------------------------

    def next_deadline(self) -> float:
        return self._heap[0][0] if self._heap else NEVER

    def due(self, now: float) -> list[Session]:
        """The sessions whose time is up at `now`, left in place: a source that learns of
        traffic only now and then (conntrack) looks at them before `tick` ends them. Costs
        what is due, like `tick`."""
        heap = self._heap
        live: list[tuple[float, int, Session]] = []
        out: list[Session] = []
        while heap and heap[0][0] <= now:
            entry = heapq.heappop(heap)
            when, _, session = entry
            if not session.alive or when != session.scheduled:
                continue  # stale: dropped here as tick would
            live.append(entry)
            if session.deadline <= now:
                out.append(session)
        for entry in live:
            heapq.heappush(heap, entry)
        return out

    def tick(self, now: float) -> list[Closed]:
        """Age out what is due; in aggressive aging, invalidate what has less than early-ageout
        left. Costs what comes due (plus, while aggressive, what is within early-ageout)."""
        closed: list[Closed] = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            when, _, session = heapq.heappop(heap)
            if not session.alive or when != session.scheduled:
                continue  # stale: removed, or a newer entry is live
            session.scheduled = NEVER
            if session.deadline > now:
                self._set_deadline(session, session.deadline)  # refreshed meanwhile
                continue
            reason = HANDSHAKE_TIMEOUT if session.state == HANDSHAKE else AGED
            closed.extend(self._remove(session, reason))
        if self.aggressive:
            self._early_ageout(now)
        return closed

    def _early_ageout(self, now: float) -> None:
        """Seed 003: during aggressive aging, sessions with less than early-ageout left are
        marked invalid (their time drops to the invalidated timeout)."""
        horizon = now + self.settings.early_ageout
        heap = self._heap
        keep: list[Session] = []
        while heap and heap[0][0] < horizon:
            when, _, session = heapq.heappop(heap)
            if not session.alive or when != session.scheduled:
                continue
            session.scheduled = NEVER
            if session.deadline < horizon and session.valid:
                self.count("early_ageout")
                self._invalidate(session, now)
                continue  # _invalidate pushed its new entry
            keep.append(session)
        for session in keep:
            self._set_deadline(session, session.deadline)

    def _remove(self, session: Session, reason: str) -> list[Closed]:
        if not session.alive:
            return []
        session.alive = False
        closed = [Closed(session, reason)]
        self._count -= 1
        self.count(f"closed.{reason}")
        for key in (session.init, session.nat_reply):
            if key is not None and self.by_key.get(key) is session:
                del self.by_key[key]
        if session.kind == TEMPLATE:
            for leaf in list((session.leaves or {}).values()):
                closed += self._remove(leaf, TEMPLATE_GONE)
        elif session.kind == LEAF and session.template is not None:
            leaves = session.template.leaves or {}
            if leaves.get(session.egress) is session:
                del leaves[session.egress]
        self._check_watermarks()
        return closed

    def _check_watermarks(self) -> None:
        """Aggressive aging starts above high-watermark percent of max-sessions and stops
        below low-watermark percent (seed 003). Integer arithmetic, O(1)."""
        used = self._count * 100
        limit = self.settings.max_sessions
        if not self.aggressive and used > self.settings.high_watermark * limit:
            self.aggressive = True
            self.count("aggressive_aging.on")
        elif self.aggressive and used < self.settings.low_watermark * limit:
            self.aggressive = False
            self.count("aggressive_aging.off")

    # --- commands ----------------------------------------------------------------------------

    def select(self, match: SessionFilter) -> Iterator[Session]:
        for session in list(self.sessions()):
            if match.session_id is not None and session.id != match.session_id:
                continue
            if match.matches(session):
                yield session

    def clear(self, match: SessionFilter) -> list[Closed]:
        """`clear security flow session ...`: remove what matches; `all` keeps the tunnel and
        resource-manager sessions (seed 003). Leaves of a cleared template go with it and are
        counted in the result."""
        closed: list[Closed] = []
        for session in list(self.select(match)):
            closed += self._remove(session, CLEARED)
        return closed

    def summary(self, now: float) -> dict[str, object]:
        """`show security flow session summary`: counts by state and protocol, table use."""
        by_protocol: dict[str, int] = {}
        valid = pending = invalid = unicast = multicast = 0
        for session in self.sessions():
            name = protocol_name(session.protocol)
            by_protocol[name] = by_protocol.get(name, 0) + 1
            if session.kind == UNICAST:
                unicast += 1
            else:
                multicast += 1
            if not session.valid:
                invalid += 1
            elif session.state == HANDSHAKE:
                pending += 1
            else:
                valid += 1
        refused = sum(v for k, v in self.counters.items() if k.startswith("refused."))
        return {
            "unicast_sessions": unicast,
            "multicast_sessions": multicast,
            "failed_sessions": refused,
            "sessions_in_use": self._count,
            "valid_sessions": valid,
            "pending_sessions": pending,
            "invalidated_sessions": invalid,
            "maximum_sessions": self.settings.max_sessions,
            "by_protocol": dict(sorted(by_protocol.items())),
            "aggressive_aging": self.aggressive,
            "high_watermark": self.settings.high_watermark,
            "low_watermark": self.settings.low_watermark,
        }


@dataclass(frozen=True)
class SessionFilter:
    """What `show`/`clear security flow session` name; every given criterion must match."""

    session_id: int | None = None
    source_prefix: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    destination_prefix: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    protocol: int | None = None
    destination_port: int | None = None
    application: str | None = None
    interface: str | None = None
    tunnel: bool = False  # show: only tunnel sessions
    resource_manager: bool = False  # clear: only resource-manager sessions
    all: bool = False  # clear all: everything but tunnel and resource-manager sessions

    def matches(self, session: Session) -> bool:
        protocol, src, _sport, dst, dport = session.init
        if self.all and (session.tunnel or session.resource_manager):
            return False
        if self.resource_manager and not session.resource_manager:
            return False
        if self.tunnel and not session.tunnel:
            return False
        if self.protocol is not None and protocol != self.protocol:
            return False
        if self.destination_port is not None and dport != self.destination_port:
            return False
        if self.application is not None and session.application != self.application:
            return False
        if self.interface is not None and self.interface not in (session.ingress, session.egress):
            return False
        if self.source_prefix is not None and not _within(src, self.source_prefix):
            return False
        return self.destination_prefix is None or _within(dst, self.destination_prefix)


def _within(address: str, network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bool:
    ip = ipaddress.ip_address(address)
    return ip.version == network.version and ip in network
