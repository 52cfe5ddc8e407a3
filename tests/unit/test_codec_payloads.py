"""Payload codec: round trips, RFC 7296 section 3 byte layouts, length checks, critical bit."""

from __future__ import annotations

import ipaddress
import struct

import pytest

from ikefarm.shared.ikev2.constants import (
    AuthMethod,
    CertEncoding,
    CfgAttribute,
    CfgType,
    DhId,
    EncrId,
    IdType,
    IntegId,
    NotifyType,
    PayloadType,
    PrfId,
    ProtocolId,
    TransformType,
    TsType,
)
from ikefarm.shared.ikev2.errors import MalformedMessage, UnsupportedCriticalPayload
from ikefarm.shared.ikev2.payloads import (
    AuthPayload,
    CertPayload,
    CertReqPayload,
    ConfigAttribute,
    CpPayload,
    DeletePayload,
    EapPayload,
    IdPayload,
    KePayload,
    NoncePayload,
    NotifyPayload,
    Payload,
    Proposal,
    RawAttribute,
    SaPayload,
    SkfPayload,
    SkPayload,
    TrafficSelector,
    Transform,
    TsPayload,
    UnknownPayload,
    UnknownSelector,
    VendorIdPayload,
    decode_chain,
    encode_chain,
)
from ikefarm.shared.ikev2.payloads.fields import FieldTable


def generic(next_payload: int, body: bytes, flags: int = 0) -> bytes:
    """A payload with its RFC 7296 3.2 generic header, assembled by hand."""
    return struct.pack(">BBH", next_payload, flags, 4 + len(body)) + body


def decode_one(payload_type: int, body: bytes) -> Payload:
    chain = decode_chain(generic(0, body), payload_type, allow_encrypted=True)
    assert len(chain.payloads) == 1
    return chain.payloads[0]


def roundtrip(payload: Payload) -> Payload:
    data = encode_chain([payload])
    decoded = decode_chain(data, payload.payload_type, allow_encrypted=True).payloads
    assert decoded == [payload]
    return decoded[0]


def reason_of(payload_type: int, body: bytes) -> str:
    with pytest.raises(MalformedMessage) as info:
        decode_one(payload_type, body)
    return info.value.reason


IKE_PROPOSALS = SaPayload(
    [
        Proposal(
            1,
            ProtocolId.IKE,
            b"",
            [
                Transform(TransformType.ENCR, EncrId.AES_GCM_16, 256),
                Transform(TransformType.PRF, PrfId.HMAC_SHA2_384),
                Transform(TransformType.DH, DhId.CURVE25519),
            ],
        ),
        Proposal(
            2,
            ProtocolId.IKE,
            b"",
            [
                Transform(TransformType.ENCR, EncrId.AES_CBC, 128),
                Transform(TransformType.INTEG, IntegId.HMAC_SHA2_256_128),
                Transform(TransformType.PRF, PrfId.HMAC_SHA2_256),
                Transform(TransformType.DH, DhId.MODP_2048),
            ],
        ),
    ]
)

