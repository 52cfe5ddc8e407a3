"""Fuzzing the codec: whatever the bytes, only MalformedMessage (or the crypto errors) comes out.

Hostile input must never raise anything else (IndexError, struct.error,
UnicodeError, ...): services count and drop on MalformedMessage and would
crash on anything else (docs/principles.md, principle 6).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ikefarm.shared.ikev2.constants import (
    AuthMethod,
    CertEncoding,
    CfgAttribute,
    CfgType,
    DhId,
    EncrId,
    ExchangeType,
    IntegId,
    NotifyType,
    PayloadType,
    ProtocolId,
    TransformType,
)
from ikefarm.shared.ikev2.crypto.protection import (
    IntegrityCheckFailed,
    MalformedEncryptedPayload,
    protection_for,
)
from ikefarm.shared.ikev2.errors import MalformedMessage
from ikefarm.shared.ikev2.fragments import FragmentReassembler
from ikefarm.shared.ikev2.message import (
    Message,
    decrypt_message,
    encode_message,
    encode_message_fragments,
    parse_message,
    peek_header,
)
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
    SaPayload,
    TrafficSelector,
    Transform,
    TsPayload,
    UnknownPayload,
    VendorIdPayload,
    decode_chain,
    encode_chain,
)
from ikefarm.shared.ikev2.payloads.config import VALUE_LENGTHS

FUZZ = settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
REASON = re.compile(r"[a-z0-9_]{3,40}")
CRYPTO_ERRORS = (IntegrityCheckFailed, MalformedEncryptedPayload)
SPI_I, SPI_R = bytes(range(1, 9)), bytes(range(11, 19))


class NullProtection:
    """Identity 'cipher': lets fuzzed plaintext reach the inner decoder through decrypt_message."""

    def encrypted_length(self, plaintext_len: int) -> int:
        return plaintext_len

    def seal(
        self, sk_e: bytes, sk_a: bytes, associated_data: bytes, plaintext: bytes, **_: Any
    ) -> bytes:
        return plaintext

    def open(self, sk_e: bytes, sk_a: bytes, associated_data: bytes, body: bytes) -> bytes:
        return body


NULL = NullProtection()
GCM = protection_for(EncrId.AES_GCM_16, 256, None)
GCM_KEY = os.urandom(GCM.encr_key_size)
CBC = protection_for(EncrId.AES_CBC, 128, IntegId.HMAC_SHA2_256_128)
CBC_KEYS = (os.urandom(CBC.encr_key_size), os.urandom(CBC.integ_key_size))


def expect_malformed(function: Callable[..., Any], *args: Any) -> Any:
    """Run `function`; a MalformedMessage is fine (with a label-shaped reason), nothing else is."""
    try:
        return function(*args)
    except MalformedMessage as exc:
        assert REASON.fullmatch(exc.reason), exc.reason
        return None


def sample_payloads() -> list[Payload]:
    return [
        SaPayload(
            [
                Proposal(
                    1,
                    ProtocolId.IKE,
                    b"",
                    [
                        Transform(TransformType.ENCR, EncrId.AES_CBC, 256),
                        Transform(TransformType.INTEG, IntegId.HMAC_SHA2_256_128),
                        Transform(TransformType.DH, DhId.ECP_256),
                    ],
                ),
                Proposal(2, ProtocolId.ESP, b"\x01\x02\x03\x04", [Transform(5, 1)]),
            ]
        ),
        KePayload(DhId.ECP_256, bytes(64)),
        NoncePayload(bytes(32)),
        IdPayload.from_address("192.0.2.1"),
        IdPayload.from_fqdn("gw.example", PayloadType.IDr),
        CertPayload(CertEncoding.X509_SIGNATURE, bytes(40)),
        CertReqPayload(CertEncoding.X509_SIGNATURE, bytes(20)),
        AuthPayload(AuthMethod.SHARED_KEY_MIC, bytes(32)),
        NotifyPayload(NotifyType.REKEY_SA, ProtocolId.ESP, b"\x01\x02\x03\x04", b"d"),
        DeletePayload(ProtocolId.ESP, [b"\x01\x02\x03\x04"]),
        VendorIdPayload(b"vid"),
        TsPayload([TrafficSelector.from_network("10.0.0.0/24", 6, (80, 90))]),
        TsPayload([TrafficSelector.from_network("2001:db8::/64")], PayloadType.TSr),
        CpPayload(CfgType.CFG_REQUEST, [ConfigAttribute(CfgAttribute.INTERNAL_IP4_ADDRESS)]),
        EapPayload(b"\x01\x01\x00\x05\x01"),
        UnknownPayload(200, False, b"x"),
    ]


def sample_message(protected: bool) -> Message:
    return Message(
        ExchangeType.IKE_AUTH if protected else ExchangeType.IKE_SA_INIT,
        SPI_I,
        SPI_R,
        1 if protected else 0,
        True,
        False,
        sample_payloads(),
        protected=protected,
    )


VALID_CLEAR = encode_message(sample_message(False))
VALID_NULL = encode_message(sample_message(True), NULL)
VALID_GCM = encode_message(sample_message(True), GCM, GCM_KEY, b"")
VALID_CBC = encode_message(sample_message(True), CBC, *CBC_KEYS)
VALID_FRAGMENTS_NULL = encode_message_fragments(sample_message(True), NULL, b"", b"", 200)
VALID_FRAGMENTS_GCM = encode_message_fragments(sample_message(True), GCM, GCM_KEY, b"", 200)
KNOWN_TYPES = [int(t) for t in PayloadType if t != PayloadType.NONE]


@st.composite
def mutated(draw: st.DrawFn, seed: bytes) -> bytes:
    """`seed` with a few byte flips, length-field rewrites, truncations or insertions
    (a whole datagram: its IKE header Length is often fixed up afterwards)."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["flip", "set", "length", "truncate", "insert", "delete"]))
        if not data:
            break
        position = draw(st.integers(0, len(data) - 1))
        if action == "flip":
            data[position] ^= 1 << draw(st.integers(0, 7))
        elif action == "set":
            data[position] = draw(st.sampled_from([0, 1, 2, 3, 4, 0x7F, 0x80, 0xFF]))
        elif action == "length" and position + 2 <= len(data):
            value = draw(st.sampled_from([0, 1, 3, 4, 7, 8, 0xFF, 0xFFFF]))
            data[position : position + 2] = value.to_bytes(2, "big")
        elif action == "truncate":
            del data[position:]
        elif action == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=8))
        elif action == "delete":
            del data[position : position + draw(st.integers(1, 8))]
    if len(data) >= 28 and draw(st.booleans()):  # keep the header Length right: reach the chain
        data[24:28] = len(data).to_bytes(4, "big")
    return bytes(data)


