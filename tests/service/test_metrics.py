"""The Prometheus endpoint of a service process (`[telemetry] metrics-listen`): a real
service on a real nats-server, scraped over HTTP, shows the numbers its NATS `stats`
endpoint (what `ikefarm status` reads) answers, under the names `METRIC_NAMES` declares."""

from __future__ import annotations

import asyncio
import socket
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ikefarm.proto import envelope, subjects
from ikefarm.proto.messages import Stats, StatsRequest
from ikefarm.services.ike.service import IkeService
from ikefarm.shared.bus.embedded import EmbeddedNats
from ikefarm.shared.bus.runtime import Runtime
from ikefarm.shared.config.loader import load_config
from ikefarm.shared.observability.metrics import METRIC_NAMES
from tests.harness.ports import udp_ports
from tests.service.test_ingress_dos import farm_config

pytestmark = pytest.mark.timeout(60)


def free_tcp_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def scrape(port: int) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """{sample name: {labels: value}} of one GET /metrics."""
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as reply:
        text = reply.read().decode()
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = tuple(sorted(sample.labels.items()))
            samples.setdefault(sample.name, {})[key] = sample.value
    return samples


async def test_ike_worker_metrics_are_its_stats(nats_server: EmbeddedNats, tmp_path: Path) -> None:
    ike_port, natt_port = udp_ports(2)
    metrics_port = free_tcp_port()
    config = load_config(
        farm_config(
            tmp_path,
            ike_port,
            natt_port,
            f'[telemetry]\nmetrics-listen = "127.0.0.1:{metrics_port}"',
        )
    )
    worker = Runtime(IkeService, config, nats_server.url, instance="ike-m", options={"shard": 3})
    await worker.start()
    try:
        worker.counters["dropped.test_reason"] += 7  # as a drop the service counted
        with pytest.raises(Exception):  # noqa: B017 - nobody answers: no responders or timeout
            await worker.request("ikefarm.kernel.show", StatsRequest(), timeout=0.5)
        samples = await asyncio.to_thread(scrape, metrics_port)
        reply = await worker.nc.request(  # type: ignore[union-attr]
            subjects.instance_endpoint("ike", "ike-m", "stats"),
            envelope.pack(StatsRequest()),
            timeout=5,
        )
        stats = envelope.unpack_reply(reply.data, Stats)
    finally:
        await worker.stop()

    assert set(samples) <= METRIC_NAMES, set(samples) - METRIC_NAMES
    ident = (("ikefarm_instance", "ike-m"), ("service", "ike"))
    assert samples["ikefarm_events_total"][(("event", "dropped.test_reason"), *ident)] == 7
    state = samples["ikefarm_state"]
    assert state[(*ident[:1], ("name", "shard"), *ident[1:])] == 3
    for name in ("half_open", "established", "ike_sas"):
        assert state[(*ident[:1], ("name", name), *ident[1:])] == stats.gauges[name]
    assert samples["ikefarm_build_info"][(*ident[:1], *ident[1:], ("version", stats.version))] == 1
    # the engine's counters are counters of their own family, by event; its exchange
    # counts are ikefarm_ike_exchanges_total instead
    assert {dict(k)["event"] for k in samples.get("ikefarm_engine_events_total", {})} == {
        e for e in stats.gauges["engine"] if not e.startswith("exchange.")
    }
    # SAs by state: the same walk the stats reply carries, every state present
    by_state = samples["ikefarm_ike_sas"]
    for state, count in stats.gauges["sa_states"]["ike"].items():
        assert by_state[(*ident[:1], *ident[1:], ("state", state))] == count
    assert {dict(k)["state"] for k in samples["ikefarm_ike_child_sas"]} >= {"installed"}
    # the request that found nobody is in the bus latency histogram, by subject
    count = samples["ikefarm_bus_request_duration_seconds_count"]
    assert count[(*ident[:1], *ident[1:], ("subject", "ikefarm.kernel.show"))] == 1
    buckets = samples["ikefarm_bus_request_duration_seconds_bucket"]
    assert (
        buckets[(*ident[:1], ("le", "+Inf"), *ident[1:], ("subject", "ikefarm.kernel.show"))] == 1
    )
    # stopped: nothing listens any more
    with pytest.raises(OSError):
        scrape(metrics_port)


async def test_without_metrics_listen_nothing_listens(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    ike_port, natt_port = udp_ports(2)
    config = load_config(farm_config(tmp_path, ike_port, natt_port, ""))
    assert config.telemetry.metrics_listen == ""
    worker = Runtime(IkeService, config, nats_server.url, instance="ike-n", options={"shard": 0})
    await worker.start()
    try:
        assert worker.metrics is None
    finally:
        await worker.stop()
