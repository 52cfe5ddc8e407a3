"""A live ike worker adopts the shard of a worker whose lease lapsed, and hands it back.

Shards are leases in the KV bucket `subjects.IKE_SHARDS_BUCKET` (`shard_claim.py`):
key `shard-<n>`, value the holder's instance name, renewed every `RENEW_INTERVAL`,
removed by the bucket's age limit `CLAIM_TTL` after the last renewal. Every
`RENEW_INTERVAL` each worker reads the bucket (`ShardWatch.tick`, one listing of a
handful of keys) and acts on what changed since the previous look:

- a lease seen before that is gone without a delete marker **lapsed**: its holder
  stopped renewing (kill -9, a hung or cut-off host). The worker takes it with a KV
  create (atomic on the broker: one adopter wins) and adopts the shard: its SA
  records are restored into this worker's engine (`SaStore.load(shard)`, secrets
  unsealed by the keystore to this worker), their timers resume, and the worker
  subscribes to the shard's datagram and command subjects and reports the shard's
  load, so ingress (which routes by the SPI's shard bits and forwards to a shard
  while a worker reports it) sends the shard's datagrams here.
- a lease gone with a delete marker was **released** (a graceful stop: `ikefarm
  down`, a scale-down): nobody adopts it; its records wait for the shard's next
  holder, as before.
- a lease held under this worker's own instance name that it does not hold is its
  previous life's adoption (`ikefarm up` restarts a worker under the same name):
  taken over and adopted at once.
- a `want-<n>` key (the shard's own worker, back and waiting in
  `ShardClaim.hold`) for a shard this worker adopted: the shard is **handed back**.
  The worker stops taking the shard's datagrams, writes every SA of it as it is now
  and takes them out of its engine (`SaStore.hand_back`: nothing is sent to the
  peer, nothing changes in the kernel), and deletes the lease; the waiting worker
  creates it and restores the SAs. So a shard never has two owners: the lease
  moves only by create (after a lapse or a release) or by its holder's own hand.

Time here is the worker's monotonic clock: a lease counts as lapsed once the
listing no longer shows it, which the broker decides by its age limit; a worker
whose own clock is off cannot take a lease that is still there.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from nats.aio.client import Client

from ikefarm.proto.messages import ChildDelete
from ikefarm.services.ike.shard_claim import ShardClaim, claim_key, want_key
from ikefarm.shared.bus.kv import list_entries

LIST_TIMEOUT = 2.0


@dataclass
class AdoptedShard:
    """A shard this worker holds besides its own."""

    shard: int
    claim: ShardClaim
    since: float  # monotonic
    restored: int = 0
    subscriptions: list[Any] = field(default_factory=list)


@dataclass(frozen=True)
class Lease:
    key: str
    holder: str  # "" for a delete marker
    deleted: bool


def _shard_of(key: str, prefix: str) -> int | None:
    if not key.startswith(prefix):
        return None
    digits = key[len(prefix) :]
    if not digits.isdigit() or len(digits) > 5:
        return None
    return int(digits)


async def list_leases(kv: Any) -> dict[str, Lease]:
    """The bucket's keys as they are now: the last value of each, delete markers included."""
    leases: dict[str, Lease] = {}
    for entry in await list_entries(kv, timeout=LIST_TIMEOUT):
        deleted = entry.operation is not None
        holder = "" if deleted else (entry.value or b"")[:128].decode(errors="replace")
        leases[entry.key] = Lease(entry.key, holder, deleted)
    return leases


