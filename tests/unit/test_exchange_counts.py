"""Exchange counts by role, type and result (shared/ikev2/exchange_counts.py), from two
engines in memory, and SA counts by state (shared/ikev2/state_counts.py)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from ikefarm.shared.ikev2.constants import NotifyType
from ikefarm.shared.ikev2.exchange_counts import parse_counter, result_of
from ikefarm.shared.ikev2.payloads import NotifyPayload
from ikefarm.shared.ikev2.state_counts import StateCounts, count_states
from tests.engine_helpers import pair
from tests.unit.test_engine_dpd import _dead_peer, dpd_pair


def exchanges(counters) -> dict[tuple[str, str, str], int]:  # type: ignore[no-untyped-def]
    found = {}
    for name, count in counters.items():
        parsed = parse_counter(name)
        if parsed is not None:
            found[parsed] = count
    return found


def test_a_handshake_counts_each_exchange_once_on_each_side() -> None:
    wire = pair()
    wire.run(wire.initiator.engine.initiate("hq", "net", wire.now), wire.initiator)
    assert len(wire.initiator.engine.sas) == 1
    assert exchanges(wire.responder.engine.counters) == {
        ("responder", "IKE_SA_INIT", "ok"): 1,
        ("responder", "IKE_AUTH", "ok"): 1,
    }
    assert exchanges(wire.initiator.engine.counters) == {
        ("initiator", "IKE_SA_INIT", "ok"): 1,
        ("initiator", "IKE_AUTH", "ok"): 1,
    }


def test_an_unanswered_request_counts_as_a_timeout() -> None:
    wire = dpd_pair("clear")
    _dead_peer(wire)
    counted = exchanges(wire.initiator.engine.counters)
    assert counted[("initiator", "INFORMATIONAL", "timeout")] == 1


def test_results_name_the_first_error_notify_or_cookie() -> None:
    assert result_of([]) == "ok"
    assert result_of([NotifyPayload(NotifyType.INITIAL_CONTACT)]) == "ok"
    assert result_of([NotifyPayload(NotifyType.COOKIE, data=b"x" * 8)]) == "COOKIE"
    assert (
        result_of([NotifyPayload(NotifyType.NO_PROPOSAL_CHOSEN), NotifyPayload(NotifyType.COOKIE)])
        == "NO_PROPOSAL_CHOSEN"
    )
    assert result_of([NotifyPayload(9999)]) == "error-9999"


@given(st.text(max_size=40))
def test_only_well_formed_exchange_counter_names_parse(name: str) -> None:
    parsed = parse_counter(name)
    if parsed is not None:
        assert name == "exchange." + ".".join(parsed)
        assert parsed[0] in ("initiator", "responder")


def test_states_are_counted_for_ike_and_child_sas_and_the_walk_is_spaced() -> None:
    wire = pair()
    wire.run(wire.initiator.engine.initiate("hq", "net", wire.now), wire.initiator)
    counts = count_states(wire.responder.engine.sas.values())
    assert counts["ike"]["established"] == 1 and counts["ike"]["half-open"] == 0
    assert counts["child"]["installed"] == 1 and counts["child"]["deleted"] == 0
    cache = StateCounts(interval=5.0)
    assert cache.counts([], 100.0)["ike"]["established"] == 0
    # within the interval the last walk answers; after it, a new one
    assert cache.counts(wire.responder.engine.sas.values(), 104.0)["ike"]["established"] == 0
    assert cache.counts(wire.responder.engine.sas.values(), 105.0)["ike"]["established"] == 1
