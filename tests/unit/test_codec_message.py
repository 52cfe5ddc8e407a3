"""Message codec: header, parse/encode, SK protection with the real crypto layer."""

from __future__ import annotations

import os
import struct

import pytest

from ikefarm.shared.ikev2.constants import (
    AuthMethod,
    DhId,
    EncrId,
    ExchangeType,
    HeaderFlag,
    IntegId,
    NotifyType,
    PayloadType,
    PrfId,
    ProtocolId,
    TransformType,
)
from ikefarm.shared.ikev2.crypto.protection import (
    IntegrityCheckFailed,
    SkProtection,
    protection_for,
)
from ikefarm.shared.ikev2.errors import (
    InvalidMajorVersion,
    MalformedMessage,
    UnsupportedCriticalPayload,
)
from ikefarm.shared.ikev2.message import (
    IkeHeader,
    Message,
    decrypt_message,
    encode_message,
    parse_message,
    peek_header,
)
from ikefarm.shared.ikev2.payloads import (
    AuthPayload,
    DeletePayload,
    IdPayload,
    KePayload,
    NoncePayload,
    NotifyPayload,
    Proposal,
    SaPayload,
    SkPayload,
    TrafficSelector,
    Transform,
    TsPayload,
    UnknownPayload,
    VendorIdPayload,
)

# An IKE_SA_INIT request sent by strongSwan 5.9.8 (charon, proposals
# aes256gcm16-prfsha384-x25519 and aes128-sha256-prfsha256-modp2048,
# fragmentation = yes), captured from 192.0.2.1 to 192.0.2.2 in a namespace.
STRONGSWAN_IKE_SA_INIT = bytes.fromhex(
    "cc6125e02071b4800000000000000000212022080000000000000114"
    "2200005402000024010100030300000c01000014800e01000300000802000006"
    "000000080400001f0000002c020100040300000c0100000c800e008003000008"
    "0300000c0300000802000005000000080400000e"
    "28000028001f00009d754392f4025977a45532149eab4f72fa6481322279d6df"
    "7faf0f39e56f5045"
    "290000246ff5589c716db76bf9108dac3385481ee1107de14ef6929329bd3b3f7ad5c2a3"
    "2900001c0000400407562638d1d8fb4fa00e31c039122d3e1da3e727"
    "2900001c00004005e1f109d41b1b0f45857045a46d5f8f96b43302d5"
    "290000080000402e"
    "290000100000402f0002000300040005"
    "0000000800004016"
)

SPI_I = bytes.fromhex("0102030405060708")
SPI_R = bytes.fromhex("1112131415161718")


def gcm() -> tuple[SkProtection, bytes, bytes]:
    protection = protection_for(EncrId.AES_GCM_16, 256, None)
    return protection, os.urandom(protection.encr_key_size), b""


def cbc() -> tuple[SkProtection, bytes, bytes]:
    protection = protection_for(EncrId.AES_CBC, 128, IntegId.HMAC_SHA2_256_128)
    return (
        protection,
        os.urandom(protection.encr_key_size),
        os.urandom(protection.integ_key_size),
    )


PROTECTIONS = [pytest.param(gcm, id="aes256gcm16"), pytest.param(cbc, id="aes128-sha256")]


def ike_auth_request() -> Message:
    return Message(
        exchange_type=ExchangeType.IKE_AUTH,
        spi_i=SPI_I,
        spi_r=SPI_R,
        message_id=1,
        is_initiator=True,
        is_response=False,
        protected=True,
        payloads=[
            IdPayload.from_fqdn("peer.example"),
            NotifyPayload(NotifyType.INITIAL_CONTACT),
            IdPayload.from_fqdn("gw.example", PayloadType.IDr),
            AuthPayload(AuthMethod.SHARED_KEY_MIC, bytes(48)),
            SaPayload(
                [
                    Proposal(
                        1,
                        ProtocolId.ESP,
                        b"\xc0\x01\x02\x03",
                        [
                            Transform(TransformType.ENCR, EncrId.AES_GCM_16, 256),
                            Transform(TransformType.ESN, 0),
                        ],
                    )
                ]
            ),
            TsPayload([TrafficSelector.from_network("10.200.0.0/24")]),
            TsPayload([TrafficSelector.from_network("10.100.0.0/24")], PayloadType.TSr),
        ],
    )


