"""An IKE SA snapshotted, serialized and restored into another engine continues its exchanges
byte for byte (`shared/ikev2/snapshot.py`, the ground for farm failover, issue 11).

Both engines draw from seeded sources (`test_engine_replay.py`); the restoring one starts
from the same source state the original had at the snapshot, so every octet it sends
(IVs, nonces, DH values) must equal the original's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ikefarm.shared.ikev2.effects import Effect, InstallChildSa, KeystoreRequest, SendDatagram
from ikefarm.shared.ikev2.engine import IkeEngine
from ikefarm.shared.ikev2.policy import engine_policy
from ikefarm.shared.ikev2.sa import IkeSa, IkeSaState
from ikefarm.shared.ikev2.snapshot import SaSecrets, SaSnapshot, SnapshotError, restore, take
from tests.engine_helpers import (
    INITIATOR_TOML,
    PFS_TEMPLATE,
    RESPONDER_TOML,
    Seeded,
    Side,
    Wire,
    config,
    keystore_stand_in,
)

PSK = b"shared-secret-0123456789"
# PFS on the child: a CREATE_CHILD_SA in flight carries a DH private value in its task
VPN = 'ipsec-policy = { template = "p" }'


def engine(template: str, shard: int, source: Seeded) -> IkeEngine:
    policy = engine_policy(config(template, PFS_TEMPLATE, VPN))
    return IkeEngine(policy, shard, random=source.octets, uniform=source.uniform)


def seeded_wire() -> tuple[Wire, Seeded, Seeded]:
    r_source, i_source = Seeded(11), Seeded(12)
    wire = Wire(
        Side(engine(INITIATOR_TOML, 2, i_source), PSK, "192.0.2.2"),
        Side(engine(RESPONDER_TOML, 1, r_source), PSK, "192.0.2.1"),
    )
    return wire, i_source, r_source


def through_json(sa: IkeSa, now: float) -> tuple[SaSnapshot, SaSecrets]:
    snapshot, secrets = take(sa, now)
    return SaSnapshot.from_json(snapshot.to_json()), SaSecrets.from_bytes(secrets.to_bytes())


def answered(target: IkeEngine, effects: list[Effect], now: float) -> list[Effect]:
    """Run the keystore requests among `effects` (the stand-in keystore), keep the rest."""
    out: list[Effect] = []
    for effect in effects:
        if isinstance(effect, KeystoreRequest):
            reply = keystore_stand_in(PSK, effect.request)
            out += answered(target, target.keystore_reply(effect.request_id, reply, now), now)
        else:
            out.append(effect)
    return out


def datagrams(effects: list[Effect]) -> list[bytes]:
    return [e.data for e in effects if isinstance(e, SendDatagram)]


def test_a_restored_half_open_responder_answers_ike_auth_byte_for_byte() -> None:
    wire, _i_source, r_source = seeded_wire()
    held: list[SendDatagram] = []

    def hold_auth(side: Side, effect: SendDatagram) -> bool:
        if side is wire.initiator and effect.exchange == "IKE_AUTH":
            held.append(effect)
            return True
        return False

    wire.run(wire.initiator.engine.initiate("hq", "net", wire.now), wire.initiator, drop=hold_auth)
    (r_sa,) = wire.responder.engine.sas.values()
    assert r_sa.state == IkeSaState.HALF_OPEN and len(held) == 1
    later = wire.now + 0.5
    snapshot, secrets = through_json(r_sa, wire.now)
    adopter = engine(RESPONDER_TOML, 1, r_source.clone())
    restored = restore(adopter, snapshot, secrets, later)
    assert restored.state == IkeSaState.HALF_OPEN and adopter.sas[restored.spi_r] is restored
    # a retransmitted IKE_SA_INIT still gets the cached answer from the adopter
    init = next(d for a, d in wire.log if a == "192.0.2.2")
    again = adopter.receive(init, held[0].remote, held[0].local, later)
    assert datagrams(again) == [r_sa.init_response]

    request = held[0]
    original = answered(
        wire.responder.engine,
        wire.responder.engine.receive(request.data, request.remote, request.local, later),
        later,
    )
    continued = answered(
        adopter, adopter.receive(request.data, request.remote, request.local, later), later
    )
    assert datagrams(original) and datagrams(continued) == datagrams(original)
    assert restored.state == r_sa.state == IkeSaState.ESTABLISHED
    installs = [e.child for e in continued if isinstance(e, InstallChildSa)]
    assert installs == [e.child for e in original if isinstance(e, InstallChildSa)]


def test_a_restored_initiator_retransmits_its_request_and_finishes_the_exchange() -> None:
    wire, i_source, _r_source = seeded_wire()
    wire.run(wire.initiator.engine.initiate("hq", "net", wire.now), wire.initiator)
    (i_sa,) = wire.initiator.engine.sas.values()
    lost: list[SendDatagram] = []
    wire.run(
        wire.initiator.engine.create_child(i_sa, "net", wire.now),
        wire.initiator,
        drop=lambda side, effect: side is wire.initiator and not lost.append(effect),
    )
    assert i_sa.outstanding is not None and len(lost) == 1
    snapshot, secrets = through_json(i_sa, wire.now)
    assert snapshot.outstanding is not None and secrets.dh  # the PFS key of the task in flight
    adopter = engine(INITIATOR_TOML, 2, i_source.clone())
    later = wire.now + 100.0
    restored = restore(adopter, snapshot, secrets, wire.now)
    assert restored.outstanding is not None
    due = adopter.next_deadline()
    assert due == i_sa.outstanding.next_at
    original_retry = wire.initiator.engine.on_timer(due)
    restored_retry = adopter.on_timer(due)
    assert datagrams(restored_retry) == datagrams(original_retry) == [lost[0].data]

    response = wire.responder.engine.receive(lost[0].data, lost[0].remote, lost[0].local, later)
    (answer,) = [e for e in response if isinstance(e, SendDatagram)]
    installed = []
    for target, sa in ((wire.initiator.engine, i_sa), (adopter, restored)):
        out = target.receive(answer.data, answer.remote, answer.local, later)
        installed.append([e.child for e in out if isinstance(e, InstallChildSa)])
        assert len(sa.children) == 2 and sa.outstanding is None
    assert installed[0] and installed[0] == installed[1]


def test_keys_stay_out_of_the_public_part() -> None:
    wire, _i, _r = seeded_wire()
    wire.run(wire.initiator.engine.initiate("hq", "net", wire.now), wire.initiator)
    (sa,) = wire.initiator.engine.sas.values()
    snapshot, secrets = take(sa, wire.now)
    public = snapshot.to_json()
    assert sa.keys is not None
    for key in (sa.keys.sk_d, sa.keys.sk_ei, sa.keys.sk_er, sa.keys.sk_pi, sa.keys.sk_pr):
        assert key.hex().encode() not in public
    for child in sa.children:
        assert child.keys.encr_i.hex().encode() not in public
    assert sa.keys.sk_d.hex() not in repr(secrets) and "octets" not in repr(snapshot.children)


def test_the_record_is_the_json_of_the_dataclass_fields() -> None:
    """to_json's own converter writes what `dataclasses.asdict` would (records stay readable)."""
    wire, _i, _r = seeded_wire()
    wire.run(wire.initiator.engine.initiate("hq", "net", wire.now), wire.initiator)
    (sa,) = wire.initiator.engine.sas.values()
    snapshot, _secrets = take(sa, wire.now)
    assert (
        snapshot.children
        and snapshot.to_json()
        == json.dumps(dataclasses.asdict(snapshot), separators=(",", ":"), sort_keys=True).encode()
    )


