"""CREATE_CHILD_SA (RFC 7296 1.3): one more child, a child rekey, or an IKE SA rekey.

The request says which: REKEY_SA names a child being rekeyed (child_rekey),
an SA payload for protocol IKE asks for a new IKE SA (ike_rekey), anything
else is one more child (child_create).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ikefarm.shared.ikev2.constants import NotifyType, ProtocolId
from ikefarm.shared.ikev2.effects import Effect
from ikefarm.shared.ikev2.exchanges import child_create, child_rekey, ike_rekey
from ikefarm.shared.ikev2.message import Message
from ikefarm.shared.ikev2.payloads import NotifyPayload, SaPayload
from ikefarm.shared.ikev2.sa import ChildSa, IkeSa, IkeSaState

if TYPE_CHECKING:
    from ikefarm.shared.ikev2.engine import IkeEngine


def respond(engine: IkeEngine, sa: IkeSa, request: Message, now: float) -> list[Effect]:
    sa_payload = request.get(SaPayload)
    if sa_payload is None or not sa_payload.proposals or sa.vpn is None:
        engine.count("create_child_sa_malformed")
        return engine.respond(sa, request, [NotifyPayload(NotifyType.INVALID_SYNTAX)])
    if any(p.protocol_id == ProtocolId.IKE for p in sa_payload.proposals):
        return ike_rekey.respond_ike_rekey(engine, sa, request, now)
    if sa.state in (IkeSaState.REKEYED, IkeSaState.DELETING):
        engine.count("create_child_sa_temporary_failure")  # RFC 7296 2.25
        return engine.respond(sa, request, [NotifyPayload(NotifyType.TEMPORARY_FAILURE)])
    rekey = request.notify(NotifyType.REKEY_SA)
    if rekey is not None:
        return child_rekey.respond_child_rekey(engine, sa, request, rekey, now)
    outcome = child_create.respond_child(engine, sa, sa.vpn, request, now, first_child=False)
    if outcome.child is not None:
        engine.count("new_children_answered")
    return engine.respond(sa, request, outcome.payloads) + outcome.effects


def initiate_new_child(engine: IkeEngine, sa: IkeSa, policy_name: str, now: float) -> list[Effect]:
    return child_create.initiate_new_child(engine, sa, policy_name, now)


def initiate_child_rekey(engine: IkeEngine, sa: IkeSa, child: ChildSa, now: float) -> list[Effect]:
    return child_rekey.initiate_child_rekey(engine, sa, child, now)


def initiate_ike_rekey(engine: IkeEngine, sa: IkeSa, now: float) -> list[Effect]:
    return ike_rekey.initiate_ike_rekey(engine, sa, now)
