"""Where a received UDP datagram goes: pure logic, no sockets, no NATS, no clock reads.

Ingress owns no IKE state (docs/principles.md, principle 3): an IKE_SA_INIT request with
SPIr = 0 goes to any ike worker (`subjects.IKE_INIT`, a queue group), unless a
worker told every ingress (`InitRoute`) that it already holds the half-open SA
of that peer and SPIi, so a retransmission reaches the worker that answered it.
Every later datagram carries our SPI, whose first octets name the owning shard
(`proto/sharding.py`): SPIr when the sender is the original initiator (I flag,
RFC 7296 3.1), SPIi otherwise.

On the NAT-T port (RFC 3948 2.2) IKE messages follow a 4-octet non-ESP marker,
a single 0xFF octet is a NAT-keepalive (RFC 3948 2.3) and anything else is
ESP-in-UDP, which belongs to the kernel. Every datagram that is not routed is
dropped with a reason the service counts (docs/principles.md, principle 6).

Publishing on NATS is fire-and-forget: a datagram for a shard no worker owns
would vanish without a trace. `ShardOwners` knows which shards have a live
owner from the load reports every worker publishes (`IkeLoad`, at start and
every second); the `Router` drops what is for a shard nobody owns
(`dropped.shard_unowned`) and a new IKE_SA_INIT when no worker at all reports
(`dropped.no_worker`).
"""

from __future__ import annotations

import math
import struct
from collections import Counter, OrderedDict
from dataclasses import dataclass

from ikefarm.proto import subjects
from ikefarm.proto.sharding import MAX_SHARDS, shard_of_spi
from ikefarm.shared.dos.load import STALE_AFTER
from ikefarm.shared.ikev2.constants import (
    IKE_HEADER_LENGTH,
    NON_ESP_MARKER,
    ExchangeType,
    HeaderFlag,
    PayloadType,
)
from ikefarm.shared.ikev2.message import IKE_MAJOR_VERSION, IkeHeader
from ikefarm.shared.udp_endpoints import canonical_address

NAT_KEEPALIVE = b"\xff"  # RFC 3948 2.3
ZERO_SPI = bytes(8)
IKE_SPI_LENGTH = 8
DEFAULT_INIT_ROUTE_CAPACITY = 100_000

ROUTE_INIT = "init"
ROUTE_SHARD = "shard"
SHARD_UNOWNED = "shard_unowned"
NO_WORKER = "no_worker"


