"""The farm's load as one process sees it: worker snapshots, pending inits, peers backing off.

Workers own the SAs and report each shard's counts (`IkeLoad`); every ingress
reports the IKE_SA_INIT it forwarded that no worker answered yet (`IngressLoad`).
A snapshot older than `STALE_AFTER` intervals no longer counts (its process is
gone or stopped). Everything is bounded: tables have a capacity, the oldest
entries go first. Time is an argument (monotonic seconds).
"""

from __future__ import annotations

import math
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field

from ikefarm.proto.messages import IkeLoad, IngressLoad

STALE_AFTER = 3.0  # intervals
MAX_PEERS_REPORTED = 2048
MAX_SHARDS_TRACKED = 4096
PENDING_TTL = 10.0  # s: a forwarded init no worker reported by then is lost (bus drop, dead worker)
MAX_PENDING = 65536
MAX_PEERS_TRACKED = 8 * MAX_PEERS_REPORTED  # per shard: a full table and the deltas since
BACKOFF_CAPACITY = 65536


def top_peers(counts: Counter[str], limit: int = MAX_PEERS_REPORTED) -> dict[str, int]:
    """Peers with half-open SAs, the largest counts first, at most `limit` of them."""
    return dict(counts.most_common(limit))


class PeerReports:
    """What a worker reports of its half-open SAs per peer, made incremental.

    A report carries the whole table (`top_peers`) at most every `interval` seconds and
    otherwise only the peers whose count changed since the previous report (`changed`,
    which the SA table fills and this drains), so a report costs what changed, not the
    number of peers. When no limit reads per-peer counts (`needed` false: block-threshold
    and discard-duplicate off) nothing is reported at all.
    """

    def __init__(self, interval: float, needed: bool) -> None:
        self.interval = interval
        self.needed = needed
        self._full_due = -math.inf

    def report(
        self, counts: Counter[str], changed: set[str], now: float
    ) -> tuple[dict[str, int], bool]:
        """(peers, full) for the next IkeLoad: `IkeLoad.half_open_peers`, `peers_full`."""
        if not self.needed:
            changed.clear()
            return {}, True
        if now >= self._full_due or len(changed) > MAX_PEERS_REPORTED:
            changed.clear()
            self._full_due = now + self.interval
            return top_peers(counts), True
        delta = {peer: counts.get(peer, 0) for peer in changed}
        changed.clear()
        return delta, False


@dataclass
class _Snapshot:
    seq: int
    received: float
    interval: float
    half_open: int = 0
    established: int = 0
    peers: dict[str, int] = field(default_factory=dict)
    inits: dict[str, int] = field(default_factory=dict)
    pending: int = 0

    def fresh(self, now: float) -> bool:
        return now - self.received <= STALE_AFTER * self.interval


def _bad_snapshot(message: IkeLoad | IngressLoad) -> str | None:
    if message.seq < 0 or not math.isfinite(message.interval) or not 0 < message.interval <= 3600:
        return "bad_interval_or_seq"
    if isinstance(message, IkeLoad):
        if message.half_open < 0 or message.established < 0 or not 0 <= message.shard < (1 << 16):
            return "bad_count"
        if len(message.half_open_peers) > MAX_PEERS_REPORTED or len(message.inits) > 1024:
            return "too_many_entries"
        values = list(message.half_open_peers.values()) + list(message.inits.values())
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
            return "bad_count"
        if not all(isinstance(k, str) for k in [*message.half_open_peers, *message.inits]):
            return "bad_key"
    elif message.pending < 0:
        return "bad_count"
    return None


