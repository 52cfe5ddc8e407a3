"""The flow service's `netlink` source against the real kernel's conntrack, in namespaces.

Two namespaces on a veth; the gateway side loads an nftables table whose rules use `ct`, so
its kernel tracks connections there. Real traffic (ping, a UDP exchange, a TCP connection,
Python sockets) makes conntrack entries; `services/flow/conntrack.py` reads them through
pyroute2 (dump and NFCT events) into the session table, and ageing, clearing and refusal
delete them, read back with `conntrack -L` inside the namespace. The table's clock is the
test's own (sans-I/O), so nothing here waits for a timeout to run out.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from ikefarm.services.flow.conntrack import ConntrackSource
from ikefarm.shared.flow.settings import FlowSettings
from ikefarm.shared.flow.table import ESTABLISHED, Session, SessionTable
from tests.harness.netns import NetnsPair, make_pair
from tests.harness.prerequisites import missing

pytestmark = pytest.mark.kernel

# loopback stays untracked: the netlink service test runs its nats-server in the namespace
NFT_RULES = """
table inet ikefarm_flow_test {
    chain raw_prerouting { type filter hook prerouting priority raw; iifname "lo" notrack; }
    chain raw_output { type filter hook output priority raw; oifname "lo" notrack; }
    chain input { type filter hook input priority 0; ct state new counter; }
    chain output { type filter hook output priority 0; ct state new counter; }
}
"""
UDP_PORT, TCP_PORT = 5353, 2222
SERVER = f"""
import socket, threading
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind(("192.0.2.1", {UDP_PORT}))
tcp = socket.socket()
tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
tcp.bind(("192.0.2.1", {TCP_PORT}))
tcp.listen(8)
def udp_echo():
    while True:
        data, peer = udp.recvfrom(2048)
        udp.sendto(data * 2, peer)
def tcp_echo(conn):
    while data := conn.recv(2048):
        conn.sendall(data)
threading.Thread(target=udp_echo, daemon=True).start()
print("ready", flush=True)
while True:
    conn, _ = tcp.accept()
    threading.Thread(target=tcp_echo, args=(conn,), daemon=True).start()
"""
# the peer: one UDP exchange from a fixed port, a TCP connection that stays open
CLIENT = f"""
import socket, sys
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind(("192.0.2.2", 40001))
udp.settimeout(5)
udp.sendto(b"q" * 20, ("192.0.2.1", {UDP_PORT}))
udp.recvfrom(2048)
tcp = socket.create_connection(("192.0.2.1", {TCP_PORT}), timeout=5)
tcp.sendall(b"hello")
tcp.recv(100)
print("done", flush=True)
sys.stdin.read()  # keep the TCP connection until the test ends
"""


def _prerequisites() -> None:
    if os.geteuid() != 0:
        missing("needs root (network namespaces, ctnetlink)")
    for tool, package in (("ip", "iproute2"), ("nft", "nftables"), ("conntrack", "conntrack")):
        if shutil.which(tool) is None:
            missing(f"`{tool}` not found: apt-get install {package} (ops/install-test-peers)")


@pytest.fixture
def pair() -> Iterator[NetnsPair]:
    _prerequisites()
    with make_pair() as namespaces:
        namespaces.gw.run(["nft", "-f", "-"], input=NFT_RULES)
        namespaces.gw.run(["sysctl", "-qw", "net.netfilter.nf_conntrack_acct=1"])
        yield namespaces


class Clock:
    """The table's time, moved by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def started(
    pair: NetnsPair, settings: FlowSettings
) -> tuple[ConntrackSource, SessionTable, Clock]:
    table = SessionTable(settings)
    clock = Clock()
    source = ConntrackSource(table, netns=pair.gw.name, enable_accounting=False)
    await source.start(clock.now, clock=clock)
    return source, table, clock


@pytest.fixture
async def traffic(pair: NetnsPair) -> AsyncIterator[Any]:
    server = pair.gw.popen([sys.executable, "-c", SERVER], stdout=-1, text=True)
    assert server.stdout is not None and server.stdout.readline().strip() == "ready"
    yield pair
    server.kill()


def make_traffic(pair: NetnsPair) -> Any:
    assert pair.peer.ping("192.0.2.1")
    client = pair.peer.popen([sys.executable, "-c", CLIENT], stdout=-1, stdin=-1, text=True)
    assert client.stdout is not None and client.stdout.readline().strip() == "done"
    return client


def conntrack_list(pair: NetnsPair, protocol: str) -> str:
    return pair.gw.run(["conntrack", "-L", "-p", protocol], check=False).stdout


async def eventually(check: Any, timeout: float = 10.0) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not (result := await check()) and loop.time() < deadline:
        await asyncio.sleep(0.1)
    return result


def sessions_by_protocol(table: SessionTable) -> dict[int, Session]:
    return {s.protocol: s for s in table.by_id.values()}


