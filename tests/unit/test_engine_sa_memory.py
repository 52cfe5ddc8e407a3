"""Memory an engine holds per established IKE SA with one child (issue 9: <= 8 KiB per SA
for the whole farm, of which the ike worker's engine is the largest part).

A responder engine establishes a few hundred IKE SAs, each with one child, from as many
peer addresses (behind a NAPT, so each floats to port 4500 as strongSwan does behind a
NAT); the initiator's SAs are then dropped, so what tracemalloc still counts as grown is
the responder's table. No timing is measured.
"""

from __future__ import annotations

import gc
import tracemalloc

import pytest

from ikefarm.shared.ikev2.interning import Interner
from ikefarm.shared.ikev2.sa import ChildSa, IkeSa, IkeSaState
from tests.engine_helpers import Nat, Wire, pair

WARM_UP = 20
ESTABLISHED = 200
# the engine's share of the farm's 8 KiB per SA (the rest: kernel service, nats-server,
# ingress; ops/bench/RESULTS.md). Measured ~4.7 KB with slotted SAs and interned algorithms
# and selectors, ~7.6 KB before.
BYTES_PER_SA = 6 * 1024


def _establish(wire: Wire, index: int) -> None:
    wire.now += 0.01
    wire.nat = Nat(f"198.51.{100 + index // 250}.{index % 250 + 1}")
    wire.run(wire.initiator.engine.initiate("hq", "net", wire.now), wire.initiator)
    # what the test wire records for assertions is not the engine's memory
    wire.initiator.effects.clear()
    wire.responder.effects.clear()
    wire.log.clear()


def _drop_initiator_sas(wire: Wire) -> None:
    table = wire.initiator.engine.sas
    for spi in list(table):
        table.pop(spi)


def test_established_sa_with_one_child_stays_under_the_bound() -> None:
    if tracemalloc.is_tracing():
        pytest.skip("tracemalloc already runs (another tool owns it)")
    wire = pair()
    for index in range(WARM_UP):
        _establish(wire, index)
    _drop_initiator_sas(wire)
    gc.collect()
    tracemalloc.start(1)
    try:
        before = tracemalloc.get_traced_memory()[0]
        for index in range(WARM_UP, WARM_UP + ESTABLISHED):
            _establish(wire, index)
        _drop_initiator_sas(wire)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    sas = list(wire.responder.engine.sas.values())
    assert len(sas) == WARM_UP + ESTABLISHED
    assert all(sa.state == IkeSaState.ESTABLISHED and len(sa.children) == 1 for sa in sas)
    per_sa = grown / ESTABLISHED
    assert per_sa < BYTES_PER_SA, f"{per_sa:.0f} B per established SA"


def test_established_sa_keeps_no_init_messages() -> None:
    """RealMessage1/2 (RFC 7296 2.15) are signed in IKE_AUTH only: neither side keeps them."""
    wire = pair()
    _establish(wire, 0)
    for engine in (wire.initiator.engine, wire.responder.engine):
        (sa,) = engine.sas.values()
        assert sa.state == IkeSaState.ESTABLISHED
        assert sa.init_request == b"" and sa.init_response == b""


def test_sa_objects_have_no_instance_dict() -> None:
    """Slotted: a per-instance dict of ~65 fields would be ~1.5 KB of each SA."""
    wire = pair()
    _establish(wire, 0)
    (sa,) = wire.responder.engine.sas.values()
    assert isinstance(sa, IkeSa) and isinstance(sa.children[0], ChildSa)
    for obj in (sa, sa.children[0], sa.keys, sa.algorithms, sa.children[0].local_ts[0]):
        assert not hasattr(obj, "__dict__"), type(obj).__name__


def test_sas_share_equal_algorithms_and_selectors() -> None:
    wire = pair()
    for index in range(3):
        _establish(wire, index)
    sas = list(wire.responder.engine.sas.values())
    assert len(sas) == 3
    first, *others = sas
    for sa in others:
        assert sa.algorithms is first.algorithms
        assert sa.children[0].algorithms is first.children[0].algorithms
        assert sa.children[0].local_ts[0] is first.children[0].local_ts[0]


def test_interner_is_bounded_and_returns_equal_values() -> None:
    interner = Interner(limit=2)
    a, b, c = (1, 2), (3, 4), (5, 6)
    assert interner.intern(a) is a
    assert interner.intern((1, 2)) is a  # an equal value: the first instance
    assert interner.intern(b) is b
    assert interner.intern(c) is c  # full: returned as is, not kept
    assert len(interner) == 2
    assert interner.intern((5, 6)) == c and len(interner) == 2
