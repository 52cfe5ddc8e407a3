"""The DoS bus inputs (IkeLoad, IngressLoad, PeerBackoff, the cookie record): anything off
the bus gives a BusError, a counted refusal, or a sane update; never an exception."""

from __future__ import annotations

import contextlib
import math

import msgpack
from hypothesis import given, settings
from hypothesis import strategies as st

from ikefarm.proto import envelope
from ikefarm.proto.envelope import BusError, BusMessage
from ikefarm.proto.messages import CookieSecrets, IkeLoad, IngressLoad, PeerBackoff
from ikefarm.services.ingress.routing import ShardOwners
from ikefarm.shared.dos.cookies import jar_from_record
from ikefarm.shared.dos.load import BackoffTable, FarmLoad

wire_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=40),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=16,
)
KINDS: list[type[BusMessage]] = [IkeLoad, IngressLoad, PeerBackoff, CookieSecrets]
FIELDS = {
    "instance": st.text(max_size=8),
    "shard": st.integers(-3, 70000),
    "seq": st.integers(-3, 2**40),
    "half_open": st.integers(-3, 2**40),
    "established": st.integers(-3, 2**40),
    "interval": st.floats(),
    "pending": st.integers(-3, 2**40),
    "half_open_peers": st.dictionaries(st.text(max_size=6), wire_values, max_size=5),
    "inits": st.dictionaries(st.text(max_size=6), wire_values, max_size=5),
    "peers_full": st.booleans() | wire_values,
    "address": st.text(max_size=12),
    "phase": st.sampled_from(["init", "auth", "", "x"]),
    "seconds": st.floats(),
    "version": st.integers(-3, 2**33),
    "key": st.binary(max_size=40),
    "created": st.floats(),
    "previous_version": st.integers(-3, 2**33),
    "previous_key": st.binary(max_size=40),
}


def apply(message: BusMessage) -> None:
    """What the ingress and ike handlers do with a decoded message (sans-I/O part)."""
    load = FarmLoad("ingress-0")
    if isinstance(message, IkeLoad):
        reason = load.update_shard(message, 10.0)
        assert reason is None or isinstance(reason, str)
        assert load.half_open(10.0) >= 0 and load.pending(10.0) >= 0
        load.peer_half_open("198.51.100.1", 10.0)
        owners = ShardOwners(started=0.0, learning=0.0)
        if reason is None:  # ingress takes an accepted report as its shard's owner
            owners.reported(message.shard, message.interval, 10.0)
            assert owners.owned(message.shard, 10.0) and owners.shards(10.0) == [message.shard]
        assert owners.any_owned(10.0) == (reason is None)
    elif isinstance(message, IngressLoad):
        reason = load.update_ingress(message, 10.0)
        assert reason is None or isinstance(reason, str)
        assert load.pending(10.0) >= 0
    elif isinstance(message, PeerBackoff):
        table = BackoffTable(capacity=4)
        table.add(message.address, message.phase, message.seconds, 10.0)
        phase = table.phase(message.address, 10.0)
        if not (math.isfinite(message.seconds) and message.seconds > 0):
            assert phase is None
    elif isinstance(message, CookieSecrets):
        with contextlib.suppress(ValueError):  # the store counts an unusable record
            jar_from_record(message)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(KINDS), st.binary(max_size=200))
def test_random_bytes(kind: type[BusMessage], raw: bytes) -> None:
    with contextlib.suppress(BusError):
        apply(envelope.unpack(raw, kind))


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(KINDS), wire_values, st.sampled_from([1, 0, 2, None]))
def test_structured_garbage(kind: type[BusMessage], body: object, version: object) -> None:
    raw = msgpack.packb({"v": version, "kind": kind.KIND, "body": body})
    try:
        decoded = envelope.unpack(raw, kind)
    except BusError as exc:
        assert exc.code in {"bad_version", "bad_field", "missing_field", "bad_encoding"}
        return
    apply(decoded)


@st.composite
def plausible(draw: st.DrawFn) -> tuple[type[BusMessage], dict[str, object]]:
    """Bodies with the right field names, values anywhere in or out of range, some missing."""
    kind = draw(st.sampled_from(KINDS))
    names = [f for f in kind.__dataclass_fields__]  # type: ignore[attr-defined]
    body = {name: draw(FIELDS[name]) for name in names if draw(st.integers(0, 9)) > 0}
    return kind, body


@settings(max_examples=500, deadline=None)
@given(plausible())
def test_plausible_bodies(case: tuple[type[BusMessage], dict[str, object]]) -> None:
    kind, body = case
    raw = msgpack.packb({"v": envelope.SCHEMA_VERSION, "kind": kind.KIND, "body": body})
    try:
        decoded = envelope.unpack(raw, kind)
    except BusError as exc:
        assert exc.code in {"bad_field", "missing_field"}
        return
    apply(decoded)
