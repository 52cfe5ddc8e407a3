"""Encryption transforms of IKEv2 (RFC 7296 3.3.2, 3.14; RFC 3602; RFC 5282; RFC 7634).

`Cipher` describes a negotiated ENCR transform: how much keying material it
takes from prf+ (for AEAD this includes the 4-octet salt, RFC 5282 7.1 and
RFC 7634 2), the IV carried in the Encrypted payload, the padding unit and
the ICV (tag) size. `encrypt`/`decrypt` run the primitive from `cryptography`
on a key the caller has split off; `protection.SkProtection` builds the SK
payload from them.

Supported: AES-CBC 128/192/256 (RFC 3602), AES-GCM with a 16-octet ICV
128/192/256 (RFC 4106, RFC 5282), ChaCha20-Poly1305 (RFC 7634, no key length
attribute).
"""

from __future__ import annotations

from cryptography.hazmat.primitives.ciphers import Cipher as _BlockCipher
from cryptography.hazmat.primitives.ciphers import algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from ikefarm.shared.ikev2.constants import EncrId, TransformType
from ikefarm.shared.ikev2.crypto.registry import UnsupportedTransform

__all__ = ["AEAD_SALT_SIZE", "SUPPORTED_CIPHERS", "Cipher", "UnsupportedTransform"]

AEAD_SALT_SIZE = 4  # RFC 5282 7.1 (AES-GCM), RFC 7634 2 (ChaCha20-Poly1305)
_AES_KEY_BITS = frozenset({128, 192, 256})
_AES_BLOCK = 16

# encr_id: allowed KEY_LENGTH attribute values (None: the attribute must be absent)
SUPPORTED_CIPHERS: dict[int, frozenset[int | None]] = {
    EncrId.AES_CBC: frozenset(_AES_KEY_BITS),
    EncrId.AES_GCM_16: frozenset(_AES_KEY_BITS),
    EncrId.CHACHA20_POLY1305: frozenset({None}),  # RFC 7634 2: no Key Length attribute
}


class Cipher:
    """A negotiated encryption transform (ENCR id plus KEY_LENGTH attribute)."""

    __slots__ = (
        "block_size",
        "encr_id",
        "icv_size",
        "is_aead",
        "iv_size",
        "key_bits",
        "key_size",
        "salt_size",
    )

    def __init__(self, encr_id: int, key_bits: int | None = None) -> None:
        allowed = SUPPORTED_CIPHERS.get(encr_id)
        if allowed is None or key_bits not in allowed:
            raise UnsupportedTransform(TransformType.ENCR, encr_id, key_bits)
        self.encr_id = EncrId(encr_id)
        self.key_bits = key_bits
        bits = key_bits if key_bits is not None else 256  # ChaCha20 has a fixed 256-bit key
        if self.encr_id == EncrId.AES_CBC:
            self.is_aead = False
            self.salt_size = 0
            self.key_size: int = bits // 8
            self.iv_size = _AES_BLOCK  # RFC 3602 2.1
            self.block_size = _AES_BLOCK
            self.icv_size = 0  # the ICV comes from the integrity transform
        else:
            self.is_aead = True
            self.salt_size = AEAD_SALT_SIZE
            # RFC 5282 7.1 / RFC 7634 2: key octets followed by a 4-octet salt.
            self.key_size = bits // 8 + AEAD_SALT_SIZE
            self.iv_size = 8  # RFC 5282 3.1 / RFC 4106 3.1, RFC 7634 2
            # Stream modes need no padding (RFC 5282 3, RFC 7634 3): block size 1,
            # the Pad Length octet is still present.
            self.block_size = 1
            self.icv_size = 16  # AES_GCM_16 and Poly1305 tags

    def __repr__(self) -> str:
        bits = f", {self.key_bits}" if self.key_bits is not None else ""
        return f"Cipher({self.encr_id.name}{bits})"

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Cipher)
            and other.encr_id == self.encr_id
            and other.key_bits == self.key_bits
        )

    def __hash__(self) -> int:
        return hash((Cipher, self.encr_id, self.key_bits))

    def _check_key(self, key: bytes) -> None:
        if len(key) != self.key_size:
            raise ValueError(
                f"{self.encr_id.name} keying material must be {self.key_size} octets,"
                f" got {len(key)}"
            )

    def _check_iv(self, iv: bytes) -> None:
        if len(iv) != self.iv_size:
            raise ValueError(f"{self.encr_id.name} IV must be {self.iv_size} octets, got {len(iv)}")

    def _aead(self, key: bytes, iv: bytes) -> tuple[AESGCM | ChaCha20Poly1305, bytes]:
        # RFC 4106 4 / RFC 5282 3.1 / RFC 7634 2: nonce = salt | IV; salt = last 4 key octets.
        cipher_key, salt = key[: -self.salt_size], key[-self.salt_size :]
        primitive: AESGCM | ChaCha20Poly1305
        if self.encr_id == EncrId.AES_GCM_16:
            primitive = AESGCM(cipher_key)
        else:
            primitive = ChaCha20Poly1305(cipher_key)
        return primitive, salt + iv

    def encrypt(self, key: bytes, iv: bytes, data: bytes, associated_data: bytes = b"") -> bytes:
        """Encrypt `data` (already padded to `block_size`).

        CBC returns the ciphertext; AEAD returns ciphertext | tag, with
        `associated_data` authenticated. `key` is the whole keying material
        (`key_size` octets, salt included for AEAD).
        """
        self._check_key(key)
        self._check_iv(iv)
        if self.is_aead:
            primitive, nonce = self._aead(key, iv)
            return primitive.encrypt(nonce, data, associated_data)
        if len(data) % self.block_size:
            raise ValueError("CBC plaintext must be a multiple of the block size")
        encryptor = _BlockCipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
        return encryptor.update(data) + encryptor.finalize()

    def decrypt(self, key: bytes, iv: bytes, data: bytes, associated_data: bytes = b"") -> bytes:
        """Inverse of `encrypt`. AEAD raises `cryptography.exceptions.InvalidTag` on a bad tag."""
        self._check_key(key)
        self._check_iv(iv)
        if self.is_aead:
            primitive, nonce = self._aead(key, iv)
            return primitive.decrypt(nonce, data, associated_data)
        if len(data) % self.block_size:
            raise ValueError("CBC ciphertext must be a multiple of the block size")
        decryptor = _BlockCipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
        return decryptor.update(data) + decryptor.finalize()
