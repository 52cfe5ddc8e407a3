"""Key exchange for IKEv2: the KE payload's data and the shared secret g^ir.

Groups (RFC 7296 3.4, IANA "Transform Type 4"):

- MODP 14, 15, 16: RFC 3526 primes, generator 2. KE data is g^x big-endian,
  left-padded with zeros to the prime's length (RFC 7296 3.4); g^ir likewise.
- ECP 19, 20, 21: NIST P-256/384/521 (RFC 5903). KE data is x | y, each padded
  to the field size, no 0x04 point-format octet (RFC 5903 7); g^ir is the x
  coordinate of the shared point only (RFC 5903 7, errata 2925).
- 31: Curve25519 (RFC 8031): 32-octet u coordinates, X25519 of RFC 7748.

Peer values are checked as RFC 6989 asks (public value in range for MODP,
point on the curve for ECP, non-zero result for X25519); a failure raises
`InvalidKeyExchange`, whose message never carries key material.
"""

from __future__ import annotations

import functools
import hmac
from collections.abc import Callable

from cryptography.hazmat.primitives.asymmetric import dh, ec, x25519

from ikefarm.shared.ikev2.constants import DhId, TransformType
from ikefarm.shared.ikev2.crypto.registry import UnsupportedTransform

__all__ = [
    "SUPPORTED_DH_GROUPS",
    "DhExchange",
    "InvalidKeyExchange",
    "UnsupportedGroup",
    "key_exchange_length",
    "modp_prime",
]


class UnsupportedGroup(UnsupportedTransform):
    """A Diffie-Hellman group this implementation does not run."""

    def __init__(self, group: int) -> None:
        super().__init__(TransformType.DH, group)
        self.group = int(group)


class InvalidKeyExchange(ValueError):
    """The peer's KE data is unusable: wrong length or an invalid public value.

    RFC 7296 1.2/3.4: a wrong length for the group is answered with
    INVALID_KE_PAYLOAD by the exchange logic; an invalid value (RFC 6989) fails
    the exchange. The message names the group and the problem, never the value.
    """

    def __init__(self, group: int, reason: str) -> None:
        self.group = int(group)
        self.reason = reason
        super().__init__(f"invalid key exchange data for DH group {int(group)}: {reason}")


