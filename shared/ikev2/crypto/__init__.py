"""The IKEv2 crypto layer: DH groups, PRF and prf+, integrity, ciphers, key
derivation and SK payload protection. Every primitive comes from `cryptography`.
"""

from ikefarm.shared.ikev2.crypto.cipher import SUPPORTED_CIPHERS, Cipher
from ikefarm.shared.ikev2.crypto.dh import (
    SUPPORTED_DH_GROUPS,
    DhExchange,
    InvalidKeyExchange,
    UnsupportedGroup,
    key_exchange_length,
)
from ikefarm.shared.ikev2.crypto.integrity import SUPPORTED_INTEGRITY, Integrity
from ikefarm.shared.ikev2.crypto.keys import (
    ChildSaKeys,
    IkeSaKeys,
    derive_child_sa_keys,
    derive_ike_sa_keys,
    derive_rekeyed_ike_sa_keys,
    mix_ppk,
)
from ikefarm.shared.ikev2.crypto.prf import SUPPORTED_PRFS, Prf
from ikefarm.shared.ikev2.crypto.protection import (
    IntegrityCheckFailed,
    MalformedEncryptedPayload,
    SkProtection,
    protection_for,
)
from ikefarm.shared.ikev2.crypto.registry import UnsupportedTransform

__all__ = [
    "SUPPORTED_CIPHERS",
    "SUPPORTED_DH_GROUPS",
    "SUPPORTED_INTEGRITY",
    "SUPPORTED_PRFS",
    "ChildSaKeys",
    "Cipher",
    "DhExchange",
    "IkeSaKeys",
    "Integrity",
    "IntegrityCheckFailed",
    "InvalidKeyExchange",
    "MalformedEncryptedPayload",
    "Prf",
    "SkProtection",
    "UnsupportedGroup",
    "UnsupportedTransform",
    "derive_child_sa_keys",
    "derive_ike_sa_keys",
    "derive_rekeyed_ike_sa_keys",
    "key_exchange_length",
    "mix_ppk",
    "protection_for",
]
