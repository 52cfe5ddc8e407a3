"""Two ikefarm gateways, both with the userspace dataplane, ikefarm initiating.

"peer" (192.0.2.2 or 2001:db8::2, inner 10.200.0.1) initiates to "gw"
(192.0.2.1 or 2001:db8::1, inner 10.100.0.1); there is no NAT between them, so
the child SA is not UDP-encapsulated and ESP travels as IP protocol 50 on the
raw sockets of both dataplanes, over IPv4 and over IPv6. ESN is negotiated
(`esn = [true]`). Ping both ways, then a TCP transfer each way with SHA-256
compared, and the counters of both ends agree.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.harness.gateway import Gateway, farm_config, vpn_config
from tests.harness.netns import NetnsPair
from tests.interop.test_userspace_strongswan import (
    GW_INNER,
    PEER_INNER,
    expected_digest,
    kernel_state,
    transfer,
)

pytestmark = [pytest.mark.interop, pytest.mark.timeout(240)]

PSK = "two-farms-psk-91c3e07d5a2b"


OUTER = {4: ("192.0.2.1", "192.0.2.2"), 6: ("2001:db8::1", "2001:db8::2")}


def farm(workdir: Path, local: str, remote: str, local_ts: str, remote_ts: str, family: int) -> str:
    gw, peer = OUTER[family]
    vpn = vpn_config(
        "hq",
        local_id=f"{local}.example",
        remote_id=f"{remote}.example",
        policies=[("net", local_ts, remote_ts)],
        local_address=gw if local == "gw" else peer,
        remote_address=peer if local == "gw" else gw,
    )
    return farm_config(
        workdir,
        psks=[(f"{local}.example", f"{remote}.example", PSK)],
        vpns=[vpn],
        kernel_backend="userspace",
    ).replace("esn = [false]", "esn = [true]")


@pytest.mark.parametrize("family", [4, 6], ids=["outer-ipv4", "outer-ipv6"])
def test_two_farms_carry_ping_and_tcp_over_raw_esp_with_esn(
    netns_pair: NetnsPair, gateway_factory: Callable[..., Gateway], tmp_path: Path, family: int
) -> None:
    gw_ns, peer_ns = netns_pair.gw, netns_pair.peer
    gw_ns.add_address("lo", f"{GW_INNER}/32")
    peer_ns.add_address("lo", f"{PEER_INNER}/32")
    gw_dir, peer_dir = tmp_path / "gw", tmp_path / "peer"
    gw_text = farm(gw_dir, "gw", "peer", "10.100.0.0/24", "10.200.0.0/24", family)
    peer_text = farm(peer_dir, "peer", "gw", "10.200.0.0/24", "10.100.0.0/24", family)
    gateway = gateway_factory(gw_ns, config_text=gw_text)
    initiator = gateway_factory(peer_ns, config_text=peer_text)

    done = initiator.run_cli("initiate", "child-sa", "security-policy", "net", "--timeout", "20")
    assert done.returncode == 0, done.stdout + done.stderr
    (row,) = gateway.wait_sas(1)
    (child,) = row["children"]
    assert child["state"] == "installed"

    assert peer_ns.ping(GW_INNER, src=PEER_INNER, count=3, timeout=10)
    assert gw_ns.ping(PEER_INNER, src=GW_INNER, count=3, timeout=10)

    server_digest, client_digest = transfer(gw_ns, peer_ns, GW_INNER, upload=True)
    assert server_digest == client_digest == expected_digest(11)
    server_digest, client_digest = transfer(gw_ns, peer_ns, GW_INNER, upload=False)
    assert server_digest == client_digest == expected_digest(7)

    ours = {sa["direction"]: sa for sa in kernel_state(gateway)["sas"]}  # type: ignore[attr-defined]
    theirs = {sa["direction"]: sa for sa in kernel_state(initiator)["sas"]}  # type: ignore[attr-defined]
    assert ours["in"]["encap"] is False and ours["in"]["esn"] is True
    assert ours["in"]["spi"] == theirs["out"]["spi"] and ours["out"]["spi"] == theirs["in"]["spi"]
    # one end received what the other sent, short of what a socket queue lost under load
    assert 1000 < theirs["in"]["packets"] <= ours["out"]["packets"]
    assert 1000 < ours["in"]["packets"] <= theirs["out"]["packets"]
    for side in (gateway, initiator):
        (kernel,) = side.status()["kernel"]
        assert kernel["gauges"]["backend"] == "userspace" and kernel["gauges"]["tunnels"] == 1
        counters = side.counters("kernel")
        assert not any(k.startswith("esp.in.drop.") and v for k, v in counters.items()), counters

    # a stopped farm leaves neither its TUN device nor its routing rule behind
    assert "lookup 220" in gw_ns.run(["ip", "rule"]).stdout
    gateway.stop()
    assert "lookup 220" not in gw_ns.run(["ip", "rule"]).stdout
    assert "lookup 220" not in gw_ns.run(["ip", "-6", "rule"]).stdout
    assert "ikefarm0" not in gw_ns.run(["ip", "link"]).stdout
