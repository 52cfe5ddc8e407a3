"""CREATE_CHILD_SA between two engines: new children, child and IKE rekeys, PFS, collisions."""

from __future__ import annotations

from ikefarm.shared.ikev2.constants import ExchangeType
from ikefarm.shared.ikev2.effects import DeleteChildSa, InstallChildSa, SendDatagram
from ikefarm.shared.ikev2.message import parse_message
from ikefarm.shared.ikev2.sa import ChildSaState, IkeSaState
from tests.engine_helpers import pair

PFS_ESP = """
[[ike.ipsec-policy-template]]
name = "pfs"
[[ike.ipsec-policy-template.esp-proposal]]
aead-alg = "aes256-gcm-128"
dh-group = ["ecp256", "x25519"]
"""


def established(wire):  # type: ignore[no-untyped-def]
    wire.run(wire.initiator.engine.initiate("hq", "net", wire.now), wire.initiator)
    (i_sa,) = wire.initiator.engine.sas.values()
    (r_sa,) = wire.responder.engine.sas.values()
    assert i_sa.state == r_sa.state == IkeSaState.ESTABLISHED
    return i_sa, r_sa


def live_children(sa):  # type: ignore[no-untyped-def]
    return [c for c in sa.children if c.state != ChildSaState.DELETED]


def assert_matching_children(i_sa, r_sa) -> None:  # type: ignore[no-untyped-def]
    mine = {(c.spi_in, c.spi_out) for c in live_children(i_sa)}
    theirs = {(c.spi_out, c.spi_in) for c in live_children(r_sa)}
    assert mine == theirs


def test_child_rekey_by_initiator_replaces_the_child_on_both_sides() -> None:
    wire = pair()
    i_sa, r_sa = established(wire)
    (old,) = i_sa.children
    wire.run(wire.initiator.engine.rekey_child(i_sa, old, wire.now), wire.initiator)
    (new,) = live_children(i_sa)
    assert new.spi_in != old.spi_in and new.rekeyed_from == old.unique_id
    assert_matching_children(i_sa, r_sa)
    (peer_new,) = live_children(r_sa)
    assert peer_new.keys == new.keys
    deleted = [e.spi_in for e in wire.responder.effects if isinstance(e, DeleteChildSa)]
    assert old.spi_out in deleted  # the responder uninstalled its side of the old child


def test_child_rekey_by_responder_uses_exchange_roles_for_keys() -> None:
    wire = pair()
    i_sa, r_sa = established(wire)
    (old,) = r_sa.children
    wire.run(wire.responder.engine.rekey_child(r_sa, old, wire.now), wire.responder)
    (new,) = live_children(r_sa)
    (peer,) = live_children(i_sa)
    assert new.initiated_by_us and not peer.initiated_by_us
    assert_matching_children(i_sa, r_sa)
    install = [e.child for e in wire.responder.effects if isinstance(e, InstallChildSa)][-1]
    peer_install = [e.child for e in wire.initiator.effects if isinstance(e, InstallChildSa)][-1]
    assert install.encr_key_out == peer_install.encr_key_in
    assert install.encr_key_in == peer_install.encr_key_out


def test_child_rekey_with_pfs_computes_a_new_dh() -> None:
    wire = pair(PFS_ESP, PFS_ESP, responder_vpn='ipsec-policy = { template = "pfs" }',
                initiator_vpn='ipsec-policy = { template = "pfs" }')  # fmt: skip
    i_sa, r_sa = established(wire)
    before = wire.responder.engine.counters["dh_computed"]
    (old,) = i_sa.children
    wire.run(wire.initiator.engine.rekey_child(i_sa, old, wire.now), wire.initiator)
    assert wire.responder.engine.counters["dh_computed"] == before + 1
    (new,) = live_children(i_sa)
    assert new.algorithms.dh == 19
    assert_matching_children(i_sa, r_sa)


def test_new_child_on_an_established_ike_sa() -> None:
    wire = pair()
    i_sa, r_sa = established(wire)
    wire.run(wire.initiator.engine.create_child(i_sa, "net", wire.now), wire.initiator)
    assert len(live_children(i_sa)) == 2 and len(live_children(r_sa)) == 2
    assert_matching_children(i_sa, r_sa)


