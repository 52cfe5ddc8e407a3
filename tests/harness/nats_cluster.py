"""A NATS cluster with JetStream clustered, inside one namespace: nats-server nodes on its
loopback, configured as an operator does it (`ikefarm config nats-node`, the farm's users).

The namespace is the test's own, so fixed ports cannot collide with another test's.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ikefarm.shared.bus.auth import ensure_credentials
from ikefarm.shared.bus.cluster import node_config, write_node_config
from ikefarm.shared.bus.embedded import nats_server_binary
from tests.harness.netns import Namespace, wait_for

CLIENT_PORT = 4222
ROUTE_PORT = 6222
MONITOR_PORT = 8222

_GET = (
    "import sys, urllib.request\n"
    "try:\n"
    "    print(urllib.request.urlopen(sys.argv[1], timeout=2).read().decode())\n"
    "except Exception as exc:\n"
    "    print(exc, file=sys.stderr); sys.exit(1)\n"
)


@dataclass
class Node:
    name: str
    index: int
    config: Path
    log: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{CLIENT_PORT + self.index}"

    @property
    def monitor(self) -> str:
        return f"http://127.0.0.1:{MONITOR_PORT + self.index}"


@dataclass
class NatsCluster:
    ns: Namespace
    workdir: Path
    size: int = 3
    nodes: list[Node] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.credentials_dir = self.workdir / "nats-auth"
        users = ensure_credentials(self.credentials_dir)
        routes = [f"127.0.0.1:{ROUTE_PORT + i}" for i in range(self.size)]
        for i in range(self.size):
            name = f"n{i}"
            text = node_config(
                name=name,
                listen=f"127.0.0.1:{CLIENT_PORT + i}",
                cluster_listen=routes[i],
                routes=routes,
                store_dir=self.workdir / f"store-{name}",
                credentials=users,
                monitor=f"127.0.0.1:{MONITOR_PORT + i}",
            )
            config = write_node_config(self.credentials_dir / f"nats-node-{name}.conf", text)
            self.nodes.append(Node(name, i, config, self.workdir / f"{name}.log"))

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def start_node(self, node: Node) -> None:
        node.process = self.ns.popen(
            [nats_server_binary(), "-c", str(node.config), "-l", str(node.log)]
        )

    def start(self, timeout: float = 30.0) -> None:
        for node in self.nodes:
            self.start_node(node)
        self.wait_ready(self.nodes, timeout)

    def wait_ready(self, nodes: list[Node], timeout: float = 30.0) -> None:
        """Every node answers healthy: JetStream on and its meta group current."""
        for node in nodes:
            wait_for(
                lambda node=node: self.get(node, "/healthz") is not None,
                timeout=timeout,
                what=f"nats node {node.name} healthy",
            )

    def get(self, node: Node, path: str) -> Any:
        """A monitoring endpoint's JSON, None when the node does not answer (or not 200)."""
        result = self.ns.run(
            [sys.executable, "-c", _GET, node.monitor + path], check=False, timeout=10
        )
        if result.returncode != 0:
            return None
        try:
            return json.loads(result.stdout)
        except ValueError:
            return None

    def streams(self, node: Node) -> dict[str, dict[str, Any]]:
        """name -> the stream's detail (config, cluster: leader and replicas) seen by `node`."""
        data = self.get(node, "/jsz?accounts=true&streams=true&config=true") or {}
        return {
            stream["name"]: stream
            for account in data.get("account_details", [])
            for stream in account.get("stream_detail", [])
        }

    def node(self, name: str) -> Node:
        (found,) = [node for node in self.nodes if node.name == name]
        return found

    def kill(self, node: Node) -> None:
        assert node.process is not None
        node.process.send_signal(signal.SIGKILL)
        node.process.wait(timeout=10)
        node.process = None

    def log_tail(self, lines: int = 30) -> str:
        out = []
        for node in self.nodes:
            if node.log.exists():
                out.append(f"--- {node.name} ---")
                out += node.log.read_text(errors="replace").splitlines()[-lines:]
        return "\n".join(out)
