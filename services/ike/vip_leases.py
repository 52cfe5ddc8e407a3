"""Farm-wide VIP leases in JetStream KV (docs/vip-pools.md).

Records of the bucket `subjects.VIP_LEASE_BUCKET` (keys are hex so any pool name and
IPv6 address fit KV's key alphabet):

- `a.<pool>.<address>`: the address is leased; JSON {identity, owner (the IKE SA's unique
  id, which no worker life reuses), worker (the holder token of the worker's life), since}.
  Taken with KV create (atomic on the broker) or, when it may be reclaimed, with a
  compare-and-set on the revision read: two workers never lease one address.
- `i.<pool>.<sha256(identity)>`: the address this identity held last, so the same identity
  reconnecting gets it back (strongSwan does the same).

A lease is released when its IKE SA is deleted or expires (`VipRelease`: the record is
deleted only if it still names that owner, so a reconnect that took the address over is
not undone by the old SA's deletion). A worker that dies cannot release: each worker life
keeps `w.<token>` in `subjects.VIP_HOLDER_BUCKET`, whose age limit (`HOLDER_TTL`) removes
it unless renewed every `RENEW_INTERVAL`. A lease whose holder record is gone belongs to
SAs that died with their worker and is taken over by the next allocation that meets it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import json
import os
import time
from dataclasses import dataclass
from typing import Any

from nats.js.errors import (
    BadRequestError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    ServiceUnavailableError,
)

from ikefarm.proto import subjects
from ikefarm.shared.bus.kv import bucket_replicas, list_entries
from ikefarm.shared.bus.runtime import ServiceUnavailable
from ikefarm.shared.ikev2.effects import VipLease, VipLeased, VipRelease
from ikefarm.shared.ikev2.pools import Pool

HOLDER_TTL = 10.0  # s: a worker silent this long is dead, its leases reclaimable
RENEW_INTERVAL = 2.0  # s
MAX_RECORD = 4096  # octets: a lease record larger than this is not ours


def _hex(text: str) -> str:
    return text.encode().hex()


def lease_key(pool: str, address: str) -> str:
    return f"a.{_hex(pool)}.{ipaddress.ip_address(address).packed.hex()}"


def identity_key(pool: str, identity: str) -> str:
    return f"i.{_hex(pool)}.{hashlib.sha256(identity.encode()).hexdigest()[:40]}"


def holder_key(token: str) -> str:
    return f"w.{token}"


@dataclass(frozen=True)
class LeaseRecord:
    identity: str
    owner: int
    worker: str
    since: float

    def encode(self) -> bytes:
        return json.dumps(
            {
                "identity": self.identity,
                "owner": self.owner,
                "worker": self.worker,
                "since": self.since,
            }
        ).encode()

    @classmethod
    def decode(cls, raw: bytes | None) -> LeaseRecord | None:
        """The record, or None when it is not one (then it is treated as reclaimable)."""
        if not raw or len(raw) > MAX_RECORD:
            return None
        try:
            data = json.loads(raw)
            return cls(
                str(data["identity"]), int(data["owner"]), str(data["worker"]),
                float(data["since"]),
            )  # fmt: skip
        except (ValueError, KeyError, TypeError):
            return None


async def _bucket(js: Any, name: str, ttl: float | None = None) -> Any:
    """The bucket, made if missing; one made by another worker life with other settings
    (an older TTL) is used as it is."""
    try:
        if ttl is None:
            return await js.create_key_value(bucket=name, history=1, replicas=bucket_replicas())
        return await js.create_key_value(
            bucket=name, history=1, ttl=ttl, replicas=bucket_replicas()
        )
    except BadRequestError:
        return await js.key_value(name)


class VipLeases:
    """One worker's view of the farm's leases: lease, release, list."""

    def __init__(
        self, nc: Any, pools: dict[str, Pool], counters: Any = None, holder_ttl: float = HOLDER_TTL
    ) -> None:
        self.nc = nc
        self.holder_ttl = holder_ttl
        self.pools = pools
        self.token = os.urandom(8).hex()  # this worker life
        self.counters = counters if counters is not None else {}
        self._kv: Any = None
        self._holders: Any = None

    async def open(self) -> None:
        js = self.nc.jetstream()
        try:
            self._kv = await _bucket(js, subjects.VIP_LEASE_BUCKET)
            self._holders = await _bucket(js, subjects.VIP_HOLDER_BUCKET, self.holder_ttl)
        except ServiceUnavailableError:
            raise ServiceUnavailable(
                "VIP pools keep their leases in a JetStream KV bucket "
                f"({subjects.VIP_LEASE_BUCKET}): enable JetStream on the NATS server "
                "(nats-server -js)"
            ) from None
        await self.renew()

    async def renew(self) -> None:
        await self._holders.put(holder_key(self.token), str(time.time()).encode())

    async def retire(self) -> None:
        """A worker stopping: its SAs end with it, so its leases may be taken at once."""
        if self._holders is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._holders.delete(holder_key(self.token)), 2.0)

    async def keep_alive(self, log: Any) -> None:
        while True:
            await asyncio.sleep(RENEW_INTERVAL)
            try:
                await self.renew()
            except Exception as exc:  # the store is away: leases stay, retry
                log.control("vip_holder_renew_failed", error=type(exc).__name__)

    async def _alive(self, worker: str, cache: dict[str, bool]) -> bool:
        if worker == self.token:
            return True
        if worker not in cache:
            try:
                await self._holders.get(holder_key(worker))
                cache[worker] = True
            except KeyNotFoundError:
                cache[worker] = False
        return cache[worker]

    async def _take(
        self, pool: str, address: str, record: LeaseRecord, alive: dict[str, bool]
    ) -> bool:
        """Lease `address` for `record` if it is free, ours to take over, or stale."""
        key = lease_key(pool, address)
        try:
            entry = await self._kv.get(key)
        except KeyNotFoundError:
            try:
                await self._kv.create(key, record.encode())
                return True
            except KeyWrongLastSequenceError:
                return False  # another worker took it just now
        held = LeaseRecord.decode(entry.value)
        if held is not None and held.identity != record.identity:
            if await self._alive(held.worker, alive):
                return False
            self._count("vip.lease_reclaimed")
        try:
            await self._kv.update(key, record.encode(), last=entry.revision)
            return True
        except KeyWrongLastSequenceError:
            return False

    def _count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1

    async def lease(self, call: VipLease) -> VipLeased:
        """One address per family asked, from the first of the VPN's pools that has one."""
        record = LeaseRecord(call.identity, call.ike_unique_id, self.token, time.time())
        alive: dict[str, bool] = {}
        granted: list[tuple[str, str]] = []
        for version in call.versions:
            found = await self._lease_one(call, version, record, alive)
            if found is not None:
                granted.append(found)
            else:
                self._count(f"vip.exhausted.v{version}")
        return VipLeased(tuple(granted))

    async def _lease_one(
        self, call: VipLease, version: int, record: LeaseRecord, alive: dict[str, bool]
    ) -> tuple[str, str] | None:
        pools = [self.pools[n] for n in call.pools if n in self.pools]
        pools = [p for p in pools if p.size(version) > 0]
        for pool in pools:  # the identity's previous address first
            previous = await self._previous(pool, call.identity)
            if (
                previous is not None
                and ipaddress.ip_address(previous).version == version
                and pool.index_of(previous) is not None
                and await self._take(pool.name, previous, record, alive)
            ):
                return pool.name, previous
        digest = int.from_bytes(hashlib.sha256(call.identity.encode()).digest()[:8], "big")
        for pool in pools:
            size = pool.size(version)
            start = digest % size
            for step in range(size):
                address = str(pool.address_at(version, (start + step) % size))
                if await self._take(pool.name, address, record, alive):
                    with contextlib.suppress(Exception):
                        await self._kv.put(identity_key(pool.name, call.identity), address.encode())
                    return pool.name, address
        return None

    async def _previous(self, pool: Pool, identity: str) -> str | None:
        try:
            entry = await self._kv.get(identity_key(pool.name, identity))
        except KeyNotFoundError:
            return None
        try:
            return str(ipaddress.ip_address((entry.value or b"")[:64].decode()))
        except (ValueError, UnicodeDecodeError):
            return None

    async def release(self, effect: VipRelease) -> None:
        for pool, address in effect.addresses:
            key = lease_key(pool, address)
            try:
                entry = await self._kv.get(key)
            except KeyNotFoundError:
                continue
            held = LeaseRecord.decode(entry.value)
            if held is None or held.owner != effect.ike_unique_id:
                continue  # taken over (reconnect, reclaim): not ours to free any more
            try:
                await self._kv.delete(key, last=entry.revision)
            except Exception:  # changed meanwhile: its new owner frees it
                self._count("vip.release_raced")
            else:
                self._count("vip.released")

    async def adopt(self, owner: int, addresses: Any) -> int:
        """The leases of an adopted IKE SA (`owner`, its unique id) name this worker's life
        from now on (compare-and-set on the revision read; a lease another SA took over
        meanwhile is left alone): a worker that continues a dead worker's SAs keeps their
        addresses from being reclaimed. The count rewritten."""
        rewritten = 0
        for pool, address in addresses:
            key = lease_key(pool, address)
            try:
                entry = await self._kv.get(key)
            except KeyNotFoundError:
                self._count("vip.adopt_lost")  # reclaimed and freed meanwhile
                continue
            held = LeaseRecord.decode(entry.value)
            if held is None or held.owner != owner:
                self._count("vip.adopt_taken")  # another SA's now: not ours to rewrite
                continue
            if held.worker == self.token:
                continue
            record = LeaseRecord(held.identity, owner, self.token, held.since)
            try:
                await self._kv.update(key, record.encode(), last=entry.revision)
            except KeyWrongLastSequenceError:
                self._count("vip.adopt_raced")
                continue
            rewritten += 1
            self._count("vip.adopted")
        return rewritten

    async def leases(self, pool: Pool) -> list[tuple[str, LeaseRecord | None, bool]]:
        """Every lease of `pool`: (address, record, holder alive)."""
        prefix = f"a.{_hex(pool.name)}."
        # not `kv.keys()`: its watcher may say "no more" before the keys arrive (kv.py)
        entries = await list_entries(self._kv, f"{prefix}>", ignore_deletes=True)
        alive: dict[str, bool] = {}
        out: list[tuple[str, LeaseRecord | None, bool]] = []
        for entry in entries:
            key = entry.key
            if not key.startswith(prefix) or entry.value is None:
                continue
            try:
                address = str(ipaddress.ip_address(bytes.fromhex(key[len(prefix) :])))
            except ValueError:
                continue
            record = LeaseRecord.decode(entry.value)
            live = record is not None and await self._alive(record.worker, alive)
            out.append((address, record, live))
        out.sort(
            key=lambda item: (ipaddress.ip_address(item[0]).version, ipaddress.ip_address(item[0]))
        )
        return out
