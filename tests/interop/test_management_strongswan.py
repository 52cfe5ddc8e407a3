"""Manual SA control against a real strongSwan: flush, clear, rekey and reauth remove or replace
exactly what they name, checked on both sides.

ikefarm ("gw", 192.0.2.1) has two VPNs to strongSwan ("peer", 192.0.2.2), each with
identities of its own: hq with children net and net2, hq2 with child lab.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.harness.gateway import Gateway, farm_config, vpn_config
from tests.harness.netns import NetnsPair, wait_for
from tests.harness.strongswan import Child, Connection, Psk, StrongSwan

pytestmark = [pytest.mark.interop, pytest.mark.timeout(180)]

PSK = "manage-psk-47b0c9e21d8a6f35"
HQ = [("net", "10.100.0.0/24", "10.200.0.0/24"), ("net2", "10.101.0.0/24", "10.201.0.0/24")]
HQ2 = [("lab", "10.102.0.0/24", "10.202.0.0/24")]


def responder(
    name: str, local_id: str, remote_id: str, children: list[tuple[str, str, str]]
) -> Connection:
    return Connection(
        name=name,
        local_addrs="192.0.2.2",
        remote_addrs="192.0.2.1",
        local_id=local_id,
        remote_id=remote_id,
        proposals="aes256gcm16-prfsha384-x25519",
        children=[
            Child(name=child, local_ts=theirs, remote_ts=ours, esp_proposals="aes256gcm16")
            for child, ours, theirs in children
        ],
    )


def start(
    netns_pair: NetnsPair,
    gateway_factory: Callable[..., Gateway],
    strongswan_factory: Callable[..., StrongSwan],
    workdir: Any,
    make_before_break: bool = False,
) -> tuple[Gateway, StrongSwan]:
    for address in ("10.200.0.1/32", "10.201.0.1/32", "10.202.0.1/32"):
        netns_pair.peer.add_address("lo", address)
    peer = strongswan_factory(netns_pair.peer)
    peer.load(
        [
            responder("c1", "peer.example", "gw.example", HQ),
            responder("c2", "peer2.example", "gw2.example", HQ2),
        ],
        psks=[Psk(PSK, ["peer.example", "gw.example", "peer2.example", "gw2.example"])],
    )
    text = farm_config(
        workdir,
        psks=[("gw.example", "peer.example", PSK), ("gw2.example", "peer2.example", PSK)],
        vpns=[
            vpn_config("hq", local_id="gw.example", remote_id="peer.example", policies=HQ),
            vpn_config("hq2", local_id="gw2.example", remote_id="peer2.example", policies=HQ2),
        ],
        global_options={"make-before-break": make_before_break},
    )
    gateway = gateway_factory(netns_pair.gw, config_text=text)
    for policy in ("net", "net2", "lab"):
        done = gateway.run_cli("initiate", "child-sa", "security-policy", policy, "--timeout", "20")
        assert done.returncode == 0, done.stdout + done.stderr
    assert ours(gateway) == theirs(peer) == {"hq": ["net", "net2"], "hq2": ["lab"]}
    return gateway, peer


CONNECTIONS = {"c1": "hq", "c2": "hq2"}


def ours(gateway: Gateway) -> dict[str, list[str]]:
    """ikefarm: vpn -> installed children of its established IKE SA."""
    return {
        row["vpn"]: sorted(c["name"] for c in row["children"] if c["state"] == "installed")
        for row in gateway.show()
        if row["state"] == "established"
    }


def theirs(peer: StrongSwan) -> dict[str, list[str]]:
    """strongSwan, named like ikefarm's VPNs."""
    return {
        CONNECTIONS[sa["name"]]: sorted(
            c["name"] for c in sa.get("child-sas", []) if c["state"] == "INSTALLED"
        )
        for sa in peer.list_sas()
        if sa["state"] == "ESTABLISHED"
    }


def spis(gateway: Gateway) -> dict[str, tuple[str, set[str]]]:
    return {
        row["vpn"]: (row["spi_i"], {c["spi_in"] for c in row["children"]})
        for row in gateway.show()
        if row["state"] == "established"
    }


def agree(gateway: Gateway, peer: StrongSwan, expected: dict[str, list[str]]) -> None:
    wait_for(
        lambda: ours(gateway) == theirs(peer) == expected,
        timeout=15,
        what=f"both sides at {expected}",
    )
    our_spis = {(r["spi_i"], r["spi_r"]) for r in gateway.show()}
    their_spis = {(s["initiator-spi"], s["responder-spi"]) for s in peer.list_sas()}
    assert our_spis == their_spis


def run(gateway: Gateway, *words: str) -> list[str]:
    done = gateway.run_cli(*words)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.splitlines()


@pytest.fixture
def farm(netns_pair, gateway_factory, strongswan_factory, tmp_path) -> tuple[Gateway, StrongSwan]:  # type: ignore[no-untyped-def]
    return start(netns_pair, gateway_factory, strongswan_factory, tmp_path)


def test_flush_child_sa_and_ike_sa(farm: tuple[Gateway, StrongSwan]) -> None:
    gateway, peer = farm
    (net,) = [c for r in gateway.show() for c in r["children"] if c["name"] == "net"]
    lines = run(gateway, "flush", "child-sa", "security-policy", "net")
    assert lines == [
        f"closing CHILD_SA net{{{net['unique_id']}}} with SPIs {net['spi_in']}_i (0 bytes) "
        f"{net['spi_out']}_o (0 bytes) and TS 10.100.0.0/24 === 10.200.0.0/24"
    ]
    agree(gateway, peer, {"hq": ["net2"], "hq2": ["lab"]})
    (hq2,) = [r for r in gateway.show() if r["vpn"] == "hq2"]
    lines = run(gateway, "flush", "ike-sa", "vpn", "hq2")
    assert lines == [
        f"deleting IKE_SA hq2[{hq2['unique_id']}] between "
        "192.0.2.1[gw2.example]...192.0.2.2[peer2.example]"
    ]
    agree(gateway, peer, {"hq": ["net2"]})