# RFC 3526 sections 3, 4 and 5: p = 2^n - 2^(n-64) - 1 + 2^64 * ([2^(n-130) pi] + k).
_MODP_2048_HEX = (
    "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74"
    "020BBEA63B139B22514A08798E3404DDEF9519B3CD3A431B302B0A6DF25F1437"
    "4FE1356D6D51C245E485B576625E7EC6F44C42E9A637ED6B0BFF5CB6F406B7ED"
    "EE386BFB5A899FA5AE9F24117C4B1FE649286651ECE45B3DC2007CB8A163BF05"
    "98DA48361C55D39A69163FA8FD24CF5F83655D23DCA3AD961C62F356208552BB"
    "9ED529077096966D670C354E4ABC9804F1746C08CA18217C32905E462E36CE3B"
    "E39E772C180E86039B2783A2EC07A28FB5C55DF06F4C52C9DE2BCBF695581718"
    "3995497CEA956AE515D2261898FA051015728E5A8AACAA68FFFFFFFFFFFFFFFF"
)
_MODP_3072_HEX = (
    "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74"
    "020BBEA63B139B22514A08798E3404DDEF9519B3CD3A431B302B0A6DF25F1437"
    "4FE1356D6D51C245E485B576625E7EC6F44C42E9A637ED6B0BFF5CB6F406B7ED"
    "EE386BFB5A899FA5AE9F24117C4B1FE649286651ECE45B3DC2007CB8A163BF05"
    "98DA48361C55D39A69163FA8FD24CF5F83655D23DCA3AD961C62F356208552BB"
    "9ED529077096966D670C354E4ABC9804F1746C08CA18217C32905E462E36CE3B"
    "E39E772C180E86039B2783A2EC07A28FB5C55DF06F4C52C9DE2BCBF695581718"
    "3995497CEA956AE515D2261898FA051015728E5A8AAAC42DAD33170D04507A33"
    "A85521ABDF1CBA64ECFB850458DBEF0A8AEA71575D060C7DB3970F85A6E1E4C7"
    "ABF5AE8CDB0933D71E8C94E04A25619DCEE3D2261AD2EE6BF12FFA06D98A0864"
    "D87602733EC86A64521F2B18177B200CBBE117577A615D6C770988C0BAD946E2"
    "08E24FA074E5AB3143DB5BFCE0FD108E4B82D120A93AD2CAFFFFFFFFFFFFFFFF"
)
_MODP_4096_HEX = (
    "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74"
    "020BBEA63B139B22514A08798E3404DDEF9519B3CD3A431B302B0A6DF25F1437"
    "4FE1356D6D51C245E485B576625E7EC6F44C42E9A637ED6B0BFF5CB6F406B7ED"
    "EE386BFB5A899FA5AE9F24117C4B1FE649286651ECE45B3DC2007CB8A163BF05"
    "98DA48361C55D39A69163FA8FD24CF5F83655D23DCA3AD961C62F356208552BB"
    "9ED529077096966D670C354E4ABC9804F1746C08CA18217C32905E462E36CE3B"
    "E39E772C180E86039B2783A2EC07A28FB5C55DF06F4C52C9DE2BCBF695581718"
    "3995497CEA956AE515D2261898FA051015728E5A8AAAC42DAD33170D04507A33"
    "A85521ABDF1CBA64ECFB850458DBEF0A8AEA71575D060C7DB3970F85A6E1E4C7"
    "ABF5AE8CDB0933D71E8C94E04A25619DCEE3D2261AD2EE6BF12FFA06D98A0864"
    "D87602733EC86A64521F2B18177B200CBBE117577A615D6C770988C0BAD946E2"
    "08E24FA074E5AB3143DB5BFCE0FD108E4B82D120A92108011A723C12A787E6D7"
    "88719A10BDBA5B2699C327186AF4E23C1A946834B6150BDA2583E9CA2AD44CE8"
    "DBBBC2DB04DE8EF92E8EFC141FBECAA6287C59474E6BC05D99B2964FA090C3A2"
    "233BA186515BE7ED1F612970CEE2D7AFB81BDD762170481CD0069127D5B05AA9"
    "93B4EA988D8FDDC186FFB7DC90A6C08F4DF435C934063199FFFFFFFFFFFFFFFF"
)

_MODP_GENERATOR = 2
_MODP_HEX: dict[int, str] = {
    DhId.MODP_2048: "".join(_MODP_2048_HEX),
    DhId.MODP_3072: "".join(_MODP_3072_HEX),
    DhId.MODP_4096: "".join(_MODP_4096_HEX),
}

# Field primes of the NIST curves (FIPS 186-4 D.1.2, RFC 5903 3): coordinates must be below them.
_ECP: dict[int, tuple[type[ec.EllipticCurve], int, int]] = {
    # group: (curve class, field size in octets, field prime)
    DhId.ECP_256: (ec.SECP256R1, 32, 2**256 - 2**224 + 2**192 + 2**96 - 1),
    DhId.ECP_384: (ec.SECP384R1, 48, 2**384 - 2**128 - 2**96 + 2**32 - 1),
    DhId.ECP_521: (ec.SECP521R1, 66, 2**521 - 1),
}

# the order n of each curve's base point (FIPS 186-4 D.1.2; SEC 2 2.4-2.6): a scalar drawn
# from a random source is reduced into [1, n - 1]
_ECP_ORDER: dict[int, int] = {
    DhId.ECP_256: int("FFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551", 16),
    DhId.ECP_384: int(
        "FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF"
        "581A0DB248B0A77AECEC196ACCC52973",
        16,
    ),
    DhId.ECP_521: int(
        "01FF" + "FFFFFFFF" * 7 + "FFFFFFFA"
        "51868783BF2F966B7FCC0148F709A5D03BB5C9B8899C47AEBB6FB71E91386409",
        16,
    ),
}
# extra octets drawn beyond a scalar's size, so reducing them leaves no usable bias
_EXTRA_OCTETS = 8

_X25519_LENGTH = 32

