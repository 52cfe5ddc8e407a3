"""The bus side of farm failover against a real strongSwan (docs/failover.md): `kill -9` of
the embedded nats-server and of the keystore under `ikefarm up`. Each is restarted, the
services reconnect, and nothing is lost or re-negotiated: the peer's DPD and a child rekey go
through the same IKE SAs (same SPIs), `ikefarm show ike-sa` still lists them, and a new
handshake works."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.harness.gateway import Gateway
from tests.harness.nats_cluster import NatsCluster
from tests.harness.netns import NetnsPair, wait_for
from tests.harness.strongswan import StrongSwan
from tests.interop.test_failover_strongswan import child_spis, ike_spis
from tests.interop.test_responder_strongswan import PSK, peer, peer_connection, psk_for

__all__ = ["peer"]  # the fixture, imported for pytest

pytestmark = [pytest.mark.interop, pytest.mark.timeout(240)]

CONNECTIONS = 4


def up_state(gateway: Gateway) -> dict[str, Any]:
    try:
        return dict(json.loads((gateway.workdir / "state" / "up.json").read_text()))
    except (OSError, ValueError):
        return {}


def alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def established(
    gateway: Gateway, peer: StrongSwan, names: list[str], identities: list[str]
) -> list[dict[str, Any]]:
    for i in [*range(1, len(names)), 99]:  # the peer fixture put 10.200.0.1 there already
        peer.ns.add_address("lo", f"10.200.{i}.1/32")
    peer.load(
        [
            peer_connection(
                name=name, identity=identity, local_ts=f"10.200.{i}.0/24", dpd_delay="2s"
            )
            for i, (name, identity) in enumerate(zip(names, identities, strict=True))
        ]
        + [peer_connection(name="late", identity="late.peer.example", local_ts="10.200.99.0/24")],
        psks=[psk_for(*identities, "late.peer.example")],
    )
    for name in names:
        peer.initiate(child=f"{name}-net", timeout=20)
    gateway.wait_sas(len(names))
    # every SA is in the store (the worker writes within 50 ms of a change)
    wait_for(
        lambda: (
            sum(
                row.get("gauges", {}).get("snapshots", {}).get("stored", 0)
                for row in gateway.status().get("ike", [])
            )
            == len(names)
        ),
        timeout=10,
        what="every SA snapshotted",
    )
    return peer.list_sas()


def nothing_lost(
    gateway: Gateway,
    peer: StrongSwan,
    names: list[str],
    before: list[dict[str, Any]],
    log_from: int,
    workers_before: dict[str, int],
) -> None:
    """The same IKE SAs on both sides, DPD answered through each after `log_from`, a child
    rekey through one, no worker restarted (nothing adopted, nothing re-negotiated), and a
    new handshake works."""

    def dpd_answered() -> bool:
        text = peer.log_text()[log_from:]
        lines = [line for line in text.splitlines() if "parsed INFORMATIONAL response" in line]
        return all(any(f"<{name}|" in line for line in lines) for name in names)

    wait_for(dpd_answered, timeout=30, what="strongSwan's DPD answered through every SA")
    target = names[0]
    old_children = child_spis(before)[target]
    peer.rekey(child=f"{target}-net")

    def rekeyed() -> list[dict[str, Any]] | None:
        sas = [sa for sa in peer.list_sas() if sa["name"] in names]
        mine = [sa for sa in sas if sa["name"] == target]
        if len(mine) != 1 or not mine[0]["child-sas"]:
            return None
        fresh = child_spis(mine)[target]
        return sas if fresh and not set(fresh) & set(old_children) else None

    after = wait_for(rekeyed, timeout=20, what=f"{target}'s child rekeyed")
    assert ike_spis(after) == ike_spis(before)
    assert all(sa["state"] == "ESTABLISHED" for sa in after)
    untouched = {n: c for n, c in child_spis(after).items() if n != target}
    assert untouched == {n: c for n, c in child_spis(before).items() if n != target}
    # ikefarm lists the same SAs
    rows = gateway.wait_sas(len(names), timeout=20)
    assert {(r["spi_i"], r["spi_r"]) for r in rows} >= set(ike_spis(before).values())
    # no worker restarted: the SAs lived on in them, nothing was adopted or re-negotiated
    ike_pids = {k: v for k, v in up_state(gateway)["children"].items() if k.startswith("ike-")}
    assert ike_pids == workers_before
    for row in gateway.status()["ike"]:
        assert row["gauges"]["snapshots"]["restored"] == 0
    # and a handshake after the restart works
    peer.initiate(child="late-net", timeout=30)
    gateway.wait_sas(len(names) + 1, timeout=20)


def test_a_killed_nats_server_loses_no_sa(
    netns_pair: NetnsPair,
    gateway_factory: Callable[..., Gateway],
    peer: StrongSwan,
) -> None:
    gateway = gateway_factory(netns_pair.gw, psk=PSK, workers=2)
    names = [f"c{i}" for i in range(CONNECTIONS)]
    before = established(gateway, peer, names, [f"{n}.peer.example" for n in names])
    state = up_state(gateway)
    broker = state["broker_pid"]
    workers = {k: v for k, v in state["children"].items() if k.startswith("ike-")}

    os.kill(broker, signal.SIGKILL)
    log_at_kill = len(peer.log_text())
    restarted = wait_for(
        lambda: (
            (pid := up_state(gateway).get("broker_pid")) not in (None, broker)
            and alive(pid)
            and pid
        ),
        timeout=30,
        what="the nats-server restarted by `ikefarm up`",
    )
    assert restarted
    # every service reconnected to it (same URL: the same port, the same store)
    assert up_state(gateway)["nats_url"] == state["nats_url"]
    wait_for(
        lambda: (
            (rows := [r for rs in gateway.status().values() for r in rs])
            and len(rows) == 4 + len(workers)
            and all(r["counters"].get("nats_reconnects", 0) >= 1 for r in rows)
        ),
        timeout=30,
        what="every service reconnected",
    )
    # the shard leases held on: a worker that lost its shard exits (the pids below)
    nothing_lost(gateway, peer, names, before, log_at_kill, workers)


def test_a_killed_keystore_loses_no_sa_and_handshakes_go_on(
    netns_pair: NetnsPair,
    gateway_factory: Callable[..., Gateway],
    peer: StrongSwan,
) -> None:
    gateway = gateway_factory(netns_pair.gw, psk=PSK, workers=1)
    names = [f"k{i}" for i in range(2)]
    before = established(gateway, peer, names, [f"{n}.peer.example" for n in names])
    state = up_state(gateway)
    keystore = state["children"]["keystore-0"]
    workers = {k: v for k, v in state["children"].items() if k.startswith("ike-")}

    os.kill(keystore, signal.SIGKILL)
    log_at_kill = len(peer.log_text())
    # a handshake started while the keystore is down: its AUTH waits for the keystore (the
    # worker asks again with backoff) and completes once `ikefarm up` restarted it
    peer.initiate(child="late-net", timeout=40)
    assert up_state(gateway)["children"]["keystore-0"] not in (None, keystore)
    gateway.wait_sas(len(names) + 1, timeout=20)
    counters = gateway.counters("ike")
    assert not [k for k in counters if k.startswith("auth_failed")], counters
    # the worker asked the keystore again while it was down, rather than fail the exchange
    assert counters.get("bus_request_retried", 0) >= 1, counters
    # the established SAs are intact: DPD and a rekey through them (the rekey's keys are
    # sealed again by the new keystore process, from the same sealed store)
    peer.terminate(ike="late")
    wait_for(lambda: len(gateway.show()) == len(names), timeout=20, what="late deleted")
    nothing_lost(gateway, peer, names, before, log_at_kill, workers)


def test_a_dead_node_of_a_three_node_cluster_loses_no_sa_and_no_lease(
    netns_pair: NetnsPair,
    gateway_factory: Callable[..., Gateway],
    peer: StrongSwan,
    tmp_path: Path,
) -> None:
    """An external NATS: three nats-server nodes (`ikefarm config nats-node`) with JetStream
    clustered, `[nats] servers` naming them and `replicas = 3`: every bucket the farm makes
    is R3, and `kill -9` of the node leading the SA snapshots' stream loses nothing."""
    cluster = NatsCluster(netns_pair.gw, tmp_path / "nats-cluster")
    cluster.start()
    servers = ", ".join(f'"{url}"' for url in cluster.urls)
    bus = (
        f"\n[nats]\nservers = [{servers}]\nreplicas = 3\n"
        f'credentials = "{cluster.credentials_dir}"\n'
    )
    try:
        gateway = gateway_factory(netns_pair.gw, psk=PSK, workers=2, extra=bus)
    except TimeoutError:
        print(cluster.log_tail())
        raise
    names = [f"r{i}" for i in range(CONNECTIONS)]
    before = established(gateway, peer, names, [f"{n}.peer.example" for n in names])
    assert "broker_pid" not in up_state(gateway) or not up_state(gateway)["broker_pid"]
    workers = {k: v for k, v in up_state(gateway)["children"].items() if k.startswith("ike-")}

    # every bucket the farm made is replicated on the three nodes
    streams = cluster.streams(cluster.nodes[0])
    ours = {name: s for name, s in streams.items() if name.startswith("KV_ikefarm-")}
    assert {"KV_ikefarm-ike-sas", "KV_ikefarm-ike-shards"} <= set(ours), sorted(streams)
    assert all(s["config"]["num_replicas"] == 3 for s in ours.values()), ours
    leader = cluster.node(ours["KV_ikefarm-ike-sas"]["cluster"]["leader"])

    connz = cluster.get(leader, "/connz?limit=1024") or {}
    on_leader = {c.get("name") for c in connz.get("connections", [])} - {None, ""}
    cluster.kill(leader)
    log_at_kill = len(peer.log_text())
    alive_nodes = [node for node in cluster.nodes if node is not leader]

    # the two nodes left elect a new leader of the SA store and of the leases
    def new_leaders() -> bool:
        seen = cluster.streams(alive_nodes[0])
        return all(
            seen.get(name, {}).get("cluster", {}).get("leader") not in (None, leader.name)
            for name in ("KV_ikefarm-ike-sas", "KV_ikefarm-ike-shards")
        )

    wait_for(new_leaders, timeout=30, what="new stream leaders on the nodes left")
    nothing_lost(gateway, peer, names, before, log_at_kill, workers)
    # the services that were connected to the dead node went over to the others
    rows = {row["instance"]: row for rs in gateway.status().values() for row in rs}
    assert len(rows) == 4 + len(workers)
    for instance in on_leader & set(rows):
        assert rows[instance]["counters"].get("nats_reconnects", 0) >= 1, instance
    # the leases are still those of the workers that held them
    shards = {row["gauges"]["shard"] for row in gateway.status()["ike"]}
    assert shards == {0, 1}

    # the dead node comes back and catches up; then another node dies: still nothing lost
    cluster.start_node(leader)
    cluster.wait_ready([leader])
    after_first = peer.list_sas()
    second = cluster.node(
        cluster.streams(alive_nodes[0])["KV_ikefarm-ike-shards"]["cluster"]["leader"]
    )  # the leases' stream leader now
    cluster.kill(second)
    log_at_second = len(peer.log_text())

    def answered_since(start: int) -> bool:
        text = peer.log_text()[start:]
        lines = [line for line in text.splitlines() if "parsed INFORMATIONAL response" in line]
        return all(any(f"<{name}|" in line for line in lines) for name in names)

    wait_for(lambda: answered_since(log_at_second), timeout=30, what="DPD after the second kill")
    now = [sa for sa in peer.list_sas() if sa["name"] in names]
    assert ike_spis(now) == ike_spis(before)
    assert child_spis(now) == {n: c for n, c in child_spis(after_first).items() if n in names}
    assert {k: v for k, v in up_state(gateway)["children"].items() if k.startswith("ike-")} == (
        workers
    )
    wait_for(
        lambda: {row["gauges"]["shard"] for row in gateway.status().get("ike", [])} == {0, 1},
        timeout=20,
        what="both shards held after the second kill",
    )