def test_flush_by_unique_id(farm: tuple[Gateway, StrongSwan]) -> None:
    gateway, peer = farm
    (lab,) = [c for r in gateway.show() for c in r["children"] if c["name"] == "lab"]
    run(gateway, "flush", "child-sa", "unique-id", str(lab["unique_id"]))
    agree(gateway, peer, {"hq": ["net", "net2"], "hq2": []})
    (hq,) = [r for r in gateway.show() if r["vpn"] == "hq"]
    run(gateway, "flush", "ike-sa", "unique-id", str(hq["unique_id"]))
    agree(gateway, peer, {"hq2": []})
    done = gateway.run_cli("flush", "ike-sa", "unique-id", str(hq["unique_id"]))
    assert done.returncode == 1 and "no IKE SA matches unique-id" in done.stderr


def test_clear_sa_all_phase_2_then_tunnel_phase_1(farm: tuple[Gateway, StrongSwan]) -> None:
    gateway, peer = farm
    lines = run(gateway, "clear", "sa", "all", "phase", "2")
    assert len(lines) == 3 and all(line.startswith("closing CHILD_SA") for line in lines)
    agree(gateway, peer, {"hq": [], "hq2": []})
    lines = run(gateway, "clear", "sa", "tunnel", "hq", "phase", "1")
    assert len(lines) == 1 and lines[0].startswith("deleting IKE_SA hq[")
    agree(gateway, peer, {"hq2": []})
    done = gateway.run_cli("clear", "sa", "tunnel", "nope")
    assert done.returncode == 1 and "no vpn named 'nope'" in done.stderr


def test_rekey_commands_replace_what_they_name(farm: tuple[Gateway, StrongSwan]) -> None:
    gateway, peer = farm
    before = spis(gateway)
    assert run(gateway, "rekey", "child-sa", "security-policy", "net") == [
        "Initiated 1 child SA rekey."
    ]
    wait_for(
        lambda: spis(gateway)["hq"][1] != before["hq"][1] and len(spis(gateway)["hq"][1]) == 2,
        timeout=15,
        what="net rekeyed",
    )
    agree(gateway, peer, {"hq": ["net", "net2"], "hq2": ["lab"]})
    middle = spis(gateway)
    assert middle["hq"][0] == before["hq"][0] and middle["hq2"] == before["hq2"]
    assert len(middle["hq"][1] & before["hq"][1]) == 1  # net2 kept its SPIs
    assert run(gateway, "rekey", "ike-sa", "vpn", "hq2") == ["Initiated 1 IKE SA rekey."]
    wait_for(lambda: spis(gateway)["hq2"][0] != before["hq2"][0], timeout=15, what="hq2 rekeyed")
    agree(gateway, peer, {"hq": ["net", "net2"], "hq2": ["lab"]})
    after = spis(gateway)
    assert after["hq2"][1] == before["hq2"][1] and after["hq"] == middle["hq"]


def level0(gateway: Gateway, since: int) -> list[tuple[str, Any]]:
    return [
        (e["event"], e.get("unique_id"))
        for e in gateway.log_events()[since:]
        if e.get("level") == 0 and e.get("service") == "ike"
    ]


@pytest.mark.parametrize("make_before_break", [True, False])
def test_reauth_order_follows_make_before_break(
    netns_pair, gateway_factory, strongswan_factory, tmp_path, make_before_break: bool
) -> None:  # type: ignore[no-untyped-def]
    gateway, peer = start(
        netns_pair, gateway_factory, strongswan_factory, tmp_path, make_before_break
    )
    (old,) = [r for r in gateway.show() if r["vpn"] == "hq"]
    old_children = {c["spi_in"] for c in old["children"]}
    since = len(gateway.log_events())
    assert run(gateway, "reauth", "ike-sa", "vpn", "hq") == ["Initiated 1 IKE SA reauthentication."]

    def replaced() -> dict[str, Any] | None:
        rows = [r for r in gateway.show() if r["vpn"] == "hq"]
        if len(rows) == 1 and rows[0]["unique_id"] != old["unique_id"]:
            installed = [c for c in rows[0]["children"] if c["state"] == "installed"]
            return rows[0] if len(installed) == 2 else None
        return None

    new = wait_for(replaced, timeout=20, what="hq reauthenticated")
    agree(gateway, peer, {"hq": ["net", "net2"], "hq2": ["lab"]})
    assert not old_children & {c["spi_in"] for c in new["children"]}
    steps = level0(gateway, since)
    deleted = steps.index(("ike_sa_deleted", old["unique_id"]))
    established = steps.index(("ike_sa_established", new["unique_id"]))
    children_up = [i for i, (event, _) in enumerate(steps) if event == "child_sa_established"]
    assert steps[0] == ("reauthenticating_ike_sa", old["unique_id"])
    if make_before_break:  # new IKE SA and both children first, then the old one goes
        assert established < min(children_up) and max(children_up) < deleted
    else:  # the old one goes first
        assert deleted < established < min(children_up)
