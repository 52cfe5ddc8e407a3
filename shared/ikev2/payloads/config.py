"""Configuration payload (RFC 7296 3.15)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, ClassVar, Self

from ikefarm.shared.ikev2.constants import CfgAttribute, CfgType, PayloadType
from ikefarm.shared.ikev2.errors import MalformedMessage
from ikefarm.shared.ikev2.payloads.base import Payload, register
from ikefarm.shared.ikev2.payloads.fields import FieldTable, as_enum

_ATTRIBUTE = FieldTable("config_attribute", ("attribute_type", "H"), ("length", "H"))
_ATTRIBUTE_TYPE_MASK = 0x7FFF  # the top bit is reserved (RFC 7296 3.15.1)

# Value lengths each attribute may have (RFC 7296 3.15.1 table; NBNS/NETMASK of IPv6 as
# RFC 4306 defined them, as seed 004 lists them). 0 is the request form. Attributes not
# listed (APPLICATION_VERSION, private ones) may have any length.
VALUE_LENGTHS: dict[int, frozenset[int]] = {
    CfgAttribute.INTERNAL_IP4_ADDRESS: frozenset({0, 4}),
    CfgAttribute.INTERNAL_IP4_NETMASK: frozenset({0, 4}),
    CfgAttribute.INTERNAL_IP4_DNS: frozenset({0, 4}),
    CfgAttribute.INTERNAL_IP4_NBNS: frozenset({0, 4}),
    CfgAttribute.INTERNAL_IP4_DHCP: frozenset({0, 4}),
    CfgAttribute.INTERNAL_IP6_ADDRESS: frozenset({0, 17}),
    CfgAttribute.INTERNAL_IP6_NETMASK: frozenset({0, 16}),
    CfgAttribute.INTERNAL_IP6_DNS: frozenset({0, 16}),
    CfgAttribute.INTERNAL_IP6_NBNS: frozenset({0, 16}),
    CfgAttribute.INTERNAL_IP6_DHCP: frozenset({0, 16}),
    CfgAttribute.INTERNAL_IP4_SUBNET: frozenset({0, 8}),
    CfgAttribute.INTERNAL_IP6_SUBNET: frozenset({0, 17}),
}
_SIX = {
    CfgAttribute.INTERNAL_IP6_ADDRESS,
    CfgAttribute.INTERNAL_IP6_NETMASK,
    CfgAttribute.INTERNAL_IP6_DNS,
    CfgAttribute.INTERNAL_IP6_NBNS,
    CfgAttribute.INTERNAL_IP6_DHCP,
    CfgAttribute.INTERNAL_IP6_SUBNET,
}


@dataclass(frozen=True)
class ConfigAttribute:
    """R (1 bit) | Attribute Type (15 bits) | Length (2) | Value (RFC 7296 3.15.1).

    An empty value is how a CFG_REQUEST asks for an attribute.
    """

    attribute_type: CfgAttribute | int
    value: bytes = b""

    @classmethod
    def from_address(
        cls,
        attribute_type: CfgAttribute | int,
        address: ipaddress.IPv4Address | ipaddress.IPv6Address | str,
        suffix: bytes = b"",
    ) -> Self:
        """An address attribute; `suffix` is e.g. the prefix length octet of an IPv6 address."""
        return cls(attribute_type, ipaddress.ip_address(address).packed + suffix)

    @classmethod
    def subnet(cls, network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> Self:
        """INTERNAL_IP4_SUBNET (address, netmask) or INTERNAL_IP6_SUBNET (address, prefix)."""
        if network.version == 4:
            value = network.network_address.packed + network.netmask.packed
            return cls(CfgAttribute.INTERNAL_IP4_SUBNET, value)
        value = network.network_address.packed + bytes([network.prefixlen])
        return cls(CfgAttribute.INTERNAL_IP6_SUBNET, value)

    def address(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        """The address an address-valued attribute carries (None for the request form)."""
        if not self.value:
            return None
        size = 16 if self.attribute_type in _SIX else 4
        return ipaddress.ip_address(self.value[:size])

    def network(self) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
        """INTERNAL_IP4/6_SUBNET as a network; an IPv6 address with its prefix length."""
        if not self.value:
            return None
        if self.attribute_type == CfgAttribute.INTERNAL_IP4_SUBNET:
            mask = ipaddress.IPv4Address(self.value[4:8])
            return ipaddress.ip_network(f"{ipaddress.IPv4Address(self.value[:4])}/{mask}", False)
        prefix = self.value[16]
        if prefix > 128:
            raise MalformedMessage("bad_attribute_value", f"IPv6 prefix length {prefix}")
        return ipaddress.ip_network(f"{ipaddress.IPv6Address(self.value[:16])}/{prefix}", False)

    def encode(self) -> bytes:
        if len(self.value) > 0xFFFF or not 0 <= self.attribute_type <= _ATTRIBUTE_TYPE_MASK:
            raise ValueError(f"cannot encode configuration attribute {self.attribute_type}")
        head = {"attribute_type": self.attribute_type, "length": len(self.value)}
        return _ATTRIBUTE.pack(head) + bytes(self.value)


@register
@dataclass
class CpPayload(Payload):
    """CFG Type (1) | RESERVED (3) | Configuration Attributes."""

    cfg_type: CfgType | int
    attributes: list[ConfigAttribute] = field(default_factory=list)
    payload_type: ClassVar[PayloadType] = PayloadType.CP
    FIELDS: ClassVar[FieldTable] = FieldTable("cp", ("cfg_type", "B"), ("reserved", "3x"))
    ENUMS: ClassVar[dict[str, type[IntEnum]]] = {"cfg_type": CfgType}

    def encode_tail(self) -> bytes:
        return b"".join(attribute.encode() for attribute in self.attributes)

    @classmethod
    def from_wire(cls, values: dict[str, Any], tail: bytes) -> Self:
        attributes: list[ConfigAttribute] = []
        position = 0
        while position < len(tail):
            head = _ATTRIBUTE.unpack(tail, position)
            position += _ATTRIBUTE.size
            length = head["length"]
            if length > len(tail) - position:
                raise MalformedMessage("bad_attribute_length", f"CP attribute length {length}")
            attribute_type = as_enum(CfgAttribute, head["attribute_type"] & _ATTRIBUTE_TYPE_MASK)
            allowed = VALUE_LENGTHS.get(attribute_type)
            if allowed is not None and length not in allowed:
                raise MalformedMessage(
                    "bad_attribute_length", f"CP attribute {int(attribute_type)} length {length}"
                )
            if (
                attribute_type
                in (
                    CfgAttribute.INTERNAL_IP6_ADDRESS,
                    CfgAttribute.INTERNAL_IP6_SUBNET,
                )
                and length == 17
                and tail[position + 16] > 128
            ):
                raise MalformedMessage("bad_attribute_value", "IPv6 prefix length above 128")
            attributes.append(ConfigAttribute(attribute_type, tail[position : position + length]))
            position += length
        return cls(cfg_type=values["cfg_type"], attributes=attributes)

    def get_all(self, attribute_type: CfgAttribute | int) -> list[ConfigAttribute]:
        return [a for a in self.attributes if a.attribute_type == attribute_type]
