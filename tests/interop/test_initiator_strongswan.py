"""ikefarm initiates to a real strongSwan responder: `ikefarm initiate child-sa|ike-sa ...`.

ikefarm runs in "gw" (192.0.2.1) with the memory kernel backend, strongSwan in
"peer" (192.0.2.2) with an address of its local traffic selector on `lo` (what
kernel-libipsec needs to install its side, see tests/harness/strongswan.py).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest

from tests.harness.gateway import Gateway, farm_config, vpn_config
from tests.harness.netns import NetnsPair
from tests.harness.strongswan import Child, Connection, Psk, StrongSwan

pytestmark = [pytest.mark.interop, pytest.mark.timeout(180)]

PSK = "initiator-psk-3c71e5a9b0d2f648"


def responder(
    name: str = "c",
    local_id: str = "peer.example",
    remote_id: str = "gw.example",
    children: tuple[tuple[str, str, str], ...] = (("net", "10.200.0.0/24", "10.100.0.0/24"),),
    **options: object,
) -> Connection:
    """strongSwan's side: it answers ikefarm (remote 192.0.2.1)."""
    return Connection(
        name=name,
        local_addrs="192.0.2.2",
        remote_addrs="192.0.2.1",
        local_id=local_id,
        remote_id=remote_id,
        proposals="aes256gcm16-prfsha384-x25519",
        children=[
            Child(name=child, local_ts=lts, remote_ts=rts, esp_proposals="aes256gcm16")
            for child, lts, rts in children
        ],
        **options,  # type: ignore[arg-type]
    )


def hq(**options: object) -> str:
    return vpn_config(
        "hq",
        local_id="gw.example",
        remote_id="peer.example",
        policies=[("net", "10.100.0.0/24", "10.200.0.0/24")],
        **options,  # type: ignore[arg-type]
    )


@pytest.fixture
def peer(netns_pair: NetnsPair, strongswan_factory: Callable[..., StrongSwan]) -> StrongSwan:
    netns_pair.peer.add_address("lo", "10.200.0.1/32")
    ss = strongswan_factory(netns_pair.peer)
    ss.load([responder()], psks=[Psk(PSK, ["peer.example", "gw.example"])])
    return ss


@pytest.fixture
def gateway(
    netns_pair: NetnsPair, gateway_factory: Callable[..., Gateway], tmp_path_factory
) -> Gateway:  # type: ignore[no-untyped-def]
    workdir = tmp_path_factory.mktemp("gw")
    text = farm_config(workdir, psks=[("gw.example", "peer.example", PSK)], vpns=[hq()])
    return gateway_factory(netns_pair.gw, config_text=text)


def test_initiate_child_sa_establishes_ike_and_child_with_the_same_spis(
    gateway: Gateway, peer: StrongSwan
) -> None:
    done = gateway.run_cli("initiate", "child-sa", "security-policy", "net", "--timeout", "20")
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    (row,) = gateway.show()
    uid = row["unique_id"]
    (child,) = row["children"]
    assert lines[0] == f"initiating IKE_SA hq[{uid}] to 192.0.2.2"
    assert (
        f"IKE_SA hq[{uid}] established between 192.0.2.1[gw.example]...192.0.2.2[peer.example]"
        in lines
    )
    assert lines[-1] == (
        f"CHILD_SA net{{{child['unique_id']}}} established with SPIs {child['spi_in']}_i "
        f"{child['spi_out']}_o and TS 10.100.0.0/24 === 10.200.0.0/24"
    )
    assert any(re.fullmatch(r"scheduling rekeying in \d+s", line) for line in lines)

    (sa,) = peer.list_sas()
    assert sa["state"] == "ESTABLISHED" and sa.get("initiator") != "yes"
    assert (row["spi_i"], row["spi_r"]) == (sa["initiator-spi"], sa["responder-spi"])
    assert row["initiator"] and row["state"] == "established"
    (theirs,) = sa["child-sas"]
    assert theirs["state"] == "INSTALLED"
    assert (child["spi_in"], child["spi_out"]) == (theirs["spi-out"], theirs["spi-in"])
    assert theirs["local-ts"] == ["10.200.0.0/24"] and theirs["remote-ts"] == ["10.100.0.0/24"]
    assert child["local_ts"] == ["10.100.0.0/24"] and child["remote_ts"] == ["10.200.0.0/24"]


def test_initiate_ike_sa_is_childless_with_strongswan(gateway: Gateway, peer: StrongSwan) -> None:
    done = gateway.run_cli("initiate", "ike-sa", "vpn", "hq", "--timeout", "20")
    assert done.returncode == 0, done.stdout + done.stderr
    (row,) = gateway.show()
    (sa,) = peer.list_sas()
    assert (row["spi_i"], row["spi_r"]) == (sa["initiator-spi"], sa["responder-spi"])
    # strongSwan 5.9.8 answers CHILDLESS_IKEV2_SUPPORTED (RFC 6023): no child on either side
    assert row["children"] == [] and sa.get("child-sas", []) == []
    assert not any(line.startswith("CHILD_SA") for line in done.stdout.splitlines())
    # a child asked for afterwards rides on that IKE SA (CREATE_CHILD_SA)
    done = gateway.run_cli("initiate", "child-sa", "security-policy", "net", "--timeout", "20")
    assert done.returncode == 0, done.stdout + done.stderr
    assert (
        done.stdout.splitlines()[0] == f"establishing CHILD_SA net in IKE_SA hq[{row['unique_id']}]"
    )
    (row,) = gateway.show()
    (sa,) = peer.list_sas()
    (child,) = row["children"]
    (theirs,) = sa["child-sas"]
    assert (child["spi_in"], child["spi_out"]) == (theirs["spi-out"], theirs["spi-in"])


def test_a_refused_initiation_exits_non_zero(
    netns_pair: NetnsPair,
    gateway_factory: Callable[..., Gateway],
    peer: StrongSwan,
    tmp_path_factory,
) -> None:  # type: ignore[no-untyped-def]
    workdir = tmp_path_factory.mktemp("gw-wrong")
    text = farm_config(
        workdir, psks=[("gw.example", "peer.example", "not-the-psk-0000")], vpns=[hq()]
    )
    gateway = gateway_factory(netns_pair.gw, config_text=text)
    done = gateway.run_cli("initiate", "child-sa", "security-policy", "net", "--timeout", "20")
    assert done.returncode == 1
    assert done.stdout.splitlines()[-1].endswith("failed: rejected_by_peer")
    assert gateway.show() == [] and peer.list_sas() == []
    done = gateway.run_cli("initiate", "child-sa", "security-policy", "nope")
    assert done.returncode == 1 and "no security-policy named 'nope'" in done.stderr
