"""Known-answer tests of prf.py and integrity.py (RFC 2202, RFC 4231, RFC 4868, RFC 7296 2.13)."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from ikefarm.shared.ikev2.constants import IntegId, PrfId
from ikefarm.shared.ikev2.crypto.integrity import Integrity
from ikefarm.shared.ikev2.crypto.prf import Prf
from ikefarm.shared.ikev2.crypto.registry import UnsupportedTransform

H = bytes.fromhex

# PRF vectors: RFC 2202 (HMAC-SHA1) and RFC 4231 test cases 1, 2 and 6, which RFC 4868
# 2.7.1 uses as the PRF-HMAC-SHA-256/384/512 vectors.
TC1 = (b"\x0b" * 20, b"Hi There")
TC2 = (b"Jefe", b"what do ya want for nothing?")
TC6 = (b"\xaa" * 131, b"Test Using Larger Than Block-Size Key - Hash Key First")
PRF_VECTORS = [
    (PrfId.HMAC_SHA1, TC1, "b617318655057264e28bc0b6fb378c8ef146be00"),
    (PrfId.HMAC_SHA1, TC2, "effcdf6ae5eb2fa2d27416d5f184df9c259a7c79"),
    (
        PrfId.HMAC_SHA2_256,
        TC1,
        "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7",
    ),
    (
        PrfId.HMAC_SHA2_256,
        TC2,
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843",
    ),
    (
        PrfId.HMAC_SHA2_256,
        TC6,
        "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54",
    ),
    (
        PrfId.HMAC_SHA2_384,
        TC1,
        "afd03944d84895626b0825f4ab46907f15f9dadbe4101ec682aa034c7cebc59c"
        "faea9ea9076ede7f4af152e8b2fa9cb6",
    ),
    (
        PrfId.HMAC_SHA2_384,
        TC2,
        "af45d2e376484031617f78d2b58a6b1b9c7ef464f5a01b47e42ec3736322445e"
        "8e2240ca5e69e2c78b3239ecfab21649",
    ),
    (
        PrfId.HMAC_SHA2_512,
        TC1,
        "87aa7cdea5ef619d4ff0b4241a1d6cb02379f4e2ce4ec2787ad0b30545e17cde"
        "daa833b7d6b8a702038b274eaea3f4e4be9d914eeb61f1702e696c203a126854",
    ),
    (
        PrfId.HMAC_SHA2_512,
        TC2,
        "164b7a7bfcf819e2e395fbe73b56e0a387bd64222e831fd610270cd7ea250554"
        "9758bf75c05a994a6d034f65f8f0e6fdcaeab1a34d4a6b4b636e070a38bce737",
    ),
]


@pytest.mark.parametrize(("prf_id", "vector", "expected"), PRF_VECTORS)
def test_prf_known_answers(prf_id: int, vector: tuple[bytes, bytes], expected: str) -> None:
    prf = Prf(prf_id)
    key, data = vector
    assert prf.compute(key, data) == H(expected)
    assert prf.output_size == len(H(expected))


def test_prf_sizes() -> None:
    sizes = {p: (Prf(p).key_size, Prf(p).output_size) for p in PrfId if p in (2, 5, 6, 7)}
    assert sizes == {
        PrfId.HMAC_SHA1: (20, 20),
        PrfId.HMAC_SHA2_256: (32, 32),
        PrfId.HMAC_SHA2_384: (48, 48),
        PrfId.HMAC_SHA2_512: (64, 64),
    }


@pytest.mark.parametrize("prf_id", [PrfId.HMAC_MD5, PrfId.AES128_XCBC, PrfId.AES128_CMAC, 99])
def test_unsupported_prfs(prf_id: int) -> None:
    with pytest.raises(UnsupportedTransform):
        Prf(prf_id)


_HASHLIB = {
    PrfId.HMAC_SHA1: hashlib.sha1,
    PrfId.HMAC_SHA2_256: hashlib.sha256,
    PrfId.HMAC_SHA2_384: hashlib.sha384,
    PrfId.HMAC_SHA2_512: hashlib.sha512,
}


def _reference_prf_plus(prf_id: int, key: bytes, seed: bytes, length: int) -> bytes:
    """prf+ written out from RFC 7296 2.13 with the standard library's hmac."""
    digest = _HASHLIB[prf_id]
    t1 = hmac.new(key, seed + b"\x01", digest).digest()
    t2 = hmac.new(key, t1 + seed + b"\x02", digest).digest()
    t3 = hmac.new(key, t2 + seed + b"\x03", digest).digest()
    t4 = hmac.new(key, t3 + seed + b"\x04", digest).digest()
    t5 = hmac.new(key, t4 + seed + b"\x05", digest).digest()
    return (t1 + t2 + t3 + t4 + t5)[:length]


