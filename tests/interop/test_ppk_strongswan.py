"""RFC 8784 PPKs between strongSwan and `ikefarm up`, both roles (seed 004 `ike ppk`).

strongSwan's side: `ppk_id` / `ppk_required` in the connection and the PPK in
`secrets.ppk-N`; it logs "using PPK for PPK_ID '...'" when it mixed the PPK,
and `swanctl --list-sas` says `ppk = yes`. ikefarm's side: `ppk_used` in
`show ike-sa` and `/PPK` after the algorithms in `show ike-sa details`.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.harness.gateway import Gateway, farm_config, vpn_config
from tests.harness.netns import NetnsPair, wait_for
from tests.harness.strongswan import Child, Connection, Ppk, Psk, StrongSwan

pytestmark = [pytest.mark.interop, pytest.mark.timeout(180)]

PSK = "ppk-interop-psk-51c0e2a7d9b4"
PPK = "0x" + "5e1f0c2b9a8d7e6f" * 4  # 32 octets, as `ppk` secrets usually are
PPK_ID = "ppk-one@ikefarm"
SUMMARY = "aes256-gcm-128/prf:hmac-sha384/x25519"


def ppk_table(name: str = "one", identity: str = PPK_ID, secret: str = PPK) -> str:
    return f'\n[[ike.ppk]]\nname = "{name}"\nid = "{identity}"\nsecret = "{secret}"\n'


def connection(
    local_id: str, child: str, ppk_id: str | None = PPK_ID, required: bool | None = True
) -> Connection:
    """strongSwan at 192.0.2.2 facing ikefarm (gw.example) at 192.0.2.1, either role."""
    return Connection(
        name="c",
        local_addrs="192.0.2.2",
        remote_addrs="192.0.2.1",
        local_id=local_id,
        remote_id="gw.example",
        proposals="aes256gcm16-prfsha384-x25519",
        ppk_id=ppk_id,
        ppk_required=required,
        children=[
            Child(
                name=child,
                local_ts="10.200.0.0/24",
                remote_ts="10.100.0.0/24",
                esp_proposals="aes256gcm16",
            )
        ],
    )


def initiator(ppk_id: str | None = PPK_ID, required: bool | None = True) -> Connection:
    return connection("a.peer.example", "c-net", ppk_id, required)


@pytest.fixture
def peer(netns_pair: NetnsPair, strongswan_factory: Callable[..., StrongSwan]) -> StrongSwan:
    netns_pair.peer.add_address("lo", "10.200.0.1/32")
    return strongswan_factory(netns_pair.peer)


def psks() -> list[Psk]:
    return [Psk(PSK, ["a.peer.example", "gw.example"])]


def test_strongswan_initiator_with_required_ppk_uses_it(
    netns_pair: NetnsPair, gateway_factory: Callable[..., Gateway], peer: StrongSwan
) -> None:
    gateway = gateway_factory(netns_pair.gw, psk=PSK, extra=ppk_table())
    peer.load([initiator()], psks=psks(), ppks=[Ppk(PPK_ID, PPK)])
    peer.initiate(child="c-net", timeout=20)

    (sa,) = peer.list_sas()
    assert sa["state"] == "ESTABLISHED" and sa.get("ppk") == "yes"
    assert f"using PPK for PPK_ID '{PPK_ID}'" in peer.log_text()
    (child,) = sa["child-sas"]
    assert child["state"] == "INSTALLED"  # child keys from SK_d' agree on both sides
    (row,) = gateway.wait_sas(1)
    assert row["ppk_used"] is True and row["proposal"] == f"{SUMMARY}/PPK"
    assert (row["spi_i"], row["spi_r"]) == (sa["initiator-spi"], sa["responder-spi"])
    assert f"  {SUMMARY}/PPK\n" in gateway.show_text("details")
    assert gateway.counters("keystore").get("ppk_mix.mixed") == 1


def test_unknown_ppk_id_not_required_establishes_without_ppk(
    netns_pair: NetnsPair, gateway_factory: Callable[..., Gateway], peer: StrongSwan
) -> None:
    gateway = gateway_factory(netns_pair.gw, psk=PSK, extra=ppk_table())
    other = "0x" + "77" * 32
    peer.load(
        [initiator("not-known-here", False)], psks=psks(), ppks=[Ppk("not-known-here", other)]
    )
    peer.initiate(child="c-net", timeout=20)

    (sa,) = peer.list_sas()
    assert sa["state"] == "ESTABLISHED" and sa.get("ppk") != "yes"
    assert sa["child-sas"][0]["state"] == "INSTALLED"
    (row,) = gateway.wait_sas(1)
    assert row["ppk_used"] is False and row["proposal"] == SUMMARY
    assert gateway.counters("ike").get("ppk_not_used.unknown_ppk_id") == 1


def test_required_on_ikefarm_and_absent_on_the_peer_is_authentication_failed(
    netns_pair: NetnsPair, gateway_factory: Callable[..., Gateway], peer: StrongSwan
) -> None:
    gateway = gateway_factory(
        netns_pair.gw, psk=PSK, extra=ppk_table(), ike_template_extra="require-ppk = true"
    )
    peer.load([initiator(None, None)], psks=psks())
    peer.initiate(child="c-net", timeout=20, check=False)
    wait_for(
        lambda: "AUTHENTICATION_FAILED" in peer.log_text(),
        timeout=15,
        what="strongSwan sees AUTHENTICATION_FAILED",
    )
    assert peer.list_sas() == [] and gateway.show() == []
    assert gateway.counters("ike").get("auth_failed.ppk_required") == 1


def test_ikefarm_initiator_with_vpn_ppk_uses_it(
    netns_pair: NetnsPair,
    gateway_factory: Callable[..., Gateway],
    peer: StrongSwan,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    responder = connection("peer.example", "net")
    peer.load([responder], psks=[Psk(PSK, ["peer.example", "gw.example"])], ppks=[Ppk(PPK_ID, PPK)])
    vpn = vpn_config(
        "hq",
        local_id="gw.example",
        remote_id="peer.example",
        policies=[("net", "10.100.0.0/24", "10.200.0.0/24")],
    ).replace('name = "hq"\n', 'name = "hq"\nppk = "one"\n', 1)
    workdir = tmp_path_factory.mktemp("gw")
    text = farm_config(workdir, psks=[("gw.example", "peer.example", PSK)], vpns=[vpn])
    gateway = gateway_factory(netns_pair.gw, config_text=text + ppk_table())
    done = gateway.run_cli("initiate", "child-sa", "security-policy", "net", "--timeout", "20")
    assert done.returncode == 0, done.stdout + done.stderr

    (sa,) = peer.list_sas()
    assert sa["state"] == "ESTABLISHED" and sa.get("ppk") == "yes"
    assert sa["child-sas"][0]["state"] == "INSTALLED"
    assert f"using PPK for PPK_ID '{PPK_ID}'" in peer.log_text()
    (row,) = gateway.show()
    assert row["initiator"] and row["ppk_used"] is True and row["proposal"].endswith("/PPK")
