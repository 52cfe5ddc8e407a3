"""Security Association payload: proposals, transforms, attributes (RFC 7296 3.3).

Layout checked here: substructure lengths, Last Substruc values (0 = last,
2 = more proposals, 3 = more transforms), transform counts. Whether proposal
numbers are consecutive, SPI sizes fit the protocol, or a proposal has the
transforms its protocol needs is checked by proposal selection, not here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

from ikefarm.shared.ikev2.constants import (
    PayloadType,
    ProtocolId,
    TransformAttribute,
    TransformType,
)
from ikefarm.shared.ikev2.errors import MalformedMessage
from ikefarm.shared.ikev2.payloads.base import Payload, register
from ikefarm.shared.ikev2.payloads.fields import FieldTable, as_enum

LAST = 0
MORE_PROPOSALS = 2  # RFC 7296 3.3.1
MORE_TRANSFORMS = 3  # RFC 7296 3.3.2
ATTRIBUTE_TV = 0x8000  # AF bit, RFC 7296 3.3.5

_PROPOSAL = FieldTable(
    "proposal",
    ("last", "B"),
    ("reserved", "x"),
    ("length", "H"),
    ("number", "B"),
    ("protocol_id", "B"),
    ("spi_size", "B"),
    ("num_transforms", "B"),
)
_TRANSFORM = FieldTable(
    "transform",
    ("last", "B"),
    ("reserved", "x"),
    ("length", "H"),
    ("transform_type", "B"),
    ("reserved", "x"),
    ("transform_id", "H"),
)
_ATTRIBUTE = FieldTable("transform_attribute", ("type", "H"), ("value", "H"))


@dataclass(frozen=True)
class RawAttribute:
    """A transform attribute this codec does not interpret (RFC 7296 3.3.5).

    `tv` is the AF bit: the value is then the 2-octet value itself, otherwise the
    TLV value. Its presence makes the transform unusable (3.3.6).
    """

    attribute_type: int
    value: bytes
    tv: bool = False

    def encode(self) -> bytes:
        if self.tv:
            if len(self.value) != 2:
                raise ValueError("a TV attribute value is exactly 2 octets")
            value = int.from_bytes(self.value, "big")
            return _ATTRIBUTE.pack({"type": ATTRIBUTE_TV | self.attribute_type, "value": value})
        head = {"type": self.attribute_type, "value": len(self.value)}
        return _ATTRIBUTE.pack(head) + bytes(self.value)


@dataclass(frozen=True)
class Transform:
    """One transform substructure (RFC 7296 3.3.2).

    `key_length` is the KEY_LENGTH attribute (TV, bits). Any other attribute, or
    KEY_LENGTH in TLV form or repeated, lands in `unknown_attributes`; RFC 7296
    3.3.6 says a transform with an unrecognized attribute is not selected, so
    selection skips transforms whose `usable` is False.
    """

    transform_type: TransformType | int
    transform_id: int
    key_length: int | None = None
    unknown_attributes: tuple[RawAttribute, ...] = field(default=())

    @property
    def usable(self) -> bool:
        return not self.unknown_attributes

    def encode(self, last: bool) -> bytes:
        attributes = b""
        if self.key_length is not None:
            attributes += _ATTRIBUTE.pack_values(
                ATTRIBUTE_TV | TransformAttribute.KEY_LENGTH, self.key_length
            )
        for attribute in self.unknown_attributes:
            attributes += attribute.encode()
        length = _TRANSFORM.size + len(attributes)
        fixed = _TRANSFORM.pack_values(
            LAST if last else MORE_TRANSFORMS, length, self.transform_type, self.transform_id
        )
        return fixed + attributes

    @classmethod
    def decode(cls, data: bytes, offset: int, end: int) -> tuple[Self, int, int]:
        """Decode the transform at `offset`; return it, its Last Substruc and the next offset."""
        last, length, transform_type, transform_id = _TRANSFORM.unpack_values(data, offset, end)
        if length < _TRANSFORM.size or length > end - offset:
            raise MalformedMessage("bad_transform_length", f"length {length}")
        key_length: int | None = None
        unknown: list[RawAttribute] = []
        position, stop = offset + _TRANSFORM.size, offset + length
        while position < stop:
            type_field, attribute_value = _ATTRIBUTE.unpack_values(data, position, stop)
            attribute_type = type_field & ~ATTRIBUTE_TV
            if type_field & ATTRIBUTE_TV:
                value = data[position + 2 : position + 4]
                position += _ATTRIBUTE.size
                if attribute_type == TransformAttribute.KEY_LENGTH and key_length is None:
                    key_length = attribute_value
                else:
                    unknown.append(RawAttribute(attribute_type, value, tv=True))
            else:
                value_length = attribute_value
                position += _ATTRIBUTE.size
                if value_length > stop - position:
                    raise MalformedMessage("bad_attribute_length", f"length {value_length}")
                value = data[position : position + value_length]
                position += value_length
                unknown.append(RawAttribute(attribute_type, value, tv=False))
        transform = cls(
            transform_type=as_enum(TransformType, transform_type),
            transform_id=transform_id,
            key_length=key_length,
            unknown_attributes=tuple(unknown),
        )
        return transform, last, stop


@dataclass
class Proposal:
    """One proposal substructure (RFC 7296 3.3.1)."""

    number: int
    protocol_id: ProtocolId | int
    spi: bytes
    transforms: list[Transform]

    def encode(self, last: bool) -> bytes:
        if len(self.transforms) > 0xFF:
            raise ValueError("at most 255 transforms per proposal")
        body = bytearray()
        for index, transform in enumerate(self.transforms):
            body += transform.encode(last=index == len(self.transforms) - 1)
        length = _PROPOSAL.size + len(self.spi) + len(body)
        fixed = _PROPOSAL.pack(
            {
                "last": LAST if last else MORE_PROPOSALS,
                "length": length,
                "number": self.number,
                "protocol_id": self.protocol_id,
                "spi_size": len(self.spi),
                "num_transforms": len(self.transforms),
            }
        )
        return fixed + bytes(self.spi) + bytes(body)

    @classmethod
    def decode(cls, data: bytes, offset: int) -> tuple[Self, int, int]:
        """Decode the proposal at `offset`; return it, its Last Substruc and the next offset."""
        values = _PROPOSAL.unpack(data, offset)
        length = values["length"]
        end = offset + length
        spi_start = offset + _PROPOSAL.size
        if length < _PROPOSAL.size + values["spi_size"] or end > len(data):
            raise MalformedMessage("bad_proposal_length", f"length {length}")
        spi = data[spi_start : spi_start + values["spi_size"]]
        transforms: list[Transform] = []
        position = spi_start + values["spi_size"]
        last = MORE_TRANSFORMS
        while position < end:
            if last != MORE_TRANSFORMS:
                raise MalformedMessage("bad_substructure_flag", "transform after the last one")
            transform, last, position = Transform.decode(data, position, end)
            if last not in (LAST, MORE_TRANSFORMS):
                raise MalformedMessage("bad_substructure_flag", f"transform last={last}")
            transforms.append(transform)
        if transforms and last != LAST:
            raise MalformedMessage("bad_substructure_flag", "last transform not marked last")
        if len(transforms) != values["num_transforms"]:
            raise MalformedMessage(
                "bad_transform_count",
                f"{len(transforms)} transforms, header says {values['num_transforms']}",
            )
        proposal = cls(
            number=values["number"],
            protocol_id=as_enum(ProtocolId, values["protocol_id"]),
            spi=spi,
            transforms=transforms,
        )
        return proposal, values["last"], end

    def transforms_of(self, transform_type: TransformType) -> list[Transform]:
        return [t for t in self.transforms if t.transform_type == transform_type]


@register
@dataclass
class SaPayload(Payload):
    """RFC 7296 3.3."""

    proposals: list[Proposal]
    payload_type: ClassVar[PayloadType] = PayloadType.SA

    def encode_tail(self) -> bytes:
        out = bytearray()
        for index, proposal in enumerate(self.proposals):
            out += proposal.encode(last=index == len(self.proposals) - 1)
        return bytes(out)

    @classmethod
    def from_wire(cls, values: dict[str, Any], tail: bytes) -> Self:
        proposals: list[Proposal] = []
        position = 0
        last = MORE_PROPOSALS
        while position < len(tail):
            if last != MORE_PROPOSALS:
                raise MalformedMessage("bad_substructure_flag", "proposal after the last one")
            proposal, last, position = Proposal.decode(tail, position)
            if last not in (LAST, MORE_PROPOSALS):
                raise MalformedMessage("bad_substructure_flag", f"proposal last={last}")
            proposals.append(proposal)
        if proposals and last != LAST:
            raise MalformedMessage("bad_substructure_flag", "last proposal not marked last")
        return cls(proposals=proposals)
