"""tx-invalid-cookie (JunosE, seed 002): INVALID_IKE_SPI for unknown SPIs (RFC 7296 2.21.4)."""

from __future__ import annotations

from ikefarm.proto.sharding import spi_for_shard
from ikefarm.shared.ikev2.constants import ExchangeType, NotifyType
from ikefarm.shared.ikev2.message import Message, encode_message, parse_message
from ikefarm.shared.ikev2.payloads import NotifyPayload
from ikefarm.shared.ikev2.sa import IkeSaState
from tests.dos_helpers import feed, guarded_pair, sent

ON = "[ike.global-options]\ntx-invalid-cookie = true\n"
UNKNOWN = spi_for_shard(1, bytes.fromhex("0a0b0c0d0e0f"))  # our shard, no SA


def request_to_unknown_sa(message_id: int = 3, response: bool = False) -> bytes:
    return encode_message(
        Message(
            ExchangeType.INFORMATIONAL,
            bytes.fromhex("1111111111111111"),
            UNKNOWN,
            message_id,
            is_initiator=True,
            is_response=response,
        )
    )


def test_off_by_default_unknown_spis_are_dropped_silently() -> None:
    engine = guarded_pair().responder.engine
    assert sent(feed(engine, request_to_unknown_sa(), "198.51.100.1")) == []
    assert engine.counters["dropped.unknown_spi"] == 1


def test_on_a_request_gets_an_unprotected_invalid_ike_spi_with_spis_and_id_copied() -> None:
    engine = guarded_pair(ON).responder.engine
    (reply,) = sent(feed(engine, request_to_unknown_sa(7), "198.51.100.1"))
    parsed = parse_message(reply)
    assert parsed.header.is_response and not parsed.protected
    assert parsed.header.spi_i == bytes.fromhex("1111111111111111")
    assert parsed.header.spi_r == UNKNOWN and parsed.header.message_id == 7
    assert parsed.message is not None
    assert parsed.message.notify(NotifyType.INVALID_IKE_SPI) is not None
    assert engine.counters["invalid_ike_spi_sent"] == 1


def test_on_responses_are_never_answered() -> None:
    engine = guarded_pair(ON).responder.engine
    assert sent(feed(engine, request_to_unknown_sa(response=True), "198.51.100.1")) == []


def test_on_answers_are_rate_limited() -> None:
    engine = guarded_pair(ON).responder.engine
    answers = sum(
        len(sent(feed(engine, request_to_unknown_sa(n), "198.51.100.1", now=1000.0)))
        for n in range(25)
    )
    assert answers == 10
    assert engine.counters["invalid_ike_spi_rate_limited"] == 15
    assert sent(feed(engine, request_to_unknown_sa(), "198.51.100.1", now=1001.0))


def test_an_unprotected_invalid_ike_spi_received_is_never_acted_upon() -> None:
    wire = guarded_pair(ON)
    wire.run(wire.initiator.engine.initiate("hq", "net", wire.now), wire.initiator)
    (sa,) = wire.initiator.engine.sas.values()
    forged = encode_message(
        Message(
            ExchangeType.INFORMATIONAL,
            sa.spi_i,
            sa.spi_r,
            sa.next_request_id,
            is_initiator=False,
            is_response=True,
            payloads=[NotifyPayload(NotifyType.INVALID_IKE_SPI)],
        )
    )
    for flags_response in (True, False):
        data = bytearray(forged)
        if not flags_response:
            data[19] &= ~0x20  # make it a request
        feed(wire.initiator.engine, bytes(data), "192.0.2.1")
    assert sa.state == IkeSaState.ESTABLISHED and sa.local_spi in wire.initiator.engine.sas
