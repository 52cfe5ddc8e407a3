"""The IKE header a `Datagram` carries from ingress to its worker, read once.

Ingress reads and checks the fixed header of every datagram it routes (RFC 7296
3.1: 28 octets, major version 2, Length equal to the datagram, SPIi not zero)
and puts the fields in the bus message (`datagram_message`); the worker turns
them back into the engine's `IkeHeader` (`carried_header`) instead of reading
the octets again. The worker checks only that the fields are in range and agree
with the length of the data: a datagram whose fields do not (a bug, or an old
ingress) is read from its octets as before, never trusted.
"""

from __future__ import annotations

from ikefarm.proto.messages import Datagram
from ikefarm.shared.ikev2.constants import (
    IKE_HEADER_LENGTH,
    ExchangeType,
    HeaderFlag,
    PayloadType,
)
from ikefarm.shared.ikev2.message import IKE_MAJOR_VERSION, IkeHeader
from ikefarm.shared.ikev2.payloads.fields import as_enum

SPI_OCTETS = 8
_KNOWN_FLAGS = int(HeaderFlag.INITIATOR | HeaderFlag.VERSION | HeaderFlag.RESPONSE)


def datagram_message(
    header: IkeHeader,
    data: bytes,
    *,
    local: tuple[str, int],
    remote: tuple[str, int],
    natt: bool,
    via: str = "",
    answer_direct: bool = False,
) -> Datagram:
    """The bus message of one routed IKE message (non-ESP marker stripped) and its header."""
    return Datagram(
        local_address=local[0],
        local_port=local[1],
        remote_address=remote[0],
        remote_port=remote[1],
        data=data,
        via=via,
        answer_direct=answer_direct,
        natt=natt,
        spi_i=header.spi_i,
        spi_r=header.spi_r,
        next_payload=int(header.next_payload),
        minor_version=header.minor_version,
        exchange_type=int(header.exchange_type),
        flags=int(header.flags) & _KNOWN_FLAGS,
        message_id=header.message_id,
    )


def carried_header(datagram: Datagram) -> IkeHeader | None:
    """The header ingress read, or None when the message carries none or one that cannot be
    the header of its data (then the worker reads the octets itself)."""
    if len(datagram.spi_i) != SPI_OCTETS or len(datagram.spi_r) != SPI_OCTETS:
        return None
    if not any(datagram.spi_i) or len(datagram.data) < IKE_HEADER_LENGTH:
        return None
    for value, top in (
        (datagram.next_payload, 0xFF),
        (datagram.exchange_type, 0xFF),
        (datagram.minor_version, 0x0F),
        (datagram.flags, _KNOWN_FLAGS),
        (datagram.message_id, 0xFFFFFFFF),
    ):
        if not 0 <= value <= top:
            return None
    if datagram.flags & ~_KNOWN_FLAGS:
        return None
    return IkeHeader(
        spi_i=datagram.spi_i,
        spi_r=datagram.spi_r,
        next_payload=as_enum(PayloadType, datagram.next_payload),
        major_version=IKE_MAJOR_VERSION,
        minor_version=datagram.minor_version,
        exchange_type=as_enum(ExchangeType, datagram.exchange_type),
        flags=HeaderFlag(datagram.flags),
        message_id=datagram.message_id,
        length=len(datagram.data),
    )
