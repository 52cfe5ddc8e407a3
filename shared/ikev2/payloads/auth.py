"""Authentication payload (RFC 7296 3.8)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar

from ikefarm.shared.ikev2.constants import AuthMethod, PayloadType
from ikefarm.shared.ikev2.payloads.base import Payload, register
from ikefarm.shared.ikev2.payloads.fields import FieldTable


@register
@dataclass
class AuthPayload(Payload):
    """Auth Method (1) | RESERVED (3) | Authentication Data."""

    method: AuthMethod | int
    data: bytes
    payload_type: ClassVar[PayloadType] = PayloadType.AUTH
    FIELDS: ClassVar[FieldTable] = FieldTable("auth", ("method", "B"), ("reserved", "3x"))
    TAIL: ClassVar[str | None] = "data"
    ENUMS: ClassVar[dict[str, type[IntEnum]]] = {"method": AuthMethod}

    def __repr__(self) -> str:  # the AUTH value is a MAC over key material: keep it out of logs
        return f"AuthPayload(method={self.method!r}, data=<{len(self.data)} octets>)"
