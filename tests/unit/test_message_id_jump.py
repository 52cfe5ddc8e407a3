"""After a restore, the peer's next request may be one past the expected Message ID once.

A worker that answered a request and died before its snapshot was written leaves
the previous snapshot: the restored SA expects the Message ID the peer already
used. The peer's next request carries the one after it (RFC 7296 2.2, a window of
one); the restored SA takes it, once, after verifying it (docs/failover.md). Any
other SA, or a second jump, drops it as before.
"""

from __future__ import annotations

from ikefarm.shared.ikev2.engine import IkeEngine
from ikefarm.shared.ikev2.sa import IkeSa
from ikefarm.shared.ikev2.snapshot import SaSnapshot, take
from tests.engine_helpers import Wire, pair


def lost_exchange(jump: bool = True) -> tuple[Wire, IkeSa, IkeSa, IkeEngine]:
    """An established pair; the responder answers one CREATE_CHILD_SA and is then replaced
    by an engine restored from the snapshot taken before it."""
    wire = pair()
    wire.run(wire.initiator.engine.initiate("hq", "net", wire.now), wire.initiator)
    (i_sa,) = wire.initiator.engine.sas.values()
    (r_sa,) = wire.responder.engine.sas.values()
    state, secrets = take(r_sa, wire.now)
    wire.run(wire.initiator.engine.create_child(i_sa, "net", wire.now), wire.initiator)
    assert r_sa.expected_request_id == state.expected_request_id + 1
    fresh = IkeEngine(wire.responder.engine.policy, wire.responder.engine.shard)
    restored = fresh.restore(SaSnapshot.from_json(state.to_json()), secrets, wire.now)
    restored.message_id_jump = jump
    wire.responder.engine = fresh
    return wire, i_sa, restored, fresh


def test_the_next_request_past_a_lost_one_is_taken_once() -> None:
    wire, i_sa, restored, fresh = lost_exchange()
    expected = restored.expected_request_id
    children = len(i_sa.children)
    wire.run(wire.initiator.engine.create_child(i_sa, "net", wire.now), wire.initiator)
    assert fresh.counters["message_id_jumped"] == 1
    assert restored.expected_request_id == expected + 2
    assert len(i_sa.children) == children + 1 and i_sa.outstanding is None
    assert not restored.message_id_jump
    # the exchange after that is in step again
    wire.run(wire.initiator.engine.create_child(i_sa, "net", wire.now), wire.initiator)
    assert restored.expected_request_id == expected + 3
    assert fresh.counters["message_id_jumped"] == 1


def test_without_a_restore_the_request_past_the_expected_one_is_dropped() -> None:
    wire, i_sa, restored, fresh = lost_exchange(jump=False)
    expected = restored.expected_request_id
    wire.run(wire.initiator.engine.create_child(i_sa, "net", wire.now), wire.initiator)
    assert fresh.counters["message_id_jumped"] == 0
    assert restored.expected_request_id == expected
    assert i_sa.outstanding is not None  # unanswered: the peer retransmits, then gives up
