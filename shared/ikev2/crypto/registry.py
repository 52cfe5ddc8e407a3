"""Algorithm names as operators write them, mapped to IKEv2 transform numbers.

Canonical names are the vSR seed's (`aes256-gcm-128`, `hmac-sha384`, `x25519`);
strongSwan's proposal keywords (`aes256gcm16`, `prfsha384`, `curve25519`) are
accepted as aliases so a strongSwan operator can paste what they know.
`show` output always prints the canonical name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from ikefarm.shared.ikev2.constants import DhId, EncrId, IntegId, PrfId, TransformType


class AlgorithmKind(StrEnum):
    ENC = "enc-alg"  # classic cipher, paired with an auth-alg
    AEAD = "aead-alg"  # combined-mode cipher, no auth-alg
    AUTH = "auth-alg"  # integrity
    PRF = "prf-alg"
    DH = "dh-group"


@dataclass(frozen=True)
class Algorithm:
    name: str
    kind: AlgorithmKind
    transform_type: TransformType
    transform_id: int
    key_bits: int | None = None  # KEY_LENGTH attribute value, when the transform has one
    aliases: tuple[str, ...] = field(default=())


class UnknownAlgorithm(ValueError):
    def __init__(self, kind: AlgorithmKind, name: str) -> None:
        self.kind = kind
        self.name = name
        self.known = sorted(a.name for a in _BY_KIND[kind])
        super().__init__(f"unknown {kind.value} {name!r}; known: {', '.join(self.known)}")


_E, _P, _I, _D = TransformType.ENCR, TransformType.PRF, TransformType.INTEG, TransformType.DH
_ENC, _AEAD, _AUTH = AlgorithmKind.ENC, AlgorithmKind.AEAD, AlgorithmKind.AUTH
_PRF, _DH = AlgorithmKind.PRF, AlgorithmKind.DH

ALGORITHMS: tuple[Algorithm, ...] = (
    Algorithm("aes128-cbc", _ENC, _E, EncrId.AES_CBC, 128, ("aes128",)),
    Algorithm("aes192-cbc", _ENC, _E, EncrId.AES_CBC, 192, ("aes192",)),
    Algorithm("aes256-cbc", _ENC, _E, EncrId.AES_CBC, 256, ("aes256",)),
    Algorithm("aes128-gcm-128", _AEAD, _E, EncrId.AES_GCM_16, 128, ("aes128gcm16", "aes128gcm128")),
    Algorithm("aes192-gcm-128", _AEAD, _E, EncrId.AES_GCM_16, 192, ("aes192gcm16", "aes192gcm128")),
    Algorithm("aes256-gcm-128", _AEAD, _E, EncrId.AES_GCM_16, 256, ("aes256gcm16", "aes256gcm128")),
    Algorithm(
        "chacha20-poly1305", _AEAD, _E, EncrId.CHACHA20_POLY1305, None, ("chacha20poly1305",)
    ),
    Algorithm("hmac-sha1", _AUTH, _I, IntegId.HMAC_SHA1_96, None, ("sha1", "sha")),
    Algorithm("hmac-sha256", _AUTH, _I, IntegId.HMAC_SHA2_256_128, None, ("sha256", "sha2_256")),
    Algorithm("hmac-sha384", _AUTH, _I, IntegId.HMAC_SHA2_384_192, None, ("sha384", "sha2_384")),
    Algorithm("hmac-sha512", _AUTH, _I, IntegId.HMAC_SHA2_512_256, None, ("sha512", "sha2_512")),
    Algorithm("hmac-sha1", _PRF, _P, PrfId.HMAC_SHA1, None, ("prfsha1", "sha1")),
    Algorithm("hmac-sha256", _PRF, _P, PrfId.HMAC_SHA2_256, None, ("prfsha256", "sha256")),
    Algorithm("hmac-sha384", _PRF, _P, PrfId.HMAC_SHA2_384, None, ("prfsha384", "sha384")),
    Algorithm("hmac-sha512", _PRF, _P, PrfId.HMAC_SHA2_512, None, ("prfsha512", "sha512")),
    Algorithm("modp2048", _DH, _D, DhId.MODP_2048, None, ()),
    Algorithm("modp3072", _DH, _D, DhId.MODP_3072, None, ()),
    Algorithm("modp4096", _DH, _D, DhId.MODP_4096, None, ()),
    Algorithm("ecp256", _DH, _D, DhId.ECP_256, None, ()),
    Algorithm("ecp384", _DH, _D, DhId.ECP_384, None, ()),
    Algorithm("ecp521", _DH, _D, DhId.ECP_521, None, ()),
    Algorithm("x25519", _DH, _D, DhId.CURVE25519, None, ("curve25519",)),
)

_BY_KIND: dict[AlgorithmKind, list[Algorithm]] = {kind: [] for kind in AlgorithmKind}
_BY_NAME: dict[tuple[AlgorithmKind, str], Algorithm] = {}
_BY_TRANSFORM: dict[tuple[TransformType, int, int | None], Algorithm] = {}
for _algorithm in ALGORITHMS:
    _BY_KIND[_algorithm.kind].append(_algorithm)
    for _name in (_algorithm.name, *_algorithm.aliases):
        _BY_NAME[(_algorithm.kind, _name)] = _algorithm
    # integrity and PRF share names; the transform type keeps them apart
    _BY_TRANSFORM.setdefault(
        (_algorithm.transform_type, int(_algorithm.transform_id), _algorithm.key_bits), _algorithm
    )


def lookup(kind: AlgorithmKind, name: str) -> Algorithm:
    """The algorithm an operator named, or UnknownAlgorithm listing the valid names."""
    try:
        return _BY_NAME[(kind, name.strip().lower())]
    except KeyError:
        raise UnknownAlgorithm(kind, name) from None


def names(kind: AlgorithmKind) -> list[str]:
    return sorted(a.name for a in _BY_KIND[kind])


def by_transform(
    transform_type: TransformType, transform_id: int, key_bits: int | None = None
) -> Algorithm | None:
    """The canonical algorithm for a negotiated transform, for display."""
    return _BY_TRANSFORM.get((transform_type, int(transform_id), key_bits))


def display_name(transform_type: TransformType, transform_id: int, key_bits: int | None) -> str:
    algorithm = by_transform(transform_type, transform_id, key_bits)
    if algorithm is not None:
        return algorithm.name
    suffix = f"_{key_bits}" if key_bits else ""
    return f"{transform_type.name.lower()}{int(transform_id)}{suffix}"


class UnsupportedTransform(ValueError):
    """A negotiated transform (type, id, key length) this implementation cannot run.

    Raised by the crypto layer (`Prf`, `Integrity`, `Cipher`, `DhExchange`) when
    asked for a transform it does not implement; the message names the transform,
    never any key material.
    """

    def __init__(
        self, transform_type: TransformType, transform_id: int, key_bits: int | None = None
    ) -> None:
        self.transform_type = transform_type
        self.transform_id = int(transform_id)
        self.key_bits = key_bits
        key = f" with key length {key_bits}" if key_bits is not None else ""
        super().__init__(
            f"unsupported {transform_type.name} transform {int(transform_id)}{key}"
            f" ({display_name(transform_type, transform_id, key_bits)})"
        )