SUPPORTED_DH_GROUPS: frozenset[int] = frozenset(
    {
        DhId.MODP_2048,
        DhId.MODP_3072,
        DhId.MODP_4096,
        DhId.ECP_256,
        DhId.ECP_384,
        DhId.ECP_521,
        DhId.CURVE25519,
    }
)


def _check_group(group: int) -> DhId:
    if group not in SUPPORTED_DH_GROUPS:
        raise UnsupportedGroup(group)
    return DhId(group)


def modp_prime(group: int) -> int:
    """The RFC 3526 prime of a MODP group (generator 2)."""
    if group not in _MODP_HEX:
        raise UnsupportedGroup(group)
    return int(_MODP_HEX[group], 16)


@functools.cache
def _modp_parameters(group: int) -> dh.DHParameters:
    return dh.DHParameterNumbers(modp_prime(group), _MODP_GENERATOR).parameters()


def key_exchange_length(group: int) -> int:
    """Octets of the KE payload's Key Exchange Data for a group (RFC 7296 3.4)."""
    group = _check_group(group)
    if group in _MODP_HEX:
        return len(_MODP_HEX[group]) // 2
    if group in _ECP:
        return 2 * _ECP[group][1]
    return _X25519_LENGTH


_PrivateKey = dh.DHPrivateKey | ec.EllipticCurvePrivateKey | x25519.X25519PrivateKey


def _private_value(group: int, random: Callable[[int], bytes]) -> bytes:
    """A private value for `from_private_bytes`, drawn from `random`."""
    if group in _MODP_HEX:
        # 1 < x < p - 1 (p has its top bit set: one octet fewer is always below it)
        size = key_exchange_length(group)
        x = int.from_bytes(random(size - 1), "big")
        return max(x, 2).to_bytes(size, "big")
    if group in _ECP:
        size = _ECP[group][1]
        order = _ECP_ORDER[group]
        scalar = int.from_bytes(random(size + _EXTRA_OCTETS), "big") % (order - 1) + 1
        return scalar.to_bytes(size, "big")
    return random(_X25519_LENGTH)  # RFC 7748 5: any 32 octets, clamped by the library


