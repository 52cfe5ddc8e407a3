"""Tests of cipher.py and protection.py: published vectors through the SK payload code,
round trips and tamper detection for every supported combination, and fuzzing of `open`."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ikefarm.shared.ikev2.constants import EncrId, IntegId
from ikefarm.shared.ikev2.crypto.cipher import Cipher, UnsupportedTransform
from ikefarm.shared.ikev2.crypto.integrity import Integrity
from ikefarm.shared.ikev2.crypto.protection import (
    IntegrityCheckFailed,
    MalformedEncryptedPayload,
    SkProtection,
    protection_for,
)

H = bytes.fromhex

# --- Cipher descriptors -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("encr_id", "key_bits", "sizes"),
    [
        # (is_aead, key_size incl. salt, iv_size, block_size, icv_size)
        (EncrId.AES_CBC, 128, (False, 16, 16, 16, 0)),
        (EncrId.AES_CBC, 192, (False, 24, 16, 16, 0)),
        (EncrId.AES_CBC, 256, (False, 32, 16, 16, 0)),
        (EncrId.AES_GCM_16, 128, (True, 20, 8, 1, 16)),
        (EncrId.AES_GCM_16, 192, (True, 28, 8, 1, 16)),
        (EncrId.AES_GCM_16, 256, (True, 36, 8, 1, 16)),
        (EncrId.CHACHA20_POLY1305, None, (True, 36, 8, 1, 16)),
    ],
)
def test_cipher_sizes(
    encr_id: int, key_bits: int | None, sizes: tuple[bool, int, int, int, int]
) -> None:
    cipher = Cipher(encr_id, key_bits)
    assert (
        cipher.is_aead,
        cipher.key_size,
        cipher.iv_size,
        cipher.block_size,
        cipher.icv_size,
    ) == sizes


@pytest.mark.parametrize(
    ("encr_id", "key_bits"),
    [
        (EncrId.AES_CBC, None),  # AES needs the Key Length attribute (RFC 7296 3.3.5)
        (EncrId.AES_CBC, 64),
        (EncrId.AES_CBC, 512),
        (EncrId.AES_GCM_16, None),
        (EncrId.AES_GCM_16, 100),
        (EncrId.CHACHA20_POLY1305, 256),  # RFC 7634 2: no Key Length attribute
        (EncrId.AES_GCM_8, 128),
        (EncrId.AES_GCM_12, 128),
        (EncrId.AES_CTR, 128),
        (EncrId.AES_CCM_16, 128),
        (EncrId.DES3, None),
        (EncrId.NULL, None),
        (EncrId.NULL_AUTH_AES_GMAC, 128),
        (4242, None),
    ],
)
def test_unsupported_ciphers(encr_id: int, key_bits: int | None) -> None:
    with pytest.raises(UnsupportedTransform) as info:
        Cipher(encr_id, key_bits)
    assert isinstance(info.value, ValueError)
    assert str(int(encr_id)) in str(info.value)


# NIST SP 800-38A F.2.1/F.2.3/F.2.5 (CBC-AES128/192/256.Encrypt).
SP800_38A_PLAINTEXT = H(
    "6bc1bee22e409f96e93d7e117393172aae2d8a571e03ac9c9eb76fac45af8e51"
    "30c81c46a35ce411e5fbc1191a0a52eff69f2445df4f9b17ad2b417be66c3710"
)
SP800_38A_IV = H("000102030405060708090a0b0c0d0e0f")
SP800_38A = [
    (
        "2b7e151628aed2a6abf7158809cf4f3c",
        "7649abac8119b246cee98e9b12e9197d5086cb9b507219ee95db113a917678b2"
        "73bed6b8e3c1743b7116e69e222295163ff1caa1681fac09120eca307586e1a7",
    ),
    (
        "8e73b0f7da0e6452c810f32b809079e562f8ead2522c6b7b",
        "4f021db243bc633d7178183a9fa071e8b4d9ada9ad7dedf4e5e738763f69145a"
        "571b242012fb7ae07fa9baac3df102e008b0e27988598881d920a9e64f5615cd",
    ),
    (
        "603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4",
        "f58c4c04d6e5f1ba779eabfb5f7bfbd69cfc4e967edb808d679f777bc6702c7d"
        "39f23369a9d9bacfa530e26304231461b2eb05e2c39be9fcda6c19078c6a9d1b",
    ),
]


@pytest.mark.parametrize(("key", "ciphertext"), SP800_38A)
def test_aes_cbc_sp800_38a(key: str, ciphertext: str) -> None:
    cipher = Cipher(EncrId.AES_CBC, len(H(key)) * 8)
    assert cipher.encrypt(H(key), SP800_38A_IV, SP800_38A_PLAINTEXT) == H(ciphertext)
    assert cipher.decrypt(H(key), SP800_38A_IV, H(ciphertext)) == SP800_38A_PLAINTEXT


# --- CBC + HMAC through SkProtection --------------------------------------------------------

IKE_HEADER_AND_SK_HEADER = H("00112233445566778899aabbccddeeff2e202508000000010000006423000048")


def _sha256_128(key: bytes, data: bytes) -> bytes:
    """HMAC-SHA-256-128 from the standard library, independent of integrity.py."""
    return hmac.new(key, data, hashlib.sha256).digest()[:16]


# RFC 3602 4 cases #2 and #3 (AES-128-CBC).
RFC3602_CASE2 = (
    "c286696d887c9aa0611bbb3e2025a45a",
    "562e17996d093d28ddb3ba695a2e6f58",
    bytes(range(32)),
    "d296cd94c2cccf8a3a863028b5e1dc0a7586602d253cfff91b8266bea6d61ab1",
)
RFC3602_CASE3 = (
    "6c3ea0477630ce21a2ce334aa746c2cd",
    "c782dc4c098c66cbd9cd27d825682c81",
    b"This is a 48-byte message (exactly 3 AES blocks)",
    "d0a02b3836451753d493665d33f0e8862dea54cdb293abc7506939276772f8d5"
    "021c19216bad525c8579695d83ba2684",
)
RFC3602_CASE4 = (
    "56e47a38c5598974bc46903dba290349",
    "8ce82eefbea0da3c44699ed7db51b7d9",
    bytes(range(0xA0, 0xE0)),
    "c30e32ffedc0774e6aff6af0869f71aa0f3af07a9a31a9c684db207eb0ef8e4e"
    "35907aa632c3ffdf868bb7b29d3d46ad83ce9f9a102ee99d49a53e87f4c3da55",
)
SK_A_256 = bytes(range(0x40, 0x60))


@pytest.mark.parametrize("case", [RFC3602_CASE2, RFC3602_CASE3])
def test_cbc_open_rfc3602_vectors(case: tuple[str, str, bytes, str]) -> None:
    key, iv, plaintext, ciphertext = case
    protection = SkProtection(Cipher(EncrId.AES_CBC, 128), Integrity(IntegId.HMAC_SHA2_256_128))
    ad = IKE_HEADER_AND_SK_HEADER
    icv = _sha256_128(SK_A_256, ad + H(iv) + H(ciphertext))
    body = H(iv) + H(ciphertext) + icv
    # The vector's last plaintext octet becomes the Pad Length: the payload chain is
    # what precedes the padding.
    pad_length = plaintext[-1]
    expected = plaintext[: len(plaintext) - pad_length - 1]
    assert protection.open(H(key), SK_A_256, ad, body) == expected
    assert protection.cipher.encrypt(H(key), H(iv), plaintext) == H(ciphertext)


def test_cbc_pad_length_beyond_the_data_is_malformed() -> None:
    # RFC 3602 case #4 ends in 0xdf: a pad length of 223 in 64 octets, authentic ICV.
    key, iv, _, ciphertext = RFC3602_CASE4
    protection = SkProtection(Cipher(EncrId.AES_CBC, 128), Integrity(IntegId.HMAC_SHA2_256_128))
    ad = IKE_HEADER_AND_SK_HEADER
    body = H(iv) + H(ciphertext) + _sha256_128(SK_A_256, ad + H(iv) + H(ciphertext))
    with pytest.raises(MalformedEncryptedPayload) as info:
        protection.open(H(key), SK_A_256, ad, body)
    assert info.value.reason == "sk_bad_pad_length"


def test_cbc_seal_layout_with_fixed_iv() -> None:
    key, iv = H(RFC3602_CASE3[0]), H(RFC3602_CASE3[1])
    protection = SkProtection(Cipher(EncrId.AES_CBC, 128), Integrity(IntegId.HMAC_SHA2_256_128))
    ad = IKE_HEADER_AND_SK_HEADER
    plaintext = b"\x29\x00\x00\x0c" + b"payloads"  # 12 octets -> 3 octets of padding + pad length
    body = protection.seal(key, SK_A_256, ad, plaintext, iv=iv)
    assert len(body) == protection.encrypted_length(len(plaintext)) == 16 + 16 + 16
    assert body[:16] == iv
    ciphertext = body[16:32]
    assert protection.cipher.decrypt(key, iv, ciphertext) == plaintext + b"\x00\x00\x00\x03"
    assert body[32:] == _sha256_128(SK_A_256, ad + iv + ciphertext)
    assert protection.open(key, SK_A_256, ad, body) == plaintext


# --- AEAD through SkProtection ---------------------------------------------------------------

# The GCM specification's test cases 4, 10 and 16 (McGrew & Viega; NIST GCM vectors):
# 12-octet IV cafebabe facedbaddecaf888 = RFC 4106 salt | IV.
GCM_PLAINTEXT = H(
    "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72"
    "1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39"
)
GCM_AAD = H("feedfacedeadbeeffeedfacedeadbeefabaddad2")
GCM_SALT, GCM_IV = H("cafebabe"), H("facedbaddecaf888")
GCM_VECTORS = [
    (
        "feffe9928665731c6d6a8f9467308308",
        "42831ec2217774244b7221b784d0d49ce3aa212f2c02a4e035c17e2329aca12e"
        "21d514b25466931c7d8f6a5aac84aa051ba30b396a0aac973d58e091",
        "5bc94fbc3221a5db94fae95ae7121a47",
    ),
    (
        "feffe9928665731c6d6a8f9467308308feffe9928665731c",
        "3980ca0b3c00e841eb06fac4872a2757859e1ceaa6efd984628593b40ca1e19c"
        "7d773d00c144c525ac619d18c84a3f4718e2448b2fe324d9ccda2710",
        "2519498e80f1478f37ba55bd6d27618c",
    ),
    (
        "feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308",
        "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa"
        "8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662",
        "76fc6ece0f4e1768cddf8853bb2d551b",
    ),
]


@pytest.mark.parametrize(("key", "ciphertext", "tag"), GCM_VECTORS)
def test_aes_gcm_open_published_vector(key: str, ciphertext: str, tag: str) -> None:
    protection = protection_for(EncrId.AES_GCM_16, len(H(key)) * 8, None)
    sk_e = H(key) + GCM_SALT  # RFC 5282 7.1: the salt is the last 4 octets of SK_e
    body = GCM_IV + H(ciphertext) + H(tag)
    # Last plaintext octet 0x39 = 57 is read as the Pad Length: 2 octets of payload remain.
    assert protection.open(sk_e, b"", GCM_AAD, body) == GCM_PLAINTEXT[:2]
    # The tag covers the associated data.
    with pytest.raises(IntegrityCheckFailed):
        protection.open(sk_e, b"", GCM_AAD[:-1] + b"\x00", body)


@pytest.mark.parametrize(("key", "ciphertext", "tag"), GCM_VECTORS)
def test_aes_gcm_seal_with_fixed_iv(key: str, ciphertext: str, tag: str) -> None:
    protection = protection_for(EncrId.AES_GCM_16, len(H(key)) * 8, IntegId.NONE)
    sk_e = H(key) + GCM_SALT
    # The vector minus its last octet, sealed: same key stream, so the same ciphertext
    # prefix; the appended Pad Length (0) then differs from the vector's last octet.
    plaintext = GCM_PLAINTEXT[:-1]
    body = protection.seal(sk_e, b"", GCM_AAD, plaintext, iv=GCM_IV)
    assert len(body) == protection.encrypted_length(len(plaintext)) == 8 + 60 + 16
    assert body[:8] == GCM_IV
    assert body[8 : 8 + 59] == H(ciphertext)[:59]
    assert body[8 + 59] == H(ciphertext)[59] ^ GCM_PLAINTEXT[59] ^ 0x00
    assert protection.open(sk_e, b"", GCM_AAD, body) == plaintext


# RFC 8439 2.8.2: the AEAD construction example; its nonce 07000000 | 4041424344454647 is
# an RFC 7634 salt | IV.
CHACHA_KEY = bytes(range(0x80, 0xA0))
CHACHA_SALT, CHACHA_IV = H("07000000"), H("4041424344454647")
CHACHA_AAD = H("50515253c0c1c2c3c4c5c6c7")
CHACHA_PLAINTEXT = (
    b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the "
    b"future, sunscreen would be it."
)
CHACHA_CIPHERTEXT = H(
    "d31a8d34648e60db7b86afbc53ef7ec2a4aded51296e08fea9e2b5a736ee62d6"
    "3dbea45e8ca9671282fafb69da92728b1a71de0a9e060b2905d6a5b67ecd3b36"
    "92ddbd7f2d778b8c9803aee328091b58fab324e4fad675945585808b4831d7bc"
    "3ff4def08e4b7a9de576d26586cec64b6116"
)
CHACHA_TAG = H("1ae10b594f09e26a7e902ecbd0600691")


def test_chacha20_poly1305_rfc8439_vector() -> None:
    protection = protection_for(EncrId.CHACHA20_POLY1305, None, None)
    sk_e = CHACHA_KEY + CHACHA_SALT
    cipher = protection.cipher
    assert cipher.encrypt(sk_e, CHACHA_IV, CHACHA_PLAINTEXT, CHACHA_AAD) == (
        CHACHA_CIPHERTEXT + CHACHA_TAG
    )
    body = CHACHA_IV + CHACHA_CIPHERTEXT + CHACHA_TAG
    # The final "." (0x2e = 46) is the Pad Length: 114 - 47 = 67 octets of payload.
    assert protection.open(sk_e, b"", CHACHA_AAD, body) == CHACHA_PLAINTEXT[:67]
    tampered = bytearray(body)
    tampered[-1] ^= 0x01
    with pytest.raises(IntegrityCheckFailed):
        protection.open(sk_e, b"", CHACHA_AAD, bytes(tampered))
    sealed = protection.seal(sk_e, b"", CHACHA_AAD, CHACHA_PLAINTEXT[:-1], iv=CHACHA_IV)
    assert sealed[8 : 8 + 113] == CHACHA_CIPHERTEXT[:113]


# --- every combination: round trips, lengths, tampering -----------------------------------

CIPHERS = [
    (EncrId.AES_CBC, 128),
    (EncrId.AES_CBC, 192),
    (EncrId.AES_CBC, 256),
    (EncrId.AES_GCM_16, 128),
    (EncrId.AES_GCM_16, 192),
    (EncrId.AES_GCM_16, 256),
    (EncrId.CHACHA20_POLY1305, None),
]
INTEGRITIES = [
    IntegId.HMAC_SHA1_96,
    IntegId.HMAC_SHA2_256_128,
    IntegId.HMAC_SHA2_384_192,
    IntegId.HMAC_SHA2_512_256,
]
COMBINATIONS = [
    (encr, bits, None if encr != EncrId.AES_CBC else integ)
    for (encr, bits), integ in itertools.product(CIPHERS, INTEGRITIES)
    if encr == EncrId.AES_CBC or integ == IntegId.HMAC_SHA1_96  # AEAD once each
]


def _keys(protection: SkProtection, seed: int = 1) -> tuple[bytes, bytes]:
    sk_e = bytes((seed + i) % 256 for i in range(protection.encr_key_size))
    sk_a = bytes((seed * 7 + i) % 256 for i in range(protection.integ_key_size))
    return sk_e, sk_a


def _id(value: tuple[int, int | None, int | None]) -> str:
    encr, bits, integ = value
    return f"{EncrId(encr).name}-{bits}-{IntegId(integ).name if integ else 'aead'}"


@pytest.mark.parametrize("combination", COMBINATIONS, ids=_id)
def test_round_trip_and_lengths(combination: tuple[int, int | None, int | None]) -> None:
    protection = protection_for(*combination)
    sk_e, sk_a = _keys(protection)
    ad = IKE_HEADER_AND_SK_HEADER
    for length in (0, 1, 15, 16, 17, 31, 32, 100, 1000):
        plaintext = bytes((i * 13) % 256 for i in range(length))
        body = protection.seal(sk_e, sk_a, ad, plaintext)
        assert len(body) == protection.encrypted_length(length)
        encrypted = len(body) - protection.cipher.iv_size - protection.icv_size
        assert encrypted % protection.cipher.block_size == 0
        assert encrypted >= length + 1  # the Pad Length octet is always there
        assert protection.open(sk_e, sk_a, ad, body) == plaintext
    # Random IVs: two seals of the same plaintext differ.
    assert protection.seal(sk_e, sk_a, ad, b"x") != protection.seal(sk_e, sk_a, ad, b"x")


@pytest.mark.parametrize("combination", COMBINATIONS, ids=_id)
def test_any_modification_fails_the_integrity_check(
    combination: tuple[int, int | None, int | None],
) -> None:
    protection = protection_for(*combination)
    sk_e, sk_a = _keys(protection)
    ad = IKE_HEADER_AND_SK_HEADER
    body = protection.seal(sk_e, sk_a, ad, b"inner payload chain" * 3)
    for position in range(len(body)):
        tampered = bytearray(body)
        tampered[position] ^= 0x40
        with pytest.raises(IntegrityCheckFailed):
            protection.open(sk_e, sk_a, ad, bytes(tampered))
    for position in range(len(ad)):
        changed = bytearray(ad)
        changed[position] ^= 0x01
        with pytest.raises(IntegrityCheckFailed):
            protection.open(sk_e, sk_a, bytes(changed), body)
    other_e, other_a = _keys(protection, seed=99)
    with pytest.raises(IntegrityCheckFailed):
        protection.open(other_e, other_a if sk_a else sk_a, ad, body)
    if sk_a:
        with pytest.raises(IntegrityCheckFailed):
            protection.open(sk_e, other_a, ad, body)


@pytest.mark.parametrize("combination", COMBINATIONS, ids=_id)
def test_short_and_misaligned_bodies_are_malformed(
    combination: tuple[int, int | None, int | None],
) -> None:
    protection = protection_for(*combination)
    sk_e, sk_a = _keys(protection)
    ad = IKE_HEADER_AND_SK_HEADER
    for length in range(protection.min_body_length):
        with pytest.raises(MalformedEncryptedPayload) as info:
            protection.open(sk_e, sk_a, ad, bytes(length))
        assert info.value.reason == "sk_too_short"
    body = protection.seal(sk_e, sk_a, ad, b"data")
    if protection.cipher.block_size > 1:
        with pytest.raises(MalformedEncryptedPayload) as info:
            protection.open(sk_e, sk_a, ad, body + b"\x00")
        assert info.value.reason == "sk_not_block_aligned"
    else:
        with pytest.raises(IntegrityCheckFailed):
            protection.open(sk_e, sk_a, ad, body + b"\x00")


def test_protection_refuses_inconsistent_transforms() -> None:
    with pytest.raises(ValueError):
        SkProtection(Cipher(EncrId.AES_GCM_16, 256), Integrity(IntegId.HMAC_SHA2_256_128))
    with pytest.raises(ValueError):
        SkProtection(Cipher(EncrId.AES_CBC, 256), None)
    with pytest.raises(ValueError):
        protection_for(EncrId.AES_CBC, 128, IntegId.NONE)
    with pytest.raises(UnsupportedTransform):
        protection_for(EncrId.AES_CBC, 128, IntegId.AES_XCBC_96)


def test_wrong_key_or_iv_lengths_are_refused_without_echoing_keys() -> None:
    protection = protection_for(EncrId.AES_CBC, 128, IntegId.HMAC_SHA2_256_128)
    sk_e, sk_a = _keys(protection)
    for bad_e, bad_a in ((sk_e[:-1], sk_a), (sk_e, sk_a + b"\x00")):
        with pytest.raises(ValueError) as info:
            protection.seal(bad_e, bad_a, b"", b"x")
        assert sk_e.hex()[:8] not in str(info.value)
        with pytest.raises(ValueError):
            protection.open(bad_e, bad_a, b"", bytes(64))
    with pytest.raises(ValueError):
        protection.seal(sk_e, sk_a, b"", b"x", iv=bytes(8))
    with pytest.raises(ValueError):
        protection.encrypted_length(-1)


def test_encrypted_length_examples() -> None:
    cbc = protection_for(EncrId.AES_CBC, 256, IntegId.HMAC_SHA2_256_128)
    # IV 16 + (n + 1 rounded up to 16) + ICV 16
    assert [cbc.encrypted_length(n) for n in (0, 14, 15, 16, 31)] == [48, 48, 48, 64, 64]
    gcm = protection_for(EncrId.AES_GCM_16, 256, None)
    # IV 8 + n + 1 + tag 16
    assert [gcm.encrypted_length(n) for n in (0, 1, 100)] == [25, 26, 125]


# --- hypothesis: open never raises anything but the two documented errors ------------------


@settings(max_examples=300, deadline=None)
@given(
    combination=st.sampled_from(COMBINATIONS),
    ad=st.binary(max_size=64),
    body=st.binary(max_size=200),
)
def test_open_random_bodies(
    combination: tuple[int, int | None, int | None], ad: bytes, body: bytes
) -> None:
    protection = protection_for(*combination)
    sk_e, sk_a = _keys(protection)
    with contextlib.suppress(IntegrityCheckFailed, MalformedEncryptedPayload):
        protection.open(sk_e, sk_a, ad, body)


@settings(max_examples=200, deadline=None)
@given(
    combination=st.sampled_from(COMBINATIONS),
    plaintext=st.binary(max_size=300),
    cut=st.integers(min_value=0, max_value=400),
    flip=st.integers(min_value=0, max_value=400),
)
def test_open_mangled_sealed_bodies(
    combination: tuple[int, int | None, int | None], plaintext: bytes, cut: int, flip: int
) -> None:
    protection = protection_for(*combination)
    sk_e, sk_a = _keys(protection)
    body = bytearray(protection.seal(sk_e, sk_a, b"hdr", plaintext))
    body[flip % len(body)] ^= 0x01
    mangled = bytes(body[: len(body) - cut % len(body)] if cut % 3 else body)
    with pytest.raises((IntegrityCheckFailed, MalformedEncryptedPayload)):
        protection.open(sk_e, sk_a, b"hdr", mangled)


def test_memoryviews_of_a_datagram_are_accepted() -> None:
    protection = protection_for(EncrId.AES_CBC, 128, IntegId.HMAC_SHA2_256_128)
    sk_e, sk_a = _keys(protection)
    ad = IKE_HEADER_AND_SK_HEADER
    datagram = ad + protection.seal(sk_e, sk_a, ad, b"chain")
    view = memoryview(datagram)
    assert protection.open(sk_e, sk_a, view[: len(ad)], view[len(ad) :]) == b"chain"
