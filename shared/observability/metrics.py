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

Besides these generic families, the numbers an operator looks for first have
names of their own, derived from the same snapshot (`derived_families`; the
OpenTelemetry metric name, dots written as underscores, `_total` for counters,
the unit as suffix, as the OpenTelemetry-to-Prometheus mapping writes them; the
`network.io.direction` attribute of the semantic conventions' network metrics):

- ike: `ikefarm_ike_exchanges_total{role,exchange,result}` (the engine's
  `exchange.*` counters, `shared/ikev2/exchange_counts.py`),
  `ikefarm_ike_sas{state}` and `ikefarm_ike_child_sas{state}`.
- ingress: `ikefarm_ike_cookies_required` (1 while new IKE_SA_INITs must carry
  a COOKIE) and `ikefarm_ike_cookie_mode{mode}` (1 for the configured mode).
- kernel (userspace dataplane): `ikefarm_esp_packets_total{network_io_direction}`,
  `ikefarm_esp_io_bytes_total{network_io_direction}` (inner packet octets) and
  `ikefarm_esp_dropped_total{network_io_direction,reason}`.
- flow: `ikefarm_flow_sessions`, `ikefarm_flow_sessions_limit` and
  `ikefarm_flow_session_refusals_total{reason}`.

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
from ikefarm.shared.ikev2.exchange_counts import parse_counter
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
    f"{PREFIX}_ike_exchanges_total": (
        "counter",
        "IKE exchanges completed, by role, exchange type and result (ok, error notify, timeout)",
    ),
    f"{PREFIX}_ike_sas": ("gauge", "IKE SAs of the worker, by state"),
    f"{PREFIX}_ike_child_sas": ("gauge", "child SAs of the worker's IKE SAs, by state"),
    f"{PREFIX}_ike_cookies_required": (
        "gauge",
        "1 while ingress requires a COOKIE from new IKE_SA_INITs (RFC 7296 2.6)",
    ),
    f"{PREFIX}_ike_cookie_mode": ("gauge", "1 for the configured cookie mode"),
    f"{PREFIX}_esp_packets_total": ("counter", "ESP packets protected or accepted, by direction"),
    f"{PREFIX}_esp_io_bytes_total": ("counter", "inner octets of those packets, by direction"),
    f"{PREFIX}_esp_dropped_total": ("counter", "ESP packets dropped, by direction and reason"),
    f"{PREFIX}_flow_sessions": ("gauge", "flow sessions in the table"),
    f"{PREFIX}_flow_sessions_limit": ("gauge", "the table's maximum number of sessions"),
    f"{PREFIX}_flow_session_refusals_total": ("counter", "new sessions refused, by reason"),
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
            if _number(count) and parse_counter(str(event)) is None:
                engine.add_metric([*ident, str(event)], float(count))
    for name, value in flatten(gauges):
        if isinstance(value, bool | int | float):
            state.add_metric([*ident, name], float(value))
        elif isinstance(value, list | tuple):
            state.add_metric([*ident, name], float(len(value)))
        elif isinstance(value, str):
            state_info.add_metric([*ident, name, value], 1)
    return [
        build,
        uptime,
        requests,
        errors,
        events,
        engine,
        state,
        state_info,
        *derived_families(stats, engine_counts if isinstance(engine_counts, Mapping) else {}),
    ]


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


ESP_DIRECTIONS = {"in": "receive", "out": "transmit"}  # network.io.direction values


def derived_families(stats: Stats, engine_counts: Mapping[str, Any]) -> list[Metric]:
    """The named metrics of the module docstring, from the same snapshot."""
    labels = ["service", "ikefarm_instance"]
    ident = [stats.service, stats.instance]
    found: list[Metric] = []

    def family(name: str, extra: list[str]) -> GaugeMetricFamily | CounterMetricFamily:
        kind, text = METRICS[name]
        if kind == "counter":
            made: Any = CounterMetricFamily(
                name.removesuffix("_total"), text, labels=labels + extra
            )
        else:
            made = GaugeMetricFamily(name, text, labels=labels + extra)
        found.append(made)
        return made

    gauges = stats.gauges
    if stats.service == "ike":
        exchanges = family(f"{PREFIX}_ike_exchanges_total", ["role", "exchange", "result"])
        for event, count in sorted(engine_counts.items()):
            parsed = parse_counter(str(event))
            if parsed is not None and _number(count):
                exchanges.add_metric([*ident, *parsed], float(count))
        states = gauges.get("sa_states")
        for key, name in (("ike", "ike_sas"), ("child", "ike_child_sas")):
            by_state = family(f"{PREFIX}_{name}", ["state"])
            counts = states.get(key) if isinstance(states, Mapping) else None
            for state, count in sorted(counts.items() if isinstance(counts, Mapping) else ()):
                if _number(count):
                    by_state.add_metric([*ident, str(state)], float(count))
    dos = gauges.get("dos")
    if stats.service == "ingress" and isinstance(dos, Mapping):
        required = family(f"{PREFIX}_ike_cookies_required", [])
        if isinstance(dos.get("cookies_active"), bool):
            required.add_metric(ident, float(dos["cookies_active"]))
        mode = family(f"{PREFIX}_ike_cookie_mode", ["mode"])
        if isinstance(dos.get("cookie_mode"), str):
            mode.add_metric([*ident, dos["cookie_mode"]], 1)
    if stats.service == "kernel":
        packets = family(f"{PREFIX}_esp_packets_total", ["network_io_direction"])
        octets = family(f"{PREFIX}_esp_io_bytes_total", ["network_io_direction"])
        dropped = family(f"{PREFIX}_esp_dropped_total", ["network_io_direction", "reason"])
        for event, count in sorted(stats.counters.items()):
            parts = str(event).split(".", 3)
            if len(parts) < 3 or parts[0] != "esp" or parts[1] not in ESP_DIRECTIONS:
                continue
            direction = ESP_DIRECTIONS[parts[1]]
            if len(parts) == 3 and parts[2] == "packets":
                packets.add_metric([*ident, direction], float(count))
            elif len(parts) == 3 and parts[2] == "bytes":
                octets.add_metric([*ident, direction], float(count))
            elif len(parts) == 4 and parts[2] == "drop":
                dropped.add_metric([*ident, direction, parts[3]], float(count))
    if stats.service == "flow":
        for key, name in (("sessions", "flow_sessions"), ("max_sessions", "flow_sessions_limit")):
            gauge = family(f"{PREFIX}_{name}", [])
            if _number(gauges.get(key)):
                gauge.add_metric(ident, float(gauges[key]))
        refusals = family(f"{PREFIX}_flow_session_refusals_total", ["reason"])
        for name, count in sorted(gauges.items()):
            reason = str(name).removeprefix("table.refused.")
            if str(name).startswith("table.refused.") and _number(count):
                refusals.add_metric([*ident, reason], float(count))
    return found


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
