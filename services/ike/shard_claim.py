"""`--shard auto`: an ike worker claims the lowest free SPI shard in a JetStream KV bucket.

`ikefarm up` numbers its workers itself; a worker started by a container
orchestrator (`docker compose up --scale ike=N`) has nobody to number it. Such
a worker creates the key `shard-<N>` of the bucket `subjects.IKE_SHARDS_BUCKET`
for the lowest N whose key does not exist: KV create is atomic on the broker,
so two workers starting together never get the same shard. The worker renews
its key (compare-and-set on the revision it holds) every `RENEW_INTERVAL`; the
bucket's age limit (`CLAIM_TTL`) frees the key of a worker that died without
deleting it, so its replacement takes the same shard. A worker that finds its
key taken by another (it was stopped longer than the TTL) exits, and its
orchestrator restarts it with a fresh claim; two owners of one shard would
split its SAs. A claim held under the claiming worker's own instance name is its
previous life's (a restarted container keeps its hostname and pid) and is taken
over at once, with the shard's SA snapshots (docs/failover.md).

A worker given its shard (`ikefarm up` numbers them) holds the same key as a
lease (`hold`): the shard's SA snapshots (`sa_store.py`, docs/failover.md) are
restored by whoever holds it. A lease still held under this worker's own
instance name is its previous life's (`ikefarm up` restarts a dead worker under
the same name) and is taken over at once; one held by another instance is
waited for until it expires (a worker that stopped renewing loses it within
`CLAIM_TTL`); one another worker keeps renewing is refused, and the worker
exits rather than run a shard twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from typing import Any

from nats.aio.client import Client
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, ServiceUnavailableError

from ikefarm.proto import subjects
from ikefarm.proto.sharding import MAX_SHARDS
from ikefarm.shared.bus.kv import bucket_replicas
from ikefarm.shared.bus.runtime import ServiceUnavailable

SHARD_AUTO = "auto"  # `ikefarm service ike --shard auto`
CLAIM_TTL = 10.0  # s: a claim not renewed for this long is free again
RENEW_INTERVAL = 2.0  # s


def claim_key(shard: int) -> str:
    return f"shard-{shard}"


def want_key(shard: int) -> str:
    """A worker waiting for its shard, held by the live worker that adopted it while it was
    gone, asks for it back here (services/ike/adoption.py); the bucket's age limit removes
    the ask of a worker that gave up."""
    return f"want-{shard}"


class ShardLost(RuntimeError):
    """Another worker holds the shard this one claimed."""


class ShardClaim:
    def __init__(self, nc: Client, instance: str, max_shards: int = MAX_SHARDS) -> None:
        self.nc = nc
        self.instance = instance.encode()
        self.max_shards = max_shards
        self.shard: int | None = None
        self._revision = 0
        self._kv: Any = None
        self.renewed_at: float | None = None  # monotonic: when the lease was last written

    async def _bucket(self) -> Any:
        js = self.nc.jetstream()
        try:
            return await js.create_key_value(
                bucket=subjects.IKE_SHARDS_BUCKET,
                history=1,
                ttl=CLAIM_TTL,
                replicas=bucket_replicas(),  # a cluster node that dies keeps no lease with it
            )
        except ServiceUnavailableError:
            raise ServiceUnavailable(
                "`--shard auto` claims a shard in a JetStream KV bucket "
                f"({subjects.IKE_SHARDS_BUCKET}): enable JetStream on the NATS server "
                "(nats-server -js)"
            ) from None

    async def claim(self) -> int:
        """The lowest shard no live worker holds, now held by this one."""
        self._kv = await self._bucket()
        for shard in range(self.max_shards):
            try:
                self._revision = await self._kv.create(claim_key(shard), self.instance)
                self.renewed_at = time.monotonic()
            except KeyWrongLastSequenceError:
                if not await self._take_over(shard):
                    continue
            self.shard = shard
            return shard
        raise ServiceUnavailable(f"every one of the {self.max_shards} ike shards is claimed")

    async def _take_over(self, shard: int) -> bool:
        """Take a claim held under this instance's own name: its previous life's (a container
        restarted keeps its hostname and, as pid 1, its pid), whose SAs it adopts."""
        try:
            entry = await self._kv.get(claim_key(shard))
        except KeyNotFoundError:
            return False
        if entry.value != self.instance:
            return False
        try:
            self._revision = await self._kv.update(
                claim_key(shard), self.instance, last=entry.revision
            )
            self.renewed_at = time.monotonic()
        except KeyWrongLastSequenceError:
            return False
        return True

    async def hold(self, shard: int, wait: float = CLAIM_TTL + RENEW_INTERVAL) -> None:
        """Take the lease of `shard`: free, this instance's previous life's, expired or
        handed back within `wait`; ServiceUnavailable when another worker keeps it.

        While another worker holds it, this one asks for it back (`want_key`): a worker
        that adopted the shard while its owner was gone hands it back (adoption.py)."""
        self._kv = await self._bucket()
        key = claim_key(shard)
        deadline = time.monotonic() + wait
        asked = -math.inf
        while True:
            try:
                self._revision = await self._kv.create(key, self.instance)
                self.renewed_at = time.monotonic()
                break
            except KeyWrongLastSequenceError:
                pass
            if await self._take_over(shard):
                break
            if time.monotonic() - asked >= RENEW_INTERVAL:
                asked = time.monotonic()
                with contextlib.suppress(Exception):  # asking is a courtesy: the TTL still frees it
                    await self._kv.put(want_key(shard), self.instance)
            if time.monotonic() >= deadline:
                try:
                    holder = ((await self._kv.get(key)).value or b"").decode(errors="replace")
                except KeyNotFoundError:
                    continue  # expired or released meanwhile: take it next turn
                holder = holder[:64]
                raise ServiceUnavailable(
                    f"shard {shard} is held by the live worker {holder!r}: two owners would "
                    "split its SAs"
                )
            await asyncio.sleep(RENEW_INTERVAL / 4)
        self.shard = shard
        if asked > -math.inf:
            with contextlib.suppress(Exception):
                await self._kv.delete(want_key(shard))

    async def take_lapsed(self, shard: int) -> bool:
        """Take the lease of `shard` if nobody holds it (its holder stopped renewing and the
        age limit removed it): atomic on the broker, so one adopter wins."""
        self._kv = await self._bucket()
        try:
            self._revision = await self._kv.create(claim_key(shard), self.instance)
            self.renewed_at = time.monotonic()
        except KeyWrongLastSequenceError:
            return False
        self.shard = shard
        return True

    async def take_own(self, shard: int) -> bool:
        """Take the lease of `shard` if it is held under this instance's name (this worker's
        previous life had adopted it)."""
        self._kv = await self._bucket()
        if not await self._take_over(shard):
            return False
        self.shard = shard
        return True

    async def renew(self) -> None:
        """Refresh the claim; ShardLost when another worker holds the key now."""
        assert self._kv is not None and self.shard is not None
        key = claim_key(self.shard)
        try:
            self._revision = await self._kv.update(key, self.instance, last=self._revision)
            self.renewed_at = time.monotonic()
        except KeyWrongLastSequenceError:
            # expired while we were stopped: take it again unless another worker did
            try:
                self._revision = await self._kv.create(key, self.instance)
                self.renewed_at = time.monotonic()
            except KeyWrongLastSequenceError:
                raise ShardLost(f"shard {self.shard} is held by another worker") from None

    def lease_age(self, now: float) -> float | None:
        """Seconds since this worker last wrote its lease (None before the first)."""
        return None if self.renewed_at is None else round(now - self.renewed_at, 1)

    async def release(self) -> None:
        if self._kv is None or self.shard is None:
            return
        # only the lease as this worker last wrote it: one another worker took meanwhile
        # (adopted while this one hung) is not this worker's to delete
        with contextlib.suppress(KeyNotFoundError, Exception):
            await asyncio.wait_for(self._kv.delete(claim_key(self.shard), last=self._revision), 2.0)