ALL_PAYLOADS: list[Payload] = [
    IKE_PROPOSALS,
    SaPayload([Proposal(1, ProtocolId.ESP, b"\x01\x02\x03\x04", [Transform(5, 0)])]),
    KePayload(DhId.CURVE25519, bytes(range(32))),
    IdPayload.from_address("192.0.2.1"),
    IdPayload.from_address("2001:db8::1", PayloadType.IDr),
    IdPayload.from_fqdn("gw.example", PayloadType.IDr),
    IdPayload.from_rfc822("user@example"),
    IdPayload.from_key_id(b"\x00\xffkey"),
    CertPayload(CertEncoding.X509_SIGNATURE, b"\x30\x82\x01\x00" + bytes(20)),
    CertReqPayload(CertEncoding.X509_SIGNATURE, bytes(40)),
    AuthPayload(AuthMethod.SHARED_KEY_MIC, bytes(48)),
    NoncePayload(bytes(16)),
    NoncePayload(bytes(256)),
    NotifyPayload(NotifyType.COOKIE, data=b"c" * 32),
    NotifyPayload(NotifyType.REKEY_SA, ProtocolId.ESP, b"\xaa\xbb\xcc\xdd"),
    NotifyPayload(40960, data=b"private use"),
    DeletePayload(ProtocolId.IKE),
    DeletePayload(ProtocolId.ESP, [b"\x00\x00\x00\x01", b"\xff\xff\xff\xfe"]),
    VendorIdPayload(b"strongSwan"),
    TsPayload([TrafficSelector.from_network("10.0.0.0/24")]),
    TsPayload(
        [
            TrafficSelector.from_network("2001:db8::/64", 6, (443, 443)),
            TrafficSelector.from_range("192.0.2.10", "192.0.2.20", 17, (500, 4500)),
        ],
        PayloadType.TSr,
    ),
    TsPayload([], PayloadType.TSr, [UnknownSelector(10, 0, b"\x00\x00label")]),
    CpPayload(
        CfgType.CFG_REQUEST,
        [ConfigAttribute(CfgAttribute.INTERNAL_IP4_ADDRESS), ConfigAttribute(0x4000, b"x")],
    ),
    CpPayload(
        CfgType.CFG_REPLY,
        [
            ConfigAttribute.from_address(CfgAttribute.INTERNAL_IP4_ADDRESS, "10.3.0.1"),
            ConfigAttribute.from_address(CfgAttribute.INTERNAL_IP6_ADDRESS, "2001:db8::5", b"\x40"),
        ],
    ),
    EapPayload(b"\x01\x07\x00\x05\x01"),
    EapPayload(b"\x03\x07\x00\x04"),
    SkPayload(bytes(64)),
    SkfPayload(2, 3, bytes(48)),
    UnknownPayload(200, False, b"opaque"),
]


@pytest.mark.parametrize("payload", ALL_PAYLOADS, ids=lambda p: type(p).__name__)
def test_every_payload_round_trips(payload: Payload) -> None:
    roundtrip(payload)


def test_chain_of_everything_round_trips() -> None:
    payloads = [p for p in ALL_PAYLOADS if not isinstance(p, SkPayload | SkfPayload)]
    data = encode_chain(payloads)
    assert decode_chain(data, payloads[0].payload_type).payloads == payloads


# -- exact layouts (RFC 7296 figures) ------------------------------------------


def test_transform_with_key_length_layout() -> None:
    # 3.3.2: Last(0) RES Len(12) | Type(1) RES ID(12) | attribute AF=1 type 14 value 128
    sa = SaPayload([Proposal(1, ProtocolId.IKE, b"", [Transform(TransformType.ENCR, 12, 128)])])
    expected_transform = bytes.fromhex("0000000c 0100000c 800e0080")
    expected_proposal = bytes.fromhex("00000014 01010001") + expected_transform
    assert sa.encode_body() == expected_proposal
    assert sa.encode(PayloadType.KE) == bytes.fromhex("22000018") + expected_proposal


def test_more_flags_are_2_for_proposals_and_3_for_transforms() -> None:
    body = IKE_PROPOSALS.encode_body()
    assert body[0] == 2  # first proposal: more follow
    assert body[8] == 3  # its first transform: more follow
    second = int.from_bytes(body[2:4], "big")
    assert body[second] == 0  # last proposal


def test_ke_layout() -> None:
    assert KePayload(DhId.MODP_2048, b"\x01\x02").encode(0) == bytes.fromhex("0000000a000e00000102")


def test_id_layout_and_rest_of_id_payload() -> None:
    payload = IdPayload.from_fqdn("gw.example")
    assert payload.encode_body() == b"\x02\x00\x00\x00gw.example"  # RestOfInitIDPayload
    decoded = decode_one(PayloadType.IDr, b"\x01\xff\xff\xff\xc0\x00\x02\x01")  # reserved ignored
    assert decoded == IdPayload(IdType.ID_IPV4_ADDR, b"\xc0\x00\x02\x01", PayloadType.IDr)
    assert decoded.encode_body() == b"\x01\x00\x00\x00\xc0\x00\x02\x01"


