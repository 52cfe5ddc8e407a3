"""A shard lease across a restart of the nats-server (docs/failover.md, "The bus and the
keystore"): JetStream keeps the lease on disk; a restart shorter than the lease's TTL finds
it as it was and the holder's next renewal continues it; after a longer outage the server
has expired it, and the holder takes it again unless another worker claimed it meanwhile."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client

from ikefarm.services.ike import shard_claim
from ikefarm.services.ike.shard_claim import ShardClaim, ShardLost, claim_key
from ikefarm.shared.bus.embedded import EmbeddedNats

pytestmark = pytest.mark.timeout(90)
TTL = 2.0  # s: the lease bucket's age limit here (10 s in the farm)


async def reconnecting(url: str) -> Client:
    return await nats.connect(
        servers=[url], max_reconnect_attempts=-1, reconnect_time_wait=0.1, allow_reconnect=True
    )


async def connected(nc: Client, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not nc.is_connected:
        assert time.monotonic() < deadline, "no reconnect"
        await asyncio.sleep(0.05)


async def renewed(lease: ShardClaim, within: float = 15.0) -> int:
    """Renew as the worker does, every so often until it goes through (the first requests
    after a reconnect may time out while JetStream recovers its streams); the failures."""
    failures = 0
    deadline = time.monotonic() + within
    while True:
        try:
            await asyncio.wait_for(lease.renew(), 3.0)
            return failures
        except ShardLost:
            raise
        except Exception:
            failures += 1
            assert time.monotonic() < deadline, "the lease was never renewed"
            await asyncio.sleep(0.2)


@pytest.fixture
async def broker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> AsyncIterator[EmbeddedNats]:
    monkeypatch.setattr(shard_claim, "CLAIM_TTL", getattr(request, "param", TTL))
    server = EmbeddedNats(tmp_path / "nats")
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def holder_of(nc: Client, shard: int) -> bytes:
    kv = await nc.jetstream().key_value("ikefarm-ike-shards")
    return (await kv.get(claim_key(shard))).value or b""


@pytest.mark.parametrize("broker", [shard_claim.CLAIM_TTL], indirect=True)  # the farm's
async def test_a_restart_shorter_than_the_ttl_keeps_the_lease_as_it_was(
    broker: EmbeddedNats,
) -> None:
    nc = await reconnecting(broker.url)
    try:
        lease = ShardClaim(nc, "ike-0")
        await lease.hold(0)
        revision = lease._revision
        broker.stop()  # SIGTERM; kill -9 keeps the store the same way (what JetStream synced)
        broker.start()  # same port, same store
        await connected(nc)
        await renewed(lease)  # within the TTL: the same lease, updated
        assert lease._revision > revision
        assert await holder_of(nc, 0) == b"ike-0"
    finally:
        await nc.close()


async def test_after_a_longer_outage_the_holder_takes_its_lease_again(
    broker: EmbeddedNats,
) -> None:
    nc = await reconnecting(broker.url)
    try:
        lease = ShardClaim(nc, "ike-0")
        await lease.hold(0)
        broker.stop()
        await asyncio.sleep(TTL + 0.5)  # longer than the lease lives
        broker.start()
        await connected(nc)
        await renewed(lease)  # expired on the server: created again by its holder
        assert await holder_of(nc, 0) == b"ike-0"
    finally:
        await nc.close()


async def test_after_a_longer_outage_a_lease_another_worker_took_is_lost(
    broker: EmbeddedNats,
) -> None:
    nc = await reconnecting(broker.url)
    other_nc: Client | None = None
    try:
        lease = ShardClaim(nc, "ike-0")
        await lease.hold(0)
        broker.stop()
        await asyncio.sleep(TTL + 0.5)
        broker.start()
        other_nc = await reconnecting(broker.url)
        other = ShardClaim(other_nc, "ike-auto-7")
        assert await other.claim() == 0  # free on the server: another worker claims it
        await connected(nc)
        with pytest.raises(ShardLost):  # the old holder never runs the shard twice
            await renewed(lease)
        assert await holder_of(nc, 0) == b"ike-auto-7"
    finally:
        if other_nc is not None:
            await other_nc.close()
        await nc.close()