@st.composite
def raw_chains(draw: st.DrawFn) -> tuple[int, bytes]:
    """A chain of generic payloads with right lengths, random bodies, mostly known types."""
    payload_type = st.one_of(st.sampled_from(KNOWN_TYPES), st.integers(0, 255))
    items = draw(
        st.lists(
            st.tuples(payload_type, st.sampled_from([0, 0x80, 0x7F]), st.binary(max_size=80)),
            max_size=5,
        )
    )
    data = bytearray()
    for index, (_, flags, body) in enumerate(items):
        following = items[index + 1][0] if index + 1 < len(items) else 0
        data += bytes([following, flags]) + (4 + len(body)).to_bytes(2, "big") + body
    first = items[0][0] if items else 0
    return first, bytes(data)


def header(next_payload: int, length: int, exchange: int = 35, message_id: int = 1) -> bytes:
    return (
        SPI_I
        + SPI_R
        + bytes([next_payload, 0x20, exchange, 0x08])
        + message_id.to_bytes(4, "big")
        + length.to_bytes(4, "big")
    )


# -- the tests ---------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=300))
def test_random_bytes(data: bytes) -> None:
    expect_malformed(peek_header, data)
    expect_malformed(parse_message, data)


@FUZZ
@given(st.binary(max_size=200))
def test_random_bytes_after_a_valid_header(body: bytes) -> None:
    for first in (PayloadType.SA, PayloadType.SK, PayloadType.SKF, PayloadType.NOTIFY):
        parsed = expect_malformed(parse_message, header(first, 28 + len(body)) + body)
        if parsed is not None and parsed.protected and not parsed.is_fragment:
            expect_malformed(decrypt_message, parsed, NULL, b"", b"")


@FUZZ
@given(raw_chains())
def test_structured_chains_in_clear_and_inside_sk(chain: tuple[int, bytes]) -> None:
    first, data = chain
    expect_malformed(parse_message, header(first, 28 + len(data)) + data)
    expect_malformed(decode_chain, data, first)
    # the same chain as decrypted SK content
    sk = bytes([first, 0]) + (4 + len(data)).to_bytes(2, "big") + data
    parsed = parse_message(header(PayloadType.SK, 28 + len(sk)) + sk)
    expect_malformed(decrypt_message, parsed, NULL, b"", b"")


@FUZZ
@given(st.data())
def test_mutated_cleartext_messages(data: st.DataObject) -> None:
    datagram = data.draw(mutated(VALID_CLEAR))
    expect_malformed(peek_header, datagram)
    parsed = expect_malformed(parse_message, datagram)
    if parsed is not None and parsed.protected and not parsed.is_fragment:
        expect_malformed(decrypt_message, parsed, NULL, b"", b"")


@FUZZ
@given(st.data())
def test_mutated_inner_chains(data: st.DataObject) -> None:
    datagram = data.draw(mutated(VALID_NULL))
    parsed = expect_malformed(parse_message, datagram)
    if parsed is not None and parsed.protected and not parsed.is_fragment:
        expect_malformed(decrypt_message, parsed, NULL, b"", b"")