def header_bytes(
    next_payload: int,
    length: int,
    *,
    version: int = 0x20,
    exchange: int = ExchangeType.IKE_SA_INIT,
    flags: int = 0x08,
    message_id: int = 0,
) -> bytes:
    return (
        SPI_I
        + SPI_R
        + struct.pack(">BBBBII", next_payload, version, exchange, flags, message_id, length)
    )


# -- header ----------------------------------------------------------------------


def test_header_layout_and_round_trip() -> None:
    header = IkeHeader(
        spi_i=SPI_I,
        spi_r=SPI_R,
        next_payload=PayloadType.SK,
        major_version=2,
        minor_version=0,
        exchange_type=ExchangeType.INFORMATIONAL,
        flags=HeaderFlag.RESPONSE,
        message_id=7,
        length=80,
    )
    data = header.encode()
    assert data == SPI_I + SPI_R + bytes.fromhex("2e 20 25 20 00000007 00000050")
    assert IkeHeader.parse(data) == header
    assert header.is_response and not header.is_initiator


def test_header_reserved_flag_bits_are_ignored_and_zero_on_send() -> None:
    header = IkeHeader.parse(header_bytes(0, 28, flags=0xFF))
    assert header.flags == HeaderFlag.INITIATOR | HeaderFlag.VERSION | HeaderFlag.RESPONSE
    assert header.is_initiator and header.is_response
    assert header.encode()[19] == 0x38


def test_peek_header() -> None:
    header = peek_header(header_bytes(PayloadType.SA, 500, message_id=3) + b"rest")
    assert header.exchange_type == ExchangeType.IKE_SA_INIT
    assert header.message_id == 3 and header.length == 500
    assert peek_header(header_bytes(0, 28, version=0x2F)).minor_version == 15  # minor ignored
    with pytest.raises(MalformedMessage) as info:
        peek_header(header_bytes(0, 28)[:27])
    assert info.value.reason == "truncated_header"


@pytest.mark.parametrize("version", [0x10, 0x30, 0xF0])
def test_other_major_versions_are_refused(version: int) -> None:
    data = header_bytes(0, 28, version=version)
    with pytest.raises(InvalidMajorVersion) as info:
        peek_header(data)
    assert info.value.major_version == version >> 4
    assert info.value.reason == "invalid_major_version"
    assert info.value.notify_type == NotifyType.INVALID_MAJOR_VERSION
    with pytest.raises(InvalidMajorVersion):
        parse_message(data)
    # the responder can still read the SPIs to answer INVALID_MAJOR_VERSION
    assert IkeHeader.parse(data).spi_i == SPI_I


# -- unprotected messages ---------------------------------------------------------


