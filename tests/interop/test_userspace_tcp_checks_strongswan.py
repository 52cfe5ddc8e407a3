"""The userspace dataplane's TCP checks with strongSwan (kernel-libipsec) as the peer.

The setup of tests/interop/test_userspace_flow_strongswan.py (strongSwan in "peer", inner
10.200.0.1, initiates to `ikefarm up` in "gw", inner 10.100.0.1), with `[flow.tcp-session]
tcp-mss` set and the sequence check on (its default); docs/flow-sessions.md "TCP checks".

Acceptance: a TCP connection from the peer to the gateway works through the sequence check
(256 KiB echoed back unchanged, so windows grow past 64 KiB with window scaling; nothing
counted as `flow.drop.tcp_sequence`), and both ends' kernels
settle on a segment size at or below `tcp-mss` (the SYN clamped on its way in, the SYN-ACK on
its way out), where the devices' MTUs alone (1500 on the gateway's TUN device, 1400 on
strongSwan's) would give more.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.harness.gateway import Gateway
from tests.harness.netns import NetnsPair
from tests.harness.strongswan import StrongSwan
from tests.interop.test_userspace_flow_strongswan import python
from tests.interop.test_userspace_strongswan import GW_INNER, PEER_INNER, establish

pytestmark = [pytest.mark.interop, pytest.mark.timeout(180)]

PORT, MSS = 5211, 1200
SIZE = 256 * 1024
FLOW = f"""
[kernel]
backend = "userspace"
[flow]
source = "dataplane"
[flow.tcp-session]
tcp-mss = {MSS}
"""

# gw side: accepts one connection, prints its TCP_MAXSEG, echoes SIZE bytes as they come (a recv
# returns what has arrived, one segment or several), prints how many, then waits for the
# client to close first (closing with unread data would answer with an RST)
SERVER = r"""
import socket, sys
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind((sys.argv[1], int(sys.argv[2])))
listener.listen(1)
print("listening", flush=True)
conn, _ = listener.accept()
conn.settimeout(60)
print(conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG), flush=True)
size, echoed = int(sys.argv[3]), 0
while echoed < size:
    data = conn.recv(65536)
    if not data:
        break
    conn.sendall(data)
    echoed += len(data)
print(echoed, flush=True)
while conn.recv(65536):
    pass
"""

# peer side: connects, prints its TCP_MAXSEG, sends SIZE bytes of a pattern (from a thread, while
# it reads the echo), prints "echoed N" when all of it came back unchanged
CLIENT = r"""
import socket, sys, threading
conn = socket.create_connection((sys.argv[1], int(sys.argv[2])), source_address=(sys.argv[3], 0),
                                timeout=60)
print(conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG), flush=True)
size = int(sys.argv[4])
payload = bytes(range(251)) * (size // 251 + 1)
payload = payload[:size]
threading.Thread(target=conn.sendall, args=(payload,), daemon=True).start()
got = bytearray()
while len(got) < size:
    data = conn.recv(65536)
    if not data:
        break
    got += data
print(f"echoed {len(got)}" if got == payload else f"differs {len(got)}", flush=True)
conn.close()
"""


def test_mss_clamped_both_ways_and_the_sequence_check_lets_a_connection_through(
    netns_pair: NetnsPair,
    gateway_factory: Callable[..., Gateway],
    strongswan_factory: Callable[..., StrongSwan],
) -> None:
    tunnel = establish(netns_pair, gateway_factory, strongswan_factory, extra=FLOW)
    gateway, gw_ns, peer_ns = tunnel.gateway, tunnel.gw_ns, tunnel.peer_ns

    server = python(gw_ns, SERVER, GW_INNER, str(PORT), str(SIZE))
    assert server.next() == "listening"
    client = python(peer_ns, CLIENT, GW_INNER, str(PORT), PEER_INNER, str(SIZE))
    client_mss = int(client.next(timeout=30))
    server_mss = int(server.next(timeout=30))
    assert 0 < client_mss <= MSS  # the gateway's SYN-ACK, clamped on its way out
    assert 0 < server_mss <= MSS  # the peer's SYN, clamped on its way in
    # hundreds of segments of the size agreed each way, windows scaled past 64 KiB
    assert client.next(timeout=60) == f"echoed {SIZE}"
    assert server.next(timeout=30) == str(SIZE)
    counters = gateway.counters("kernel")
    assert counters.get("flow.opened", 0) >= 1
    assert counters.get("flow.drop.tcp_sequence", 0) == 0