@FUZZ
@given(st.data(), st.sampled_from(["gcm", "cbc"]))
def test_mutated_encrypted_messages(data: st.DataObject, cipher: str) -> None:
    seed, protection, keys = (
        (VALID_GCM, GCM, (GCM_KEY, b"")) if cipher == "gcm" else (VALID_CBC, CBC, CBC_KEYS)
    )
    datagram = data.draw(mutated(seed))
    parsed = expect_malformed(parse_message, datagram)
    if parsed is None or parsed.is_fragment:
        return
    try:
        message = decrypt_message(parsed, protection, *keys)
    except MalformedMessage as exc:
        assert REASON.fullmatch(exc.reason)
    except CRYPTO_ERRORS:
        pass
    else:
        # whatever survived integrity protection is the original content
        assert not parsed.protected or message.payloads == sample_message(True).payloads


@FUZZ
@given(st.data())
def test_reassembler_with_mutated_fragments(data: st.DataObject) -> None:
    reassembler = FragmentReassembler(1, max_fragments=8, max_size=4096)
    pool = VALID_FRAGMENTS_NULL
    picks = data.draw(st.lists(st.integers(0, len(pool) - 1), min_size=1, max_size=12))
    for index in picks:
        datagram = pool[index]
        if data.draw(st.booleans()):
            datagram = data.draw(mutated(datagram))
        parsed = expect_malformed(parse_message, datagram)
        if parsed is None:
            continue
        expect_malformed(reassembler.receive, parsed, NULL, b"", b"")


@FUZZ
@given(st.data())
def test_reassembler_with_real_crypto(data: st.DataObject) -> None:
    reassembler = FragmentReassembler(1)
    pool = VALID_FRAGMENTS_GCM
    order = data.draw(st.permutations(list(range(len(pool)))))
    result = None
    for index in order:
        datagram = pool[index]
        mutate = data.draw(st.booleans())
        if mutate:
            datagram = data.draw(mutated(datagram))
        parsed = expect_malformed(parse_message, datagram)
        if parsed is None:
            continue
        try:
            result = reassembler.receive(parsed, GCM, GCM_KEY, b"") or result
        except MalformedMessage as exc:
            assert REASON.fullmatch(exc.reason)
        except CRYPTO_ERRORS:
            pass
    if result is not None:
        assert result.payloads == sample_message(True).payloads


# -- property: what we encode we decode -------------------------------------------

addresses_v4 = st.integers(0, 2**32 - 1).map(lambda n: n.to_bytes(4, "big"))
ports = st.tuples(st.integers(0, 65535), st.integers(0, 65535))
selectors = st.builds(
    lambda a, b, proto, p: TrafficSelector.from_range(
        ".".join(map(str, a)), ".".join(map(str, b)), proto, p
    ),
    addresses_v4,
    addresses_v4,
    st.integers(0, 255),
    ports,
)
transforms = st.builds(
    Transform,
    st.integers(0, 255),
    st.integers(0, 65535),
    st.one_of(st.none(), st.integers(0, 65535)),
)
proposals = st.builds(
    Proposal,
    st.integers(0, 255),
    st.integers(0, 255),
    st.sampled_from([b"", b"\x01\x02\x03\x04", bytes(8)]),
    st.lists(transforms, max_size=4),
)


@st.composite
def config_attributes(draw: st.DrawFn) -> ConfigAttribute:
    """A CP attribute of any type whose value has a length its type allows (RFC 7296 3.15.1)."""
    kind = draw(st.integers(0, 0x7FFF))
    lengths = VALUE_LENGTHS.get(kind)
    if lengths is None:
        return ConfigAttribute(kind, draw(st.binary(max_size=20)))
    length = draw(st.sampled_from(sorted(lengths)))
    value = draw(st.binary(min_size=length, max_size=length))
    if length == 17:  # an IPv6 address or subnet with its prefix length
        value = value[:16] + bytes([draw(st.integers(0, 128))])
    return ConfigAttribute(kind, value)


payloads = st.one_of(
    st.builds(SaPayload, st.lists(proposals, max_size=3)),
    st.builds(KePayload, st.integers(0, 65535), st.binary(max_size=64)),
    st.builds(NoncePayload, st.binary(min_size=16, max_size=256)),
    st.builds(
        NotifyPayload,
        st.integers(0, 65535),
        st.integers(0, 255),
        st.binary(max_size=8),
        st.binary(max_size=32),
    ),
    st.builds(TsPayload, st.lists(selectors, max_size=4), st.sampled_from([44, 45])),
    st.builds(
        CpPayload,
        st.integers(0, 255),
        st.lists(config_attributes()),
    ),
    st.builds(VendorIdPayload, st.binary(max_size=40)),
    st.builds(
        DeletePayload,
        st.just(ProtocolId.ESP),
        st.lists(st.binary(min_size=4, max_size=4), max_size=4),
    ),
    st.builds(IdPayload, st.sampled_from([2, 3, 11]), st.binary(max_size=30)),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(payloads, max_size=6))
def test_encode_decode_round_trip(items: list[Payload]) -> None:
    data = encode_chain(items)
    first = items[0].payload_type if items else 0
    assert decode_chain(data, first).payloads == items
