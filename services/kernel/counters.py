"""Batched child counters for the ike workers (docs/kernel-counters.md).

Every `interval` seconds the kernel service asks its backend for the children
whose counters moved since the previous batch and publishes them, at most
MAX_COUNTERS_PER_BATCH per message, on `subjects.IKE_KERNEL_COUNTERS`. Nothing
is published for a tick without movement, and nothing crosses the bus per packet.

The interval is a third of the smallest `dpd-delay` configured (so inbound
traffic is reported at least twice within any DPD interval, RFC 7296 2.4),
between MIN_INTERVAL and MAX_INTERVAL; without DPD it is MAX_INTERVAL, for
`show ike-sa details`.
"""

from __future__ import annotations

from collections.abc import Iterator

from ikefarm.proto.messages import MAX_COUNTERS_PER_BATCH, ChildCounters
from ikefarm.shared.config.loader import Config
from ikefarm.shared.ikev2.policy import engine_policy

MIN_INTERVAL = 1.0
MAX_INTERVAL = 10.0
DPD_FRACTION = 3


def batch_interval(config: Config) -> float:
    """Seconds between two counter batches for this configuration."""
    delays = [v.dpd_delay for v in engine_policy(config.without_secrets()).vpns if v.dpd_delay > 0]
    if not delays:
        return MAX_INTERVAL
    return min(MAX_INTERVAL, max(MIN_INTERVAL, min(delays) / DPD_FRACTION))


def batches(moved: list[ChildCounters]) -> Iterator[list[ChildCounters]]:
    """`moved` cut into messages of at most MAX_COUNTERS_PER_BATCH children."""
    for start in range(0, len(moved), MAX_COUNTERS_PER_BATCH):
        yield moved[start : start + MAX_COUNTERS_PER_BATCH]
