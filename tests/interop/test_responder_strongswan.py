"""A real strongSwan initiates to `ikefarm up` over the bus: the responder path end to end.

strongSwan runs in the "peer" namespace (192.0.2.2) with an inner address in its
local traffic selector (kernel-libipsec routes its tunnel there), ikefarm in
"gw" (192.0.2.1) with the memory kernel backend (this kernel has no ESP).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.harness.gateway import Gateway
from tests.harness.netns import NetnsPair, wait_for
from tests.harness.strongswan import Child, Connection, Psk, StrongSwan

pytestmark = [pytest.mark.interop, pytest.mark.timeout(180)]

PSK = "interop-psk-9f3a1c77e0b2d4a6"

# ESP suite -> (strongSwan IKE prefix, strongSwan encr-alg, key size, ikefarm's summary prefix)
SUITES = {
    "aes256gcm16": ("aes256gcm16-prfsha384", "AES_GCM_16", 256, "aes256-gcm-128/prf:hmac-sha384"),
    "aes128-sha256": ("aes128-sha256", "AES_CBC", 128, "aes128-cbc/hmac-sha256/prf:hmac-sha256"),
}
# strongSwan group keyword -> (strongSwan dh-group, ikefarm's name)
GROUPS = {
    "x25519": ("CURVE_25519", "x25519"),
    "ecp256": ("ECP_256", "ecp256"),
    "modp2048": ("MODP_2048", "modp2048"),
}


def peer_connection(
    name: str = "c",
    ike: str = "aes256gcm16-prfsha384-x25519",
    esp: str = "aes256gcm16",
    local_ts: str = "10.200.0.0/24",
    remote_ts: str = "10.100.0.0/24",
    identity: str = "a.peer.example",
    **options: object,
) -> Connection:
    return Connection(
        name=name,
        local_addrs="192.0.2.2",
        remote_addrs="192.0.2.1",
        local_id=identity,
        remote_id="gw.example",
        proposals=ike,
        children=[
            Child(name=f"{name}-net", local_ts=local_ts, remote_ts=remote_ts, esp_proposals=esp)
        ],
        **options,  # type: ignore[arg-type]
    )


def psk_for(*identities: str, secret: str = PSK) -> Psk:
    return Psk(secret, [*identities, "gw.example"])


@pytest.fixture
def peer(netns_pair: NetnsPair, strongswan_factory: Callable[..., StrongSwan]) -> StrongSwan:
    netns_pair.peer.add_address("lo", "10.200.0.1/32")
    return strongswan_factory(netns_pair.peer)


@pytest.mark.parametrize("esp", sorted(SUITES))
@pytest.mark.parametrize("dh", sorted(GROUPS))
def test_strongswan_establishes_ike_and_child(
    netns_pair: NetnsPair,
    gateway_factory: Callable[..., Gateway],
    peer: StrongSwan,
    esp: str,
    dh: str,
) -> None:
    prefix, encr, keysize, summary_prefix = SUITES[esp]
    group, our_group = GROUPS[dh]
    ike = f"{prefix}-{dh}"
    summary = f"{summary_prefix}/{our_group}"
    gateway = gateway_factory(netns_pair.gw, psk=PSK)
    peer.load([peer_connection(ike=ike, esp=esp)], psks=[psk_for("a.peer.example")])
    peer.initiate(child="c-net", timeout=20)

    (sa,) = peer.list_sas()
    assert sa["state"] == "ESTABLISHED"
    assert sa["encr-alg"] == encr and int(sa["encr-keysize"]) == keysize and sa["dh-group"] == group
    (child,) = sa["child-sas"]
    assert child["state"] == "INSTALLED" and child["protocol"] == "ESP"
    assert child["encr-alg"] == encr
    assert child["local-ts"] == ["10.200.0.0/24"] and child["remote-ts"] == ["10.100.0.0/24"]

    (row,) = gateway.wait_sas(1)
    assert row["spi_i"] == sa["initiator-spi"] and row["spi_r"] == sa["responder-spi"]
    assert row["proposal"] == summary
    assert row["remote_id"] == "a.peer.example" and row["local_id"] == "gw.example"
    (ours,) = row["children"]
    assert ours["spi_in"] == child["spi-out"] and ours["spi_out"] == child["spi-in"]
    assert ours["local_ts"] == ["10.100.0.0/24"] and ours["remote_ts"] == ["10.200.0.0/24"]
    assert ours["state"] == "installed"

    details = gateway.show_text("details")
    spis = f"{sa['initiator-spi']}_i {sa['responder-spi']}_r"
    assert f"rw: #{row['unique_id']}, ESTABLISHED, IKEv2, {spis}" in details
    assert f"in  {ours['spi_in']}, 0 bytes, 0 packets" in details
    summary_text = gateway.show_text()
    assert (
        "192.0.2.2" in summary_text
        and "a.peer.example" in summary_text
        and "established 1" in summary_text
    )


def test_wrong_psk_is_refused_with_authentication_failed(
    netns_pair: NetnsPair, gateway_factory: Callable[..., Gateway], peer: StrongSwan
) -> None:
    gateway = gateway_factory(netns_pair.gw, psk=PSK)
    wrong = "wrong-secret-5b1e02c9d8f7"
    peer.load([peer_connection()], psks=[psk_for("a.peer.example", secret=wrong)])
    peer.initiate(child="c-net", timeout=20, check=False)

    wait_for(
        lambda: "AUTHENTICATION_FAILED" in peer.log_text(),
        timeout=15,
        what="strongSwan sees AUTHENTICATION_FAILED",
    )
    assert peer.list_sas() == []
    assert gateway.show() == []
    assert gateway.counters("ike").get("auth_failed.auth_mismatch", 0) == 1
    events = [e for e in gateway.log_events() if e.get("event") == "authentication_failed"]
    assert events and events[0]["level"] == 1 and events[0]["remote_id"] == "a.peer.example"
    text = gateway.log_text()
    assert PSK not in text and wrong not in text
    assert PSK.encode().hex() not in text


def test_no_matching_proposal_gets_no_proposal_chosen(
    netns_pair: NetnsPair, gateway_factory: Callable[..., Gateway], peer: StrongSwan
) -> None:
    gateway = gateway_factory(netns_pair.gw, psk=PSK)
    peer.load([peer_connection(ike="aes256-sha512-ecp384")], psks=[psk_for("a.peer.example")])
    peer.initiate(child="c-net", timeout=20, check=False)
    wait_for(
        lambda: "NO_PROPOSAL_CHOSEN" in peer.log_text(),
        timeout=15,
        what="NO_PROPOSAL_CHOSEN at strongSwan",
    )
    assert gateway.show() == []
    assert gateway.counters("ike").get("ike_sa_init_refused.no_proposal_chosen", 0) >= 1


def test_unacceptable_traffic_selectors_keep_the_ike_sa(
    netns_pair: NetnsPair, gateway_factory: Callable[..., Gateway], peer: StrongSwan
) -> None:
    gateway = gateway_factory(netns_pair.gw, psk=PSK)
    peer.load([peer_connection(remote_ts="10.99.0.0/24")], psks=[psk_for("a.peer.example")])
    peer.initiate(child="c-net", timeout=20, check=False)
    wait_for(
        lambda: "TS_UNACCEPTABLE" in peer.log_text(),
        timeout=15,
        what="TS_UNACCEPTABLE at strongSwan",
    )
    (sa,) = peer.list_sas()
    assert sa["state"] == "ESTABLISHED" and sa.get("child-sas", []) == []
    (row,) = gateway.wait_sas(1)
    assert row["children"] == [] and row["spi_r"] == sa["responder-spi"]
    assert gateway.counters("ike").get("ts_unacceptable", 0) == 1


def test_two_workers_share_the_load_and_every_exchange_reaches_the_owner(
    netns_pair: NetnsPair, gateway_factory: Callable[..., Gateway], peer: StrongSwan
) -> None:
    gateway = gateway_factory(netns_pair.gw, psk=PSK, workers=2)
    names = [f"c{i}" for i in range(16)]
    identities = [f"{name}.peer.example" for name in names]
    connections = [
        peer_connection(name=name, identity=identity, local_ts=f"10.200.{i}.0/24", dpd_delay="1s")
        for i, (name, identity) in enumerate(zip(names, identities, strict=True))
    ]
    for i in range(1, 16):  # the peer fixture put 10.200.0.1 there already
        netns_pair.peer.add_address("lo", f"10.200.{i}.1/32")
    peer.load(connections, psks=[psk_for(*identities)])
    for name in names:
        peer.initiate(child=f"{name}-net", timeout=20)

    rows = gateway.wait_sas(16)
    shards = {int(row["spi_r"][:4], 16) for row in rows}
    assert shards == {0, 1}, f"all SAs landed on shards {shards}"
    theirs = {(s["initiator-spi"], s["responder-spi"]) for s in peer.list_sas()}
    assert {(r["spi_i"], r["spi_r"]) for r in rows} == theirs

    # strongSwan's DPD (empty INFORMATIONAL every second) must reach each SA's owner
    def liveness_on_both() -> bool:
        per_worker = [
            row.get("gauges", {}).get("engine", {}).get("liveness_answered", 0)
            for row in gateway.status().get("ike", [])
        ]
        return len(per_worker) == 2 and all(count > 0 for count in per_worker)

    wait_for(liveness_on_both, timeout=20, what="DPD answered by both workers")
    counters = gateway.counters("ike")
    assert (
        counters.get("dropped.unknown_spi", 0) == 0 and counters.get("dropped.wrong_shard", 0) == 0
    )

    for name in names[:8]:
        peer.terminate(ike=name)
    wait_for(lambda: len(gateway.show()) == 8, timeout=20, what="deletes processed by the owners")
    assert {(r["spi_i"], r["spi_r"]) for r in gateway.show()} == {
        (s["initiator-spi"], s["responder-spi"]) for s in peer.list_sas()
    }