@pytest.mark.parametrize("prf_id", sorted(_HASHLIB))
@pytest.mark.parametrize("length", [0, 1, 19, 20, 32, 33, 64, 100])
def test_prf_plus_against_hand_construction(prf_id: int, length: int) -> None:
    prf = Prf(prf_id)
    key, seed = b"K" * 17, bytes(range(40))
    assert prf.prf_plus(key, seed, length) == _reference_prf_plus(prf_id, key, seed, length)


def test_prf_plus_first_block_is_prf_of_seed_and_one() -> None:
    prf = Prf(PrfId.HMAC_SHA2_256)
    key, seed = TC1
    assert prf.prf_plus(key, seed, 32) == prf.compute(key, seed + b"\x01")
    # A longer output starts with the shorter one.
    assert prf.prf_plus(key, seed, 200)[:50] == prf.prf_plus(key, seed, 50)


def test_prf_plus_refuses_more_than_255_blocks() -> None:
    prf = Prf(PrfId.HMAC_SHA1)
    assert len(prf.prf_plus(b"k", b"s", 255 * 20)) == 255 * 20
    with pytest.raises(ValueError, match="at most 5100 octets"):
        prf.prf_plus(b"k", b"s", 255 * 20 + 1)
    with pytest.raises(ValueError):
        prf.prf_plus(b"k", b"s", -1)


# Integrity: RFC 4868 2.7.2 (AUTH256-1, AUTH384-1, AUTH512-1 and test case 2), truncated,
# and RFC 2202 test case 5 for HMAC-SHA1-96 (RFC 2404).
INTEGRITY_VECTORS = [
    (IntegId.HMAC_SHA1_96, b"\x0c" * 20, b"Test With Truncation", "4c1a03424b55e07fe7f27be1"),
    (IntegId.HMAC_SHA2_256_128, b"\x0b" * 32, b"Hi There", "198a607eb44bfbc69903a0f1cf2bbdc5"),
    (
        IntegId.HMAC_SHA2_256_128,
        b"Jefe" * 8,
        b"what do ya want for nothing?",
        "167f928588c5cc2eef8e3093caa0e87c",
    ),
    (
        IntegId.HMAC_SHA2_384_192,
        b"\x0b" * 48,
        b"Hi There",
        "b6a8d5636f5c6a7224f9977dcf7ee6c7fb6d0c48cbdee973",
    ),
    (
        IntegId.HMAC_SHA2_384_192,
        b"Jefe" * 12,
        b"what do ya want for nothing?",
        "2c7353974f1842fd66d53c452ca42122b28c0b594cfb184d",
    ),
    (
        IntegId.HMAC_SHA2_512_256,
        b"\x0b" * 64,
        b"Hi There",
        "637edc6e01dce7e6742a99451aae82df23da3e92439e590e43e761b33e910fb8",
    ),
]


@pytest.mark.parametrize(("integ_id", "key", "data", "icv"), INTEGRITY_VECTORS)
def test_integrity_known_answers(integ_id: int, key: bytes, data: bytes, icv: str) -> None:
    integrity = Integrity(integ_id)
    assert integrity.compute(key, data) == H(icv)
    assert integrity.verify(key, data, H(icv))
    wrong = bytearray(H(icv))
    wrong[0] ^= 0x80
    assert not integrity.verify(key, data, bytes(wrong))
    assert not integrity.verify(key, data, H(icv)[:-1])
    assert not integrity.verify(key, data, H(icv) + b"\x00")
    assert not integrity.verify(key, data + b"!", H(icv))


def test_integrity_sizes() -> None:
    sizes = {i: (Integrity(i).key_size, Integrity(i).icv_size) for i in (2, 12, 13, 14)}
    assert sizes == {2: (20, 12), 12: (32, 16), 13: (48, 24), 14: (64, 32)}


@pytest.mark.parametrize("integ_id", [IntegId.NONE, IntegId.HMAC_MD5_96, IntegId.AES_XCBC_96, 77])
def test_unsupported_integrity(integ_id: int) -> None:
    with pytest.raises(UnsupportedTransform):
        Integrity(integ_id)


def test_integrity_key_length_is_checked_without_echoing_the_key() -> None:
    integrity = Integrity(IntegId.HMAC_SHA2_256_128)
    key = bytes.fromhex("deadbeefcafe")
    with pytest.raises(ValueError) as info:
        integrity.compute(key, b"data")
    assert "deadbeef" not in str(info.value)
