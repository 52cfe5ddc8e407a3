"""Flow sessions fed by the userspace dataplane, with strongSwan (kernel-libipsec) as the peer.

The setup of tests/interop/test_userspace_strongswan.py (strongSwan in "peer", inner
10.200.0.1, initiates to `ikefarm up` in "gw", inner 10.100.0.1, ESP in UDP), with
`[flow] source = "dataplane"` (docs/flow-sessions.md): the dataplane reports first packets,
TCP state changes and batched refreshes, and obeys the flow service's verdicts.

Acceptance: a ping, a TCP connection and a UDP exchange show as sessions with their
5-tuples, protocol timeouts and counters both ways; an unanswered SYN goes after
`tcp-initial-timeout`, a reset one is invalidated (`rst-invalidate-session`), a UDP
exchange after its application's inactivity timeout; with
`max-sessions` reached a new flow is refused and counted while the TCP connection goes on;
a port unreachable is counted in the UDP session it reports on and makes no session of its
own; `clear ... protocol udp` removes the UDP sessions only and prints how many;
clearing the TCP session cuts it (its next packets dropped and counted); `clear ... all`
leaves the tunnel session, and a cleared UDP flow's next packet opens a new session.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest

from tests.harness.gateway import Gateway
from tests.harness.netns import Namespace, NetnsPair, wait_for
from tests.harness.strongswan import StrongSwan
from tests.interop.test_responder_strongswan import peer_connection, psk_for

pytestmark = [pytest.mark.interop, pytest.mark.timeout(480)]

PSK = "userspace-flow-psk-8e41b0c6d2"
GW_INNER, PEER_INNER = "10.100.0.1", "10.200.0.1"
GW_OUTER, PEER_OUTER = "192.0.2.1", "192.0.2.2"
TCP_PORT, UDP_PORT, PROBE_PORT, CLOSED_PORT, RESET_PORT = 5202, 5203, 5204, 5205, 5206
# sessions this test watches age out live this long: a `show` slowed by load still sees them
SHORT = 10
MAX_SESSIONS = 4  # the tunnel, the ping, the TCP connection and one more
FLOW = f"""
[kernel]
backend = "userspace"
[flow]
source = "dataplane"
max-sessions = {MAX_SESSIONS}
[flow.tcp-session]
tcp-initial-timeout = 4
rst-invalidate-session = true
[flow.session-timeouts]
invalidated = {SHORT}
icmp = 300
udp = 300
tcp = 1800
[[flow.application]]
name = "probe"
protocol = "udp"
destination-port = {PROBE_PORT}
inactivity-timeout = {SHORT}
[[flow.application]]
name = "closed"
protocol = "udp"
destination-port = {CLOSED_PORT}
inactivity-timeout = {SHORT}
"""

# gw side: an echo server for one TCP connection
ECHO_SERVER = r"""
import socket, sys
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind((sys.argv[1], int(sys.argv[2])))
listener.listen(1)
print("listening", flush=True)
conn, _ = listener.accept()
while True:
    data = conn.recv(100)
    if not data:
        break
    conn.sendall(data)
"""

# peer side: one TCP connection; each line on stdin is sent and its echo awaited (3 s)
ECHO_CLIENT = r"""
import socket, sys
conn = socket.create_connection((sys.argv[1], int(sys.argv[2])), source_address=(sys.argv[3], 0),
                                timeout=20)
conn.settimeout(3)
print("connected", conn.getsockname()[1], flush=True)
for line in sys.stdin:
    try:
        conn.sendall(line.encode())
        print("echo" if conn.recv(100) else "closed", flush=True)
    except OSError:
        print("timeout", flush=True)
"""

# gw side: prints the source port of every UDP datagram it receives, and answers it
UDP_SINK = r"""
import socket, sys
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind((sys.argv[1], int(sys.argv[2])))
print("listening", flush=True)
while True:
    data, source = sock.recvfrom(100)
    print(source[1], flush=True)
    sock.sendto(data, source)
"""

SEND_UDP = r"""
import socket, sys
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind((sys.argv[1], int(sys.argv[2])))
sock.sendto(b"flow", (sys.argv[3], int(sys.argv[4])))
sock.settimeout(1)
try:
    sock.recv(100)  # the answer (so no port-unreachable goes back)
except OSError:
    pass