def test_a_restarted_worker_gets_fresh_ids_and_up_json_follows(
    netns_pair: NetnsPair,
    gateway_factory: Callable[..., Gateway],
    peer: StrongSwan,
) -> None:
    """`kill -9` of a worker: `up` restarts it under the same name, `up.json` names the new
    pid (and never the dead one), the SA it held keeps its unique id, and an SA made after
    the restart gets an id never handed out before (the shard's reservation in JetStream)."""
    gateway = gateway_factory(netns_pair.gw, psk=PSK, workers=1)
    names = ["u0", "u1"]
    established(gateway, peer, names, [f"{n}.peer.example" for n in names])
    ids_before = {row["unique_id"] for row in gateway.show()}
    children_before = {
        child["unique_id"] for row in gateway.show() for child in row.get("children", [])
    }
    state = up_state(gateway)
    victim = state["children"]["ike-0"]
    others = {k: v for k, v in state["children"].items() if k != "ike-0"}

    os.kill(victim, signal.SIGKILL)
    # while it is down up.json says so (null) or already names the new one: never the dead pid
    restarted = wait_for(
        lambda: (
            (pid := up_state(gateway).get("children", {}).get("ike-0")) not in (None, victim)
            and alive(pid)
            and pid
        ),
        timeout=30,
        what="ike-0 restarted, in up.json",
    )
    assert not alive(victim)
    now = up_state(gateway)
    assert {k: v for k, v in now["children"].items() if k != "ike-0"} == others
    assert all(alive(pid) for pid in now["children"].values())
    assert alive(now["broker_pid"]) and now["broker_pid"] == state["broker_pid"]
    assert restarted != victim

    # the SAs it held continue with the ids they had
    rows = gateway.wait_sas(len(names), timeout=30)
    assert {row["unique_id"] for row in rows} == ids_before
    # one made now gets ids above every id handed out before
    peer.initiate(child="late-net", timeout=30)
    rows = gateway.wait_sas(len(names) + 1, timeout=20)
    (late,) = [row for row in rows if row["unique_id"] not in ids_before]
    late_ids = {late["unique_id"], *(c["unique_id"] for c in late.get("children", []))}
    assert not late_ids & (ids_before | children_before)
    assert min(late_ids) > max(ids_before | children_before)