def test_notify_layout() -> None:
    notify = NotifyPayload(NotifyType.REKEY_SA, ProtocolId.ESP, b"\x01\x02\x03\x04")
    assert notify.encode_body() == bytes.fromhex("0304 4009 01020304")
    assert NotifyPayload(NotifyType.INVALID_KE_PAYLOAD, data=b"\x00\x13").encode_body() == (
        bytes.fromhex("0000 0011 0013")
    )


def test_delete_layout() -> None:
    delete = DeletePayload(ProtocolId.ESP, [b"\x01\x02\x03\x04", b"\x05\x06\x07\x08"])
    assert delete.encode_body() == bytes.fromhex("03040002 01020304 05060708")
    assert DeletePayload(ProtocolId.IKE).encode_body() == bytes.fromhex("01000000")


def test_traffic_selector_layout() -> None:
    ts = TsPayload([TrafficSelector.from_network("10.0.0.0/24", 6, (80, 80))])
    assert ts.encode_body() == bytes.fromhex("01000000 07060010 00500050 0a000000 0a0000ff")


def test_cp_layout_and_reserved_bit() -> None:
    cp = CpPayload(CfgType.CFG_REQUEST, [ConfigAttribute(CfgAttribute.INTERNAL_IP4_ADDRESS)])
    assert cp.encode_body() == bytes.fromhex("01000000 00010000")
    decoded = decode_one(PayloadType.CP, bytes.fromhex("02000000 80030004 c6336401"))
    assert decoded == CpPayload(
        CfgType.CFG_REPLY, [ConfigAttribute(CfgAttribute.INTERNAL_IP4_DNS, b"\xc6\x33\x64\x01")]
    )


def test_auth_and_cert_layouts() -> None:
    assert AuthPayload(AuthMethod.SHARED_KEY_MIC, b"mac").encode_body() == b"\x02\x00\x00\x00mac"
    assert CertPayload(CertEncoding.X509_SIGNATURE, b"der").encode_body() == b"\x04der"
    assert CertReqPayload(CertEncoding.X509_SIGNATURE, b"h").encode_body() == b"\x04h"


def test_skf_layout() -> None:
    assert SkfPayload(1, 2, b"body").encode(PayloadType.IDi) == bytes.fromhex(
        "2300000c 00010002"
    ) + (b"body")


def test_enum_fields_decode_to_names() -> None:
    notify = decode_one(PayloadType.NOTIFY, bytes.fromhex("00004006"))
    assert notify == NotifyPayload(NotifyType.COOKIE)
    assert isinstance(notify, NotifyPayload) and notify.notify_type is NotifyType.COOKIE
    unknown = decode_one(PayloadType.NOTIFY, bytes.fromhex("0000a000"))
    assert isinstance(unknown, NotifyPayload) and unknown.notify_type == 0xA000
    assert not unknown.is_error and NotifyPayload(NotifyType.INVALID_SYNTAX).is_error


# -- transforms and their attributes -------------------------------------------


def test_unknown_transform_attribute_makes_transform_unusable() -> None:
    # KEY_LENGTH (TV) then an unknown TLV attribute type 0x0123 with 3 octets
    transform = bytes.fromhex("0000 0013 0100 000c 800e 0100 0123 0003 aabbcc")
    proposal = bytes.fromhex("0000 001b 0101 0001") + transform
    sa = decode_one(PayloadType.SA, proposal)
    assert isinstance(sa, SaPayload)
    decoded = sa.proposals[0].transforms[0]
    assert decoded.key_length == 256
    assert decoded.unknown_attributes == (RawAttribute(0x0123, b"\xaa\xbb\xcc"),)
    assert not decoded.usable
    assert sa.encode_body() == proposal  # kept byte for byte