class FarmLoad:
    """Worker and ingress snapshots, and this ingress's own forwarded-but-unanswered inits."""

    def __init__(self, instance: str = "") -> None:
        self.instance = instance
        self._shards: dict[int, _Snapshot] = {}
        self._ingress: dict[str, _Snapshot] = {}
        # this instance's forwarded inits, oldest first: (time, peer address, SPIi)
        self._pending: deque[tuple[float, str, bytes]] = deque()
        self._pending_by_peer: Counter[str] = Counter()
        # the same negotiation retried (retransmission, INVALID_KE_PAYLOAD retry) is not a
        # second half-open SA of its peer: pending inits are also counted by (peer, SPIi)
        self._pending_by_spi: Counter[tuple[str, bytes]] = Counter()
        self._forwarded = 0
        self._answered = 0  # of them, answered by a worker (from the snapshots)
        self._retired = 0  # pending entries answered or expired

    # -- snapshots ---------------------------------------------------------------------------

    def update_shard(self, message: IkeLoad, now: float) -> str | None:
        """Take a worker's snapshot; returns the reason it was refused, or None."""
        reason = _bad_snapshot(message)
        if reason is not None:
            return reason
        known = self._shards.get(message.shard)
        if known is not None and message.seq <= known.seq and known.fresh(now):
            return "stale_seq"
        if known is None and len(self._shards) >= MAX_SHARDS_TRACKED:
            return "too_many_shards"
        # inits the workers answered for this instance; a count that went down is a
        # restarted worker counting from 0 again
        before = known.inits.get(self.instance, 0) if known is not None else 0
        now_answered = message.inits.get(self.instance, 0)
        self._answered += now_answered - before if now_answered >= before else now_answered
        if message.peers_full or known is None or not known.fresh(now):
            # a delta without its table counts from nothing until the next full report
            peers = dict(message.half_open_peers) if message.peers_full else {}
        else:
            peers = known.peers  # ours alone (a copy of a full report): merged in place
        if not message.peers_full:
            _merge_peers(peers, message.half_open_peers)
        self._shards[message.shard] = _Snapshot(
            message.seq,
            now,
            message.interval,
            message.half_open,
            message.established,
            peers,
            dict(message.inits),
        )
        self._retire(now)
        return None

    def update_ingress(self, message: IngressLoad, now: float) -> str | None:
        reason = _bad_snapshot(message)
        if reason is not None:
            return reason
        if message.instance == self.instance:
            return None  # our own report, echoed by the broker
        known = self._ingress.get(message.instance)
        if known is not None and message.seq <= known.seq and known.fresh(now):
            return "stale_seq"
        if known is None and len(self._ingress) >= MAX_SHARDS_TRACKED:
            return "too_many_instances"
        self._ingress[message.instance] = _Snapshot(
            message.seq, now, message.interval, pending=message.pending
        )
        return None

    def _fresh_shards(self, now: float, exclude: int | None = None) -> list[_Snapshot]:
        return [s for k, s in self._shards.items() if s.fresh(now) and k != exclude]

    # -- this ingress's pending inits ----------------------------------------------------------

    def forwarded(self, peer: str, now: float, spi_i: bytes = b"") -> None:
        self._retire(now)
        self._forwarded += 1
        self._pending.append((now, peer, spi_i))
        self._pending_by_peer[peer] += 1
        self._pending_by_spi[(peer, spi_i)] += 1
        while len(self._pending) > MAX_PENDING:
            self._pop_pending()

    def _pop_pending(self) -> None:
        _when, peer, spi_i = self._pending.popleft()
        self._retired += 1
        for counter, key in ((self._pending_by_peer, peer), (self._pending_by_spi, (peer, spi_i))):
            counter[key] -= 1
            if counter[key] <= 0:
                del counter[key]

    def _retire(self, now: float) -> None:
        # workers answer in about the order inits arrive: the oldest go first
        while self._pending and (
            self._retired < self._answered or self._pending[0][0] < now - PENDING_TTL
        ):
            self._pop_pending()

    def own_pending(self, now: float) -> int:
        self._retire(now)
        return len(self._pending)

    # -- farm totals -------------------------------------------------------------------------

    def pending(self, now: float) -> int:
        """IKE_SA_INIT handed to workers and not answered yet, farm-wide."""
        others = sum(s.pending for s in self._ingress.values() if s.fresh(now))
        return self.own_pending(now) + others

    def half_open(self, now: float, exclude_shard: int | None = None) -> int:
        """Half-open SAs the workers reported (not counting the pending inits)."""
        return sum(s.half_open for s in self._fresh_shards(now, exclude_shard))

    def established(self, now: float, exclude_shard: int | None = None) -> int:
        return sum(s.established for s in self._fresh_shards(now, exclude_shard))

    def peer_half_open(
        self,
        peer: str,
        now: float,
        exclude_shard: int | None = None,
        spi_i: bytes | None = None,
    ) -> int:
        """Half-open SAs of `peer` the workers reported, plus (for an ingress) its pending
        inits, not counting those of the negotiation `spi_i` itself."""
        reported = sum(s.peers.get(peer, 0) for s in self._fresh_shards(now, exclude_shard))
        if exclude_shard is not None:
            return reported
        pending = self._pending_by_peer.get(peer, 0)
        if spi_i is not None:
            pending -= self._pending_by_spi.get((peer, spi_i), 0)
        return reported + pending

    def shards(self, now: float) -> int:
        return len(self._fresh_shards(now))


def _merge_peers(peers: dict[str, int], delta: dict[str, int]) -> None:
    """Apply a report's changed peers (0: gone); new peers beyond MAX_PEERS_TRACKED are left
    out (the next full report, at most an interval away, has the largest counts)."""
    for peer, count in delta.items():
        if count > 0:
            if peer in peers or len(peers) < MAX_PEERS_TRACKED:
                peers[peer] = count
        else:
            peers.pop(peer, None)


class BackoffTable:
    """Peers whose last negotiation failed: their new IKE_SA_INIT are dropped until `until`."""

    def __init__(self, capacity: int = BACKOFF_CAPACITY) -> None:
        self.capacity = capacity
        self._until: OrderedDict[str, tuple[float, str]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._until)

    def add(self, peer: str, phase: str, seconds: float, now: float) -> None:
        if not math.isfinite(seconds) or seconds <= 0:
            return
        self._forget_expired(now)
        self._until.pop(peer, None)
        self._until[peer] = (now + min(seconds, 180.0), phase)
        while len(self._until) > self.capacity:
            self._until.popitem(last=False)

    def _forget_expired(self, now: float) -> None:
        # oldest-added first; two per add keep the table to the peers still backing off
        # (give or take the longest backoff), not every peer that ever failed
        for _ in range(2):
            if not self._until:
                return
            peer, (until, _phase) = next(iter(self._until.items()))
            if until > now:
                return
            del self._until[peer]

    def phase(self, peer: str, now: float) -> str | None:
        """The phase whose failure `peer` is backing off from, or None."""
        entry = self._until.get(peer)
        if entry is None:
            return None
        if entry[0] <= now:
            del self._until[peer]
            return None
        return entry[1]
