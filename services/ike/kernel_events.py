"""What the kernel service tells the ike workers about their child SAs (docs/kernel-counters.md).

- `KernelCounters` (`subjects.IKE_KERNEL_COUNTERS`, every worker): per-child byte and
  packet counters of the children whose counters moved, in periodic batches. Each
  worker takes the children it owns (one dict lookup each, `IkeEngine.find_child`)
  and ignores the others: `show ike-sa details` shows them and moving inbound
  counters are proof of liveness for DPD (RFC 7296 2.4).
- `KernelExpire` (`subjects.EVENT_KERNEL_EXPIRE`), from the netlink backend's XFRM
  EXPIRE and from the userspace dataplane's byte/packet lifetimes: soft -> the
  child is rekeyed, hard -> it is deleted with the peer; only its owner acts.

An entry whose counters are not 0..2^64-1 is dropped and counted
(`kernel_counters.bad_entry`); nothing from these messages can raise.
"""

from __future__ import annotations

from collections import Counter

from ikefarm.proto.messages import KernelCounters, KernelExpire
from ikefarm.shared.ikev2.effects import Effect
from ikefarm.shared.ikev2.engine import IkeEngine
from ikefarm.shared.ikev2.exchanges import dpd, lifetimes

COUNTER_LIMIT = 1 << 64  # XFRM's counters are 64-bit; so are the dataplane's


def _valid(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < COUNTER_LIMIT


def apply_counters(
    engine: IkeEngine, batch: KernelCounters, now: float, counters: Counter[str]
) -> int:
    """Feed one batch to the engine; the number of children of this worker it named."""
    ours = 0
    for entry in batch.children:
        values = (entry.bytes_in, entry.packets_in, entry.bytes_out, entry.packets_out)
        if not _valid(entry.unique_id) or not all(_valid(v) for v in values):
            counters["kernel_counters.bad_entry"] += 1
            continue
        if dpd.child_counters(engine, entry.unique_id, values, now):
            ours += 1
    counters["kernel_counters.batches"] += 1
    counters["kernel_counters.children"] += ours
    return ours


def apply_expire(
    engine: IkeEngine, expire: KernelExpire, now: float, counters: Counter[str]
) -> list[Effect]:
    """Rekey (soft) or delete (hard) the child the EXPIRE names, when this worker owns it."""
    if not _valid(expire.unique_id) or expire.unique_id == 0:
        counters["kernel_expire.unnamed"] += 1  # an SA the kernel service did not install
        return []
    if engine.find_child(expire.unique_id) is None:
        return []  # another worker's child
    counters[f"kernel_expire.{'hard' if expire.hard else 'soft'}"] += 1
    return lifetimes.kernel_expire(engine, expire.unique_id, expire.hard, now)
