"""Fuzz the dataplane's flow cache (services/kernel/flows.py): verdicts of any shape are
applied whole or refused whole (ValueError, nothing changed), and packets of any bytes are
passed or dropped and counted, never an exception, and every batch passes the flow
service's check."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.compat import raw
from scapy.layers.inet import IP, UDP

from ikefarm.proto.messages import FlowTuple, FlowVerdict, FlowVerdicts
from ikefarm.services.kernel.flows import PROMPT, FlowCache
from ikefarm.shared.flow.events import check_batch
from ikefarm.shared.flow.settings import FlowSettings

A, B = "10.100.0.1", "10.200.0.7"

anything = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=50)
)
addresses = st.one_of(st.sampled_from([A, B, "2001:db8::1", "::", "999.1.1.1", ""]), anything)
ports = st.one_of(st.integers(-5, 70000), anything)
tuples = st.builds(FlowTuple, ports, addresses, ports, addresses, ports)
reasons = st.one_of(
    st.sampled_from(["aged", "cleared", "handshake-timeout", "leaf", "max-sessions", "no-syn"]),
    anything,
)
verdict_items = st.one_of(st.builds(FlowVerdict, tuples, reasons), anything)
messages = st.builds(
    FlowVerdicts,
    st.one_of(st.integers(-3, 2**40), anything),
    st.one_of(st.lists(verdict_items, max_size=6), anything),
    st.one_of(st.booleans(), anything),
)


def fresh() -> FlowCache:
    flows = FlowCache(FlowSettings(), "kernel-fuzz")
    for port in range(4):
        flows.packet(raw(IP(src=A, dst=B) / UDP(sport=port, dport=53)), 0.0, "i", "e", "p")
    flows.batches(PROMPT)
    return flows


def state(flows: FlowCache) -> tuple[Any, ...]:
    return (
        len(flows),
        dict(flows.entries),
        flows.table_full,
        flows.verdict_seq,
        {k: v for k, v in flows.counters.items() if k.startswith("flow.")},
    )


@settings(max_examples=400, deadline=None)
@given(messages)
def test_verdicts_apply_whole_or_change_nothing(message: FlowVerdicts) -> None:
    flows = fresh()
    before = state(flows)
    try:
        flows.verdicts(message, 1.0)
    except ValueError:
        assert state(flows) == before
        return
    assert len(flows) <= 4 and isinstance(flows.table_full, bool)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=80), st.booleans())
def test_any_bytes_are_passed_or_dropped_and_counted(data: bytes, full: bool) -> None:
    flows = fresh()
    flows.table_full = full
    dropped = sum(v for k, v in flows.counters.items() if k.startswith("flow.drop."))
    if not flows.packet(data, 1.0, "i", "e", "p"):
        assert sum(v for k, v in flows.counters.items() if k.startswith("flow.drop.")) > dropped
    for batch in flows.batches(10.0):
        assert len(batch.opened) + len(batch.changes) + len(batch.refreshes) >= 1
        check_batch(batch)  # what the dataplane sends, the flow service takes
