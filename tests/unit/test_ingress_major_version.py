"""INVALID_MAJOR_VERSION answers (RFC 7296 2.5) and the token bucket that limits them."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ikefarm.services.ingress import major_version
from ikefarm.services.ingress.routing import Dropped, InitRouteTable, route_datagram
from ikefarm.shared.dos.token_bucket import TokenBucket
from ikefarm.shared.ikev2.constants import ExchangeType, NotifyType
from ikefarm.shared.ikev2.message import Message, encode_message, parse_message
from ikefarm.shared.ikev2.payloads import NoncePayload, NotifyPayload

SPI_I = bytes.fromhex("0102030405060708")


def with_version(message: bytes, major: int, minor: int = 0) -> bytes:
    data = bytearray(message)
    data[17] = (major << 4) | minor
    return bytes(data)


def init(*, response: bool = False, spi_i: bytes = SPI_I, message_id: int = 0) -> bytes:
    return encode_message(
        Message(
            exchange_type=ExchangeType.IKE_SA_INIT,
            spi_i=spi_i,
            spi_r=bytes(8) if not response else bytes.fromhex("1112131415161718"),
            message_id=message_id,
            is_initiator=not response,
            is_response=response,
            payloads=[NoncePayload(bytes(32))],
        )
    )


def test_a_version_3_ike_sa_init_is_answered_with_invalid_major_version_in_version_2() -> None:
    request = with_version(init(message_id=0), 3, 1)
    with pytest.raises(Dropped) as dropped:  # ingress never hands it to a worker
        route_datagram(
            request,
            natt=False,
            remote_address="198.51.100.7",
            remote_port=500,
            init_routes=InitRouteTable(),
            now=0.0,
        )
    assert dropped.value.reason == "invalid_major_version"
    answer = major_version.answer(request)
    assert answer is not None
    parsed = parse_message(answer)  # an IKEv2 parser reads it: major 2, the version we speak
    header = parsed.header
    assert (header.major_version, header.minor_version) == (2, 0)
    assert header.exchange_type == ExchangeType.IKE_SA_INIT
    assert (header.spi_i, header.spi_r, header.message_id) == (SPI_I, bytes(8), 0)
    assert header.is_response and not header.is_initiator
    assert parsed.message is not None
    (notify,) = parsed.message.payloads
    assert isinstance(notify, NotifyPayload)
    assert notify.notify_type == NotifyType.INVALID_MAJOR_VERSION and notify.data == b""
    assert len(answer) == 28 + 8  # never larger than what a request must be plus a notify


@pytest.mark.parametrize(
    "message",
    [
        with_version(init(), 2),  # ours: routed, not answered here
        with_version(init(), 1),  # IKEv1 is another protocol (2.5 answers higher versions)
        with_version(init(response=True), 3),  # a response is never answered
        with_version(init(spi_i=bytes(8)), 3),  # no SPIi to answer to
        with_version(init(), 3)[:27],  # truncated header
        b"",
    ],
)
def test_no_answer_to_what_2_5_does_not_cover(message: bytes) -> None:
    assert major_version.answer(message) is None


@given(st.binary(max_size=64))
def test_any_bytes_give_an_answer_or_none_never_an_error(data: bytes) -> None:
    answer = major_version.answer(data)
    if answer is not None:
        assert parse_message(answer).header.major_version == 2


def test_token_bucket_allows_a_burst_then_the_rate() -> None:
    bucket = TokenBucket(rate=4.0, burst=3.0)
    assert [bucket.allow(100.0) for _ in range(4)] == [True, True, True, False]
    assert not bucket.allow(100.125)  # half a token
    assert bucket.allow(100.25)
    assert not bucket.allow(100.25)
    assert [bucket.allow(1000.0) for _ in range(4)] == [True, True, True, False]  # capped at burst
    assert not bucket.allow(999.0)  # time going backwards adds nothing


@pytest.mark.parametrize("rate,burst", [(0.0, 1.0), (1.0, 0.5), (float("nan"), 1.0)])
def test_token_bucket_refuses_a_useless_shape(rate: float, burst: float) -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate, burst)
