"""What a UDP port 4500 datagram carries (RFC 3948 2.1-2.3).

- IKE: the payload starts with the 4-octet non-ESP marker (zero); the IKE
  message follows it and is at least an IKE header (RFC 7296 3.1).
- NAT keepalive: exactly one octet 0xFF (RFC 3948 2.3).
- ESP: anything else whose first four octets, the SPI, are not zero, at least
  an ESP header (SPI and sequence number) long (RFC 3948 2.1).
- malformed: shorter than any of these.

The classifier looks at the first octets only; decapsulation checks the rest.
"""

from __future__ import annotations

from enum import StrEnum

from ikefarm.shared.esp.transforms import ESP_HEADER_SIZE
from ikefarm.shared.ikev2.constants import IKE_HEADER_LENGTH, NON_ESP_MARKER

__all__ = ["NAT_KEEPALIVE", "UdpEncapKind", "classify_udp_encap"]

NAT_KEEPALIVE = b"\xff"


class UdpEncapKind(StrEnum):
    IKE = "ike"
    ESP = "esp"
    KEEPALIVE = "keepalive"
    MALFORMED = "malformed"


def classify_udp_encap(payload: bytes) -> UdpEncapKind:
    """Which handler a UDP-4500 payload goes to; an IKE payload keeps its marker here."""
    if payload == NAT_KEEPALIVE:
        return UdpEncapKind.KEEPALIVE
    if payload[:4] == NON_ESP_MARKER:
        if len(payload) >= len(NON_ESP_MARKER) + IKE_HEADER_LENGTH:
            return UdpEncapKind.IKE
        return UdpEncapKind.MALFORMED
    if len(payload) >= ESP_HEADER_SIZE:
        return UdpEncapKind.ESP
    return UdpEncapKind.MALFORMED
