"""start-action = trap on the ike side (shared/ikev2/traps.py): which traps a worker
installs, and ACQUIREs turned into one initiation per policy (duplicates coalesced).

Two real engines on the in-memory wire of tests/engine_helpers.py negotiate."""

from __future__ import annotations

from ikefarm.shared.ikev2.effects import InstallTrap, SendDatagram
from ikefarm.shared.ikev2.sa import ChildSaState
from ikefarm.shared.ikev2.traps import AcquireGate, start_traps
from tests.engine_helpers import pair

NONE_POLICY = """
[[ike.vpn.security-policy]]
name = "quiet"
local-ts = { subnet = "10.201.0.0/24" }
remote-ts = { subnet = "10.101.0.0/24" }
"""


def test_traps_for_start_action_trap_policies_of_vpns_with_a_remote_address() -> None:
    wire = pair(initiator_vpn='ipsec-policy = { start-action = "trap" }')
    (trap,) = start_traps(wire.initiator.engine)
    net = wire.initiator.engine.policy.vpn("hq").security_policies[0]
    assert trap == InstallTrap(
        vpn="hq",
        name="net",
        reqid=net.reqid,
        mode="tunnel",
        local="192.0.2.2",
        remote="192.0.2.1",
        local_ts=("10.200.0.0/24",),
        remote_ts=("10.100.0.0/24",),
    )
    # the responder's VPN takes any remote address: nothing to trap toward
    assert start_traps(wire.responder.engine) == []


def test_start_action_none_installs_no_trap() -> None:
    wire = pair(initiator_vpn='ipsec-policy = { start-action = "none" }')
    assert start_traps(wire.initiator.engine) == []


def test_an_acquire_initiates_the_child_and_duplicates_are_coalesced() -> None:
    wire = pair()
    engine = wire.initiator.engine
    reqid = engine.policy.vpn("hq").security_policies[0].reqid
    gate = AcquireGate(timeout=30.0)
    first = gate.acquire(engine, reqid, wire.now)
    assert first.action == "initiated" and first.outcome is not None
    assert any(isinstance(e, SendDatagram) for e in first.outcome.effects)
    # the negotiation has not run yet: a second ACQUIRE starts nothing
    again = gate.acquire(engine, reqid, wire.now + 1)
    assert again.action == "coalesced" and again.outcome is None
    assert len(engine.sas) == 1
    wire.run(first.outcome.effects, wire.initiator)
    (sa,) = engine.sas.values()
    assert [(c.name, c.state) for c in sa.children] == [("net", ChildSaState.INSTALLED)]
    # past acquire-timeout, with the child up: still nothing new
    late = gate.acquire(engine, reqid, wire.now + 31)
    assert late.action == "child_exists" and len(engine.sas) == 1


def test_an_acquire_after_a_lost_initiation_tries_again_after_the_timeout() -> None:
    wire = pair()
    engine = wire.initiator.engine
    reqid = engine.policy.vpn("hq").security_policies[0].reqid
    gate = AcquireGate(timeout=30.0)
    assert gate.acquire(engine, reqid, wire.now).action == "initiated"  # never sent anywhere
    assert gate.acquire(engine, reqid, wire.now + 29.9).action == "coalesced"
    assert gate.acquire(engine, reqid, wire.now + 30.0).action == "initiated"


def test_an_acquire_uses_the_established_ike_sa_for_another_policy() -> None:
    wire = pair(NONE_POLICY.replace("10.201", "10.999").replace("10.101", "10.201")
                .replace("10.999", "10.101"), NONE_POLICY)  # fmt: skip
    engine = wire.initiator.engine
    gate = AcquireGate(timeout=30.0)
    net, quiet = engine.policy.vpn("hq").security_policies
    first = gate.acquire(engine, net.reqid, wire.now)
    assert first.outcome is not None
    wire.run(first.outcome.effects, wire.initiator)
    second = gate.acquire(engine, quiet.reqid, wire.now)
    assert second.action == "initiated" and second.outcome is not None
    assert second.outcome.on_existing
    wire.run(second.outcome.effects, wire.initiator)
    (sa,) = engine.sas.values()
    assert sorted(c.name for c in sa.children) == ["net", "quiet"]


def test_an_unknown_reqid_starts_nothing() -> None:
    wire = pair()
    gate = AcquireGate(timeout=30.0)
    for reqid in (0, 99, 2**32 - 1):
        assert gate.acquire(wire.initiator.engine, reqid, wire.now).action == "unknown_reqid"
    assert len(wire.initiator.engine.sas) == 0 and gate.pending == {}
