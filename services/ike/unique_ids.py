"""Unique ids that no worker life ever hands out twice, reserved in blocks in JetStream KV.

An IKE or child SA's unique id names it in `show ike-sa`, in logs and traces and
in `ikefarm clear ike-sa ID`. A counter per worker process would start again at
1 after a restart, and the operator would read the dead worker's SAs under the
new SAs' names. So the counter of each shard lives in the KV bucket
`subjects.UNIQUE_ID_BUCKET` under `subjects.unique_id_key(shard)`: a worker
reserves a block of ids with a compare-and-set on the revision it read, hands
them out from memory (the engine asks synchronously, per SA), and reserves the
next block in the background while half of the current one is left. Ids of
shard n are `n * SHARD_SPAN + counter`, so ids of different shards never meet.

Should the store be unreachable for a whole block's worth of new SAs, ids go on
past the block (counted as `overrun`) and the next reservation starts above the
highest id handed out: only the shard's owner reserves for it, so nothing
collides.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

from ikefarm.proto import subjects
from ikefarm.shared.bus.kv import open_bucket as open_kv_bucket
from ikefarm.shared.bus.runtime import ServiceUnavailable

SHARD_SPAN = 10**9  # ids per shard: the shard is the high part of an id
BLOCK = 4096  # ids per reservation
CAS_ATTEMPTS = 16  # compare-and-set retries before giving up on one reservation
MAX_RECORD_CHARS = 10  # the record is a decimal counter below SHARD_SPAN


class UnusableReservation(ServiceUnavailable):
    """The shard's reservation record is not a counter: refuse rather than risk reuse."""


class UniqueIds:
    """Hands out the ids of reserved blocks; `wants_block` says when to reserve the next."""

    def __init__(self, shard: int, on_want: Callable[[], None] | None = None) -> None:
        self.shard = shard
        self.on_want = on_want
        self._next = 0
        self._end = 0
        self._spare: tuple[int, int] | None = None
        self.overrun = 0  # ids handed out beyond every reserved block

    @property
    def high_water(self) -> int:
        """Above every counter this worker handed out or holds in reserve."""
        return max(self._next, self._spare[1] if self._spare else 0)

    @property
    def wants_block(self) -> bool:
        return self._spare is None and (self._end - self._next) * 2 <= BLOCK

    def add_block(self, start: int, end: int) -> None:
        if self._next >= self._end:
            self._next, self._end = max(start, self._next), end
        else:
            self._spare = (start, end)

    def take(self) -> int:
        if self._next >= self._end and self._spare is not None:
            self._next, self._end = self._spare
            self._spare = None
        if self._next >= self._end:
            self.overrun += 1
        counter = self._next
        self._next += 1
        if self.on_want is not None and self.wants_block:
            self.on_want()
        return self.shard * SHARD_SPAN + counter


def parse_record(raw: bytes | None) -> int:
    """The counter a record holds; anything else is refused (never guessed)."""
    text = (raw or b"")[: MAX_RECORD_CHARS + 1]
    if not text.isdigit() or len(text) > MAX_RECORD_CHARS or not 0 < int(text) <= SHARD_SPAN:
        raise ValueError("not a counter")
    return int(text)


async def open_bucket(nc: Any) -> Any:
    return await open_kv_bucket(
        nc, subjects.UNIQUE_ID_BUCKET, "the ike worker reserves unique ids", history=1
    )


async def reserve(kv: Any, shard: int, above: int) -> tuple[int, int]:
    """Reserve the next block of a shard's counters, starting no lower than `above`."""
    key = subjects.unique_id_key(shard)
    for _ in range(CAS_ATTEMPTS):
        try:
            entry = await kv.get(key)
        except KeyNotFoundError:
            start = max(1, above)
            try:
                await kv.create(key, str(start + BLOCK).encode())
            except KeyWrongLastSequenceError:
                continue  # another life of this shard created it first
            return start, start + BLOCK
        try:
            start = max(parse_record(entry.value), above, 1)
        except ValueError:
            raise UnusableReservation(
                f"the unique-id record {key} in JetStream KV bucket {subjects.UNIQUE_ID_BUCKET} "
                "is not a counter: ids could be reused; delete the key or set it above every "
                "unique id in use"
            ) from None
        if start + BLOCK > SHARD_SPAN:
            raise UnusableReservation(f"shard {shard} has used all of its {SHARD_SPAN} unique ids")
        try:
            await kv.update(key, str(start + BLOCK).encode(), last=entry.revision)
        except KeyWrongLastSequenceError:
            continue
        return start, start + BLOCK
    raise ServiceUnavailable(f"unique-id reservation for shard {shard} kept losing its race")


async def keep_reserved(kv: Any, ids: UniqueIds, wanted: asyncio.Event, log: Any) -> None:
    """Reserve a block whenever `ids` wants one; a failed try is logged and retried."""
    while True:
        await wanted.wait()
        wanted.clear()
        while ids.wants_block:
            try:
                ids.add_block(*await reserve(kv, ids.shard, ids.high_water))
            except UnusableReservation as exc:
                log.control("unique_id_reservation_refused", shard=ids.shard, reason=str(exc))
                await asyncio.sleep(5.0)
            except Exception as exc:  # the store is away: retry, ids run on meanwhile
                log.control(
                    "unique_id_reservation_failed", shard=ids.shard, error=type(exc).__name__
                )
                await asyncio.sleep(1.0)
