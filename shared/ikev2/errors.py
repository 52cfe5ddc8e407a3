"""Decode errors of the IKEv2 codec.

Every problem found in bytes from the wire raises a `MalformedMessage` (or a
subclass). Its `reason` is a short, stable, machine-readable label that the
services use as the drop-counter label; `detail` is a human hint. Neither ever
carries key material or decrypted content: only lengths, type numbers and
offsets.

`notify_type` names the error notification RFC 7296 suggests for the case, so
a responder can answer without a lookup table of its own (2.21.1, 3.10.1).
"""

from __future__ import annotations

from typing import ClassVar

from ikefarm.shared.ikev2.constants import NotifyType


class MalformedMessage(ValueError):
    """A datagram (or decrypted inner chain) that does not follow RFC 7296 section 3."""

    notify_type: ClassVar[NotifyType] = NotifyType.INVALID_SYNTAX

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class UnsupportedCriticalPayload(MalformedMessage):
    """An unknown payload type with the critical bit set (RFC 7296 2.5, 3.2).

    The responder answers UNSUPPORTED_CRITICAL_PAYLOAD whose notification data
    is the one-octet `payload_type`.
    """

    notify_type: ClassVar[NotifyType] = NotifyType.UNSUPPORTED_CRITICAL_PAYLOAD

    def __init__(self, payload_type: int) -> None:
        self.payload_type = payload_type
        super().__init__("unsupported_critical_payload", f"payload type {payload_type}")


class InvalidMajorVersion(MalformedMessage):
    """Major version other than 2 (RFC 7296 3.1, answered per 2.5 with version 2)."""

    notify_type: ClassVar[NotifyType] = NotifyType.INVALID_MAJOR_VERSION

    def __init__(self, major_version: int) -> None:
        self.major_version = major_version
        super().__init__("invalid_major_version", f"major version {major_version}")