def test_an_sa_waiting_for_the_keystore_is_not_snapshotted() -> None:
    wire, _i, _r = seeded_wire()
    effects = wire.initiator.engine.initiate("hq", "net", wire.now)
    responder = wire.responder.engine
    init = next(e for e in effects if isinstance(e, SendDatagram))
    answer = responder.receive(init.data, init.remote, init.local, wire.now)
    wire.initiator.engine.receive(
        datagrams(answer)[0], init.local, init.remote, wire.now
    )  # the initiator now asks the keystore to sign
    (i_sa,) = wire.initiator.engine.sas.values()
    assert i_sa.state == IkeSaState.AUTHENTICATING
    with pytest.raises(SnapshotError, match="authenticating"):
        take(i_sa, wire.now)


def established_snapshot() -> tuple[bytes, bytes, Callable[[], IkeEngine], float]:
    wire, i_source, _r = seeded_wire()
    wire.run(wire.initiator.engine.initiate("hq", "net", wire.now), wire.initiator)
    (sa,) = wire.initiator.engine.sas.values()
    snapshot, secrets = take(sa, wire.now)
    return (
        snapshot.to_json(),
        secrets.to_bytes(),
        lambda: engine(INITIATOR_TOML, 2, i_source.clone()),
        wire.now,
    )