class ShardWatch:
    """Which shards lapsed, which this worker adopted, and which are wanted back."""

    def __init__(
        self,
        nc: Client,
        instance: str,
        own_shard: int,
        adopt: Callable[[int, ShardClaim], Awaitable[None]],
        hand_back: Callable[[AdoptedShard], Awaitable[None]],
        log: Any,
        counters: Any,
    ) -> None:
        self.nc = nc
        self.instance = instance
        self.own_shard = own_shard
        self._adopt = adopt
        self._hand_back = hand_back
        self.log = log
        self.counters = counters
        self.adopted: dict[int, AdoptedShard] = {}
        self._seen: set[int] = set()  # shards held by another worker at the previous look
        self._kv: Any = None

    async def tick(self) -> None:
        if self._kv is None:
            self._kv = await ShardClaim(self.nc, self.instance)._bucket()
        leases = await list_leases(self._kv)
        held: dict[int, str] = {}
        released: set[int] = set()
        wanted: dict[int, str] = {}
        for lease in leases.values():
            shard = _shard_of(lease.key, "shard-")
            if shard is not None:
                if lease.deleted:
                    released.add(shard)
                else:
                    held[shard] = lease.holder
                continue
            shard = _shard_of(lease.key, "want-")
            if shard is not None and not lease.deleted and lease.holder != self.instance:
                wanted[shard] = lease.holder
        for shard, adopted in list(self.adopted.items()):
            if shard in wanted:
                self.log.control("shard_wanted_back", shard=shard, by=wanted[shard][:64])
                await self._give_back(adopted)
            else:
                await self._renew(adopted)
        for shard, holder in held.items():
            if shard == self.own_shard or shard in self.adopted:
                continue
            if holder == self.instance and shard not in wanted:
                # this worker's previous life had adopted it (restarted under its name)
                claim = ShardClaim(self.nc, self.instance)
                if await claim.take_own(shard):
                    await self._take(shard, claim, "own_previous_life")
        lapsed = self._seen - set(held) - released - set(self.adopted) - {self.own_shard}
        self._seen = {s for s, h in held.items() if h != self.instance}
        for shard in sorted(lapsed):
            if shard in wanted:
                continue  # its worker is back and waits for it: let it take it
            claim = ShardClaim(self.nc, self.instance)
            if await claim.take_lapsed(shard):
                await self._take(shard, claim, "lapsed")

    async def _take(self, shard: int, claim: ShardClaim, why: str) -> None:
        self.counters["shard_adopted"] += 1
        self.log.audit("shard_adopting", shard=shard, reason=why)
        try:
            await self._adopt(shard, claim)
        except Exception as exc:  # the keystore away, the store away: give the lease up
            self.counters["shard_adopt_failed"] += 1
            self.log.audit("shard_adopt_failed", shard=shard, error=type(exc).__name__)
            await claim.release()

    async def _renew(self, adopted: AdoptedShard) -> None:
        try:
            await adopted.claim.renew()
        except Exception as exc:  # ShardLost, or the broker away
            self.counters["adopted_shard_renew_failed"] += 1
            self.log.control(
                "adopted_shard_renew_failed", shard=adopted.shard, error=type(exc).__name__
            )

    async def _give_back(self, adopted: AdoptedShard) -> None:
        try:
            await self._hand_back(adopted)
        except Exception as exc:  # kept; the next look tries again
            self.counters["shard_hand_back_failed"] += 1
            self.log.audit("shard_hand_back_failed", shard=adopted.shard, error=type(exc).__name__)
            await self._renew(adopted)
            return
        self.adopted.pop(adopted.shard, None)
        await adopted.claim.release()
        self.counters["shard_handed_back"] += 1

    async def release_all(self) -> None:
        for adopted in list(self.adopted.values()):
            await adopted.claim.release()

    def ownership(self, now: float) -> list[dict[str, Any]]:
        """The adopted shards for `ikefarm status`: since when, SAs restored, lease age."""
        return [
            {
                "shard": a.shard,
                "adopted_for": round(now - a.since, 1),
                "restored": a.restored,
                "lease_age": a.claim.lease_age(now),
            }
            for a in sorted(self.adopted.values(), key=lambda a: a.shard)
        ]


ORPHAN_REASON = "ike_sa_gone"


def orphan_children(
    rows: list[dict[str, Any]], shard: int, known: set[int], below: int | None = None
) -> list[ChildDelete]:
    """The kernel children (`KernelState.sas` rows, one per SA and direction) that the
    shard's earlier owner made (their unique id is in the shard's range, `unique_ids.py`;
    below `below` when given) and no IKE SA here holds (`known`): their IKE SA is gone for
    good. One ChildDelete each, with reason `ORPHAN_REASON`."""
    from ikefarm.services.ike.unique_ids import SHARD_SPAN

    children: dict[int, dict[str, Any]] = {}
    for row in rows:
        try:
            unique_id = int(row.get("unique_id", 0))
            spi = bytes.fromhex(str(row.get("spi", "")))
        except (TypeError, ValueError):
            continue
        if unique_id <= 0 or unique_id // SHARD_SPAN != shard or unique_id in known:
            continue
        if below is not None and unique_id >= below:
            continue
        child = children.setdefault(unique_id, {"reqid": int(row.get("reqid", 0) or 0)})
        if row.get("direction") == "in":
            child["spi_in"], child["local"] = spi, str(row.get("dst", ""))
        else:
            child["spi_out"], child["remote"] = spi, str(row.get("dst", ""))
            child.setdefault("local", str(row.get("src", "")))
    return [
        ChildDelete(
            unique_id,
            child["reqid"],
            child.get("spi_in", b""),
            child.get("spi_out", b""),
            child.get("local", ""),
            child.get("remote", ""),
            reason=ORPHAN_REASON,
        )
        for unique_id, child in sorted(children.items())
    ]


__all__ = [
    "AdoptedShard",
    "ShardWatch",
    "claim_key",
    "list_leases",
    "orphan_children",
    "want_key",
]