def test_ike_rekey_moves_children_and_deletes_the_old_sa() -> None:
    wire = pair()
    i_sa, _r_sa = established(wire)
    children = [c.spi_in for c in i_sa.children]
    wire.run(wire.initiator.engine.rekey_ike(i_sa, wire.now), wire.initiator)
    (new_i,) = wire.initiator.engine.sas.values()
    (new_r,) = wire.responder.engine.sas.values()
    assert new_i.spi_i != i_sa.spi_i and (new_i.spi_i, new_i.spi_r) == (new_r.spi_i, new_r.spi_r)
    assert new_i.is_initiator and not new_r.is_initiator
    assert [c.spi_in for c in new_i.children] == children
    assert new_i.keys == new_r.keys and new_i.keys != i_sa.keys
    assert new_r.spi_r[:2] == (1).to_bytes(2, "big")  # still routed to the same shard
    assert not any(isinstance(e, DeleteChildSa) for e in wire.responder.effects)
    # the new SA works: a child rekey over it
    (child,) = new_i.children
    wire.run(wire.initiator.engine.rekey_child(new_i, child, wire.now), wire.initiator)
    assert_matching_children(new_i, new_r)


def test_ike_rekey_by_the_responder_makes_it_the_new_initiator() -> None:
    wire = pair()
    _i_sa, r_sa = established(wire)
    wire.run(wire.responder.engine.rekey_ike(r_sa, wire.now), wire.responder)
    (new_i,) = wire.initiator.engine.sas.values()
    (new_r,) = wire.responder.engine.sas.values()
    assert new_r.is_initiator and not new_i.is_initiator
    assert new_r.spi_i[:2] == (1).to_bytes(2, "big")
    assert len(new_i.children) == 1 and len(new_r.children) == 1


def crossing(wire, start_i, start_r):  # type: ignore[no-untyped-def]
    """Send both requests before either side sees the other's, then deliver everything."""
    held: list[tuple] = []

    def hold(side, effect):  # type: ignore[no-untyped-def]
        held.append((side, effect))
        return True

    wire.run(start_i, wire.initiator, drop=hold)
    wire.run(start_r, wire.responder, drop=hold)
    assert len(held) == 2
    requests, held = held, []
    for side, request in requests:  # each request reaches the other side ...
        wire.run(
            [request], side, drop=lambda s, e, request=request: e is not request and hold(s, e)
        )
    assert len(held) == 2  # ... and both responses are in flight at once
    for side, effect in held:
        wire.run([effect], side)


def test_simultaneous_child_rekey_ends_with_one_new_child_on_both_sides() -> None:
    for _attempt in range(6):  # both nonce orders get exercised across attempts
        wire = pair()
        i_sa, r_sa = established(wire)
        (i_old,) = i_sa.children
        (r_old,) = r_sa.children
        crossing(
            wire,
            wire.initiator.engine.rekey_child(i_sa, i_old, wire.now),
            wire.responder.engine.rekey_child(r_sa, r_old, wire.now),
        )
        assert len(live_children(i_sa)) == 1 and len(live_children(r_sa)) == 1
        assert_matching_children(i_sa, r_sa)
        assert wire.initiator.engine.counters["child_rekey_collisions"] == 1
        assert wire.responder.engine.counters["child_rekey_collisions"] == 1
        (survivor,) = live_children(i_sa)
        assert survivor.spi_in != i_old.spi_in


def test_simultaneous_ike_rekey_ends_with_one_new_ike_sa_holding_the_children() -> None:
    for _attempt in range(6):
        wire = pair()
        i_sa, r_sa = established(wire)
        crossing(
            wire,
            wire.initiator.engine.rekey_ike(i_sa, wire.now),
            wire.responder.engine.rekey_ike(r_sa, wire.now),
        )
        (new_i,) = wire.initiator.engine.sas.values()
        (new_r,) = wire.responder.engine.sas.values()
        assert (new_i.spi_i, new_i.spi_r) == (new_r.spi_i, new_r.spi_r)
        assert len(new_i.children) == 1 and len(new_r.children) == 1
        assert_matching_children(new_i, new_r)


