"""Protection of the Encrypted (SK) payload (RFC 7296 3.14; RFC 5282; RFC 7634).

The SK payload body (everything after its generic payload header) is

    IV | E(plaintext payload chain | Padding | Pad Length) | ICV

- CBC + HMAC (RFC 7296 3.14): random IV of one block, padding to the block
  size, ICV = integrity(SK_a, message from the IKE header through the end of
  the ciphertext), i.e. integrity(SK_a, associated_data | IV | ciphertext).
- AEAD (RFC 5282 3, 5.1; RFC 7634 2-4): nonce = salt | IV with the salt the
  last 4 octets of SK_e, the IKE header through the SK generic header as
  additional authenticated data, the 16-octet tag as ICV. No padding is
  needed, the Pad Length octet is always there.

`associated_data` is every octet of the message before the SK body, with the
final lengths already written (for SKF, RFC 7383 2.5, it includes the Fragment
Number and Total Fragments fields). `encrypted_length` lets the codec write
those lengths before sealing.

`open` checks every length before use and authenticates before it looks at
the padding; it raises only `IntegrityCheckFailed` or `MalformedEncryptedPayload`
for any body.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from cryptography.exceptions import InvalidTag

from ikefarm.shared.ikev2.constants import IntegId
from ikefarm.shared.ikev2.crypto.cipher import Cipher
from ikefarm.shared.ikev2.crypto.integrity import Integrity

__all__ = [
    "IntegrityCheckFailed",
    "MalformedEncryptedPayload",
    "SkProtection",
    "protection_for",
]


class IntegrityCheckFailed(ValueError):
    """The ICV or AEAD tag of an SK payload does not verify: drop it (RFC 7296 2.21.1)."""

    reason = "integrity_check_failed"

    def __init__(self) -> None:
        super().__init__("integrity check of the Encrypted payload failed")


class MalformedEncryptedPayload(ValueError):
    """An SK payload body whose lengths cannot be right (too short, misaligned, bad pad length).

    `reason` is a stable label for drop counters; the message carries lengths only.
    """

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


class SkProtection:
    """Seal and open SK payload bodies for one negotiated (cipher, integrity) pair."""

    __slots__ = ("cipher", "integrity")

    def __init__(self, cipher: Cipher, integrity: Integrity | None) -> None:
        if cipher.is_aead and integrity is not None:
            raise ValueError("an AEAD cipher takes no integrity transform (RFC 5282 8)")
        if not cipher.is_aead and integrity is None:
            raise ValueError(f"{cipher!r} needs an integrity transform (RFC 7296 3.3.3)")
        self.cipher = cipher
        self.integrity = integrity

    def __repr__(self) -> str:
        return f"SkProtection({self.cipher!r}, {self.integrity!r})"

    @property
    def icv_size(self) -> int:
        """Octets of ICV at the end of the SK body."""
        if self.integrity is not None:
            return self.integrity.icv_size
        return self.cipher.icv_size

    @property
    def encr_key_size(self) -> int:
        """Octets of SK_e (salt included for AEAD)."""
        return self.cipher.key_size

    @property
    def integ_key_size(self) -> int:
        """Octets of SK_a (0 for AEAD)."""
        return self.integrity.key_size if self.integrity is not None else 0

    @property
    def min_body_length(self) -> int:
        """Shortest SK body `open` accepts: IV, one padding unit (or the Pad Length octet), ICV."""
        return self.cipher.iv_size + self.cipher.block_size + self.icv_size

    def _padded_length(self, plaintext_len: int) -> int:
        block = self.cipher.block_size
        return -(-(plaintext_len + 1) // block) * block

    def encrypted_length(self, plaintext_len: int) -> int:
        """Octets of the SK body `seal` produces for `plaintext_len` octets of payload chain."""
        if plaintext_len < 0:
            raise ValueError(f"plaintext length must not be negative, got {plaintext_len}")
        return self.cipher.iv_size + self._padded_length(plaintext_len) + self.icv_size

    def _check_keys(self, sk_e: bytes, sk_a: bytes) -> None:
        if len(sk_e) != self.encr_key_size:
            raise ValueError(f"SK_e must be {self.encr_key_size} octets, got {len(sk_e)}")
        if len(sk_a) != self.integ_key_size:
            raise ValueError(f"SK_a must be {self.integ_key_size} octets, got {len(sk_a)}")

    def seal(
        self,
        sk_e: bytes,
        sk_a: bytes,
        associated_data: bytes,
        plaintext: bytes,
        iv: bytes | None = None,
        *,
        random: Callable[[int], bytes] | None = None,
    ) -> bytes:
        """The SK body protecting `plaintext` (the inner payload chain).

        The minimum padding is used, filled with zeros (RFC 7296 3.14 lets the
        sender choose). `iv` defaults to fresh random octets from `random` (the
        engine's injectable source; the system's when None); pass one only for
        known-answer tests.
        """
        self._check_keys(sk_e, sk_a)
        associated_data, plaintext = bytes(associated_data), bytes(plaintext)
        cipher = self.cipher
        if iv is None:
            iv = (random or os.urandom)(cipher.iv_size)
        elif len(iv) != cipher.iv_size:
            raise ValueError(f"IV must be {cipher.iv_size} octets, got {len(iv)}")
        pad_length = self._padded_length(len(plaintext)) - len(plaintext) - 1
        padded = plaintext + bytes(pad_length) + bytes((pad_length,))
        if cipher.is_aead:
            return iv + cipher.encrypt(sk_e, iv, padded, associated_data)
        assert self.integrity is not None  # guaranteed by __init__
        ciphertext = cipher.encrypt(sk_e, iv, padded)
        icv = self.integrity.compute(sk_a, associated_data + iv + ciphertext)
        return iv + ciphertext + icv

    def open(self, sk_e: bytes, sk_a: bytes, associated_data: bytes, body: bytes) -> bytes:
        """The inner payload chain of an SK body, padding removed.

        Raises IntegrityCheckFailed when the ICV/tag does not verify and
        MalformedEncryptedPayload when the lengths cannot be right.
        """
        self._check_keys(sk_e, sk_a)
        associated_data, body = bytes(associated_data), bytes(body)  # views of a datagram too
        cipher = self.cipher
        iv_size, icv_size, block = cipher.iv_size, self.icv_size, cipher.block_size
        if len(body) < self.min_body_length:
            raise MalformedEncryptedPayload(
                "sk_too_short", f"body of {len(body)} octets, at least {self.min_body_length}"
            )
        iv = body[:iv_size]
        ciphertext = body[iv_size : len(body) - icv_size]
        if cipher.is_aead:
            try:
                padded = cipher.decrypt(sk_e, iv, body[iv_size:], associated_data)
            except InvalidTag:
                raise IntegrityCheckFailed from None
        else:
            if len(ciphertext) % block:
                raise MalformedEncryptedPayload(
                    "sk_not_block_aligned",
                    f"ciphertext of {len(ciphertext)} octets, block size {block}",
                )
            assert self.integrity is not None  # guaranteed by __init__
            icv = body[len(body) - icv_size :]
            # Encrypt-then-MAC: authenticate before decrypting or looking at padding.
            if not self.integrity.verify(sk_a, associated_data + iv + ciphertext, icv):
                raise IntegrityCheckFailed
            padded = cipher.decrypt(sk_e, iv, ciphertext)
        pad_length = padded[-1]
        if pad_length + 1 > len(padded):
            raise MalformedEncryptedPayload(
                "sk_bad_pad_length",
                f"pad length {pad_length} in {len(padded)} octets of decrypted data",
            )
        return padded[: len(padded) - pad_length - 1]


def protection_for(encr_id: int, key_bits: int | None, integ_id: int | None) -> SkProtection:
    """SkProtection for negotiated transform ids; `integ_id` None or NONE for AEAD."""
    integrity = None
    if integ_id is not None and integ_id != IntegId.NONE:
        integrity = Integrity(integ_id)
    return SkProtection(Cipher(encr_id, key_bits), integrity)