def test_key_length_in_tlv_form_or_twice_is_unknown() -> None:
    tlv = bytes.fromhex("000e 0002 0080")
    transform = bytes.fromhex("0000 000e 0100 000c") + tlv
    sa = decode_one(PayloadType.SA, bytes.fromhex("0000 0016 0101 0001") + transform)
    assert isinstance(sa, SaPayload)
    assert sa.proposals[0].transforms[0].key_length is None
    assert not sa.proposals[0].transforms[0].usable
    twice = bytes.fromhex("0000 0010 0100 000c 800e 0080 800e 0100")
    sa = decode_one(PayloadType.SA, bytes.fromhex("0000 0018 0101 0001") + twice)
    assert isinstance(sa, SaPayload)
    transform_decoded = sa.proposals[0].transforms[0]
    assert transform_decoded.key_length == 128
    assert transform_decoded.unknown_attributes == (RawAttribute(14, b"\x01\x00", tv=True),)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        # proposal length shorter than its header
        (bytes.fromhex("0000 0004 0101 0000"), "bad_proposal_length"),
        # proposal length beyond the payload
        (bytes.fromhex("0000 0040 0101 0000"), "bad_proposal_length"),
        # SPI size larger than the proposal
        (bytes.fromhex("0000 0008 0101 0400"), "bad_proposal_length"),
        # truncated proposal header
        (bytes.fromhex("0000 0008 01"), "truncated_proposal"),
        # transform length 4 (< 8)
        (bytes.fromhex("0000 0010 0101 0001 0000 0004 0100 000c"), "bad_transform_length"),
        # transform length beyond the proposal
        (bytes.fromhex("0000 0010 0101 0001 0000 0010 0100 000c"), "bad_transform_length"),
        # TLV attribute length beyond the transform
        (
            bytes.fromhex("0000 0014 0101 0001 0000 000c 0100 000c 0001 0009"),
            "bad_attribute_length",
        ),
        # half an attribute
        (
            bytes.fromhex("0000 0012 0101 0001 0000 000a 0100 000c 800e"),
            "truncated_transform_attribute",
        ),
        # num transforms says 2, one present
        (bytes.fromhex("0000 0010 0101 0002 0000 0008 0100 000c"), "bad_transform_count"),
        # transform "last" value neither 0 nor 3
        (bytes.fromhex("0000 0010 0101 0001 0200 0008 0100 000c"), "bad_substructure_flag"),
        # last transform marked "more"
        (bytes.fromhex("0000 0010 0101 0001 0300 0008 0100 000c"), "bad_substructure_flag"),
        # proposal "last" value 3
        (bytes.fromhex("0300 0008 0101 0000"), "bad_substructure_flag"),
        # last proposal marked "more"
        (bytes.fromhex("0200 0008 0101 0000"), "bad_substructure_flag"),
        # proposal after one marked last
        (bytes.fromhex("0000 0008 0101 0000 0000 0008 0201 0000"), "bad_substructure_flag"),
    ],
)
def test_sa_length_and_flag_violations(body: bytes, reason: str) -> None:
    assert reason_of(PayloadType.SA, body) == reason


# -- other payload checks ------------------------------------------------------


@pytest.mark.parametrize("size", [0, 15, 257])
def test_nonce_length_bounds(size: int) -> None:
    assert reason_of(PayloadType.NONCE, bytes(size)) == "bad_nonce_length"


