"""The worker's admission check, just before DH: the final authority on the SA limits.

Ingress gates every new IKE_SA_INIT on the farm's load as it sees it, but two
ingress instances (or two workers) may decide at the same instant. So each
worker owns a share of every farm-wide SA limit (limit // workers, the
remainder to the lowest shards) and refuses, before any DH, an init that would
take its own count past its share, or the farm's count (its exact one plus the
other shards' last snapshots) past the limit. The shares add up to the limit,
so the farm total never exceeds it, whatever the timing; the price is that with
several workers an init may be refused when its worker's share is used up while
another's is not (the initiator retransmits and the queue group may pick another).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ikefarm.shared.dos.limits import DosLimits
from ikefarm.shared.dos.load import BackoffTable, FarmLoad

if TYPE_CHECKING:
    from ikefarm.shared.ikev2.engine import IkeEngine

INIT_PHASE = "init"
AUTH_PHASE = "auth"


def share(limit: int, shard: int, workers: int) -> int:
    """This shard's part of a farm-wide limit; the parts of shards 0..workers-1 sum to it."""
    workers = max(1, workers)
    index = shard % workers
    return limit // workers + (1 if index < limit % workers else 0)


@dataclass
class LocalLoad:
    half_open: int
    established: int
    peers: Counter[str]


def local_load(engine: IkeEngine) -> LocalLoad:
    """This worker's responder half-open SAs (per peer address) and established SAs: counts
    the engine's SA table keeps as SAs change, so this costs the same at any table size."""
    table = engine.sas
    return LocalLoad(table.responder_half_open, table.established, table.half_open_peers)


@dataclass
class WorkerAdmission:
    limits: DosLimits
    shard: int = 0
    workers: int = 1
    load: FarmLoad = field(default_factory=FarmLoad)
    backoff: BackoffTable = field(default_factory=BackoffTable)
    reached: set[str] = field(default_factory=set)  # limits this worker is refusing at

    def transitions(self, refused: str | None) -> list[tuple[str, bool]]:
        """Limits that became reached (True) or cleared (False) with this decision: the
        level-1 log lines; per-peer refusals (backoff, block, duplicate) are not modes."""
        if refused is not None:
            is_mode = refused.startswith("limit.") and refused != "limit.block-threshold"
            if is_mode and refused not in self.reached:
                self.reached.add(refused)
                return [(refused, True)]
            return []
        cleared = sorted(self.reached)
        self.reached.clear()
        return [(name, False) for name in cleared]

    def backoff_seconds(self, phase: str) -> float | None:
        if phase == INIT_PHASE:
            return self.limits.init_phase_backoff
        return self.limits.auth_phase_backoff

    def failed(self, peer: str, phase: str, now: float) -> float | None:
        """A negotiation from `peer` failed in `phase`: its backoff, if one is configured."""
        seconds = self.backoff_seconds(phase)
        if seconds is not None:
            self.backoff.add(peer, phase, seconds, now)
        return seconds

    def _over(self, limit: int | None, local: int, others: int) -> bool:
        if limit is None:
            return False
        return local >= share(limit, self.shard, self.workers) or local + others >= limit

    def refuse(self, engine: IkeEngine, peer: str, now: float) -> str | None:
        """Why a new IKE_SA_INIT from `peer` must not get a DH computation, or None."""
        limits = self.limits
        phase = self.backoff.phase(peer, now)
        if phase is not None:
            return f"backoff.{phase}-phase-failure"
        mine = local_load(engine)
        other_half_open = self.load.half_open(now, exclude_shard=self.shard)
        other_established = self.load.established(now, exclude_shard=self.shard)
        if self._over(
            limits.ike_sa_limit,
            mine.established + mine.half_open,
            other_established + other_half_open,
        ):
            return "limit.ike-sa-limit"
        if self._over(limits.half_open_limit, mine.half_open, other_half_open):
            return f"limit.{limits.half_open_limit_name}"
        peer_half_open = mine.peers.get(peer, 0) + self.load.peer_half_open(
            peer, now, exclude_shard=self.shard
        )
        if limits.block_threshold is not None and peer_half_open >= limits.block_threshold:
            return "limit.block-threshold"
        if limits.discard_duplicate and peer_half_open > 0:
            return "discard-duplicate"
        return None

    def half_open_lifetime(self, engine: IkeEngine, now: float) -> float:
        """Junos timeout, or reduce-timeout once the farm's half-open count reaches its count."""
        farm = local_load(engine).half_open + self.load.half_open(now, exclude_shard=self.shard)
        return self.limits.half_open_lifetime(farm)
