"""Delete payload (RFC 7296 3.11)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, ClassVar, Self

from ikefarm.shared.ikev2.constants import PayloadType, ProtocolId
from ikefarm.shared.ikev2.errors import MalformedMessage
from ikefarm.shared.ikev2.payloads.base import Payload, register
from ikefarm.shared.ikev2.payloads.fields import FieldTable

# RFC 7296 3.11: zero for IKE (the SPIs are in the header), four for AH and ESP
SPI_SIZE = {ProtocolId.IKE: 0, ProtocolId.AH: 4, ProtocolId.ESP: 4}


@register
@dataclass
class DeletePayload(Payload):
    """Protocol ID (1) | SPI Size (1) | Num of SPIs (2) | SPIs.

    Deleting the IKE SA is protocol IKE with no SPIs; AH/ESP list 4-octet SPIs.
    """

    protocol_id: ProtocolId | int
    spis: list[bytes] = field(default_factory=list)
    payload_type: ClassVar[PayloadType] = PayloadType.DELETE
    FIELDS: ClassVar[FieldTable] = FieldTable(
        "delete", ("protocol_id", "B"), ("spi_size", "B"), ("num_spis", "H")
    )
    ENUMS: ClassVar[dict[str, type[IntEnum]]] = {"protocol_id": ProtocolId}

    def fixed_values(self) -> dict[str, Any]:
        size = SPI_SIZE.get(self.protocol_id)  # type: ignore[call-overload]
        if size is None:
            raise ValueError(f"cannot delete protocol {self.protocol_id}")
        if any(len(spi) != size for spi in self.spis) or (size == 0 and self.spis):
            raise ValueError(f"protocol {self.protocol_id} SPIs are {size} octets")
        return {"protocol_id": self.protocol_id, "spi_size": size, "num_spis": len(self.spis)}

    def encode_tail(self) -> bytes:
        return b"".join(bytes(spi) for spi in self.spis)

    @classmethod
    def from_wire(cls, values: dict[str, Any], tail: bytes) -> Self:
        protocol_id, spi_size, count = values["protocol_id"], values["spi_size"], values["num_spis"]
        expected = SPI_SIZE.get(protocol_id)
        if expected is None:
            raise MalformedMessage("bad_delete_protocol", f"protocol {protocol_id}")
        if spi_size != expected or (expected == 0 and count != 0):
            raise MalformedMessage("bad_spi_size", f"delete protocol {protocol_id}: {spi_size}")
        if len(tail) != spi_size * count:
            raise MalformedMessage("bad_payload_length", f"delete: {count} SPIs, {len(tail)}")
        spis = [tail[i : i + spi_size] for i in range(0, len(tail), spi_size)] if spi_size else []
        return cls(protocol_id=protocol_id, spis=spis)
