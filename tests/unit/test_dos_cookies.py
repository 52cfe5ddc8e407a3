"""Stateless cookies (RFC 7296 2.6): made and checked per peer, rotated, never printed."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ikefarm.proto import envelope
from ikefarm.proto.messages import CookieSecrets
from ikefarm.shared.dos.cookies import (
    COOKIE_OCTETS,
    CookieJar,
    CookieSecret,
    cookie_response,
    first_record,
    init_request,
    jar_from_record,
    rotated,
)
from ikefarm.shared.ikev2.constants import ExchangeType, NotifyType
from ikefarm.shared.ikev2.errors import MalformedMessage
from ikefarm.shared.ikev2.message import Message, encode_message, parse_message
from ikefarm.shared.ikev2.payloads import NoncePayload, NotifyPayload
from tests.dos_helpers import init_requests

NI = bytes(range(32))
SPI = bytes.fromhex("0102030405060708")
KEY_A = b"A" * 32
KEY_B = b"B" * 32


def test_cookie_is_version_then_hmac_and_checks_every_input() -> None:
    jar = CookieJar(CookieSecret(7, KEY_A))
    cookie = jar.make(NI, "198.51.100.7", SPI)
    assert len(cookie) == COOKIE_OCTETS and cookie[:4] == (7).to_bytes(4, "big")
    assert jar.verify(cookie, NI, "198.51.100.7", SPI)
    assert not jar.verify(cookie, NI, "198.51.100.8", SPI)  # another IPi
    assert not jar.verify(cookie, bytes(32), "198.51.100.7", SPI)  # another Ni
    assert not jar.verify(cookie, NI, "198.51.100.7", bytes(8))  # another SPIi
    tampered = cookie[:-1] + bytes([cookie[-1] ^ 1])
    assert not jar.verify(tampered, NI, "198.51.100.7", SPI)
    assert not jar.verify(cookie[:-1], NI, "198.51.100.7", SPI)
    assert jar.verify(jar.make(NI, "2001:db8::7", SPI), NI, "2001:db8::7", SPI)


def test_previous_secret_is_still_accepted_and_older_ones_are_not() -> None:
    jar = CookieJar(CookieSecret(1, KEY_A))
    old = jar.make(NI, "192.0.2.2", SPI)
    jar.rotate(CookieSecret(2, KEY_B), jar.current)
    assert jar.verify(old, NI, "192.0.2.2", SPI)
    assert jar.make(NI, "192.0.2.2", SPI)[:4] == (2).to_bytes(4, "big")
    jar.rotate(CookieSecret(3, b"C" * 32), jar.current)
    assert not jar.verify(old, NI, "192.0.2.2", SPI)


def test_the_secret_never_appears_in_a_repr() -> None:
    secret = CookieSecret(5, KEY_A)
    record = CookieSecrets(
        version=5, key=KEY_A, created=1.0, previous_version=4, previous_key=KEY_B
    )
    for text in (repr(secret), repr(CookieJar(secret)), repr(record), str(record)):
        assert "AAAA" not in text and "BBBB" not in text and "key=" not in text
    with pytest.raises(ValueError) as excinfo:
        CookieSecret(5, b"short")
    assert "short" not in str(excinfo.value)


def test_records_rotate_after_their_lifetime_and_keep_the_previous() -> None:
    counter = iter(range(1, 100))

    def random(n: int) -> bytes:
        return bytes([next(counter)]) * n

    record = first_record(1000.0, random)
    assert rotated(record, 1299.0, 300.0, random) is None
    successor = rotated(record, 1300.0, 300.0, random)
    assert successor is not None
    assert (successor.version, successor.previous_version) == (2, 1)
    assert successor.previous_key == record.key and successor.key != record.key
    assert rotated(record, 900.0, 300.0, random) is not None  # the clock went back
    jar = jar_from_record(envelope.unpack(envelope.pack(successor), CookieSecrets))
    assert jar.current.version == 2 and jar.previous is not None and jar.previous.version == 1


def test_init_request_reads_spi_nonce_and_a_leading_cookie() -> None:
    (data,) = init_requests(1)
    request = init_request(data)
    assert request is not None and request.cookie is None and len(request.nonce_i) == 32
    message = parse_message(data).message
    assert message is not None
    with_cookie = Message(
        ExchangeType.IKE_SA_INIT,
        message.spi_i,
        bytes(8),
        0,
        True,
        False,
        [NotifyPayload(NotifyType.COOKIE, data=b"c" * 36), *message.payloads],
    )
    again = init_request(encode_message(with_cookie))
    assert again is not None and again.cookie == b"c" * 36
    # RFC 7296 2.6: only a COOKIE in first position is one
    late = Message(
        ExchangeType.IKE_SA_INIT,
        message.spi_i,
        bytes(8),
        0,
        True,
        False,
        [*message.payloads, NotifyPayload(NotifyType.COOKIE, data=b"c" * 36)],
    )
    assert init_request(encode_message(late)).cookie is None  # type: ignore[union-attr]
    bare = Message(ExchangeType.IKE_SA_INIT, message.spi_i, bytes(8), 0, True, False, [])
    assert init_request(encode_message(bare)) is None


def test_cookie_response_is_an_unprotected_init_response_with_the_cookie_alone() -> None:
    (data,) = init_requests(1)
    request = init_request(data)
    assert request is not None
    reply = parse_message(cookie_response(request, b"k" * 36))
    assert reply.header.is_response and not reply.header.is_initiator
    assert reply.header.spi_i == request.spi_i and reply.header.spi_r == bytes(8)
    message = reply.message
    assert message is not None and len(message.payloads) == 1
    assert message.notify(NotifyType.COOKIE).data == b"k" * 36  # type: ignore[union-attr]


@pytest.mark.parametrize("length", [1, 36, 64])
def test_cookie_response_is_octet_for_octet_what_the_encoder_makes(length: int) -> None:
    (data,) = init_requests(1)
    request = init_request(data)
    assert request is not None
    cookie = bytes(range(length))
    expected = Message(
        exchange_type=ExchangeType.IKE_SA_INIT,
        spi_i=request.spi_i,
        spi_r=bytes(8),
        message_id=request.message_id,
        is_initiator=False,
        is_response=True,
        payloads=[NotifyPayload(NotifyType.COOKIE, data=cookie)],
    )
    assert cookie_response(request, cookie) == encode_message(expected)
    with pytest.raises(ValueError):
        cookie_response(request, bytes(65))


def test_a_cookie_for_something_that_is_not_an_address_is_refused() -> None:
    jar = CookieJar(CookieSecret(1, KEY_A))
    with pytest.raises(ValueError):
        jar.make(NI, "not-an-address", SPI)


@st.composite
def mutated_requests(draw: st.DrawFn) -> bytes:
    """A real IKE_SA_INIT request, some octets changed, maybe cut or extended."""
    data = bytearray(draw(st.sampled_from(REQUESTS)))
    for _ in range(draw(st.integers(0, 6))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data) + draw(st.binary(max_size=8))


REQUESTS = init_requests(3)


@given(st.binary(max_size=600) | mutated_requests())
def test_any_datagram_gives_a_request_or_none_and_agrees_with_the_full_parser(
    data: bytes,
) -> None:
    request = init_request(data)
    if request is None:
        return
    assert 16 <= len(request.nonce_i) <= 256 and len(request.spi_i) == 8
    try:
        parsed = parse_message(data)
    except MalformedMessage:
        return  # the worker refuses what the gate's light walk let through
    message = parsed.message
    assert message is not None
    nonce = message.get(NoncePayload)
    assert nonce is not None and nonce.data == request.nonce_i


@given(st.binary(max_size=80), st.binary(max_size=300), st.binary(min_size=8, max_size=8))
def test_verifying_any_cookie_never_raises(cookie: bytes, nonce: bytes, spi: bytes) -> None:
    jar = CookieJar(CookieSecret(1, KEY_A), CookieSecret(0, KEY_B))
    assert jar.verify(cookie, nonce, "192.0.2.9", spi) is False
