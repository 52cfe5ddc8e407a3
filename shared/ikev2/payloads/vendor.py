"""Vendor ID payload (RFC 7296 3.12)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ikefarm.shared.ikev2.constants import PayloadType
from ikefarm.shared.ikev2.payloads.base import Payload, register


@register
@dataclass
class VendorIdPayload(Payload):
    data: bytes
    payload_type: ClassVar[PayloadType] = PayloadType.VENDOR_ID
    TAIL: ClassVar[str | None] = "data"
