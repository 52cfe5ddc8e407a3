"""Flow session events and commands off the bus: a BusError or EventError and an unchanged
table, or a batch applied whole; never an exception, never a half-applied batch."""

from __future__ import annotations

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ikefarm.proto import envelope
from ikefarm.proto.envelope import BusError
from ikefarm.proto.messages import FlowEvents
from ikefarm.shared.flow.events import EventError, apply_batch, check_batch
from ikefarm.shared.flow.filters import FilterError, parse_words
from ikefarm.shared.flow.settings import FlowSettings
from ikefarm.shared.flow.table import SessionTable
from tests.fuzz.test_dos_bus_fuzz import wire_values

addresses = st.sampled_from(["10.0.0.1", "10.0.0.2", "::1", "2001:db8::2", "239.1.1.1", "x", ""])
good_tuples = st.fixed_dictionaries(
    {
        "protocol": st.sampled_from([1, 6, 17, 47]),
        "src": st.sampled_from(["10.0.0.1", "10.0.0.2"]),
        "sport": st.integers(0, 2),
        "dst": st.sampled_from(["10.0.0.2", "239.1.1.1"]),
        "dport": st.integers(0, 2),
    }
)
bad_tuples = st.fixed_dictionaries(
    {
        "protocol": st.integers(-2, 300),
        "src": addresses,
        "sport": st.integers(-2, 70000),
        "dst": addresses,
        "dport": st.integers(-2, 70000),
    }
)
# mostly well formed, so that batches get applied too, not only refused
tuples = st.one_of(good_tuples, good_tuples, good_tuples, bad_tuples, wire_values)
opens = st.fixed_dictionaries(
    {"init": tuples, "ingress": st.text(max_size=4) | st.text(max_size=70), "egress": st.just("e")},
    optional={
        "reply": tuples,
        "policy": st.text(max_size=4),
        "tcp_flags": st.sampled_from(["S", "A", ""]) | st.text(alphabet="SAFRX", max_size=9),
        "tunnel": wire_values,
        "age": st.floats() | st.integers(-5, 10**6),
    },
)
changes = st.fixed_dictionaries(
    {"init": tuples, "change": st.sampled_from(["established", "fin", "rst", "x"])},
    optional={"direction": st.sampled_from(["in", "out", "up"]), "age": st.floats()},
)
refreshes = st.fixed_dictionaries(
    {
        "init": tuples,
        "idle": st.floats() | st.integers(-5, 10**6),
        "packets_in": st.integers(-1, 2**64 - 1),
        "bytes_in": st.integers(0, 10),
        "packets_out": st.integers(0, 10),
        "bytes_out": st.integers(0, 10),
    }
)
bodies = st.fixed_dictionaries(
    {
        "instance": st.one_of(st.just("kernel-0"), st.just("kernel-0"), st.text(max_size=6)),
        "seq": st.integers(-1, 2**40),
    },
    optional={
        "opened": st.one_of(st.lists(opens, max_size=4), st.lists(opens, max_size=4), wire_values),
        "changes": st.one_of(
            st.lists(changes, max_size=4), st.lists(changes, max_size=4), wire_values
        ),
        "refreshes": st.one_of(
            st.lists(refreshes, max_size=4), st.lists(refreshes, max_size=4), wire_values
        ),
    },
)


def snapshot(table: SessionTable) -> tuple[object, ...]:
    return tuple(
        (s.id, s.init, s.state, s.valid, s.deadline, s.packets_in) for s in table.by_id.values()
    )


def decode_and_apply(raw: bytes, table: SessionTable) -> bool:
    """What the flow service does with one message; True when it was applied."""
    before = snapshot(table)
    try:
        checked = check_batch(envelope.unpack(raw, FlowEvents))
    except (BusError, EventError):
        assert snapshot(table) == before  # refused: nothing changed
        return False
    apply_batch(table, checked, 100.0)
    table.tick(150.0)
    assert len(table) <= table.settings.max_sessions
    return True


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=bodies)
def test_structured_batches(body: dict[str, object]) -> None:
    table = SessionTable(FlowSettings(max_sessions=5, udp=30))
    raw = msgpack.packb({"v": 1, "kind": "flow-events", "body": body})
    decode_and_apply(raw, table)


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=200))
def test_arbitrary_bytes(raw: bytes) -> None:
    table = SessionTable(FlowSettings())
    decode_and_apply(raw, table)


@settings(max_examples=150, deadline=None)
@given(
    verb=st.sampled_from(["show", "clear", "x"]),
    words=st.lists(
        st.sampled_from(
            ["all", "protocol", "udp", "tcp", "300", "session-identifier", "1", "summary", "tunnel"]
        )
        | st.text(max_size=10),
        max_size=6,
    )
    | wire_values,
)
def test_command_words(verb: str, words: object) -> None:
    table = SessionTable(FlowSettings())
    table.open((17, "10.0.0.1", 1, "10.0.0.2", 2), 0.0)
    try:
        match, _summary = parse_words(verb, words)  # type: ignore[arg-type]
    except FilterError:
        return
    list(table.select(match))
    if verb == "clear":
        table.clear(match)
