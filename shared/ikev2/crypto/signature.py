"""Signature AUTH values: RSA (method 1), ECDSA (9-11, RFC 4754), Digital Signature (14, RFC 7427).

What is signed is the InitiatorSignedOctets / ResponderSignedOctets of RFC 7296
2.15, built by the engine; this module only turns octets and a key into the
Authentication Data of the AUTH payload (RFC 7296 3.8) and back. All signing
and verification is `cryptography`'s.

- RSA Digital Signature (1): RSASSA-PKCS1-v1_5 with SHA-1 (RFC 7296 3.8; what
  strongSwan and libreswan use for method 1).
- ECDSA with SHA-256 on P-256 (9), SHA-384 on P-384 (10), SHA-512 on P-521 (11):
  the signature is r | s, each as long as the curve's order (RFC 4754 7).
- Digital Signature (14): one octet of ASN.1 length, the AlgorithmIdentifier
  (DER), then the signature (RFC 7427 3). ECDSA signatures there are the DER
  Ecdsa-Sig-Value (RFC 7427 3.1); EdDSA uses the Identity hash (RFC 8420).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from ikefarm.shared.ikev2.constants import AuthMethod, HashAlgorithm

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey

# What we announce in SIGNATURE_HASH_ALGORITHMS (RFC 7427 4): SHA-1 is not offered.
SUPPORTED_HASHES: tuple[HashAlgorithm, ...] = (
    HashAlgorithm.SHA2_256,
    HashAlgorithm.SHA2_384,
    HashAlgorithm.SHA2_512,
    HashAlgorithm.IDENTITY,
)

_HASHES: dict[HashAlgorithm, type[hashes.HashAlgorithm]] = {
    HashAlgorithm.SHA1: hashes.SHA1,
    HashAlgorithm.SHA2_256: hashes.SHA256,
    HashAlgorithm.SHA2_384: hashes.SHA384,
    HashAlgorithm.SHA2_512: hashes.SHA512,
}


class SignatureError(ValueError):
    """The key or the AUTH value cannot be used; `reason` is a short label for counters."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(detail or reason)
        self.reason = reason


@dataclass(frozen=True)
class SignatureScheme:
    """One RFC 7427 signature algorithm: its AlgorithmIdentifier and the hash it signs with."""

    name: str  # the ASN.1 name (RFC 7427 Appendix A)
    key_type: str  # "rsa", "ecdsa", "ed25519"
    hash: HashAlgorithm
    algorithm_identifier: bytes  # DER AlgorithmIdentifier

    def auth_data(self, signature: bytes) -> bytes:
        """RFC 7427 3: ASN.1 length | AlgorithmIdentifier | Signature Value."""
        return bytes([len(self.algorithm_identifier)]) + self.algorithm_identifier + signature


# DER AlgorithmIdentifiers as RFC 7427 Appendix A lists them (RSA with NULL parameters,
# ECDSA and Ed25519 without).
SCHEMES: tuple[SignatureScheme, ...] = (
    SignatureScheme("sha1WithRSAEncryption", "rsa", HashAlgorithm.SHA1,
                    bytes.fromhex("300d06092a864886f70d0101050500")),
    SignatureScheme("sha256WithRSAEncryption", "rsa", HashAlgorithm.SHA2_256,
                    bytes.fromhex("300d06092a864886f70d01010b0500")),
    SignatureScheme("sha384WithRSAEncryption", "rsa", HashAlgorithm.SHA2_384,
                    bytes.fromhex("300d06092a864886f70d01010c0500")),
    SignatureScheme("sha512WithRSAEncryption", "rsa", HashAlgorithm.SHA2_512,
                    bytes.fromhex("300d06092a864886f70d01010d0500")),
    SignatureScheme("ecdsa-with-SHA256", "ecdsa", HashAlgorithm.SHA2_256,
                    bytes.fromhex("300a06082a8648ce3d040302")),
    SignatureScheme("ecdsa-with-SHA384", "ecdsa", HashAlgorithm.SHA2_384,
                    bytes.fromhex("300a06082a8648ce3d040303")),
    SignatureScheme("ecdsa-with-SHA512", "ecdsa", HashAlgorithm.SHA2_512,
                    bytes.fromhex("300a06082a8648ce3d040304")),
    SignatureScheme("id-Ed25519", "ed25519", HashAlgorithm.IDENTITY,
                    bytes.fromhex("300506032b6570")),
)  # fmt: skip