class DhExchange:
    """One side's ephemeral key pair of a key exchange in one group.

    `generate` makes a fresh pair; `public_bytes` is this side's KE data;
    `compute_shared` turns the peer's KE data into g^ir. The private key never
    leaves the object and `repr` shows only the group.
    """

    __slots__ = ("_private", "group")

    def __init__(self, group: int, private_key: _PrivateKey) -> None:
        self.group: int = _check_group(group)
        self._private = private_key

    @classmethod
    def generate(cls, group: int, random: Callable[[int], bytes] | None = None) -> DhExchange:
        """A fresh key pair: from `random` (the engine's injectable source) when given,
        else from the cryptography library's generator."""
        group = _check_group(group)
        if random is not None:
            return cls.from_private_bytes(group, _private_value(group, random))
        private: _PrivateKey
        if group in _MODP_HEX:
            private = _modp_parameters(group).generate_private_key()
        elif group in _ECP:
            private = ec.generate_private_key(_ECP[group][0]())
        else:
            private = x25519.X25519PrivateKey.generate()
        return cls(group, private)

    @classmethod
    def from_private_bytes(cls, group: int, private_value: bytes) -> DhExchange:
        """A fixed private value, big-endian (X25519: the RFC 7748 scalar octets).

        For known-answer tests and test peers; production code uses `generate`.
        """
        group = _check_group(group)
        private: _PrivateKey
        if group in _MODP_HEX:
            numbers = _modp_parameters(group).parameter_numbers()
            x = int.from_bytes(private_value, "big")
            public = dh.DHPublicNumbers(pow(numbers.g, x, numbers.p), numbers)
            private = dh.DHPrivateNumbers(x, public).private_key()
        elif group in _ECP:
            private = ec.derive_private_key(int.from_bytes(private_value, "big"), _ECP[group][0]())
        else:
            private = x25519.X25519PrivateKey.from_private_bytes(private_value)
        return cls(group, private)

    def __repr__(self) -> str:
        return f"DhExchange(group={DhId(self.group).name})"

    def private_bytes(self) -> bytes:
        """The private value in the form `from_private_bytes` takes: for a snapshot's sealed
        part only (`shared/ikev2/snapshot.py`), never for a log or the bus."""
        private = self._private
        if isinstance(private, dh.DHPrivateKey):
            return private.private_numbers().x.to_bytes(key_exchange_length(self.group), "big")
        if isinstance(private, ec.EllipticCurvePrivateKey):
            size = _ECP[self.group][1]
            return private.private_numbers().private_value.to_bytes(size, "big")
        return private.private_bytes_raw()

    def public_bytes(self) -> bytes:
        """This side's Key Exchange Data in the IKEv2 encoding of the group."""
        private = self._private
        if isinstance(private, dh.DHPrivateKey):
            y = private.public_key().public_numbers().y
            return y.to_bytes(key_exchange_length(self.group), "big")
        if isinstance(private, ec.EllipticCurvePrivateKey):
            size = _ECP[self.group][1]
            point = private.public_key().public_numbers()
            return point.x.to_bytes(size, "big") + point.y.to_bytes(size, "big")
        return private.public_key().public_bytes_raw()

    def compute_shared(self, peer_public: bytes) -> bytes:
        """g^ir from the peer's Key Exchange Data; InvalidKeyExchange if unusable."""
        peer_public = bytes(peer_public)  # accept any bytes-like view of the datagram
        expected = key_exchange_length(self.group)
        if len(peer_public) != expected:
            raise InvalidKeyExchange(self.group, f"length {len(peer_public)}, expected {expected}")
        private = self._private
        if isinstance(private, dh.DHPrivateKey):
            return self._modp_shared(private, peer_public, expected)
        if isinstance(private, ec.EllipticCurvePrivateKey):
            return self._ecp_shared(private, peer_public)
        return self._x25519_shared(private, peer_public)

    def _modp_shared(self, private: dh.DHPrivateKey, peer_public: bytes, length: int) -> bytes:
        numbers = private.parameters().parameter_numbers()
        y = int.from_bytes(peer_public, "big")
        # RFC 6989 2.1 / NIST SP 800-56A 5.6.2.3.1: 1 < y < p - 1 (safe primes need no more).
        if not 1 < y < numbers.p - 1:
            raise InvalidKeyExchange(self.group, "public value out of range")
        try:
            shared = private.exchange(dh.DHPublicNumbers(y, numbers).public_key())
        except ValueError:
            raise InvalidKeyExchange(self.group, "public value rejected") from None
        if len(shared) > length:
            raise InvalidKeyExchange(self.group, "shared secret longer than the prime")
        # RFC 7296 2.14: g^ir is represented as a string of octets in big endian
        # order padded with zeros if necessary to make it the length of the modulus.
        return shared.rjust(length, b"\x00")

    def _ecp_shared(self, private: ec.EllipticCurvePrivateKey, peer_public: bytes) -> bytes:
        curve_class, size, field_prime = _ECP[self.group]
        x = int.from_bytes(peer_public[:size], "big")
        y = int.from_bytes(peer_public[size:], "big")
        if x >= field_prime or y >= field_prime:
            raise InvalidKeyExchange(self.group, "coordinate not below the field prime")
        try:
            # RFC 6989 2.3: the point must be on the curve; from_encoded_point checks it.
            peer = ec.EllipticCurvePublicKey.from_encoded_point(
                curve_class(), b"\x04" + peer_public
            )
            shared = private.exchange(ec.ECDH(), peer)
        except ValueError:
            raise InvalidKeyExchange(self.group, "point not on the curve") from None
        if len(shared) != size:
            raise InvalidKeyExchange(self.group, "unexpected shared secret length")
        return shared

    def _x25519_shared(self, private: x25519.X25519PrivateKey, peer_public: bytes) -> bytes:
        try:
            peer = x25519.X25519PublicKey.from_public_bytes(peer_public)
            shared = private.exchange(peer)
        except ValueError:
            # cryptography refuses the all-zero output of a small-order point (RFC 7748 6.1).
            raise InvalidKeyExchange(self.group, "low-order public value") from None
        # RFC 8031 2.3: check the result is not all zeros, in constant time.
        if hmac.compare_digest(shared, bytes(len(shared))):
            raise InvalidKeyExchange(self.group, "low-order public value")
        return shared
