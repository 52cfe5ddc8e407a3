"""Child SA negotiation shared by IKE_AUTH and CREATE_CHILD_SA (RFC 7296 1.3, 2.9, 2.17).

As responder: pick the security policy whose traffic selectors overlap what
the peer proposed and narrow them (TS_UNACCEPTABLE when none does), select
the ESP proposal by local preference (NO_PROPOSAL_CHOSEN), check the KE group
when the proposal has PFS (INVALID_KE_PAYLOAD), derive KEYMAT. As initiator:
build the proposal and check that the answer is something we offered. A
failure here never touches the IKE SA.

Keys and selectors are oriented by the exchange that made the child, not by
who initiated the IKE SA: in CREATE_CHILD_SA "initiator" is whoever sent the
request (RFC 7296 1.3, 2.17).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from ikefarm.shared.ikev2.constants import (
    ExchangeType,
    NotifyType,
    PayloadType,
    ProtocolId,
    TransformType,
)
from ikefarm.shared.ikev2.crypto.cipher import Cipher
from ikefarm.shared.ikev2.crypto.dh import DhExchange, InvalidKeyExchange
from ikefarm.shared.ikev2.crypto.integrity import Integrity
from ikefarm.shared.ikev2.crypto.keys import derive_child_sa_keys
from ikefarm.shared.ikev2.effects import (
    ChildFailed,
    ChildSaInstall,
    Effect,
    InstallChildSa,
    Log,
    SaEvent,
)
from ikefarm.shared.ikev2.exchanges.task import Task
from ikefarm.shared.ikev2.interning import Interner
from ikefarm.shared.ikev2.message import Message
from ikefarm.shared.ikev2.payloads import (
    KePayload,
    NoncePayload,
    NotifyPayload,
    Payload,
    SaPayload,
    TrafficSelector,
    TsPayload,
)
from ikefarm.shared.ikev2.policy import SecurityPolicy, VpnPolicy
from ikefarm.shared.ikev2.proposals import Algorithms, select_proposal
from ikefarm.shared.ikev2.sa import ChildSa, ChildSaState, IkeSa

if TYPE_CHECKING:
    from ikefarm.shared.ikev2.engine import IkeEngine

NONCE_SIZE = 32


@dataclass
class ChildOutcome:
    """Payloads for the response, effects to emit, and the child when one was made."""

    payloads: list[Payload] = field(default_factory=list)
    effects: list[Effect] = field(default_factory=list)
    child: ChildSa | None = None
    nonce_i: bytes = b""
    nonce_r: bytes = b""


@dataclass(repr=False)
class ChildRequest:
    """What we proposed for a child (IKE_AUTH or CREATE_CHILD_SA), to check the answer."""

    policy: SecurityPolicy
    spi_in: bytes
    local_ts: list[TrafficSelector]
    remote_ts: list[TrafficSelector]
    old_child: ChildSa | None = None  # a rekey: REKEY_SA named it
    nonce_i: bytes = b""  # CREATE_CHILD_SA only: our Ni
    dh: DhExchange | None = None  # PFS: our KEi's private half
    retried: bool = False  # once after INVALID_KE_PAYLOAD (RFC 7296 1.3)


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


def selectors(payload: Payload | None) -> list[TrafficSelector]:
    if not isinstance(payload, TsPayload):
        return []
    return [s for s in payload.selectors if isinstance(s, TrafficSelector)]


def match_policy(
    policies: tuple[SecurityPolicy, ...] | list[SecurityPolicy],
    sa: IkeSa,
    tsi: list[TrafficSelector],
    tsr: list[TrafficSelector],
) -> tuple[SecurityPolicy, list[TrafficSelector], list[TrafficSelector]] | None:
    """As exchange responder: the first policy whose selectors overlap the peer's, narrowed.

    The peer sent the request, so its TSi is our remote side and its TSr our local side.
    """
    for policy in policies:
        remote = policy.remote_ts.resolve(sa.remote_dynamic)
        local = policy.local_ts.resolve(sa.local_dynamic)
        narrowed_i = narrow(remote, tsi)
        narrowed_r = narrow(local, tsr)
        if narrowed_i and narrowed_r:
            return policy, narrowed_i, narrowed_r
    return None


def _refuse(
    engine: IkeEngine, outcome: ChildOutcome, notify: NotifyPayload, event: str, **fields: Any
) -> ChildOutcome:
    engine.count(event)
    outcome.payloads = [notify]
    outcome.effects.append(Log(1, "child", event, fields))
    return outcome


# the children's traffic selectors, mostly the same few policies' (issue 9: memory per SA)
SELECTORS = Interner()


def make_child(
    engine: IkeEngine,
    sa: IkeSa,
    policy: SecurityPolicy,
    algorithms: Algorithms,
    *,
    spi_in: bytes,
    spi_out: bytes,
    nonce_i: bytes,
    nonce_r: bytes,
    shared_secret: bytes | None,
    local_ts: list[TrafficSelector],
    remote_ts: list[TrafficSelector],
    transport: bool,
    initiated_by_us: bool,
    now: float,
) -> ChildSa:
    """Derive KEYMAT (RFC 7296 2.17) and record an installed child SA on `sa`."""
    cipher = Cipher(algorithms.encr[0], algorithms.encr[1])
    integrity = Integrity(algorithms.integ[0]) if algorithms.integ else None
    assert sa.prf is not None and sa.keys is not None
    keys = derive_child_sa_keys(
        sa.prf,
        sa.keys.sk_d,
        nonce_i,
        nonce_r,
        cipher.key_size,
        integrity.key_size if integrity else 0,
        shared_secret,
    )
    rekey_after = (
        max(0.0, policy.rekey_time - engine.uniform(0.0, policy.rand_time))
        if policy.rand_time
        else policy.rekey_time
    )
    child = ChildSa(
        unique_id=engine.new_unique_id(),
        policy=policy,
        spi_in=spi_in,
        spi_out=spi_out,
        algorithms=algorithms,
        keys=keys,
        local_ts=[SELECTORS.intern(ts) for ts in local_ts],  # equal ones shared (interning.py)
        remote_ts=[SELECTORS.intern(ts) for ts in remote_ts],
        mode="transport" if transport else "tunnel",
        udp_encap=sa.nat_detected,
        state=ChildSaState.INSTALLED,
        installed_at=now,
        rekey_at=now + rekey_after if policy.rekey_time else None,
        expire_at=now + policy.life_time if policy.life_time else None,
        initiated_by_us=initiated_by_us,
        nonce_i=nonce_i,
        nonce_r=nonce_r,
    )
    sa.children.append(child)
    engine.register_child(sa, child)
    return child


def respond_child(
    engine: IkeEngine,
    sa: IkeSa,
    vpn: VpnPolicy,
    request: Message,
    now: float,
    *,
    first_child: bool,
    old_child: ChildSa | None = None,
) -> ChildOutcome:
    """Negotiate the child the peer asked for in `request` (IKE_AUTH or CREATE_CHILD_SA).

    In IKE_AUTH the nonces are the IKE SA's and there is no KE; in CREATE_CHILD_SA
    the request carries Ni (and KEi for PFS) and our answer carries Nr (and KEr).
    """
    outcome = ChildOutcome()
    sa_payload = request.get(SaPayload)
    if sa_payload is None:
        return outcome  # IKE_AUTH without a child (RFC 6023)
    tsi = selectors(request.get_type(PayloadType.TSi))
    tsr = selectors(request.get_type(PayloadType.TSr))
    policies = [old_child.policy] if old_child is not None else list(vpn.security_policies)
    matched = match_policy(policies, sa, tsi, tsr)
    if matched is None:
        return _refuse(
            engine,
            outcome,
            NotifyPayload(NotifyType.TS_UNACCEPTABLE),
            "ts_unacceptable",
            vpn=vpn.name,
            tsi=[str(s) for s in tsi],
            tsr=[str(s) for s in tsr],
        )
    policy, narrowed_i, narrowed_r = matched
    ke = request.get(KePayload)
    selection = select_proposal(
        policy.esp_proposals,
        sa_payload.proposals,
        ProtocolId.ESP,
        ignore_dh=first_child,
        prefer_dh=int(ke.dh_group) if ke is not None else None,
    )
    if selection is None:
        return _refuse(
            engine,
            outcome,
            NotifyPayload(NotifyType.NO_PROPOSAL_CHOSEN),
            "child_no_proposal_chosen",
            vpn=vpn.name,
            policy=policy.name,
        )
    algorithms = selection.algorithms()
    if first_child:
        nonce_i, nonce_r = sa.nonce_i, sa.nonce_r
    else:
        nonce = request.get(NoncePayload)
        if nonce is None:
            return _refuse(
                engine, outcome, NotifyPayload(NotifyType.INVALID_SYNTAX), "child_missing_nonce"
            )
        nonce_i, nonce_r = nonce.data, engine.random(NONCE_SIZE)
    shared_secret: bytes | None = None
    ke_reply: KePayload | None = None
    if algorithms.dh is not None and not first_child:
        if ke is None or int(ke.dh_group) != algorithms.dh:
            # RFC 7296 1.3: name the group we want; the peer retries with it
            notify = NotifyPayload(
                NotifyType.INVALID_KE_PAYLOAD, data=algorithms.dh.to_bytes(2, "big")
            )
            return _refuse(engine, outcome, notify, "child_invalid_ke_payload", group=algorithms.dh)
        dh = engine.new_dh(algorithms.dh)
        try:
            shared_secret = dh.compute_shared(ke.key_data)
        except InvalidKeyExchange:
            return _refuse(
                engine, outcome, NotifyPayload(NotifyType.INVALID_SYNTAX), "child_invalid_ke_value"
            )
        engine.count("dh_computed")
        ke_reply = KePayload(algorithms.dh, dh.public_bytes())
    transport = (
        policy.mode == "transport" and request.notify(NotifyType.USE_TRANSPORT_MODE) is not None
    )
    spi_in = engine.new_child_spi()
    child = make_child(
        engine,
        sa,
        policy,
        algorithms,
        spi_in=spi_in,
        spi_out=selection.offered.spi,
        nonce_i=nonce_i,
        nonce_r=nonce_r,
        shared_secret=shared_secret,
        local_ts=narrowed_r,
        remote_ts=narrowed_i,
        transport=transport,
        initiated_by_us=False,
        now=now,
    )
    outcome.payloads.append(SaPayload([selection.response(spi_in)]))
    if not first_child:
        outcome.payloads.append(NoncePayload(nonce_r))
        if ke_reply is not None:
            outcome.payloads.append(ke_reply)
    outcome.payloads += [
        TsPayload(narrowed_i, PayloadType.TSi),
        TsPayload(narrowed_r, PayloadType.TSr),
    ]
    if transport:
        outcome.payloads.append(NotifyPayload(NotifyType.USE_TRANSPORT_MODE))
    outcome.child = child
    outcome.nonce_i, outcome.nonce_r = nonce_i, nonce_r
    outcome.effects += install_effects(sa, child)
    return outcome


def install_effects(sa: IkeSa, child: ChildSa) -> list[Effect]:
    keys = child.keys
    # RFC 7296 2.17: KEYMAT starts with the keys for the exchange initiator's direction
    if child.initiated_by_us:
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
    detail = child_detail(child)
    return [
        InstallChildSa(install),
        SaEvent("child-installed", sa.unique_id, child.policy.vpn, detail),
        Log(0, "child", "child_sa_established", {"vpn": child.policy.vpn, **detail}),
    ]


def child_detail(child: ChildSa) -> dict[str, Any]:
    return {
        "name": child.name,
        "unique_id": child.unique_id,
        "spi_in": child.spi_in.hex(),
        "spi_out": child.spi_out.hex(),
        "local_ts": [str(s) for s in child.local_ts],
        "remote_ts": [str(s) for s in child.remote_ts],
        "proposal": child.algorithms.esp_summary(),
    }


# -- initiator ----------------------------------------------------------------------------------


def initiator_child_payloads(
    engine: IkeEngine,
    sa: IkeSa,
    policy: SecurityPolicy,
    *,
    first_child: bool,
    old_child: ChildSa | None = None,
    group: int | None = None,
) -> tuple[list[Payload], ChildRequest]:
    """The request payloads proposing `policy`'s child, with our SPI (and Ni/KEi outside IKE_AUTH).

    `old_child`: this is a rekey (REKEY_SA names it, its selectors are kept).
    `group`: the PFS group to use for KEi (after INVALID_KE_PAYLOAD named one).
    """
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
    if old_child is not None:
        local_list, remote_list = list(old_child.local_ts), list(old_child.remote_ts)
    else:
        local = policy.local_ts.resolve(sa.local_dynamic)
        remote = policy.remote_ts.resolve(sa.remote_dynamic)
        if first_child and sa.vpn is not None and sa.vpn.vip_request and not sa.local_vips:
            # the VIP is not known yet: offer the whole family, the responder narrows it
            # to the address it assigns (RFC 7296 2.19)
            local = policy.local_ts.resolve_any(sa.vpn.vip_request[0]) or local
        assert local is not None and remote is not None
        local_list, remote_list = [local], [remote]
    payloads: list[Payload] = []
    request = ChildRequest(policy, spi_in, local_list, remote_list, old_child=old_child)
    if old_child is not None:
        payloads.append(NotifyPayload(NotifyType.REKEY_SA, ProtocolId.ESP, old_child.spi_in))
    if policy.mode == "transport":
        payloads.append(NotifyPayload(NotifyType.USE_TRANSPORT_MODE))
    payloads.append(SaPayload(proposals))
    if not first_child:
        request.nonce_i = engine.random(NONCE_SIZE)
        payloads.append(NoncePayload(request.nonce_i))
        pfs = group
        if pfs is None and policy.esp_proposals and policy.esp_proposals[0].first(TransformType.DH):
            pfs = policy.esp_proposals[0].first(TransformType.DH)[0]  # type: ignore[index]
        if pfs is not None:
            request.dh = engine.new_dh(pfs)
            payloads.append(KePayload(pfs, request.dh.public_bytes()))
    payloads += [TsPayload(local_list, PayloadType.TSi), TsPayload(remote_list, PayloadType.TSr)]
    return payloads, request


def initiator_child_complete(
    engine: IkeEngine,
    sa: IkeSa,
    response: Message,
    request: ChildRequest,
    now: float,
    *,
    first_child: bool,
) -> ChildOutcome:
    """Install the child the responder accepted, after checking it is what we offered."""
    outcome = ChildOutcome()
    policy = request.policy
    errors = [n for n in response.notifies() if n.is_error]
    if errors:
        engine.count("child_refused_by_peer")
        name = notify_name(errors[0].notify_type)
        outcome.effects.append(
            Log(
                1,
                "child",
                "child_sa_refused",
                {"vpn": policy.vpn, "policy": policy.name, "notify": name},
            )
        )
        outcome.effects.append(ChildFailed(sa.unique_id, policy.name, name))
        return outcome
    sa_payload = response.get(SaPayload)
    tsi = selectors(response.get_type(PayloadType.TSi))
    tsr = selectors(response.get_type(PayloadType.TSr))
    if sa_payload is None or len(sa_payload.proposals) != 1 or not tsi or not tsr:
        return _not_made(engine, outcome, sa, policy, "child_response_incomplete")
    selection = select_proposal(
        policy.esp_proposals, sa_payload.proposals, ProtocolId.ESP, ignore_dh=first_child
    )
    local_ts, remote_ts = request.local_ts, request.remote_ts
    offered = (
        selection is not None
        and all(any(o.contains(s) for o in local_ts) for s in tsi)
        and all(any(o.contains(s) for o in remote_ts) for s in tsr)
    )
    if not offered or selection is None:
        return _not_made(engine, outcome, sa, policy, "child_response_not_offered")
    algorithms = selection.algorithms()
    shared_secret: bytes | None = None
    if first_child:
        nonce_i, nonce_r = sa.nonce_i, sa.nonce_r
    else:
        nonce = response.get(NoncePayload)
        if nonce is None:
            return _not_made(engine, outcome, sa, policy, "child_response_incomplete")
        nonce_i, nonce_r = request.nonce_i, nonce.data
        dh = request.dh
        if algorithms.dh is not None:
            ke = response.get(KePayload)
            if (
                dh is None
                or ke is None
                or int(ke.dh_group) != dh.group
                or algorithms.dh != dh.group
            ):
                return _not_made(engine, outcome, sa, policy, "child_response_not_offered")
            try:
                shared_secret = dh.compute_shared(ke.key_data)
            except InvalidKeyExchange:
                return _not_made(engine, outcome, sa, policy, "child_invalid_ke_value")
            engine.count("dh_computed")
    transport = (
        policy.mode == "transport" and response.notify(NotifyType.USE_TRANSPORT_MODE) is not None
    )
    child = make_child(
        engine,
        sa,
        policy,
        algorithms,
        spi_in=request.spi_in,
        spi_out=selection.offered.spi,
        nonce_i=nonce_i,
        nonce_r=nonce_r,
        shared_secret=shared_secret,
        local_ts=tsi,
        remote_ts=tsr,
        transport=transport,
        initiated_by_us=True,
        now=now,
    )
    outcome.child = child
    outcome.nonce_i, outcome.nonce_r = nonce_i, nonce_r
    outcome.effects += install_effects(sa, child)
    return outcome


def _not_made(
    engine: IkeEngine, outcome: ChildOutcome, sa: IkeSa, policy: SecurityPolicy, reason: str
) -> ChildOutcome:
    """The answer does not give us the child we asked for: count, log, say so (typed)."""
    engine.count(reason)
    outcome.effects.append(Log(1, "child", reason, {"policy": policy.name}))
    outcome.effects.append(ChildFailed(sa.unique_id, policy.name, reason))
    return outcome


def notify_name(notify_type: int) -> str:
    try:
        return NotifyType(notify_type).name
    except ValueError:
        return f"NOTIFY_{notify_type}"


# -- CREATE_CHILD_SA for one more child --------------------------------------------------------


@dataclass(repr=False)
class ChildProposalTask(Task):
    """A CREATE_CHILD_SA proposing a child (one more, or a rekey): propose, retry once with
    the group an INVALID_KE_PAYLOAD names (RFC 7296 1.3)."""

    exchange: ClassVar[ExchangeType] = ExchangeType.CREATE_CHILD_SA

    request: ChildRequest | None = None

    def propose(
        self,
        engine: IkeEngine,
        sa: IkeSa,
        policy: SecurityPolicy,
        now: float,
        *,
        group: int | None = None,
        old_child: ChildSa | None = None,
    ) -> list[Effect]:
        payloads, request = initiator_child_payloads(
            engine, sa, policy, first_child=False, old_child=old_child, group=group
        )
        request.retried = group is not None
        self.request = request
        return engine.send_request(sa, ExchangeType.CREATE_CHILD_SA, payloads, now, self)

    def retried(
        self, engine: IkeEngine, sa: IkeSa, response: Message, now: float
    ) -> list[Effect] | None:
        """The request again with the group the peer named, or None to go on."""
        assert self.request is not None
        group = invalid_ke_group(engine, response, self.request)
        if group is None:
            return None
        sa.outstanding = None
        request = self.request
        return self.propose(
            engine, sa, request.policy, now, group=group, old_child=request.old_child
        )


@dataclass(repr=False)
class NewChildTask(ChildProposalTask):
    """One more child with CREATE_CHILD_SA (RFC 7296 1.3.1), active."""

    name: ClassVar[str] = "new_child"

    policy: SecurityPolicy | None = None

    def build(self, engine: IkeEngine, sa: IkeSa, now: float) -> list[Effect]:
        assert self.policy is not None
        return self.propose(engine, sa, self.policy, now)

    def process(self, engine: IkeEngine, sa: IkeSa, response: Message, now: float) -> list[Effect]:
        retry = self.retried(engine, sa, response, now)
        if retry is not None:
            return retry
        assert self.request is not None
        outcome = initiator_child_complete(
            engine, successor(sa), response, self.request, now, first_child=False
        )
        return outcome.effects + engine.request_done(sa, now)


def initiate_new_child(engine: IkeEngine, sa: IkeSa, policy_name: str, now: float) -> list[Effect]:
    """One more child on an established IKE SA (RFC 7296 1.3.1)."""
    assert sa.vpn is not None
    policy = next((p for p in sa.vpn.security_policies if p.name == policy_name), None)
    if policy is None:
        raise ValueError(f"vpn {sa.vpn.name!r} has no security-policy {policy_name!r}")
    return engine.queue_task(sa, NewChildTask(policy=policy), now)


def invalid_ke_group(engine: IkeEngine, response: Message, request: ChildRequest) -> int | None:
    """INVALID_KE_PAYLOAD in CREATE_CHILD_SA: the group to retry with, once (RFC 7296 1.3)."""
    notify = response.notify(NotifyType.INVALID_KE_PAYLOAD)
    if notify is None or len(notify.data) != 2 or request.retried:
        return None
    group = int.from_bytes(notify.data, "big")
    acceptable = {
        g
        for spec in request.policy.esp_proposals
        for g, _ in spec.transforms.get(TransformType.DH, ())
    }
    if group not in acceptable:
        return None
    engine.count("child_invalid_ke_retries")
    return group


def successor(sa: IkeSa) -> IkeSa:
    """The IKE SA that now owns the children, if `sa` was rekeyed meanwhile."""
    while sa.successor is not None:
        sa = sa.successor
    return sa
