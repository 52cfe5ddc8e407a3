"""`start-action = trap`: the trap policies a worker installs, and what an ACQUIRE starts.

A security policy whose start action is `trap` (the default, seed 004) is not
negotiated at start: a trap policy for its selectors goes to the kernel service,
and the first outgoing packet that matches it with no child SA raises an
ACQUIRE. The worker that receives the ACQUIRE initiates that child as
`ikefarm initiate child-sa security-policy NAME` would (on the VPN's established
IKE SA, else with a new one). ACQUIREs for a policy whose child is being
negotiated or is up are coalesced: one initiation per policy per
`acquire-timeout`. docs/esp-dataplane.md, "Traps and ACQUIRE".

Pure code (no I/O, no clock): the ike service calls it with the time.
"""

from __future__ import annotations

from dataclasses import dataclass

from ikefarm.shared.ikev2 import management
from ikefarm.shared.ikev2.effects import InstallTrap
from ikefarm.shared.ikev2.engine import IkeEngine
from ikefarm.shared.ikev2.policy import SecurityPolicy, VpnPolicy
from ikefarm.shared.ikev2.sa import ChildSaState


def start_traps(engine: IkeEngine) -> list[InstallTrap]:
    """The trap of every `start-action = trap` policy whose VPN names both addresses.

    A VPN with `remote-address = "any"` (a responder for roaming peers) or no
    local address has no address to send to or from: no trap."""
    traps: list[InstallTrap] = []
    for vpn in engine.policy.vpns:
        if vpn.remote_address == "any" or not vpn.local_address:
            continue
        for policy in vpn.security_policies:
            if policy.start_action != "trap":
                continue
            local = policy.local_ts.resolve(vpn.local_address)
            remote = policy.remote_ts.resolve(vpn.remote_address)
            if local is None or remote is None:
                continue
            traps.append(
                InstallTrap(
                    vpn=vpn.name,
                    name=policy.name,
                    reqid=policy.reqid,
                    mode=policy.mode,
                    local=vpn.local_address,
                    remote=vpn.remote_address,
                    local_ts=(str(local),),
                    remote_ts=(str(remote),),
                )
            )
    return traps


def policy_by_reqid(engine: IkeEngine, reqid: int) -> tuple[VpnPolicy, SecurityPolicy] | None:
    for vpn in engine.policy.vpns:
        for policy in vpn.security_policies:
            if policy.reqid == reqid:
                return vpn, policy
    return None


def _child_up(engine: IkeEngine, vpn: VpnPolicy, policy: SecurityPolicy) -> bool:
    """A live child of this policy exists (installed, being installed or rekeyed)."""
    for sa in engine.sas.values():
        if sa.vpn is None or sa.vpn.name != vpn.name or not management._live(sa):
            continue
        for child in sa.children:
            if child.policy.name == policy.name and child.state not in (
                ChildSaState.DELETING,
                ChildSaState.DELETED,
            ):
                return True
    return False


@dataclass(frozen=True)
class AcquireResult:
    """What one ACQUIRE did: `initiated`, or why not (`coalesced`, `child_exists`,
    `unknown_reqid`, `refused`), with the initiation's outcome when there was one."""

    action: str
    outcome: management.Outcome | None = None


class AcquireGate:
    """Initiations started by ACQUIREs, by reqid, so duplicates are coalesced.

    An entry lasts `timeout` seconds (`acquire-timeout`): after that an ACQUIRE
    for the same policy starts a new initiation (the first one failed or hangs).
    The table holds at most one entry per configured policy."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.pending: dict[int, float] = {}  # reqid -> until when duplicates are coalesced

    def acquire(self, engine: IkeEngine, reqid: int, now: float) -> AcquireResult:
        found = policy_by_reqid(engine, reqid)
        if found is None:
            return AcquireResult("unknown_reqid")
        vpn, policy = found
        until = self.pending.get(reqid)
        if until is not None and now < until:
            return AcquireResult("coalesced")
        self.pending.pop(reqid, None)
        if _child_up(engine, vpn, policy):
            return AcquireResult("child_exists")
        try:
            outcome = management.initiate_child(engine, vpn, policy, now)
        except management.CommandError as exc:
            return AcquireResult("refused", management.Outcome.failed(str(exc)))
        if not outcome.ok:
            return AcquireResult("refused", outcome)
        self.pending[reqid] = now + self.timeout
        return AcquireResult("initiated", outcome)
