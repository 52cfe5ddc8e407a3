"""Identification payloads IDi / IDr (RFC 7296 3.5)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar, Self

from ikefarm.shared.ikev2.constants import IdType, PayloadType
from ikefarm.shared.ikev2.errors import MalformedMessage
from ikefarm.shared.ikev2.payloads.base import Payload, register
from ikefarm.shared.ikev2.payloads.fields import FieldTable

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_ADDRESS_LENGTH = {IdType.ID_IPV4_ADDR: 4, IdType.ID_IPV6_ADDR: 16}
_TEXT_TYPES = (IdType.ID_FQDN, IdType.ID_RFC822_ADDR)


@register
@dataclass
class IdPayload(Payload):
    """ID Type (1) | RESERVED (3) | Identification Data.

    `encode_body()` is RestOfInitIDPayload / RestOfRespIDPayload of the AUTH
    computation (RFC 7296 2.15).
    """

    id_type: IdType | int
    data: bytes
    payload_type: PayloadType = PayloadType.IDi
    WIRE_TYPES: ClassVar[tuple[PayloadType, ...]] = (PayloadType.IDi, PayloadType.IDr)
    FIELDS: ClassVar[FieldTable] = FieldTable("id", ("id_type", "B"), ("reserved", "3x"))
    TAIL: ClassVar[str | None] = "data"
    ENUMS: ClassVar[dict[str, type[IntEnum]]] = {"id_type": IdType}

    def __post_init__(self) -> None:
        if self.payload_type not in self.WIRE_TYPES:
            raise ValueError(f"{type(self).__name__} cannot be payload type {self.payload_type}")

    def check(self) -> None:
        expected = _ADDRESS_LENGTH.get(self.id_type)  # type: ignore[call-overload]
        if expected is not None and len(self.data) != expected:
            raise MalformedMessage("bad_id_length", f"ID type {self.id_type}: {len(self.data)}")

    # -- builders -----------------------------------------------------------

    @classmethod
    def from_address(
        cls, address: IPAddress | str, payload_type: PayloadType = PayloadType.IDi
    ) -> Self:
        parsed = ipaddress.ip_address(address)
        id_type = IdType.ID_IPV4_ADDR if parsed.version == 4 else IdType.ID_IPV6_ADDR
        return cls(id_type, parsed.packed, payload_type)

    @classmethod
    def from_fqdn(cls, fqdn: str, payload_type: PayloadType = PayloadType.IDi) -> Self:
        return cls(IdType.ID_FQDN, fqdn.encode("ascii"), payload_type)

    @classmethod
    def from_rfc822(cls, address: str, payload_type: PayloadType = PayloadType.IDi) -> Self:
        return cls(IdType.ID_RFC822_ADDR, address.encode("ascii"), payload_type)

    @classmethod
    def from_key_id(cls, key_id: bytes, payload_type: PayloadType = PayloadType.IDi) -> Self:
        return cls(IdType.ID_KEY_ID, bytes(key_id), payload_type)

    @classmethod
    def from_der_dn(cls, der: bytes, payload_type: PayloadType = PayloadType.IDi) -> Self:
        return cls(IdType.ID_DER_ASN1_DN, bytes(der), payload_type)

    @classmethod
    def from_string(cls, text: str, payload_type: PayloadType = PayloadType.IDi) -> Self:
        """Parse an identity the way strongSwan's config does for the common types.

        ``192.0.2.1`` / ``2001:db8::1`` -> address; ``@#0a0b`` -> KEY_ID (hex);
        ``@gw.example`` or ``gw.example`` -> FQDN; ``user@example`` -> RFC822.
        Distinguished names need DER: use `from_der_dn`.
        """
        try:
            return cls.from_address(text, payload_type)
        except ValueError:
            pass
        if text.startswith("@#"):
            return cls.from_key_id(bytes.fromhex(text[2:]), payload_type)
        if text.startswith("@"):
            return cls.from_fqdn(text[1:], payload_type)
        if "@" in text:
            return cls.from_rfc822(text, payload_type)
        if "=" in text:
            raise ValueError("distinguished names need DER encoding: use IdPayload.from_der_dn")
        return cls.from_fqdn(text, payload_type)

    # -- readers ------------------------------------------------------------

    @property
    def address(self) -> IPAddress:
        """The address of an ID_IPV4_ADDR / ID_IPV6_ADDR identity (ValueError otherwise)."""
        if self.id_type == IdType.ID_IPV4_ADDR and len(self.data) == 4:
            return ipaddress.IPv4Address(self.data)
        if self.id_type == IdType.ID_IPV6_ADDR and len(self.data) == 16:
            return ipaddress.IPv6Address(self.data)
        raise ValueError(f"ID type {self.id_type} is not an address")

    @property
    def text(self) -> str:
        """The name of an ID_FQDN / ID_RFC822_ADDR identity (ValueError otherwise)."""
        if self.id_type not in _TEXT_TYPES:
            raise ValueError(f"ID type {self.id_type} is not a name")
        return self.data.decode("ascii")

    def __str__(self) -> str:
        """As strongSwan prints identities: ``192.0.2.1``, ``gw.example``, ``user@example``."""
        try:
            if self.id_type in _ADDRESS_LENGTH:
                return str(self.address)
            if self.id_type in _TEXT_TYPES and self.data.isascii():
                text = self.text
                if text.isprintable():
                    return text
        except ValueError:
            pass
        if self.id_type == IdType.ID_KEY_ID:
            return "@#" + self.data.hex()
        if self.id_type == IdType.ID_DER_ASN1_DN:
            return "asn1dn:#" + self.data.hex()
        return f"{int(self.id_type)}:#{self.data.hex()}"
