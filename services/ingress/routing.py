"""Where a received UDP datagram goes: pure logic, no sockets, no NATS, no clock reads.

Ingress owns no IKE state (DESIGN principle 3): an IKE_SA_INIT request with
SPIr = 0 goes to any ike worker (`subjects.IKE_INIT`, a queue group), unless a
worker told every ingress (`InitRoute`) that it already holds the half-open SA
of that peer and SPIi, so a retransmission reaches the worker that answered it.
Every later datagram carries our SPI, whose first octets name the owning shard
(`proto/sharding.py`): SPIr when the sender is the original initiator (I flag,
RFC 7296 3.1), SPIi otherwise.

On the NAT-T port (RFC 3948 2.2) IKE messages follow a 4-octet non-ESP marker,
a single 0xFF octet is a NAT-keepalive (RFC 3948 2.3) and anything else is
ESP-in-UDP, which belongs to the kernel. Every datagram that is not routed is
dropped with a reason the service counts (DESIGN principle 6).
"""

from __future__ import annotations

import ipaddress
import math
from collections import Counter, OrderedDict
from dataclasses import dataclass

from ikefarm.proto import subjects
from ikefarm.proto.sharding import MAX_SHARDS, shard_of_spi
from ikefarm.shared.ikev2.constants import NON_ESP_MARKER, ExchangeType
from ikefarm.shared.ikev2.errors import MalformedMessage
from ikefarm.shared.ikev2.message import IkeHeader, peek_header

NAT_KEEPALIVE = b"\xff"  # RFC 3948 2.3
ZERO_SPI = bytes(8)
IKE_SPI_LENGTH = 8
DEFAULT_INIT_ROUTE_CAPACITY = 100_000

ROUTE_INIT = "init"
ROUTE_SHARD = "shard"


