"""CREATE_CHILD_SA (RFC 7296 1.3, 2.8): new child SAs, child rekeys, IKE SA rekeys, collisions."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ikefarm.shared.ikev2.constants import NotifyType
from ikefarm.shared.ikev2.effects import Effect
from ikefarm.shared.ikev2.message import Message
from ikefarm.shared.ikev2.payloads import NotifyPayload
from ikefarm.shared.ikev2.sa import IkeSa

if TYPE_CHECKING:
    from ikefarm.shared.ikev2.engine import IkeEngine


def respond(engine: IkeEngine, sa: IkeSa, request: Message, now: float) -> list[Effect]:
    engine.count("create_child_sa_refused")
    return engine.respond(sa, request, [NotifyPayload(NotifyType.NO_ADDITIONAL_SAS)])


RESPONSE_HANDLERS: dict[str, Any] = {}
