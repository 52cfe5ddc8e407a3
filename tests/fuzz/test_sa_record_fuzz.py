"""An adopting worker's per-record steps (`services/ike/sa_store.py` `parse`, `adopt`) under
damaged records: every one is restored or refused and counted, never raised, and nothing is
half-registered in the engine.

The records are real (a snapshot of an SA negotiated by the test engines); the mutations
hit the record octets, the snapshot JSON values and the opened secrets. The KV bucket and
the keystore are not involved here (they are in `tests/service/test_ike_sa_persistence.py`):
the runtime below is a stand-in holding only the counters the refusals go to.
"""

from __future__ import annotations

import json
import time
import zlib
from collections import Counter
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ikefarm.proto import subjects
from ikefarm.services.ike import sa_store
from ikefarm.services.ike.sa_store import Record, RecordError, SaStore
from ikefarm.shared.ikev2.engine import IkeEngine
from ikefarm.shared.ikev2.policy import engine_policy
from ikefarm.shared.ikev2.snapshot import take
from tests.engine_helpers import RESPONDER_TOML, config, pair
from tests.fuzz.test_engine_fuzz import mutate

_WIRE = pair()
_WIRE.run(_WIRE.initiator.engine.initiate("hq", "net", _WIRE.now), _WIRE.initiator)
(_SA,) = _WIRE.responder.engine.sas.values()
_STATE, _SECRETS = take(_SA, _WIRE.now)
SNAPSHOT = _STATE.to_json()
SECRETS = _SECRETS.to_bytes()
KEY = subjects.ike_sa_key(1, _SA.local_spi)
RECORD = Record(SNAPSHOT, b"sealed-elsewhere").pack()


class CountersOnly:
    """Stand-in for the worker's runtime: the refusals count here."""

    def __init__(self) -> None:
        self.counters: Counter[str] = Counter()


class Quiet:
    def control(self, *_args: object, **_fields: object) -> None:
        pass


def store() -> SaStore:
    engine = IkeEngine(engine_policy(config(RESPONDER_TOML)), shard=1)
    return SaStore(CountersOnly(), engine, 1, kv=None, log=Quiet())  # type: ignore[arg-type]


edits = st.lists(st.tuples(st.integers(0, 1 << 14), st.integers(0, 255)), max_size=8)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)


def adopt_all(sa_store: SaStore, key: str, raw: bytes, secrets: bytes) -> bool:
    parsed = sa_store.parse(key, raw)
    if parsed is None:
        return False
    spi, _record, state = parsed
    return sa_store.adopt(key, spi, state, secrets, time.monotonic())


def refused(sa_store: SaStore) -> int:
    counters: Any = sa_store.runtime.counters
    return sum(v for k, v in counters.items() if k.startswith("snapshot_refused."))


def test_the_unharmed_record_is_restored() -> None:
    sa_store = store()
    assert adopt_all(sa_store, KEY, RECORD, SECRETS)
    assert sa_store.engine.sas[_SA.local_spi].spi_i == _SA.spi_i
    assert refused(sa_store) == 0


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(edits, st.none() | st.integers(0, 1 << 14))
def test_mutated_record_octets(changes: list[tuple[int, int]], cut: int | None) -> None:
    sa_store = store()
    ok = adopt_all(sa_store, KEY, mutate(RECORD, changes, cut), SECRETS)
    assert ok or refused(sa_store) == 1
    assert len(sa_store.engine.sas) == int(ok)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_a_snapshot_field_replaced(data: st.DataObject) -> None:
    raw = json.loads(SNAPSHOT)
    field = data.draw(st.sampled_from(sorted(raw)))
    raw[field] = data.draw(json_values)
    snapshot = json.dumps(raw).encode()
    sa_store = store()
    ok = adopt_all(sa_store, KEY, Record(snapshot, b"x").pack(), SECRETS)
    assert ok or refused(sa_store) == 1
    assert len(sa_store.engine.sas) == int(ok)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(edits, st.none() | st.integers(0, 1 << 12))
def test_mutated_secrets(changes: list[tuple[int, int]], cut: int | None) -> None:
    sa_store = store()
    ok = adopt_all(sa_store, KEY, RECORD, mutate(SECRETS, changes, cut))
    assert ok or refused(sa_store) == 1
    assert len(sa_store.engine.sas) == int(ok)


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=40))
def test_any_key(key: str) -> None:
    sa_store = store()
    ok = adopt_all(sa_store, key, RECORD, SECRETS)
    assert ok == (key == KEY) and refused(sa_store) == int(not ok)


def test_records_are_written_deflated_and_plain_ones_still_read() -> None:
    written = msgpack.unpackb(RECORD)
    assert written["format"] == sa_store.RECORD_FORMAT == 2
    assert len(written["snapshot"]) < len(SNAPSHOT) * 2 // 3  # deflated
    assert Record.unpack(RECORD) == Record(SNAPSHOT, b"sealed-elsewhere")
    plain = msgpack.packb({"format": 1, "snapshot": SNAPSHOT, "secrets": b"s"})
    assert Record.unpack(plain) == Record(SNAPSHOT, b"s")  # written before format 2
    bomb = zlib.compress(b"{" * (sa_store.MAX_SNAPSHOT + 1), 9)
    for snapshot in (bomb, written["snapshot"][:-4], written["snapshot"] + b"x", SNAPSHOT):
        damaged = msgpack.packb({"format": 2, "snapshot": snapshot, "secrets": b"s"})
        with pytest.raises(RecordError):
            Record.unpack(damaged)
    for got in (True, 3, "2"):
        with pytest.raises(RecordError):
            Record.unpack(msgpack.packb({"format": got, "snapshot": SNAPSHOT, "secrets": b"s"}))
