"""Dead peer detection (seed 004, RFC 7296 2.4): liveness checks and dpd-action.

Proof of liveness is any verified protected IKE message from the peer
(`IkeSa.last_seen`, set by the engine) or inbound IPsec traffic on one of the
SA's children: the kernel service reports the counters of the children whose
counters moved in periodic batches (docs/kernel-counters.md) and the ike worker
hands each to `child_counters()`.

If nothing has proven the peer alive for `dpd-delay` (0 disables DPD) and our
request window is free, an empty INFORMATIONAL request is sent. It is
retransmitted like every request (seed 004, `retransmit.py`); when the last try
times out the engine calls `peer_dead()`: the IKE SA is removed and each child's
dpd-action applies:

  clear    the child is closed, nothing else;
  restart  (default) a fresh IKE SA is initiated at once to the peer's last
           known address, with those children (the first in IKE_AUTH, the others
           by CREATE_CHILD_SA once it is up); for a VPN that accepts any remote
           address or identity, the ones the peer last had are used;
  trap     a trap policy is installed (`InstallTrap`) so matching traffic
           triggers a new negotiation on demand.

An SA whose own Delete ran out of retransmissions is simply removed: the
operator (or a rekey) wanted it gone anyway.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ikefarm.shared.ikev2.effects import Effect, InstallTrap, Log
from ikefarm.shared.ikev2.exchanges import informational
from ikefarm.shared.ikev2.policy import SecurityPolicy
from ikefarm.shared.ikev2.sa import ChildSa, ChildSaState, IkeSa, IkeSaState

if TYPE_CHECKING:
    from ikefarm.shared.ikev2.engine import IkeEngine


def _idle_since(sa: IkeSa) -> float:
    assert sa.established_at is not None
    return max(sa.last_seen, sa.established_at)


def _delay(sa: IkeSa) -> float:
    return sa.vpn.dpd_delay if sa.vpn is not None else 0.0


def deadline(sa: IkeSa) -> float | None:
    """When the next liveness check is due; None while one cannot or need not be sent."""
    delay = _delay(sa)
    if not delay or sa.state != IkeSaState.ESTABLISHED or sa.established_at is None:
        return None
    if sa.outstanding is not None or sa.queued:
        return None  # a request is in flight: its retransmissions detect a dead peer
    return _idle_since(sa) + delay


def on_timer(engine: IkeEngine, sa: IkeSa, now: float) -> list[Effect]:
    due = deadline(sa)
    if due is None or now < due:
        return []
    engine.count("dpd_checks")
    effects: list[Effect] = [
        Log(
            1,
            "ike",
            "dpd_check_sent",
            {
                "unique_id": sa.unique_id,
                "vpn": sa.vpn.name if sa.vpn else None,
                "idle": round(now - _idle_since(sa), 3),
            },
        )
    ]
    return effects + informational.send_liveness(engine, sa, now)


def traffic_seen(engine: IkeEngine, unique_id: int, now: float) -> bool:
    """Inbound IPsec traffic on the child with this unique id: its peer is alive.

    True if the child is ours. O(1): the engine's child index (`find_child`), not
    a walk over the SAs. A liveness check already in flight still completes (or
    fails) on its own, like strongSwan.
    """
    found = engine.find_child(unique_id)
    if found is None:
        return False
    _alive(engine, found[0], now)
    return True


def _alive(engine: IkeEngine, sa: IkeSa, now: float) -> None:
    sa.last_seen = max(sa.last_seen, now)
    engine.count("dpd_traffic_seen")


def child_counters(
    engine: IkeEngine,
    unique_id: int,
    counters: tuple[int, int, int, int],
    now: float,
) -> bool:
    """The kernel's (bytes_in, packets_in, bytes_out, packets_out) of one child SA.

    Kept on the child for `show ike-sa details`; inbound packets counted since the
    previous report are IPsec traffic from the peer (RFC 7296 2.4): no DPD check
    is due while they keep coming. Outbound traffic alone proves nothing. True if
    the child is ours.
    """
    found = engine.find_child(unique_id)
    if found is None:
        return False
    sa, child = found
    bytes_in, packets_in, bytes_out, packets_out = counters
    moved_in = packets_in != child.packets_in and packets_in > 0
    child.bytes_in, child.packets_in = bytes_in, packets_in
    child.bytes_out, child.packets_out = bytes_out, packets_out
    if moved_in:
        _alive(engine, sa, now)
    return True


def peer_dead(engine: IkeEngine, sa: IkeSa, now: float) -> list[Effect]:
    """The peer did not answer our request in time: drop the SA, apply each dpd-action."""
    if sa.state == IkeSaState.DELETING or sa.delete_reason is not None:
        engine.count("delete_unanswered")
        effects = engine.remove_sa(sa, "delete not answered", now)
        return effects + informational.run_after_delete(engine, sa, now)
    if sa.established_at is None or informational.successor_of(sa) is not None:
        return engine.remove_sa(sa, "peer not responding", now)
    children = [c for c in sa.children if c.state != ChildSaState.DELETED]
    engine.count("dpd_peer_dead")
    vpn_name = sa.vpn.name if sa.vpn else None
    effects: list[Effect] = [
        Log(
            0,
            "ike",
            "peer_dead",
            {
                "vpn": vpn_name,
                "unique_id": sa.unique_id,
                "peer": str(sa.remote),
                "actions": {c.name: c.policy.dpd_action for c in children},
            },
        )
    ]
    effects += engine.remove_sa(sa, "peer not responding", now)
    restart: list[SecurityPolicy] = []
    for child in children:
        action = child.policy.dpd_action
        engine.count(f"dpd_action.{action}")
        if action == "trap":
            effects.append(trap_effect(sa, child))
        elif action == "restart" and child.policy not in restart:
            restart.append(child.policy)
    if restart:
        effects += restart_sa(engine, sa, restart, now, reason="dpd")
    effects += informational.run_after_delete(engine, sa, now)
    return effects


def trap_effect(sa: IkeSa, child: ChildSa) -> InstallTrap:
    """The trap policy of a child's security policy, between the SA's current addresses."""
    policy = child.policy
    return InstallTrap(
        vpn=policy.vpn,
        name=policy.name,
        reqid=policy.reqid,
        mode=child.mode,
        local=sa.local.address,
        remote=sa.remote.address,
        local_ts=tuple(str(s) for s in child.local_ts),
        remote_ts=tuple(str(s) for s in child.remote_ts),
    )


def restart_sa(
    engine: IkeEngine, old: IkeSa, policies: list[SecurityPolicy], now: float, *, reason: str
) -> list[Effect]:
    """Initiate a fresh IKE SA to where `old` was, negotiating `policies` (dpd restart, reauth)."""
    from ikefarm.shared.ikev2.exchanges.reauth import reestablish

    return reestablish(engine, old, policies, now, reason=reason).effects
