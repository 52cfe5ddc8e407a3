"""PPK mixing (RFC 8784 3) where the PPKs live: a PPK never leaves the keystore.

    SK_d'  = prf+(PPK, SK_d)
    SK_pi' = prf+(PPK, SK_pi)
    SK_pr' = prf+(PPK, SK_pr)

The ike worker seals SK_d | SK_pi | SK_pr to the keystore's transport key
(`shared/bus/sealed.py`); the keystore opens them, finds the PPK by its PPK_ID
(the `id` or `id-hex` of an `[[ike.ppk]]`), mixes, and seals the three new keys
back on the same channel. Whether a PPK may be used for a given SA (`vpn.ppk`,
`require-ppk`) is the engine's decision; this module only answers "mix with
this PPK_ID" or "no such PPK".
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from ikefarm.proto.messages import PpkMixReply, PpkMixRequest
from ikefarm.services.keystore.store import StoredSecret
from ikefarm.shared.bus.sealed import REPLY, REQUEST, SealedChannel, SealError
from ikefarm.shared.config.kinds import Secret
from ikefarm.shared.config.loader import Config, ppk_identity
from ikefarm.shared.ikev2.crypto.keys import IkeSaKeys, mix_ppk
from ikefarm.shared.ikev2.crypto.prf import SUPPORTED_PRFS, Prf

KIND = "ppk"
REASON_NO_PPK = "no_ppk"


class BadMixRequest(ValueError):
    """A PpkMixRequest that cannot be served: the text names the field, never a value."""


@dataclass(frozen=True)
class PpkEntry:
    """One `[[ike.ppk]]`: its name and PPK_ID are public, its secret renders as a length."""

    name: str
    ppk_id: bytes
    secret: Secret = field(repr=False)


def ppk_secrets(config: Config) -> list[StoredSecret]:
    """The `[[ike.ppk]]` entries of the configuration, as the store keeps them."""
    entries = []
    for node in config.ike.ppk:
        identity = ppk_identity(node)
        if not isinstance(node.secret, Secret) or identity is None:
            continue  # refused at load; a config without secrets has none
        entries.append(StoredSecret(KIND, node.name, node.secret.value, {"ppk_id": identity.hex()}))
    return entries


class PpkStore:
    def __init__(self, entries: Iterable[PpkEntry]) -> None:
        self._by_id = {e.ppk_id: e for e in entries}

    @classmethod
    def from_secrets(cls, secrets: Iterable[StoredSecret]) -> PpkStore:
        return cls(
            PpkEntry(s.name, bytes.fromhex(s.attributes["ppk_id"]), Secret(s.secret))
            for s in secrets
        )

    def __len__(self) -> int:
        return len(self._by_id)

    def __repr__(self) -> str:
        return f"PpkStore({len(self._by_id)} entries)"

    def find(self, ppk_id: bytes) -> PpkEntry | None:
        return self._by_id.get(ppk_id)

    def mix(
        self, request: PpkMixRequest, transport: X25519PrivateKey
    ) -> tuple[PpkMixReply, PpkEntry | None]:
        """Open the sealed SK_d | SK_pi | SK_pr, mix the PPK in, seal the result back."""
        if request.prf_id not in SUPPORTED_PRFS:
            raise BadMixRequest(f"prf_id {request.prf_id} is not a supported PRF")
        prf = Prf(request.prf_id)
        try:
            channel = SealedChannel.accept(transport, request.ephemeral)
            plain = channel.open(REQUEST, request.sealed_keys)
        except SealError as exc:
            raise BadMixRequest(f"sealed_keys: {exc}") from None
        if len(plain) != 3 * prf.key_size:
            raise BadMixRequest(f"sealed_keys must hold 3 keys of {prf.key_size} octets")
        entry = self.find(request.ppk_id)
        if entry is None:
            return PpkMixReply(found=False, sealed_keys=b"", reason=REASON_NO_PPK), None
        size = prf.key_size
        sk_d, sk_pi, sk_pr = plain[:size], plain[size : 2 * size], plain[2 * size :]
        keys = IkeSaKeys(sk_d, b"", b"", b"", b"", sk_pi, sk_pr)
        mixed = mix_ppk(prf, entry.secret.value, keys)
        sealed = channel.seal(REPLY, mixed.sk_d + mixed.sk_pi + mixed.sk_pr)
        return PpkMixReply(found=True, sealed_keys=sealed), entry
