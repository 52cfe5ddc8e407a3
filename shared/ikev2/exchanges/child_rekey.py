"""Child SA rekeying with CREATE_CHILD_SA and REKEY_SA (RFC 7296 1.3.3, 2.8, 2.8.1, 2.25).

The rekey initiator makes the new child, then deletes the old one. When both
ends rekey the same child at once (a collision), each answers the other, so two
new children exist; the one made by the exchange holding the lowest of the four
nonces is redundant and is deleted by whoever initiated that exchange, and the
other end (the winner) deletes the old child. Both ends end up with exactly
one new child.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from ikefarm.shared.ikev2.constants import NotifyType, ProtocolId
from ikefarm.shared.ikev2.effects import Effect, Log, SaEvent
from ikefarm.shared.ikev2.exchanges.child_create import (
    ChildProposalTask,
    ChildRequest,
    child_detail,
    initiator_child_complete,
    respond_child,
    successor,
)
from ikefarm.shared.ikev2.message import Message
from ikefarm.shared.ikev2.payloads import NotifyPayload
from ikefarm.shared.ikev2.sa import ChildSa, ChildSaState, IkeSa

if TYPE_CHECKING:
    from ikefarm.shared.ikev2.engine import IkeEngine


@dataclass(repr=False)
class ChildRekeyTask(ChildProposalTask):
    """Our rekey of `child` with CREATE_CHILD_SA and REKEY_SA (RFC 7296 1.3.3), active."""

    name: ClassVar[str] = "child_rekey"

    child: ChildSa | None = None

    def build(self, engine: IkeEngine, sa: IkeSa, now: float) -> list[Effect]:
        child = self.child
        assert child is not None
        owner = successor(sa)
        if child not in owner.children or child.state != ChildSaState.REKEYING:
            return engine.request_done(owner, now)  # deleted or rekeyed by the peer meanwhile
        engine.count("child_rekeys_initiated")
        child.rekey_in_flight = True
        return self.propose(engine, owner, child.policy, now, old_child=child)

    def process(self, engine: IkeEngine, sa: IkeSa, response: Message, now: float) -> list[Effect]:
        retry = self.retried(engine, sa, response, now)
        if retry is not None:
            return retry
        assert self.request is not None
        return child_rekey_response(engine, sa, self.request, response, now)


def initiate_child_rekey(engine: IkeEngine, sa: IkeSa, child: ChildSa, now: float) -> list[Effect]:
    if child.state != ChildSaState.INSTALLED:
        raise ValueError(f"child SA #{child.unique_id} is {child.state}, not installed")
    child.state = ChildSaState.REKEYING  # no second rekey while this one waits for the window
    return [
        Log(1, "child", "rekeying_child_sa", {"vpn": child.policy.vpn, **child_detail(child)}),
        *engine.queue_task(sa, ChildRekeyTask(child=child), now),
    ]


def respond_child_rekey(
    engine: IkeEngine, sa: IkeSa, request: Message, rekey: NotifyPayload, now: float
) -> list[Effect]:
    """The peer rekeys one of our children: make the new one; the peer deletes the old."""
    assert sa.vpn is not None
    # the REKEY_SA SPI is the sender's inbound SPI of the old child: our outbound one
    old = sa.child_by_spi_out(rekey.spi) or sa.child_by_spi_in(rekey.spi)
    if (
        rekey.protocol_id not in (ProtocolId.ESP, ProtocolId.AH)
        or old is None
        or old.state == ChildSaState.DELETED
    ):
        engine.count("rekey_child_not_found")
        notify = NotifyPayload(NotifyType.CHILD_SA_NOT_FOUND, rekey.protocol_id, rekey.spi)
        return engine.respond(sa, request, [notify])
    if old.state in (ChildSaState.DELETING, ChildSaState.REKEYED):
        # RFC 7296 2.25: we are already closing or replacing it
        engine.count("rekey_child_temporary_failure")
        return engine.respond(sa, request, [NotifyPayload(NotifyType.TEMPORARY_FAILURE)])
    outcome = respond_child(engine, sa, sa.vpn, request, now, first_child=False, old_child=old)
    effects = engine.respond(sa, request, outcome.payloads) + outcome.effects
    new = outcome.child
    if new is None:
        return effects
    engine.count("child_rekeys_answered")
    new.rekeyed_from = old.unique_id
    if old.state == ChildSaState.REKEYING and old.rekey_in_flight:
        old.collision = new  # ours is in flight too; resolve when its answer comes (2.8.1)
    else:
        old.state = ChildSaState.REKEYED  # a rekey of ours still queued will not be sent
    effects.append(
        SaEvent(
            "child-rekeyed",
            sa.unique_id,
            old.policy.vpn,
            {"old": old.unique_id, "new": new.unique_id},
        )
    )
    return effects


def child_rekey_response(
    engine: IkeEngine, sa: IkeSa, request: ChildRequest, response: Message, now: float
) -> list[Effect]:
    old = request.old_child
    assert old is not None
    owner = successor(sa)
    outcome = initiator_child_complete(engine, owner, response, request, now, first_child=False)
    effects = list(outcome.effects)
    new = outcome.child
    deletes: list[ChildSa] = []
    if new is None:
        if response.notify(NotifyType.CHILD_SA_NOT_FOUND) is not None:
            deletes.append(old)  # the peer has lost it: ours is useless (RFC 7296 errata 2.25)
        elif old.collision is not None:
            old.state = (
                ChildSaState.REKEYED
            )  # the peer's rekey of it succeeded; the peer deletes it
        elif old.state == ChildSaState.REKEYING:
            old.state = ChildSaState.INSTALLED  # try again later
        old.rekey_in_flight = False
        return effects + _then_delete(engine, sa, deletes, now)
    new.rekeyed_from = old.unique_id
    peer_new = old.collision
    effects.append(
        SaEvent(
            "child-rekeyed",
            owner.unique_id,
            old.policy.vpn,
            {"old": old.unique_id, "new": new.unique_id},
        )
    )
    if peer_new is not None:
        engine.count("child_rekey_collisions")
    if peer_new is not None and peer_new in owner.children:
        # RFC 7296 2.8.1: the SA of the exchange with the lowest nonce is redundant
        ours_lower = min(new.nonce_i, new.nonce_r) < min(peer_new.nonce_i, peer_new.nonce_r)
        old.state = ChildSaState.REKEYED
        if ours_lower:
            deletes.append(new)  # we made the redundant one; the peer deletes the old
        else:
            deletes.append(old)  # we won: the peer deletes its redundant child, we the old
        effects.append(
            Log(
                1,
                "child",
                "child_rekey_collision",
                {
                    "old": old.unique_id,
                    "kept": (peer_new if ours_lower else new).unique_id,
                    "redundant": (new if ours_lower else peer_new).unique_id,
                },
            )
        )
    else:
        # a plain rekey, or the peer already deleted its redundant child: we delete the old
        old.state = ChildSaState.REKEYED
        deletes.append(old)
    return effects + _then_delete(engine, sa, deletes, now)


def _then_delete(engine: IkeEngine, sa: IkeSa, children: list[ChildSa], now: float) -> list[Effect]:
    """Queue the deletes, then free the window so they go out one after the other."""
    owner = successor(sa)
    effects: list[Effect] = []
    for child in children:
        if child in owner.children:
            effects += engine.delete_child(owner, child, now)
    return effects + engine.request_done(sa, now)