def test_rekey_of_an_unknown_child_gets_child_sa_not_found() -> None:
    wire = pair()
    i_sa, r_sa = established(wire)
    (child,) = i_sa.children
    r_sa.children.clear()  # the responder lost it
    wire.run(wire.initiator.engine.rekey_child(i_sa, child, wire.now), wire.initiator)
    assert wire.responder.engine.counters["rekey_child_not_found"] == 1
    assert live_children(i_sa) == []  # ours was useless, deleted


def test_lifetimes_trigger_rekeys() -> None:
    wire = pair()
    i_sa, r_sa = established(wire)
    (child,) = i_sa.children
    assert child.rekey_at is not None and child.expire_at is not None
    assert child.rekey_at < child.expire_at
    wire.now = child.rekey_at + 0.1
    wire.run(wire.initiator.engine.on_timer(wire.now), wire.initiator)
    assert wire.initiator.engine.counters["child_rekeys_initiated"] >= 1
    assert_matching_children(i_sa, r_sa)
    requests = [parse_message(d).header.exchange_type for a, d in wire.log]
    assert ExchangeType.CREATE_CHILD_SA in requests
    assert any(isinstance(e, SendDatagram) for e in wire.initiator.effects)


def test_first_ike_rekey_is_jittered_by_rand_time_like_later_ones() -> None:
    """The IKE SA's first rekey_at is rekey-time minus a draw from the engine's source in
    [0, rand-time], as for SAs made by a rekey: SAs established together (after a
    restart) do not all rekey at once."""
    lifetimes = (
        '[[ike.ike-policy-template]]\nname = "jit"\nrekey-time = "1000s"\nrand-time = "100s"\n'
        "[[ike.ike-policy-template.ike-proposal]]\n"
        'aead-alg = "aes256-gcm-128"\nprf-alg = "hmac-sha384"\ndh-group = "x25519"\n'
    )
    vpn = 'ike-policy = { template = "jit" }'
    wire = pair(lifetimes, lifetimes, responder_vpn=vpn, initiator_vpn=vpn)
    draws: list[tuple[float, float]] = []  # the IKE SA ones: [0, rand-time]
    fractions = iter([0.25, 0.5, 0.75, 1.0])

    def uniform(low: float, high: float) -> float:
        if high != 100.0:
            return low  # a child's jitter, a retransmission's
        draws.append((low, high))
        return low + next(fractions) * (high - low)

    for side in (wire.initiator, wire.responder):
        side.engine.uniform = uniform
    i_sa, r_sa = established(wire)
    assert draws == [(0.0, 100.0), (0.0, 100.0)]  # one draw per side's IKE SA
    jitters = {round(sa.established_at + 1000.0 - sa.rekey_at, 6) for sa in (i_sa, r_sa)}
    assert jitters == {25.0, 50.0}
    assert i_sa.expire_at == i_sa.established_at + 1000.0 + 100.0  # over-time: 10% of rekey
    # an SA made by a rekey draws the same way
    draws.clear()
    wire.run(wire.initiator.engine.rekey_ike(i_sa, wire.now), wire.initiator)
    (new_i,) = wire.initiator.engine.sas.values()
    assert draws == [(0.0, 100.0), (0.0, 100.0)]  # both sides' new SA
    assert new_i.established_at + 1000.0 - new_i.rekey_at in (75.0, 100.0)


def test_a_child_delete_queued_behind_our_ike_rekey_goes_out_on_the_new_sa() -> None:
    """The old IKE SA is deleted right after the rekey; child work queued on it follows the
    children to the new SA instead of being dropped with it (RFC 7296 2.18)."""
    wire = pair()
    i_sa, r_sa = established(wire)
    (child,) = i_sa.children
    effects = wire.initiator.engine.rekey_ike(i_sa, wire.now)
    effects += wire.initiator.engine.delete_child(i_sa, child, wire.now)
    assert len(i_sa.queued) == 1
    wire.run(effects, wire.initiator)
    (i_new,) = wire.initiator.engine.sas.values()
    (r_new,) = wire.responder.engine.sas.values()
    assert i_new is not i_sa and r_new is not r_sa
    assert i_new.children == [] and r_new.children == []
    assert i_new.outstanding is None and i_new.queued == []
    deleted = [e for e in wire.initiator.effects if isinstance(e, DeleteChildSa)]
    assert [e.unique_id for e in deleted] == [child.unique_id]
