"""Full collections that do not walk every SA (issue 9, shared/bus/gc_freeze.py).

The policy freezes what survives each full collection, which is safe only if a
deleted SA is freed by reference counting alone: a reference cycle among frozen
objects would stay until the policy's periodic unfreeze. So: SA churn through two
engines (establish, rekey child and IKE SA, liveness, failed AUTH, delete by
either side) leaves nothing of ours for the cyclic collector; and the policy
freezes after a full collection and, once per interval, lets one walk everything.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from ikefarm.shared.bus.gc_freeze import GcFreezePolicy
from tests.dos_helpers import guarded_pair
from tests.unit.test_engine_churn import RESPONDER_EXTRA, _cycle


@pytest.fixture
def gc_state() -> Iterator[None]:
    """Give the process back its collector as it found it."""
    enabled, debug, frozen = gc.isenabled(), gc.get_debug(), gc.get_freeze_count()
    try:
        yield
    finally:
        gc.set_debug(debug)
        if enabled:
            gc.enable()
        if frozen == 0:
            gc.unfreeze()
        gc.garbage.clear()


def test_deleted_sas_are_freed_by_reference_counting_alone(gc_state: None) -> None:
    wire = guarded_pair(RESPONDER_EXTRA)
    for index in range(6):  # warm-up: caches and per-peer tables settle
        _cycle(wire, index)
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)  # what a collection finds stays in gc.garbage
    gc.garbage.clear()
    for index in range(6, 36):  # a multiple of the cycle's pattern (failures, both deleters)
        _cycle(wire, index)
    gc.collect()
    ours = sorted({type(o).__module__ + "." + type(o).__qualname__ for o in gc.garbage})
    assert [name for name in ours if name.startswith("ikefarm.")] == []
    assert wire.responder.engine.counters["ike_sa_deleted_by_peer"] > 0
    assert wire.responder.engine.counters["auth_failed.auth_mismatch"] > 0


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


def test_policy_freezes_survivors_of_a_full_collection(gc_state: None) -> None:
    clock = [0.0]
    policy = GcFreezePolicy(interval=100.0, clock=lambda: clock[0])
    policy.install()
    try:
        gc.collect(1)  # a young collection: nothing frozen
        assert policy.freezes == 0
        kept = [_Node() for _ in range(1000)]
        gc.collect()
        assert policy.freezes == 1 and policy.unfreezes == 0
        frozen = gc.get_freeze_count()
        assert frozen >= len(kept)
        assert not any(gc.is_tracked(k) and k in gc.get_objects(2) for k in kept[:1])
        # a frozen object is still freed by reference counting
        del kept
        assert gc.get_freeze_count() < frozen
    finally:
        policy.uninstall()
    gc.collect()
    assert policy.freezes == 1  # uninstalled: no more


def test_policy_unfreezes_once_per_interval_so_frozen_cycles_are_reclaimed(
    gc_state: None,
) -> None:
    clock = [0.0]
    policy = GcFreezePolicy(interval=100.0, clock=lambda: clock[0])
    policy.install()
    try:
        a, b = _Node(), _Node()
        a.other, b.other = b, a
        gc.collect()  # frozen with the cycle alive
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.garbage.clear()
        del a, b  # now a cycle of frozen objects: reference counting cannot free it
        clock[0] = 50.0
        gc.collect()
        assert not any(isinstance(o, _Node) for o in gc.garbage)
        assert policy.unfreezes == 0
        clock[0] = 100.0  # the interval has passed: this collection walks everything
        gc.collect()
        assert sum(isinstance(o, _Node) for o in gc.garbage) == 2
        assert policy.unfreezes == 1 and policy.freezes == 3
        assert policy.last_unfreeze == 100.0
    finally:
        policy.uninstall()
