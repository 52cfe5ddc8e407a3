"""Proposal selection by local preference (RFC 7296 2.7, 3.3.6).

The responder walks its own proposals in configured order and, for each, the
peer's proposals in the peer's order; the first peer proposal that carries one
acceptable algorithm of every transform type wins, and within a type the
algorithm picked is the most preferred locally. strongSwan does the same with
its default `prefer_configured_proposals = yes`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ikefarm.shared.ikev2.constants import (
    EncrId,
    EsnId,
    IntegId,
    ProtocolId,
    TransformType,
)
from ikefarm.shared.ikev2.crypto.registry import display_name
from ikefarm.shared.ikev2.interning import Interner
from ikefarm.shared.ikev2.payloads import Proposal, Transform
from ikefarm.shared.ikev2.policy import (
    ESP_TRANSFORM_ORDER,
    IKE_TRANSFORM_ORDER,
    Algorithm,
    ProposalSpec,
)

SPI_SIZE = {ProtocolId.IKE: (0, 8), ProtocolId.ESP: (4,), ProtocolId.AH: (4,)}


@dataclass(frozen=True, slots=True)
class Algorithms:
    """What one negotiation settled on, per transform type."""

    encr: Algorithm
    integ: Algorithm | None = None
    prf: Algorithm | None = None
    dh: int | None = None
    esn: bool = False

    @property
    def is_aead(self) -> bool:
        return self.integ is None

    def encr_name(self) -> str:
        return display_name(TransformType.ENCR, self.encr[0], self.encr[1])

    def integ_name(self) -> str | None:
        return display_name(TransformType.INTEG, *self.integ) if self.integ else None

    def prf_name(self) -> str | None:
        return display_name(TransformType.PRF, *self.prf) if self.prf else None

    def dh_name(self) -> str | None:
        return display_name(TransformType.DH, self.dh, None) if self.dh else None

    def ike_summary(self) -> str:
        """As seed 004 prints it: `aes256-gcm-128/prf:hmac-sha512/ecp256`."""
        parts = [self.encr_name()]
        if self.integ_name():
            parts.append(str(self.integ_name()))
        parts.append(f"prf:{self.prf_name()}")
        if self.dh_name():
            parts.append(str(self.dh_name()))
        return "/".join(parts)

    def esp_summary(self) -> str:
        parts = [self.encr_name()]
        if self.integ_name():
            parts.append(str(self.integ_name()))
        if self.dh_name():
            parts.append(str(self.dh_name()))
        if self.esn:
            parts.append("esn")
        return "esp:" + "/".join(parts)


ALGORITHMS = Interner()


@dataclass(frozen=True)
class Selection:
    offered: Proposal
    chosen: dict[TransformType, Transform]

    def algorithms(self) -> Algorithms:
        def algorithm(kind: TransformType) -> Algorithm | None:
            transform = self.chosen.get(kind)
            return (int(transform.transform_id), transform.key_length) if transform else None

        encr = algorithm(TransformType.ENCR)
        assert encr is not None
        dh = self.chosen.get(TransformType.DH)
        esn = self.chosen.get(TransformType.ESN)
        algorithms = Algorithms(
            encr=encr,
            integ=algorithm(TransformType.INTEG),
            prf=algorithm(TransformType.PRF),
            dh=int(dh.transform_id) if dh is not None and dh.transform_id != 0 else None,
            esn=esn is not None and esn.transform_id == EsnId.ESN,
        )
        return ALGORITHMS.intern(algorithms)  # one instance per combination, shared by the SAs

    def response(self, spi: bytes = b"") -> Proposal:
        """The single proposal the responder returns: the peer's number, our SPI (3.3.1)."""
        protocol = ProtocolId(self.offered.protocol_id)
        order = IKE_TRANSFORM_ORDER if protocol == ProtocolId.IKE else ESP_TRANSFORM_ORDER
        transforms = [self.chosen[kind] for kind in order if kind in self.chosen]
        return Proposal(self.offered.number, self.offered.protocol_id, spi, transforms)


def _offered_by_type(proposal: Proposal) -> dict[int, list[Transform]] | None:
    offered: dict[int, list[Transform]] = {}
    for transform in proposal.transforms:
        if not transform.usable:
            continue  # unknown attribute: this transform cannot be chosen (3.3.6)
        kind = int(transform.transform_type)
        if kind == TransformType.INTEG and transform.transform_id == IntegId.NONE:
            continue  # AEAD proposals may list INTEG NONE; it means "no integrity"
        offered.setdefault(kind, []).append(transform)
    return offered


def _match(
    spec: ProposalSpec,
    offered: Proposal,
    *,
    ignore_dh: bool,
    prefer_dh: int | None,
) -> Selection | None:
    by_type = _offered_by_type(offered)
    if by_type is None:
        return None
    chosen: dict[TransformType, Transform] = {}
    local_types = set(spec.transforms)
    peer_types = set(by_type)
    if ignore_dh:
        local_types.discard(TransformType.DH)
        peer_types.discard(TransformType.DH)
    if offered.protocol_id == ProtocolId.ESP and TransformType.ESN not in peer_types:
        by_type[TransformType.ESN] = [Transform(TransformType.ESN, EsnId.NO_ESN)]
        peer_types.add(TransformType.ESN)
    # A transform type the peer sends and we do not configure: only "DH NONE" is harmless.
    for kind in peer_types - local_types:
        if kind == TransformType.DH and all(t.transform_id == 0 for t in by_type[kind]):
            continue
        return None
    for kind in local_types:
        peer = by_type.get(kind, [])
        candidates = [
            t
            for algorithm in spec.transforms[kind]
            for t in peer
            if (int(t.transform_id), t.key_length) == algorithm
        ]
        if kind == TransformType.DH and prefer_dh is not None:
            preferred = [t for t in candidates if t.transform_id == prefer_dh]
            candidates = preferred or candidates
        if not candidates:
            return None
        chosen[TransformType(kind)] = candidates[0]
    if TransformType.ENCR not in chosen:
        return None
    aead = chosen[TransformType.ENCR].transform_id in (EncrId.AES_GCM_16, EncrId.CHACHA20_POLY1305)
    if aead == (TransformType.INTEG in chosen):
        return None  # AEAD with an integrity transform, or a plain cipher without one
    return Selection(offered, chosen)


def select_proposal(
    local: Sequence[ProposalSpec],
    offered: Sequence[Proposal],
    protocol_id: ProtocolId,
    *,
    ignore_dh: bool = False,
    prefer_dh: int | None = None,
) -> Selection | None:
    """The first peer proposal acceptable to our most preferred configured proposal."""
    usable = [
        p
        for p in offered
        if p.protocol_id == protocol_id and len(p.spi) in SPI_SIZE.get(protocol_id, ())
    ]
    for spec in local:
        for proposal in usable:
            selection = _match(spec, proposal, ignore_dh=ignore_dh, prefer_dh=prefer_dh)
            if selection is not None:
                return selection
    return None


def offered_dh_groups(offered: Sequence[Proposal]) -> set[int]:
    return {
        int(t.transform_id)
        for p in offered
        for t in p.transforms
        if t.transform_type == TransformType.DH and t.transform_id != 0
    }