def test_a_mismatched_schema_or_broken_secrets_are_refused_clearly() -> None:
    public, sealed, fresh, now = established_snapshot()
    raw = json.loads(public)
    with pytest.raises(SnapshotError, match="schema version 99"):
        SaSnapshot.from_json(json.dumps({**raw, "version": 99}).encode())
    with pytest.raises(SnapshotError, match="does not fit schema"):
        SaSnapshot.from_json(json.dumps({k: v for k, v in raw.items() if k != "spi_i"}).encode())
    with pytest.raises(SnapshotError, match="not JSON"):
        SaSnapshot.from_json(b"\xff{")
    with pytest.raises(SnapshotError, match="secrets"):
        SaSecrets.from_bytes(sealed[:-5])
    snapshot = SaSnapshot.from_json(public)
    with pytest.raises(SnapshotError, match="lack"):
        restore(fresh(), snapshot, SaSecrets(), now)
    target = fresh()
    restore(target, snapshot, SaSecrets.from_bytes(sealed), now)
    with pytest.raises(SnapshotError, match="already here"):
        restore(target, snapshot, SaSecrets.from_bytes(sealed), now)


def _mutate(value: Any, draw: Any) -> Any:
    if isinstance(value, dict) and value:
        key = draw(st.sampled_from(sorted(value)))
        return {**value, key: _mutate(value[key], draw)}
    if isinstance(value, list) and value:
        index = draw(st.integers(0, len(value) - 1))
        return [*value[:index], _mutate(value[index], draw), *value[index + 1 :]]
    return draw(st.one_of(st.none(), st.integers(-3, 3), st.text(max_size=4), st.booleans()))


_FIXTURE = established_snapshot()


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_a_corrupted_snapshot_is_refused_or_restored_never_a_crash(data: Any) -> None:
    public, sealed, fresh, now = _FIXTURE
    mutated = json.dumps(_mutate(json.loads(public), data.draw)).encode()
    target = fresh()
    try:
        snapshot = SaSnapshot.from_json(mutated)
        restore(target, snapshot, SaSecrets.from_bytes(sealed), now)
    except SnapshotError:
        # refused as a whole: nothing half-registered
        assert not target.sas and not target.init_index and not target._child_spis
        return
    (sa,) = target.sas.values()
    assert sa.table is target.sas


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_never_parses_into_a_snapshot_without_a_clear_error(blob: bytes) -> None:
    for parse in (SaSnapshot.from_json, SaSecrets.from_bytes):
        with contextlib.suppress(SnapshotError):
            parse(blob)


def test_a_restored_ike_rekey_in_flight_with_a_delete_queued_behind_it_completes() -> None:
    """The active task (an IKE rekey, its DH value sealed apart) and a queued one (a child
    delete) survive the snapshot; the restored SA finishes both like the original."""
    wire, i_source, _r_source = seeded_wire()
    wire.run(wire.initiator.engine.initiate("hq", "net", wire.now), wire.initiator)
    (i_sa,) = wire.initiator.engine.sas.values()
    (child,) = i_sa.children
    lost: list[SendDatagram] = []
    wire.run(
        wire.initiator.engine.rekey_ike(i_sa, wire.now),
        wire.initiator,
        drop=lambda side, effect: side is wire.initiator and not lost.append(effect),
    )
    assert len(lost) == 1 and i_sa.state == IkeSaState.REKEYING
    assert not datagrams(wire.initiator.engine.delete_child(i_sa, child, wire.now))
    assert len(i_sa.queued) == 1  # behind the rekey
    snapshot, secrets = through_json(i_sa, wire.now)
    assert snapshot.rekey_task == "outstanding" and [t.kind for t in snapshot.queued] == [
        "ChildDeleteTask"
    ]
    assert "outstanding" in secrets.dh
    adopter = engine(INITIATOR_TOML, 2, i_source.clone())
    restored = restore(adopter, snapshot, secrets, wire.now)
    assert restored.rekey_task is restored.outstanding.task  # type: ignore[union-attr]
    due = adopter.next_deadline()
    assert due is not None
    retry = datagrams(adopter.on_timer(due))
    assert retry == datagrams(wire.initiator.engine.on_timer(due)) == [lost[0].data]
    # the restored initiator now talks to the responder on its own
    wire.initiator.engine = adopter
    wire.run([lost[0]], wire.initiator)
    (new,) = adopter.sas.values()
    assert new is not restored and new.state == IkeSaState.ESTABLISHED
    # the queued delete followed the child to the new SA and went out there
    assert new.children == [] and new.outstanding is None
    (r_new,) = wire.responder.engine.sas.values()
    assert r_new.spi_i == new.spi_i and r_new.spi_r == new.spi_r