class Dropped(Exception):
    """The datagram is not for an ike worker; `counter` is the stats label to count."""

    def __init__(self, reason: str, counter: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.counter = counter or f"dropped.{reason}"


@dataclass(frozen=True)
class Route:
    """An IKE message for an ike worker: the subject and the message (marker stripped)."""

    subject: str
    kind: str  # ROUTE_INIT or ROUTE_SHARD
    shard: int | None
    header: IkeHeader
    data: bytes

    @property
    def counter(self) -> str:
        return f"routed.{self.kind}"


def canonical_address(address: str) -> str:
    """One spelling per address, so routes learned from workers match what sockets report."""
    return str(ipaddress.ip_address(address))


def our_spi(header: IkeHeader) -> bytes:
    """The SPI we allocated: SPIr if the sender is the original initiator, else SPIi."""
    return header.spi_r if header.is_initiator else header.spi_i


@dataclass
class _InitRouteEntry:
    shard: int
    expires: float


class InitRouteTable:
    """(remote address, remote port, SPIi) -> shard of a half-open SA, bounded and expiring.

    Entries live for the lifetime the worker announced; beyond `capacity` the
    oldest-learned entry is dropped first. Time is an argument (monotonic seconds).
    """

    def __init__(self, capacity: int = DEFAULT_INIT_ROUTE_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError("init-route capacity must be at least 1")
        self.capacity = capacity
        self._entries: OrderedDict[tuple[str, int, bytes], _InitRouteEntry] = OrderedDict()
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._entries)

    def learn(
        self,
        remote_address: str,
        remote_port: int,
        spi_i: bytes,
        shard: int,
        lifetime: float,
        now: float,
    ) -> None:
        """Remember a route; a lifetime of 0 (or less) forgets it."""
        if not 0 <= shard < MAX_SHARDS:
            raise ValueError(f"shard {shard} out of range 0-{MAX_SHARDS - 1}")
        if len(spi_i) != IKE_SPI_LENGTH:
            raise ValueError(f"SPIi is {len(spi_i)} octets, not {IKE_SPI_LENGTH}")
        if not 0 <= remote_port <= 0xFFFF:
            raise ValueError(f"port {remote_port} out of range 0-65535")
        if math.isnan(lifetime) or math.isinf(lifetime):
            raise ValueError("lifetime must be a finite number of seconds")
        key = (canonical_address(remote_address), remote_port, bytes(spi_i))
        self._entries.pop(key, None)
        if lifetime <= 0:
            return
        self._expire_front(now)
        self._entries[key] = _InitRouteEntry(shard, now + lifetime)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
            self.evicted += 1

    def lookup(self, remote_address: str, remote_port: int, spi_i: bytes, now: float) -> int | None:
        self._expire_front(now)
        key = (remote_address, remote_port, spi_i)
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires <= now:
            del self._entries[key]
            return None
        return entry.shard

    def purge(self, now: float) -> int:
        """Forget every expired entry; returns how many."""
        expired = [key for key, entry in self._entries.items() if entry.expires <= now]
        for key in expired:
            del self._entries[key]
        return len(expired)

    def _expire_front(self, now: float) -> None:
        # cheap amortized cleanup: the oldest-learned entries usually expire first
        while self._entries:
            key, entry = next(iter(self._entries.items()))
            if entry.expires > now:
                return
            del self._entries[key]


def route_datagram(
    datagram: bytes,
    *,
    natt: bool,
    remote_address: str,
    remote_port: int,
    init_routes: InitRouteTable,
    now: float,
) -> Route:
    """The route of one received datagram, or `Dropped` with the reason to count.

    `natt` says it arrived on the NAT-T port; `remote_address` is canonical
    (`canonical_address`). Raises nothing but `Dropped`.
    """
    if not datagram:
        raise Dropped("empty")
    if natt:
        if datagram == NAT_KEEPALIVE:
            raise Dropped("nat_keepalive", counter="nat_keepalive")
        if not datagram.startswith(NON_ESP_MARKER):
            # RFC 3948 2.2: a non-zero first word is an ESP SPI; the kernel decapsulates it
            raise Dropped("esp_in_udp", counter="esp_in_udp")
        datagram = datagram[len(NON_ESP_MARKER) :]
    try:
        header = peek_header(datagram)
    except MalformedMessage as exc:
        raise Dropped(exc.reason) from None

    if header.exchange_type == ExchangeType.IKE_SA_INIT and not header.is_response:
        if header.spi_i == ZERO_SPI:
            raise Dropped("zero_spi")  # RFC 7296 3.1: the initiator's SPI is never zero
        if header.spi_r == ZERO_SPI:
            shard = init_routes.lookup(remote_address, remote_port, header.spi_i, now)
            if shard is None:
                return Route(subjects.IKE_INIT, ROUTE_INIT, None, header, datagram)
            return Route(subjects.ike_shard(shard), ROUTE_SHARD, shard, header, datagram)

    spi = our_spi(header)
    if spi == ZERO_SPI:
        raise Dropped("zero_spi")  # no SA of ours has this SPI: nobody to route it to
    shard = shard_of_spi(spi)
    return Route(subjects.ike_shard(shard), ROUTE_SHARD, shard, header, datagram)


class Router:
    """`route_datagram` plus the counters: every datagram is either routed or counted dropped."""

    def __init__(
        self,
        counters: Counter[str] | None = None,
        init_routes: InitRouteTable | None = None,
    ) -> None:
        self.counters: Counter[str] = counters if counters is not None else Counter()
        self.init_routes = init_routes if init_routes is not None else InitRouteTable()

    def route(
        self,
        datagram: bytes,
        *,
        natt: bool,
        remote_address: str,
        remote_port: int,
        now: float,
    ) -> Route | Dropped:
        try:
            route = route_datagram(
                datagram,
                natt=natt,
                remote_address=remote_address,
                remote_port=remote_port,
                init_routes=self.init_routes,
                now=now,
            )
        except Dropped as dropped:
            self.counters[dropped.counter] += 1
            return dropped
        self.counters[route.counter] += 1
        return route
