"""KernelCounters and KernelExpire off the bus, as the ike worker takes them, and KernelFlush
as the kernel service checks it: anything gives
a BusError or a counted drop, never an exception; a valid entry for an unknown child and a
malformed one change no SA."""

from __future__ import annotations

import contextlib
from collections import Counter

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ikefarm.proto import envelope
from ikefarm.proto.envelope import BusError
from ikefarm.proto.messages import KernelCounters, KernelExpire, KernelFlush
from ikefarm.services.ike import kernel_events
from ikefarm.services.kernel.memory import InvalidChild, MemoryKernel, check_flush
from tests.service.test_kernel_memory import child as memory_child
from tests.unit.test_engine_dpd import dpd_pair

WIRE = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=12),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)
COUNT = st.integers(-(2**63), 2**64 - 1) | WIRE
ENTRY = st.fixed_dictionaries(
    {
        "unique_id": COUNT,
        "bytes_in": COUNT,
        "packets_in": COUNT,
        "bytes_out": COUNT,
        "packets_out": COUNT,
    }
)
COUNTERS_BODY = st.fixed_dictionaries(
    {
        "backend": st.text(max_size=8) | WIRE,
        "instance": st.text(max_size=8),
        "interval": st.floats() | WIRE,
        "children": st.lists(ENTRY | WIRE, max_size=6) | WIRE,
    }
)
EXPIRE_BODY = st.fixed_dictionaries(
    {
        "backend": st.text(max_size=8),
        "hard": st.booleans() | WIRE,
        "unique_id": COUNT,
        "reqid": COUNT,
        "direction": st.sampled_from(["in", "out", ""]) | WIRE,
        "spi": st.binary(max_size=6) | WIRE,
        "src": st.text(max_size=8),
        "dst": st.text(max_size=8),
        "bytes": COUNT,
        "packets": COUNT,
    }
)

WIRE_PAIR = dpd_pair()  # one established pair; the fuzzed messages must not change it


def _raw(kind: str, body: object) -> bytes:
    return msgpack.packb({"v": envelope.SCHEMA_VERSION, "kind": kind, "body": body})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(COUNTERS_BODY, EXPIRE_BODY)
def test_kernel_messages_never_raise_nor_touch_an_unnamed_child(
    counters_body: object, expire_body: object
) -> None:
    engine = WIRE_PAIR.initiator.engine
    (sa,) = engine.sas.values()
    child = sa.children[0]
    before = (sa.last_seen, child.bytes_in, child.packets_in, len(engine.sas))
    drops: Counter[str] = Counter()
    with contextlib.suppress(BusError):
        batch = envelope.unpack(_raw("kernel-counters", counters_body), KernelCounters)
        if all(e.unique_id != child.unique_id for e in batch.children):
            kernel_events.apply_counters(engine, batch, before[0] + 1, drops)
            assert (sa.last_seen, child.bytes_in, child.packets_in, len(engine.sas)) == before
    with contextlib.suppress(BusError):
        expire = envelope.unpack(_raw("kernel-expire", expire_body), KernelExpire)
        if expire.unique_id != child.unique_id:
            assert kernel_events.apply_expire(engine, expire, before[0] + 1, drops) == []
    assert child in sa.children


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(COUNT, COUNT, COUNT, COUNT), min_size=1, max_size=4))
def test_out_of_range_counters_for_a_real_child_are_dropped_and_counted(
    values: list[tuple[object, object, object, object]],
) -> None:
    engine = WIRE_PAIR.initiator.engine
    (sa,) = engine.sas.values()
    child = sa.children[0]
    body = {
        "backend": "memory",
        "instance": "k",
        "interval": 1.0,
        "children": [
            {
                "unique_id": child.unique_id,
                "bytes_in": v[0],
                "packets_in": v[1],
                "bytes_out": v[2],
                "packets_out": v[3],
            }
            for v in values
        ],
    }
    drops: Counter[str] = Counter()
    try:
        batch = envelope.unpack(_raw("kernel-counters", body), KernelCounters)
    except BusError:
        return
    kernel_events.apply_counters(engine, batch, sa.last_seen, drops)
    for counters in (child.bytes_in, child.packets_in, child.bytes_out, child.packets_out):
        assert 0 <= counters < 2**64
    bad = sum(not all(isinstance(x, int) and 0 <= x < 2**64 for x in v) for v in values)
    assert drops["kernel_counters.bad_entry"] == bad


FLUSH_BODY = st.fixed_dictionaries(
    {"selector": st.sampled_from(["unique-id", "reqid", "all", "", "spi"]) | WIRE},
    optional={"value": st.integers(-1, 4) | COUNT},
)


@settings(max_examples=200, deadline=None)
@given(FLUSH_BODY)
def test_a_flush_request_is_refused_or_names_only_matching_children(body: object) -> None:
    kernel = MemoryKernel()
    kernel.install(memory_child(1))
    kernel.install(memory_child(2, "c0000002", "c1000002"))
    try:
        request = envelope.unpack(_raw("kernel-flush", body), KernelFlush)
        check_flush(request)
    except (BusError, InvalidChild):
        return
    chosen = {d.unique_id for d in kernel.children_matching(request.selector, request.value)}
    if request.selector == "all":
        assert chosen == {1, 2}
    else:  # the helper's children have reqid == unique id
        assert chosen == ({request.value} & {1, 2})
