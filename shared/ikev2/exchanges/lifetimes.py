"""SA lifetimes (seed 004 templates; strongSwan's rekey/over/rand times): rekey before expiry.

A child is rekeyed at `rekey-time` minus a random part of `rand-time` and
deleted at `life-time` if it is still there; an IKE SA is rekeyed at its
`rekey-time` minus a random part of `rand-time` (from its first establishment
on, so SAs set up together after a restart do not all rekey at once) and
deleted at `rekey-time + over-time`. Both ends
run these timers; the jitter makes collisions rare and 2.8.1/2.8.2 resolve them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ikefarm.shared.ikev2.effects import Effect, Log
from ikefarm.shared.ikev2.policy import VpnPolicy
from ikefarm.shared.ikev2.sa import ChildSaState, IkeSa, IkeSaState

if TYPE_CHECKING:
    from ikefarm.shared.ikev2.engine import IkeEngine


_ALIVE = (ChildSaState.INSTALLED, ChildSaState.REKEYED, ChildSaState.REKEYING)


def ike_rekey_after(engine: IkeEngine, vpn: VpnPolicy | None) -> float | None:
    """Seconds from establishment to an IKE SA's rekey: `rekey-time` minus a random part of
    `rand-time`, drawn from the engine's injectable source (strongSwan's rand_time)."""
    if vpn is None or not vpn.rekey_time:
        return None
    jitter = engine.uniform(0.0, vpn.rand_time) if vpn.rand_time else 0.0
    return max(0.0, vpn.rekey_time - jitter)


def start_ike_sa(engine: IkeEngine, sa: IkeSa, now: float) -> None:
    """Set the rekey and expiry times of an IKE SA established (or made by a rekey) at `now`."""
    vpn = sa.vpn
    after = ike_rekey_after(engine, vpn)
    sa.rekey_at = now + after if after is not None else None
    sa.expire_at = now + vpn.rekey_time + vpn.over_time if vpn and vpn.rekey_time else None


def on_timer(engine: IkeEngine, sa: IkeSa, now: float) -> list[Effect]:
    effects: list[Effect] = []
    if sa.state == IkeSaState.ESTABLISHED and sa.expire_at is not None and now >= sa.expire_at:
        engine.count("ike_sa_expired")
        effects.append(Log(1, "ike", "ike_sa_expired", {"unique_id": sa.unique_id}))
        return effects + engine.delete_ike(sa, now, "lifetime expired")
    if sa.state == IkeSaState.ESTABLISHED and sa.rekey_at is not None and now >= sa.rekey_at:
        sa.rekey_at = None
        return effects + engine.rekey_ike(sa, now)
    if sa.state not in (IkeSaState.ESTABLISHED, IkeSaState.REKEYING):
        return effects
    for child in list(sa.children):
        if child.state in _ALIVE and child.expire_at is not None and now >= child.expire_at:
            child.expire_at = None
            engine.count("child_sa_expired")
            effects.append(Log(1, "child", "child_sa_expired", {"unique_id": child.unique_id}))
            effects += engine.delete_child(sa, child, now)
            continue
        if (
            child.state == ChildSaState.INSTALLED
            and child.rekey_at is not None
            and now >= child.rekey_at
        ):
            child.rekey_at = None
            effects += engine.rekey_child(sa, child, now)
    return effects


def deadline(sa: IkeSa) -> float | None:
    """The earliest time `on_timer` acts on, in the states it acts in: a time it would skip
    (an SA being deleted, a child already going) must not keep the timers due forever."""
    times: list[float] = []
    if sa.state == IkeSaState.ESTABLISHED:
        times += [t for t in (sa.rekey_at, sa.expire_at) if t is not None]
    if sa.state in (IkeSaState.ESTABLISHED, IkeSaState.REKEYING):
        for child in sa.children:
            if child.state in _ALIVE and child.expire_at is not None:
                times.append(child.expire_at)
            if child.state == ChildSaState.INSTALLED and child.rekey_at is not None:
                times.append(child.rekey_at)
    return min(times) if times else None


def kernel_expire(engine: IkeEngine, unique_id: int, hard: bool, now: float) -> list[Effect]:
    """The dataplane says a child SA reached a lifetime (KernelExpire, either backend):
    soft -> rekey it as its `rekey-time` would, hard -> delete it with the peer (the
    kernel has dropped or will drop the SA). A child that is not ours, or already on
    its way out, is left alone: its rekey or delete is running."""
    found = engine.find_child(unique_id)
    if found is None:
        engine.count("kernel_expire.unknown_child")
        return []
    sa, child = found
    if sa.state not in (IkeSaState.ESTABLISHED, IkeSaState.REKEYING):
        engine.count("kernel_expire.ike_sa_busy")
        return []
    kind = "hard" if hard else "soft"
    fields = {"unique_id": child.unique_id, "ike_unique_id": sa.unique_id, "kind": kind}
    if hard and child.state in _ALIVE:
        child.expire_at = None
        engine.count("kernel_expire.hard")
        log = Log(1, "child", "child_sa_kernel_expire", fields)
        return [log, *engine.delete_child(sa, child, now)]
    if not hard and child.state == ChildSaState.INSTALLED and not child.rekey_in_flight:
        child.rekey_at = None
        engine.count("kernel_expire.soft")
        log = Log(1, "child", "child_sa_kernel_expire", fields)
        return [log, *engine.rekey_child(sa, child, now)]
    engine.count(f"kernel_expire.{kind}_ignored")
    return []
