"""The userspace ESP dataplane of the kernel service (docs/esp-dataplane.md).

The role strongSwan's kernel-libipsec plays, for kernels without ESP: inner
packets come from the TUN device, are matched to a child SA by their addresses
and leave as ESP (raw IP protocol 50, or ESP in UDP on the NAT-T port when the
child is UDP-encapsulated, RFC 3948); ESP packets are matched by SPI,
decapsulated (`shared/esp/`: anti-replay with ESN, ICV, padding) and, when the
inner packet is inside the child's traffic selectors (RFC 4301 5.2), written to
the TUN device.

Trap policies (`start-action = trap`, `dpd-action = trap`) live next to the
tunnels: a packet that finds no tunnel but a trap raises one ACQUIRE per trap
per `acquire-timeout` (the `on_acquire` callback; the kernel service publishes
it) and waits in the trap's bounded queue; the child's installation releases the
queue through the new tunnel, `acquire-timeout` drops it (docs/esp-dataplane.md,
"Traps and ACQUIRE").

Per packet the work is one dict lookup by SPI inbound, and outbound one dict
lookup per distinct prefix length in use (at most 33 for IPv4, 129 for IPv6),
whatever the number of SAs. Everything runs in the kernel service's asyncio
loop (`add_reader` on each fd); nothing per packet crosses the bus.

`Dataplane` itself does no I/O: `outbound(packet)` and `inbound(esp)` return
what to send or deliver, so the codec paths are tested without a TUN device.
"""

from __future__ import annotations

import ipaddress
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ikefarm.services.kernel.flows import FlowCache, FlowEntry, Key, clamp_mss, packed
from ikefarm.shared.esp import (
    Dropped,
    EncapsulationRefused,
    InboundSa,
    InboundSaTable,
    LifetimeEvent,
    OutboundSa,
)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_V4_MAX, _V6_MAX = 32, 128


def _mask(version: int, prefix: int) -> int:
    bits = _V4_MAX if version == 4 else _V6_MAX
    return ((1 << bits) - 1) ^ ((1 << (bits - prefix)) - 1)


def selector_networks(selector: str) -> list[Network]:
    """The networks of one traffic selector as `str(TrafficSelector)` prints it.

    `10.0.0.0/24` and `10.0.0.1..10.0.0.5` are accepted; a selector with a
    protocol or port (`...[tcp/80]`) raises NotImplementedError, anything else
    that is not an address range ValueError.
    """
    if "[" in selector:
        raise NotImplementedError(
            f"traffic selector {selector!r}: protocol/port selectors are not implemented"
            " by the userspace dataplane"
        )
    if ".." in selector:
        first, last = selector.split("..", 1)
        start, end = ipaddress.ip_address(first), ipaddress.ip_address(last)
        if start.version != end.version:
            raise ValueError("a range between two IP versions")
        return list(ipaddress.summarize_address_range(start, end))  # type: ignore[arg-type]
    return [ipaddress.ip_network(selector, strict=False)]


def _addresses(packet: bytes) -> tuple[int, int, int] | None:
    """(version, source, destination) of an IPv4/IPv6 packet, None if too short."""
    if not packet:
        return None
    version = packet[0] >> 4
    if version == 4 and len(packet) >= 20:
        return 4, int.from_bytes(packet[12:16], "big"), int.from_bytes(packet[16:20], "big")
    if version == 6 and len(packet) >= 40:
        return 6, int.from_bytes(packet[8:24], "big"), int.from_bytes(packet[24:40], "big")
    return None


def packet_addresses(packet: bytes) -> tuple[str, str]:
    """(source, destination) of an IP packet as host selectors (`10.0.0.1/32`), for an
    ACQUIRE; ("", "") when it is too short (the dataplane queues only whole headers)."""
    addresses = _addresses(packet)
    if addresses is None:
        return "", ""
    version, source, destination = addresses
    bits = _V4_MAX if version == 4 else _V6_MAX
    return (
        f"{ipaddress.ip_address(source)}/{bits}",
        f"{ipaddress.ip_address(destination)}/{bits}",
    )


class _Selectors:
    """Networks as (network int, mask int) per IP version, for membership tests."""

    __slots__ = ("_by_version",)

    def __init__(self, networks: Iterable[Network]) -> None:
        self._by_version: dict[int, list[tuple[int, int]]] = {4: [], 6: []}
        for n in networks:
            self._by_version[n.version].append(
                (int(n.network_address), _mask(n.version, n.prefixlen))
            )

    def contains(self, version: int, address: int) -> bool:
        # a plain loop: per packet, cheaper than any() over a generator
        for network, mask in self._by_version[version]:  # noqa: SIM110
            if address & mask == network:
                return True
        return False


