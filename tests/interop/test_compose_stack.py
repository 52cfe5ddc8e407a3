"""The compose stack for real: build the ikefarm image on a local docker engine, bring up
NATS and the ikefarm services with two `ike` replicas, let a real strongSwan in a
namespace establish through ingress's published ports, and ping through the tunnel: the
stack's kernel service (the userspace ESP dataplane, in ingress's network namespace)
protects the packets. The stack's spans go over OTLP/HTTP (on by default in
compose/ikefarm.toml) to the receiver written for the tests (tests/harness/otlp_receiver,
in the collector's place) on the host: IKE_AUTH is one connected trace through ingress,
the worker, the keystore and the kernel service. `down` leaves nothing behind.

testcontainers drives the stack: `StackCompose` is testcontainers' `DockerCompose`, whose
`stop` (`down --volumes`) and `exec_in_container` the test uses as they are. It overrides
what does not fit this machine: the command (testcontainers runs `docker compose`, the v2
plugin, which Debian 12 does not ship; `tests/harness/docker.compose_cli` picks the v2
plugin or Debian's docker-compose 1.29) with this test's project name and environment
(DOCKER_HOST, IKEFARM_*), and `start`, which has to scale `ike` (`up --wait` needs
healthchecks and v2). The image is built before, once, with the compose CLI.

No image registry is reachable here: the image is built FROM a base image made with
debootstrap (ops/build-base-image, cached). The collector, Jaeger, Prometheus and
Grafana images cannot be had, so those services are checked statically
(tests/unit/test_compose_static.py) and not started here.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from testcontainers.compose import DockerCompose

from tests.harness import docker, prerequisites
from tests.harness.netns import Namespace, wait_for
from tests.harness.strongswan import Psk, StrongSwan, net_to_net
from tests.interop import test_exchange_traces_strongswan as traces

pytestmark = [pytest.mark.interop, pytest.mark.compose, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "compose" / "docker-compose.yml"
BASE_IMAGE = "ikefarm-base:bookworm-py311"
IMAGE = "ikefarm:compose-test"
CORE = ["nats", "ingress", "ike", "keystore", "kernel", "flow"]
PSK = "compose-psk-4d1f8a0c2b9e7365"
METRICS_PORT = 9464
KERNEL_METRICS_PORT = 9465  # the kernel service shares ingress's network namespace
GW_INNER, PEER_INNER = "10.100.0.1", "10.200.0.1"  # inside the vpn's selectors
CLI_CONFIG = ("-c", "/etc/ikefarm/ikefarm.toml")
PROJECT_PREFIX = "ikefarmtest"
STACK_GATEWAY = "172.30.50.1"  # the host's address on the stack's network (IKEFARM_SUBNET)


def free_tcp_port() -> int:
    with socket.socket() as probe:
        probe.bind(("0.0.0.0", 0))
        return int(probe.getsockname()[1])


def host_link_addresses() -> tuple[str, str]:
    """A /30 of 198.51.100.0/24 for this process: (host side, peer side)."""
    base = 4 * (os.getpid() % 63 + 1)
    return f"198.51.100.{base + 1}", f"198.51.100.{base + 2}"


class Stack:
    def __init__(self, workdir: Path, docker_host: str, publish: str) -> None:
        self.project = f"{PROJECT_PREFIX}{os.getpid()}"
        self.cli = docker.compose_cli() or []
        self.env = {
            **os.environ,
            "DOCKER_HOST": docker_host,
            "IKEFARM_IMAGE": IMAGE,
            "IKEFARM_BASE_IMAGE": BASE_IMAGE,
            "IKEFARM_BUILD_NETWORK": "host",
            "IKEFARM_CONFIG": str(workdir / "ikefarm.toml"),
            "IKEFARM_SECRETS": str(workdir / "secrets"),
            "IKEFARM_PUBLISH_ADDRESS": publish,
        }

    def run(self, argv: list[str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            argv, env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )
        assert result.returncode == 0, f"{argv}: {result.stdout[-2000:]}{result.stderr[-3000:]}"
        return result

    def compose(self, *args: str, timeout: float = 600) -> str:
        return self.run(
            [*self.cli, "-p", self.project, "-f", str(COMPOSE_FILE), *args], timeout
        ).stdout

    def testcontainers(self, services: list[str], scale: dict[str, int]) -> StackCompose:
        return StackCompose(
            context=str(COMPOSE_FILE.parent),
            compose_file_name=str(COMPOSE_FILE),
            wait=False,
            cli=[*self.cli, "-p", self.project],
            env=self.env,
            up_services=services,
            scale=scale,
        )

    def docker(self, *args: str) -> str:
        return self.run(["docker", *args], 120).stdout

    def left_behind(self) -> dict[str, list[str]]:
        label = f"label=com.docker.compose.project={self.project}"
        return {
            "containers": self.docker("ps", "-aq", "--filter", label).split(),
            "networks": self.docker("network", "ls", "-q", "--filter", label).split(),
            "volumes": self.docker("volume", "ls", "-q", "--filter", label).split(),
        }

    def reap_stale(self) -> list[str]:
        """`down` the projects of earlier runs of this test whose process is gone (a run
        killed mid-way leaves its network, whose subnet the next one needs)."""
        found: set[str] = set()
        fmt = '{{.Label "com.docker.compose.project"}}'
        for kind in (["ps", "-a"], ["network", "ls"], ["volume", "ls"]):
            found.update(self.docker(*kind, "--format", fmt).split())
        stale = []
        for project in sorted(found):
            pid = project.removeprefix(PROJECT_PREFIX)
            if project == pid or not pid.isdigit() or Path(f"/proc/{pid}").exists():
                continue
            self.run([*self.cli, "-p", project, "-f", str(COMPOSE_FILE), "down", "-v"], 180)
            stale.append(project)
        return stale

    def addresses(self, service: str) -> list[str]:
        ids = self.compose("ps", "-q", service).split()
        found = []
        for container in ids:
            info = json.loads(self.docker("inspect", container))[0]
            for network in info["NetworkSettings"]["Networks"].values():
                found.append(network["IPAddress"])
        return found

    def logs(self) -> str:
        try:
            return self.compose("logs", "--no-color", "--tail", "60", timeout=60)[-6000:]
        except AssertionError as exc:
            return str(exc)


@dataclass
class StackCompose(DockerCompose):
    """testcontainers' DockerCompose on the compose CLI this machine has, with the test's
    project and environment (DOCKER_HOST, IKEFARM_*), bringing `up_services` up with
    `scale`, without building (the test builds once, before)."""

    cli: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    up_services: list[str] = field(default_factory=list)
    scale: dict[str, int] = field(default_factory=dict)

    @property
    def compose_command_property(self) -> list[str]:  # type: ignore[override]
        files = [arg for name in self.compose_file_name or [] for arg in ("-f", name)]
        return [*self.cli, *files]

    def start(self) -> None:
        scale = [arg for name, n in self.scale.items() for arg in ("--scale", f"{name}={n}")]
        self._run_command([*self.compose_command_property, "up", "--detach", "--no-build",
                           *scale, *self.up_services])  # fmt: skip

    def _run_command(
        self, cmd: str | list[str], context: str | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        result = subprocess.run(
            cmd,
            cwd=context or str(self.context),
            env=self.env,
            capture_output=True,
            check=False,
            timeout=600,
        )
        assert result.returncode == 0, f"{cmd}: {result.stdout[-2000:]!r}{result.stderr[-3000:]!r}"
        return result


def scrape(address: str, port: int = METRICS_PORT) -> dict[str, float]:
    """`ikefarm_state` of one container's metrics endpoint: {gauge name: value}."""
    url = f"http://{address}:{port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as reply:
        text = reply.read().decode()
    return {
        sample.labels["name"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "ikefarm_state"
    }


def samples(address: str, port: int = METRICS_PORT) -> list[tuple[str, dict[str, str], float]]:
    url = f"http://{address}:{port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as reply:
        text = reply.read().decode()
    return [
        (sample.name, sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


def scrape_or_empty(address: str) -> dict[str, float]:
    return scrape_or_empty_port(address, METRICS_PORT)


def scrape_or_empty_port(address: str, port: int) -> dict[str, float]:
    try:
        return scrape(address, port)
    except OSError:
        return {}


def info_gauges(address: str, port: int) -> dict[str, str]:
    """`ikefarm_state_info` of one endpoint: {gauge name: its text}."""
    return {
        labels["name"]: labels["value"]
        for name, labels, _value in samples(address, port)
        if name == "ikefarm_state_info"
    }


def stack_config(workdir: Path, otlp_endpoint: str) -> Path:
    """compose/ikefarm.toml as shipped, with this test's PSK, its spans to `otlp_endpoint`
    (the collector's image cannot be had: the test's own receiver takes its place)."""
    text = (ROOT / "compose" / "ikefarm.toml").read_text()
    text = text.replace('secret = "0sc2VjcmV0LXNlY3JldC1zZWNyZXQ="', f'secret = "{PSK}"')
    shipped = 'otlp-endpoint = "http://otel-collector:4318"'
    assert shipped in text  # OTLP export is on by default in the stack
    text = text.replace(shipped, f'otlp-endpoint = "{otlp_endpoint}"')
    assert PSK in text
    path = workdir / "ikefarm.toml"
    path.write_text(text)
    path.chmod(0o644)  # the services read it as the image's ikefarm user
    return path


@pytest.fixture
def peer_namespace() -> Iterator[tuple[Namespace, str, str]]:
    """A namespace linked to the host's, where the published ports are: (ns, host, peer)."""
    host_address, peer_address = host_link_addresses()
    ns = Namespace("cpeer")
    host_if = f"ikfc{os.getpid() % 1000000}"
    try:
        subprocess.run(
            ["ip", "link", "add", host_if, "type", "veth", "peer", "name", "eth0",
             "netns", ns.name],
            check=True,
        )  # fmt: skip
        subprocess.run(["ip", "addr", "add", f"{host_address}/30", "dev", host_if], check=True)
        subprocess.run(["ip", "link", "set", host_if, "up"], check=True)
        ns.add_address("eth0", f"{peer_address}/30")
        ns.run(["ip", "link", "set", "eth0", "up"])
        ns.add_address("lo", f"{PEER_INNER}/32")
        yield ns, host_address, peer_address
    finally:
        ns.close()  # takes the veth pair with it
        subprocess.run(["ip", "link", "del", host_if], capture_output=True, check=False)


SHOW_ROUTING = (
    "from pyroute2 import IPRoute; i = IPRoute(); "
    "print([(r.get_attr('RTA_DST'), r['dst_len'], r.get_attr('RTA_OIF'), r.get_attr('RTA_PREFSRC'))"
    " for r in i.get_routes(table=220)]); "
    "print([(l.get_attr('IFLA_IFNAME'), l['index'], l['flags']) for l in i.get_links()]); "
    "print([(a.get_attr('IFA_ADDRESS'), a['index']) for a in i.get_addr()]); "
    "print([(r['table'], r.get_attr('FRA_PRIORITY')) for r in i.get_rules()])"
)


def dataplane_report(compose: StackCompose, ingress: str, peer: StrongSwan) -> str:
    """What the kernel service counted, its routes and links, and the peer's child SA."""
    counted = {
        labels.get("event", name): value
        for name, labels, value in samples(ingress, KERNEL_METRICS_PORT)
        if name == "ikefarm_events_total" and labels.get("event", "").startswith("esp")
    }
    out, err, _code = compose.exec_in_container(["python", "-c", SHOW_ROUTING], "kernel")
    snmp, _err, _code = compose.exec_in_container(
        ["cat", "/proc/net/snmp", "/proc/net/dev"], "kernel"
    )
    out += snmp
    return f"kernel counters {counted}\nkernel routing {out}{err}\npeer {peer.list_sas()}\n"


ADD_INNER_ADDRESS = (
    "import sys; from pyroute2 import IPRoute; ipr = IPRoute(); "
    "ipr.addr('add', index=ipr.link_lookup(ifname='lo')[0], address=sys.argv[1], prefixlen=32)"
)


def test_compose_stack_with_two_ike_replicas_protects_strongswans_packets(
    tmp_path: Path,
    peer_namespace: tuple[Namespace, str, str],
    strongswan_factory: Callable[..., StrongSwan],
) -> None:
    reason = docker.missing()
    if reason:
        prerequisites.missing(reason)
    ns, host_address, peer_address = peer_namespace
    engine = docker.Dockerd(tmp_path / "dockerd.log")
    docker_host = engine.start()
    stack = Stack(tmp_path, docker_host, host_address)
    compose: StackCompose | None = None
    receiver: subprocess.Popen[bytes] | None = None
    try:
        stack.reap_stale()
        stack.run([str(ROOT / "ops" / "build-base-image"), BASE_IMAGE], timeout=900)
        # every ikefarm service runs the one image: build it once
        stack.compose("build", "nats", timeout=900)
        # the stack's spans go to the test's OTLP/HTTP receiver on the host, which the
        # containers reach at the stack network's gateway address
        spans_file = tmp_path / "spans.jsonl"
        receiver_port = free_tcp_port()
        receiver = subprocess.Popen(
            [sys.executable, "-m", "tests.harness.otlp_receiver", "0.0.0.0", str(receiver_port),
             str(spans_file)],
            cwd=ROOT,
        )  # fmt: skip
        stack_config(tmp_path, f"http://{STACK_GATEWAY}:{receiver_port}")
        stack.run([str(ROOT / "compose" / "make-secrets")], timeout=120)
        compose = stack.testcontainers(CORE, {"ike": 2})
        compose.start()

        (ingress,) = stack.addresses("ingress")
        workers = stack.addresses("ike")
        assert len(workers) == 2
        # each replica claimed its own shard; ingress routes to both
        wait_for(
            lambda: sorted(scrape_or_empty(a).get("shard", -1) for a in workers) == [0, 1],
            timeout=90,
            what=f"two ike shards: {stack.logs()}",
        )
        wait_for(
            lambda: scrape_or_empty(ingress).get("owned_shards") == 2,
            timeout=30,
            what="ingress sees both workers",
        )
        # the kernel service runs the userspace dataplane in ingress's network namespace,
        # where the ESP in UDP arrives
        wait_for(
            lambda: scrape_or_empty_port(ingress, KERNEL_METRICS_PORT).get("tunnels", -1) == 0,
            timeout=60,
            what=f"the kernel service's dataplane: {stack.logs()}",
        )
        kernel_info = info_gauges(ingress, KERNEL_METRICS_PORT)
        assert kernel_info.get("backend") == "userspace", kernel_info
        # the gateway's own address inside its selectors, which the ping answers from
        _out, err, code = compose.exec_in_container(
            ["python", "-c", ADD_INNER_ADDRESS, GW_INNER], "kernel"
        )
        assert code == 0, err

        peer = strongswan_factory(ns)
        peer.load(
            [net_to_net(peer_address, host_address, local_id="peer.example")],
            psks=[Psk(PSK, ["peer.example", "gw.example"])],
        )
        result = peer.initiate(child="c-net", timeout=30, check=False)
        assert result.returncode == 0, f"{result.stdout}\n{peer.log_tail()}\n{stack.logs()}"
        (sa,) = peer.list_sas()
        assert sa["state"] == "ESTABLISHED"
        (child,) = sa["child-sas"]
        assert child["state"] == "INSTALLED"
        # the published ports change the address: both sides saw the NAT and moved to 4500
        assert sa["remote-port"] == "4500"

        # one worker holds the SA, and the kernel service installed its child
        states = [scrape(a) for a in workers]
        assert sorted(s["established"] for s in states) == [0, 1]
        assert scrape(ingress, KERNEL_METRICS_PORT)["children"] == 1

        # packets cross the tunnel: ESP in UDP through docker's published port to the
        # kernel service's dataplane, and back
        assert ns.ping(GW_INNER, src=PEER_INNER, count=3, timeout=10), (
            dataplane_report(compose, ingress, peer) + stack.logs()
        )
        esp = {
            (labels["network_io_direction"], name): value
            for name, labels, value in samples(ingress, KERNEL_METRICS_PORT)
            if name == "ikefarm_esp_packets_total"
        }
        assert esp[("receive", "ikefarm_esp_packets_total")] >= 3, esp
        assert esp[("transmit", "ikefarm_esp_packets_total")] >= 3, esp
        child_after = peer.list_sas()[0]["child-sas"][0]
        assert int(child_after["packets-in"]) >= 3 and int(child_after["packets-out"]) >= 3

        # the CLI in the stack, as user admin: every service instance, both workers
        status = json.loads(stack.compose("run", "--rm", "cli", "status", "--json", *CLI_CONFIG))
        kinds = sorted(row["name"] for row in status)
        assert kinds == ["flow", "ike", "ike", "ingress", "kernel", "keystore"], status
        show = json.loads(
            stack.compose("run", "--rm", "cli", "show", "ike-sa", "details", "--json", *CLI_CONFIG)
        )
        assert [row["spi_i"] for row in show] == [sa["initiator-spi"]]

        # the handshake and the worker's keystore and kernel requests, in its histograms
        seen = [s for a in workers for s in samples(a)]
        handshakes = [v for n, _l, v in seen if n == "ikefarm_ike_handshake_duration_seconds_count"]
        assert sum(handshakes) == 1
        asked = {
            labels["subject"]
            for name, labels, value in seen
            if name == "ikefarm_bus_request_duration_seconds_count" and value >= 1
        }
        assert {"ikefarm.keystore.psk.auth", "ikefarm.kernel.child.install"} <= asked

        # OTLP export is on in the stack: IKE_AUTH is one connected trace through
        # ingress, the worker, the keystore and the kernel service
        wanted = {"ikefarm-ingress", "ikefarm-ike", "ikefarm-keystore", "ikefarm-kernel"}

        def auth_trace() -> list[dict[str, Any]] | None:
            found = traces.spans(spans_file)
            starts = traces.exchange_spans(
                found, "ike.exchange IKE_AUTH", spi_i=sa["initiator-spi"], response=False
            )
            if not starts:
                return None
            trace = traces.by_trace(found)[starts[0]["trace_id"]]
            sent = "ike.send IKE_AUTH" in {s["name"] for s in trace}
            done = wanted <= {s["service"] for s in trace} and sent
            return trace if done and traces.connected(trace) else None

        trace = wait_for(auth_trace, timeout=30, what="the IKE_AUTH trace of the stack")
        assert trace is not None
        assert traces.assert_connected(trace)["service"] == "ikefarm-ingress"
    finally:
        if receiver is not None:
            receiver.terminate()
            receiver.wait(10)
        try:
            if compose is not None:
                compose.stop()  # testcontainers: down --volumes
            # whatever a failed start left, and the cli's containers
            stack.compose("down", "-v", "--remove-orphans", "--timeout", "10", timeout=180)
            assert stack.left_behind() == {"containers": [], "networks": [], "volumes": []}
        finally:
            engine.stop()
