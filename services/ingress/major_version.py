"""INVALID_MAJOR_VERSION for a request of a higher IKE major version (RFC 7296 2.5, 1.5).

Ingress is the gate: such a datagram never reaches a worker (`routing` drops it
as `invalid_major_version`), and it is answered here with an unprotected
notification whose header carries the version we speak (2.0), the request's
SPIs, Message ID and Exchange Type copied and the Response flag set, as
strongSwan and libreswan do. Responses are never answered, nor are lower major
versions (IKEv1 is another protocol). The answers of one ingress process share
one token bucket, so the gateway cannot be made a reflector and no state grows
per source.
"""

from __future__ import annotations

from ikefarm.shared.dos.token_bucket import TokenBucket
from ikefarm.shared.ikev2.constants import NotifyType
from ikefarm.shared.ikev2.errors import MalformedMessage
from ikefarm.shared.ikev2.message import IKE_MAJOR_VERSION, IkeHeader, Message, encode_message
from ikefarm.shared.ikev2.payloads import NotifyPayload

# answers per second (and at most this many at once) from one ingress process
ANSWER_RATE = 10.0
ANSWER_BURST = 10.0


def new_bucket() -> TokenBucket:
    return TokenBucket(ANSWER_RATE, ANSWER_BURST)


def answer(message: bytes) -> bytes | None:
    """The INVALID_MAJOR_VERSION answer to an IKE message (non-ESP marker stripped), or None
    when it gets none: not a request, not a higher major version, or no valid SPIi."""
    try:
        header = IkeHeader.parse(message)
    except MalformedMessage:
        return None
    if header.major_version <= IKE_MAJOR_VERSION or header.is_response or not any(header.spi_i):
        return None
    reply = Message(
        exchange_type=header.exchange_type,
        spi_i=header.spi_i,
        spi_r=header.spi_r,
        message_id=header.message_id,
        is_initiator=not header.is_initiator,
        is_response=True,
        payloads=[NotifyPayload(NotifyType.INVALID_MAJOR_VERSION)],
    )
    return encode_message(reply)