def test_strongswan_ike_sa_init_request() -> None:
    parsed = parse_message(STRONGSWAN_IKE_SA_INIT)
    assert not parsed.protected and not parsed.is_fragment
    message = parsed.message
    assert message is not None
    assert message.exchange_type == ExchangeType.IKE_SA_INIT
    assert message.message_id == 0 and message.is_initiator and not message.is_response
    assert message.spi_r == bytes(8)
    assert [p.payload_type for p in message.payloads] == [
        PayloadType.SA,
        PayloadType.KE,
        PayloadType.NONCE,
    ] + [PayloadType.NOTIFY] * 5
    sa = message.get(SaPayload)
    assert sa is not None and [p.number for p in sa.proposals] == [1, 2]
    assert sa.proposals[0].transforms == [
        Transform(TransformType.ENCR, EncrId.AES_GCM_16, 256),
        Transform(TransformType.PRF, PrfId.HMAC_SHA2_384),
        Transform(TransformType.DH, DhId.CURVE25519),
    ]
    assert sa.proposals[1].transforms_of(TransformType.INTEG) == [
        Transform(TransformType.INTEG, IntegId.HMAC_SHA2_256_128)
    ]
    ke = message.get(KePayload)
    assert ke is not None and ke.dh_group == DhId.CURVE25519 and len(ke.key_data) == 32
    nonce = message.get(NoncePayload)
    assert nonce is not None and len(nonce.data) == 32
    assert message.notify(NotifyType.IKEV2_FRAGMENTATION_SUPPORTED) is not None
    hashes = message.notify(NotifyType.SIGNATURE_HASH_ALGORITHMS)
    assert hashes is not None and hashes.data == bytes.fromhex("0002000300040005")
    assert message.notify(NotifyType.COOKIE) is None
    assert len(message.notifies()) == 5
    # our encoder produces strongSwan's bytes exactly
    assert encode_message(message) == STRONGSWAN_IKE_SA_INIT
    assert decrypt_message(parsed, protection_for(EncrId.AES_GCM_16, 256, None), b"", b"") == (
        message
    )


def test_hand_assembled_ike_sa_init() -> None:
    """RFC 7296 3.1-3.4, 3.9, 3.10 assembled field by field."""
    transform = bytes.fromhex("00 00 0008 04 00 001f")  # last, DH x25519
    proposal = bytes.fromhex("00 00 0010 01 01 00 01") + transform
    sa = bytes.fromhex("22 00 0014") + proposal  # next KE
    ke = bytes.fromhex("28 00 0028 001f 0000") + bytes(range(32))  # next Nonce
    nonce = bytes.fromhex("29 00 0014") + bytes(16)  # next Notify
    notify = bytes.fromhex("00 00 0008 00 00 402e")  # FRAGMENTATION_SUPPORTED, last
    body = sa + ke + nonce + notify
    expected = header_bytes(PayloadType.SA, 28 + len(body)) + body
    message = Message(
        ExchangeType.IKE_SA_INIT,
        SPI_I,
        SPI_R,
        0,
        is_initiator=True,
        is_response=False,
        payloads=[
            SaPayload([Proposal(1, ProtocolId.IKE, b"", [Transform(TransformType.DH, 31)])]),
            KePayload(DhId.CURVE25519, bytes(range(32))),
            NoncePayload(bytes(16)),
            NotifyPayload(NotifyType.IKEV2_FRAGMENTATION_SUPPORTED),
        ],
    )
    assert encode_message(message) == expected
    assert parse_message(expected).message == message


def test_message_with_no_payloads() -> None:
    message = Message(ExchangeType.INFORMATIONAL, SPI_I, SPI_R, 5, False, True)
    data = encode_message(message)
    assert data == header_bytes(0, 28, exchange=37, flags=0x20, message_id=5)
    assert parse_message(data).message == message


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (header_bytes(0, 27), "truncated_message"),
        (header_bytes(0, 40), "truncated_message"),
        (header_bytes(0, 28) + b"\x00", "trailing_data"),
        (header_bytes(PayloadType.NONCE, 28), "truncated_payload_header"),
        (
            header_bytes(PayloadType.NONCE, 34) + bytes.fromhex("00000007 0000"),
            "bad_payload_length",
        ),
        (
            header_bytes(PayloadType.NONCE, 36) + bytes.fromhex("00000008") + bytes(4),
            "bad_nonce_length",
        ),
    ],
)
def test_message_length_violations(data: bytes, reason: str) -> None:
    with pytest.raises(MalformedMessage) as info:
        parse_message(data)
    assert info.value.reason == reason


def test_unknown_critical_payload_in_cleartext_chain() -> None:
    body = bytes.fromhex("00 80 0008 deadbeef")
    with pytest.raises(UnsupportedCriticalPayload) as info:
        parse_message(header_bytes(99, 28 + len(body)) + body)
    assert info.value.payload_type == 99


