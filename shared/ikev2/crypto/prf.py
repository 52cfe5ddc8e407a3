"""Pseudorandom functions of IKEv2 and prf+ (RFC 7296 2.13, RFC 4868 2.4).

Only the HMAC family is implemented; HMAC accepts keys of any length, so the
PRF takes Ni | Nr whole as its key (RFC 7296 2.14) and `key_size` is only the
preferred length of keys derived for it (SK_d, SK_pi, SK_pr): the hash output
size (RFC 4868 2.1.2).
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes, hmac

from ikefarm.shared.ikev2.constants import PrfId, TransformType
from ikefarm.shared.ikev2.crypto.registry import UnsupportedTransform

__all__ = ["PRF_PLUS_MAX_BLOCKS", "SUPPORTED_PRFS", "Prf"]

# RFC 7296 2.13: the counter octet runs 0x01..0xff; prf+ is not defined past 255 blocks.
PRF_PLUS_MAX_BLOCKS = 255

_HASHES: dict[int, type[hashes.HashAlgorithm]] = {
    PrfId.HMAC_SHA1: hashes.SHA1,  # RFC 2104, RFC 7296 3.3.2
    PrfId.HMAC_SHA2_256: hashes.SHA256,  # RFC 4868
    PrfId.HMAC_SHA2_384: hashes.SHA384,
    PrfId.HMAC_SHA2_512: hashes.SHA512,
}

SUPPORTED_PRFS: frozenset[int] = frozenset(_HASHES)


class Prf:
    """A negotiated PRF transform: `compute` is prf(K, S), `prf_plus` is prf+(K, S)."""

    __slots__ = ("_hash", "key_size", "output_size", "prf_id")

    def __init__(self, prf_id: int) -> None:
        if prf_id not in _HASHES:
            raise UnsupportedTransform(TransformType.PRF, prf_id)
        self.prf_id = PrfId(prf_id)
        self._hash = _HASHES[prf_id]
        self.output_size: int = self._hash.digest_size
        self.key_size: int = self._hash.digest_size

    def __repr__(self) -> str:
        return f"Prf({self.prf_id.name})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Prf) and other.prf_id == self.prf_id

    def __hash__(self) -> int:
        return hash((Prf, self.prf_id))

    @property
    def hash_algorithm(self) -> hashes.HashAlgorithm:
        """The underlying hash, e.g. for RFC 7427 signatures or NAT detection helpers."""
        return self._hash()

    def compute(self, key: bytes, data: bytes) -> bytes:
        """prf(key, data): the full, untruncated HMAC output."""
        mac = hmac.HMAC(key, self._hash())
        mac.update(data)
        return mac.finalize()

    def prf_plus(self, key: bytes, seed: bytes, length: int) -> bytes:
        """prf+(K, S) of RFC 7296 2.13, the first `length` octets.

        T1 = prf(K, S | 0x01), Tn = prf(K, Tn-1 | S | n); output T1 | T2 | ...
        A length needing more than 255 blocks is refused with ValueError.
        """
        if length < 0:
            raise ValueError(f"prf+ length must not be negative, got {length}")
        blocks = -(-length // self.output_size)
        if blocks > PRF_PLUS_MAX_BLOCKS:
            raise ValueError(
                f"prf+ of {self.prf_id.name} yields at most "
                f"{PRF_PLUS_MAX_BLOCKS * self.output_size} octets, {length} requested"
            )
        output = bytearray()
        previous = b""
        for counter in range(1, blocks + 1):
            previous = self.compute(key, previous + seed + bytes((counter,)))
            output += previous
        return bytes(output[:length])
