"""Traffic Selector payloads TSi / TSr (RFC 7296 3.13) and selector arithmetic.

Ports follow RFC 7296 3.13.1: 0..65535 is any port, Start 65535 / End 0 is
OPAQUE (ports not available, e.g. fragments); for ICMP the 16-bit "port" is
Type (high octet) and Code (low octet), so the same range arithmetic applies.
IP protocol 0 is any protocol.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

from ikefarm.shared.ikev2.constants import PayloadType, TsType
from ikefarm.shared.ikev2.errors import MalformedMessage
from ikefarm.shared.ikev2.payloads.base import Payload, register
from ikefarm.shared.ikev2.payloads.fields import FieldTable, as_enum

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

ANY_PROTOCOL = 0
PORT_MIN, PORT_MAX = 0, 0xFFFF
OPAQUE_PORTS = (PORT_MAX, PORT_MIN)  # RFC 7296 3.13.1

_SELECTOR = FieldTable(
    "traffic_selector",
    ("ts_type", "B"),
    ("ip_protocol", "B"),
    ("length", "H"),
)
_PORTS = FieldTable("traffic_selector_ports", ("start_port", "H"), ("end_port", "H"))
_ADDRESS_OCTETS = {TsType.TS_IPV4_ADDR_RANGE: 4, TsType.TS_IPV6_ADDR_RANGE: 16}
_SELECTOR_LENGTH = {t: _SELECTOR.size + _PORTS.size + 2 * n for t, n in _ADDRESS_OCTETS.items()}
_PROTOCOL_NAMES = {
    1: "icmp",
    6: "tcp",
    17: "udp",
    47: "gre",
    50: "esp",
    51: "ah",
    58: "ipv6-icmp",
    132: "sctp",
    136: "udplite",
}


@dataclass(frozen=True, slots=True)
class TrafficSelector:
    """One IPv4 or IPv6 address-range selector (RFC 7296 3.13.1)."""

    ts_type: TsType
    ip_protocol: int
    start_port: int
    end_port: int
    start_address: IPAddress
    end_address: IPAddress

    def __post_init__(self) -> None:
        octets = _ADDRESS_OCTETS.get(self.ts_type)
        if octets is None:
            raise ValueError(f"traffic selector type {self.ts_type} is not an address range")
        for address in (self.start_address, self.end_address):
            if len(address.packed) != octets:
                raise ValueError(f"{address} does not fit a {self.ts_type.name} selector")

    # -- builders -----------------------------------------------------------

    @classmethod
    def from_network(
        cls,
        network: IPNetwork | str,
        protocol: int = ANY_PROTOCOL,
        ports: tuple[int, int] = (PORT_MIN, PORT_MAX),
    ) -> Self:
        net = ipaddress.ip_network(network, strict=False)
        return cls.from_range(net.network_address, net.broadcast_address, protocol, ports)

    @classmethod
    def from_range(
        cls,
        start: IPAddress | str,
        end: IPAddress | str,
        protocol: int = ANY_PROTOCOL,
        ports: tuple[int, int] = (PORT_MIN, PORT_MAX),
    ) -> Self:
        first, last = ipaddress.ip_address(start), ipaddress.ip_address(end)
        if first.version != last.version:
            raise ValueError("start and end addresses of different families")
        ts_type = TsType.TS_IPV4_ADDR_RANGE if first.version == 4 else TsType.TS_IPV6_ADDR_RANGE
        return cls(ts_type, protocol, ports[0], ports[1], first, last)

    @classmethod
    def any(cls, version: int = 4) -> Self:
        return cls.from_network("0.0.0.0/0" if version == 4 else "::/0")

    # -- properties ---------------------------------------------------------

    @property
    def version(self) -> int:
        return 4 if self.ts_type == TsType.TS_IPV4_ADDR_RANGE else 6

    @property
    def is_opaque(self) -> bool:
        return (self.start_port, self.end_port) == OPAQUE_PORTS

    @property
    def is_any_port(self) -> bool:
        return (self.start_port, self.end_port) == (PORT_MIN, PORT_MAX)

    @property
    def is_empty(self) -> bool:
        """Start above end (addresses, or ports other than OPAQUE): selects nothing."""
        if self.start_address > self.end_address:
            return True
        return self.start_port > self.end_port and not self.is_opaque

    def to_network(self) -> IPNetwork | None:
        """The subnet this selector's address range is exactly, else None."""
        if self.start_address > self.end_address:
            return None
        networks = list(ipaddress.summarize_address_range(self.start_address, self.end_address))
        return networks[0] if len(networks) == 1 else None

    def networks(self) -> list[IPNetwork]:
        """The address range as the fewest subnets (for routes and kernel policies)."""
        if self.start_address > self.end_address:
            return []
        return list(ipaddress.summarize_address_range(self.start_address, self.end_address))

    # -- arithmetic ---------------------------------------------------------

    def _ports_intersection(self, other: TrafficSelector) -> tuple[int, int] | None:
        if self.is_opaque or other.is_opaque:
            if (self.is_opaque or self.is_any_port) and (other.is_opaque or other.is_any_port):
                return OPAQUE_PORTS
            return None
        start, end = max(self.start_port, other.start_port), min(self.end_port, other.end_port)
        return (start, end) if start <= end else None

    def intersect(self, other: TrafficSelector) -> TrafficSelector | None:
        """The selector matching what both match (narrowing, RFC 7296 2.9), or None."""
        if self.ts_type != other.ts_type:
            return None
        if self.ip_protocol == ANY_PROTOCOL:
            protocol = other.ip_protocol
        elif other.ip_protocol in (ANY_PROTOCOL, self.ip_protocol):
            protocol = self.ip_protocol
        else:
            return None
        ports = self._ports_intersection(other)
        if ports is None:
            return None
        start = max(self.start_address, other.start_address)
        end = min(self.end_address, other.end_address)
        if start > end:
            return None
        return TrafficSelector(self.ts_type, protocol, ports[0], ports[1], start, end)

    def contains(self, other: TrafficSelector) -> bool:
        """True when everything `other` matches is matched by `self`."""
        if self.ts_type != other.ts_type or other.is_empty:
            return False
        if self.ip_protocol not in (ANY_PROTOCOL, other.ip_protocol):
            return False
        if self.is_opaque:
            if not other.is_opaque:
                return False
        elif not self.is_any_port and (
            other.is_opaque
            or not (self.start_port <= other.start_port and other.end_port <= self.end_port)
        ):
            return False
        return self.start_address <= other.start_address and other.end_address <= self.end_address

    def contains_address(self, address: IPAddress | str) -> bool:
        ip = ipaddress.ip_address(address)
        return ip.version == self.version and self.start_address <= ip <= self.end_address  # type: ignore[operator]

    # -- text ---------------------------------------------------------------

    def __str__(self) -> str:
        """As strongSwan prints selectors: ``10.0.0.0/24``, ``10.0.0.1..10.0.0.5[tcp/80]``."""
        network = self.to_network()
        text = str(network) if network is not None else f"{self.start_address}..{self.end_address}"
        has_protocol = self.ip_protocol != ANY_PROTOCOL
        if not has_protocol and self.is_any_port:
            return text
        parts = []
        if has_protocol:
            parts.append(_PROTOCOL_NAMES.get(self.ip_protocol, str(self.ip_protocol)))
        if not self.is_any_port:
            if self.is_opaque:
                parts.append("OPAQUE")
            elif self.start_port == self.end_port:
                parts.append(str(self.start_port))
            else:
                parts.append(f"{self.start_port}-{self.end_port}")
        return f"{text}[{'/'.join(parts)}]"

    # -- wire ---------------------------------------------------------------

    def encode(self) -> bytes:
        head = _SELECTOR.pack(
            {
                "ts_type": self.ts_type,
                "ip_protocol": self.ip_protocol,
                "length": _SELECTOR_LENGTH[self.ts_type],
            }
        )
        ports = _PORTS.pack({"start_port": self.start_port, "end_port": self.end_port})
        return head + ports + self.start_address.packed + self.end_address.packed


