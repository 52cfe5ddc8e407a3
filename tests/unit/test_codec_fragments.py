"""IKEv2 fragmentation (RFC 7383): splitting, per-fragment integrity, reassembly bounds."""

from __future__ import annotations

import os
import random

import pytest

from ikefarm.shared.ikev2.constants import (
    AuthMethod,
    CertEncoding,
    EncrId,
    ExchangeType,
    IntegId,
    PayloadType,
)
from ikefarm.shared.ikev2.crypto.protection import (
    IntegrityCheckFailed,
    SkProtection,
    protection_for,
)
from ikefarm.shared.ikev2.errors import MalformedMessage
from ikefarm.shared.ikev2.fragments import FragmentReassembler
from ikefarm.shared.ikev2.message import (
    Message,
    ParsedMessage,
    decrypt_fragment,
    encode_message,
    encode_message_fragments,
    parse_message,
)
from ikefarm.shared.ikev2.payloads import (
    AuthPayload,
    CertPayload,
    IdPayload,
    SkfPayload,
    TrafficSelector,
    TsPayload,
)

SPI_I = bytes.fromhex("0102030405060708")
SPI_R = bytes.fromhex("1112131415161718")


def gcm() -> tuple[SkProtection, bytes, bytes]:
    protection = protection_for(EncrId.AES_GCM_16, 128, None)
    return protection, os.urandom(protection.encr_key_size), b""


def cbc() -> tuple[SkProtection, bytes, bytes]:
    protection = protection_for(EncrId.AES_CBC, 256, IntegId.HMAC_SHA2_512_256)
    return (
        protection,
        os.urandom(protection.encr_key_size),
        os.urandom(protection.integ_key_size),
    )


PROTECTIONS = [pytest.param(gcm, id="aes128gcm16"), pytest.param(cbc, id="aes256-sha512")]


def big_ike_auth(message_id: int = 1, cert_size: int = 3000) -> Message:
    return Message(
        exchange_type=ExchangeType.IKE_AUTH,
        spi_i=SPI_I,
        spi_r=SPI_R,
        message_id=message_id,
        is_initiator=False,
        is_response=True,
        protected=True,
        payloads=[
            IdPayload.from_fqdn("gw.example", PayloadType.IDr),
            CertPayload(CertEncoding.X509_SIGNATURE, os.urandom(cert_size)),
            AuthPayload(AuthMethod.DIGITAL_SIGNATURE, os.urandom(300)),
            TsPayload([TrafficSelector.from_network("10.200.0.0/24")]),
            TsPayload([TrafficSelector.from_network("10.100.0.0/24")], PayloadType.TSr),
        ],
    )


@pytest.mark.parametrize("make", PROTECTIONS)
def test_fragments_reassemble_out_of_order_with_duplicates(make: object) -> None:
    protection, sk_e, sk_a = make()  # type: ignore[operator]
    message = big_ike_auth()
    datagrams = encode_message_fragments(message, protection, sk_e, sk_a, 576)
    assert len(datagrams) > 5
    assert all(len(d) <= 576 for d in datagrams)
    parsed = [parse_message(d) for d in datagrams]
    total = len(parsed)
    for number, fragment in enumerate(parsed, start=1):
        assert fragment.is_fragment and fragment.header.next_payload == PayloadType.SKF
        assert fragment.header.message_id == 1 and fragment.header.length == len(fragment.raw)
        skf = fragment.encrypted
        assert isinstance(skf, SkfPayload)
        assert (skf.fragment_number, skf.total_fragments) == (number, total)
        # RFC 7383 2.5: only fragment 1 names the first inner payload
        expected_next = PayloadType.IDr if number == 1 else PayloadType.NONE
        assert fragment.inner_first_payload == expected_next
        assert fragment.associated_data == fragment.raw[:36]
    last = parsed[3]
    before = [p for p in parsed if p is not last] + [parsed[0], parsed[2], parsed[4]]  # duplicates
    random.Random(7).shuffle(before)
    reassembler = FragmentReassembler(message_id=1)
    results = [reassembler.receive(p, protection, sk_e, sk_a) for p in before]
    assert results == [None] * len(before)
    assert reassembler.received == total - 1
    assert reassembler.receive(last, protection, sk_e, sk_a) == message
    assert reassembler.complete and reassembler.received == 0
    # a retransmitted fragment after completion is ignored
    assert reassembler.receive(parsed[0], protection, sk_e, sk_a) is None


