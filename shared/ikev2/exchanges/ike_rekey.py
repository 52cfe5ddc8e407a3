"""IKE SA rekeying with CREATE_CHILD_SA (RFC 7296 1.3.2, 2.18, 2.8.2).

A new IKE SA with fresh SPIs and keys (SKEYSEED = prf(SK_d (old), g^ir (new) |
Ni | Nr)) replaces the old one; the children move to it and the rekey
initiator deletes the old IKE SA. The new SA's initiator is whoever initiated
the rekey. When both ends rekey at once, the new SA made by the exchange with
the lowest of the four nonces is redundant and deleted by its initiator; the
other end deletes the old SA, and the children end up on the surviving one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from ikefarm.shared.ikev2.constants import ExchangeType, NotifyType, ProtocolId, TransformType
from ikefarm.shared.ikev2.crypto.cipher import Cipher
from ikefarm.shared.ikev2.crypto.dh import DhExchange, InvalidKeyExchange
from ikefarm.shared.ikev2.crypto.integrity import Integrity
from ikefarm.shared.ikev2.crypto.keys import derive_rekeyed_ike_sa_keys
from ikefarm.shared.ikev2.crypto.prf import Prf
from ikefarm.shared.ikev2.crypto.protection import SkProtection
from ikefarm.shared.ikev2.effects import Effect, Log, SaEvent
from ikefarm.shared.ikev2.exchanges import config, lifetimes
from ikefarm.shared.ikev2.exchanges.child_create import NONCE_SIZE, notify_name
from ikefarm.shared.ikev2.exchanges.task import Task
from ikefarm.shared.ikev2.message import Message
from ikefarm.shared.ikev2.payloads import KePayload, NoncePayload, NotifyPayload, SaPayload
from ikefarm.shared.ikev2.proposals import Selection, select_proposal
from ikefarm.shared.ikev2.sa import IkeSa, IkeSaState

if TYPE_CHECKING:
    from ikefarm.shared.ikev2.engine import IkeEngine

RETRY_AFTER_FAILURE = 60.0


def _new_sa(
    engine: IkeEngine,
    old: IkeSa,
    selection: Selection,
    shared_secret: bytes,
    *,
    we_initiated: bool,
    spi_i: bytes,
    spi_r: bytes,
    nonce_i: bytes,
    nonce_r: bytes,
    now: float,
) -> IkeSa:
    algorithms = selection.algorithms()
    assert algorithms.prf is not None and old.prf is not None and old.keys is not None
    prf = Prf(algorithms.prf[0])
    cipher = Cipher(algorithms.encr[0], algorithms.encr[1])
    integrity = Integrity(algorithms.integ[0]) if algorithms.integ else None
    keys = derive_rekeyed_ike_sa_keys(
        old.prf,
        old.keys.sk_d,
        prf,
        integrity,
        cipher,
        shared_secret,
        nonce_i,
        nonce_r,
        spi_i,
        spi_r,
    )
    new = IkeSa(
        unique_id=engine.new_unique_id(),
        is_initiator=we_initiated,
        spi_i=spi_i,
        spi_r=spi_r,
        local=old.local,
        remote=old.remote,
        state=IkeSaState.ESTABLISHED,
        created_at=now,
        vpn=old.vpn,
        candidates=old.candidates,
        algorithms=algorithms,
        prf=prf,
        protection=SkProtection(cipher, integrity),
        keys=keys,
        nonce_i=nonce_i,
        nonce_r=nonce_r,
        local_id=old.local_id,
        remote_id=old.remote_id,
        peer_fragmentation=old.peer_fragmentation,
        peer_childless=old.peer_childless,
        peer_mobike=old.peer_mobike,
        peer_addresses=old.peer_addresses,
        nat_local=old.nat_local,
        nat_remote=old.nat_remote,
        ppk_used=old.ppk_used,
        auth_methods=dict(old.auth_methods),
        established_at=now,
        last_seen=now,
    )
    lifetimes.start_ike_sa(engine, new, now)
    engine.sas[new.local_spi] = new
    return new


def _move_children(engine: IkeEngine, old: IkeSa, new: IkeSa) -> None:
    for child in old.children:
        engine.register_child(new, child)
    new.children.extend(old.children)
    old.children = []
    config.move(old, new)  # the VIP leases stay with the SA that carries on
    old.successor = new
    old.state = IkeSaState.REKEYED


def _rekeyed_effects(old: IkeSa, new: IkeSa) -> list[Effect]:
    assert new.algorithms is not None
    detail = {
        "old": old.unique_id,
        "new": new.unique_id,
        "spi_i": new.spi_i.hex(),
        "spi_r": new.spi_r.hex(),
        "proposal": new.algorithms.ike_summary(),
    }
    vpn = new.vpn.name if new.vpn else None
    return [
        SaEvent("ike-rekeyed", new.unique_id, vpn, detail),
        Log(0, "ike", "ike_sa_rekeyed", {"vpn": vpn, **detail}),
    ]


# -- initiator ----------------------------------------------------------------------------------


@dataclass(repr=False)
class IkeRekeyTask(Task):
    """Our rekey of the IKE SA (RFC 7296 1.3.2), active; `sa.rekey_task` while it is ours."""

    name: ClassVar[str] = "ike_rekey"
    exchange: ClassVar[ExchangeType] = ExchangeType.CREATE_CHILD_SA

    spi: bytes = b""  # the new SA's SPIi
    dh: DhExchange | None = None
    nonce_i: bytes = b""
    retried: bool = False  # once after INVALID_KE_PAYLOAD
    in_flight: bool = False  # the request is sent (a peer rekey crossing it collides, 2.8.2)
    deleted_by_peer: bool = False  # the peer won a collision and deleted the old SA

    def build(
        self, engine: IkeEngine, sa: IkeSa, now: float, group: int | None = None
    ) -> list[Effect]:
        if sa.state != IkeSaState.REKEYING or sa.local_spi not in engine.sas:
            return engine.request_done(sa, now)  # replaced or deleted meanwhile
        assert sa.vpn is not None and sa.algorithms is not None
        self.spi = engine.new_ike_spi()
        chosen = group or sa.algorithms.dh
        if chosen is None:
            chosen = sa.vpn.ike_proposals[0].first(TransformType.DH)[0]  # type: ignore[index]
        self.dh = engine.new_dh(chosen)
        self.nonce_i = engine.random(NONCE_SIZE)
        self.retried = group is not None
        proposals = [
            spec.to_proposal(n, ProtocolId.IKE, self.spi)
            for n, spec in enumerate(sa.vpn.ike_proposals, 1)
        ]
        payloads = [
            SaPayload(proposals),
            NoncePayload(self.nonce_i),
            KePayload(chosen, self.dh.public_bytes()),
        ]
        self.in_flight = True
        engine.count("ike_rekeys_initiated")
        return engine.send_request(sa, ExchangeType.CREATE_CHILD_SA, payloads, now, self)

    def process(self, engine: IkeEngine, sa: IkeSa, response: Message, now: float) -> list[Effect]:
        return ike_rekey_response(engine, sa, self, response, now)


def initiate_ike_rekey(engine: IkeEngine, sa: IkeSa, now: float) -> list[Effect]:
    if sa.state != IkeSaState.ESTABLISHED or sa.vpn is None:
        raise ValueError(f"IKE SA #{sa.unique_id} is {sa.state}, not established")
    sa.state = IkeSaState.REKEYING
    task = IkeRekeyTask()
    sa.rekey_task = task
    return [
        Log(1, "ike", "rekeying_ike_sa", {"unique_id": sa.unique_id}),
        *engine.queue_task(sa, task, now),
    ]


def ike_rekey_response(
    engine: IkeEngine, sa: IkeSa, task: IkeRekeyTask, response: Message, now: float
) -> list[Effect]:
    task.in_flight = False
    ours_still = sa.rekey_task is task
    sa.rekey_task = None
    invalid_ke = response.notify(NotifyType.INVALID_KE_PAYLOAD)
    if invalid_ke is not None and len(invalid_ke.data) == 2 and not task.retried and ours_still:
        group = int.from_bytes(invalid_ke.data, "big")
        assert sa.vpn is not None
        acceptable = {
            g for spec in sa.vpn.ike_proposals for g, _ in spec.transforms.get(TransformType.DH, ())
        }
        if group in acceptable:
            engine.count("ike_rekey_invalid_ke_retries")
            sa.outstanding = None
            sa.rekey_task = task
            return task.build(engine, sa, now, group)
    errors = [n for n in response.notifies() if n.is_error]
    if errors:
        theirs = sa.collision
        if theirs is not None and theirs.local_spi in engine.sas:
            # ours was refused, theirs (which we answered) stands; the peer deletes the old SA
            sa.outstanding = None
            _move_children(engine, sa, theirs)
            return _rekeyed_effects(sa, theirs)
        return _rekey_failed(engine, sa, notify_name(errors[0].notify_type), now)
    sa_payload = response.get(SaPayload)
    nonce = response.get(NoncePayload)
    ke = response.get(KePayload)
    dh = task.dh
    assert dh is not None
    if sa_payload is None or nonce is None or ke is None or len(sa_payload.proposals) != 1:
        return _rekey_failed(engine, sa, "incomplete_response", now)
    assert sa.vpn is not None
    selection = select_proposal(sa.vpn.ike_proposals, sa_payload.proposals, ProtocolId.IKE)
    spi_r = sa_payload.proposals[0].spi
    if (
        selection is None
        or len(spi_r) != 8
        or selection.algorithms().dh != dh.group
        or int(ke.dh_group) != dh.group
    ):
        return _rekey_failed(engine, sa, "proposal_not_offered", now)
    try:
        shared_secret = dh.compute_shared(ke.key_data)
    except InvalidKeyExchange:
        return _rekey_failed(engine, sa, "invalid_ke_value", now)
    engine.count("dh_computed")
    ours = _new_sa(
        engine,
        sa,
        selection,
        shared_secret,
        we_initiated=True,
        spi_i=task.spi,
        spi_r=spi_r,
        nonce_i=task.nonce_i,
        nonce_r=nonce.data,
        now=now,
    )
    effects: list[Effect] = []
    theirs = sa.collision
    to_delete: list[IkeSa] = []
    winner = ours
    if task.deleted_by_peer:
        # the peer won and already retired the old SA: ours is redundant (2.8.2)
        engine.count("ike_rekey_collisions")
        sa.outstanding = None
        effects += engine.remove_sa(sa, "rekeyed", now)
        return effects + engine.delete_ike(ours, now, "redundant after rekey collision")
    if theirs is not None and theirs.local_spi in engine.sas:
        # RFC 7296 2.8.2: the new SA of the exchange with the lowest nonce is redundant
        engine.count("ike_rekey_collisions")
        ours_lower = min(ours.nonce_i, ours.nonce_r) < min(theirs.nonce_i, theirs.nonce_r)
        winner = theirs if ours_lower else ours
        if ours_lower:
            to_delete.append(ours)  # we made the redundant one; the peer deletes the old
        else:
            to_delete.append(sa)  # we won: the peer deletes its redundant SA, we the old
        effects.append(
            Log(1, "ike", "ike_rekey_collision", {"old": sa.unique_id, "kept": winner.unique_id})
        )
    else:
        to_delete.append(sa)
    _move_children(engine, sa, winner)
    effects += _rekeyed_effects(sa, winner)
    sa.outstanding = None
    for doomed in to_delete:
        effects += engine.delete_ike(
            doomed, now, "rekeyed" if doomed is sa else "redundant after rekey collision"
        )
    return effects


def _rekey_failed(engine: IkeEngine, sa: IkeSa, reason: str, now: float) -> list[Effect]:
    engine.count(f"ike_rekey_failed.{reason.lower()}")
    if sa.state == IkeSaState.REKEYING:
        sa.state = IkeSaState.ESTABLISHED
        sa.rekey_at = now + RETRY_AFTER_FAILURE
    effects: list[Effect] = [
        Log(1, "ike", "ike_rekey_failed", {"unique_id": sa.unique_id, "reason": reason})
    ]
    return effects + engine.request_done(sa, now)


def deleted_by_peer_while_rekeying(engine: IkeEngine, sa: IkeSa, now: float) -> bool:
    """The peer deletes this SA while our crossing rekey is in flight: it won (2.8.2).

    Its new SA (the one we answered) keeps the children. This SA stays, answering
    nothing, until our rekey's answer arrives so we can delete the redundant SA
    it makes. Returns True when the delete is handled that way.
    """
    theirs = sa.collision
    outstanding = sa.outstanding
    if theirs is None or outstanding is None or not isinstance(outstanding.task, IkeRekeyTask):
        return False
    if theirs.local_spi not in engine.sas:
        return False
    _move_children(engine, sa, theirs)
    outstanding.task.deleted_by_peer = True
    engine.count("ike_rekey_lost_collision")
    return True


# -- responder ----------------------------------------------------------------------------------


def respond_ike_rekey(engine: IkeEngine, sa: IkeSa, request: Message, now: float) -> list[Effect]:
    if sa.state in (IkeSaState.REKEYED, IkeSaState.DELETING) or sa.vpn is None:
        engine.count("ike_rekey_temporary_failure")  # RFC 7296 2.25
        return engine.respond(sa, request, [NotifyPayload(NotifyType.TEMPORARY_FAILURE)])
    sa_payload = request.get(SaPayload)
    nonce = request.get(NoncePayload)
    ke = request.get(KePayload)
    if sa_payload is None or nonce is None or ke is None:
        engine.count("ike_rekey_incomplete")
        return engine.respond(sa, request, [NotifyPayload(NotifyType.INVALID_SYNTAX)])
    selection = select_proposal(
        sa.vpn.ike_proposals, sa_payload.proposals, ProtocolId.IKE, prefer_dh=int(ke.dh_group)
    )
    if selection is None or len(selection.offered.spi) != 8:
        engine.count("ike_rekey_no_proposal_chosen")
        return engine.respond(sa, request, [NotifyPayload(NotifyType.NO_PROPOSAL_CHOSEN)])
    group = selection.algorithms().dh
    assert group is not None
    if int(ke.dh_group) != group:
        engine.count("ike_rekey_invalid_ke_payload")
        return engine.respond(
            sa,
            request,
            [NotifyPayload(NotifyType.INVALID_KE_PAYLOAD, data=group.to_bytes(2, "big"))],
        )
    dh = engine.new_dh(group)
    try:
        shared_secret = dh.compute_shared(ke.key_data)
    except InvalidKeyExchange:
        return engine.respond(sa, request, [NotifyPayload(NotifyType.INVALID_SYNTAX)])
    engine.count("dh_computed")
    spi_r = engine.new_ike_spi()
    nonce_r = engine.random(NONCE_SIZE)
    new = _new_sa(
        engine,
        sa,
        selection,
        shared_secret,
        we_initiated=False,
        spi_i=selection.offered.spi,
        spi_r=spi_r,
        nonce_i=nonce.data,
        nonce_r=nonce_r,
        now=now,
    )
    effects = engine.respond(
        sa,
        request,
        [
            SaPayload([selection.response(spi_r)]),
            NoncePayload(nonce_r),
            KePayload(group, dh.public_bytes()),
        ],
    )
    engine.count("ike_rekeys_answered")
    ours = sa.rekey_task
    if sa.state == IkeSaState.REKEYING and isinstance(ours, IkeRekeyTask) and ours.in_flight:
        sa.collision = new  # ours crossed it: decide when our answer comes (2.8.2)
        return effects
    if sa.state == IkeSaState.REKEYING:
        sa.rekey_task = None  # ours was only queued: the peer's rekey wins
    _move_children(engine, sa, new)
    return effects + _rekeyed_effects(sa, new)
