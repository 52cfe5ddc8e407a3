"""A Prometheus endpoint per service process, from the numbers `ikefarm status` shows.

`[telemetry] metrics-listen = "ADDRESS:PORT"` (empty: off, the default) makes a
service answer `GET /metrics` on that address only. Every scrape takes one
snapshot of the service's stats (`Stats`, the reply of its NATS micro `stats`
endpoint: requests, errors, counters, gauges) inside the service's event loop,
so the exporter thread never reads a table while the loop changes it, and
Prometheus and `ikefarm status` read the same numbers. The metric names are
fixed (`METRIC_NAMES`); what varies goes into labels:

- `ikefarm_events_total{event}`: the service's counters (drops by reason,
  `gate.cookie_sent`, `auth_failed.<reason>`, ...); `ikefarm_engine_events_total{event}`
  the ike engine's counters (exchanges, auth methods, ...).
- `ikefarm_state{name}`: the numeric gauges, nested names joined with `.`
  (`half_open`, `dos.farm_half_open`, `children`, ...); a list counts its items
  (`owned_shards`); `ikefarm_state_info{name,value}` = 1 for the textual ones
  (`dos.cookie_mode`, `backend`).

Every series carries `service` and `ikefarm_instance` (Prometheus keeps
`instance` for the scrape target).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from ikefarm.proto.messages import Stats
from ikefarm.shared.config.kinds import parse_listen
from ikefarm.shared.observability.latency import (
    BUS_REQUEST_DURATION,
    IKE_HANDSHAKE_DURATION,
    LATENCY_BUCKETS,
    Latencies,
)

PREFIX = "ikefarm"
SNAPSHOT_TIMEOUT = 2.0  # s a scrape waits for the event loop

# name -> (type, help); the only names a scrape can return (and dashboards may use)
METRICS: dict[str, tuple[str, str]] = {
    f"{PREFIX}_build_info": ("gauge", "1 per service process, with its version"),
    f"{PREFIX}_uptime_seconds": ("gauge", "seconds since the service process started"),
    f"{PREFIX}_bus_requests_total": ("counter", "bus requests this process answered"),
    f"{PREFIX}_bus_request_errors_total": ("counter", "bus requests answered with an error"),
    f"{PREFIX}_events_total": ("counter", "the service's counters, by event"),
    f"{PREFIX}_engine_events_total": ("counter", "the ike engine's counters, by event"),
    f"{PREFIX}_state": ("gauge", "the service's gauges, by name"),
    f"{PREFIX}_state_info": ("gauge", "1 for each textual gauge, its value as a label"),
    BUS_REQUEST_DURATION: (
        "histogram",
        "bus requests this process made (to the keystore, the kernel...), by subject",
    ),
    IKE_HANDSHAKE_DURATION: (
        "histogram",
        "IKE SA establishment: first message of IKE_SA_INIT to the end of IKE_AUTH",
    ),
}
HISTOGRAM_SAMPLES = ("_bucket", "_sum", "_count")
# the sample names a scrape can show (a histogram family shows three)
METRIC_NAMES: frozenset[str] = frozenset(
    name + suffix
    for name, (kind, _help) in METRICS.items()
    for suffix in (HISTOGRAM_SAMPLES if kind == "histogram" else ("",))
)
ENGINE_GAUGE = "engine"  # ike: gauges()["engine"] holds the engine's counters


def flatten(values: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from flatten(value, f"{name}.")
        else:
            yield name, value


HISTOGRAM_LABEL = {BUS_REQUEST_DURATION: "subject", IKE_HANDSHAKE_DURATION: ""}


def histogram_families(
    service: str, instance: str, snapshot: dict[str, dict[str, tuple[list[int], float]]]
) -> list[Metric]:
    found: list[Metric] = []
    for name, series in sorted(snapshot.items()):
        label = HISTOGRAM_LABEL.get(name)
        if label is None:
            continue  # only declared names leave the process
        labels = ["service", "ikefarm_instance", *([label] if label else [])]
        family = HistogramMetricFamily(name, METRICS[name][1], labels=labels)
        for value, (counts, total) in sorted(series.items()):
            cumulative, buckets = 0, []
            for bound, count in zip((*LATENCY_BUCKETS, float("inf")), counts, strict=True):
                cumulative += count
                buckets.append(("+Inf" if bound == float("inf") else str(bound), cumulative))
            family.add_metric(
                [service, instance, *([value] if label else [])], buckets, sum_value=total
            )
        found.append(family)
    return found


def families(stats: Stats) -> list[Metric]:
    """The metric families of one stats snapshot."""
    labels = ["service", "ikefarm_instance"]
    ident = [stats.service, stats.instance]

    def gauge(name: str, extra: list[str] | None = None) -> GaugeMetricFamily:
        return GaugeMetricFamily(name, METRICS[name][1], labels=labels + (extra or []))

    def counter(name: str, extra: list[str] | None = None) -> CounterMetricFamily:
        # prometheus_client adds `_total` to a counter family's samples
        base = name.removesuffix("_total")
        return CounterMetricFamily(base, METRICS[name][1], labels=labels + (extra or []))

    build = gauge(f"{PREFIX}_build_info", ["version"])
    build.add_metric([*ident, stats.version], 1)
    uptime = gauge(f"{PREFIX}_uptime_seconds")
    uptime.add_metric(ident, float(stats.uptime))
    requests = counter(f"{PREFIX}_bus_requests_total")
    requests.add_metric(ident, float(stats.requests))
    errors = counter(f"{PREFIX}_bus_request_errors_total")
    errors.add_metric(ident, float(stats.errors))
    events = counter(f"{PREFIX}_events_total", ["event"])
    for event, count in sorted(stats.counters.items()):
        events.add_metric([*ident, str(event)], float(count))
    engine = counter(f"{PREFIX}_engine_events_total", ["event"])
    state = gauge(f"{PREFIX}_state", ["name"])
    state_info = gauge(f"{PREFIX}_state_info", ["name", "value"])
    gauges = dict(stats.gauges)
    engine_counts = gauges.pop(ENGINE_GAUGE, None)
    if isinstance(engine_counts, Mapping):
        for event, count in sorted(engine_counts.items()):
            if isinstance(count, int | float) and not isinstance(count, bool):
                engine.add_metric([*ident, str(event)], float(count))
    for name, value in flatten(gauges):
        if isinstance(value, bool | int | float):
            state.add_metric([*ident, name], float(value))
        elif isinstance(value, list | tuple):
            state.add_metric([*ident, name], float(len(value)))
        elif isinstance(value, str):
            state_info.add_metric([*ident, name, value], 1)
    return [build, uptime, requests, errors, events, engine, state, state_info]


class StatsCollector(Collector):
    """Collects from the service's event loop: `snapshot` runs there, the scrape waits."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        snapshot: Callable[[], Stats],
        latencies: Latencies | None = None,
    ) -> None:
        self.loop = loop
        self.snapshot = snapshot
        self.latencies = latencies

    def collect(self) -> Iterator[Metric]:
        latencies = self.latencies

        async def take() -> tuple[Stats, dict[str, dict[str, tuple[list[int], float]]]]:
            return self.snapshot(), latencies.snapshot() if latencies else {}

        future = asyncio.run_coroutine_threadsafe(take(), self.loop)
        try:
            stats, histograms = future.result(SNAPSHOT_TIMEOUT)
        except Exception:
            future.cancel()
            return  # a starved loop: an empty scrape, Prometheus marks the target down
        yield from families(stats)
        yield from histogram_families(stats.service, stats.instance, histograms)


class MetricsServer:
    """`GET /metrics` on one address; `close()` stops it."""

    def __init__(self, listen: str, collector: Collector) -> None:
        from prometheus_client import start_http_server

        self.address, self.port = parse_listen(listen)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)
        self._server, self._thread = start_http_server(
            self.port, addr=self.address, registry=self.registry
        )
        self.port = int(self._server.server_address[1])

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(2.0)
