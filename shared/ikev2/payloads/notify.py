"""Notify payload (RFC 7296 3.10)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Any, ClassVar, Self

from ikefarm.shared.ikev2.constants import ERROR_NOTIFY_MAX, NotifyType, PayloadType, ProtocolId
from ikefarm.shared.ikev2.errors import MalformedMessage
from ikefarm.shared.ikev2.payloads.base import Payload, register
from ikefarm.shared.ikev2.payloads.fields import FieldTable


@register
@dataclass
class NotifyPayload(Payload):
    """Protocol ID (1) | SPI Size (1) | Notify Message Type (2) | SPI | Notification Data."""

    notify_type: NotifyType | int
    protocol_id: ProtocolId | int = ProtocolId.NONE
    spi: bytes = b""
    data: bytes = b""
    payload_type: ClassVar[PayloadType] = PayloadType.NOTIFY
    FIELDS: ClassVar[FieldTable] = FieldTable(
        "notify", ("protocol_id", "B"), ("spi_size", "B"), ("notify_type", "H")
    )
    ENUMS: ClassVar[dict[str, type[IntEnum]]] = {
        "protocol_id": ProtocolId,
        "notify_type": NotifyType,
    }

    @property
    def is_error(self) -> bool:
        return int(self.notify_type) <= ERROR_NOTIFY_MAX

    def fixed_values(self) -> dict[str, Any]:
        return {**super().fixed_values(), "spi_size": len(self.spi)}

    def encode_tail(self) -> bytes:
        return bytes(self.spi) + bytes(self.data)

    @classmethod
    def from_wire(cls, values: dict[str, Any], tail: bytes) -> Self:
        spi_size = values.pop("spi_size")
        if spi_size > len(tail):
            raise MalformedMessage("bad_spi_size", f"notify SPI size {spi_size}")
        return cls(**values, spi=tail[:spi_size], data=tail[spi_size:])
