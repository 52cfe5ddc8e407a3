"""The userspace dataplane's TCP checks with strongSwan (kernel-libipsec) as the peer.

The setup of tests/interop/test_userspace_flow_strongswan.py (strongSwan in "peer", inner
10.200.0.1, initiates to `ikefarm up` in "gw", inner 10.100.0.1), with `[flow.tcp-session]
tcp-mss` set and the sequence check on (its default); docs/flow-sessions.md "TCP checks".

Acceptance: a TCP connection from the peer to the gateway works through the sequence check
(data echoed both ways, nothing counted as `flow.drop.tcp_sequence`), and both ends' kernels
settle on a segment size at or below `tcp-mss` (the SYN clamped on its way in, the SYN-ACK on
its way out), where the devices' MTUs alone (1500 on the gateway's TUN device, 1400 on
strongSwan's) would give more.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import pytest

from tests.harness.gateway import Gateway
from tests.harness.netns import NetnsPair, wait_for
from tests.harness.strongswan import StrongSwan
from tests.interop.test_responder_strongswan import peer_connection, psk_for
from tests.interop.test_userspace_flow_strongswan import python

pytestmark = [pytest.mark.interop, pytest.mark.timeout(180)]

PSK = "userspace-tcp-checks-psk-51c9e0a4"
GW_INNER, PEER_INNER = "10.100.0.1", "10.200.0.1"
GW_OUTER, PEER_OUTER = "192.0.2.1", "192.0.2.2"
PORT, MSS = 5211, 1200
FLOW = f"""
[kernel]
backend = "userspace"
[flow]
source = "dataplane"
[flow.tcp-session]
tcp-mss = {MSS}
"""

# gw side: accepts one connection, prints its TCP_MAXSEG, echoes one message
SERVER = r"""
import socket, sys
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind((sys.argv[1], int(sys.argv[2])))
listener.listen(1)
print("listening", flush=True)
conn, _ = listener.accept()
print(conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG), flush=True)
conn.sendall(conn.recv(5000))
"""

# peer side: connects, prints its TCP_MAXSEG, sends 3000 bytes and prints how many came back
CLIENT = r"""
import socket, sys
conn = socket.create_connection((sys.argv[1], int(sys.argv[2])), source_address=(sys.argv[3], 0),
                                timeout=20)
print(conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG), flush=True)
conn.sendall(b"x" * 3000)
got = b""
while len(got) < 3000:
    data = conn.recv(5000)
    if not data:
        break
    got += data
print(len(got), flush=True)
"""


def test_mss_clamped_both_ways_and_the_sequence_check_lets_a_connection_through(
    netns_pair: NetnsPair,
    gateway_factory: Callable[..., Gateway],
    strongswan_factory: Callable[..., StrongSwan],
) -> None:
    gw_ns, peer_ns = netns_pair.gw, netns_pair.peer
    gw_ns.add_address("lo", f"{GW_INNER}/32")
    peer_ns.add_address("lo", f"{PEER_INNER}/32")
    gateway = gateway_factory(gw_ns, psk=PSK, address=GW_OUTER, extra=FLOW, log_level=1)
    peer = strongswan_factory(peer_ns)
    connection = replace(peer_connection(), local_addrs=PEER_OUTER, remote_addrs=GW_OUTER)
    peer.load([connection], psks=[psk_for("a.peer.example", secret=PSK)])
    peer.initiate(child="c-net", timeout=20)
    gateway.wait_sas(1)

    server = python(gw_ns, SERVER, GW_INNER, str(PORT))
    assert server.next() == "listening"
    client = python(peer_ns, CLIENT, GW_INNER, str(PORT), PEER_INNER)
    client_mss = int(client.next(timeout=20))
    server_mss = int(server.next(timeout=20))
    assert 0 < client_mss <= MSS  # the gateway's SYN-ACK, clamped on its way out
    assert 0 < server_mss <= MSS  # the peer's SYN, clamped on its way in
    assert client.next(timeout=20) == "3000"  # segments of the size agreed, echoed back
    wait_for(
        lambda: gateway.counters("kernel").get("flow.opened", 0) >= 1,
        timeout=10,
        what="the kernel service's flow counters",
    )
    assert gateway.counters("kernel").get("flow.drop.tcp_sequence", 0) == 0
