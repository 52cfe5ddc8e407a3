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
            attributes.append(ConfigAttribute(attribute_type, tail[position : position + length]))
            position += length
        return cls(cfg_type=values["cfg_type"], attributes=attributes)

    def get_all(self, attribute_type: CfgAttribute | int) -> list[ConfigAttribute]:
        return [a for a in self.attributes if a.attribute_type == attribute_type]
