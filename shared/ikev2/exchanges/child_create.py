"""Child SA negotiation shared by IKE_AUTH and CREATE_CHILD_SA (RFC 7296 1.3, 2.9, 2.17).

Picks the security policy whose traffic selectors overlap what the peer
proposed, narrows them (TS_UNACCEPTABLE when no policy overlaps), selects the
ESP proposal by local preference (NO_PROPOSAL_CHOSEN), derives KEYMAT and
returns the kernel install request. The IKE SA is not touched by a failure here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ikefarm.shared.ikev2.constants import NotifyType, PayloadType, ProtocolId, TransformType
from ikefarm.shared.ikev2.crypto.cipher import Cipher
from ikefarm.shared.ikev2.crypto.integrity import Integrity
from ikefarm.shared.ikev2.crypto.keys import derive_child_sa_keys
from ikefarm.shared.ikev2.effects import ChildSaInstall, Effect, InstallChildSa, Log, SaEvent
from ikefarm.shared.ikev2.message import Message
from ikefarm.shared.ikev2.payloads import (
    NotifyPayload,
    Payload,
    SaPayload,
    TrafficSelector,
    TsPayload,
)
from ikefarm.shared.ikev2.policy import SecurityPolicy, VpnPolicy
from ikefarm.shared.ikev2.proposals import select_proposal
from ikefarm.shared.ikev2.sa import ChildSa, ChildSaState, IkeSa

if TYPE_CHECKING:
    from ikefarm.shared.ikev2.engine import IkeEngine


@dataclass
class ChildOutcome:
    """Payloads for the response, effects to emit, and the child when one was made."""

    payloads: list[Payload] = field(default_factory=list)
    effects: list[Effect] = field(default_factory=list)
    child: ChildSa | None = None


def narrow(ours: TrafficSelector | None, theirs: list[TrafficSelector]) -> list[TrafficSelector]:
    """The parts of the peer's selectors our policy allows (RFC 7296 2.9)."""
    if ours is None:
        return []
    narrowed = []
    for selector in theirs:
        common = ours.intersect(selector)
        if common is not None and common not in narrowed:
            narrowed.append(common)
    return narrowed


def _selectors(payload: Payload | None) -> list[TrafficSelector]:
    if not isinstance(payload, TsPayload):
        return []
    return [s for s in payload.selectors if isinstance(s, TrafficSelector)]


def match_policy(
    vpn: VpnPolicy, sa: IkeSa, tsi: list[TrafficSelector], tsr: list[TrafficSelector]
) -> tuple[SecurityPolicy, list[TrafficSelector], list[TrafficSelector]] | None:
    """The first security policy whose selectors overlap the peer's, with the narrowed sets."""
    for policy in vpn.security_policies:
        # responder: the peer's TSi is our remote side, its TSr our local side
        remote = policy.remote_ts.resolve(
            sa.remote.address if not sa.is_initiator else sa.local.address
        )
        local = policy.local_ts.resolve(
            sa.local.address if not sa.is_initiator else sa.remote.address
        )
        if sa.is_initiator:
            local, remote = remote, local
        narrowed_i = narrow(remote, tsi)
        narrowed_r = narrow(local, tsr)
        if narrowed_i and narrowed_r:
            return policy, narrowed_i, narrowed_r
    return None