@pytest.mark.parametrize(
    ("payload_type", "body", "reason"),
    [
        (PayloadType.KE, b"\x00\x13\x00", "truncated_ke"),
        (PayloadType.IDi, b"\x01\x00\x00", "truncated_id"),
        (PayloadType.IDi, b"\x01\x00\x00\x00\x01\x02\x03", "bad_id_length"),
        (PayloadType.IDr, b"\x05\x00\x00\x00" + bytes(4), "bad_id_length"),
        (PayloadType.AUTH, b"\x02", "truncated_auth"),
        (PayloadType.CERT, b"", "truncated_cert"),
        (PayloadType.NOTIFY, bytes.fromhex("0308 4009 0102"), "bad_spi_size"),
        (PayloadType.NOTIFY, bytes.fromhex("0300 40"), "truncated_notify"),
        (PayloadType.DELETE, bytes.fromhex("0304 0002 01020304"), "bad_payload_length"),
        (PayloadType.DELETE, bytes.fromhex("0308 0001 0102030405060708"), "bad_spi_size"),
        (PayloadType.DELETE, bytes.fromhex("0100 0001"), "bad_spi_size"),
        (PayloadType.DELETE, bytes.fromhex("0904 0001 01020304"), "bad_delete_protocol"),
        (
            PayloadType.TSi,
            bytes.fromhex("02000000 07000010 0000ffff 0a000000 0a0000ff"),
            "truncated_traffic_selector",
        ),
        (
            PayloadType.TSi,
            bytes.fromhex("01000000 07000018 0000ffff 0a000000 0a0000ff"),
            "bad_ts_length",
        ),
        (
            PayloadType.TSi,
            bytes.fromhex("01000000 08000010 0000ffff 0a000000 0a0000ff"),
            "bad_ts_length",
        ),
        (PayloadType.TSi, bytes.fromhex("01000000 07000002"), "bad_ts_length"),
        (
            PayloadType.TSr,
            bytes.fromhex("01000000 07000010 0000ffff 0a000000 0a0000ff 00"),
            "bad_payload_length",
        ),
        (PayloadType.CP, bytes.fromhex("01000000 0001 0004 0a00"), "bad_attribute_length"),
        (PayloadType.CP, bytes.fromhex("01000000 00"), "truncated_config_attribute"),
        (PayloadType.EAP, b"\x01\x01\x00", "bad_eap_length"),
        (PayloadType.EAP, b"\x01\x01\x00\x09\x01", "bad_eap_length"),
        (PayloadType.EAP, b"\x02\x01\x00\x04", "bad_eap_length"),
        (PayloadType.SKF, bytes.fromhex("0000 0001") + bytes(32), "bad_fragment_number"),
        (PayloadType.SKF, bytes.fromhex("0003 0002") + bytes(32), "bad_fragment_number"),
        (PayloadType.SKF, bytes.fromhex("0001"), "truncated_skf"),
    ],
)
def test_payload_violations(payload_type: int, body: bytes, reason: str) -> None:
    assert reason_of(payload_type, body) == reason


def test_delete_encoding_refuses_wrong_spis() -> None:
    with pytest.raises(ValueError, match="octets"):
        DeletePayload(ProtocolId.ESP, [b"\x01\x02"]).encode_body()
    with pytest.raises(ValueError, match="octets"):
        DeletePayload(ProtocolId.IKE, [b"\x01\x02\x03\x04"]).encode_body()


def test_eap_accessors_and_redacted_repr() -> None:
    eap = EapPayload(b"\x02\x09\x00\x0a\x06secret")  # EAP-GTC response
    assert (eap.code, eap.identifier, eap.eap_type) == (2, 9, 6)
    assert "secret" not in repr(eap)
    assert EapPayload(b"\x03\x09\x00\x04").eap_type is None
    assert "\\x00" not in repr(AuthPayload(2, bytes(32)))


# -- identities ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "id_type", "shown"),
    [
        ("192.0.2.1", IdType.ID_IPV4_ADDR, "192.0.2.1"),
        ("2001:db8::1", IdType.ID_IPV6_ADDR, "2001:db8::1"),
        ("gw.example", IdType.ID_FQDN, "gw.example"),
        ("@gw.example", IdType.ID_FQDN, "gw.example"),
        ("user@example", IdType.ID_RFC822_ADDR, "user@example"),
        ("@#0a0b0c", IdType.ID_KEY_ID, "@#0a0b0c"),
    ],
)
def test_identity_from_string_and_str(text: str, id_type: IdType, shown: str) -> None:
    identity = IdPayload.from_string(text)
    assert identity.id_type == id_type
    assert str(identity) == shown
    assert str(roundtrip(identity)) == shown


def test_identity_readers() -> None:
    assert IdPayload.from_address("192.0.2.1").address == ipaddress.ip_address("192.0.2.1")
    assert IdPayload.from_rfc822("user@example").text == "user@example"
    with pytest.raises(ValueError, match="not an address"):
        _ = IdPayload.from_fqdn("gw.example").address
    with pytest.raises(ValueError, match="not a name"):
        _ = IdPayload.from_address("192.0.2.1").text
    with pytest.raises(ValueError, match="DER"):
        IdPayload.from_string("C=CH, O=example, CN=gw")
    assert str(IdPayload.from_der_dn(b"\x30\x00")) == "asn1dn:#3000"
    assert str(IdPayload(IdType.ID_FQDN, b"\xff\x00")) == "2:#ff00"