@dataclass(eq=False)
class Tunnel:
    """One child SA in the dataplane: its two ESP SAs, selectors and outer endpoints."""

    unique_id: int
    outbound: OutboundSa
    inbound: InboundSa
    local_address: str
    remote_address: str
    local_port: int
    remote_port: int
    udp_encap: bool
    local_nets: list[Network]
    remote_nets: list[Network]
    # counters moved since the kernel service's last batch (`Dataplane.take_moved`)
    moved: bool = field(default=False, init=False, repr=False)
    label: str = ""  # the tunnel as the flow sessions name it (interface column)
    policy: str = ""  # the child's name: the policy that lets its flows through
    outer: FlowEntry | None = field(default=None, repr=False)  # its tunnel session
    local_selectors: _Selectors = field(init=False, repr=False)
    remote_selectors: _Selectors = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.local_selectors = _Selectors(self.local_nets)
        self.remote_selectors = _Selectors(self.remote_nets)

    @property
    def outer_key(self) -> Key:
        """Its ESP flow, peer to gateway: ESP in UDP (which IKE shares) or IP protocol 50."""
        remote, local = packed(self.remote_address), packed(self.local_address)
        if self.udp_encap:
            return (17, remote, self.remote_port, local, self.local_port)
        return (50, remote, 0, local, 0)


@dataclass(eq=False)
class Trap:
    """A trap policy in the dataplane: traffic for its selectors with no tunnel raises ACQUIRE.

    `queue` holds the packets that wait for the child (at most `Dataplane.queue_limit`);
    `acquired_at` is when the current ACQUIRE went out (None: none pending)."""

    reqid: int
    local_address: str
    remote_address: str
    local_nets: list[Network]
    remote_nets: list[Network]
    queue: deque[bytes] = field(default_factory=deque, repr=False)
    acquired_at: float | None = None
    local_selectors: _Selectors = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.local_selectors = _Selectors(self.local_nets)


class _PrefixIndex:
    """Tunnels (or traps) by remote network, longest prefix first; the newest of a prefix wins
    (a rekeyed child's successor takes over before its predecessor is deleted)."""

    def __init__(self) -> None:
        self._tables: dict[int, dict[int, dict[int, list[Any]]]] = {4: {}, 6: {}}
        # per version: (mask, table) for each prefix length in use, longest first
        self._order: dict[int, list[tuple[int, dict[int, list[Any]]]]] = {4: [], 6: []}

    def _reorder(self, version: int) -> None:
        by_length = self._tables[version]
        self._order[version] = [
            (_mask(version, length), by_length[length])
            for length in sorted(by_length, reverse=True)
        ]

    def add(self, network: Network, tunnel: Tunnel | Trap) -> None:
        by_length = self._tables[network.version]
        table = by_length.setdefault(network.prefixlen, {})
        table.setdefault(int(network.network_address), []).append(tunnel)
        self._reorder(network.version)

    def remove(self, network: Network, tunnel: Tunnel | Trap) -> None:
        by_length = self._tables[network.version]
        table = by_length.get(network.prefixlen, {})
        key = int(network.network_address)
        tunnels = table.get(key, [])
        if tunnel in tunnels:
            tunnels.remove(tunnel)
        if not tunnels:
            table.pop(key, None)
        if not table:
            by_length.pop(network.prefixlen, None)
        self._reorder(network.version)

    def lookup(self, version: int, source: int, destination: int) -> Any:
        for mask, table in self._order[version]:
            tunnels = table.get(destination & mask)
            if tunnels:
                for tunnel in reversed(tunnels):
                    if tunnel.local_selectors.contains(version, source):
                        return tunnel
        return None


@dataclass(frozen=True)
class Send:
    """An ESP packet to send to the tunnel's remote end (in UDP when `udp_encap`)."""

    esp: bytes
    tunnel: Tunnel


LifetimeHandler = Callable[[Tunnel, LifetimeEvent], None]
AcquireHandler = Callable[[Trap, bytes], None]  # the trap, the packet that raised it
QUEUE_LIMIT = 64  # packets waiting per trap for its child (strongSwan's libipsec keeps some too)


