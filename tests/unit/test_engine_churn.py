"""SA churn: whatever an engine keeps for an IKE SA is gone once the SA is deleted.

A worker's memory must not grow with the number of SAs it has completed and
deleted, only with the number it holds. Two engines establish an IKE SA (the
initiator behind a NAPT, so it floats to port 4500 after IKE_SA_INIT, RFC 7296
2.23, as strongSwan does behind a NAT or with MOBIKE), rekey its child and
itself, check liveness, fail an authentication now and then, and delete it,
hundreds of times, each from another peer address. After a warm-up, every container
the engines own (per-peer tables included) must come back to its size, and the memory
traced to ikefarm's code must stay flat.
"""

from __future__ import annotations

import gc
import tracemalloc
from pathlib import Path

import pytest

import ikefarm.services
import ikefarm.shared
from ikefarm.shared.ikev2 import engine as engine_module
from ikefarm.shared.ikev2 import sa as sa_module
from ikefarm.shared.ikev2.engine import IkeEngine
from ikefarm.shared.ikev2.exchanges import informational
from ikefarm.shared.ikev2.sa import IkeSaState
from tests.dos_helpers import guarded_pair
from tests.engine_helpers import Nat, Wire, assert_bounded_caches, container_sizes

PSK = b"shared-secret-0123456789"
# every per-peer table the worker keeps: backoffs and incoming exchange rates (seed 000)
RESPONDER_EXTRA = """
[ike.session.backoff-timeouts]
init-phase-failure = 5
auth-phase-failure = 5
[ike.session.full-open.incoming-exchange-max-rates]
keepalive = "100/10"
ike-rekey = "100/10"
ipsec-rekey = "100/10"
"""
WARM_UP = 30
# multiples of the cycle's pattern (deleted by either side, a failure every third)
CYCLES = 300
TRACED_CYCLES = 90  # tracing makes a cycle about 7 times slower
TRACED_FRAMES = 3
BYTES_PER_CYCLE = 50


def _peer(index: int) -> str:
    """A new public address for each SA: 500 of them in the documentation ranges."""
    return f"{('198.51.100', '203.0.113')[index // 250 % 2]}.{index % 250 + 1}"


def _cycle(wire: Wire, index: int) -> None:
    """One IKE SA from IKE_SA_INIT to its deletion, each from another peer address (its
    NAPT's); every third one fails its AUTH."""
    initiator, responder = wire.initiator.engine, wire.responder.engine
    wire.now += 100.0  # past the backoff of the last failure and every rate window
    wire.nat = Nat(_peer(index))
    failing = index % 3 == 2
    wire.initiator.psk = b"not-the-psk" if failing else PSK
    wire.run(initiator.initiate("hq", "net", wire.now), wire.initiator)
    if failing:
        assert not initiator.sas and not responder.sas
    else:
        (i_sa,) = initiator.sas.values()
        assert i_sa.state == IkeSaState.ESTABLISHED and i_sa.nat_local
        wire.run(initiator.rekey_child(i_sa, i_sa.children[0], wire.now), wire.initiator)
        wire.run(initiator.rekey_ike(i_sa, wire.now), wire.initiator)
        (i_sa,) = initiator.sas.values()
        wire.run(informational.send_liveness(initiator, i_sa, wire.now), wire.initiator)
        assert i_sa.outstanding is None
        if index % 2:
            (r_sa,) = responder.sas.values()
            wire.run(responder.delete_ike(r_sa, wire.now, "flushed"), wire.responder)
        else:
            wire.run(initiator.delete_ike(i_sa, wire.now, "flushed"), wire.initiator)
    assert not initiator.sas and not responder.sas
    # what the test wire records for assertions is not the engines' memory
    wire.initiator.effects.clear()
    wire.responder.effects.clear()
    wire.log.clear()


def _sizes(*engines: IkeEngine) -> dict[str, int]:
    out: dict[str, int] = {}
    seen: set[int] = set()
    for name, engine in zip(("initiator", "responder"), engines, strict=True):
        # the configuration is read-only: leave it out of the walk
        seen.add(id(engine.policy))
        container_sizes(engine, name, seen, out)
    return out


def _ours(snapshot: tracemalloc.Snapshot) -> int:
    """Bytes allocated with ikefarm's code (shared/, services/) on the traced stack."""
    folders = [Path(p).parent for p in (ikefarm.shared.__file__, ikefarm.services.__file__)]
    filters = [tracemalloc.Filter(True, f"{folder}/*", all_frames=True) for folder in folders]
    return sum(stat.size for stat in snapshot.filter_traces(filters).statistics("filename"))


@pytest.fixture
def churn(monkeypatch: pytest.MonkeyPatch) -> Wire:
    # the remembered child SPIs are cut back to the live children past this slack: small
    # here, so that bounded cache cannot pass for (or hide) memory kept per SA
    monkeypatch.setattr(engine_module, "CHILD_SPI_SLACK", 8)
    monkeypatch.setattr(sa_module, "STALE_TIMER_SLACK", 4)
    return guarded_pair(RESPONDER_EXTRA)


def test_nat_float_keeps_nothing_in_the_init_index_after_deletion(churn: Wire) -> None:
    _cycle(churn, 0)
    assert churn.responder.engine.init_index == {}
    assert churn.nat is not None and set(churn.nat.ports) == {500, 4500}  # it floated


def test_sa_churn_returns_every_engine_container_to_its_size(churn: Wire) -> None:
    engines = (churn.initiator.engine, churn.responder.engine)
    for index in range(WARM_UP):
        _cycle(churn, index)
    baseline = _sizes(*engines)
    for index in range(WARM_UP, WARM_UP + CYCLES):
        _cycle(churn, index)
    after = _sizes(*engines)

    changed = {path: (baseline.get(path), after.get(path)) for path in baseline.keys() | after}
    assert {p: sizes for p, sizes in changed.items() if sizes[0] != sizes[1]} == {}
    for engine in engines:
        assert_bounded_caches(engine)
    assert churn.responder.engine.counters["ike_sa_deleted_by_peer"] > 0  # both sides deleted
    assert churn.responder.engine.counters["auth_failed.auth_mismatch"] > 0
    assert churn.responder.engine.counters["dropped.dos_refused"] == 0  # no backoff was hit


def test_sa_churn_keeps_no_memory_traced_to_ikefarm_code(churn: Wire) -> None:
    for index in range(WARM_UP):
        _cycle(churn, index)
    if tracemalloc.is_tracing():
        pytest.skip("tracemalloc already runs (another tool owns it)")
    gc.collect()
    # a few frames: enough to see our code under the stdlib's allocations, and affordable
    tracemalloc.start(TRACED_FRAMES)
    try:
        # objects allocated before tracing are invisible to it: the state a cycle leaves
        # behind (the last peer's rate window, the timer heap) would count as growth once.
        # A few traced cycles first, so only what accumulates per cycle is measured.
        for index in range(WARM_UP, 2 * WARM_UP):
            _cycle(churn, index)
        gc.collect()
        before = _ours(tracemalloc.take_snapshot())
        for index in range(2 * WARM_UP, 2 * WARM_UP + TRACED_CYCLES):
            _cycle(churn, index)
        gc.collect()
        grown = _ours(tracemalloc.take_snapshot()) - before
    finally:
        tracemalloc.stop()
    assert grown / TRACED_CYCLES < BYTES_PER_CYCLE, f"{grown / TRACED_CYCLES:.0f} B kept per SA"