@dataclass(frozen=True)
class UnknownSelector:
    """A selector of a type other than the two address ranges (e.g. RFC 9478 TS_SECLABEL).

    Kept as received (`second_octet` is what the address ranges call IP Protocol
    ID, `data` follows the 4-octet type/length header); selection decides.
    """

    ts_type: int
    second_octet: int
    data: bytes

    def encode(self) -> bytes:
        length = _SELECTOR.size + len(self.data)
        head = {"ts_type": self.ts_type, "ip_protocol": self.second_octet, "length": length}
        return _SELECTOR.pack(head) + bytes(self.data)


@register
@dataclass
class TsPayload(Payload):
    """Number of TSs (1) | RESERVED (3) | Traffic Selectors."""

    selectors: list[TrafficSelector]
    payload_type: PayloadType = PayloadType.TSi
    unknown_selectors: list[UnknownSelector] = field(default_factory=list)
    WIRE_TYPES: ClassVar[tuple[PayloadType, ...]] = (PayloadType.TSi, PayloadType.TSr)
    FIELDS: ClassVar[FieldTable] = FieldTable("ts", ("count", "B"), ("reserved", "3x"))

    def __post_init__(self) -> None:
        if self.payload_type not in self.WIRE_TYPES:
            raise ValueError(f"{type(self).__name__} cannot be payload type {self.payload_type}")

    def fixed_values(self) -> dict[str, Any]:
        return {"count": len(self.selectors) + len(self.unknown_selectors)}

    def encode_tail(self) -> bytes:
        parts = [s.encode() for s in self.selectors] + [u.encode() for u in self.unknown_selectors]
        return b"".join(parts)

    @classmethod
    def from_wire(cls, values: dict[str, Any], tail: bytes) -> Self:
        selectors: list[TrafficSelector] = []
        unknown: list[UnknownSelector] = []
        position = 0
        for _ in range(values["count"]):
            head = _SELECTOR.unpack(tail, position)
            length = head["length"]
            if length < _SELECTOR.size or length > len(tail) - position:
                raise MalformedMessage("bad_ts_length", f"selector length {length}")
            ts_type = as_enum(TsType, head["ts_type"])
            if not isinstance(ts_type, TsType):
                data = tail[position + _SELECTOR.size : position + length]
                unknown.append(UnknownSelector(ts_type, head["ip_protocol"], data))
                position += length
                continue
            if length != _SELECTOR_LENGTH[ts_type]:
                raise MalformedMessage("bad_ts_length", f"{ts_type.name} length {length}")
            ports = _PORTS.unpack(tail, position + _SELECTOR.size)
            octets = _ADDRESS_OCTETS[ts_type]
            start = position + _SELECTOR.size + _PORTS.size
            make = ipaddress.IPv4Address if octets == 4 else ipaddress.IPv6Address
            selectors.append(
                TrafficSelector(
                    ts_type=ts_type,
                    ip_protocol=head["ip_protocol"],
                    start_port=ports["start_port"],
                    end_port=ports["end_port"],
                    start_address=make(tail[start : start + octets]),
                    end_address=make(tail[start + octets : start + 2 * octets]),
                )
            )
            position += length
        if position != len(tail):
            raise MalformedMessage("bad_payload_length", f"{len(tail) - position} octets after TS")
        return cls(
            selectors=selectors, payload_type=values["payload_type"], unknown_selectors=unknown
        )
