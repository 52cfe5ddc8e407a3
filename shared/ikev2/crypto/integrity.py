"""Integrity transforms of IKEv2 (RFC 7296 3.3.2, RFC 2404, RFC 4868).

The ICV is the HMAC output truncated to half the hash size (SHA-1: 96 bits);
the key is as long as the hash output (RFC 4868 2.1.1, RFC 2404 3).
"""

from __future__ import annotations

import hmac as _hmac

from cryptography.hazmat.primitives import hashes, hmac

from ikefarm.shared.ikev2.constants import IntegId, TransformType
from ikefarm.shared.ikev2.crypto.registry import UnsupportedTransform

__all__ = ["SUPPORTED_INTEGRITY", "Integrity"]

# integ_id: (hash, key size in octets, ICV size in octets)
_TRANSFORMS: dict[int, tuple[type[hashes.HashAlgorithm], int, int]] = {
    IntegId.HMAC_SHA1_96: (hashes.SHA1, 20, 12),  # RFC 2404
    IntegId.HMAC_SHA2_256_128: (hashes.SHA256, 32, 16),  # RFC 4868 2.1.1, 2.3
    IntegId.HMAC_SHA2_384_192: (hashes.SHA384, 48, 24),
    IntegId.HMAC_SHA2_512_256: (hashes.SHA512, 64, 32),
}

SUPPORTED_INTEGRITY: frozenset[int] = frozenset(_TRANSFORMS)


class Integrity:
    """A negotiated integrity transform computing and checking truncated ICVs."""

    __slots__ = ("_hash", "icv_size", "integ_id", "key_size")

    def __init__(self, integ_id: int) -> None:
        if integ_id not in _TRANSFORMS:
            raise UnsupportedTransform(TransformType.INTEG, integ_id)
        self.integ_id = IntegId(integ_id)
        self._hash, self.key_size, self.icv_size = _TRANSFORMS[integ_id]

    def __repr__(self) -> str:
        return f"Integrity({self.integ_id.name})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Integrity) and other.integ_id == self.integ_id

    def __hash__(self) -> int:
        return hash((Integrity, self.integ_id))

    def compute(self, key: bytes, data: bytes) -> bytes:
        """The ICV of `data`: HMAC(key, data) truncated to `icv_size` octets."""
        if len(key) != self.key_size:
            raise ValueError(
                f"{self.integ_id.name} key must be {self.key_size} octets, got {len(key)}"
            )
        mac = hmac.HMAC(key, self._hash())
        mac.update(data)
        return mac.finalize()[: self.icv_size]

    def verify(self, key: bytes, data: bytes, icv: bytes) -> bool:
        """Whether `icv` is the ICV of `data`, compared in constant time."""
        return _hmac.compare_digest(self.compute(key, data), icv)
