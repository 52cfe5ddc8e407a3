"""Reauthentication and restart (seed 004): a fresh IKE SA with the old one's children.

Reauthentication builds a new IKE SA with the same children from scratch,
honouring `make-before-break`: true initiates the new SA and its children first
and deletes the old one once they are up; false deletes the old one first and
initiates when that is done. A DPD restart (`dpd.peer_dead`) uses the same
`reestablish` without a delete. Each step logs a level-0 line, so the order can
be followed (and is tested) from the log or the SA events.

The steps are tasks (`exchanges/task.py`) on the new SA's queue: the first child
rides in IKE_AUTH, each other one is a `ReestablishChildTask`, and the retirement
of the old SA (`RetireOldTask`) is queued behind them, so it starts when every
one of them has been answered (or never, if the new SA fails: a make-before-break
reauth then keeps the old SA). A break-before-make reauth waits on the old SA
(`IkeSa.after_delete`) with a `ReauthNewTask`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from ikefarm.shared.ikev2.effects import ChildFailed, Effect, Log
from ikefarm.shared.ikev2.exchanges import ike_init, informational
from ikefarm.shared.ikev2.exchanges.task import Task
from ikefarm.shared.ikev2.policy import SecurityPolicy
from ikefarm.shared.ikev2.sa import ChildSaState, IkeSa

if TYPE_CHECKING:
    from ikefarm.shared.ikev2.engine import IkeEngine


@dataclass
class Reestablished:
    """What a reestablish or reauth did: the new SA when one was initiated, or why not."""

    ok: bool
    effects: list[Effect] = field(default_factory=list)
    new: IkeSa | None = None
    error: str = ""


def _wildcard(identity: str | None) -> bool:
    return identity is None or identity in ("%any", "*") or "*" in identity


def reestablish(
    engine: IkeEngine,
    old: IkeSa,
    policies: list[SecurityPolicy],
    now: float,
    *,
    reason: str,
    then: Task | None = None,
) -> Reestablished:
    """A fresh IKE SA to where `old` was, with `policies` as children; `then` once all are done."""
    vpn = old.vpn
    if vpn is None:
        return Reestablished(ok=False, error="the IKE SA has no vpn")
    remote_address = old.remote.address if vpn.remote_address == "any" else None
    remote_id = str(old.remote_id) if _wildcard(vpn.remote_id) and old.remote_id else None
    try:
        new, effects = ike_init.start(
            engine,
            vpn.name,
            policies[0].name if policies else None,
            now,
            remote_address=remote_address,
            remote_id=remote_id,
        )
    except ValueError as exc:
        failed: list[Effect] = [
            Log(1, "ike", "reestablish_failed", {"unique_id": old.unique_id, "error": str(exc)})
        ]
        return Reestablished(ok=False, effects=failed, error=str(exc))
    started = Log(
        0,
        "ike",
        "reestablishing_ike_sa",
        {
            "vpn": vpn.name,
            "old": old.unique_id,
            "new": new.unique_id,
            "reason": reason,
            "children": [p.name for p in policies],
        },
    )
    if new.local_spi not in engine.sas:  # refused at once
        error = f"initiating IKE_SA {vpn.name} failed"
        return Reestablished(ok=False, effects=effects, error=error)
    effects.insert(0, started)
    for policy in policies[1:]:
        effects += engine.queue_task(new, ReestablishChildTask(policy), now)
    if then is not None:
        effects += engine.queue_task(new, then, now)
    return Reestablished(ok=True, effects=effects, new=new)


@dataclass(repr=False)
class ReestablishChildTask(Task):
    """A queued CREATE_CHILD_SA for `policy` on the new SA that never stalls the queue."""

    name: ClassVar[str] = "reestablish_child"

    policy: SecurityPolicy

    def build(self, engine: IkeEngine, sa: IkeSa, now: float) -> list[Effect]:
        try:
            effects = engine.create_child(sa, self.policy.name, now)
        except (NotImplementedError, ValueError) as exc:
            effects = [
                Log(
                    1,
                    "child",
                    "child_sa_not_reestablished",
                    {"unique_id": sa.unique_id, "policy": self.policy.name, "error": str(exc)},
                ),
                ChildFailed(sa.unique_id, self.policy.name, "child_sa_not_reestablished"),
            ]
        if sa.outstanding is None:  # nothing went out: let the next queued task go
            effects += engine.request_done(sa, now)
        return effects


@dataclass(repr=False)
class RetireOldTask(Task):
    """Make-before-break: queued last on the new SA, deletes the old one once all are up."""

    name: ClassVar[str] = "retire_old"

    old_spi: bytes  # the old SA's local SPI: it may be gone by then

    def build(self, engine: IkeEngine, sa: IkeSa, now: float) -> list[Effect]:
        old = engine.sas.get(self.old_spi)
        retired = []
        if old is not None:
            retired = informational.initiate_ike_delete(engine, old, now, "reauthenticated")
        return retired + engine.request_done(sa, now)


@dataclass(repr=False)
class ReauthNewTask(Task):
    """Break-before-make: waits for the old SA to be gone (`after_delete`), then builds anew."""

    name: ClassVar[str] = "reauth_new"

    policies: list[SecurityPolicy]

    def build(self, engine: IkeEngine, sa: IkeSa, now: float) -> list[Effect]:
        return reestablish(engine, sa, self.policies, now, reason="reauth").effects


def policies_of(sa: IkeSa) -> list[SecurityPolicy]:
    """The security policies of the SA's live children, each once, in order."""
    policies: list[SecurityPolicy] = []
    for child in sa.children:
        if child.state in (ChildSaState.DELETING, ChildSaState.DELETED):
            continue
        if all(p.name != child.policy.name or p.vpn != child.policy.vpn for p in policies):
            policies.append(child.policy)
    return policies


def reauth(engine: IkeEngine, sa: IkeSa, now: float) -> Reestablished:
    """Reauthenticate `sa`: new IKE SA and children from scratch, then the old one goes."""
    policies = policies_of(sa)
    make_before_break = engine.policy.make_before_break
    started = Log(
        0,
        "ike",
        "reauthenticating_ike_sa",
        {
            "vpn": sa.vpn.name if sa.vpn else None,
            "unique_id": sa.unique_id,
            "make_before_break": make_before_break,
            "children": [p.name for p in policies],
        },
    )
    engine.count("reauths")
    if make_before_break:
        done = reestablish(
            engine, sa, policies, now, reason="reauth", then=RetireOldTask(sa.local_spi)
        )
        done.effects.insert(0, started)
        return done
    effects = informational.initiate_ike_delete(
        engine, sa, now, "reauthentication", then=ReauthNewTask(policies)
    )
    return Reestablished(ok=True, effects=[started, *effects])