# RFC 4754 3: each ECDSA method names its curve and hash
_ECDSA_METHODS: dict[AuthMethod, tuple[str, HashAlgorithm]] = {
    AuthMethod.ECDSA_SHA256_P256: ("secp256r1", HashAlgorithm.SHA2_256),
    AuthMethod.ECDSA_SHA384_P384: ("secp384r1", HashAlgorithm.SHA2_384),
    AuthMethod.ECDSA_SHA512_P521: ("secp521r1", HashAlgorithm.SHA2_512),
}
_CURVE_HASH = {curve: h for curve, h in _ECDSA_METHODS.values()}
_CURVE_METHOD = {curve: m for m, (curve, _h) in _ECDSA_METHODS.items()}


def key_type(key: PrivateKey | PublicKey) -> str:
    if isinstance(key, (rsa.RSAPrivateKey, rsa.RSAPublicKey)):
        return "rsa"
    if isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        return "ecdsa"
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed25519.Ed25519PublicKey)):
        return "ed25519"
    raise SignatureError("unsupported_key", f"{type(key).__name__} keys cannot sign IKE AUTH")


def scheme_for(key: PrivateKey | PublicKey, peer_hashes: Iterable[int]) -> SignatureScheme | None:
    """The RFC 7427 scheme to sign with, given the hashes the peer announced (RFC 7427 4).

    ECDSA prefers the hash of its curve's strength, RSA SHA-256 first; None when the
    peer announced nothing usable for this key.
    """
    offered = {int(h) for h in peer_hashes}
    kind = key_type(key)
    if kind == "ecdsa":
        assert isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey))
        first = _CURVE_HASH.get(key.curve.name, HashAlgorithm.SHA2_256)
        preference = [first, *(h for h in SUPPORTED_HASHES if h != first)]
    else:
        preference = list(SUPPORTED_HASHES)
    for wanted in preference:
        if int(wanted) not in offered:
            continue
        for scheme in SCHEMES:
            if scheme.key_type == kind and scheme.hash == wanted:
                return scheme
    return None


def scheme_from_auth_data(data: bytes) -> tuple[SignatureScheme, bytes]:
    """Split RFC 7427 Authentication Data into the scheme and the signature value."""
    if not data:
        raise SignatureError("malformed_auth", "empty Digital Signature AUTH")
    length = data[0]
    identifier = data[1 : 1 + length]
    if len(identifier) != length:
        raise SignatureError("malformed_auth", "AlgorithmIdentifier longer than the AUTH data")
    for scheme in SCHEMES:
        if scheme.algorithm_identifier == identifier:
            return scheme, data[1 + length :]
    raise SignatureError("unsupported_signature_algorithm", identifier.hex())


def sign(key: PrivateKey, octets: bytes, peer_hashes: Iterable[int]) -> tuple[AuthMethod, bytes]:
    """The AUTH method and Authentication Data for `octets` signed with `key`.

    RFC 7427 Digital Signature when the peer announced a hash we can use with this
    key, else the key's RFC 7296 / RFC 4754 method.
    """
    scheme = scheme_for(key, peer_hashes)
    if scheme is not None:
        return AuthMethod.DIGITAL_SIGNATURE, scheme.auth_data(_sign_raw(key, scheme, octets))
    kind = key_type(key)
    if kind == "rsa":
        assert isinstance(key, rsa.RSAPrivateKey)
        return AuthMethod.RSA_DIGITAL_SIGNATURE, key.sign(octets, padding.PKCS1v15(), hashes.SHA1())  # noqa: S303 - RFC 7296 method 1 is SHA-1
    if kind == "ecdsa":
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        method = _CURVE_METHOD.get(key.curve.name)
        if method is None:
            raise SignatureError("unsupported_curve", key.curve.name)
        der = key.sign(octets, ec.ECDSA(_HASHES[_ECDSA_METHODS[method][1]]()))
        return method, _ecdsa_fixed(der, key.curve.key_size)
    raise SignatureError("needs_rfc7427", "an Ed25519 key signs only with RFC 7427 (method 14)")


