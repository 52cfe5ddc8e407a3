"""Nonce payload (RFC 7296 3.9)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ikefarm.shared.ikev2.constants import PayloadType
from ikefarm.shared.ikev2.errors import MalformedMessage
from ikefarm.shared.ikev2.payloads.base import Payload, register

NONCE_MIN = 16  # RFC 7296 3.9: "between 16 and 256 octets, inclusive"
NONCE_MAX = 256


@register
@dataclass
class NoncePayload(Payload):
    data: bytes
    payload_type: ClassVar[PayloadType] = PayloadType.NONCE
    TAIL: ClassVar[str | None] = "data"

    def check(self) -> None:
        if not NONCE_MIN <= len(self.data) <= NONCE_MAX:
            raise MalformedMessage("bad_nonce_length", f"{len(self.data)} octets")
