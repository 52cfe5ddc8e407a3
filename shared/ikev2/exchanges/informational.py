"""INFORMATIONAL, responder side (RFC 7296 1.4, 1.5): liveness, Delete of IKE and child SAs.

An empty request is a liveness check and gets an empty response. A Delete of
the IKE SA is acknowledged, then the SA and its children are removed. A Delete
of child SAs names the peer's inbound SPIs (our outbound); the response names
ours, as RFC 7296 1.4.1 asks, and unknown SPIs are ignored.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ikefarm.shared.ikev2.constants import ProtocolId
from ikefarm.shared.ikev2.effects import DeleteChildSa, Effect, Log, SaEvent
from ikefarm.shared.ikev2.message import Message
from ikefarm.shared.ikev2.payloads import DeletePayload, Payload
from ikefarm.shared.ikev2.sa import ChildSaState, IkeSa

if TYPE_CHECKING:
    from ikefarm.shared.ikev2.engine import IkeEngine


def respond(engine: IkeEngine, sa: IkeSa, request: Message, now: float) -> list[Effect]:
    deletes = request.get_all(DeletePayload)
    if any(d.protocol_id == ProtocolId.IKE for d in deletes):
        engine.count("ike_sa_deleted_by_peer")
        effects = engine.respond(sa, request, [])
        effects += engine.remove_sa(sa, "deleted by peer", now)
        return effects
    if not deletes:
        engine.count("liveness_answered")
        return engine.respond(sa, request, [])

    answer: list[Payload] = []
    effects: list[Effect] = []
    for delete in deletes:
        if delete.protocol_id not in (ProtocolId.ESP, ProtocolId.AH):
            continue
        ours: list[bytes] = []
        for spi in delete.spis:
            child = sa.child_by_spi_out(spi)
            if child is None or child.state == ChildSaState.DELETED:
                engine.count("delete_unknown_child_spi")
                continue
            child.state = ChildSaState.DELETED
            ours.append(child.spi_in)
            engine.count("child_sa_deleted_by_peer")
            effects.append(
                DeleteChildSa(
                    child.unique_id,
                    child.policy.reqid,
                    child.spi_in,
                    child.spi_out,
                    sa.local,
                    sa.remote,
                )
            )
            detail = {"name": child.name, "unique_id": child.unique_id,
                      "spi_in": child.spi_in.hex(), "spi_out": child.spi_out.hex()}  # fmt: skip
            effects.append(SaEvent("child-deleted", sa.unique_id, child.policy.vpn, detail))
            effects.append(Log(0, "child", "child_sa_deleted", {"vpn": child.policy.vpn, **detail}))
        if ours:
            answer.append(DeletePayload(delete.protocol_id, ours))
    sa.children = [c for c in sa.children if c.state != ChildSaState.DELETED]
    return engine.respond(sa, request, answer) + effects


def initiator_response(
    engine: IkeEngine, sa: IkeSa, response: Message, context: dict[str, Any], now: float
) -> list[Effect]:
    """The answer to our INFORMATIONAL: a liveness check passed or a delete is acknowledged."""
    kind = context.get("kind", "liveness")
    effects: list[Effect] = []
    if kind == "delete_ike":
        engine.count("ike_sa_deleted_by_us")
        sa.outstanding = None
        return engine.remove_sa(sa, str(context.get("reason", "deleted")), now)
    if kind == "delete_child":
        for unique_id in context.get("children", []):
            child = next((c for c in sa.children if c.unique_id == unique_id), None)
            if child is not None:
                child.state = ChildSaState.DELETED
        sa.children = [c for c in sa.children if c.state != ChildSaState.DELETED]
    else:
        engine.count("liveness_confirmed")
    return effects + engine.request_done(sa, now)


RESPONSE_HANDLERS = {"informational": initiator_response}
