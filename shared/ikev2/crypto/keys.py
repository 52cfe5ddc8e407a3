"""Key derivation of IKEv2 (RFC 7296 2.13, 2.14, 2.17, 2.18; RFC 8784 3).

All functions are pure: nonces, SPIs and g^ir come in, keys come out. The key
containers never print key octets: their `repr` shows lengths only, so an
accidental log line or traceback cannot leak them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from ikefarm.shared.ikev2.crypto.cipher import Cipher
from ikefarm.shared.ikev2.crypto.integrity import Integrity
from ikefarm.shared.ikev2.crypto.prf import Prf

__all__ = [
    "ChildSaKeys",
    "IkeSaKeys",
    "derive_child_sa_keys",
    "derive_ike_sa_keys",
    "derive_rekeyed_ike_sa_keys",
    "mix_ppk",
]

_SPI_SIZE = 8  # IKE SPIs are 8 octets (RFC 7296 3.1)


def _lengths_repr(instance: IkeSaKeys | ChildSaKeys) -> str:
    parts = ", ".join(
        f"{field.name}=<{len(getattr(instance, field.name))} octets>" for field in fields(instance)
    )
    return f"{type(instance).__name__}({parts})"


@dataclass(frozen=True, repr=False, slots=True)
class IkeSaKeys:
    """SK_d, SK_ai, SK_ar, SK_ei, SK_er, SK_pi, SK_pr of an IKE SA (RFC 7296 2.14).

    With an AEAD cipher SK_ai and SK_ar are empty (RFC 5282 7.1) and SK_ei/SK_er
    carry the salt in their last 4 octets.
    """

    sk_d: bytes
    sk_ai: bytes
    sk_ar: bytes
    sk_ei: bytes
    sk_er: bytes
    sk_pi: bytes
    sk_pr: bytes

    def __repr__(self) -> str:
        return _lengths_repr(self)

    def outbound(self, is_initiator: bool) -> tuple[bytes, bytes]:
        """(SK_e, SK_a) protecting what this side sends (SK_ei/SK_ai are the initiator's)."""
        return (self.sk_ei, self.sk_ai) if is_initiator else (self.sk_er, self.sk_ar)

    def inbound(self, is_initiator: bool) -> tuple[bytes, bytes]:
        """(SK_e, SK_a) protecting messages this side receives."""
        return (self.sk_er, self.sk_ar) if is_initiator else (self.sk_ei, self.sk_ai)


@dataclass(frozen=True, repr=False, slots=True)
class ChildSaKeys:
    """KEYMAT of a Child SA split per direction (RFC 7296 2.17).

    `encr_i`/`integ_i` protect initiator-to-responder traffic, `encr_r`/`integ_r`
    the other direction. For AEAD the integrity keys are empty and the
    encryption keys carry the salt.
    """

    encr_i: bytes
    integ_i: bytes
    encr_r: bytes
    integ_r: bytes

    def __repr__(self) -> str:
        return _lengths_repr(self)


def _check_transforms(integrity: Integrity | None, cipher: Cipher) -> int:
    """Integrity key size, refusing combinations RFC 5282 8 forbids or CBC cannot run."""
    if cipher.is_aead:
        if integrity is not None:
            raise ValueError("an AEAD cipher takes no integrity transform (RFC 5282 8)")
        return 0
    if integrity is None:
        raise ValueError(f"{cipher!r} needs an integrity transform")
    return integrity.key_size


def _check_spis(spi_i: bytes, spi_r: bytes) -> None:
    if len(spi_i) != _SPI_SIZE or len(spi_r) != _SPI_SIZE:
        raise ValueError(f"IKE SPIs must be {_SPI_SIZE} octets each")


def _split_ike_keys(
    prf: Prf,
    integrity: Integrity | None,
    cipher: Cipher,
    skeyseed: bytes,
    nonce_i: bytes,
    nonce_r: bytes,
    spi_i: bytes,
    spi_r: bytes,
) -> IkeSaKeys:
    integ_size = _check_transforms(integrity, cipher)
    _check_spis(spi_i, spi_r)
    # {SK_d | SK_ai | SK_ar | SK_ei | SK_er | SK_pi | SK_pr}
    #     = prf+ (SKEYSEED, Ni | Nr | SPIi | SPIr)                        (RFC 7296 2.14)
    sizes = (
        prf.key_size,
        integ_size,
        integ_size,
        cipher.key_size,
        cipher.key_size,
        prf.key_size,
        prf.key_size,
    )
    material = prf.prf_plus(skeyseed, nonce_i + nonce_r + spi_i + spi_r, sum(sizes))
    parts: list[bytes] = []
    offset = 0
    for size in sizes:
        parts.append(material[offset : offset + size])
        offset += size
    return IkeSaKeys(*parts)


def derive_ike_sa_keys(
    prf: Prf,
    integrity: Integrity | None,
    cipher: Cipher,
    nonce_i: bytes,
    nonce_r: bytes,
    shared_secret: bytes,
    spi_i: bytes,
    spi_r: bytes,
) -> IkeSaKeys:
    """Keys of a new IKE SA from IKE_SA_INIT (RFC 7296 2.14).

    SKEYSEED = prf(Ni | Nr, g^ir). HMAC PRFs take Ni | Nr whole as the key
    (only fixed-key-size PRFs such as AES-XCBC would use half of each nonce).
    """
    skeyseed = prf.compute(nonce_i + nonce_r, shared_secret)
    return _split_ike_keys(prf, integrity, cipher, skeyseed, nonce_i, nonce_r, spi_i, spi_r)


def derive_rekeyed_ike_sa_keys(
    prf_old: Prf,
    old_sk_d: bytes,
    prf: Prf,
    integrity: Integrity | None,
    cipher: Cipher,
    shared_secret: bytes,
    nonce_i: bytes,
    nonce_r: bytes,
    spi_i: bytes,
    spi_r: bytes,
) -> IkeSaKeys:
    """Keys of the IKE SA that replaces an old one by CREATE_CHILD_SA (RFC 7296 2.18).

    SKEYSEED = prf(SK_d (old), g^ir (new) | Ni | Nr) with the old SA's PRF, then
    the keys are taken from prf+ of the new SA's PRF exactly as in 2.14, with
    the new nonces and the new SPIs.
    """
    skeyseed = prf_old.compute(old_sk_d, shared_secret + nonce_i + nonce_r)
    return _split_ike_keys(prf, integrity, cipher, skeyseed, nonce_i, nonce_r, spi_i, spi_r)


def derive_child_sa_keys(
    prf: Prf,
    sk_d: bytes,
    nonce_i: bytes,
    nonce_r: bytes,
    encr_key_size: int,
    integ_key_size: int,
    shared_secret: bytes | None = None,
) -> ChildSaKeys:
    """KEYMAT of a Child SA (RFC 7296 2.17).

    KEYMAT = prf+(SK_d, Ni | Nr), or prf+(SK_d, g^ir (new) | Ni | Nr) when the
    CREATE_CHILD_SA exchange carried KE payloads (PFS). Taken in order:
    initiator-to-responder encryption key, its integrity key, then the same
    for responder-to-initiator. Nonces are those of the exchange that creates
    the Child SA (IKE_AUTH uses the IKE_SA_INIT nonces).
    """
    if encr_key_size < 0 or integ_key_size < 0:
        raise ValueError("key sizes must not be negative")
    seed = (shared_secret or b"") + nonce_i + nonce_r
    keymat = prf.prf_plus(sk_d, seed, 2 * (encr_key_size + integ_key_size))
    encr_i = keymat[:encr_key_size]
    offset = encr_key_size
    integ_i = keymat[offset : offset + integ_key_size]
    offset += integ_key_size
    encr_r = keymat[offset : offset + encr_key_size]
    offset += encr_key_size
    integ_r = keymat[offset : offset + integ_key_size]
    return ChildSaKeys(encr_i=encr_i, integ_i=integ_i, encr_r=encr_r, integ_r=integ_r)


def mix_ppk(prf: Prf, ppk: bytes, keys: IkeSaKeys) -> IkeSaKeys:
    """Mix a Postquantum Preshared Key into an IKE SA's keys (RFC 8784 3).

    SK_d' = prf+(PPK, SK_d), SK_pi' = prf+(PPK, SK_pi), SK_pr' = prf+(PPK, SK_pr),
    each as long as the PRF's preferred key size; the other keys are unchanged.
    For the keystore, which holds the PPK.
    """
    return replace(
        keys,
        sk_d=prf.prf_plus(ppk, keys.sk_d, prf.key_size),
        sk_pi=prf.prf_plus(ppk, keys.sk_pi, prf.key_size),
        sk_pr=prf.prf_plus(ppk, keys.sk_pr, prf.key_size),
    )
