"""A live ike worker adopts the shard of a worker whose lease lapsed, and hands it back.

A real nats-server, keystore, (memory) kernel service and ike workers in this
process (docs/failover.md). Worker "ike-1" holds an SA of shard 1 and stops
renewing its lease (as a hung or killed worker does; its timers and writes stop
too); worker "ike-0", live on shard 0, takes the lapsed lease, restores the SA
and continues it: the peer's next exchange goes through it with the same SPIs.
When "ike-1" comes back it asks for its shard; "ike-0" writes the SA as it is
now, forgets it and releases the lease, and "ike-1" continues from there.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from nats.aio.client import Client

from ikefarm.proto import subjects
from ikefarm.proto.messages import KernelShowRequest, KernelState
from ikefarm.services.ike.adoption import ORPHAN_REASON, orphan_children
from ikefarm.services.ike.service import IkeService
from ikefarm.services.ike.shard_claim import CLAIM_TTL, ShardClaim, claim_key
from ikefarm.services.ike.unique_ids import SHARD_SPAN
from ikefarm.services.kernel.service import KernelService
from ikefarm.shared.bus.embedded import EmbeddedNats
from ikefarm.shared.bus.runtime import Runtime
from ikefarm.shared.config.loader import parse_config
from ikefarm.shared.ikev2.effects import InstallChildSa
from ikefarm.shared.ikev2.exchanges.child_create import install_effects
from ikefarm.shared.ikev2.sa import IkeSaState
from tests.service.test_ike_sa_persistence import (
    established_pair,
    farm_config,
    hand_over,
    keystore,
    service,
)

__all__ = ["keystore"]  # the fixture, imported for pytest

pytestmark = pytest.mark.timeout(120)


async def start_worker(url: str, tmp_path: Path, name: str, shard: int) -> Runtime:
    runtime = Runtime(
        IkeService,
        parse_config(farm_config(tmp_path)),
        url,
        instance=name,
        options={"shard": shard},
    )
    await runtime.start()
    return runtime


def hang(worker: IkeService) -> None:
    """The worker stops renewing its lease, writing snapshots and running timers, as a
    killed or hung one does (its process stays for the test to stop later)."""
    for task in (worker._renewer, worker._watcher, worker._persister, worker._timer):
        if task is not None:
            task.cancel()


async def wait_until(predicate, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


async def test_a_live_worker_adopts_a_lapsed_shard_and_hands_it_back(
    nats_server: EmbeddedNats, nats_client: Client, keystore: Runtime, tmp_path: Path
) -> None:
    wire, i_sa, r_sa = established_pair()  # SPIs of shard 1
    owner = await start_worker(nats_server.url, tmp_path, "ike-1", 1)
    live = await start_worker(nats_server.url, tmp_path, "ike-0", 0)
    back: Runtime | None = None
    try:
        await hand_over(service(owner), r_sa)
        hang(service(owner))
        adopter = service(live)
        # the lease lapses CLAIM_TTL after its last renewal; the live worker's next look
        # (every 2 s) takes it
        await wait_until(
            lambda: 1 in adopter.shard_watch.adopted, CLAIM_TTL + 10, "shard 1 adopted"
        )
        kv = await nats_client.jetstream().key_value(subjects.IKE_SHARDS_BUCKET)
        assert (await kv.get(claim_key(1))).value == b"ike-0"
        adopted = adopter.engine.sas[r_sa.local_spi]
        assert adopted.state == IkeSaState.ESTABLISHED
        assert (adopted.spi_i, adopted.spi_r) == (r_sa.spi_i, r_sa.spi_r)
        assert live.counters["shard_adopted"] == 1
        ownership = adopter.gauges()["adopted_shards"]
        assert [row["shard"] for row in ownership] == [1] and ownership[0]["restored"] == 1

        # the peer's next exchange (a new child) goes through the adopting worker
        wire.responder.engine = adopter.engine
        wire.now = time.monotonic()
        wire.run(wire.initiator.engine.create_child(i_sa, "net", wire.now), wire.initiator)
        assert len(adopted.children) == 2
        moved_on = adopted.expected_request_id
        assert moved_on == r_sa.expected_request_id + 1

        # the hung worker goes; it comes back under its name and asks for its shard
        await owner.stop()  # its lease is no longer its own: the stop leaves it alone
        assert (await kv.get(claim_key(1))).value == b"ike-0"
        back = await start_worker(nats_server.url, tmp_path, "ike-1", 1)
        assert (await kv.get(claim_key(1))).value == b"ike-1"
        assert 1 not in adopter.shard_watch.adopted
        assert r_sa.local_spi not in adopter.engine.sas  # one owner only
        assert live.counters["shard_handed_back"] == 1
        returned = service(back).engine.sas[r_sa.local_spi]
        # as the adopter left it: the second child, the message IDs it moved on to
        assert returned.expected_request_id == moved_on
        assert len(returned.children) == 2
    finally:
        for runtime in (back, live):
            if runtime is not None:
                await runtime.stop()


async def test_a_kernel_child_whose_ike_sa_is_gone_is_deleted_when_the_shard_is_taken(
    nats_server: EmbeddedNats, keystore: Runtime, tmp_path: Path
) -> None:
    """A child in the kernel made by shard 1's earlier life (its unique id is in shard 1's
    range) whose IKE SA has no record (the worker died before writing it): the worker
    that takes shard 1 deletes it in the kernel and counts it."""
    kernel = Runtime(
        KernelService,
        parse_config('[kernel]\nbackend = "memory"\n'),
        nats_server.url,
        instance="kernel-0",
    )
    await kernel.start()
    try:
        _wire, _i_sa, r_sa = established_pair()
        first = await start_worker(nats_server.url, tmp_path, "ike-a", 1)
        try:
            child = r_sa.children[0]
            child.unique_id = 1 * SHARD_SPAN + 7  # made by this shard's first life
            for effect in install_effects(r_sa, child):
                if isinstance(effect, InstallChildSa):
                    await service(first).install_child(effect)
        finally:
            await first.stop()  # never knew the IKE SA: no record of it
        state = await kernel.request(
            subjects.KERNEL_SHOW, KernelShowRequest(), KernelState, timeout=2
        )
        assert {row["unique_id"] for row in state.sas} == {child.unique_id}

        second = await start_worker(nats_server.url, tmp_path, "ike-b", 1)
        try:
            await wait_until(
                lambda: second.counters["orphan_child_deleted"] == 1, 10, "orphan deleted"
            )
            state = await kernel.request(
                subjects.KERNEL_SHOW, KernelShowRequest(), KernelState, timeout=2
            )
            assert state.sas == []
            assert kernel.counters["child_delete.ok"] == 1
        finally:
            await second.stop()
    finally:
        await kernel.stop()


def test_orphan_children_are_the_shard_s_unknown_ones_below_this_life() -> None:
    def rows(unique_id: int, spi_in: str, spi_out: str) -> list[dict[str, object]]:
        return [
            {"spi": spi_in, "direction": "in", "unique_id": unique_id, "reqid": 3,
             "src": "192.0.2.2", "dst": "192.0.2.1"},
            {"spi": spi_out, "direction": "out", "unique_id": unique_id, "reqid": 3,
             "src": "192.0.2.1", "dst": "192.0.2.2"},
        ]  # fmt: skip

    base = 2 * SHARD_SPAN
    table = (
        rows(base + 1, "c0000001", "d0000001")  # held here: kept
        + rows(base + 2, "c0000002", "d0000002")  # orphan
        + rows(base + 9000, "c0000003", "d0000003")  # made by this life: kept
        + rows(SHARD_SPAN + 2, "c0000004", "d0000004")  # another shard's: not ours to judge
        + [{"spi": "zz", "unique_id": "x"}, {"direction": "in"}]  # malformed: skipped
    )
    (delete,) = orphan_children(table, 2, {base + 1}, below=base + 4097)
    assert delete.unique_id == base + 2 and delete.reason == ORPHAN_REASON
    assert (delete.spi_in.hex(), delete.spi_out.hex()) == ("c0000002", "d0000002")
    assert (delete.local_address, delete.remote_address) == ("192.0.2.1", "192.0.2.2")


async def test_a_waiting_worker_asks_for_its_shard_and_a_plain_holder_keeps_it(
    nats_client: Client,
) -> None:
    """`hold` asks for the shard back (`want-<n>`) while it waits; a holder that does not
    hand back keeps it, and the waiting worker is refused after its wait."""
    holder = ShardClaim(nats_client, "ike-x")
    await holder.hold(3)
    kv = await nats_client.jetstream().key_value(subjects.IKE_SHARDS_BUCKET)
    waiting = ShardClaim(nats_client, "ike-3")
    task = asyncio.create_task(waiting.hold(3, wait=1.0))
    await asyncio.sleep(0.5)
    assert (await kv.get("want-3")).value == b"ike-3"
    with pytest.raises(Exception, match="held by the live worker 'ike-x'"):
        await task
    await holder.release()
    await asyncio.wait_for(waiting.hold(3, wait=0.0), 5)
    assert (await kv.get(claim_key(3))).value == b"ike-3"
