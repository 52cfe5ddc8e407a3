"""Key derivation (RFC 7296 2.14, 2.17, 2.18; RFC 8784 3) checked against constructions
written out here with the standard library, and key containers that never print keys."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from ikefarm.shared.ikev2.constants import EncrId, IntegId, PrfId
from ikefarm.shared.ikev2.crypto.cipher import Cipher
from ikefarm.shared.ikev2.crypto.integrity import Integrity
from ikefarm.shared.ikev2.crypto.keys import (
    ChildSaKeys,
    IkeSaKeys,
    derive_child_sa_keys,
    derive_ike_sa_keys,
    derive_rekeyed_ike_sa_keys,
    mix_ppk,
)
from ikefarm.shared.ikev2.crypto.prf import Prf

NONCE_I = bytes(range(0x00, 0x20))
NONCE_R = bytes(range(0xA0, 0xC0))
G_IR = bytes((i * 7 + 3) % 256 for i in range(256))
SPI_I = bytes.fromhex("0102030405060708")
SPI_R = bytes.fromhex("1112131415161718")

_DIGESTS = {
    PrfId.HMAC_SHA1: hashlib.sha1,
    PrfId.HMAC_SHA2_256: hashlib.sha256,
    PrfId.HMAC_SHA2_384: hashlib.sha384,
    PrfId.HMAC_SHA2_512: hashlib.sha512,
}


def _prf(prf_id: int, key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, _DIGESTS[prf_id]).digest()


def _prf_plus(prf_id: int, key: bytes, seed: bytes, length: int) -> bytes:
    out, t, n = b"", b"", 1
    while len(out) < length:
        t = _prf(prf_id, key, t + seed + bytes([n]))
        out += t
        n += 1
    return out[:length]


def _split(material: bytes, sizes: list[int]) -> list[bytes]:
    parts, offset = [], 0
    for size in sizes:
        parts.append(material[offset : offset + size])
        offset += size
    return parts


@pytest.mark.parametrize(
    ("prf_id", "integ_id", "encr_id", "key_bits"),
    [
        (PrfId.HMAC_SHA2_256, IntegId.HMAC_SHA2_256_128, EncrId.AES_CBC, 128),
        (PrfId.HMAC_SHA1, IntegId.HMAC_SHA1_96, EncrId.AES_CBC, 256),
        (PrfId.HMAC_SHA2_512, IntegId.HMAC_SHA2_384_192, EncrId.AES_CBC, 192),
        (PrfId.HMAC_SHA2_384, None, EncrId.AES_GCM_16, 256),
        (PrfId.HMAC_SHA2_256, None, EncrId.CHACHA20_POLY1305, None),
    ],
)
def test_ike_sa_keys_rfc7296_2_14(
    prf_id: int, integ_id: int | None, encr_id: int, key_bits: int | None
) -> None:
    prf, cipher = Prf(prf_id), Cipher(encr_id, key_bits)
    integrity = Integrity(integ_id) if integ_id is not None else None
    keys = derive_ike_sa_keys(prf, integrity, cipher, NONCE_I, NONCE_R, G_IR, SPI_I, SPI_R)

    # SKEYSEED = prf(Ni | Nr, g^ir): the whole of both nonces is the HMAC key.
    skeyseed = _prf(prf_id, NONCE_I + NONCE_R, G_IR)
    prf_size = {2: 20, 5: 32, 6: 48, 7: 64}[prf_id]
    integ_size = integrity.key_size if integrity else 0
    encr_size = {128: 16, 192: 24, 256: 32, None: 32}[key_bits] + (4 if cipher.is_aead else 0)
    sizes = [prf_size, integ_size, integ_size, encr_size, encr_size, prf_size, prf_size]
    material = _prf_plus(prf_id, skeyseed, NONCE_I + NONCE_R + SPI_I + SPI_R, sum(sizes))
    assert keys == IkeSaKeys(*_split(material, sizes))
    if cipher.is_aead:
        assert keys.sk_ai == keys.sk_ar == b""
    assert len(keys.sk_ei) == cipher.key_size
    assert keys.outbound(is_initiator=True) == (keys.sk_ei, keys.sk_ai)
    assert keys.inbound(is_initiator=True) == (keys.sk_er, keys.sk_ar)
    assert keys.outbound(is_initiator=False) == keys.inbound(is_initiator=True)


def test_rekeyed_ike_sa_keys_rfc7296_2_18() -> None:
    prf_old, prf_new = Prf(PrfId.HMAC_SHA2_256), Prf(PrfId.HMAC_SHA2_384)
    old_sk_d = bytes(range(32))
    new_spi_i, new_spi_r = bytes.fromhex("a1a2a3a4a5a6a7a8"), bytes.fromhex("b1b2b3b4b5b6b7b8")
    integrity = Integrity(IntegId.HMAC_SHA2_384_192)
    cipher = Cipher(EncrId.AES_CBC, 256)
    keys = derive_rekeyed_ike_sa_keys(
        prf_old,
        old_sk_d,
        prf_new,
        integrity,
        cipher,
        G_IR,
        NONCE_I,
        NONCE_R,
        new_spi_i,
        new_spi_r,
    )
    # SKEYSEED = prf(SK_d (old), g^ir (new) | Ni | Nr) with the OLD PRF ...
    skeyseed = _prf(PrfId.HMAC_SHA2_256, old_sk_d, G_IR + NONCE_I + NONCE_R)
    # ... and the keys from the NEW PRF's prf+ over the new nonces and SPIs.
    sizes = [48, 48, 48, 32, 32, 48, 48]
    material = _prf_plus(
        PrfId.HMAC_SHA2_384, skeyseed, NONCE_I + NONCE_R + new_spi_i + new_spi_r, sum(sizes)
    )
    assert keys == IkeSaKeys(*_split(material, sizes))


@pytest.mark.parametrize("shared_secret", [None, G_IR])
def test_child_sa_keys_rfc7296_2_17(shared_secret: bytes | None) -> None:
    prf = Prf(PrfId.HMAC_SHA2_256)
    sk_d = bytes(range(100, 132))
    keys = derive_child_sa_keys(prf, sk_d, NONCE_I, NONCE_R, 16, 32, shared_secret=shared_secret)
    seed = (shared_secret or b"") + NONCE_I + NONCE_R
    keymat = _prf_plus(PrfId.HMAC_SHA2_256, sk_d, seed, 2 * (16 + 32))
    # Order: encryption i->r, integrity i->r, encryption r->i, integrity r->i.
    assert keys == ChildSaKeys(
        encr_i=keymat[0:16], integ_i=keymat[16:48], encr_r=keymat[48:64], integ_r=keymat[64:96]
    )


def test_child_sa_keys_for_aead_have_no_integrity_keys() -> None:
    prf = Prf(PrfId.HMAC_SHA2_512)
    cipher = Cipher(EncrId.AES_GCM_16, 256)
    keys = derive_child_sa_keys(prf, b"\x01" * 64, NONCE_I, NONCE_R, cipher.key_size, 0)
    keymat = _prf_plus(PrfId.HMAC_SHA2_512, b"\x01" * 64, NONCE_I + NONCE_R, 72)
    assert keys == ChildSaKeys(encr_i=keymat[:36], integ_i=b"", encr_r=keymat[36:], integ_r=b"")


def test_ppk_mixing_rfc8784_3() -> None:
    prf = Prf(PrfId.HMAC_SHA2_256)
    keys = derive_ike_sa_keys(
        prf,
        Integrity(IntegId.HMAC_SHA2_256_128),
        Cipher(EncrId.AES_CBC, 128),
        NONCE_I,
        NONCE_R,
        G_IR,
        SPI_I,
        SPI_R,
    )
    ppk = b"post-quantum preshared key"
    mixed = mix_ppk(prf, ppk, keys)
    assert mixed.sk_d == _prf_plus(PrfId.HMAC_SHA2_256, ppk, keys.sk_d, 32)
    assert mixed.sk_pi == _prf_plus(PrfId.HMAC_SHA2_256, ppk, keys.sk_pi, 32)
    assert mixed.sk_pr == _prf_plus(PrfId.HMAC_SHA2_256, ppk, keys.sk_pr, 32)
    assert (mixed.sk_ai, mixed.sk_ar, mixed.sk_ei, mixed.sk_er) == (
        keys.sk_ai,
        keys.sk_ar,
        keys.sk_ei,
        keys.sk_er,
    )


def test_inconsistent_transforms_and_spis_are_refused() -> None:
    prf = Prf(PrfId.HMAC_SHA2_256)
    gcm, cbc = Cipher(EncrId.AES_GCM_16, 128), Cipher(EncrId.AES_CBC, 128)
    integrity = Integrity(IntegId.HMAC_SHA2_256_128)
    with pytest.raises(ValueError):
        derive_ike_sa_keys(prf, integrity, gcm, NONCE_I, NONCE_R, G_IR, SPI_I, SPI_R)
    with pytest.raises(ValueError):
        derive_ike_sa_keys(prf, None, cbc, NONCE_I, NONCE_R, G_IR, SPI_I, SPI_R)
    with pytest.raises(ValueError):
        derive_ike_sa_keys(prf, integrity, cbc, NONCE_I, NONCE_R, G_IR, SPI_I[:4], SPI_R)


def test_repr_of_key_containers_shows_no_key_octets() -> None:
    prf = Prf(PrfId.HMAC_SHA2_256)
    keys = derive_ike_sa_keys(
        prf,
        Integrity(IntegId.HMAC_SHA2_256_128),
        Cipher(EncrId.AES_CBC, 256),
        NONCE_I,
        NONCE_R,
        G_IR,
        SPI_I,
        SPI_R,
    )
    child = derive_child_sa_keys(prf, keys.sk_d, NONCE_I, NONCE_R, 32, 32)
    for container in (keys, child):
        text = repr(container) + str(container) + f"{container}" + f"{container!r}"
        for name in container.__dataclass_fields__:
            value = getattr(container, name)
            assert not value or value.hex()[:8] not in text
            assert repr(value) not in text
            assert f"{name}=<{len(value)} octets>" in text
    assert repr(keys).startswith("IkeSaKeys(sk_d=<32 octets>, sk_ai=<32 octets>")
    # Distinctive key bytes, including a key whose bytes are printable.
    printable = ChildSaKeys(encr_i=b"SECRETKEY", integ_i=b"\xde\xad", encr_r=b"", integ_r=b"x")
    assert "SECRETKEY" not in repr(printable)
    assert "dead" not in repr(printable)
    assert repr(printable) == (
        "ChildSaKeys(encr_i=<9 octets>, integ_i=<2 octets>, encr_r=<0 octets>, integ_r=<1 octets>)"
    )
