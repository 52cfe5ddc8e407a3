"""MOBIKE (RFC 4555): a strongSwan road warrior changes its address and keeps its tunnel.

strongSwan 5.9 (kernel-libipsec, `mobike = yes`) in "peer" establishes with `ikefarm up`
in "gw" (`mobike = true` on the IKE policy, `[kernel] backend = "userspace"`). Then the
peer's address changes under it: 192.0.2.3 is added to its veth and 192.0.2.2 removed.
Nothing is initiated by hand: charon's roaming notices the address is gone, checks the
path and sends UPDATE_SA_ADDRESSES (with COOKIE2 and NAT detection) from the new address.

Acceptance: the gateway's IKE SA is the same one (same SPIs, same unique id), `show
ike-sa` names the new address, strongSwan's SA shows its new local address, the ike
worker counted the move, the kernel service moved the child with its SPIs unchanged, and
a ping after the move goes through the userspace dataplane (its inbound counter grows).

strongSwan's kernel-libipsec cannot update an installed SA's addresses (its kernel
interface answers "not supported"), so strongSwan itself rekeys its CHILD_SA right after
the move (its log: UPDATING => INSTALLED, then "queueing CHILD_REKEY task"). The child
that survives the move with the same SPIs on both ends is therefore checked here on the
gateway (its `child_moved` line names the original SPIs) and end to end between two
engines (tests/unit/test_engine_mobike.py); the ping runs once strongSwan's rekey is done.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tests.harness.gateway import Gateway, farm_config, vpn_config
from tests.harness.netns import NetnsPair, link, wait_for
from tests.harness.strongswan import Psk, StrongSwan
from tests.interop.test_initiator_strongswan import responder as responder_connection
from tests.interop.test_responder_strongswan import peer_connection, psk_for

pytestmark = [pytest.mark.interop, pytest.mark.timeout(180)]

PSK = "mobike-psk-4b1e09c2d7a3f6"
GW_INNER, PEER_INNER = "10.100.0.1", "10.200.0.1"
NEW_PEER = "192.0.2.3"


def ike_rows(gateway: Gateway) -> list[dict[str, Any]]:
    result = gateway.run_cli("show", "ike-sa", "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    return list(rows if isinstance(rows, list) else rows.get("sas", rows))


def inbound_packets(gateway: Gateway) -> int:
    result = gateway.run_cli("show", "kernel", "--json")
    assert result.returncode == 0, result.stderr
    state = json.loads(result.stdout)
    return sum(int(sa.get("packets", 0)) for sa in state["sas"] if sa["direction"] == "in")


def test_strongswan_roams_and_keeps_its_sas(
    netns_pair: NetnsPair,
    gateway_factory: Callable[..., Gateway],
    strongswan_factory: Callable[..., StrongSwan],
) -> None:
    gw_ns, peer_ns = netns_pair.gw, netns_pair.peer
    veth = netns_pair.link.if_b
    gw_ns.add_address("lo", f"{GW_INNER}/32")
    peer_ns.add_address("lo", f"{PEER_INNER}/32")
    # the new address must survive the removal of the old one of the same subnet
    peer_ns.run(["sysctl", "-qw", f"net.ipv4.conf.{veth}.promote_secondaries=1"])
    gateway = gateway_factory(
        gw_ns,
        psk=PSK,
        ike_template_extra="mobike = true",
        extra='\n[kernel]\nbackend = "userspace"\n',
        log_level=1,
    )
    peer = strongswan_factory(peer_ns)
    # no fixed local address: charon may pick whichever address routes to the gateway
    connection = replace(peer_connection(), local_addrs=None, mobike=True)
    peer.load([connection], psks=[psk_for("a.peer.example", secret=PSK)])
    peer.initiate(child="c-net", timeout=20)
    (row,) = gateway.wait_sas(1)
    assert row["remote_address"] == "192.0.2.2" and row["mobike"] is True
    assert row["remote_port"] == 4500  # RFC 4555 3.2: strongSwan floated in IKE_AUTH
    (child,) = row["children"]
    assert peer_ns.ping(GW_INNER, src=PEER_INNER, count=2, timeout=10)

    peer_ns.add_address(veth, f"{NEW_PEER}/24")
    peer_ns.run(["ip", "addr", "del", "192.0.2.2/24", "dev", veth])

    def moved() -> dict[str, Any] | None:
        rows = ike_rows(gateway)
        return rows[0] if rows and rows[0]["remote_address"] == NEW_PEER else None

    after = wait_for(moved, timeout=30, what="the gateway's IKE SA on the new address")
    assert (after["spi_i"], after["spi_r"]) == (row["spi_i"], row["spi_r"])
    assert after["unique_id"] == row["unique_id"]
    assert after["remote_port"] == 4500
    # charon listed its other addresses (ADDITIONAL_IP6_ADDRESS) with the update (3.6)
    assert "2001:db8::2" in after["peer_addresses"]
    (sa,) = peer.list_sas()
    assert sa["local-host"] == NEW_PEER
    assert gateway.counters("ike").get("mobike.moved_by_peer", 0) >= 1

    # the kernel service moved the child as it was: same SPIs, the new remote endpoint
    wait_for(
        lambda: gateway.counters("kernel").get("child_update.ok", 0) >= 1,
        timeout=10,
        what="the kernel service moving the child",
    )
    (moved_child,) = [e for e in gateway.log_events() if e.get("event") == "child_moved"]
    assert (moved_child["spi_in"], moved_child["spi_out"]) == (child["spi_in"], child["spi_out"])
    assert moved_child["remote"] == f"{NEW_PEER}[4500]"
    assert "queueing CHILD_REKEY task" in peer.log_text()  # libipsec's choice, see above

    def one_child_again() -> bool:
        rows = ike_rows(gateway)
        children = rows[0]["children"] if rows else []
        return len(children) == 1 and children[0]["state"] == "installed"

    wait_for(one_child_again, timeout=20, what="strongSwan's child rekey to finish")
    before = inbound_packets(gateway)
    assert peer_ns.ping(GW_INNER, src=PEER_INNER, count=3, timeout=10)
    assert inbound_packets(gateway) >= before + 3
    assert gateway.counters("kernel").get("esp.in.drop.integrity", 0) == 0
    # one IKE SA all along: no reauthentication, no new SA
    assert gateway.counters("ike").get("ike_sa_established", 0) == 1


def ikefarm_initiates(
    netns_pair: NetnsPair,
    gateway_factory: Callable[..., Gateway],
    strongswan_factory: Callable[..., StrongSwan],
    workdir: Path,
    *,
    listen: list[str],
    global_options: dict[str, Any] | None = None,
) -> tuple[Gateway, StrongSwan, dict[str, Any]]:
    """ikefarm (gw, 192.0.2.1, `mobike = true`, ingress on `listen`) initiates its child to
    strongSwan (peer, 192.0.2.2, `mobike = yes`, any remote address)."""
    netns_pair.peer.add_address("lo", f"{PEER_INNER}/32")
    peer = strongswan_factory(netns_pair.peer)
    responder = replace(responder_connection(), remote_addrs=None, mobike=True)
    peer.load([responder], psks=[Psk(PSK, ["peer.example", "gw.example"])])
    text = farm_config(
        workdir,
        psks=[("gw.example", "peer.example", PSK)],
        vpns=[
            vpn_config(
                "hq",
                local_id="gw.example",
                remote_id="peer.example",
                policies=[("net", "10.100.0.0/24", "10.200.0.0/24")],
            )
        ],
        global_options=global_options,
    ).replace('name = "ikepol"\n', 'name = "ikepol"\nmobike = true\n')
    text = f"[ingress]\nlisten = {json.dumps(listen)}\n\n" + text
    gateway = gateway_factory(netns_pair.gw, config_text=text)
    done = gateway.run_cli("initiate", "child-sa", "security-policy", "net", "--timeout", "20")
    assert done.returncode == 0, done.stdout + done.stderr
    (row,) = gateway.show()
    assert row["local_address"] == "192.0.2.1" and row["mobike"] is True
    return gateway, peer, row


def peer_sees(peer: StrongSwan, address: str) -> dict[str, Any]:
    def moved() -> dict[str, Any] | None:
        sas = peer.list_sas()
        return sas[0] if sas and sas[0].get("remote-host") == address else None

    return dict(wait_for(moved, timeout=30, what=f"strongSwan's IKE SA toward {address}"))


def test_ikefarm_as_initiator_moves_when_its_address_goes_away(
    netns_pair: NetnsPair,
    gateway_factory: Callable[..., Gateway],
    strongswan_factory: Callable[..., StrongSwan],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """ikefarm initiates from 192.0.2.1 (ingress also listens on 192.0.2.5); 192.0.2.1 is
    removed: the kernel service sees it go, the routing table now picks 192.0.2.5 toward the
    peer, and the ike worker sends UPDATE_SA_ADDRESSES from there (RFC 4555 3.5)."""
    gw_ns, veth = netns_pair.gw, netns_pair.link.if_a
    gw_ns.run(["sysctl", "-qw", f"net.ipv4.conf.{veth}.promote_secondaries=1"])
    gw_ns.add_address(veth, "192.0.2.5/24")
    gateway, peer, row = ikefarm_initiates(
        netns_pair,
        gateway_factory,
        strongswan_factory,
        tmp_path_factory.mktemp("gw"),
        listen=["192.0.2.1", "192.0.2.5"],
    )

    gw_ns.run(["ip", "addr", "del", "192.0.2.1/24", "dev", veth])

    sa = peer_sees(peer, "192.0.2.5")
    assert (sa["initiator-spi"], sa["responder-spi"]) == (row["spi_i"], row["spi_r"])
    (after,) = gateway.show()
    assert after["local_address"] == "192.0.2.5" and after["unique_id"] == row["unique_id"]
    counters = gateway.counters("ike")
    assert counters.get("mobike.address_gone", 0) == 1
    assert counters.get("mobike.update_confirmed", 0) == 1
    assert gateway.counters("kernel").get("addresses.changed", 0) >= 1


def test_prefer_best_path_follows_the_routing_table(
    netns_pair: NetnsPair,
    gateway_factory: Callable[..., Gateway],
    strongswan_factory: Callable[..., StrongSwan],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """With `mobike-prefer-best-path`, a second link whose more specific route toward the
    peer gets an address: the routing table now picks that address, and the SA moves there
    while the old one still works."""
    gw_ns, peer_ns = netns_pair.gw, netns_pair.peer
    gw_ns.run(["sysctl", "-qw", "net.ipv4.ip_nonlocal_bind=1"])  # ingress binds it early
    gateway, peer, row = ikefarm_initiates(
        netns_pair,
        gateway_factory,
        strongswan_factory,
        tmp_path_factory.mktemp("gw"),
        listen=["192.0.2.1", "198.51.100.1"],
        global_options={"mobike-prefer-best-path": True},
    )
    second = link(gw_ns, peer_ns, None, "198.51.100.2/24")
    gw_ns.run(["ip", "route", "add", "192.0.2.2/32", "dev", second.if_a])
    gw_ns.add_address(second.if_a, "198.51.100.1/24")  # the new, better path

    sa = peer_sees(peer, "198.51.100.1")
    assert (sa["initiator-spi"], sa["responder-spi"]) == (row["spi_i"], row["spi_r"])
    (after,) = gateway.show()
    assert after["local_address"] == "198.51.100.1"
    assert gateway.counters("ike").get("mobike.better_path", 0) == 1
    assert (
        "192.0.2.1" in gw_ns.run(["ip", "-o", "addr", "show"]).stdout
    )  # the old path still existed
