"""IKE SA snapshots in JetStream KV, secrets sealed by the keystore, restored on restart.

A real nats-server, a real keystore and real ike workers (docs/failover.md). An
SA negotiated by in-memory engines (`tests/engine_helpers.py`) is handed to the
worker of its shard; the worker writes its snapshot, the keys only as the
keystore sealed them. A worker started again on that shard restores the SA with
its SPIs and message IDs, and the peer's next exchange goes through it. Records
that are damaged (a broken seal, another schema, garbage) are refused one by
one, counted and logged, and the worker runs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nats.aio.client import Client

from ikefarm.proto import subjects
from ikefarm.services.ike import sa_store
from ikefarm.services.ike.sa_store import Record, RecordError
from ikefarm.services.ike.service import IkeService
from ikefarm.services.ike.shard_claim import ShardClaim, ShardLost
from ikefarm.services.kernel.service import KernelService
from ikefarm.services.keystore.service import KeystoreService
from ikefarm.shared.bus.embedded import EmbeddedNats
from ikefarm.shared.bus.runtime import Runtime, ServiceUnavailable
from ikefarm.shared.config.loader import parse_config
from ikefarm.shared.ikev2.sa import IkeSa, IkeSaState
from ikefarm.shared.ikev2.snapshot import SaSnapshot, take
from tests.engine_helpers import RESPONDER_TOML, Wire, pair

pytestmark = pytest.mark.timeout(90)

SHARD = 1  # the responder engine of `pair()` hands out SPIs of shard 1


def farm_config(tmp_path: Path) -> str:
    store = tmp_path / "keystore.bin"
    return RESPONDER_TOML.format(extra="", extra_vpn="") + f'[keystore]\nstore-file = "{store}"\n'


@pytest.fixture
async def keystore(nats_server: EmbeddedNats, tmp_path: Path) -> AsyncIterator[Runtime]:
    runtime = Runtime(
        KeystoreService, parse_config(farm_config(tmp_path)), nats_server.url, instance="ks-0"
    )
    await runtime.start()
    try:
        yield runtime
    finally:
        await runtime.stop()


async def start_worker(url: str, tmp_path: Path, name: str) -> Runtime:
    runtime = Runtime(
        IkeService,
        parse_config(farm_config(tmp_path)),
        url,
        instance=name,
        options={"shard": SHARD},
    )
    await runtime.start()
    return runtime


def service(runtime: Runtime) -> IkeService:
    assert isinstance(runtime.service, IkeService)
    return runtime.service


def established_pair() -> tuple[Wire, IkeSa, IkeSa]:
    wire = pair()
    wire.now = time.monotonic()
    wire.run(wire.initiator.engine.initiate("hq", "net", wire.now), wire.initiator)
    (i_sa,) = wire.initiator.engine.sas.values()
    (r_sa,) = wire.responder.engine.sas.values()
    assert r_sa.state == IkeSaState.ESTABLISHED and r_sa.children
    return wire, i_sa, r_sa


async def hand_over(worker: IkeService, r_sa: IkeSa) -> IkeSa:
    """The SA as if this worker had negotiated it, written to the store."""
    now = time.monotonic()
    state, secrets = take(r_sa, now)
    sa = worker.engine.restore(SaSnapshot.from_json(state.to_json()), secrets, now)
    worker.sa_store.mark(sa.local_spi)
    await worker.sa_store.flush()
    return sa


async def written_by_a_worker(url: str, tmp_path: Path, r_sa: IkeSa) -> IkeSa:
    """The SA handed to a worker that writes it and stops."""
    first = await start_worker(url, tmp_path, "ike-a")
    try:
        return await hand_over(service(first), r_sa)
    finally:
        await first.stop()


async def stored(nc: Client, sa: IkeSa) -> bytes:
    kv = await nc.jetstream().key_value(subjects.IKE_SA_BUCKET)
    entry = await kv.get(subjects.ike_sa_key(SHARD, sa.local_spi))
    assert entry.value
    return entry.value


async def test_a_restarted_worker_continues_the_sa_and_the_keys_never_show(
    nats_server: EmbeddedNats, nats_client: Client, keystore: Runtime, tmp_path: Path
) -> None:
    wire, i_sa, r_sa = established_pair()
    sa = await written_by_a_worker(nats_server.url, tmp_path, r_sa)
    raw = await stored(nats_client, sa)
    # no key in clear in JetStream: neither the IKE SA's nor a child's
    assert r_sa.keys is not None
    secrets = [r_sa.keys.sk_d, r_sa.keys.sk_ei, r_sa.keys.sk_er, r_sa.keys.sk_pi]
    for child in r_sa.children:
        secrets += [child.keys.encr_i, child.keys.encr_r]
    for secret in secrets:
        assert secret not in raw and secret.hex().encode() not in raw

    second = await start_worker(nats_server.url, tmp_path, "ike-b")
    try:
        worker = service(second)
        adopted = worker.engine.sas.get(r_sa.local_spi)
        assert adopted is not None and adopted.state == IkeSaState.ESTABLISHED
        assert (adopted.spi_i, adopted.spi_r) == (r_sa.spi_i, r_sa.spi_r)
        assert adopted.expected_request_id == r_sa.expected_request_id
        assert [c.spi_in for c in adopted.children] == [c.spi_in for c in r_sa.children]
        # the peer's next exchange (a new child) goes through the adopted SA's keys
        wire.responder.engine = worker.engine
        wire.now = time.monotonic()
        before = len(i_sa.children)
        wire.run(wire.initiator.engine.create_child(i_sa, "net", wire.now), wire.initiator)
        assert len(i_sa.children) == before + 1 and len(adopted.children) == before + 1
        assert worker.engine.counters.get("decrypt_failed", 0) == 0
        # the worker marks an SA on its datagrams; the test fed the engine itself, so it
        # marks: the persister writes the new state, and the next life has the new child
        worker.sa_store.mark(adopted.local_spi)
        for _ in range(100):
            if worker.sa_store.counters["written"]:
                break
            await asyncio.sleep(0.05)
        assert worker.sa_store.counters["written"] == 1
    finally:
        await second.stop()
    third = await start_worker(nats_server.url, tmp_path, "ike-c")
    try:
        again = service(third).engine.sas.get(r_sa.local_spi)
        assert again is not None and len(again.children) == before + 1
        assert again.expected_request_id == adopted.expected_request_id
    finally:
        await third.stop()


async def test_a_deleted_sa_leaves_the_store(
    nats_server: EmbeddedNats, nats_client: Client, keystore: Runtime, tmp_path: Path
) -> None:
    _wire, _i_sa, r_sa = established_pair()
    runtime = await start_worker(nats_server.url, tmp_path, "ike-a")
    try:
        worker = service(runtime)
        sa = await hand_over(worker, r_sa)
        await stored(nats_client, sa)
        worker.engine.sas.pop(sa.local_spi)
        worker.sa_store.sweep()
        await worker.sa_store.flush()
        assert worker.sa_store.counters["deleted"] == 1
        kv = await nats_client.jetstream().key_value(subjects.IKE_SA_BUCKET)
        with pytest.raises(Exception, match=r"not found|deleted"):
            await kv.get(subjects.ike_sa_key(SHARD, sa.local_spi))
    finally:
        await runtime.stop()


async def test_adopted_children_the_kernel_lost_are_rekeyed_the_others_kept(
    nats_server: EmbeddedNats, keystore: Runtime, tmp_path: Path
) -> None:
    """A kernel service that restarted too (memory backend: the test double for its state)
    has none of the adopted children: the worker rekeys them at once. (Children the kernel
    still has are kept as they are: `tests/interop/test_failover_strongswan.py`.)"""
    _wire, _i_sa, r_sa = established_pair()
    kernel = Runtime(
        KernelService,
        parse_config('[kernel]\nbackend = "memory"\n'),
        nats_server.url,
        instance="kernel-0",
    )
    await kernel.start()
    try:
        await written_by_a_worker(nats_server.url, tmp_path, r_sa)
        second = await start_worker(nats_server.url, tmp_path, "ike-b")
        try:
            adopted = service(second).engine.sas[r_sa.local_spi]
            for _ in range(100):
                if adopted.outstanding is not None:
                    break
                await asyncio.sleep(0.05)
            assert second.counters["adopted_child_missing_in_kernel"] == 1
            assert adopted.outstanding is not None
            assert type(adopted.outstanding.task).__name__ == "ChildRekeyTask"
        finally:
            await second.stop()
    finally:
        await kernel.stop()


def broken_seal(raw: bytes) -> bytes:
    record = Record.unpack(raw)
    secrets = bytearray(record.sealed_secrets)
    secrets[-1] ^= 1
    return Record(record.snapshot, bytes(secrets)).pack()


def other_schema(raw: bytes) -> bytes:
    record = Record.unpack(raw)
    return Record(
        record.snapshot.replace(b'"version":1', b'"version":99'), record.sealed_secrets
    ).pack()


def moved_key(raw: bytes) -> bytes:
    return raw  # put under another SPI's key below: the seal is bound to its key


@pytest.mark.parametrize(
    ("damage", "reason", "message"),
    [
        (broken_seal, "seal", "refused the sealed secrets"),
        (other_schema, "schema", "schema version 99"),
        (lambda raw: b"\x93garbage", "record", "record"),
        (moved_key, "schema", "SPI is not the one of its key"),
    ],
)
async def test_a_damaged_record_is_refused_counted_and_the_worker_runs(
    nats_server: EmbeddedNats,
    nats_client: Client,
    keystore: Runtime,
    tmp_path: Path,
    damage: object,
    reason: str,
    message: str,
) -> None:
    _wire, _i_sa, r_sa = established_pair()
    sa = await written_by_a_worker(nats_server.url, tmp_path, r_sa)
    kv = await nats_client.jetstream().key_value(subjects.IKE_SA_BUCKET)
    raw = await stored(nats_client, sa)
    key = subjects.ike_sa_key(SHARD, sa.local_spi)
    if damage is moved_key:
        await kv.delete(key)
        key = subjects.ike_sa_key(SHARD, bytes(7) + b"\x01")
    assert callable(damage)
    await kv.put(key, damage(raw))
    second = await start_worker(nats_server.url, tmp_path, "ike-b")
    try:
        worker = service(second)
        assert worker.engine.sas.get(sa.local_spi) is None
        assert second.counters[f"snapshot_refused.{reason}"] == 1
        ((refused_key, refused_reason, detail),) = worker.sa_store.recent_refusals
        assert (refused_key, refused_reason) == (key, reason) and message in detail
        assert worker.sa_store.counters["restored"] == 0
    finally:
        await second.stop()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_record_unpack_takes_only_a_record(raw: bytes) -> None:
    try:
        record = Record.unpack(raw)
    except RecordError:
        return
    assert msgpack.unpackb(raw)["format"] == sa_store.RECORD_FORMAT
    assert isinstance(record.snapshot, bytes)


async def test_a_shard_lease_is_taken_over_by_the_same_worker_and_refused_to_another(
    nats_client: Client,
) -> None:
    first = ShardClaim(nats_client, "ike-2")
    await first.hold(2)
    # `ikefarm up` restarts a dead worker under its name: the lease is taken over at once
    again = ShardClaim(nats_client, "ike-2")
    await asyncio.wait_for(again.hold(2, wait=0.0), 5)
    # another worker while the holder renews: refused, never a second owner
    other = ShardClaim(nats_client, "ike-x")
    with pytest.raises(ServiceUnavailable, match="held by the live worker 'ike-2'"):
        await other.hold(2, wait=0.5)
    await again.release()
    await asyncio.wait_for(other.hold(2, wait=0.0), 5)  # released: free at once
    with pytest.raises(ShardLost):
        await again.renew()  # the old holder finds it taken and stops


async def test_an_auto_claim_takes_its_own_previous_life_s_shard_back(
    nats_client: Client,
) -> None:
    first = ShardClaim(nats_client, "ike-host-1", max_shards=4)
    assert await first.claim() == 0
    other = ShardClaim(nats_client, "ike-other-7", max_shards=4)
    assert await other.claim() == 1
    # a restarted container: same hostname, pid 1 again; its claim has not expired yet
    again = ShardClaim(nats_client, "ike-host-1", max_shards=4)
    assert await again.claim() == 0
    stranger = ShardClaim(nats_client, "ike-new-9", max_shards=4)
    assert await stranger.claim() == 2


async def test_writes_wait_for_an_absent_keystore_and_go_out_when_it_is_back(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    _wire, _i_sa, r_sa = established_pair()
    runtime = await start_worker(nats_server.url, tmp_path, "ike-a")
    try:
        worker = service(runtime)
        worker._persister.cancel()  # the flushes below are the test's own, one at a time
        now = time.monotonic()
        state, secrets = take(r_sa, now)
        sa = worker.engine.restore(SaSnapshot.from_json(state.to_json()), secrets, now)
        worker.sa_store.mark(sa.local_spi)
        with pytest.raises(Exception):  # noqa: B017 - no keystore answers on the bus
            await worker.sa_store.flush()
        assert sa.local_spi in worker.sa_store.dirty  # kept for the next turn
        keystore = Runtime(
            KeystoreService, parse_config(farm_config(tmp_path)), nats_server.url, instance="ks"
        )
        await keystore.start()
        try:
            assert await worker.sa_store.flush() == 1
            assert worker.sa_store.stored == {sa.local_spi}
        finally:
            await keystore.stop()
    finally:
        await runtime.stop()