async def test_flows_are_seen_with_state_and_counters(traffic: NetnsPair) -> None:
    source, table, clock = await started(traffic, FlowSettings())
    client = make_traffic(traffic)
    try:

        async def all_three() -> bool:
            await source.poll(clock.now, force=True)
            found = sessions_by_protocol(table)
            return {1, 6, 17} <= set(found) and found[6].packets_out > 0

        assert await eventually(all_three), (source.counters, table.counters, list(table.by_key))
        found = sessions_by_protocol(table)
        udp = found[17]
        assert udp.init == (17, "192.0.2.2", 40001, "192.0.2.1", UDP_PORT)
        assert (udp.packets_in, udp.packets_out) == (1, 1)
        assert udp.bytes_out > udp.bytes_in  # the server answered twice the octets
        assert found[6].state == ESTABLISHED and found[6].timeout == 1800
        assert found[1].init[1:4:2] == ("192.0.2.2", "192.0.2.1")
        assert source.counters["conntrack.events"] > 0
    finally:
        client.kill()
        await source.stop()


async def test_ageing_and_clearing_delete_the_conntrack_entries(traffic: NetnsPair) -> None:
    source, table, clock = await started(traffic, FlowSettings(udp=30, icmp=30))
    client = make_traffic(traffic)
    try:

        async def all_three() -> bool:
            await source.poll(clock.now, force=True)
            return {1, 6, 17} <= set(sessions_by_protocol(table))

        assert await eventually(all_three)
        assert "dport=5353" in conntrack_list(traffic, "udp")
        # the kernel would keep an unreplied-then-replied UDP entry for 30 s or more; the
        # table's UDP timeout ends it, and the entry is deleted
        clock.now += 31
        closed = table.tick(clock.now)
        assert {c.session.protocol for c in closed} == {1, 17}
        await source.closed(closed, [])
        assert "dport=5353" not in conntrack_list(traffic, "udp")
        assert "type=8" not in conntrack_list(traffic, "icmp")
        # clear: the TCP session goes and so does its entry
        from ikefarm.shared.flow.filters import parse_words

        cleared = table.clear(parse_words("clear", ["protocol", "tcp"])[0])
        assert len(cleared) == 1
        await source.closed(cleared, [])
        assert f"dport={TCP_PORT}" not in conntrack_list(traffic, "tcp")
        assert source.counters["conntrack.deleted"] == 3
    finally:
        client.kill()
        await source.stop()


async def test_max_sessions_refuses_and_deletes_the_new_entry(traffic: NetnsPair) -> None:
    source, table, clock = await started(traffic, FlowSettings(max_sessions=1))
    try:
        assert traffic.peer.ping("192.0.2.1")

        async def one() -> bool:
            await source.poll(clock.now, force=True)
            return len(table) == 1

        assert await eventually(one)
        client = make_traffic(traffic)
        try:

            async def refused() -> bool:
                await source.poll(clock.now, force=True)
                return table.counters.get("refused.max-sessions", 0) >= 2

            assert await eventually(refused)
            assert len(table) == 1 and set(sessions_by_protocol(table)) == {1}

            async def entries_gone() -> bool:
                return "dport=5353" not in conntrack_list(traffic, "udp")

            assert await eventually(entries_gone)
        finally:
            client.kill()
    finally:
        await source.stop()


async def test_a_session_due_with_traffic_since_the_last_dump_is_kept(
    traffic: NetnsPair,
) -> None:
    """Dumps of a large conntrack table come seldom: before a session is aged, the kernel is
    asked whether it saw traffic, and a session whose counters moved is refreshed instead."""
    source, table, clock = await started(traffic, FlowSettings(udp=30, icmp=30))
    client = make_traffic(traffic)
    try:

        async def udp_seen() -> bool:
            await source.poll(clock.now, force=True)
            return 17 in sessions_by_protocol(table)

        assert await eventually(udp_seen)
        udp = sessions_by_protocol(table)[17]
        # one more datagram of the same flow (from the same port, so the client goes first),
        # and no dump after it
        client.kill()
        client.wait()
        again = traffic.peer.run([sys.executable, "-c", RESEND], check=False, timeout=20)
        assert again.returncode == 0, again.stderr
        clock.now += 31
        due = table.due(clock.now)
        assert udp in due
        await source.verify(due, clock.now)
        closed = table.tick(clock.now)
        assert udp not in {c.session for c in closed} and udp.alive
        assert udp.packets_in == 2 and source.counters["conntrack.verify_refreshed"] >= 1
        assert "dport=5353" in conntrack_list(traffic, "udp")
        # with no more traffic it goes at its next deadline
        clock.now += 31
        await source.verify(table.due(clock.now), clock.now)
        assert udp in {c.session for c in table.tick(clock.now)}
    finally:
        client.kill()
        await source.stop()


RESEND = f"""
import socket
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
udp.bind(("192.0.2.2", 40001))
udp.settimeout(5)
udp.sendto(b"again", ("192.0.2.1", {UDP_PORT}))
udp.recvfrom(2048)
"""
