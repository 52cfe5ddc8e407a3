"""Rekeys with a real strongSwan: CREATE_CHILD_SA both ways, for child and IKE SAs, and a
collision."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

import pytest

from tests.harness.gateway import Gateway
from tests.harness.netns import NetnsPair, wait_for
from tests.harness.strongswan import Child, Connection, Psk, StrongSwan

pytestmark = [pytest.mark.interop, pytest.mark.timeout(180)]

PSK = "rekey-psk-5e8d0a1b2c3f4e6a"


def connection(**options: object) -> Connection:
    child_options = options.pop("child_options", {})
    return Connection(
        name="c",
        local_addrs="192.0.2.2",
        remote_addrs="192.0.2.1",
        local_id="a.peer.example",
        remote_id="gw.example",
        proposals="aes256gcm16-prfsha384-x25519",
        children=[
            Child(
                name="c-net",
                local_ts="10.200.0.0/24",
                remote_ts="10.100.0.0/24",
                esp_proposals="aes256gcm16-x25519",
                **child_options,  # type: ignore[arg-type]
            )
        ],
        **options,  # type: ignore[arg-type]
    )


def start(
    netns_pair: NetnsPair,
    gateway_factory: Callable[..., Gateway],
    strongswan_factory: Callable[..., StrongSwan],
    **gateway_options: object,
) -> tuple[Gateway, StrongSwan]:
    netns_pair.peer.add_address("lo", "10.200.0.1/32")
    gateway = gateway_factory(netns_pair.gw, psk=PSK, **gateway_options)
    peer = strongswan_factory(netns_pair.peer)
    peer.load([connection()], psks=[Psk(PSK, ["a.peer.example", "gw.example"])])
    peer.initiate(child="c-net", timeout=20)
    gateway.wait_sas(1)
    return gateway, peer


def both_sides(gateway: Gateway, peer: StrongSwan) -> tuple[dict, dict]:
    """Each side's single IKE SA with only its installed children (strongSwan lists
    rekeyed and deleted children for a while)."""
    (ours,) = [sa for sa in gateway.show() if sa["state"] == "established"]
    (theirs,) = [sa for sa in peer.list_sas() if sa["state"] == "ESTABLISHED"]
    ours = {**ours, "children": [c for c in ours["children"] if c["state"] == "installed"]}
    installed = [c for c in theirs.get("child-sas", []) if c["state"] == "INSTALLED"]
    return ours, {**theirs, "child-sas": installed}


def assert_same_sas(gateway: Gateway, peer: StrongSwan) -> tuple[dict, dict]:
    ours, theirs = both_sides(gateway, peer)
    assert (ours["spi_i"], ours["spi_r"]) == (theirs["initiator-spi"], theirs["responder-spi"])
    our_children = {(c["spi_in"], c["spi_out"]) for c in ours["children"]}
    their_children = {(c["spi-out"], c["spi-in"]) for c in theirs.get("child-sas", [])}
    assert our_children == their_children
    return ours, theirs


def settled(gateway: Gateway, peer: StrongSwan, children: int = 1) -> tuple[dict, dict] | None:
    """Both sides' SAs when they agree (same IKE SPIs, same installed children), else None."""
    try:
        ours, theirs = both_sides(gateway, peer)
    except ValueError:
        return None
    agree = (
        len(ours["children"]) == children
        and {(c["spi_in"], c["spi_out"]) for c in ours["children"]}
        == {(c["spi-out"], c["spi-in"]) for c in theirs["child-sas"]}
        and (ours["spi_i"], ours["spi_r"]) == (theirs["initiator-spi"], theirs["responder-spi"])
    )
    return (ours, theirs) if agree else None


def settled_where(
    gateway: Gateway, peer: StrongSwan, condition: Callable[[dict], bool]
) -> Callable[[], tuple[dict, dict] | None]:
    """A predicate for wait_for: the agreed snapshot once `condition(ours)` holds on it."""

    def check() -> tuple[dict, dict] | None:
        snapshot = settled(gateway, peer)
        return snapshot if snapshot is not None and condition(snapshot[0]) else None

    return check


def test_strongswan_rekeys_the_child(netns_pair, gateway_factory, strongswan_factory) -> None:  # type: ignore[no-untyped-def]
    gateway, peer = start(netns_pair, gateway_factory, strongswan_factory)
    old, _ = assert_same_sas(gateway, peer)
    old_spi = old["children"][0]["spi_in"]
    peer.rekey(child="c-net")
    new, _ = wait_for(
        settled_where(gateway, peer, lambda ours: ours["children"][0]["spi_in"] != old_spi),
        timeout=20,
        what="child rekeyed on both sides",
    )
    assert new["spi_i"] == old["spi_i"]  # the IKE SA is kept
    assert gateway.counters("ike").get("child_rekeys_answered", 0) == 1


