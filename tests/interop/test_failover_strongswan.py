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


def establish(
    netns_pair: NetnsPair, gateway_factory: Callable[..., Gateway], peer: StrongSwan
) -> tuple[Gateway, list[str], list[dict[str, Any]], dict[str, int]]:
    """`ikefarm up` with two workers, CONNECTIONS strongSwan connections over both shards,
    every SA snapshotted: the gateway, the connection names, the peer's SAs and each
    connection's shard."""
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
    # every SA is in the store (the worker writes within 50 ms of a change)
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
    return gateway, names, before, shards


def dpd_answered_since(peer: StrongSwan, offset: int, names: list[str]) -> bool:
    """strongSwan parsed an INFORMATIONAL response of each of `names` since `offset`."""
    text = peer.log_text()[offset:]
    lines = [line for line in text.splitlines() if "parsed INFORMATIONAL response" in line]
    return all(any(f"<{name}|" in line for line in lines) for name in names)


def test_a_killed_worker_s_sas_continue_with_the_same_spis(
    netns_pair: NetnsPair,
    gateway_factory: Callable[..., Gateway],
    peer: StrongSwan,
) -> None:
    gateway, names, before, shards = establish(netns_pair, gateway_factory, peer)
    victim = "ike-0"
    on_victim = sorted(name for name, shard in shards.items() if shard == 0)

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
    wait_for(
        lambda: dpd_answered_since(peer, log_at_kill, on_victim),
        timeout=20,
        what="strongSwan's DPD answered through adopted SAs",
    )

    # a child rekey of an adopted SA, right after: the IKE SA stays, the child is new
    rekey_through(peer, on_victim[0], before)


def rekey_through(peer: StrongSwan, target: str, before: list[dict[str, Any]]) -> None:
    """strongSwan rekeys `target`'s child: a new child, every IKE SA as `before`, the other
    connections' children untouched."""
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


def ike_row(gateway: Gateway, instance: str) -> dict[str, Any] | None:
    return next((r for r in gateway.status().get("ike", []) if r.get("instance") == instance), None)


def test_a_live_worker_adopts_a_dead_worker_s_shard_and_hands_it_back(
    netns_pair: NetnsPair,
    gateway_factory: Callable[..., Gateway],
    peer: StrongSwan,
) -> None:
    """Worker ike-1 stops (SIGSTOP: it neither renews its lease nor exits, so `ikefarm up`
    does not restart it, as with a kill -9 whose restart is delayed): ike-0 adopts shard 1
    once the lease lapses, and strongSwan's DPD, a child rekey and pings go on through it
    with the same SPIs. Then ike-1 is killed, `ikefarm up` restarts it, it asks for its
    shard and ike-0 hands it back: still the same SPIs, DPD answered by ike-1."""
    gateway, names, before, shards = establish(netns_pair, gateway_factory, peer)
    on_victim = sorted(name for name, shard in shards.items() if shard == 1)
    source = f"10.200.{names.index(on_victim[0])}.1"
    assert netns_pair.peer.ping(GW_INNER, src=source, count=2, timeout=10)
    pings = 100  # 20 s, across the lapse and the adoption
    pinger = netns_pair.peer.popen(
        ["ping", "-n", "-q", "-i", "0.2", "-c", str(pings), "-W", "1", "-I", source, GW_INNER],
        stdout=subprocess.PIPE,
        text=True,
    )
    victim_pid = gateway.service_pids()["ike-1"]
    os.kill(victim_pid, signal.SIGSTOP)
    try:
        log_at_stop = len(peer.log_text())

        def adopted() -> dict[str, Any] | None:
            row = ike_row(gateway, "ike-0")
            held = (row or {}).get("gauges", {}).get("adopted_shards", [])
            return row if [item.get("shard") for item in held] == [1] else None

        row = wait_for(adopted, timeout=30, what="ike-0 adopted shard 1")
        assert row["gauges"]["adopted_shards"][0]["restored"] == len(on_victim)
        text = gateway.run_cli("status").stdout
        assert "shard 1: ike-0 (adopted" in text, text
        # strongSwan's DPD of every SA of shard 1 is answered, by ike-0
        wait_for(
            lambda: dpd_answered_since(peer, log_at_stop, on_victim),
            timeout=40,
            what="strongSwan's DPD answered through the adopting worker",
        )
        rekey_through(peer, on_victim[0], before)
        out, _ = pinger.communicate(timeout=pings * 0.2 + 20)
        received = int(re.search(r"(\d+) received", out).group(1))  # type: ignore[union-attr]
        assert pings - received <= 15, out  # at most 3 s of pings lost
        counters = gateway.counters("ike")
        assert not {k: v for k, v in counters.items() if k.startswith("snapshot_refused")}
        after_adoption = peer.list_sas()
    finally:
        os.kill(victim_pid, signal.SIGKILL)  # stopped or not, it dies: `ikefarm up` restarts it

    # ike-1 is back under its name, asks for shard 1 and gets it from ike-0
    def handed_back() -> bool:
        ike0, ike1 = ike_row(gateway, "ike-0"), ike_row(gateway, "ike-1")
        return bool(
            ike0 and ike1
            and not ike0.get("gauges", {}).get("adopted_shards")
            and ike1.get("gauges", {}).get("snapshots", {}).get("restored") == len(on_victim)
        )  # fmt: skip

    wait_for(handed_back, timeout=40, what="shard 1 handed back to the restarted ike-1")
    log_at_return = len(peer.log_text())
    wait_for(
        lambda: dpd_answered_since(peer, log_at_return, on_victim),
        timeout=40,
        what="strongSwan's DPD answered by ike-1 again",
    )
    final = peer.list_sas()
    assert ike_spis(final) == ike_spis(before)
    assert all(sa["state"] == "ESTABLISHED" for sa in final)
    assert child_spis(final) == child_spis(after_adoption)
