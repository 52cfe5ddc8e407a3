"""IKE SA snapshots of one shard in JetStream KV, so a restarted worker continues them.

Persisting (docs/failover.md): the worker marks an SA dirty when a datagram of
it comes in or goes out, or an event names it (`mark`). A flush runs as soon
as an SA is dirty, then at most once every `FLUSH_INTERVAL`: every dirty SA
that is established is snapshotted (`engine.snapshot`), its secrets sealed to
the keystore's transport key and re-sealed by the keystore under its snapshot
key (one keystore request per flush, for up to `MAX_BATCH` SAs), and the
record is put under `subjects.ike_sa_key(shard, local SPI)`; an SA that is
gone has its record deleted. Several exchanges of one SA within an interval
make one write. A sweep every `SWEEP_INTERVAL` catches what no datagram named
(an SA deleted by a timer, the new SA of an IKE rekey).

Loading (`load`): a worker that starts on a shard lists the shard's records,
has the keystore open the secrets sealed to a fresh ephemeral key of its own,
and restores each SA in its engine (`engine.restore`). A record that is not a
record, a snapshot of another schema, secrets whose seal does not open or that
do not fit are refused one by one: counted (`snapshot_refused.<reason>`) and
logged with the key and the reason, never fatal; the record stays for the
operator to look at.

Nothing here writes a key in clear: the record holds the snapshot without keys
(`SaSnapshot.to_json`) and the keystore's sealed secrets.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import zlib
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import msgpack
from nats.js.errors import KeyNotFoundError

from ikefarm.proto import subjects
from ikefarm.proto.messages import SaSealReply, SaSealRequest, SaUnsealReply, SaUnsealRequest
from ikefarm.proto.sharding import shard_of_spi
from ikefarm.services.ike.transport_keys import TransportKey
from ikefarm.shared.bus.kv import list_entries
from ikefarm.shared.bus.kv import open_bucket as open_kv_bucket
from ikefarm.shared.bus.runtime import Runtime
from ikefarm.shared.bus.sa_secrets import CHANNEL_INFO, MAX_BATCH, reply_label, request_label
from ikefarm.shared.bus.sealed import SealedChannel, SealError
from ikefarm.shared.ikev2.engine import IkeEngine
from ikefarm.shared.ikev2.sa import IkeSaState
from ikefarm.shared.ikev2.snapshot import SaSecrets, SaSnapshot, SnapshotError

T = TypeVar("T")
FLUSH_INTERVAL = 0.05  # s: writes of one SA within this coalesce into one
SWEEP_INTERVAL = 2.0  # s
# format 2: the snapshot JSON deflated (RFC 1950 zlib, level 1): a record is ~40% smaller
# in the bucket and in nats-server's memory; format 1 records (plain JSON) are still read
RECORD_FORMAT = 2
READ_FORMATS = (1, 2)
MAX_RECORD = 256 * 1024  # octets: a record above this is refused unread
MAX_SNAPSHOT = 256 * 1024  # octets of inflated snapshot: more is refused, not inflated further
KEYSTORE_TIMEOUT = 5.0
KEYSTORE_WAIT = 15.0  # s: how long a starting worker waits for the keystore to answer
LIST_TIMEOUT = 5.0
RECENT_REFUSALS = 8


class RecordError(ValueError):
    """A stored value that is not a snapshot record of this format."""


@dataclass(frozen=True)
class Record:
    snapshot: bytes  # SaSnapshot.to_json
    sealed_secrets: bytes  # under the keystore's snapshot key, bound to the KV key

    def __repr__(self) -> str:
        return f"Record({len(self.snapshot)} octets, <sealed>)"

    def pack(self) -> bytes:
        snapshot = zlib.compress(self.snapshot, 1)
        return msgpack.packb(
            {"format": RECORD_FORMAT, "snapshot": snapshot, "secrets": self.sealed_secrets}
        )

    @classmethod
    def unpack(cls, raw: bytes | None) -> Record:
        if not raw or len(raw) > MAX_RECORD:
            raise RecordError(f"record is empty or longer than {MAX_RECORD} octets")
        try:
            value = msgpack.unpackb(raw, raw=False)
        except Exception as exc:  # msgpack raises several types for garbage
            raise RecordError(f"record is not msgpack: {type(exc).__name__}") from None
        got = value.get("format") if isinstance(value, dict) else None
        if not isinstance(value, dict) or got not in READ_FORMATS or isinstance(got, bool):
            raise RecordError(f"record format {got!r}, this worker reads {READ_FORMATS}")
        snapshot, secrets = value.get("snapshot"), value.get("secrets")
        if not isinstance(snapshot, bytes) or not isinstance(secrets, bytes):
            raise RecordError("record lacks the snapshot or the sealed secrets")
        if got == 2:
            snapshot = _inflate(snapshot)
        return cls(snapshot, secrets)


def _inflate(data: bytes) -> bytes:
    """A format 2 snapshot, inflated up to MAX_SNAPSHOT octets; RecordError otherwise."""
    inflater = zlib.decompressobj()
    try:
        plain = inflater.decompress(data, MAX_SNAPSHOT)
    except zlib.error as exc:
        raise RecordError(f"record snapshot does not inflate: {exc}") from None
    if inflater.unconsumed_tail or inflater.unused_data or not inflater.eof:
        raise RecordError(f"record snapshot is truncated, trailed or past {MAX_SNAPSHOT} octets")
    return plain


async def open_bucket(nc: Any) -> Any:
    return await open_kv_bucket(
        nc, subjects.IKE_SA_BUCKET, "the ike worker keeps SA snapshots", history=1
    )


def _spi_of(key: str, shard: int) -> bytes | None:
    prefix = subjects.ike_sa_prefix(shard)
    if not key.startswith(prefix):
        return None
    try:
        spi = bytes.fromhex(key[len(prefix) :])
    except ValueError:
        return None
    return spi if len(spi) == 8 and key == subjects.ike_sa_key(shard, spi) else None


class SaStore:
    def __init__(
        self,
        runtime: Runtime,
        engine: IkeEngine,
        shard: int,
        kv: Any,
        log: Any,
        flush_interval: float = FLUSH_INTERVAL,
    ) -> None:
        self.runtime = runtime
        self.engine = engine
        self.shard = shard
        self.kv = kv
        self.log = log
        # the shards whose SAs this worker keeps: its own, and those it adopted from a worker
        # whose lease lapsed (services/ike/adoption.py); each SA's record goes under the
        # shard of its local SPI, so whoever holds that shard next finds it
        self.shards: set[int] = {shard}
        self.flush_interval = flush_interval
        self.keystore_key = TransportKey(runtime, subjects.KEYSTORE_TRANSPORT_KEY, KEYSTORE_TIMEOUT)
        self.dirty: set[bytes] = set()
        self.stored: set[bytes] = set()  # local SPIs with a record in the bucket
        self.counters: Counter[str] = Counter()
        # the last records refused at adoption (key, reason, detail), for `ikefarm status`
        self.recent_refusals: deque[tuple[str, str, str]] = deque(maxlen=RECENT_REFUSALS)
        self._wanted = asyncio.Event()
        self._last_sweep = time.monotonic()

    # -- marking (O(1) per datagram) ---------------------------------------------------------

    def mark(self, *spis: bytes) -> None:
        for spi in spis:
            if spi and spi != bytes(8):
                self.dirty.add(spi)
        self._wanted.set()

    # -- persisting --------------------------------------------------------------------------

    async def run(self) -> None:
        """Flush dirty SAs as soon as one is, then at most once per interval (what changes
        meanwhile goes out together in the next flush); sweep now and then."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SWEEP_INTERVAL):
                    await self._wanted.wait()
            self._wanted.clear()
            if time.monotonic() - self._last_sweep >= SWEEP_INTERVAL:
                self.sweep()
            try:
                await self.flush()
            except Exception as exc:  # the store or keystore is away: try again next turn
                self.counters["flush_failed"] += 1
                self.log.control("snapshot_flush_failed", error=type(exc).__name__)
                await asyncio.sleep(1.0)
                self._wanted.set()
            await asyncio.sleep(self.flush_interval)

    def sweep(self) -> None:
        """Mark what no datagram named: established SAs without a record, records of SAs gone."""
        self._last_sweep = time.monotonic()
        sas = self.engine.sas
        for spi in self.stored:
            if sas.get(spi) is None:
                self.dirty.add(spi)
        for sa in list(sas.values()):
            if sa.local_spi not in self.stored and sa.established_at is not None:
                self.dirty.add(sa.local_spi)

    def key(self, spi: bytes) -> str | None:
        """The record key of the SA with local SPI `spi`: under its SPI's shard, when that is
        one this worker keeps (None otherwise: never write into another worker's shard)."""
        shard = shard_of_spi(spi)
        return subjects.ike_sa_key(shard, spi) if shard in self.shards else None

    async def flush(self) -> int:
        """Write the dirty SAs' snapshots, delete the records of SAs gone; the count written."""
        if not self.dirty:
            return 0
        dirty, self.dirty = self.dirty, set()
        now = time.monotonic()
        writes: list[tuple[str, bytes, SaSnapshot, SaSecrets]] = []
        deletes: list[bytes] = []
        for spi in dirty:
            key = self.key(spi)
            if key is None:
                continue  # a shard handed back meanwhile: its owner writes it now
            sa = self.engine.sas.get(spi)
            if sa is None or sa.state == IkeSaState.DELETED:
                if spi in self.stored:
                    deletes.append(spi)
                continue
            if sa.established_at is None:
                continue  # half-open or authenticating: nothing durable yet
            try:
                state, secrets = self.engine.snapshot(sa, now)
            except SnapshotError:
                self.counters["snapshot_deferred"] += 1  # mid-keystore or mid-rekey
                continue  # the exchange that ends it marks the SA again; the sweep too
            writes.append((key, spi, state, secrets))
        for start in range(0, len(writes), MAX_BATCH):
            await self._write(writes[start : start + MAX_BATCH])
        for spi in deletes:
            with contextlib.suppress(KeyNotFoundError):
                await self.kv.delete(subjects.ike_sa_key(shard_of_spi(spi), spi))
            self.stored.discard(spi)
            self.counters["deleted"] += 1
        return len(writes)

    async def _write(self, batch: list[tuple[str, bytes, SaSnapshot, SaSecrets]]) -> None:
        try:
            await self._seal_and_put(batch)
        except Exception:
            self.dirty.update(spi for _key, spi, _state, _secrets in batch)  # the next turn
            raise

    async def _seal_and_put(self, batch: list[tuple[str, bytes, SaSnapshot, SaSecrets]]) -> None:
        if not batch:
            return
        public = await self.keystore_key.get()
        channel, ephemeral = SealedChannel.open_to(public, info=CHANNEL_INFO)
        bindings = [key for key, _spi, _state, _secrets in batch]
        request = SaSealRequest(
            ephemeral=ephemeral,
            bindings=bindings,
            items=[
                channel.seal(request_label(key), secrets.to_bytes())
                for key, _spi, _state, secrets in batch
            ],
        )
        try:
            reply = await self.runtime.request(
                subjects.KEYSTORE_SA_SEAL, request, SaSealReply, timeout=KEYSTORE_TIMEOUT
            )
        except Exception:
            self.keystore_key.forget()  # perhaps a keystore with another key: fetch it again
            raise
        if len(reply.items) != len(batch):
            raise SealError("the keystore sealed another number of items than asked")
        puts = [
            self.kv.put(key, Record(state.to_json(), sealed).pack())
            for (key, _spi, state, _secrets), sealed in zip(batch, reply.items, strict=True)
        ]
        results = await asyncio.gather(*puts, return_exceptions=True)
        for (_key, spi, _state, _secrets), result in zip(batch, results, strict=True):
            if isinstance(result, BaseException):
                self.dirty.add(spi)
                self.counters["write_failed"] += 1
            else:
                self.stored.add(spi)
                self.counters["written"] += 1

    async def hand_back(self, shard: int, now: float) -> int:
        """Give an adopted shard back to its worker: every SA of `shard` is snapshotted as
        it is now and taken out of the engine in one step (no timer of theirs runs here any
        more; nothing is sent and nothing deleted in the kernel), then the records are
        written. On a failed write the SAs go back into the engine and the error is raised
        (the caller keeps the shard and tries again). The count handed back."""
        sas = [sa for sa in list(self.engine.sas.values()) if shard_of_spi(sa.local_spi) == shard]
        writes: list[tuple[str, bytes, SaSnapshot, SaSecrets]] = []
        for sa in sas:
            try:
                state, secrets = self.engine.snapshot(sa, now)
            except SnapshotError:
                # mid-keystore or mid-rekey: its last record stands, the peer retransmits
                self.counters["hand_back_stale"] += 1
                continue
            writes.append((subjects.ike_sa_key(shard, sa.local_spi), sa.local_spi, state, secrets))
        for sa in sas:
            self.engine.sas.pop(sa.local_spi, None)
        spis = {sa.local_spi for sa in sas}
        self.dirty -= spis  # from here on, one of them dirty is a put that failed
        try:
            for start in range(0, len(writes), MAX_BATCH):
                await self._seal_and_put(writes[start : start + MAX_BATCH])
            if spis & self.dirty:  # a put failed: that record is older than the SA
                raise OSError("a record of the shard could not be written")
        except Exception:
            for sa in sas:
                if sa.local_spi not in self.engine.sas:
                    self.engine.adopt(sa)
            raise
        self.shards.discard(shard)
        self.stored -= spis
        self.counters["handed_back"] += len(sas)
        return len(sas)

    # -- loading -----------------------------------------------------------------------------

    async def _list(self, shard: int) -> list[tuple[str, bytes | None]]:
        listed = await list_entries(
            self.kv, f"{subjects.ike_sa_prefix(shard)}>", ignore_deletes=True, timeout=LIST_TIMEOUT
        )
        return [(e.key, e.value) for e in listed if e.operation is None and e.value]

    def _refuse(self, key: str, reason: str, text: str) -> None:
        self.counters[f"snapshot_refused.{reason}"] += 1
        self.recent_refusals.append((key, reason, text))
        self.runtime.counters[f"snapshot_refused.{reason}"] += 1
        self.log.control("snapshot_refused", key=key, reason=reason, detail=text)

    def parse(
        self, key: str, raw: bytes | None, shard: int | None = None
    ) -> tuple[bytes, Record, SaSnapshot] | None:
        """A listed record checked against its shard (this worker's own unless named) and
        the schema; None when refused."""
        spi = _spi_of(key, self.shard if shard is None else shard)
        if spi is None:
            self._refuse(key, "key", "not a snapshot key of this shard")
            return None
        try:
            record = Record.unpack(raw)
            state = SaSnapshot.from_json(record.snapshot)
        except RecordError as exc:
            self._refuse(key, "record", str(exc))
            return None
        except SnapshotError as exc:
            self._refuse(key, "schema", str(exc))
            return None
        except Exception as exc:  # whatever else a damaged record provokes: refused too
            self._refuse(key, "schema", type(exc).__name__)
            return None
        local = state.spi_i if state.is_initiator else state.spi_r
        if local != spi.hex():
            self._refuse(key, "schema", "the snapshot's SPI is not the one of its key")
            return None
        return spi, record, state

    def adopt(self, key: str, spi: bytes, state: SaSnapshot, plain: bytes, now: float) -> bool:
        """One SA restored from its snapshot and its opened secrets; False when refused."""
        try:
            secrets = SaSecrets.from_bytes(plain)
        except SnapshotError as exc:
            self._refuse(key, "secrets", str(exc))
            return False
        if self.engine.sas.get(spi) is not None:
            self._refuse(key, "duplicate", "an SA with this SPI is already here")
            return False
        try:
            self.engine.restore(state, secrets, now)
        except SnapshotError as exc:
            self._refuse(key, "schema", str(exc))
            return False
        except Exception as exc:  # a snapshot that fits the schema but not this config
            self._refuse(key, "restore", type(exc).__name__)
            return False
        self.stored.add(spi)
        return True

    async def load(self, shard: int | None = None) -> int:
        """Restore the SAs of this worker's shard (or of `shard`, adopted: from now on its
        records are written here too); the count restored."""
        shard = self.shard if shard is None else shard
        self.shards.add(shard)
        records: list[tuple[str, bytes, Record, SaSnapshot]] = []
        for key, raw in await self._list(shard):
            parsed = self.parse(key, raw, shard)
            if parsed is not None:
                records.append((key, *parsed))
        restored = 0
        for start in range(0, len(records), MAX_BATCH):
            restored += await self._restore(records[start : start + MAX_BATCH])
        self.counters["restored"] += restored
        return restored

    async def _patiently(self, call: Callable[[], Awaitable[T]]) -> T:
        """`call`'s answer; the keystore may start after this worker (`ikefarm up` starts all
        at once, and restarts a keystore too): asked again for up to `KEYSTORE_WAIT`."""
        deadline = time.monotonic() + KEYSTORE_WAIT
        while True:
            try:
                return await call()
            except Exception:
                if time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(0.5)

    async def _restore(self, batch: list[tuple[str, bytes, Record, SaSnapshot]]) -> int:
        if not batch:
            return 0
        public = await self._patiently(self.keystore_key.get)
        channel, ephemeral = SealedChannel.open_to(public, info=CHANNEL_INFO)
        request = SaUnsealRequest(
            ephemeral=ephemeral,
            bindings=[key for key, *_rest in batch],
            items=[record.sealed_secrets for _key, _spi, record, _state in batch],
        )
        reply = await self._patiently(
            lambda: self.runtime.request(
                subjects.KEYSTORE_SA_UNSEAL, request, SaUnsealReply, timeout=KEYSTORE_TIMEOUT
            )
        )
        if len(reply.items) != len(batch):
            raise SealError("the keystore opened another number of items than asked")
        refused = reply.refused if len(reply.refused) == len(batch) else [""] * len(batch)
        restored = 0
        now = time.monotonic()
        for (key, spi, _record, state), item, why in zip(batch, reply.items, refused, strict=True):
            if why or not item:
                self._refuse(key, "seal", f"the keystore refused the sealed secrets: {why}")
                continue
            try:
                plain = channel.open(reply_label(key), item)
            except SealError as exc:
                self._refuse(key, "seal", str(exc))
                continue
            restored += self.adopt(key, spi, state, plain, now)
        return restored
