"""Any bytes handed to the envelope decoder give a message or a BusError, nothing else."""

from __future__ import annotations

import contextlib

import msgpack
from hypothesis import given, settings
from hypothesis import strategies as st

from ikefarm.proto import envelope
from ikefarm.proto.envelope import BusError
from ikefarm.proto.messages import Stats

wire_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text()
    | st.binary(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=256))
def test_random_bytes(raw: bytes) -> None:
    with contextlib.suppress(BusError):
        envelope.unpack(raw, Stats)


@settings(max_examples=300, deadline=None)
@given(wire_values, st.sampled_from([1, 0, 2, None]))
def test_structured_garbage(body: object, version: object) -> None:
    raw = msgpack.packb({"v": version, "kind": "stats", "body": body})
    try:
        decoded = envelope.unpack(raw, Stats)
    except BusError as exc:
        assert exc.code in {"bad_version", "bad_field", "missing_field", "bad_encoding"}
    else:
        assert isinstance(decoded.service, str) and isinstance(decoded.requests, int)
