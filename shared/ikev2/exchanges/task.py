"""Per-exchange tasks: the typed state of one exchange of one IKE SA, start to end.

The shape is strongSwan's task manager (`docs/engine.md`): an IKE SA has one
*active* task, ours, whose request holds the window (RFC 7296 2.3, window
size 1: `IkeSa.outstanding.task`), *queued* tasks waiting for that window
(`IkeSa.queued`), and *passive* tasks, the peer's exchanges we answer, of which
only those waiting for the keystore outlive one call (`IkeSa.passive`). A task
carries everything its exchange needs between its steps, so nothing lives in an
untyped scratchpad:

  build(engine, sa, now)                   build and send our request (active tasks);
  process(engine, sa, response, now)       the peer's answer to it;
  keystore_answer(engine, sa, reply, now)  the keystore's answer to a request the
                                           task made (`engine.ask_keystore`).

The tasks themselves live next to the exchange they run (`ike_init.IkeInitTask`,
`ike_auth.IkeAuthInitiator`, `child_create.NewChildTask`, ...): in strongSwan too
the task is the exchange's code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from ikefarm.proto.messages import CertAuthReply, PskAuthReply
from ikefarm.shared.ikev2.constants import ExchangeType

if TYPE_CHECKING:
    from ikefarm.shared.ikev2.effects import Effect
    from ikefarm.shared.ikev2.engine import IkeEngine
    from ikefarm.shared.ikev2.exchanges.ppk import PpkMixed
    from ikefarm.shared.ikev2.message import Message
    from ikefarm.shared.ikev2.sa import IkeSa


class Task:
    """One exchange's state; subclasses say which exchange and implement its steps."""

    name: ClassVar[str] = "task"  # counters and logs: request_timeout.<name>, ...
    exchange: ClassVar[ExchangeType] = ExchangeType.INFORMATIONAL

    def build(self, engine: IkeEngine, sa: IkeSa, now: float) -> list[Effect]:
        """Build and send the request (the window is ours), or give it back (request_done)."""
        raise NotImplementedError(f"{type(self).__name__} is not an active task")

    def process(self, engine: IkeEngine, sa: IkeSa, response: Message, now: float) -> list[Effect]:
        """The peer's response to our request."""
        engine.count(f"response_unhandled.{self.name}")
        return engine.request_done(sa, now)

    def keystore_answer(
        self,
        engine: IkeEngine,
        sa: IkeSa,
        reply: PskAuthReply | CertAuthReply | PpkMixed | None,
        error: str | None,
        now: float,
    ) -> list[Effect]:
        """The keystore's answer (None and `error` when it could not answer)."""
        engine.count(f"keystore_reply_unexpected.{self.name}")
        return []

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
