"""The responder engine under random and mutated input: it never raises, counts every drop,
and an established SA is not disturbed by anything that fails its integrity check."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ikefarm.shared.ikev2.effects import Endpoint, SendDatagram
from ikefarm.shared.ikev2.message import parse_message
from ikefarm.shared.ikev2.sa import IkeSaState
from tests.engine_helpers import pair

_WIRE = pair()
_WIRE.run(_WIRE.initiator.engine.initiate("hq", "net", _WIRE.now), _WIRE.initiator)
REQUESTS = [d for address, d in _WIRE.log if address == "192.0.2.2"]
INIT_REQUEST = REQUESTS[0]
AUTH_REQUEST = REQUESTS[1]
LOCAL = Endpoint("192.0.2.1", 500)
REMOTE = Endpoint("192.0.2.2", 500)


def mutate(data: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    buffer = bytearray(data)
    for position, value in edits:
        buffer[position % len(buffer)] = value
    if cut is not None:
        buffer = buffer[: cut % (len(buffer) + 1)]
    return bytes(buffer)


edits = st.lists(st.tuples(st.integers(0, 4096), st.integers(0, 255)), max_size=8)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_random_bytes_never_raise(datagram: bytes) -> None:
    engine = pair().responder.engine
    engine.receive(datagram, LOCAL, REMOTE, 0.0)
    dropped = sum(
        v for k, v in engine.counters.items() if k.startswith(("dropped.", "ike_sa_init_refused."))
    )
    assert dropped + engine.counters["dh_computed"] >= 1 or not datagram


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(edits, st.one_of(st.none(), st.integers(0, 2000)))
def test_mutated_ike_sa_init_never_raises(changes: list[tuple[int, int]], cut: int | None) -> None:
    engine = pair().responder.engine
    effects = engine.receive(mutate(INIT_REQUEST, changes, cut), LOCAL, REMOTE, 0.0)
    for effect in effects:
        if isinstance(effect, SendDatagram):
            parse_message(effect.data)  # whatever we answer is well-formed
    assert len(engine.sas) <= 1


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(edits, st.one_of(st.none(), st.integers(0, 2000)))
def test_mutated_protected_requests_do_not_disturb_an_established_sa(
    changes: list[tuple[int, int]], cut: int | None
) -> None:
    wire = pair()
    wire.run(wire.initiator.engine.initiate("hq", "net", wire.now), wire.initiator)
    engine = wire.responder.engine
    (sa,) = engine.sas.values()
    before = (sa.state, sa.expected_request_id, [c.spi_in for c in sa.children])
    (auth_request,) = [
        d for a, d in wire.log if a == "192.0.2.2" and parse_message(d).header.message_id == 1
    ]
    mutated = mutate(auth_request, changes, cut)
    engine.receive(mutated, sa.local, sa.remote, wire.now)
    if mutated != auth_request:
        assert (sa.state, sa.expected_request_id, [c.spi_in for c in sa.children]) == before
    assert sa.state == IkeSaState.ESTABLISHED