"""

# peer side: connects to argv[1]:argv[2] from argv[3] and resets the connection at once
RESET = r"""
import socket, struct, sys
conn = socket.create_connection((sys.argv[1], int(sys.argv[2])), source_address=(sys.argv[3], 0),
                                timeout=20)
conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
conn.close()
"""

# peer side: a connection attempt to port 81 from port argv[3] (unanswered),
# given up after argv[4] seconds (1 by default)
CONNECT = r"""
import socket, sys
try:
    socket.create_connection((sys.argv[1], 81), source_address=(sys.argv[2], int(sys.argv[3])),
                             timeout=float(sys.argv[4]) if len(sys.argv) > 4 else 1)
except OSError:
    pass
"""


def sessions(gateway: Gateway, *words: str) -> list[dict[str, Any]]:
    result = gateway.run_cli("show", "security", "flow", "session", *words, "--json")
    assert result.returncode == 0, result.stderr
    return list(json.loads(result.stdout))


def clear(gateway: Gateway, *words: str) -> int:
    result = gateway.run_cli("clear", "security", "flow", "session", *words, "--json")
    assert result.returncode == 0, result.stderr
    return int(json.loads(result.stdout)["cleared"])


def session_of(
    gateway: Gateway, protocol: int, match: dict[int, Any] | None = None
) -> dict[str, Any] | None:
    """The first non-tunnel session of `protocol` whose `In` tuple has these fields."""
    for row in sessions(gateway):
        if row["protocol"] != protocol or row["tunnel"]:
            continue
        if all(row["in"][index] == value for index, value in (match or {}).items()):
            return row
    return None


class Lines:
    """The stdout lines of a process, read by a thread; `next()` returns them in turn."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self.read = 0
        self.process = process
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.strip())

    def next(self, timeout: float = 10.0) -> str:
        wait_for(lambda: len(self.lines) > self.read, timeout=timeout, what="a line")
        self.read += 1
        return self.lines[self.read - 1]