def test_feed_returns_the_inner_plaintext() -> None:
    protection, sk_e, sk_a = gcm()
    message = big_ike_auth(cert_size=1500)
    parsed = [
        parse_message(d) for d in encode_message_fragments(message, protection, sk_e, sk_a, 800)
    ]
    reassembler = FragmentReassembler(1)
    plaintexts = [decrypt_fragment(p, protection, sk_e, sk_a) for p in parsed]
    for p, plaintext in zip(reversed(parsed[1:]), reversed(plaintexts[1:]), strict=True):
        assert reassembler.feed(p, plaintext) is None
    whole = reassembler.feed(parsed[0], plaintexts[0])
    assert whole == b"".join(plaintexts)
    unfragmented = parse_message(encode_message(message, protection, sk_e, sk_a))
    assert whole == protection.open(
        sk_e, sk_a, unfragmented.associated_data, unfragmented.encrypted.body
    )  # type: ignore[union-attr]
    assert reassembler.first_payload == PayloadType.IDr
    assert reassembler.to_message() == message


def test_small_message_gives_one_fragment() -> None:
    protection, sk_e, sk_a = gcm()
    message = big_ike_auth(cert_size=10)
    datagrams = encode_message_fragments(message, protection, sk_e, sk_a, 1280)
    assert len(datagrams) == 1
    parsed = parse_message(datagrams[0])
    assert isinstance(parsed.encrypted, SkfPayload) and parsed.encrypted.total_fragments == 1
    assert FragmentReassembler(1).receive(parsed, protection, sk_e, sk_a) == message


def test_fragment_size_is_used_fully() -> None:
    protection, sk_e, sk_a = cbc()  # 16-octet blocks: sizes come in steps
    datagrams = encode_message_fragments(big_ike_auth(), protection, sk_e, sk_a, 600)
    assert all(600 - 16 < len(d) <= 600 for d in datagrams[:-1])


def test_fragmentation_preconditions() -> None:
    protection, sk_e, sk_a = gcm()
    plain = big_ike_auth()
    plain.protected = False
    with pytest.raises(ValueError, match="protected"):
        encode_message_fragments(plain, protection, sk_e, sk_a, 576)
    with pytest.raises(ValueError, match="no room"):
        encode_message_fragments(big_ike_auth(), protection, sk_e, sk_a, 60)


def test_tampered_fragment_is_rejected_and_not_stored() -> None:
    protection, sk_e, sk_a = cbc()
    message = big_ike_auth()
    datagrams = encode_message_fragments(message, protection, sk_e, sk_a, 700)
    tampered = bytearray(datagrams[1])
    tampered[-20] ^= 0x80
    reassembler = FragmentReassembler(1)
    with pytest.raises(IntegrityCheckFailed):
        reassembler.receive(parse_message(bytes(tampered)), protection, sk_e, sk_a)
    # the fragment number field is authenticated too (RFC 7383 2.5)
    renumbered = bytearray(datagrams[1])
    renumbered[33] = 3
    with pytest.raises(IntegrityCheckFailed):
        reassembler.receive(parse_message(bytes(renumbered)), protection, sk_e, sk_a)
    assert reassembler.received == 0
    results = [reassembler.receive(parse_message(d), protection, sk_e, sk_a) for d in datagrams]
    assert results[-1] == message


# -- reassembler bounds -------------------------------------------------------------


