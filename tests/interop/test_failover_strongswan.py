"""Farm failover against a real strongSwan (docs/failover.md): `kill -9` of an ike worker
under `ikefarm up`; the restarted worker restores its shard's SAs from JetStream and the
peer never notices: same SPIs on both sides, strongSwan's DPD answered through the adopted
SAs, and a child rekey right after goes through."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from typing import Any

import pytest

from ikefarm.proto.sharding import shard_of_spi
from tests.harness.gateway import Gateway
from tests.harness.netns import NetnsPair, wait_for
from tests.harness.strongswan import StrongSwan
from tests.interop.test_responder_strongswan import PSK, peer, peer_connection, psk_for

__all__ = ["peer"]  # the fixture, imported for pytest

pytestmark = [pytest.mark.interop, pytest.mark.timeout(240)]

CONNECTIONS = 8
GW_INNER = "10.100.0.1"
PINGS = 40  # every 0.2 s: 8 s of pings across the kill and the restart


def ike_spis(sas: list[dict[str, Any]]) -> dict[str, tuple[str, str]]:
    return {sa["name"]: (sa["initiator-spi"], sa["responder-spi"]) for sa in sas}


def child_spis(sas: list[dict[str, Any]]) -> dict[str, list[tuple[str, str]]]:
    return {sa["name"]: sorted((c["spi-in"], c["spi-out"]) for c in sa["child-sas"]) for sa in sas}


def test_a_killed_worker_s_sas_continue_with_the_same_spis(
    netns_pair: NetnsPair,
    gateway_factory: Callable[..., Gateway],
    peer: StrongSwan,
) -> None:
    gateway = gateway_factory(netns_pair.gw, psk=PSK, workers=2)
    netns_pair.gw.add_address("lo", f"{GW_INNER}/32")  # the tunnel's far end, for pings
    names = [f"c{i}" for i in range(CONNECTIONS)]
    identities = [f"{name}.peer.example" for name in names]
    for i in range(1, CONNECTIONS):  # the peer fixture put 10.200.0.1 there already
        netns_pair.peer.add_address("lo", f"10.200.{i}.1/32")
    peer.load(
        [
            peer_connection(
                name=name, identity=identity, local_ts=f"10.200.{i}.0/24", dpd_delay="2s"
            )
            for i, (name, identity) in enumerate(zip(names, identities, strict=True))
        ],
        psks=[psk_for(*identities)],
    )
    for name in names:
        peer.initiate(child=f"{name}-net", timeout=20)
    gateway.wait_sas(CONNECTIONS)
    before = peer.list_sas()
    shards = {name: shard_of_spi(bytes.fromhex(r)) for name, (_i, r) in ike_spis(before).items()}
    assert set(shards.values()) == {0, 1}, shards  # both workers hold SAs
    victim = "ike-0"
    on_victim = sorted(name for name, shard in shards.items() if shard == 0)
    # every SA is in the store before the kill (the worker writes within 50 ms of a change)
    wait_for(
        lambda: (
            sum(
                row.get("gauges", {}).get("snapshots", {}).get("stored", 0)
                for row in gateway.status().get("ike", [])
            )
            == CONNECTIONS
        ),
        timeout=10,
        what="every SA snapshotted",
    )

    # packets through an adopted SA's child while its worker dies: the dataplane (kernel
    # service, userspace here) keeps the child, nothing waits for the ike side
    source = f"10.200.{names.index(on_victim[0])}.1"
    assert netns_pair.peer.ping(GW_INNER, src=source, count=2, timeout=10)
    pinger = netns_pair.peer.popen(
        ["ping", "-n", "-q", "-i", "0.2", "-c", str(PINGS), "-W", "1", "-I", source, GW_INNER],
        stdout=subprocess.PIPE,
        text=True,
    )
    time.sleep(1.0)
    old_pid = gateway.service_pids()[victim]
    os.kill(old_pid, signal.SIGKILL)
    log_at_kill = len(peer.log_text())
    wait_for(
        lambda: gateway.service_pids().get(victim) not in (None, old_pid),
        timeout=30,
        what="the killed worker restarted",
    )
    wait_for(
        lambda: len(gateway.status().get("ike", [])) == 2, timeout=30, what="both workers report"
    )
    out, _ = pinger.communicate(timeout=PINGS * 0.2 + 20)
    received = int(re.search(r"(\d+) received", out).group(1))  # type: ignore[union-attr]
    assert PINGS - received <= 15, out  # at most 3 s of pings lost (at 5 a second)
    rows = gateway.wait_sas(CONNECTIONS, timeout=20)
    assert {(r["spi_i"], r["spi_r"]) for r in rows} == set(ike_spis(before).values())
    (row,) = [r for r in gateway.status()["ike"] if r.get("gauges", {}).get("shard") == 0]
    assert row["gauges"]["snapshots"]["restored"] == len(on_victim)  # restored, not renegotiated
    restored = gateway.counters("ike")
    assert not {k: v for k, v in restored.items() if k.startswith("snapshot_refused")}

    # DPD (strongSwan's, every 2 s of silence) through every adopted SA, answered
    def dpd_answered() -> bool:
        text = peer.log_text()[log_at_kill:]
        lines = [line for line in text.splitlines() if "parsed INFORMATIONAL response" in line]
        return all(any(f"<{name}|" in line for line in lines) for name in on_victim)

    wait_for(dpd_answered, timeout=20, what="strongSwan's DPD answered through adopted SAs")

    # a child rekey of an adopted SA, right after: the IKE SA stays, the child is new
    target = on_victim[0]
    old_children = child_spis(before)[target]
    peer.rekey(child=f"{target}-net")

    def rekeyed() -> list[dict[str, Any]] | None:
        sas = peer.list_sas()
        mine = [sa for sa in sas if sa["name"] == target]
        if len(mine) != 1 or not mine[0]["child-sas"]:
            return None
        fresh = child_spis(mine)[target]
        return sas if fresh and not set(fresh) & set(old_children) else None

    after = wait_for(rekeyed, timeout=20, what=f"{target}'s child rekeyed through the adopted SA")
    assert ike_spis(after) == ike_spis(before)
    assert all(sa["state"] == "ESTABLISHED" for sa in after)
    # the SAs no rekey touched keep their children as they were
    untouched = {n: c for n, c in child_spis(after).items() if n != target}
    assert untouched == {n: c for n, c in child_spis(before).items() if n != target}
