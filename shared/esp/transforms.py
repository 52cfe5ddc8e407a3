"""ESP transforms the userspace dataplane runs, keyed once per SA.

Supported, with the names the configuration and `show` use (shared/ikev2/crypto/registry.py):

- AEAD, no integrity transform: `aes128-gcm-128`, `aes192-gcm-128`, `aes256-gcm-128`
  (AES-GCM with a 16-octet ICV, RFC 4106) and `chacha20-poly1305` (RFC 7634).
  Keying material = key | 4-octet salt; nonce = salt | 8-octet explicit IV;
  AAD = SPI | sequence number, or SPI | seq-hi | seq-lo with ESN (RFC 4106 5,
  RFC 7634 2.1). The explicit IV is the 64-bit sequence number, which RFC 4106
  3.1 allows and which can never repeat under one key (sequence numbers are
  never reused, RFC 4303 3.3.3).
- `aes128-cbc`, `aes192-cbc`, `aes256-cbc` (RFC 3602, a random 16-octet IV) with
  `hmac-sha1` (HMAC-SHA1-96, RFC 2404), `hmac-sha256`, `hmac-sha384`,
  `hmac-sha512` (HMAC-SHA2-256-128 / 384-192 / 512-256, RFC 4868). The ICV covers
  SPI | seq | IV | ciphertext, with seq-hi appended (not sent) under ESN
  (RFC 4303 2.2.1, 3.3.2.1).

Key and ICV sizes come from the IKEv2 engine's own `Cipher` and `Integrity`, so
the KEYMAT split of RFC 7296 2.17 (encryption key then integrity key, the salt at
the end of an AEAD encryption key) is the one the engine derives for the child SA.
Every primitive is `cryptography`'s; the ICV compare is constant time
(`cryptography`'s AEAD tag check, `hmac.compare_digest` for truncated HMACs).
"""

from __future__ import annotations

import hmac as _hmac
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.ciphers import Cipher as _BlockCipher
from cryptography.hazmat.primitives.ciphers import algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from ikefarm.shared.ikev2.constants import EncrId, IntegId, TransformType
from ikefarm.shared.ikev2.crypto.cipher import Cipher
from ikefarm.shared.ikev2.crypto.integrity import Integrity
from ikefarm.shared.ikev2.crypto.registry import (
    AlgorithmKind,
    UnknownAlgorithm,
    display_name,
    lookup,
)

__all__ = ["EspTransform", "KeyedTransform", "UnsupportedEspTransform"]

ESP_HEADER_SIZE = 8  # SPI | Sequence Number (RFC 4303 2)

_HASHES: dict[int, type[hashes.HashAlgorithm]] = {
    IntegId.HMAC_SHA1_96: hashes.SHA1,
    IntegId.HMAC_SHA2_256_128: hashes.SHA256,
    IntegId.HMAC_SHA2_384_192: hashes.SHA384,
    IntegId.HMAC_SHA2_512_256: hashes.SHA512,
}


class UnsupportedEspTransform(ValueError):
    """A transform combination the dataplane cannot run; names algorithms, never keys."""


@dataclass(frozen=True)
class EspTransform:
    """A negotiated ESP transform: ENCR id and key length, and INTEG id for non-AEAD ciphers."""

    encr_id: int
    encr_key_bits: int | None = None
    integ_id: int | None = None
    cipher: Cipher = field(init=False, repr=False, compare=False)
    integrity: Integrity | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        try:
            cipher = Cipher(self.encr_id, self.encr_key_bits)
            integrity = Integrity(self.integ_id) if self.integ_id is not None else None
        except ValueError as exc:
            raise UnsupportedEspTransform(str(exc)) from None
        if cipher.is_aead and integrity is not None:
            raise UnsupportedEspTransform(
                f"{self.name}: an AEAD cipher takes no integrity transform (RFC 4106 8.2)"
            )
        if not cipher.is_aead and integrity is None:
            raise UnsupportedEspTransform(
                f"{self.name}: CBC needs an integrity transform (no encryption-only ESP)"
            )
        object.__setattr__(self, "cipher", cipher)
        object.__setattr__(self, "integrity", integrity)

    @classmethod
    def from_names(cls, encryption: str, integrity: str | None = None) -> EspTransform:
        """From the configuration's `aead-alg`, or `enc-alg` plus `auth-alg`."""
        try:
            if integrity is None:
                algorithm = lookup(AlgorithmKind.AEAD, encryption)
                return cls(algorithm.transform_id, algorithm.key_bits)
            encr = lookup(AlgorithmKind.ENC, encryption)
            integ = lookup(AlgorithmKind.AUTH, integrity)
        except UnknownAlgorithm as exc:
            raise UnsupportedEspTransform(str(exc)) from None
        return cls(encr.transform_id, encr.key_bits, integ.transform_id)

    @property
    def is_aead(self) -> bool:
        return self.cipher.is_aead

    @property
    def name(self) -> str:
        """As `show` prints it: `aes256-gcm-128` or `aes128-cbc/hmac-sha256`."""
        encr = display_name(TransformType.ENCR, self.encr_id, self.encr_key_bits)
        if self.integ_id is None:
            return encr
        return f"{encr}/{display_name(TransformType.INTEG, self.integ_id, None)}"

    @property
    def encr_key_size(self) -> int:
        """Octets of KEYMAT per direction for encryption (salt included for AEAD)."""
        return self.cipher.key_size

    @property
    def integ_key_size(self) -> int:
        return self.integrity.key_size if self.integrity is not None else 0

    @property
    def iv_size(self) -> int:
        return self.cipher.iv_size

    @property
    def icv_size(self) -> int:
        return self.cipher.icv_size if self.integrity is None else self.integrity.icv_size

    @property
    def alignment(self) -> int:
        """Payload | Padding | Pad Length | Next Header is a multiple of this (RFC 4303 2.4)."""
        return math.lcm(self.cipher.block_size, 4)

    @property
    def min_ciphertext(self) -> int:
        """The shortest ciphertext that can hold Pad Length and Next Header."""
        return self.cipher.block_size if not self.is_aead else 2

    def keyed(self, encr_key: bytes, integ_key: bytes = b"") -> KeyedTransform:
        if len(encr_key) != self.encr_key_size or len(integ_key) != self.integ_key_size:
            raise ValueError(
                f"{self.name} takes a {self.encr_key_size}-octet encryption key and a"
                f" {self.integ_key_size}-octet integrity key,"
                f" got {len(encr_key)} and {len(integ_key)} octets"
            )
        if self.is_aead:
            return _AeadTransform(self, encr_key)
        return _CbcHmacTransform(self, encr_key, integ_key)


