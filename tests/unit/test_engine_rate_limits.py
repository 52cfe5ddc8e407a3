"""Junos incoming-exchange-max-rates (seed 000) on an established IKE SA, in memory."""

from __future__ import annotations

from ikefarm.shared.config.kinds import Rate
from ikefarm.shared.ikev2.exchanges import informational
from ikefarm.shared.ikev2.exchanges.rate_limits import SlidingWindow
from ikefarm.shared.ikev2.sa import ChildSaState, IkeSaState
from tests.dos_helpers import guarded_pair

RATES = "[ike.session.full-open.incoming-exchange-max-rates]\n"


def established(rates: str):  # type: ignore[no-untyped-def]
    wire = guarded_pair(RATES + rates)
    wire.run(wire.initiator.engine.initiate("hq", "net", wire.now), wire.initiator)
    (i_sa,) = wire.initiator.engine.sas.values()
    return wire, i_sa


def test_sliding_window_allows_count_per_seconds() -> None:
    window = SlidingWindow(Rate(2, 10))
    assert window.allow("a", 0.0) and window.allow("a", 1.0)
    assert not window.allow("a", 9.9)
    assert window.allow("b", 9.9)  # per key
    assert window.allow("a", 10.0)  # the first left the window
    bounded = SlidingWindow(Rate(1, 10), capacity=2)
    for key in range(5):
        bounded.allow(key, 0.0)
    assert len(bounded._events) == 2
    # a key whose events all left the window is forgotten as others come
    for second in range(100):
        assert bounded.allow(f"peer-{second}", 20.0 * second)
    assert len(bounded._events) == 1


def test_keepalive_rate_drops_the_excess_dpd_and_keeps_the_message_id() -> None:
    wire, i_sa = established('keepalive = "2/10"')
    responder = wire.responder.engine
    for step in range(2):
        wire.run(informational.send_liveness(wire.initiator.engine, i_sa, wire.now), wire.initiator)
        assert i_sa.outstanding is None, f"DPD {step} unanswered"
    expected = next(iter(responder.sas.values())).expected_request_id
    wire.run(informational.send_liveness(wire.initiator.engine, i_sa, wire.now), wire.initiator)
    assert responder.counters["dropped.rate_limited.keepalive"] == 1
    assert i_sa.outstanding is not None  # not answered
    assert next(iter(responder.sas.values())).expected_request_id == expected
    # the retransmission after the window passes is answered
    wire.now += 10
    wire.run(wire.initiator.engine.on_timer(wire.now + 60), wire.initiator)
    assert i_sa.outstanding is None


def test_ike_rekey_rate_is_per_peer() -> None:
    wire, i_sa = established('ike-rekey = "1/60"')
    wire.run(wire.initiator.engine.rekey_ike(i_sa, wire.now), wire.initiator)
    (new_sa,) = [s for s in wire.initiator.engine.sas.values() if s.state == IkeSaState.ESTABLISHED]
    assert new_sa is not i_sa
    wire.run(wire.initiator.engine.rekey_ike(new_sa, wire.now + 1), wire.initiator)
    assert wire.responder.engine.counters["dropped.rate_limited.ike-rekey"] == 1
    assert new_sa.outstanding is not None


def test_ipsec_rekey_rate_is_per_tunnel() -> None:
    wire, i_sa = established('ipsec-rekey = "1/60"')
    (child,) = i_sa.children
    wire.run(wire.initiator.engine.rekey_child(i_sa, child, wire.now), wire.initiator)
    (fresh,) = [c for c in i_sa.children if c.state == ChildSaState.INSTALLED]
    assert fresh is not child
    wire.run(wire.initiator.engine.rekey_child(i_sa, fresh, wire.now + 1), wire.initiator)
    assert wire.responder.engine.counters["dropped.rate_limited.ipsec-rekey"] == 1


def test_without_rates_nothing_is_limited() -> None:
    wire, i_sa = established("")
    for _ in range(5):
        wire.run(informational.send_liveness(wire.initiator.engine, i_sa, wire.now), wire.initiator)
    assert not any(k.startswith("dropped.rate_limited") for k in wire.responder.engine.counters)