def fragments_of(
    total_hint_size: int, message_id: int = 1
) -> tuple[list[ParsedMessage], tuple[SkProtection, bytes, bytes]]:
    keys = gcm()
    protection, sk_e, sk_a = keys
    datagrams = encode_message_fragments(
        big_ike_auth(message_id), protection, sk_e, sk_a, total_hint_size
    )
    return [parse_message(d) for d in datagrams], keys


def reason(excinfo: pytest.ExceptionInfo[MalformedMessage]) -> str:
    return excinfo.value.reason


def test_total_above_the_configured_maximum() -> None:
    parsed, _ = fragments_of(300)
    assert len(parsed) > 4
    with pytest.raises(MalformedMessage) as info:
        FragmentReassembler(1, max_fragments=4).feed(parsed[0], b"x")
    assert reason(info) == "too_many_fragments"


def test_message_id_and_kind_checks() -> None:
    parsed, _ = fragments_of(600, message_id=2)
    with pytest.raises(MalformedMessage) as info:
        FragmentReassembler(1).feed(parsed[0], b"x")
    assert reason(info) == "fragment_message_id_mismatch"
    protection, sk_e, sk_a = gcm()
    whole = parse_message(encode_message(big_ike_auth(), protection, sk_e, sk_a))
    with pytest.raises(MalformedMessage) as info:
        FragmentReassembler(1).feed(whole, b"x")
    assert reason(info) == "not_a_fragment"
    with pytest.raises(MalformedMessage) as info:
        decrypt_fragment(whole, protection, sk_e, sk_a)
    assert reason(info) == "not_a_fragment"


def test_fragment_number_zero_or_above_total() -> None:
    parsed, _ = fragments_of(600)
    for number, total in ((0, 3), (4, 3)):
        forged = ParsedMessage(
            header=parsed[0].header,
            payloads=[SkfPayload(number, total, b"")],
            raw=parsed[0].raw,
            encrypted_offset=28,
        )
        with pytest.raises(MalformedMessage) as info:
            FragmentReassembler(1).feed(forged, b"x")
        assert reason(info) == "bad_fragment_number"


def test_changing_totals() -> None:
    """RFC 7383 2.6: a larger total restarts reassembly, a smaller one is discarded."""
    small, _ = fragments_of(900)
    large, _ = fragments_of(500)
    assert len(large) > len(small)
    reassembler = FragmentReassembler(1)
    assert reassembler.feed(small[0], b"a") is None
    assert reassembler.feed(small[1], b"b") is None
    assert reassembler.feed(large[1], b"B") is None  # restart
    assert (reassembler.total, reassembler.received) == (len(large), 1)
    with pytest.raises(MalformedMessage) as info:
        reassembler.feed(small[0], b"a")
    assert reason(info) == "fragment_total_mismatch"
    assert reassembler.received == 1
    for fragment in large[2:]:
        assert reassembler.feed(fragment, b"-") is None
    assert reassembler.feed(large[0], b"A") == b"AB" + b"-" * (len(large) - 2)


def test_duplicates_are_ignored_even_with_other_content() -> None:
    parsed, _ = fragments_of(900)
    reassembler = FragmentReassembler(1)
    assert reassembler.feed(parsed[0], b"first") is None
    assert reassembler.feed(parsed[0], b"second") is None
    assert reassembler.received == 1


def test_reassembled_size_bound() -> None:
    parsed, _ = fragments_of(500)
    reassembler = FragmentReassembler(1, max_size=100)
    assert reassembler.feed(parsed[0], bytes(60)) is None
    with pytest.raises(MalformedMessage) as info:
        reassembler.feed(parsed[1], bytes(60))
    assert reason(info) == "fragments_too_large"
    assert reassembler.received == 0


def test_to_message_before_completion() -> None:
    with pytest.raises(ValueError, match="not complete"):
        FragmentReassembler(1).to_message()
    with pytest.raises(ValueError, match="positive"):
        FragmentReassembler(1, max_fragments=0)
