"""The payload base class, the generic payload header and the payload chain.

RFC 7296 3.2: every payload starts with a generic header

    Next Payload (1) | C | RESERVED (7 bits) | Payload Length (2)

where Payload Length counts the header. Payloads are chained by the Next
Payload field; the first type is in the IKE header (or, inside an Encrypted
payload, in the SK/SKF header).

A payload class is a dataclass that declares

- its type code: ``payload_type: ClassVar[PayloadType]``, or, for the classes
  that serve two codes (IDi/IDr, TSi/TSr), a dataclass field ``payload_type``
  plus ``WIRE_TYPES``;
- ``FIELDS``: the `FieldTable` of its fixed leading fields; every name in it
  is a dataclass attribute unless the class derives it in `fixed_values`;
- ``TAIL``: the attribute that holds the variable rest as bytes, or None;
- ``ENUMS``: fixed fields decoded into an IANA IntEnum when the number is known.

Classes with structured tails (SA, TS, CP, Notify, Delete) override
`encode_tail` and `from_wire`; the simple ones need no code at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Any, ClassVar, Self, TypeVar

from ikefarm.shared.ikev2.constants import PayloadType
from ikefarm.shared.ikev2.errors import MalformedMessage, UnsupportedCriticalPayload
from ikefarm.shared.ikev2.payloads.fields import FieldTable, as_enum

GENERIC_HEADER = FieldTable(
    "payload_header", ("next_payload", "B"), ("flags", "B"), ("length", "H")
)
CRITICAL = 0x80
MAX_PAYLOAD_LENGTH = 0xFFFF
ENCRYPTED_TYPES = frozenset({PayloadType.SK, PayloadType.SKF})


class Payload:
    """Base of every payload dataclass (subclasses are ``@dataclass``)."""

    payload_type: ClassVar[int]
    WIRE_TYPES: ClassVar[tuple[PayloadType, ...]] = ()
    FIELDS: ClassVar[FieldTable] = FieldTable("payload")
    TAIL: ClassVar[str | None] = None
    ENUMS: ClassVar[dict[str, type[IntEnum]]] = {}  # fields shown as IANA names when known

    # -- encoding -----------------------------------------------------------

    def fixed_values(self) -> dict[str, Any]:
        """Values of the `FIELDS` entries; override to add derived ones (lengths, counts)."""
        return {name: getattr(self, name) for name in self.FIELDS.names if hasattr(self, name)}

    def encode_tail(self) -> bytes:
        return bytes(getattr(self, self.TAIL)) if self.TAIL else b""

    def encode_body(self) -> bytes:
        """The payload without its generic header (e.g. RestOfInitIDPayload, RFC 7296 2.15)."""
        return self.FIELDS.pack(self.fixed_values()) + self.encode_tail()

    def encode(self, next_payload: int) -> bytes:
        body = self.encode_body()
        length = GENERIC_HEADER.size + len(body)
        if length > MAX_PAYLOAD_LENGTH:
            raise ValueError(f"{type(self).__name__} too long for one payload: {length} octets")
        # RFC 7296 3.2: C is zero for every type we define; UnknownPayload keeps its own
        flags = CRITICAL if getattr(self, "critical", False) else 0
        return GENERIC_HEADER.pack_values(next_payload, flags, length) + body

    # -- decoding -----------------------------------------------------------

    @classmethod
    def decode_body(cls, payload_type: int, body: bytes) -> Self:
        values = cls.FIELDS.unpack(body)
        tail = body[cls.FIELDS.size :]
        for name, enum_type in cls.ENUMS.items():
            values[name] = as_enum(enum_type, values[name])
        if cls.WIRE_TYPES:  # one class, two codes: the code is a field
            values["payload_type"] = as_enum(PayloadType, payload_type)
        payload = cls.from_wire(values, tail)
        payload.check()
        return payload

    @classmethod
    def from_wire(cls, values: dict[str, Any], tail: bytes) -> Self:
        """Build from the unpacked fixed fields and the rest of the body."""
        if cls.TAIL is not None:
            values[cls.TAIL] = tail
        elif tail:
            raise MalformedMessage(
                "bad_payload_length", f"{cls.__name__}: {len(tail)} extra octets"
            )
        return cls(**values)

    def check(self) -> None:
        """Semantic checks on a decoded payload; raise `MalformedMessage`."""


_REGISTRY: dict[int, type[Payload]] = {}
P = TypeVar("P", bound=type[Payload])


def register(cls: P) -> P:
    """Class decorator: make `cls` the decoder of its payload type code(s)."""
    for code in cls.WIRE_TYPES or (cls.payload_type,):
        if code in _REGISTRY:
            raise ValueError(f"payload type {code} registered twice")
        _REGISTRY[int(code)] = cls
    return cls


def payload_class(payload_type: int) -> type[Payload] | None:
    return _REGISTRY.get(payload_type)


@dataclass
class UnknownPayload(Payload):
    """A payload of a type we do not implement, skipped because its critical bit is clear.

    Kept so it can be logged and counted; re-encoded as received.
    """

    payload_type: int  # type: ignore[misc]
    critical: bool
    body: bytes
    TAIL: ClassVar[str | None] = "body"


# -- the chain -------------------------------------------------------------


@dataclass
class Chain:
    """A decoded payload chain.

    When the outer chain ends in an Encrypted (SK) or Encrypted Fragment (SKF)
    payload, `encrypted_offset` is the offset of its generic header in the
    datagram and `inner_first_payload` its Next Payload field: the type of the
    first payload inside (RFC 7296 3.14, RFC 7383 2.5).
    """

    payloads: list[Payload]
    encrypted_offset: int | None = None
    inner_first_payload: int = PayloadType.NONE


def encode_chain(payloads: list[Payload], last_next: int = PayloadType.NONE) -> bytes:
    """Serialize payloads, each Next Payload naming the one after it."""
    out = bytearray()
    for index, payload in enumerate(payloads):
        following = payloads[index + 1].payload_type if index + 1 < len(payloads) else last_next
        out += payload.encode(int(following))
    return bytes(out)


def decode_chain(
    data: bytes, first_type: int, offset: int = 0, *, allow_encrypted: bool = False
) -> Chain:
    """Decode the chain starting at `offset` whose first payload type is `first_type`.

    The chain must end exactly at the end of `data` (RFC 7296 3.2: Payload Length
    is exact). With `allow_encrypted` (the outer chain of a datagram), an SK or
    SKF payload ends the chain and must be the last octets (RFC 7296 3.14); inside
    an Encrypted payload one is an error.
    """
    chain = Chain(payloads=[])
    next_type = first_type
    end = len(data)
    while next_type != PayloadType.NONE:
        if end - offset < GENERIC_HEADER.size:
            raise MalformedMessage("truncated_payload_header", f"payload type {next_type}")
        following, flags, length = GENERIC_HEADER.unpack_values(data, offset)
        if length < GENERIC_HEADER.size or length > end - offset:
            raise MalformedMessage(
                "bad_payload_length", f"payload type {next_type}: length {length}"
            )
        body = data[offset + GENERIC_HEADER.size : offset + length]
        critical = bool(flags & CRITICAL)
        cls = payload_class(next_type)
        payload: Payload
        if cls is None:
            if critical:
                raise UnsupportedCriticalPayload(next_type)
            payload = UnknownPayload(payload_type=next_type, critical=False, body=body)
        elif next_type in ENCRYPTED_TYPES:
            if not allow_encrypted:
                raise MalformedMessage("nested_encrypted_payload", f"payload type {next_type}")
            if offset + length != end:
                raise MalformedMessage("encrypted_payload_not_last")
            payload = cls.decode_body(next_type, body)
            chain.payloads.append(payload)
            chain.encrypted_offset = offset
            chain.inner_first_payload = following
            return chain
        else:
            payload = cls.decode_body(next_type, body)
        chain.payloads.append(payload)
        offset += length
        next_type = following
    if offset != end:
        raise MalformedMessage("trailing_data", f"{end - offset} octets after the last payload")
    return chain
