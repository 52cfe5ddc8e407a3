"""DPD against a strongSwan that stops answering (SIGSTOP), and NAT-T with strongSwan's encap.

DPD: ikefarm initiates to strongSwan with small retransmit constants and a 1 s
dpd-delay; strongSwan is paused; ikefarm must declare it dead once the total
retransmit time computed from those constants has passed since its liveness
check (a check of that behaviour, with a tolerance for process scheduling, not a
speed claim), then apply the child's dpd-action.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import Any

import pytest

from ikefarm.shared.ikev2.policy import RetransmitPolicy
from ikefarm.shared.ikev2.retransmit import total_timeout
from tests.harness.gateway import Gateway, farm_config, vpn_config
from tests.harness.netns import NetnsPair, wait_for
from tests.harness.strongswan import Child, Connection, Psk, StrongSwan

pytestmark = [pytest.mark.interop, pytest.mark.timeout(180)]

PSK = "dpd-psk-8a2f61c0d9e3b574"
RETRANSMIT = {"retransmit-tries": 2, "retransmit-timeout": 1.0, "retransmit-base": 1.5}
TOTAL = total_timeout(RetransmitPolicy(tries=2, timeout=1.0, base=1.5, jitter=0, limit=0))


def responder() -> Connection:
    return Connection(
        name="c",
        local_addrs="192.0.2.2",
        remote_addrs="192.0.2.1",
        local_id="peer.example",
        remote_id="gw.example",
        proposals="aes256gcm16-prfsha384-x25519",
        children=[
            Child(
                name="net",
                local_ts="10.200.0.0/24",
                remote_ts="10.100.0.0/24",
                esp_proposals="aes256gcm16",
            )
        ],
    )


def kernel_state(gateway: Gateway) -> dict[str, Any]:
    import json

    done = gateway.run_cli("show", "kernel", "--json")
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


def when(event: dict[str, Any]) -> float:
    return datetime.datetime.fromisoformat(event["timestamp"]).timestamp()


@pytest.fixture
def peer(netns_pair: NetnsPair, strongswan_factory: Callable[..., StrongSwan]) -> StrongSwan:
    netns_pair.peer.add_address("lo", "10.200.0.1/32")
    ss = strongswan_factory(netns_pair.peer)
    ss.load([responder()], psks=[Psk(PSK, ["peer.example", "gw.example"])])
    return ss


def dpd_gateway(
    netns_pair: NetnsPair, gateway_factory: Callable[..., Gateway], workdir: Any, action: str
) -> Gateway:
    vpn = vpn_config(
        "hq",
        local_id="gw.example",
        remote_id="peer.example",
        policies=[("net", "10.100.0.0/24", "10.200.0.0/24")],
    )
    text = farm_config(
        workdir,
        psks=[("gw.example", "peer.example", PSK)],
        vpns=[vpn],
        global_options=RETRANSMIT,
        dpd_delay="1s",
        dpd_action=action,
        # no start trap: what the kernel holds afterwards is what the dpd-action left
        start_action="none",
    )
    gateway = gateway_factory(netns_pair.gw, config_text=text)
    done = gateway.run_cli("initiate", "child-sa", "security-policy", "net", "--timeout", "20")
    assert done.returncode == 0, done.stdout + done.stderr
    return gateway


def declared_dead(gateway: Gateway, peer: StrongSwan) -> tuple[dict[str, Any], float]:
    """Pause strongSwan; the peer_dead event and the seconds since the check it ended."""
    (before,) = gateway.show()
    # strongSwan answers ikefarm's checks while it runs
    wait_for(
        lambda: gateway.counters("ike").get("liveness_confirmed", 0) >= 1,
        timeout=10,
        what="a liveness check answered",
    )
    peer.pause()

    def dead() -> dict[str, Any] | None:
        return next((e for e in gateway.log_events() if e.get("event") == "peer_dead"), None)

    event = wait_for(dead, timeout=TOTAL + 10, what="ikefarm declares strongSwan dead")
    assert event["unique_id"] == before["unique_id"] and event["level"] == 0
    checks = [
        e
        for e in gateway.log_events()
        if e.get("event") == "dpd_check_sent" and when(e) <= when(event)
    ]
    return event, when(event) - when(checks[-1])


def test_dpd_clear_declares_the_peer_dead_after_the_total_retransmit_time(
    netns_pair: NetnsPair, gateway_factory: Callable[..., Gateway], peer: StrongSwan, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    gateway = dpd_gateway(netns_pair, gateway_factory, tmp_path, "clear")
    event, elapsed = declared_dead(gateway, peer)
    assert TOTAL == 4.75
    assert abs(elapsed - TOTAL) < 0.5, f"dead after {elapsed:.2f}s, configured total {TOTAL}s"
    assert event["actions"] == {"net": "clear"}
    assert gateway.show() == []
    state = kernel_state(gateway)
    assert state["sas"] == [] and state["policies"] == [] and state["traps"] == []
    assert gateway.counters("ike").get("ike_sa_initiated", 0) == 1  # nothing restarted


def test_dpd_trap_installs_the_trap_policy(
    netns_pair: NetnsPair, gateway_factory: Callable[..., Gateway], peer: StrongSwan, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    gateway = dpd_gateway(netns_pair, gateway_factory, tmp_path, "trap")
    (row,) = gateway.show()
    reqid = row["children"][0]["reqid"]
    declared_dead(gateway, peer)
    state = wait_for(
        lambda: (s := kernel_state(gateway))["traps"] and s, timeout=5, what="trap installed"
    )
    (trap,) = state["traps"]
    assert (trap["vpn"], trap["name"], trap["reqid"]) == ("hq", "net", reqid)
    assert trap["local_ts"] == ["10.100.0.0/24"] and trap["remote_ts"] == ["10.200.0.0/24"]
    assert state["sas"] == [] and gateway.show() == []


def test_dpd_restart_re_establishes_when_strongswan_resumes(
    netns_pair: NetnsPair, gateway_factory: Callable[..., Gateway], peer: StrongSwan, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    gateway = dpd_gateway(netns_pair, gateway_factory, tmp_path, "restart")
    (old,) = gateway.show()
    declared_dead(gateway, peer)
    peer.resume()

    def fresh() -> dict[str, Any] | None:
        rows = [r for r in gateway.show() if r["state"] == "established"]
        return rows[0] if len(rows) == 1 and rows[0]["unique_id"] != old["unique_id"] else None

    new = wait_for(fresh, timeout=20, what="a new IKE SA after the restart")
    assert [c["name"] for c in new["children"]] == ["net"]

    def agreed() -> bool:
        theirs = [s for s in peer.list_sas() if s["state"] == "ESTABLISHED"]
        return [(s["initiator-spi"], s["responder-spi"]) for s in theirs] == [
            (new["spi_i"], new["spi_r"])
        ]

    # strongSwan drops the dead SA on the new one's INITIAL_CONTACT
    wait_for(agreed, timeout=20, what="strongSwan has exactly the new IKE SA")
    (theirs,) = peer.list_sas()
    (child,) = [c for c in theirs["child-sas"] if c["state"] == "INSTALLED"]
    ours = new["children"][0]
    assert (ours["spi_in"], ours["spi_out"]) == (child["spi-out"], child["spi-in"])


# -- NAT-T ----------------------------------------------------------------------------------------


def test_strongswan_with_encap_gets_udp_encapsulated_children_on_4500(
    netns_pair: NetnsPair,
    gateway_factory: Callable[..., Gateway],
    strongswan_factory: Callable[..., StrongSwan],
) -> None:
    netns_pair.peer.add_address("lo", "10.200.0.1/32")
    gateway = gateway_factory(netns_pair.gw, psk=PSK)
    ss = strongswan_factory(netns_pair.peer)
    initiator = Connection(
        name="c",
        local_addrs="192.0.2.2",
        remote_addrs="192.0.2.1",
        local_id="a.peer.example",
        remote_id="gw.example",
        proposals="aes256gcm16-prfsha384-x25519",
        encap=True,
        children=[
            Child(
                name="c-net",
                local_ts="10.200.0.0/24",
                remote_ts="10.100.0.0/24",
                esp_proposals="aes256gcm16",
            )
        ],
    )
    ss.load([initiator], psks=[Psk(PSK, ["a.peer.example", "gw.example"])])
    ss.initiate(child="c-net", timeout=20)
    (sa,) = ss.list_sas()
    assert sa.get("nat-fake") == "yes" or sa.get("nat-any") == "yes" or sa.get("nat-local")
    assert sa["local-port"] == "4500" and sa["remote-port"] == "4500"
    (theirs,) = sa["child-sas"]
    assert theirs["encap"] == "yes"

    (row,) = gateway.wait_sas(1)
    assert row["udp_encap"] and (row["local_port"], row["remote_port"]) == (4500, 4500)
    (ours,) = row["children"]
    assert ours["udp_encap"] and ours["spi_in"] == theirs["spi-out"]
    state = kernel_state(gateway)
    by_direction = {s["direction"]: s for s in state["sas"]}
    assert by_direction["in"]["encap"] and by_direction["out"]["encap"]
    assert (by_direction["in"]["src_port"], by_direction["in"]["dst_port"]) == (4500, 4500)
    assert (by_direction["out"]["src_port"], by_direction["out"]["dst_port"]) == (4500, 4500)
    # strongSwan pretends to be behind the NAT: it keeps the mapping open, ikefarm does not need to
    assert gateway.counters("ike").get("nat_keepalives_sent", 0) == 0
