"""Any command the bus can carry runs or is refused with a reason; it never raises, and a
refused one changes nothing."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ikefarm.shared.ikev2 import management
from ikefarm.shared.ikev2.management import GRAMMAR, Command
from tests.engine_helpers import pair

words = st.sampled_from(
    ["ike-sa", "child-sa", "sa", "vpn", "security-policy", "unique-id", "all", "tunnel", "state"]
)
values = st.one_of(
    st.sampled_from(["", "hq", "net", "rw", "1", "200001", "established", "installed"]),
    st.text(max_size=300),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(st.sampled_from(sorted(GRAMMAR)), st.text(max_size=10)),
    st.one_of(words, st.text(max_size=10)),
    st.one_of(words, st.text(max_size=10)),
    values,
    st.integers(-3, 5),
)
def test_execute_never_raises(
    verb: str, target: str, selector: str, value: str, phase: int
) -> None:
    wire = pair()
    wire.run(wire.initiator.engine.initiate("hq", "net", wire.now), wire.initiator)
    engine = wire.initiator.engine
    before = {sa.unique_id: (sa.state, len(sa.children)) for sa in engine.sas.values()}
    outcome = management.execute(engine, Command(verb, target, selector, value, phase), wire.now)
    if not outcome.ok:
        assert outcome.error and outcome.effects == [] and outcome.count == 0
        assert {s.unique_id: (s.state, len(s.children)) for s in engine.sas.values()} == before
    wire.run(outcome.effects, wire.initiator)
