"""A real strongSwan against a farm of two ingress processes sharing UDP 500/4500
(`[farm] ingress-instances = 2`, SO_REUSEPORT) and two ike workers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.harness.gateway import GATEWAY_TOML, Gateway
from tests.harness.netns import NetnsPair, wait_for
from tests.harness.strongswan import StrongSwan
from tests.interop.test_responder_strongswan import PSK, peer, peer_connection, psk_for

__all__ = ["peer"]  # the fixture, imported for pytest

pytestmark = [pytest.mark.interop, pytest.mark.timeout(180)]


def test_two_ingress_instances_serve_one_farm_to_the_end(
    netns_pair: NetnsPair,
    gateway_factory: Callable[..., Gateway],
    peer: StrongSwan,
    tmp_path: Path,
) -> None:
    text = GATEWAY_TOML.format(
        state_dir=tmp_path / "gw-state",
        workers=2,
        log_level=1,
        psk=PSK,
        address="192.0.2.1",
        extra="",
        ike_template_extra="",
        ipsec_template_extra="",
    ).replace("ike-workers = 2\n", "ike-workers = 2\ningress-instances = 2\n", 1)
    assert "ingress-instances = 2" in text
    gateway = gateway_factory(netns_pair.gw, config_text=text)
    assert len(gateway.status()["ingress"]) == 2

    names = [f"c{i}" for i in range(8)]
    identities = [f"{name}.peer.example" for name in names]
    for i in range(1, 8):  # the peer fixture put 10.200.0.1 there already
        netns_pair.peer.add_address("lo", f"10.200.{i}.1/32")
    peer.load(
        [
            peer_connection(name=name, identity=identity, local_ts=f"10.200.{i}.0/24")
            for i, (name, identity) in enumerate(zip(names, identities, strict=True))
        ],
        psks=[psk_for(*identities)],
    )
    for name in names:
        peer.initiate(child=f"{name}-net", timeout=20)

    rows = gateway.wait_sas(8)
    theirs = {(s["initiator-spi"], s["responder-spi"]) for s in peer.list_sas()}
    assert {(r["spi_i"], r["spi_r"]) for r in rows} == theirs
    ingress = gateway.counters("ingress")
    # each answer to an IKE_SA_INIT brought its init route to the instance that forwarded it
    # (a retransmission strongSwan may send before the answer is new to ingress again)
    assert ingress.get("init_route_learned", 0) >= 8
    assert ingress.get("routed.init", 0) >= 8
    assert not {k: v for k, v in ingress.items() if k.startswith("dropped.") and v}

    for name in names[:4]:
        peer.terminate(ike=name)
    wait_for(lambda: len(gateway.show()) == 4, timeout=20, what="deletes processed")
