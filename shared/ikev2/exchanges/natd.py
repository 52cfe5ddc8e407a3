"""NAT detection (RFC 7296 2.23): NAT_DETECTION_SOURCE_IP / _DESTINATION_IP hashes."""

from __future__ import annotations

import functools
import hmac
import ipaddress

from cryptography.hazmat.primitives import hashes

from ikefarm.shared.ikev2.constants import NotifyType
from ikefarm.shared.ikev2.effects import Endpoint
from ikefarm.shared.ikev2.message import Message
from ikefarm.shared.ikev2.payloads import NotifyPayload


@functools.lru_cache(maxsize=4096)
def _packed(address: str) -> bytes:
    """The address in network order; cached (bounded), it is hashed four times per handshake."""
    return ipaddress.ip_address(address).packed


def natd_hash(spi_i: bytes, spi_r: bytes, endpoint: Endpoint) -> bytes:
    """SHA-1(SPIi | SPIr | IP | Port), the SPIs as in the header of the message carrying it."""
    digest = hashes.Hash(hashes.SHA1())  # noqa: S303 - mandated by RFC 7296 2.23
    digest.update(spi_i + spi_r + _packed(endpoint.address) + endpoint.port.to_bytes(2, "big"))
    return digest.finalize()


def natd_notifies(
    spi_i: bytes, spi_r: bytes, local: Endpoint, remote: Endpoint
) -> list[NotifyPayload]:
    return [
        NotifyPayload(NotifyType.NAT_DETECTION_SOURCE_IP, data=natd_hash(spi_i, spi_r, local)),
        NotifyPayload(
            NotifyType.NAT_DETECTION_DESTINATION_IP, data=natd_hash(spi_i, spi_r, remote)
        ),
    ]


def detect_nat(message: Message, local: Endpoint, remote: Endpoint) -> tuple[bool, bool] | None:
    """(we are behind a NAT, the peer is behind a NAT), or None when the peer sent no NAT-D.

    The peer's SOURCE_IP hashes describe where it thinks it sends from: if none
    matches the address we see, the peer is NATed. Its DESTINATION_IP hash is
    where it sent to: if it is not our address, we are NATed.
    """
    sources = [
        n.data for n in message.notifies() if n.notify_type == NotifyType.NAT_DETECTION_SOURCE_IP
    ]
    destination = message.notify(NotifyType.NAT_DETECTION_DESTINATION_IP)
    if not sources or destination is None:
        return None
    seen_source = natd_hash(message.spi_i, message.spi_r, remote)
    seen_destination = natd_hash(message.spi_i, message.spi_r, local)
    peer_natted = not any(hmac.compare_digest(seen_source, s) for s in sources)
    we_are_natted = not hmac.compare_digest(seen_destination, destination.data)
    return we_are_natted, peer_natted