def respond_child(
    engine: IkeEngine,
    sa: IkeSa,
    vpn: VpnPolicy,
    request: Message,
    now: float,
    *,
    first_child: bool,
    shared_secret: bytes | None = None,
) -> ChildOutcome:
    """Negotiate the child the peer asked for in `request` (IKE_AUTH or CREATE_CHILD_SA)."""
    outcome = ChildOutcome()
    sa_payload = request.get(SaPayload)
    tsi = _selectors(request.get_type(PayloadType.TSi))
    tsr = _selectors(request.get_type(PayloadType.TSr))
    matched = match_policy(vpn, sa, tsi, tsr)
    if sa_payload is None:
        return outcome
    if matched is None:
        engine.count("ts_unacceptable")
        outcome.payloads.append(NotifyPayload(NotifyType.TS_UNACCEPTABLE))
        outcome.effects.append(
            Log(
                1,
                "child",
                "ts_unacceptable",
                {
                    "vpn": vpn.name,
                    "tsi": [str(s) for s in tsi],
                    "tsr": [str(s) for s in tsr],
                },
            )
        )
        return outcome
    policy, narrowed_i, narrowed_r = matched
    selection = select_proposal(
        policy.esp_proposals, sa_payload.proposals, ProtocolId.ESP, ignore_dh=first_child
    )
    if selection is None:
        engine.count("child_no_proposal_chosen")
        outcome.payloads.append(NotifyPayload(NotifyType.NO_PROPOSAL_CHOSEN))
        outcome.effects.append(
            Log(1, "child", "child_no_proposal_chosen", {"vpn": vpn.name, "policy": policy.name})
        )
        return outcome
    algorithms = selection.algorithms()
    spi_in = engine.new_child_spi()
    spi_out = selection.offered.spi
    cipher = Cipher(algorithms.encr[0], algorithms.encr[1])
    integrity = Integrity(algorithms.integ[0]) if algorithms.integ else None
    assert sa.prf is not None and sa.keys is not None
    keys = derive_child_sa_keys(
        sa.prf,
        sa.keys.sk_d,
        sa.nonce_i if first_child else request_nonce(request),
        sa.nonce_r if first_child else b"",
        cipher.key_size,
        integrity.key_size if integrity else 0,
        shared_secret,
    )
    transport = (
        policy.mode == "transport" and request.notify(NotifyType.USE_TRANSPORT_MODE) is not None
    )
    mode = "transport" if transport else "tunnel"
    child = ChildSa(
        unique_id=engine.new_unique_id(),
        policy=policy,
        spi_in=spi_in,
        spi_out=spi_out,
        algorithms=algorithms,
        keys=keys,
        local_ts=narrowed_r if not sa.is_initiator else narrowed_i,
        remote_ts=narrowed_i if not sa.is_initiator else narrowed_r,
        mode=mode,
        udp_encap=sa.nat_detected,
        state=ChildSaState.INSTALLED,
        installed_at=now,
        rekey_at=now + policy.rekey_time,
        expire_at=now + policy.life_time,
    )
    sa.children.append(child)
    if transport:
        outcome.payloads.append(NotifyPayload(NotifyType.USE_TRANSPORT_MODE))
    outcome.payloads += [
        SaPayload([selection.response(spi_in)]),
        TsPayload(narrowed_i, PayloadType.TSi),
        TsPayload(narrowed_r, PayloadType.TSr),
    ]
    outcome.child = child
    outcome.effects += install_effects(sa, child)
    return outcome


def request_nonce(request: Message) -> bytes:
    from ikefarm.shared.ikev2.payloads import NoncePayload

    nonce = request.get(NoncePayload)
    return nonce.data if nonce else b""


def install_effects(sa: IkeSa, child: ChildSa) -> list[Effect]:
    keys = child.keys
    # RFC 7296 2.17: KEYMAT starts with the initiator-to-responder keys
    if sa.is_initiator:
        encr_in, integ_in, encr_out, integ_out = (
            keys.encr_r,
            keys.integ_r,
            keys.encr_i,
            keys.integ_i,
        )
    else:
        encr_in, integ_in, encr_out, integ_out = (
            keys.encr_i,
            keys.integ_i,
            keys.encr_r,
            keys.integ_r,
        )
    install = ChildSaInstall(
        unique_id=child.unique_id,
        ike_unique_id=sa.unique_id,
        name=child.name,
        vpn=child.policy.vpn,
        reqid=child.policy.reqid,
        protocol="esp",
        mode=child.mode,
        local=sa.local,
        remote=sa.remote,
        spi_in=child.spi_in,
        spi_out=child.spi_out,
        encr_id=child.algorithms.encr[0],
        encr_key_bits=child.algorithms.encr[1],
        integ_id=child.algorithms.integ[0] if child.algorithms.integ else None,
        encr_key_in=encr_in,
        encr_key_out=encr_out,
        integ_key_in=integ_in,
        integ_key_out=integ_out,
        esn=child.algorithms.esn,
        replay_window=child.policy.replay_window,
        udp_encap=child.udp_encap,
        local_ts=tuple(str(s) for s in child.local_ts),
        remote_ts=tuple(str(s) for s in child.remote_ts),
    )
    detail = {
        "name": child.name,
        "unique_id": child.unique_id,
        "spi_in": child.spi_in.hex(),
        "spi_out": child.spi_out.hex(),
        "local_ts": list(install.local_ts),
        "remote_ts": list(install.remote_ts),
        "proposal": child.algorithms.esp_summary(),
    }
    return [
        InstallChildSa(install),
        SaEvent("child-installed", sa.unique_id, child.policy.vpn, detail),
        Log(0, "child", "child_sa_established", {"vpn": child.policy.vpn, **detail}),
    ]


# -- initiator ----------------------------------------------------------------------------------