def verify(key: PublicKey, method: int, data: bytes, octets: bytes) -> None:
    """Check the peer's Authentication Data over `octets`; raise SignatureError if it fails."""
    try:
        if method == AuthMethod.DIGITAL_SIGNATURE:
            scheme, signature = scheme_from_auth_data(data)
            if scheme.key_type != key_type(key):
                detail = f"{scheme.name} with a {key_type(key)} key"
                raise SignatureError("key_type_mismatch", detail)
            _verify_raw(key, scheme, signature, octets)
        elif method == AuthMethod.RSA_DIGITAL_SIGNATURE:
            if not isinstance(key, rsa.RSAPublicKey):
                raise SignatureError("key_type_mismatch", "method 1 needs an RSA key")
            key.verify(data, octets, padding.PKCS1v15(), hashes.SHA1())  # noqa: S303
        elif method in _ECDSA_METHODS:
            curve, hash_id = _ECDSA_METHODS[AuthMethod(method)]
            if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != curve:
                raise SignatureError("key_type_mismatch", f"method {method} needs a {curve} key")
            size = (key.curve.key_size + 7) // 8
            if len(data) != 2 * size:
                raise SignatureError("malformed_auth", "ECDSA r|s of the wrong length")
            r = int.from_bytes(data[:size], "big")
            s = int.from_bytes(data[size:], "big")
            key.verify(encode_dss_signature(r, s), octets, ec.ECDSA(_HASHES[hash_id]()))
        else:
            raise SignatureError("unsupported_auth_method", f"AUTH method {method}")
    except InvalidSignature:
        raise SignatureError("auth_mismatch", "signature does not verify") from None
    except (ValueError, TypeError) as exc:
        if isinstance(exc, SignatureError):
            raise
        raise SignatureError("malformed_auth", type(exc).__name__) from None


def _sign_raw(key: PrivateKey, scheme: SignatureScheme, octets: bytes) -> bytes:
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(octets, padding.PKCS1v15(), _HASHES[scheme.hash]())
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(octets, ec.ECDSA(_HASHES[scheme.hash]()))  # DER (RFC 7427 3.1)
    return key.sign(octets)


def _verify_raw(key: PublicKey, scheme: SignatureScheme, signature: bytes, octets: bytes) -> None:
    if isinstance(key, rsa.RSAPublicKey):
        key.verify(signature, octets, padding.PKCS1v15(), _HASHES[scheme.hash]())
    elif isinstance(key, ec.EllipticCurvePublicKey):
        key.verify(signature, octets, ec.ECDSA(_HASHES[scheme.hash]()))
    else:
        key.verify(signature, octets)


def _ecdsa_fixed(der: bytes, key_bits: int) -> bytes:
    """RFC 4754 7: r and s as fixed-length big-endian integers, concatenated."""
    size = (key_bits + 7) // 8
    r, s = decode_dss_signature(der)
    return r.to_bytes(size, "big") + s.to_bytes(size, "big")


def hash_algorithms_data(algorithms: Iterable[int] = SUPPORTED_HASHES) -> bytes:
    """Notification Data of SIGNATURE_HASH_ALGORITHMS: 2-octet identifiers (RFC 7427 4)."""
    return b"".join(int(a).to_bytes(2, "big") for a in algorithms)


def parse_hash_algorithms(data: bytes) -> tuple[int, ...]:
    """The peer's announced hashes; an odd trailing octet is ignored."""
    return tuple(int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data) - 1, 2))