class Dropped(Exception):
    """The datagram is not for an ike worker; `counter` is the stats label to count."""

    def __init__(self, reason: str, counter: str | None = None, shard: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.counter = counter or f"dropped.{reason}"
        self.shard = shard


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


# RFC 7296 3.1: SPIi, SPIr, Next Payload, versions, Exchange Type, Flags, Message ID, Length
_HEADER = struct.Struct("!8s8sBBBBII")
_KNOWN_FLAGS = int(HeaderFlag.INITIATOR | HeaderFlag.VERSION | HeaderFlag.RESPONSE)
# the members by value, made once: an enum's call costs more than the rest of the header
_PAYLOAD_TYPES = {int(member): member for member in PayloadType}
_EXCHANGE_TYPES = {int(member): member for member in ExchangeType}
_FLAGS = {v: HeaderFlag(v) for v in range(_KNOWN_FLAGS + 1) if not v & ~_KNOWN_FLAGS}


def read_header(datagram: bytes) -> IkeHeader:
    """The fixed IKE header (RFC 7296 3.1) of a datagram (non-ESP marker stripped): 28
    octets and major version 2, or `Dropped` ("truncated_header", "invalid_major_version").
    The engine's `IkeHeader.parse` reads the same; this one is the ingress's per-datagram
    path, so it unpacks in one call and takes the enum members from tables."""
    if len(datagram) < IKE_HEADER_LENGTH:
        raise Dropped("truncated_header")
    spi_i, spi_r, next_payload, version, exchange_type, flags, message_id, length = (
        _HEADER.unpack_from(datagram)
    )
    if version >> 4 != IKE_MAJOR_VERSION:
        raise Dropped("invalid_major_version")
    return IkeHeader(
        spi_i=spi_i,
        spi_r=spi_r,
        next_payload=_PAYLOAD_TYPES.get(next_payload, next_payload),
        major_version=IKE_MAJOR_VERSION,
        minor_version=version & 0x0F,
        exchange_type=_EXCHANGE_TYPES.get(exchange_type, exchange_type),
        flags=_FLAGS[flags & _KNOWN_FLAGS],  # reserved bits ignored (3.1)
        message_id=message_id,
        length=length,
    )


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


class ShardOwners:
    """Which shards have a live owner: a worker reported the shard's load within the last
    `STALE_AFTER` of its report intervals (the staleness rule of `shared/dos/load.py`).

    Reports start when a worker starts, so a worker owns its shard from its first one.
    An ingress that started less than `learning` seconds ago may not have heard every
    worker yet: until then a shard nobody reported counts as owned. Lookups are O(1);
    the table holds at most one entry per shard. Time is an argument (monotonic seconds).
    """

    def __init__(self, started: float, learning: float) -> None:
        self._until: dict[int, float] = {}
        self._learning = learning
        self._learning_until = started + learning
        self._latest = -math.inf  # when the freshest report goes stale

    def relearn(self, now: float) -> None:
        """This process was stopped or starved: the reports it missed may be queued unread,
        so learn again as after a start."""
        self._learning_until = max(self._learning_until, now + self._learning)

    def reported(self, shard: int, interval: float, now: float) -> None:
        """A worker reported `shard`'s load, promising the next within `interval` seconds."""
        if not 0 <= shard < MAX_SHARDS:
            raise ValueError(f"shard {shard} out of range 0-{MAX_SHARDS - 1}")
        if not (math.isfinite(interval) and interval > 0):
            raise ValueError("interval must be a positive number of seconds")
        until = now + STALE_AFTER * interval
        self._until[shard] = until
        self._latest = max(self._latest, until)

    def learning(self, now: float) -> bool:
        return now < self._learning_until

    def owned(self, shard: int, now: float) -> bool:
        until = self._until.get(shard)
        return (until is not None and now <= until) or now < self._learning_until

    def any_owned(self, now: float) -> bool:
        return now <= self._latest or now < self._learning_until

    def shards(self, now: float) -> list[int]:
        """The shards reported fresh (not counting the learning time); forgets stale ones."""
        for shard in [s for s, until in self._until.items() if now > until]:
            del self._until[shard]
        return sorted(self._until)


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
    header = read_header(datagram)
    # the worker would drop these too (RFC 7296 3.1: Length is the whole message); checked
    # once here, they never cost a bus message, and the header travels checked
    if header.length > len(datagram):
        raise Dropped("truncated_message")
    if header.length < len(datagram):
        raise Dropped("trailing_data")

    if header.spi_i == ZERO_SPI:
        raise Dropped("zero_spi")  # RFC 7296 3.1: the initiator's SPI is never zero
    if (
        header.exchange_type == ExchangeType.IKE_SA_INIT
        and not header.is_response
        and header.spi_r == ZERO_SPI
    ):
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
        owners: ShardOwners | None = None,
    ) -> None:
        self.counters: Counter[str] = counters if counters is not None else Counter()
        self.init_routes = init_routes if init_routes is not None else InitRouteTable()
        self.owners = owners  # None: every shard is taken as owned

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
            if self.owners is not None:
                route = self._to_an_owner(route, self.owners, now)
        except Dropped as dropped:
            self.counters[dropped.counter] += 1
            return dropped
        self.counters[route.counter] += 1
        return route

    def _to_an_owner(self, route: Route, owners: ShardOwners, now: float) -> Route:
        if route.shard is not None and not owners.owned(route.shard, now):
            header = route.header
            if header.exchange_type == ExchangeType.IKE_SA_INIT and header.spi_r == ZERO_SPI:
                # an init route to a worker that is gone: the half-open SA went with it,
                # any other worker may start afresh
                self.counters["init_route_unowned"] += 1
                route = Route(subjects.IKE_INIT, ROUTE_INIT, None, header, route.data)
            else:
                raise Dropped(SHARD_UNOWNED, shard=route.shard)
        if route.kind == ROUTE_INIT and not owners.any_owned(now):
            raise Dropped(NO_WORKER)
        return route