def initiator_child_payloads(
    engine: IkeEngine, sa: IkeSa, policy: SecurityPolicy, *, first_child: bool
) -> tuple[list[Payload], dict[str, Any]]:
    """SA, TSi, TSr (and USE_TRANSPORT_MODE) proposing `policy`'s child, with our SPI."""
    spi_in = engine.new_child_spi()
    proposals = [
        spec.to_proposal(number, ProtocolId.ESP, spi_in)
        for number, spec in enumerate(policy.esp_proposals, 1)
    ]
    if first_child:
        # no KE in IKE_AUTH: the first child cannot have PFS (RFC 7296 1.2)
        for proposal in proposals:
            proposal.transforms[:] = [
                t for t in proposal.transforms if t.transform_type != TransformType.DH
            ]
    local = policy.local_ts.resolve(sa.local.address)
    remote = policy.remote_ts.resolve(sa.remote.address)
    assert local is not None and remote is not None
    payloads: list[Payload] = []
    if policy.mode == "transport":
        payloads.append(NotifyPayload(NotifyType.USE_TRANSPORT_MODE))
    payloads += [
        SaPayload(proposals),
        TsPayload([local], PayloadType.TSi),
        TsPayload([remote], PayloadType.TSr),
    ]
    context = {"policy": policy, "spi_in": spi_in, "local_ts": local, "remote_ts": remote}
    return payloads, context


def initiator_child_complete(
    engine: IkeEngine,
    sa: IkeSa,
    response: Message,
    context: dict[str, Any],
    now: float,
    *,
    first_child: bool,
    nonce_r: bytes | None = None,
    nonce_i: bytes | None = None,
    shared_secret: bytes | None = None,
) -> ChildOutcome:
    """Install the child the responder accepted, after checking it is what we offered."""
    outcome = ChildOutcome()
    policy: SecurityPolicy = context["policy"]
    errors = [n for n in response.notifies() if n.is_error]
    if errors:
        engine.count("child_refused_by_peer")
        name = _notify_name(errors[0].notify_type)
        outcome.effects.append(
            Log(
                1,
                "child",
                "child_sa_refused",
                {"vpn": policy.vpn, "policy": policy.name, "notify": name},
            )
        )
        return outcome
    sa_payload = response.get(SaPayload)
    tsi = _selectors(response.get_type(PayloadType.TSi))
    tsr = _selectors(response.get_type(PayloadType.TSr))
    if sa_payload is None or len(sa_payload.proposals) != 1 or not tsi or not tsr:
        engine.count("child_response_incomplete")
        outcome.effects.append(
            Log(1, "child", "child_response_incomplete", {"policy": policy.name})
        )
        return outcome
    selection = select_proposal(
        policy.esp_proposals, sa_payload.proposals, ProtocolId.ESP, ignore_dh=first_child
    )
    local_ts: TrafficSelector = context["local_ts"]
    remote_ts: TrafficSelector = context["remote_ts"]
    if (
        selection is None
        or not all(local_ts.contains(s) for s in tsi)
        or not all(remote_ts.contains(s) for s in tsr)
    ):
        engine.count("child_response_not_offered")
        outcome.effects.append(
            Log(1, "child", "child_response_not_offered", {"policy": policy.name})
        )
        return outcome
    algorithms = selection.algorithms()
    cipher = Cipher(algorithms.encr[0], algorithms.encr[1])
    integrity = Integrity(algorithms.integ[0]) if algorithms.integ else None
    assert sa.prf is not None and sa.keys is not None
    keys = derive_child_sa_keys(
        sa.prf,
        sa.keys.sk_d,
        nonce_i if nonce_i is not None else sa.nonce_i,
        nonce_r if nonce_r is not None else sa.nonce_r,
        cipher.key_size,
        integrity.key_size if integrity else 0,
        shared_secret,
    )
    transport = (
        policy.mode == "transport" and response.notify(NotifyType.USE_TRANSPORT_MODE) is not None
    )
    child = ChildSa(
        unique_id=engine.new_unique_id(),
        policy=policy,
        spi_in=context["spi_in"],
        spi_out=selection.offered.spi,
        algorithms=algorithms,
        keys=keys,
        local_ts=tsi,
        remote_ts=tsr,
        mode="transport" if transport else "tunnel",
        udp_encap=sa.nat_detected,
        state=ChildSaState.INSTALLED,
        installed_at=now,
        rekey_at=now + policy.rekey_time,
        expire_at=now + policy.life_time,
    )
    sa.children.append(child)
    outcome.child = child
    outcome.effects += install_effects(sa, child)
    return outcome


def _notify_name(notify_type: int) -> str:
    try:
        return NotifyType(notify_type).name
    except ValueError:
        return f"NOTIFY_{notify_type}"