def test_message_finders() -> None:
    message = ike_auth_request()
    assert message.get(IdPayload) == IdPayload.from_fqdn("peer.example")
    assert message.get_type(PayloadType.IDr) == IdPayload.from_fqdn("gw.example", PayloadType.IDr)
    assert len(message.get_all(TsPayload)) == 2
    tsr = message.get_type(PayloadType.TSr)
    assert isinstance(tsr, TsPayload) and str(tsr.selectors[0]) == "10.100.0.0/24"
    assert message.get(DeletePayload) is None
    assert message.notify(NotifyType.INITIAL_CONTACT) == NotifyPayload(NotifyType.INITIAL_CONTACT)
    assert message.flags == HeaderFlag.INITIATOR


# -- protected messages -----------------------------------------------------------


@pytest.mark.parametrize("make", PROTECTIONS)
def test_protected_round_trip(make: object) -> None:
    protection, sk_e, sk_a = make()  # type: ignore[operator]
    message = ike_auth_request()
    data = encode_message(message, protection, sk_e, sk_a)
    parsed = parse_message(data)
    assert parsed.protected and not parsed.is_fragment and parsed.message is None
    header = parsed.header
    assert header.next_payload == PayloadType.SK and header.length == len(data)
    assert parsed.inner_first_payload == PayloadType.IDi
    assert parsed.encrypted_offset == 28
    sk_length = int.from_bytes(data[30:32], "big")
    assert sk_length == len(data) - 28
    assert parsed.associated_data == data[:32]
    assert decrypt_message(parsed, protection, sk_e, sk_a) == message


@pytest.mark.parametrize("make", PROTECTIONS)
def test_tampering_anywhere_fails_integrity(make: object) -> None:
    protection, sk_e, sk_a = make()  # type: ignore[operator]
    data = bytearray(encode_message(ike_auth_request(), protection, sk_e, sk_a))
    for position in (
        3,
        17,
        22,
        29,
        40,
        len(data) - 1,
    ):  # SPI, version, message id, SK flags, body, ICV
        tampered = bytearray(data)
        tampered[position] ^= 0x01
        parsed = parse_message(bytes(tampered))
        with pytest.raises(IntegrityCheckFailed):
            decrypt_message(parsed, protection, sk_e, sk_a)


def test_wrong_key_fails_integrity() -> None:
    protection, sk_e, sk_a = gcm()
    parsed = parse_message(encode_message(ike_auth_request(), protection, sk_e, sk_a))
    with pytest.raises(IntegrityCheckFailed):
        decrypt_message(parsed, protection, os.urandom(len(sk_e)), sk_a)


def test_empty_protected_message_is_a_dpd() -> None:
    protection, sk_e, sk_a = cbc()
    dpd = Message(ExchangeType.INFORMATIONAL, SPI_I, SPI_R, 9, True, False, [], protected=True)
    data = encode_message(dpd, protection, sk_e, sk_a)
    parsed = parse_message(data)
    assert parsed.inner_first_payload == PayloadType.NONE
    assert decrypt_message(parsed, protection, sk_e, sk_a) == dpd


def test_protected_message_needs_protection() -> None:
    with pytest.raises(ValueError, match="protection"):
        encode_message(ike_auth_request())


def seal_by_hand(
    protection: SkProtection,
    sk_e: bytes,
    sk_a: bytes,
    before_sk: bytes,
    inner_first: int,
    plaintext: bytes,
) -> bytes:
    body_length = protection.encrypted_length(len(plaintext))
    total = 28 + len(before_sk) + 4 + body_length
    first = PayloadType.NOTIFY if before_sk else PayloadType.SK
    ad = (
        header_bytes(first, total, exchange=ExchangeType.INFORMATIONAL, message_id=2)
        + before_sk
        + struct.pack(">BBH", inner_first, 0, 4 + body_length)
    )
    return ad + protection.seal(sk_e, sk_a, ad, plaintext)


