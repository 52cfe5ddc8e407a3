"""The parts of the compose stack whose images cannot run here, checked statically: the
compose file validates, Prometheus' config passes promtool, Grafana's provisioning and
dashboards are valid and every dashboard query uses only metrics ikefarm exports
(`METRIC_NAMES`, from the code that exports them)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from ikefarm.shared.config.loader import load_config
from ikefarm.shared.observability.metrics import METRIC_NAMES
from tests.harness.prerequisites import missing

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose"
DASHBOARDS = sorted((COMPOSE / "grafana" / "dashboards").glob("*.json"))

# PromQL words that are not metric names
PROMQL_WORDS = {
    "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile",
    "count_values", "group", "by", "without", "on", "ignoring", "group_left", "group_right",
    "and", "or", "unless", "offset", "bool", "rate", "irate", "increase", "delta", "idelta",
    "deriv", "abs", "ceil", "floor", "round", "clamp_min", "clamp_max", "histogram_quantile",
    "avg_over_time", "max_over_time", "min_over_time", "sum_over_time", "count_over_time",
    "last_over_time", "label_replace", "label_join", "absent", "time", "vector", "scalar",
    "sort", "sort_desc", "changes", "resets",
}  # fmt: skip


def compose_cli() -> list[str]:
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, check=False)
        if probe.returncode == 0:
            return [docker, "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    missing("docker compose (or Debian's docker-compose: apt-get install docker-compose)")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads."""
    text = re.sub(r'"(?:\\.|[^"\\])*"', "", expr)  # strings (label values, regexes)
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    words = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", text))
    return {w for w in words if w not in PROMQL_WORDS and not re.fullmatch(r"\d+[smhdwy]", w)}


def test_compose_file_validates(tmp_path: Path) -> None:
    cli = compose_cli()
    result = subprocess.run(
        [*cli, "-f", str(COMPOSE / "docker-compose.yml"), "config", "-q"],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "DOCKER_HOST": f"unix://{tmp_path}/no-daemon.sock"},
    )
    assert result.returncode == 0, result.stderr


def test_compose_ikefarm_config_loads() -> None:
    config = load_config(COMPOSE / "ikefarm.toml")
    assert config.nats.url == "nats://nats:4222"
    assert config.keystore.master_key_file == "/run/secrets/ikefarm-master-key"
    assert config.telemetry.otlp_endpoint.startswith("http://otel-collector:")


def test_master_key_is_a_secret_never_an_environment_variable() -> None:
    text = (COMPOSE / "docker-compose.yml").read_text()
    assert "IKEFARM_MASTER_KEY" not in text
    assert "master.key" in text and "ikefarm-master-key" in text


def test_prometheus_config_passes_promtool() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        missing("promtool (apt-get install prometheus)")
    result = subprocess.run(
        [promtool, "check", "config", str(COMPOSE / "prometheus" / "prometheus.yml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_there_are_dashboards_and_provisioning_points_at_them() -> None:
    assert DASHBOARDS
    provisioning = (COMPOSE / "grafana/provisioning/dashboards/dashboards.yaml").read_text()
    assert "/var/lib/grafana/dashboards" in provisioning
    compose = (COMPOSE / "docker-compose.yml").read_text()
    assert "./grafana/dashboards:/var/lib/grafana/dashboards" in compose
    datasources = (COMPOSE / "grafana/provisioning/datasources/datasources.yaml").read_text()
    assert "uid: prometheus" in datasources and "http://prometheus:9090" in datasources


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboards_query_only_metrics_ikefarm_exports(path: Path) -> None:
    dashboard = json.loads(path.read_text())
    assert dashboard["uid"] and dashboard["title"]
    exprs = [
        target["expr"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        if "expr" in target
    ]
    assert exprs
    for expr in exprs:
        names = metric_names(expr)
        assert names, expr
        assert names <= METRIC_NAMES, f"{expr}: {sorted(names - METRIC_NAMES)} not exported"


def test_the_query_reader_sees_metric_names() -> None:
    expr = 'sum by (event) (rate(ikefarm_events_total{event=~"a.b"}[5m])) / other_metric'
    assert metric_names(expr) == {"ikefarm_events_total", "other_metric"}


def test_the_stacks_kernel_service_protects_packets_where_ingress_receives_them() -> None:
    """backend auto (not the memory double), in ingress's network namespace, with what the
    userspace dataplane and XFRM need; its metrics on a port of its own there, scraped."""
    config = load_config(COMPOSE / "ikefarm.toml")
    assert config.kernel.backend == "userspace"
    compose = (COMPOSE / "docker-compose.yml").read_text()
    kernel = compose[compose.index("\n  kernel:\n") : compose.index("\n  flow:\n")]
    assert 'network_mode: "service:ingress"' in kernel
    assert "/dev/net/tun:/dev/net/tun" in kernel
    assert "NET_ADMIN" in kernel and "NET_RAW" in kernel
    assert '"--metrics-listen", "0.0.0.0:9465"' in kernel
    prometheus = (COMPOSE / "prometheus" / "prometheus.yml").read_text()
    assert "port: 9465" in prometheus
