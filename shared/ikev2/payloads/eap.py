"""EAP payload (RFC 7296 3.16) carrying one whole EAP message (RFC 3748 4)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ikefarm.shared.ikev2.constants import PayloadType
from ikefarm.shared.ikev2.errors import MalformedMessage
from ikefarm.shared.ikev2.payloads.base import Payload, register

EAP_HEADER_LENGTH = 4  # Code (1) | Identifier (1) | Length (2)
EAP_REQUEST = 1
EAP_RESPONSE = 2


@register
@dataclass
class EapPayload(Payload):
    """`data` is the EAP message; its own Length field must match (RFC 3748 4)."""

    data: bytes
    payload_type: ClassVar[PayloadType] = PayloadType.EAP
    TAIL: ClassVar[str | None] = "data"

    def check(self) -> None:
        if len(self.data) < EAP_HEADER_LENGTH:
            raise MalformedMessage("bad_eap_length", f"{len(self.data)} octets")
        declared = int.from_bytes(self.data[2:4], "big")
        if declared != len(self.data):
            raise MalformedMessage("bad_eap_length", f"EAP length {declared}, {len(self.data)}")
        if self.code in (EAP_REQUEST, EAP_RESPONSE) and declared < EAP_HEADER_LENGTH + 1:
            raise MalformedMessage("bad_eap_length", "request/response without a Type")

    def __repr__(self) -> str:  # EAP-GTC and friends carry passwords: keep them out of logs
        code = self.data[0] if self.data else None
        return f"EapPayload(code={code}, data=<{len(self.data)} octets>)"

    @property
    def code(self) -> int:
        return self.data[0]

    @property
    def identifier(self) -> int:
        return self.data[1]

    @property
    def eap_type(self) -> int | None:
        """The Type octet of a Request/Response, else None."""
        if self.code in (EAP_REQUEST, EAP_RESPONSE) and len(self.data) > EAP_HEADER_LENGTH:
            return self.data[EAP_HEADER_LENGTH]
        return None
