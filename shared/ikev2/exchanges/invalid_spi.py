"""INVALID_IKE_SPI for a request to an SA we do not know (RFC 7296 2.21.4; JunosE
`tx-invalid-cookie`, seed 002), off by default.

A request (never a response) whose SPI names no SA of ours may be answered with
an unprotected INFORMATIONAL carrying N(INVALID_IKE_SPI), to the address and
port it came from, with its SPIs and Message ID copied. The answers are
rate-limited, so the gateway cannot be turned into a reflector. The other way
round, an unprotected notification we receive is never acted upon (it would be
a DoS vector, seed 002): the engine drops every unprotected message after
IKE_SA_INIT, and staleness is left to DPD and timeouts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ikefarm.shared.config.kinds import Rate
from ikefarm.shared.ikev2.constants import ExchangeType, NotifyType
from ikefarm.shared.ikev2.effects import Effect, Endpoint, SendDatagram
from ikefarm.shared.ikev2.exchanges.rate_limits import SlidingWindow
from ikefarm.shared.ikev2.message import IkeHeader, Message, encode_message
from ikefarm.shared.ikev2.payloads import NotifyPayload

if TYPE_CHECKING:
    from ikefarm.shared.ikev2.engine import IkeEngine

# at most this many INVALID_IKE_SPI answers per second, from one worker
ANSWER_RATE = Rate(10, 1)


def answer(
    engine: IkeEngine, header: IkeHeader, local: Endpoint, remote: Endpoint, now: float
) -> list[Effect]:
    """The effects for a datagram whose SPI is unknown: an answer, or a counted drop."""
    if not engine.policy.tx_invalid_cookie or header.is_response:
        # RFC 7296 2.21.4: a response outside any SA is never answered
        return engine.drop("unknown_spi")
    if not engine.invalid_spi_answers.allow("all", now):
        engine.count("invalid_ike_spi_rate_limited")
        return engine.drop("unknown_spi")
    engine.count("dropped.unknown_spi")
    engine.count("invalid_ike_spi_sent")
    reply = Message(
        exchange_type=ExchangeType.INFORMATIONAL,
        spi_i=header.spi_i,
        spi_r=header.spi_r,
        message_id=header.message_id,
        is_initiator=not header.is_initiator,
        is_response=True,
        payloads=[NotifyPayload(NotifyType.INVALID_IKE_SPI)],
    )
    effects: list[Effect] = [SendDatagram(local, remote, encode_message(reply), "INVALID_IKE_SPI")]
    return effects


def new_window() -> SlidingWindow:
    return SlidingWindow(ANSWER_RATE, capacity=1)