def test_strongswan_rekeys_the_ike_sa_and_children_are_inherited(
    netns_pair, gateway_factory, strongswan_factory
) -> None:  # type: ignore[no-untyped-def]
    gateway, peer = start(netns_pair, gateway_factory, strongswan_factory)
    old, _ = assert_same_sas(gateway, peer)
    peer.rekey(ike="c")
    new, _ = wait_for(
        settled_where(gateway, peer, lambda ours: ours["spi_i"] != old["spi_i"]),
        timeout=20,
        what="IKE SA rekeyed on both sides",
    )
    assert new["children"][0]["spi_in"] == old["children"][0]["spi_in"]
    assert new["unique_id"] != old["unique_id"]
    assert int(new["spi_r"][:4], 16) == int(old["spi_r"][:4], 16)  # still this worker's shard
    assert gateway.counters("ike").get("ike_rekeys_answered", 0) == 1


def test_ikefarm_rekeys_child_and_ike_sa_by_its_lifetimes(
    netns_pair, gateway_factory, strongswan_factory
) -> None:  # type: ignore[no-untyped-def]
    gateway, peer = start(
        netns_pair,
        gateway_factory,
        strongswan_factory,
        ipsec_template_extra='rekey-time = "4s"\nlife-time = "60s"\nrand-time = "0s"',
        ike_template_extra='rekey-time = "7s"\nover-time = "60s"\nrand-time = "0s"',
    )
    # any agreed state will do as the baseline; with rekeys every few seconds, a loaded
    # machine's `show` calls can straddle several before two of them agree
    first, _ = wait_for(lambda: settled(gateway, peer), timeout=30, what="both sides agree")
    first_child = first["children"][0]["spi_in"]
    wait_for(
        settled_where(gateway, peer, lambda ours: ours["children"][0]["spi_in"] != first_child),
        timeout=20,
        what="ikefarm rekeyed the child",
    )
    assert gateway.counters("ike").get("child_rekeys_initiated", 0) >= 1
    after_ike, theirs = wait_for(
        settled_where(gateway, peer, lambda ours: ours["spi_i"] != first["spi_i"]),
        timeout=25,
        what="ikefarm rekeyed the IKE SA",
    )
    assert gateway.counters("ike").get("ike_rekeys_initiated", 0) >= 1
    assert after_ike["initiator"] is True  # the rekey initiator is the new SA's initiator (2.18)
    assert int(after_ike["spi_i"][:4], 16) == 0  # and its SPI, of this worker's shard, is SPIi
    assert theirs.get("initiator") != "yes"  # so strongSwan is now the responder of the IKE SA


def test_simultaneous_child_rekey_leaves_one_new_child_on_both_sides(
    netns_pair, gateway_factory, strongswan_factory
) -> None:  # type: ignore[no-untyped-def]
    gateway, peer = start(netns_pair, gateway_factory, strongswan_factory)
    old, _ = assert_same_sas(gateway, peer)
    ingress = gateway.service_pids()["ingress-0"]
    # With ingress frozen, ikefarm's rekey request waits in NATS and strongSwan's in the
    # UDP socket; thawing ingress lets the two requests cross on the wire (RFC 7296 2.8.1).
    os.kill(ingress, signal.SIGSTOP)
    try:
        done = gateway.run_cli("rekey", "child-sa", "security-policy", "net")
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "Initiated 1 child SA rekey."
        peer.rekey(child="c-net")
        wait_for(
            lambda: "sending packet" in peer.log_text().split(REKEYING)[-1],
            timeout=10,
            what="strongSwan's rekey request on the wire",
        )
    finally:
        os.kill(ingress, signal.SIGCONT)
    old_spi = old["children"][0]["spi_in"]
    ours, theirs = wait_for(
        settled_where(gateway, peer, lambda ours: ours["children"][0]["spi_in"] != old_spi),
        timeout=30,
        what="one new child on both sides",
    )
    assert len(ours["children"]) == 1 and len(theirs["child-sas"]) == 1
    assert gateway.counters("ike").get("child_rekey_collisions", 0) == 1


REKEYING = "CHILD_SA c-net{1} state change: INSTALLED => REKEYING"