# -- generic header: lengths, critical bit, reserved bits ----------------------


def test_unknown_noncritical_payload_is_kept_and_chain_continues() -> None:
    nonce = bytes(16)
    data = generic(PayloadType.NONCE, b"opaque") + generic(0, nonce)
    chain = decode_chain(data, 201)
    assert chain.payloads == [UnknownPayload(201, False, b"opaque"), NoncePayload(nonce)]
    assert encode_chain(chain.payloads) == data


def test_unknown_critical_payload_raises_with_its_type() -> None:
    data = generic(PayloadType.NONCE, b"opaque", flags=0x80) + generic(0, bytes(16))
    with pytest.raises(UnsupportedCriticalPayload) as info:
        decode_chain(data, 201)
    assert info.value.payload_type == 201
    assert info.value.reason == "unsupported_critical_payload"
    assert info.value.notify_type == NotifyType.UNSUPPORTED_CRITICAL_PAYLOAD
    assert isinstance(info.value, MalformedMessage)


def test_critical_bit_on_known_payload_and_reserved_bits_are_ignored() -> None:
    data = generic(0, bytes(16), flags=0xFF)
    assert decode_chain(data, PayloadType.NONCE).payloads == [NoncePayload(bytes(16))]
    assert encode_chain([NoncePayload(bytes(16))])[1] == 0  # C and RESERVED zero on send


def test_unknown_payload_keeps_its_critical_bit_when_reencoded() -> None:
    assert UnknownPayload(201, True, b"").encode(0) == bytes.fromhex("00800004")


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (bytes.fromhex("000000"), "truncated_payload_header"),
        (bytes.fromhex("00000003"), "bad_payload_length"),
        (bytes.fromhex("00000009") + bytes(4), "bad_payload_length"),
        (generic(0, bytes(16)) + b"\x00", "trailing_data"),
        (generic(PayloadType.NONCE, bytes(16)), "truncated_payload_header"),
    ],
)
def test_chain_length_violations(data: bytes, reason: str) -> None:
    with pytest.raises(MalformedMessage) as info:
        decode_chain(data, PayloadType.NONCE)
    assert info.value.reason == reason


def test_encrypted_payload_inside_encrypted_payload_is_refused() -> None:
    with pytest.raises(MalformedMessage) as info:
        decode_chain(generic(0, bytes(32)), PayloadType.SK)
    assert info.value.reason == "nested_encrypted_payload"


def test_payload_too_long_for_its_length_field() -> None:
    with pytest.raises(ValueError, match="too long"):
        VendorIdPayload(bytes(0x10000)).encode(0)


# -- the field table mechanism -------------------------------------------------


def test_field_table() -> None:
    table = FieldTable("demo", ("kind", "B"), ("reserved", "3x"), ("spi", "4s"), ("value", "H"))
    assert table.size == 10
    assert table.names == ("kind", "spi", "value")
    packed = table.pack({"kind": 1, "spi": b"abcd", "value": 7})
    assert packed == b"\x01\x00\x00\x00abcd\x00\x07"
    assert table.unpack(b"\x01\xff\xff\xffabcd\x00\x07") == {"kind": 1, "spi": b"abcd", "value": 7}
    with pytest.raises(MalformedMessage, match="truncated_demo"):
        table.unpack(packed[:-1])
    with pytest.raises(ValueError, match="cannot encode"):
        table.pack({"kind": 256, "spi": b"abcd", "value": 0})
    with pytest.raises(ValueError, match="unsupported"):
        FieldTable("bad", ("x", "f"))


def test_ts_type_mismatch_is_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        TrafficSelector(
            TsType.TS_IPV4_ADDR_RANGE,
            0,
            0,
            65535,
            ipaddress.ip_address("::"),
            ipaddress.ip_address("::1"),
        )


def test_two_code_payloads_refuse_other_codes() -> None:
    with pytest.raises(ValueError, match="cannot be payload type"):
        IdPayload(IdType.ID_FQDN, b"x", PayloadType.TSi)
    with pytest.raises(ValueError, match="cannot be payload type"):
        TsPayload([], PayloadType.IDi)
