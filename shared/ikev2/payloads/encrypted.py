"""Encrypted (SK, RFC 7296 3.14) and Encrypted Fragment (SKF, RFC 7383 2.5) payloads.

These hold the protected body as received: IV | ciphertext (with padding and
Pad Length) | ICV. The Next Payload field of their generic header names the first
inner payload (for SKF only in fragment 1); the chain decoder reports it, it is
not part of these dataclasses. Sealing and opening is `message.py`'s business.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ikefarm.shared.ikev2.constants import PayloadType
from ikefarm.shared.ikev2.errors import MalformedMessage
from ikefarm.shared.ikev2.payloads.base import Payload, register
from ikefarm.shared.ikev2.payloads.fields import FieldTable


@register
@dataclass
class SkPayload(Payload):
    body: bytes
    payload_type: ClassVar[PayloadType] = PayloadType.SK
    TAIL: ClassVar[str | None] = "body"

    def __repr__(self) -> str:
        return f"SkPayload(body=<{len(self.body)} octets>)"


@register
@dataclass
class SkfPayload(Payload):
    """Fragment Number (2) | Total Fragments (2) | IV | ciphertext | ICV."""

    fragment_number: int
    total_fragments: int
    body: bytes
    payload_type: ClassVar[PayloadType] = PayloadType.SKF
    FIELDS: ClassVar[FieldTable] = FieldTable(
        "skf", ("fragment_number", "H"), ("total_fragments", "H")
    )
    TAIL: ClassVar[str | None] = "body"

    def check(self) -> None:
        # RFC 7383 2.5: numbering starts at 1; 2.6: a number above the total is invalid
        if not 1 <= self.fragment_number <= self.total_fragments:
            raise MalformedMessage(
                "bad_fragment_number",
                f"fragment {self.fragment_number} of {self.total_fragments}",
            )

    def __repr__(self) -> str:
        return (
            f"SkfPayload(fragment_number={self.fragment_number}, "
            f"total_fragments={self.total_fragments}, body=<{len(self.body)} octets>)"
        )
