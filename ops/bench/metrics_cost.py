"""What a metric costs per event: the hot-path counter add and the latency observation.

    .venv/bin/python ops/bench/metrics_cost.py [--rounds N]

Compares, in one process and one run (the machine is shared: read the ratios):

- the per-datagram counter as the services keep it (`Counter[str]` entry += 1),
  which the OpenTelemetry asynchronous instruments read at scrape time
  (shared/observability/metrics.py), against what a synchronous OpenTelemetry
  `Counter.add` with the same attributes would cost on that path;
- a latency observation: the bisect over fixed buckets the services had before the
  OpenTelemetry histograms, against `Latencies.observe` (an OpenTelemetry `Histogram`);
- one scrape of a kernel service's snapshot with 20 drop reasons.
"""

from __future__ import annotations

import argparse
import bisect
import time
import timeit
from collections import Counter

from ikefarm.proto.messages import Stats
from ikefarm.shared.observability.latency import (
    BUS_REQUEST_DURATION,
    LATENCY_BUCKETS,
    Latencies,
)
from ikefarm.shared.observability.metrics import MetricsExport


def per_call(stmt, number: int, repeat: int) -> float:  # type: ignore[no-untyped-def]
    """Best of `repeat` runs, in ns per call."""
    return min(timeit.repeat(stmt, number=number, repeat=repeat)) / number * 1e9


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=200_000)
    args = parser.parse_args()
    n, repeat = args.rounds, 5

    counters: Counter[str] = Counter()

    def dict_add() -> None:
        counters["esp.in.packets"] += 1

    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    otel_counter = provider.get_meter("bench").create_counter("ikefarm.esp.packets")
    attributes = {"service": "kernel", "ikefarm_instance": "k-0", "network.io.direction": "r"}

    def otel_add() -> None:
        otel_counter.add(1, attributes)

    counts = [0] * (len(LATENCY_BUCKETS) + 1)

    def bisect_observe() -> None:  # what Latencies.observe did before
        counts[bisect.bisect_left(LATENCY_BUCKETS, 0.003)] += 1

    latencies = Latencies()
    export = MetricsExport("ike", "ike-0", "0", latencies, source=lambda: None)

    def otel_observe() -> None:
        latencies.observe(BUS_REQUEST_DURATION, 0.003, "ikefarm.keystore.psk.auth")

    stats = Stats(
        "kernel",
        "k-0",
        "0",
        1.0,
        10,
        0,
        {
            **{f"esp.in.drop.reason{i}": i for i in range(20)},
            "esp.in.packets": 10**9,
            "esp.out.packets": 10**9,
        },
        {"backend": "userspace", "children": 1000},
    )
    scrape_export = MetricsExport("kernel", "k-0", "0", source=lambda: stats)

    cases = [
        ("counter add on the datagram path: dict entry += 1 (kept)", dict_add),
        ("counter add: OpenTelemetry Counter.add (not used per datagram)", otel_add),
        ("latency observation before: bisect into fixed buckets", bisect_observe),
        ("latency observation now: OpenTelemetry Histogram.record", otel_observe),
    ]
    rows = [(name, per_call(call, n, repeat)) for name, call in cases]
    started = time.perf_counter()
    scrapes = 200
    for _ in range(scrapes):
        scrape_export.exposition()
    scrape_ns = (time.perf_counter() - started) / scrapes * 1e9
    rows.append(("one scrape of a kernel snapshot", scrape_ns))
    base = rows[0][1]
    print("| | ns per call | / dict entry += 1 |")
    print("|---|---|---|")
    for name, ns in rows:
        print(f"| {name} | {ns:,.0f} | {ns / base:.1f} |")
    export.close()
    scrape_export.close()
    provider.shutdown()


if __name__ == "__main__":
    main()
