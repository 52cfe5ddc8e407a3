"""PSK authentication (RFC 7296 2.15) computed where the PSK lives: it never leaves here.

AUTH = prf( prf(Shared Secret, "Key Pad for IKEv2"), <signed octets> )

The ike worker sends the octets the peer signed with its AUTH value and the
octets we sign; we pick the PSK by identities, verify the peer's AUTH in
constant time and, only when it matches, return ours.

Selection follows strongSwan's shared-key lookup: an entry naming both our
`local-id` and the peer's `remote-id` beats one that leaves a side unset (or
`%any`), which matches any identity on that side; among equally specific
entries the first in the configuration wins.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from ikefarm.proto.messages import PskAuthReply, PskAuthRequest
from ikefarm.services.keystore.store import StoredSecret
from ikefarm.shared.config.kinds import Secret
from ikefarm.shared.config.loader import Config
from ikefarm.shared.ikev2.crypto.prf import SUPPORTED_PRFS, Prf

KEY_PAD = b"Key Pad for IKEv2"  # RFC 7296 2.15
ANY_ID = "%any"  # strongSwan's wildcard identity

REASON_MISMATCH = "auth_mismatch"
REASON_NO_SECRET = "no_secret"  # noqa: S105 - a reason label, not a secret

# how well one side of an entry matches: exactly named beats a wildcard
_MATCH_EXACT = 2
_MATCH_ANY = 1


PURPOSES = frozenset({"verify-and-sign", "sign", "verify"})


class UnknownPurpose(ValueError):
    def __init__(self, purpose: str) -> None:
        super().__init__(f"purpose {purpose!r} is not one of {', '.join(sorted(PURPOSES))}")


class UnsupportedPrf(ValueError):
    """The request names a PRF this keystore does not implement."""

    def __init__(self, prf_id: int) -> None:
        supported = ", ".join(str(p) for p in sorted(SUPPORTED_PRFS))
        super().__init__(f"prf_id {prf_id} is not a supported PRF ({supported})")
        self.prf_id = prf_id


@dataclass(frozen=True)
class PskEntry:
    """One `[[ike.pre-shared-key]]`; its secret renders as `Secret(<n bytes>)`."""

    index: int
    name: str | None
    local_id: str | None
    remote_id: str | None
    secret: Secret = field(repr=False)

    @property
    def label(self) -> str:
        """How logs name the entry: its name or its position, never its content."""
        return self.name or f"ike.pre-shared-key[{self.index}]"

    def match(self, local_id: str, remote_id: str) -> int:
        """0 if the entry does not apply, else higher for more specific entries."""
        score = 0
        for wanted, given in ((self.local_id, local_id), (self.remote_id, remote_id)):
            if wanted is None or wanted == ANY_ID:
                score += _MATCH_ANY
            elif wanted == given:
                score += _MATCH_EXACT
            else:
                return 0
        return score


class PskStore:
    """The configured PSKs and the AUTH computations over them."""

    def __init__(self, entries: Iterable[PskEntry]) -> None:
        self._entries = tuple(entries)

    @classmethod
    def from_config(cls, config: Config) -> PskStore:
        entries = []
        for index, node in enumerate(config.ike.pre_shared_key):
            if not isinstance(node.secret, Secret):
                continue  # refused at load; a config without secrets (ike's view) has none
            entries.append(
                PskEntry(
                    index=index,
                    name=node.name,
                    local_id=node.local_id,
                    remote_id=node.remote_id,
                    secret=node.secret,
                )
            )
        return cls(entries)

    @classmethod
    def from_secrets(cls, secrets: Iterable[StoredSecret]) -> PskStore:
        """The entries as the keystore's store holds them, in configuration order."""
        return cls(
            PskEntry(
                index=int(s.attributes["index"]),
                name=s.attributes.get("name"),
                local_id=s.attributes.get("local_id"),
                remote_id=s.attributes.get("remote_id"),
                secret=Secret(s.secret),
            )
            for s in secrets
        )

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[PskEntry]:
        return iter(self._entries)

    def __repr__(self) -> str:
        return f"PskStore({len(self._entries)} entries)"

    def select(self, local_id: str, remote_id: str) -> PskEntry | None:
        """The most specific entry for these identities; the first one on a tie."""
        best: PskEntry | None = None
        best_score = 0
        for entry in self._entries:
            score = entry.match(local_id, remote_id)
            if score > best_score:
                best, best_score = entry, score
        return best

    def authenticate(self, request: PskAuthRequest) -> tuple[PskAuthReply, PskEntry | None]:
        """Verify the peer's AUTH and/or compute ours, as `request.purpose` says.

        "verify-and-sign" (responder): ours only if the peer's verifies. "sign"
        (initiator, before IKE_AUTH): ours only. "verify" (initiator, after the
        response): the check only. Raises UnsupportedPrf / UnknownPurpose.
        """
        if request.prf_id not in SUPPORTED_PRFS:
            raise UnsupportedPrf(request.prf_id)
        if request.purpose not in PURPOSES:
            raise UnknownPurpose(request.purpose)
        prf = Prf(request.prf_id)
        entry = self.select(request.local_id, request.remote_id)
        if entry is None:
            return PskAuthReply(verified=False, auth=b"", reason=REASON_NO_SECRET), None
        if request.purpose != "sign":
            expected = psk_auth(prf, entry.secret, request.verify_octets)
            if not hmac.compare_digest(expected, request.verify_auth):
                return PskAuthReply(verified=False, auth=b"", reason=REASON_MISMATCH), entry
        if request.purpose == "verify":
            return PskAuthReply(verified=True, auth=b""), entry
        ours = psk_auth(prf, entry.secret, request.sign_octets)
        return PskAuthReply(verified=True, auth=ours), entry


def psk_secrets(config: Config) -> list[StoredSecret]:
    """The `[[ike.pre-shared-key]]` entries of the configuration, as the store keeps them."""
    return [
        StoredSecret(
            "psk",
            entry.label,
            entry.secret.value,
            {
                "index": entry.index,
                "name": entry.name,
                "local_id": entry.local_id,
                "remote_id": entry.remote_id,
            },
        )
        for entry in PskStore.from_config(config)
    ]


def psk_auth(prf: Prf, secret: Secret, octets: bytes) -> bytes:
    """RFC 7296 2.15: prf(prf(PSK, "Key Pad for IKEv2"), octets)."""
    return prf.compute(prf.compute(secret.value, KEY_PAD), octets)
