"""Key Exchange payload (RFC 7296 3.4)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar

from ikefarm.shared.ikev2.constants import DhId, PayloadType
from ikefarm.shared.ikev2.payloads.base import Payload, register
from ikefarm.shared.ikev2.payloads.fields import FieldTable


@register
@dataclass
class KePayload(Payload):
    """Diffie-Hellman Group Num (2) | RESERVED (2) | Key Exchange Data.

    Whether `key_data` has the group's length is the DH code's check (RFC 7296
    3.4 asks for INVALID_SYNTAX there), not the codec's.
    """

    dh_group: DhId | int
    key_data: bytes
    payload_type: ClassVar[PayloadType] = PayloadType.KE
    FIELDS: ClassVar[FieldTable] = FieldTable("ke", ("dh_group", "H"), ("reserved", "2x"))
    TAIL: ClassVar[str | None] = "key_data"
    ENUMS: ClassVar[dict[str, type[IntEnum]]] = {"dh_group": DhId}