class Dataplane:
    """Child SAs of the userspace backend and the per-packet paths, without I/O."""

    def __init__(
        self,
        counters: Counter[str] | None = None,
        *,
        acquire_timeout: float = 30.0,
        queue_limit: int = QUEUE_LIMIT,
        flows: FlowCache | None = None,
        host: str = "ikefarm0",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.counters: Counter[str] = counters if counters is not None else Counter()
        # the per-flow cache feeding the flow service ([flow] source = "dataplane"), or None
        self.flows = flows
        self.host = host  # the TUN device: the interface of the host's side of each flow
        self.clock = clock
        self.inbound_sas = InboundSaTable()
        self.tunnels: dict[int, Tunnel] = {}  # by child unique id
        self._by_spi_in: dict[int, Tunnel] = {}
        self._index = _PrefixIndex()
        self.on_lifetime: LifetimeHandler | None = None
        # tunnels that carried a packet since the last take_moved(): a flag test per packet,
        # and a batch costs the tunnels that moved, not all of them
        self._moved: list[Tunnel] = []
        self.traps: dict[int, Trap] = {}  # by reqid
        self._trap_index = _PrefixIndex()
        self._acquiring: dict[int, Trap] = {}  # traps with an ACQUIRE pending, by reqid
        self.acquire_timeout = acquire_timeout
        self.queue_limit = queue_limit
        self.clock = clock
        self.on_acquire: AcquireHandler | None = None

    def __len__(self) -> int:
        return len(self.tunnels)

    def add(self, tunnel: Tunnel) -> None:
        if tunnel.unique_id in self.tunnels or tunnel.inbound.spi in self.inbound_sas:
            raise ValueError("a tunnel with this unique id or inbound SPI exists")
        self.inbound_sas.add(tunnel.inbound)
        self._by_spi_in[tunnel.inbound.spi] = tunnel
        self.tunnels[tunnel.unique_id] = tunnel
        for network in tunnel.remote_nets:
            self._index.add(network, tunnel)
        if self.flows is not None:
            tunnel.outer = self.flows.tunnel_up(tunnel.outer_key, self.clock(), tunnel.label)

    def remove(self, unique_id: int) -> Tunnel | None:
        tunnel = self.tunnels.pop(unique_id, None)
        if tunnel is None:
            return None
        self.inbound_sas.remove(tunnel.inbound.spi)
        self._by_spi_in.pop(tunnel.inbound.spi, None)
        for network in tunnel.remote_nets:
            self._index.remove(network, tunnel)
        if self.flows is not None and tunnel.outer is not None:
            self.flows.tunnel_down(tunnel.outer)
            tunnel.outer = None
        return tunnel

    def _events(self, tunnel: Tunnel, sa: InboundSa | OutboundSa) -> None:
        for event in sa.take_events():
            self.counters[f"esp.lifetime.{event.direction}.{event.kind}"] += 1
            if self.on_lifetime is not None:
                self.on_lifetime(tunnel, event)

    def outbound(self, packet: bytes) -> Send | None:
        """The ESP packet protecting `packet` read from the TUN device, or None (counted)."""
        addresses = _addresses(packet)
        if addresses is None:
            self.counters["esp.out.drop.malformed"] += 1
            return None
        tunnel = self._index.lookup(*addresses)
        if tunnel is None:
            self._trapped(addresses, packet)
            return None
        flows = self.flows
        if flows is not None:
            now = self.clock()
            if not flows.packet(packet, now, self.host, tunnel.label, tunnel.policy):
                return None  # counted as flow.drop.<reason>
            if flows.tcp_mss is not None:
                packet = clamp_mss(packet, flows.tcp_mss)
        sa = tunnel.outbound
        try:
            esp = sa.encapsulate(packet)
        except EncapsulationRefused as exc:
            self.counters[f"esp.out.drop.{exc.reason}"] += 1
            return None
        self.counters["esp.out.packets"] += 1
        self.counters["esp.out.bytes"] += len(packet)
        if not tunnel.moved:
            tunnel.moved = True
            self._moved.append(tunnel)
        if flows is not None and tunnel.outer is not None:
            flows.tunnel_packet(tunnel.outer, len(esp), False, now)
        if sa.has_events:
            self._events(tunnel, sa)
        return Send(esp, tunnel)

    def inbound(self, esp: bytes) -> bytes | None:
        """The inner packet for the TUN device, or None (the drop counted by reason)."""
        result = self.inbound_sas.decapsulate(esp)
        if isinstance(result, Dropped):
            self.counters[f"esp.in.drop.{result.reason}"] += 1
            return None
        tunnel = self._by_spi_in[result.spi]
        inner = result.inner
        addresses = _addresses(inner)
        assert addresses is not None  # the codec delivered a whole IP packet
        version, source, destination = addresses
        if not (
            tunnel.remote_selectors.contains(version, source)
            and tunnel.local_selectors.contains(version, destination)
        ):
            # RFC 4301 5.2: an inner packet outside the SA's selectors is discarded
            self.counters["esp.in.drop.policy"] += 1
            return None
        flows = self.flows
        if flows is not None:
            now = self.clock()
            if tunnel.outer is not None:
                flows.tunnel_packet(tunnel.outer, len(esp), True, now)
            if not flows.packet(inner, now, tunnel.label, self.host, tunnel.policy):
                return None  # counted as flow.drop.<reason>
            if flows.tcp_mss is not None:
                inner = clamp_mss(inner, flows.tcp_mss)
        self.counters["esp.in.packets"] += 1
        self.counters["esp.in.bytes"] += len(inner)
        if not tunnel.moved:
            tunnel.moved = True
            self._moved.append(tunnel)
        if tunnel.inbound.has_events:
            self._events(tunnel, tunnel.inbound)
        return inner

    def take_moved(self) -> list[Tunnel]:
        """The installed tunnels that carried packets since the previous call."""
        moved, self._moved = self._moved, []
        for tunnel in moved:
            tunnel.moved = False
        return [t for t in moved if self.tunnels.get(t.unique_id) is t]

    # -- traps and ACQUIRE ---------------------------------------------------------------------

    def add_trap(self, trap: Trap) -> None:
        """Install (or replace) the trap of a reqid; a replaced trap keeps its queue."""
        old = self.traps.get(trap.reqid)
        if old is not None:
            self._unindex_trap(old)
            trap.queue, trap.acquired_at = old.queue, old.acquired_at
            if trap.reqid in self._acquiring:
                self._acquiring[trap.reqid] = trap
        self.traps[trap.reqid] = trap
        for network in trap.remote_nets:
            self._trap_index.add(network, trap)

    def remove_trap(self, reqid: int) -> Trap | None:
        """Remove a trap; the packets waiting for its child are dropped (counted)."""
        trap = self.traps.pop(reqid, None)
        if trap is None:
            return None
        self._unindex_trap(trap)
        self._drop_queue(trap, "trap_removed")
        return trap

    def _unindex_trap(self, trap: Trap) -> None:
        for network in trap.remote_nets:
            self._trap_index.remove(network, trap)

    def _drop_queue(self, trap: Trap, reason: str) -> None:
        if trap.queue:
            self.counters[f"esp.out.drop.{reason}"] += len(trap.queue)
            trap.queue.clear()
        trap.acquired_at = None
        self._acquiring.pop(trap.reqid, None)

    def _trapped(self, addresses: tuple[int, int, int], packet: bytes) -> None:
        """A packet with no tunnel: queued behind its trap's ACQUIRE, else dropped (no_sa)."""
        trap = self._trap_index.lookup(*addresses) if self.traps else None
        if trap is None:
            self.counters["esp.out.drop.no_sa"] += 1
            return
        now = self.clock()
        if trap.acquired_at is not None and now - trap.acquired_at >= self.acquire_timeout:
            self._drop_queue(trap, "acquire_timeout")
        if trap.acquired_at is None:
            # one ACQUIRE per trap per acquire-timeout (seed 004's acquire SA)
            trap.acquired_at = now
            self._acquiring[trap.reqid] = trap
            self.counters["esp.acquire"] += 1
            if self.on_acquire is not None:
                self.on_acquire(trap, packet)
        if len(trap.queue) >= self.queue_limit:
            self.counters["esp.out.drop.acquire_queue_full"] += 1
            return
        trap.queue.append(packet)
        self.counters["esp.out.queued"] += 1

    def expire_acquires(self) -> None:
        """Drop the queues of ACQUIREs older than `acquire-timeout` (counted `acquire_timeout`).

        Touches only the traps with an ACQUIRE pending."""
        if not self._acquiring:
            return
        now = self.clock()
        for trap in list(self._acquiring.values()):
            if trap.acquired_at is not None and now - trap.acquired_at >= self.acquire_timeout:
                self._drop_queue(trap, "acquire_timeout")

    def release(self, reqid: int) -> list[Send]:
        """The child of `reqid` is installed: its trap's queued packets, protected now.

        A packet that still finds no tunnel (the child's selectors are narrower than the
        trap's) goes back through `outbound` and may raise a new ACQUIRE."""
        trap = self.traps.get(reqid)
        if trap is None or (not trap.queue and trap.acquired_at is None):
            return []
        packets = list(trap.queue)
        trap.queue.clear()
        trap.acquired_at = None
        self._acquiring.pop(reqid, None)
        sends = []
        for packet in packets:
            send = self.outbound(packet)
            if send is not None:
                sends.append(send)
        self.counters["esp.out.released"] += len(sends)
        return sends

    def show(self, unique_id: int) -> dict[str, Any]:
        tunnel = self.tunnels.get(unique_id)
        if tunnel is None:
            return {}
        return {
            "in": _sa_counters(tunnel.inbound),
            "out": _sa_counters(tunnel.outbound) | {"seq": tunnel.outbound.seq},
        }


def _sa_counters(sa: InboundSa | OutboundSa) -> dict[str, Any]:
    counters = sa.counters
    return {"packets": counters.packets, "bytes": counters.bytes, "drops": dict(counters.drops)}