class KeyedTransform:
    """The primitives of one SA direction, built once; `seal`/`open` run per packet.

    `seal` returns IV | ciphertext | ICV for `header` (SPI | seq-lo) and the
    padded plaintext. `open` returns the padded plaintext, or None when the
    ICV does not verify (nothing about the packet is learnt then).
    """

    __slots__ = ("transform",)

    def __init__(self, transform: EspTransform) -> None:
        self.transform = transform

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transform.name})"

    def seal(
        self,
        header: bytes,
        seq: int,
        esn: bool,
        plaintext: bytes,
        random: Callable[[int], bytes],
    ) -> bytes:
        raise NotImplementedError

    def open(self, packet: bytes, seq: int, esn: bool) -> bytes | None:
        raise NotImplementedError


class _AeadTransform(KeyedTransform):
    __slots__ = ("_aead", "_salt")

    def __init__(self, transform: EspTransform, key: bytes) -> None:
        super().__init__(transform)
        salt_size = transform.cipher.salt_size
        cipher_key, self._salt = key[:-salt_size], key[-salt_size:]
        if transform.encr_id == EncrId.AES_GCM_16:
            self._aead: AESGCM | ChaCha20Poly1305 = AESGCM(cipher_key)
        else:
            self._aead = ChaCha20Poly1305(cipher_key)

    @staticmethod
    def _aad(header: bytes, seq: int, esn: bool) -> bytes:
        if not esn:
            return header
        # RFC 4106 5 / RFC 7634 2.1: SPI | seq-hi | seq-lo
        return header[:4] + (seq >> 32).to_bytes(4, "big") + header[4:]

    def seal(
        self,
        header: bytes,
        seq: int,
        esn: bool,
        plaintext: bytes,
        random: Callable[[int], bytes],
    ) -> bytes:
        iv = seq.to_bytes(8, "big")  # RFC 4106 3.1: a counter IV never repeats under one key
        return iv + self._aead.encrypt(self._salt + iv, plaintext, self._aad(header, seq, esn))

    def open(self, packet: bytes, seq: int, esn: bool) -> bytes | None:
        header = packet[:ESP_HEADER_SIZE]
        iv = packet[ESP_HEADER_SIZE : ESP_HEADER_SIZE + 8]
        try:
            return self._aead.decrypt(
                self._salt + iv, packet[ESP_HEADER_SIZE + 8 :], self._aad(header, seq, esn)
            )
        except InvalidTag:
            return None


class _CbcHmacTransform(KeyedTransform):
    __slots__ = ("_aes", "_icv_size", "_mac")

    def __init__(self, transform: EspTransform, encr_key: bytes, integ_key: bytes) -> None:
        super().__init__(transform)
        assert transform.integ_id is not None
        self._aes = algorithms.AES(encr_key)
        self._mac = hmac.HMAC(integ_key, _HASHES[transform.integ_id]())  # copied per packet
        self._icv_size = transform.icv_size

    def _icv(self, authenticated: bytes, seq: int, esn: bool) -> bytes:
        mac = self._mac.copy()
        mac.update(authenticated)
        if esn:
            mac.update((seq >> 32).to_bytes(4, "big"))  # RFC 4303 2.2.1: seq-hi, implicit
        return mac.finalize()[: self._icv_size]

    def seal(
        self,
        header: bytes,
        seq: int,
        esn: bool,
        plaintext: bytes,
        random: Callable[[int], bytes],
    ) -> bytes:
        iv = random(16)
        if len(iv) != 16:
            raise ValueError(f"the IV source returned {len(iv)} octets, 16 are needed")
        encryptor = _BlockCipher(self._aes, modes.CBC(iv)).encryptor()
        body = iv + encryptor.update(plaintext) + encryptor.finalize()
        return body + self._icv(header + body, seq, esn)

    def open(self, packet: bytes, seq: int, esn: bool) -> bytes | None:
        authenticated = packet[: -self._icv_size]
        if not _hmac.compare_digest(self._icv(authenticated, seq, esn), packet[-self._icv_size :]):
            return None
        iv = authenticated[ESP_HEADER_SIZE : ESP_HEADER_SIZE + 16]
        ciphertext = authenticated[ESP_HEADER_SIZE + 16 :]
        if len(ciphertext) % 16:
            return b""  # authentic but not block aligned: the caller sees no room for a trailer
        decryptor = _BlockCipher(self._aes, modes.CBC(iv)).decryptor()
        return decryptor.update(ciphertext) + decryptor.finalize()
