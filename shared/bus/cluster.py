"""nats-server configuration for one node of a NATS cluster that carries a farm.

An external bus for several hosts (docs/failover.md): three (or five) nats-server
nodes with JetStream clustered, ikefarm's config naming them (`[nats] servers`)
and asking for replicated buckets (`[nats] replicas = 3`). `ikefarm config
nats-node DIR ...` writes one node's config: its name, client listener, the
JetStream store, the cluster block (a name, the route listener, routes to the
other nodes) and the farm's per-service users, the same `authorization` block
`ikefarm config nats-auth DIR` writes from the credentials in DIR. The file holds
the passwords: written 0600, like the credentials.

Routes carry no authentication here: the route listener belongs on an address only
the cluster's nodes reach (a private network, or loopback for a test on one host).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from ikefarm.shared.bus.auth import BusUser, authorization_block, write_private

CLUSTER_NAME = "ikefarm"


def node_config(
    *,
    name: str,
    listen: str,
    cluster_listen: str,
    routes: Sequence[str],
    store_dir: str | Path,
    credentials: dict[str, BusUser] | None,
    cluster_name: str = CLUSTER_NAME,
    monitor: str | None = None,
) -> str:
    """The nats-server config text of one node. `listen`, `cluster_listen`, `monitor` and
    each route are HOST:PORT; a route to the node itself is ignored by nats-server, so
    every node may be given the same list."""
    lines = [
        f"server_name: {json.dumps(name)}",
        f"listen: {json.dumps(listen)}",
    ]
    if monitor:
        lines.append(f"http: {json.dumps(monitor)}")
    lines += [
        "jetstream {",
        f"  store_dir: {json.dumps(str(store_dir))}",
        "}",
        "cluster {",
        f"  name: {json.dumps(cluster_name)}",
        f"  listen: {json.dumps(cluster_listen)}",
        "  routes: [",
        *(f"    {json.dumps('nats-route://' + route)}" for route in routes),
        "  ]",
        "}",
    ]
    text = "\n".join(lines) + "\n"
    if credentials:
        text += authorization_block(credentials)
    return text


def write_node_config(path: Path, text: str) -> Path:
    """Write a node's config 0600 (it holds the users' passwords)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_private(path, text)
    return path
