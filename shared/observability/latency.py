"""Latency histograms a service keeps for its metrics endpoint (shared/observability/metrics.py).

Kept apart from the exporter so a service records latencies without importing
prometheus_client when no endpoint is configured.
"""

from __future__ import annotations

import bisect

# the histograms services observe (exported by shared/observability/metrics.py)
BUS_REQUEST_DURATION = "ikefarm_bus_request_duration_seconds"  # label: the subject
IKE_HANDSHAKE_DURATION = "ikefarm_ike_handshake_duration_seconds"

# upper bounds (s) of the latency buckets: bus round trips to slow handshakes
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
MAX_HISTOGRAM_LABELS = 64  # distinct label values per histogram (subjects are a fixed set)


class Latencies:
    """Fixed-bucket histograms kept in the service's event loop: an observation costs a
    bucket search over `LATENCY_BUCKETS`, whatever the number of SAs or requests."""

    def __init__(self) -> None:
        # name -> label value -> (bucket counts, sum)
        self._data: dict[str, dict[str, tuple[list[int], float]]] = {}
        self.dropped = 0  # observations for a label past MAX_HISTOGRAM_LABELS

    def observe(self, name: str, seconds: float, label: str = "") -> None:
        series = self._data.setdefault(name, {})
        entry = series.get(label)
        if entry is None:
            if len(series) >= MAX_HISTOGRAM_LABELS:
                self.dropped += 1
                return
            entry = series[label] = ([0] * (len(LATENCY_BUCKETS) + 1), 0.0)
        counts, total = entry
        index = bisect.bisect_left(LATENCY_BUCKETS, seconds)
        counts[index] += 1
        series[label] = (counts, total + max(0.0, seconds))

    def snapshot(self) -> dict[str, dict[str, tuple[list[int], float]]]:
        return {
            name: {label: (list(c), t) for label, (c, t) in series.items()}
            for name, series in self._data.items()
        }
