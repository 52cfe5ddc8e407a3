"""A Prometheus endpoint per service process: OpenTelemetry metrics, from the numbers
`ikefarm status` shows.

`[telemetry] metrics-listen = "ADDRESS:PORT"` (empty: off, the default) gives the
service an OpenTelemetry `MeterProvider` whose reader is the OpenTelemetry
Prometheus exporter (`PrometheusMetricReader`), answering `GET /metrics` on that
address only. The instruments (`INSTRUMENTS`) are of two kinds:

- asynchronous ones (observable counters, gauges and up-down counters) for every
  number the service already keeps for its NATS micro `stats` endpoint: the
  hot paths (a datagram dropped, an ESP packet protected) keep adding 1 to a
  dict entry, and nothing of OpenTelemetry runs per datagram
  (ops/bench/RESULTS.md, "Metrics: a counter add"). Every scrape takes one
  snapshot of the service's stats (`Stats`) inside the service's event loop
  (so the exporter thread never reads a table while the loop changes it), and
  the instruments' callbacks observe that snapshot: Prometheus and `ikefarm
  status` read the same numbers;
- synchronous histograms for latencies (shared/observability/latency.py).

The instrument names are fixed; what varies goes into attributes:

- `ikefarm.events{event}`: the service's counters (drops by reason,
  `gate.cookie_sent`, `auth_failed.<reason>`, ...); `ikefarm.engine.events{event}`
  the ike engine's counters (exchanges, auth methods, ...).
- `ikefarm.state{name}`: the numeric gauges, nested names joined with `.`
  (`half_open`, `dos.farm_half_open`, `children`, ...); a list counts its items
  (`owned_shards`); `ikefarm.state.info{name,value}` = 1 for the textual ones
  (`dos.cookie_mode`, `backend`).

Besides these generic instruments, the numbers an operator looks for first have
names of their own, observed from the same snapshot:

- ike: `ikefarm.ike.exchanges{role,exchange,result}` (the engine's `exchange.*`
  counters, `shared/ikev2/exchange_counts.py`), `ikefarm.ike.sas{state}` and
  `ikefarm.ike.child_sas{state}`.
- ingress: `ikefarm.ike.cookies_required` (1 while new IKE_SA_INITs must carry
  a COOKIE) and `ikefarm.ike.cookie_mode{mode}` (1 for the configured mode).
- kernel (userspace dataplane): `ikefarm.esp.packets{network.io.direction}`,
  `ikefarm.esp.io{network.io.direction}` (inner packet octets, unit `By`) and
  `ikefarm.esp.dropped{network.io.direction,reason}`.
- flow: `ikefarm.flow.sessions`, `ikefarm.flow.sessions.limit` and
  `ikefarm.flow.session.refusals{reason}`.
- every service: `process.uptime` (the semantic conventions' process metric).

Names follow the OpenTelemetry semantic conventions where they exist
(`process.uptime`, the `network.io.direction` attribute and `By` unit of the
network metrics); there are none for IKE or ESP. The exporter writes them the
OpenTelemetry-to-Prometheus way: dots as underscores, the unit as a suffix,
`_total` for counters (`METRIC_NAMES`: `ikefarm_esp_io_bytes_total`,
`process_uptime_seconds`, ...), and `target_info` with the resource
(`service.name`, `service.instance.id`). Every series carries `service` and
`ikefarm_instance` (Prometheus keeps `instance` for the scrape target).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from ikefarm.proto.messages import Stats
from ikefarm.shared.config.kinds import parse_listen
from ikefarm.shared.ikev2.exchange_counts import parse_counter
from ikefarm.shared.observability.latency import HISTOGRAMS, LATENCY_BUCKETS, Latencies

SNAPSHOT_TIMEOUT = 2.0  # s a scrape waits for the event loop
SCOPE = "ikefarm"

# OpenTelemetry name -> (instrument kind, unit, description); with the histograms of
# latency.py, the only instruments there are
INSTRUMENTS: dict[str, tuple[str, str, str]] = {
    "ikefarm.build.info": ("gauge", "", "1 per service process, with its version"),
    "process.uptime": ("gauge", "s", "seconds since the service process started"),
    "ikefarm.bus.requests": ("counter", "{request}", "bus requests this process answered"),
    "ikefarm.bus.request.errors": (
        "counter",
        "{request}",
        "bus requests answered with an error",
    ),
    "ikefarm.events": ("counter", "{event}", "the service's counters, by event"),
    "ikefarm.engine.events": ("counter", "{event}", "the ike engine's counters, by event"),
    "ikefarm.state": ("gauge", "", "the service's gauges, by name"),
    "ikefarm.state.info": ("gauge", "", "1 for each textual gauge, its value as a label"),
    "ikefarm.ike.exchanges": (
        "counter",
        "{exchange}",
        "IKE exchanges completed, by role, exchange type and result (ok, error notify, timeout)",
    ),
    "ikefarm.ike.sas": ("updown", "{sa}", "IKE SAs of the worker, by state"),
    "ikefarm.ike.child_sas": ("updown", "{sa}", "child SAs of the worker's IKE SAs, by state"),
    "ikefarm.ike.cookies_required": (
        "gauge",
        "",
        "1 while ingress requires a COOKIE from new IKE_SA_INITs (RFC 7296 2.6)",
    ),
    "ikefarm.ike.cookie_mode": ("gauge", "", "1 for the configured cookie mode"),
    "ikefarm.esp.packets": (
        "counter",
        "{packet}",
        "ESP packets protected or accepted, by direction",
    ),
    "ikefarm.esp.io": ("counter", "By", "inner octets of those packets, by direction"),
    "ikefarm.esp.dropped": (
        "counter",
        "{packet}",
        "ESP packets dropped, by direction and reason",
    ),
    "ikefarm.flow.sessions": ("updown", "{session}", "flow sessions in the table"),
    "ikefarm.flow.sessions.limit": ("updown", "{session}", "the table's maximum of sessions"),
    "ikefarm.flow.session.refusals": (
        "counter",
        "{session}",
        "new sessions refused, by reason",
    ),
    **{name: ("histogram", "s", text) for name, (_label, text) in HISTOGRAMS.items()},
}

# the units the OpenTelemetry-to-Prometheus mapping writes as a name suffix (those we use)
UNIT_SUFFIXES = {"s": "seconds", "By": "bytes"}


def prometheus_name(name: str, unit: str) -> str:
    """The metric family name the Prometheus exporter writes for an instrument: dots (any
    character Prometheus does not take) as `_`, then the unit's suffix unless the name ends
    with it; `{annotations}` are no unit."""
    base = re.sub(r"[^a-zA-Z0-9:]+", "_", name)
    suffix = UNIT_SUFFIXES.get(unit, "")
    if suffix and not base.endswith(f"_{suffix}"):
        base = f"{base}_{suffix}"
    return base


SAMPLE_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
# the sample names a scrape can show, and dashboards may use (a histogram shows three)
METRIC_NAMES: frozenset[str] = frozenset(
    {
        prometheus_name(name, unit) + suffix
        for name, (kind, unit, _text) in INSTRUMENTS.items()
        for suffix in SAMPLE_SUFFIXES.get(kind, ("",))
    }
    | {"target_info"}  # the exporter's: the resource's attributes
)
ENGINE_GAUGE = "engine"  # ike: gauges()["engine"] holds the engine's counters

Point = tuple[float, dict[str, str]]


def flatten(values: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from flatten(value, f"{name}.")
        else:
            yield name, value


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


ESP_DIRECTIONS = {"in": "receive", "out": "transmit"}  # network.io.direction values
IO_DIRECTION = "network.io.direction"  # Prometheus writes the label network_io_direction


def observations(stats: Stats) -> dict[str, list[Point]]:
    """What each asynchronous instrument observes in one stats snapshot:
    {instrument name: [(value, attributes)]}."""
    ident = {"service": stats.service, "ikefarm_instance": stats.instance}
    found: dict[str, list[Point]] = {name: [] for name in INSTRUMENTS}

    def add(instrument: str, value: float, /, **attributes: str) -> None:
        found[instrument].append((float(value), {**ident, **attributes}))

    add("ikefarm.build.info", 1, version=stats.version)
    add("process.uptime", stats.uptime)
    add("ikefarm.bus.requests", stats.requests)
    add("ikefarm.bus.request.errors", stats.errors)
    for event, count in sorted(stats.counters.items()):
        add("ikefarm.events", count, event=str(event))
    gauges = dict(stats.gauges)
    engine_counts = gauges.pop(ENGINE_GAUGE, None)
    if not isinstance(engine_counts, Mapping):
        engine_counts = {}
    for event, count in sorted(engine_counts.items()):
        if _number(count) and parse_counter(str(event)) is None:
            add("ikefarm.engine.events", count, event=str(event))
    for name, value in flatten(gauges):
        if isinstance(value, bool | int | float):
            add("ikefarm.state", value, name=name)
        elif isinstance(value, list | tuple):
            add("ikefarm.state", len(value), name=name)
        elif isinstance(value, str):
            add("ikefarm.state.info", 1, name=name, value=value)
    _named(stats, engine_counts, add)
    return found


def _named(stats: Stats, engine_counts: Mapping[str, Any], add: Callable[..., None]) -> None:
    """The named instruments of the module docstring, from the same snapshot."""
    gauges = stats.gauges
    if stats.service == "ike":
        for event, count in sorted(engine_counts.items()):
            parsed = parse_counter(str(event))
            if parsed is not None and _number(count):
                role, exchange, result = parsed
                add("ikefarm.ike.exchanges", count, role=role, exchange=exchange, result=result)
        states = gauges.get("sa_states")
        for key, name in (("ike", "ikefarm.ike.sas"), ("child", "ikefarm.ike.child_sas")):
            counts = states.get(key) if isinstance(states, Mapping) else None
            for state, count in sorted(counts.items() if isinstance(counts, Mapping) else ()):
                if _number(count):
                    add(name, count, state=str(state))
    dos = gauges.get("dos")
    if stats.service == "ingress" and isinstance(dos, Mapping):
        if isinstance(dos.get("cookies_active"), bool):
            add("ikefarm.ike.cookies_required", float(dos["cookies_active"]))
        if isinstance(dos.get("cookie_mode"), str):
            add("ikefarm.ike.cookie_mode", 1, mode=dos["cookie_mode"])
    if stats.service == "kernel":
        for event, count in sorted(stats.counters.items()):
            parts = str(event).split(".", 3)
            if len(parts) < 3 or parts[0] != "esp" or parts[1] not in ESP_DIRECTIONS:
                continue
            direction = ESP_DIRECTIONS[parts[1]]
            if len(parts) == 3 and parts[2] == "packets":
                add("ikefarm.esp.packets", count, **{IO_DIRECTION: direction})
            elif len(parts) == 3 and parts[2] == "bytes":
                add("ikefarm.esp.io", count, **{IO_DIRECTION: direction})
            elif len(parts) == 4 and parts[2] == "drop":
                add("ikefarm.esp.dropped", count, reason=parts[3], **{IO_DIRECTION: direction})
    if stats.service == "flow":
        for key, name in (
            ("sessions", "ikefarm.flow.sessions"),
            ("max_sessions", "ikefarm.flow.sessions.limit"),
        ):
            if _number(gauges.get(key)):
                add(name, gauges[key])
        for name, count in sorted(gauges.items()):
            if str(name).startswith("table.refused.") and _number(count):
                reason = str(name).removeprefix("table.refused.")
                add("ikefarm.flow.session.refusals", count, reason=reason)


class MetricsExport:
    """The service's OpenTelemetry meter and its Prometheus reader (no socket: `serve`).

    `source` returns the stats snapshot a collection observes (None: observe nothing);
    it runs in the thread that collects, once per collection."""

    def __init__(
        self,
        service: str,
        instance: str,
        version: str,
        latencies: Latencies | None = None,
        source: Callable[[], Stats | None] | None = None,
    ) -> None:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from opentelemetry.sdk.metrics import Histogram, MeterProvider
        from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
        from opentelemetry.sdk.resources import Resource
        from prometheus_client.registry import CollectorRegistry

        self.source = source
        self.latencies = latencies
        self._observed: dict[str, list[Point]] = {}
        export = self

        class Reader(PrometheusMetricReader):
            """Takes the snapshot once before the callbacks of one collection run."""

            def collect(self, timeout_millis: float = 10_000) -> None:
                export._take_snapshot()
                super().collect(timeout_millis)

        # one registry per export: services of a test process do not share names
        self.registry = CollectorRegistry(auto_describe=False)
        self.reader = Reader(registry=self.registry, scope_info_enabled=False)
        resource = Resource.create(
            {
                "service.name": f"ikefarm-{service}",
                "service.instance.id": instance,
                "service.version": version,
            }
        )
        self.provider = MeterProvider(
            metric_readers=[self.reader],
            resource=resource,
            views=[
                View(
                    instrument_type=Histogram,
                    aggregation=ExplicitBucketHistogramAggregation(LATENCY_BUCKETS),
                )
            ],
        )
        meter = self.provider.get_meter(SCOPE, version)
        makers = {
            "counter": meter.create_observable_counter,
            "gauge": meter.create_observable_gauge,
            "updown": meter.create_observable_up_down_counter,
        }
        for name, (kind, unit, text) in INSTRUMENTS.items():
            if kind in makers:
                makers[kind](name, callbacks=[self._callback(name)], unit=unit, description=text)
        if latencies is not None:
            latencies.bind(meter, {"service": service, "ikefarm_instance": instance})

    def _take_snapshot(self) -> None:
        stats = None
        if self.source is not None:
            try:
                stats = self.source()
            except Exception:
                stats = None  # a starved loop: the scrape has the histograms only
        self._observed = observations(stats) if stats is not None else {}

    def _callback(self, name: str) -> Callable[[Any], Iterable[Any]]:
        from opentelemetry.metrics import Observation

        def observe(_options: Any) -> Iterable[Any]:
            return [Observation(value, attrs) for value, attrs in self._observed.get(name, ())]

        return observe

    def exposition(self) -> str:
        """What `GET /metrics` answers (the Prometheus text format)."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode()

    def close(self) -> None:
        if self.latencies is not None:
            self.latencies.unbind()
        self.provider.shutdown()


def loop_source(
    loop: asyncio.AbstractEventLoop, snapshot: Callable[[], Stats]
) -> Callable[[], Stats | None]:
    """A source that takes the snapshot inside the service's event loop and waits for it."""

    async def take() -> Stats:
        return snapshot()

    def source() -> Stats | None:
        future = asyncio.run_coroutine_threadsafe(take(), loop)
        try:
            return future.result(SNAPSHOT_TIMEOUT)
        except Exception:
            future.cancel()
            return None

    return source


class MetricsServer:
    """`GET /metrics` of one `MetricsExport` on one address; `close()` stops answering."""

    def __init__(self, listen: str, export: MetricsExport) -> None:
        from prometheus_client import start_http_server

        self.export = export
        self.address, self.port = parse_listen(listen)
        self._server, self._thread = start_http_server(
            self.port, addr=self.address, registry=export.registry
        )
        self.port = int(self._server.server_address[1])

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(2.0)
