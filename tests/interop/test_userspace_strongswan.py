"""Packets through the tunnel: strongSwan (kernel-libipsec) <-> ikefarm's userspace dataplane.

strongSwan 5.9.8 initiates from "peer" (192.0.2.2, inner 10.200.0.1 on lo) to
`ikefarm up` in "gw" (192.0.2.1, inner 10.100.0.1 on lo) with
`[kernel] backend = "userspace"`. This kernel has no ESP states, so both ends
protect packets in userspace: strongSwan through kernel-libipsec (its TUN
device `ipsec0`; it forces ESP in UDP on port 4500, faking a NAT), ikefarm
through its TUN device `ikefarm0` and a raw socket reading ESP-in-UDP next to
ingress's IKE socket on 4500 (docs/esp-dataplane.md).

Acceptance: ping both ways through the tunnel, then a TCP transfer each way
whose SHA-256 matches on both ends, and the SA counters of `ikefarm show
kernel` say the packets went through the dataplane.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.harness.gateway import Gateway
from tests.harness.netns import Namespace, NetnsPair, wait_for
from tests.harness.strongswan import Child, Connection, Psk, StrongSwan

pytestmark = [pytest.mark.interop, pytest.mark.timeout(240)]

PSK = "userspace-esp-psk-5d0c7a91e3b2"
GW_INNER, PEER_INNER = "10.100.0.1", "10.200.0.1"
TRANSFER_BYTES = 20 * 1024 * 1024
PORT = 5201

# A TCP endpoint: the server sends or sinks TRANSFER_BYTES, printing the SHA-256 of what it
# sent or received; the data is a seeded pseudo-random stream so both ends can check it.
SERVER = r"""
import hashlib, random, socket, sys
mode, address, port, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind((address, port))
listener.listen(1)
print("listening", flush=True)
conn, _ = listener.accept()
digest = hashlib.sha256()
if mode == "send":
    data = random.Random(7).randbytes(size)
    conn.sendall(data)
    digest.update(data)
    conn.shutdown(socket.SHUT_WR)
    conn.recv(1)
else:
    while True:
        chunk = conn.recv(65536)
        if not chunk:
            break
        digest.update(chunk)
print(digest.hexdigest(), flush=True)
"""

CLIENT = r"""
import hashlib, random, socket, sys
mode, address, port, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
conn = socket.create_connection((address, port), timeout=60)
digest = hashlib.sha256()
if mode == "send":
    data = random.Random(11).randbytes(size)
    conn.sendall(data)
    digest.update(data)
    conn.shutdown(socket.SHUT_WR)
    conn.recv(1)
else:
    total = 0
    while True:
        chunk = conn.recv(65536)
        if not chunk:
            break
        total += len(chunk)
        digest.update(chunk)
print(digest.hexdigest(), flush=True)
"""


def transfer(
    server_ns: Namespace, client_ns: Namespace, server_address: str, *, upload: bool
) -> tuple[str, str]:
    """(server's digest, client's digest) of TRANSFER_BYTES sent by the client when `upload`."""
    server_mode, client_mode = ("sink", "send") if upload else ("send", "sink")
    args = [server_address, str(PORT), str(TRANSFER_BYTES)]
    server = server_ns.popen(
        [sys.executable, "-c", SERVER, server_mode, *args], stdout=-1, stderr=-1, text=True
    )
    assert server.stdout is not None
    assert server.stdout.readline().strip() == "listening"
    client = client_ns.run([sys.executable, "-c", CLIENT, client_mode, *args], timeout=150)
    out, err = server.communicate(timeout=30)
    assert server.returncode == 0, err
    return out.strip(), client.stdout.strip()


def expected_digest(seed: int) -> str:
    import random

    return hashlib.sha256(random.Random(seed).randbytes(TRANSFER_BYTES)).hexdigest()


def kernel_state(gateway: Gateway) -> dict[str, object]:
    result = gateway.run_cli("show", "kernel", "--json")
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def test_ping_and_tcp_through_the_userspace_dataplane(
    netns_pair: NetnsPair,
    gateway_factory: Callable[..., Gateway],
    strongswan_factory: Callable[..., StrongSwan],
    tmp_path: Path,
) -> None:
    gw_ns, peer_ns = netns_pair.gw, netns_pair.peer
    gw_ns.add_address("lo", f"{GW_INNER}/32")
    peer_ns.add_address("lo", f"{PEER_INNER}/32")
    gateway = gateway_factory(
        gw_ns, psk=PSK, extra='\n[kernel]\nbackend = "userspace"\n', log_level=1
    )
    peer = strongswan_factory(peer_ns)
    peer.load(
        [
            Connection(
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
                        esp_proposals="aes256gcm16",
                    )
                ],
            )
        ],
        psks=[Psk(PSK, ["a.peer.example", "gw.example"])],
    )
    peer.initiate(child="c-net", timeout=20)
    (sa,) = peer.list_sas()
    (child,) = sa["child-sas"]
    assert child["encap"] == "yes"  # kernel-libipsec: ESP in UDP on 4500
    (row,) = gateway.wait_sas(1)
    assert row["children"][0]["state"] == "installed"

    assert peer_ns.ping(GW_INNER, src=PEER_INNER, count=3, timeout=10)
    assert gw_ns.ping(PEER_INNER, src=GW_INNER, count=3, timeout=10)

    state = kernel_state(gateway)
    assert state["backend"] == "userspace"
    sas = {sa_row["direction"]: sa_row for sa_row in state["sas"]}  # type: ignore[attr-defined]
    assert sas["in"]["spi"] == child["spi-out"] and sas["out"]["spi"] == child["spi-in"]
    assert sas["in"]["packets"] >= 6 and sas["out"]["packets"] >= 6  # echo requests + replies
    assert sas["in"]["encap"] is True

    # upload: peer -> gw, then download: gw -> peer
    server_digest, client_digest = transfer(gw_ns, peer_ns, GW_INNER, upload=True)
    assert server_digest == client_digest == expected_digest(11)
    server_digest, client_digest = transfer(gw_ns, peer_ns, GW_INNER, upload=False)
    assert server_digest == client_digest == expected_digest(7)

    # ingress's NAT-T socket filter kept every ESP packet away from it
    assert gateway.counters("ingress").get("esp_in_udp", 0) == 0
    counters = gateway.counters("kernel")
    assert counters.get("esp.in.packets", 0) > 2 * TRANSFER_BYTES // 1500 // 2
    assert counters.get("esp.in.drop.integrity", 0) == 0
    wait_for(
        lambda: gateway.counters("kernel").get("child_install.ok") == 1,
        timeout=5,
        what="one install",
    )
