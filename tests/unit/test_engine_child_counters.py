"""Kernel counters fed to the engine: DPD liveness (RFC 7296 2.4), show, the O(1) child index."""

from __future__ import annotations

from typing import Any

import pytest

from ikefarm.shared.ikev2.effects import DeleteChildSa, Log
from ikefarm.shared.ikev2.exchanges import dpd, lifetimes
from ikefarm.shared.ikev2.sa import ChildSaState, SaTable
from ikefarm.shared.ikev2.show import format_details, ike_sa_row
from tests.unit.test_engine_dpd import dpd_pair, tick


def test_inbound_counters_that_move_postpone_the_dpd_check() -> None:
    wire = dpd_pair()
    engine = wire.initiator.engine
    (sa,) = engine.sas.values()
    child = sa.children[0].unique_id
    start = wire.now
    assert dpd.deadline(sa) == start + 10
    # traffic every 4 s (the kernel's batches): the check never becomes due
    for step in range(1, 6):
        assert dpd.child_counters(engine, child, (100 * step, step, 50, 1), start + 4 * step)
        assert dpd.deadline(sa) == start + 4 * step + 10
        assert tick(wire, wire.initiator, start + 4 * step) == []
    assert engine.counters["dpd_checks"] == 0
    assert engine.counters["dpd_traffic_seen"] == 5


def test_unchanged_or_outbound_only_counters_are_no_proof_of_liveness() -> None:
    wire = dpd_pair()
    engine = wire.initiator.engine
    (sa,) = engine.sas.values()
    child = sa.children[0].unique_id
    start = wire.now
    assert dpd.child_counters(engine, child, (300, 3, 0, 0), start + 2)
    assert dpd.deadline(sa) == start + 12
    # the same inbound counters again, outbound moving: only what the peer sent counts
    assert dpd.child_counters(engine, child, (300, 3, 900, 9), start + 8)
    assert dpd.deadline(sa) == start + 12
    out = tick(wire, wire.initiator, start + 12)
    assert [e.event for e in out if isinstance(e, Log)] == ["dpd_check_sent"]
    assert not dpd.child_counters(engine, 999_999, (1, 1, 1, 1), start + 12)


def test_show_ike_sa_details_has_the_counters() -> None:
    wire = dpd_pair()
    engine = wire.initiator.engine
    (sa,) = engine.sas.values()
    dpd.child_counters(engine, sa.children[0].unique_id, (8400, 100, 4200, 50), wire.now)
    row = ike_sa_row(sa, wire.now)["children"][0]
    assert (row["bytes_in"], row["packets_in"], row["bytes_out"], row["packets_out"]) == (
        8400,
        100,
        4200,
        50,
    )
    text = format_details([ike_sa_row(sa, wire.now)])
    assert "8400 bytes, 100 packets" in text and "4200 bytes, 50 packets" in text


def test_traffic_seen_does_not_walk_the_sas(monkeypatch: pytest.MonkeyPatch) -> None:
    """One child's report costs a dict lookup and that IKE SA's children, whatever the
    number of SAs: a walk over the engine's SA table fails the test."""
    wire = dpd_pair()
    engine = wire.initiator.engine
    (sa,) = engine.sas.values()
    child = sa.children[0].unique_id

    def walked(*_args: Any) -> Any:
        raise AssertionError("the SA table was walked")

    for name in ("values", "items", "keys", "__iter__"):
        monkeypatch.setattr(SaTable, name, walked)
    assert dpd.traffic_seen(engine, child, wire.now + 1)
    assert dpd.child_counters(engine, child, (1, 1, 0, 0), wire.now + 2)
    assert not dpd.traffic_seen(engine, 424_242, wire.now + 3)
    assert sa.last_seen == wire.now + 2


def test_a_child_is_found_after_an_ike_rekey_moved_it() -> None:
    wire = dpd_pair()
    engine = wire.initiator.engine
    (old,) = engine.sas.values()
    child = old.children[0].unique_id
    wire.run(engine.rekey_ike(old, wire.now), wire.initiator)
    (new,) = [s for s in engine.sas.values() if s is not old]
    assert [c.unique_id for c in new.children] == [child]
    found = engine.find_child(child)
    assert found is not None and found[0] is new
    assert dpd.traffic_seen(engine, child, wire.now + 5)
    assert new.last_seen == wire.now + 5


def test_deleted_children_leave_the_index() -> None:
    wire = dpd_pair()
    engine = wire.initiator.engine
    (sa,) = engine.sas.values()
    child = sa.children[0]
    wire.run(engine.delete_child(sa, child, wire.now), wire.initiator)
    assert sa.children == []
    assert engine.find_child(child.unique_id) is None
    assert child.unique_id not in engine._child_index


def test_soft_kernel_expire_rekeys_the_child_on_both_sides() -> None:
    wire = dpd_pair()
    engine = wire.initiator.engine
    (i_sa,) = engine.sas.values()
    (r_sa,) = wire.responder.engine.sas.values()
    (old,) = i_sa.children
    out = lifetimes.kernel_expire(engine, old.unique_id, False, wire.now)
    assert next(e.event for e in out if isinstance(e, Log)) == "child_sa_kernel_expire"
    wire.run(out, wire.initiator)
    (new,) = [c for c in i_sa.children if c.state == ChildSaState.INSTALLED]
    assert new.rekeyed_from == old.unique_id
    assert {c.spi_out for c in r_sa.children} == {new.spi_in}
    assert engine.counters["kernel_expire.soft"] == 1
    # the old child is gone: a late EXPIRE for it changes nothing
    assert lifetimes.kernel_expire(engine, old.unique_id, False, wire.now) == []
    assert engine.counters["kernel_expire.unknown_child"] == 1


def test_hard_kernel_expire_deletes_the_child_with_the_peer() -> None:
    wire = dpd_pair()
    engine = wire.initiator.engine
    (i_sa,) = engine.sas.values()
    (r_sa,) = wire.responder.engine.sas.values()
    (child,) = i_sa.children
    out = lifetimes.kernel_expire(engine, child.unique_id, True, wire.now)
    wire.run(out, wire.initiator)
    assert i_sa.children == [] and r_sa.children == []
    deleted = [e.spi_in for e in wire.initiator.effects if isinstance(e, DeleteChildSa)]
    assert child.spi_in in deleted
    assert engine.counters["kernel_expire.hard"] == 1