def python(ns: Namespace, script: str, *args: str, stdin: bool = False) -> Lines:
    process = ns.popen(
        [sys.executable, "-c", script, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
        text=True,
    )
    return Lines(process)


@pytest.fixture
def tunnel(
    netns_pair: NetnsPair,
    gateway_factory: Callable[..., Gateway],
    strongswan_factory: Callable[..., StrongSwan],
) -> tuple[Gateway, Namespace, Namespace]:
    gw_ns, peer_ns = netns_pair.gw, netns_pair.peer
    gw_ns.add_address("lo", f"{GW_INNER}/32")
    peer_ns.add_address("lo", f"{PEER_INNER}/32")
    gateway = gateway_factory(gw_ns, psk=PSK, address=GW_OUTER, extra=FLOW, log_level=1)
    peer = strongswan_factory(peer_ns)
    connection = replace(peer_connection(), local_addrs=PEER_OUTER, remote_addrs=GW_OUTER)
    peer.load([connection], psks=[psk_for("a.peer.example", secret=PSK)])
    peer.initiate(child="c-net", timeout=20)
    (row,) = gateway.wait_sas(1)
    assert row["children"][0]["state"] == "installed"
    return gateway, gw_ns, peer_ns


def test_dataplane_sessions_show_age_refuse_and_clear(
    tunnel: tuple[Gateway, Namespace, Namespace],
) -> None:
    gateway, gw_ns, peer_ns = tunnel

    # the tunnel session: the ESP-in-UDP flow strongSwan's kernel-libipsec sends on 4500
    wait_for(lambda: sessions(gateway, "tunnel"), timeout=10, what="the tunnel session")
    (outer,) = sessions(gateway, "tunnel")
    assert outer["in"] == [17, PEER_OUTER, 4500, GW_OUTER, 4500] and outer["tunnel"]

    # a ping: one ICMP session, the echo identifier as ports, counters both ways
    assert peer_ns.ping(GW_INNER, src=PEER_INNER, count=3, timeout=10)
    wait_for(
        lambda: (row := session_of(gateway, 1)) is not None and row["packets_out"] >= 3,
        timeout=10,
        what="the ping's session with its counters",
    )
    ping = session_of(gateway, 1)
    assert ping is not None
    assert ping["in"][1] == PEER_INNER and ping["in"][3] == GW_INNER
    assert ping["in"][2] == ping["in"][4]  # the echo identifier
    assert ping["packets_in"] == 3 and ping["packets_out"] == 3
    assert ping["bytes_in"] == ping["bytes_out"] > 3 * 28
    assert 250 < ping["timeout"] <= 300  # [flow.session-timeouts] icmp
    assert (ping["in_interface"], ping["out_interface"], ping["policy"]) == (
        "rw",
        "ikefarm0",
        "net",
    )

    # a TCP connection: established after the handshake, TCP's timeout
    python(gw_ns, ECHO_SERVER, GW_INNER, str(TCP_PORT)).next()
    client = python(peer_ns, ECHO_CLIENT, GW_INNER, str(TCP_PORT), PEER_INNER, stdin=True)
    word, sport = client.next().split()
    assert word == "connected"
    stdin = client.process.stdin
    assert stdin is not None

    def echo() -> str:
        stdin.write("hello\n")
        stdin.flush()
        return client.next()

    assert echo() == "echo"
    key = [6, PEER_INNER, int(sport), GW_INNER, TCP_PORT]
    wait_for(
        lambda: (
            (row := session_of(gateway, 6, {2: int(sport)})) is not None
            and row["state"] == "established"
            and row["packets_out"] >= 2
        ),
        timeout=10,
        what="the TCP session established with counters",
    )
    tcp = session_of(gateway, 6, {2: int(sport)})
    assert tcp is not None and tcp["in"] == key and tcp["out"] == [6, *key[3:], *key[1:3]]
    assert 1700 < tcp["timeout"] <= 1800
    assert tcp["packets_in"] >= 3 and tcp["bytes_in"] > 0 and tcp["bytes_out"] > 0

    # an unanswered SYN (forwarding is off in gw: nothing answers 10.100.0.99): a session in
    # the handshake, gone after tcp-initial-timeout. The client retransmits its SYN for 8 s
    # (at 1, 3 and 7 s), each restarting the 4 s, so a `show` slowed by load still finds it;
    # the row is taken as first seen
    attempt = peer_ns.popen(
        [sys.executable, "-c", CONNECT, "10.100.0.99", PEER_INNER, "45000", "8"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    half = wait_for(
        lambda: session_of(gateway, 6, {3: "10.100.0.99"}),
        timeout=15,
        what="the half-open session",
    )
    assert half["state"] == "handshake" and half["timeout"] <= 4
    attempt.wait(timeout=30)
    wait_for(
        lambda: session_of(gateway, 6, {3: "10.100.0.99"}) is None,
        timeout=20,
        what="the half-open session to go",
    )
    assert gateway.counters("flow").get("closed.handshake-timeout", 0) >= 1

    # an established connection reset by the peer: the RST invalidates the session
    # (rst-invalidate-session), its timeout drops from TCP's 1800 s to the invalidated one
    python(gw_ns, ECHO_SERVER, GW_INNER, str(RESET_PORT)).next()
    peer_ns.run([sys.executable, "-c", RESET, GW_INNER, str(RESET_PORT), PEER_INNER], timeout=20)
    reset = wait_for(
        lambda: (row := session_of(gateway, 6, {4: RESET_PORT})) and not row["valid"] and row,
        timeout=10,
        what="the reset session, invalidated",
    )
    assert reset["timeout"] <= SHORT  # session-timeouts.invalidated
    wait_for(lambda: session_of(gateway, 6, {4: RESET_PORT}) is None, timeout=30, what="it to go")

    def send_udp(port: int, to: int = UDP_PORT) -> None:
        args = [PEER_INNER, str(port), GW_INNER, str(to)]
        peer_ns.run([sys.executable, "-c", SEND_UDP, *args], timeout=10)

    # a UDP exchange: one session, counters both ways, gone after the application's timeout
    probe = python(gw_ns, UDP_SINK, GW_INNER, str(PROBE_PORT))
    assert probe.next() == "listening"
    send_udp(7000, PROBE_PORT)
    assert probe.next() == "7000"
    exchange = wait_for(
        lambda: (row := session_of(gateway, 17, {4: PROBE_PORT})) and row["packets_out"] and row,
        timeout=10,
        what="the UDP exchange's session",
    )
    assert exchange["in"] == [17, PEER_INNER, 7000, GW_INNER, PROBE_PORT]
    assert exchange["packets_out"] == 1
    assert exchange["application"] == "probe" and exchange["timeout"] <= SHORT
    assert exchange["packets_in"] == 1 and exchange["bytes_in"] == exchange["bytes_out"] == 32
    wait_for(
        lambda: session_of(gateway, 17, {4: PROBE_PORT}) is None,
        timeout=30,
        what="the UDP session to age out",
    )

    # a datagram to a closed port: gw's kernel answers with a port unreachable, which is
    # counted in the UDP session it reports on (RFC 792), not shown as an ICMP session
    send_udp(7003, CLOSED_PORT)
    unreachable = wait_for(
        lambda: (row := session_of(gateway, 17, {4: CLOSED_PORT})) and row["packets_out"] and row,
        timeout=10,
        what="the port unreachable, in the UDP session",
    )
    assert unreachable["packets_in"] == unreachable["packets_out"] == 1
    assert unreachable["bytes_out"] == 20 + 8 + 32  # IP, ICMP, the datagram's 32 octets
    assert [row["in"] for row in sessions(gateway, "protocol", "icmp")] == [ping["in"]]
    assert gateway.counters("kernel").get("flow.drop.icmp_error", 0) == 0
    wait_for(
        lambda: session_of(gateway, 17, {4: CLOSED_PORT}) is None,
        timeout=30,
        what="that UDP session to age out",
    )

    # max-sessions: the tunnel, the ping, the TCP connection and one UDP flow fill the table
    sink = python(gw_ns, UDP_SINK, GW_INNER, str(UDP_PORT))
    assert sink.next() == "listening"

    send_udp(7001)
    assert sink.next() == "7001"
    wait_for(lambda: len(sessions(gateway)) == MAX_SESSIONS, timeout=10, what="a full table")
    time.sleep(0.5)  # the flow service's table_full verdict reaches the dataplane
    for _ in range(3):
        send_udp(7002)
    assert echo() == "echo"  # the existing TCP session keeps working
    send_udp(7001)  # and so does the existing UDP flow
    assert sink.next() == "7001"
    assert "7002" not in sink.lines
    kernel = gateway.counters("kernel")
    refused = kernel.get("flow.drop.table_full", 0) + kernel.get("flow.drop.refused", 0)
    assert refused >= 3
    assert len(sessions(gateway)) == MAX_SESSIONS

    # clear protocol udp: the UDP sessions go, and only they (the tunnel's ESP-in-UDP flow is
    # one: the dataplane reports it again with its next ESP packet), the count is printed
    cleared = gateway.run_cli("clear", "security", "flow", "session", "protocol", "udp")
    assert cleared.returncode == 0, cleared.stderr
    assert cleared.stdout.strip() == "2 active sessions cleared"
    assert sorted(row["in"][0] for row in sessions(gateway) if not row["tunnel"]) == [1, 6]
    assert echo() == "echo"  # the TCP connection goes on
    wait_for(lambda: sessions(gateway, "tunnel"), timeout=10, what="the tunnel session again")
    send_udp(7001)  # a cleared UDP flow's next packet opens a new session
    assert sink.next() == "7001"
    wait_for(
        lambda: session_of(gateway, 17, {2: 7001}) is not None, timeout=10, what="a new session"
    )

    # clear the TCP session: its next packets are dropped and counted, the connection is cut
    dropped = gateway.counters("kernel").get("flow.drop.no_syn", 0)
    assert clear(gateway, "protocol", "tcp") == 1
    wait_for(lambda: gateway.counters("flow").get("cleared", 0) >= 1, timeout=5, what="the clear")
    time.sleep(0.5)  # the verdict reaches the dataplane
    assert echo() == "timeout"
    assert gateway.counters("kernel").get("flow.drop.no_syn", 0) > dropped
    assert session_of(gateway, 6) is None

    # clear all: the ping and UDP sessions go, the tunnel session stays
    udp_id = session_of(gateway, 17, {2: 7001})["session_id"]  # type: ignore[index]
    assert clear(gateway, "all") == 2
    remaining = sessions(gateway)
    assert [row["tunnel"] for row in remaining] == [True]
    assert remaining[0]["in"] == outer["in"]

    # a cleared UDP flow's next packet opens a new session
    time.sleep(0.5)  # the verdicts reach the dataplane
    send_udp(7001)
    assert sink.next() == "7001"
    wait_for(
        lambda: session_of(gateway, 17, {2: 7001}) is not None, timeout=10, what="a new session"
    )
    assert session_of(gateway, 17, {2: 7001})["session_id"] > udp_id  # type: ignore[index]