def test_cleartext_payload_before_sk_stays_outside_the_message() -> None:
    protection, sk_e, sk_a = gcm()
    notify = NotifyPayload(NotifyType.INITIAL_CONTACT).encode(PayloadType.SK)
    inner = VendorIdPayload(b"inner").encode(0)
    data = seal_by_hand(protection, sk_e, sk_a, notify, PayloadType.VENDOR_ID, inner)
    parsed = parse_message(data)
    assert parsed.payloads[0] == NotifyPayload(NotifyType.INITIAL_CONTACT)
    assert isinstance(parsed.payloads[1], SkPayload)
    assert parsed.encrypted_offset == 28 + len(notify)
    message = decrypt_message(parsed, protection, sk_e, sk_a)
    assert message.payloads == [VendorIdPayload(b"inner")]


def test_bad_inner_chain_is_malformed_after_decryption() -> None:
    protection, sk_e, sk_a = gcm()
    inner = VendorIdPayload(b"inner").encode(0) + b"\x00"  # trailing octet
    parsed = parse_message(seal_by_hand(protection, sk_e, sk_a, b"", PayloadType.VENDOR_ID, inner))
    with pytest.raises(MalformedMessage) as info:
        decrypt_message(parsed, protection, sk_e, sk_a)
    assert info.value.reason == "trailing_data"
    critical = bytes.fromhex("00 80 0004")
    parsed = parse_message(seal_by_hand(protection, sk_e, sk_a, b"", 99, critical))
    with pytest.raises(UnsupportedCriticalPayload):
        decrypt_message(parsed, protection, sk_e, sk_a)


def test_sk_must_be_the_last_payload() -> None:
    sk = bytes.fromhex("00 00 0014") + bytes(16)
    data = header_bytes(PayloadType.SK, 28 + len(sk) + 8) + sk + bytes.fromhex("00000008 00000000")
    # the SK length does not reach the end of the message
    with pytest.raises(MalformedMessage) as info:
        parse_message(data)
    assert info.value.reason == "encrypted_payload_not_last"


def test_decrypt_message_refuses_fragments() -> None:
    skf = bytes.fromhex("23 00 0018 0001 0002") + bytes(16)
    parsed = parse_message(header_bytes(PayloadType.SKF, 28 + len(skf)) + skf)
    assert parsed.is_fragment
    protection, sk_e, sk_a = gcm()
    with pytest.raises(MalformedMessage) as info:
        decrypt_message(parsed, protection, sk_e, sk_a)
    assert info.value.reason == "unexpected_fragment"


def test_error_messages_carry_no_key_material() -> None:
    protection, sk_e, sk_a = cbc()
    data = encode_message(ike_auth_request(), protection, sk_e, sk_a)
    for cut in (29, 40, len(data) - 3):
        try:
            decrypt_message(parse_message(data[:cut]), protection, sk_e, sk_a)
        except (MalformedMessage, IntegrityCheckFailed, ValueError) as exc:
            assert sk_e.hex() not in str(exc) and repr(sk_e) not in str(exc)


def test_summary_names_payloads_without_content() -> None:
    message = parse_message(STRONGSWAN_IKE_SA_INIT).message
    assert message is not None
    assert message.summary() == (
        "IKE_SA_INIT request 0 [ SA KE No N(NAT_DETECTION_SOURCE_IP) "
        "N(NAT_DETECTION_DESTINATION_IP) N(IKEV2_FRAGMENTATION_SUPPORTED) "
        "N(SIGNATURE_HASH_ALGORITHMS) N(REDIRECT_SUPPORTED) ]"
    )
    assert (
        ike_auth_request().summary()
        == "IKE_AUTH request 1 [ IDi N(INITIAL_CONTACT) IDr AUTH SA TSi TSr ]"
    )
    response = Message(
        ExchangeType.INFORMATIONAL,
        SPI_I,
        SPI_R,
        3,
        False,
        True,
        [DeletePayload(ProtocolId.IKE), VendorIdPayload(b"v"), NotifyPayload(40000)],
    )
    response.payloads.append(UnknownPayload(49, False, b""))
    assert response.summary() == "INFORMATIONAL response 3 [ D V N(40000) UNKNOWN(49) ]"
