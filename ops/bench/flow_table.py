"""Benchmark of the flow-session table (shared/flow/table.py; docs/flow-sessions.md).

One process, one core, the sans-I/O table driven directly: what the flow service's own work
costs, without the bus. Memory is the growth of the process's resident set while the table
is filled, divided by the sessions held. The conntrack part feeds `apply_dump` (the mapping
the netlink source runs on every dump) with N synthetic entries: the kernel round trip of a
real dump is not included.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import ipaddress
import os
import resource
import subprocess
import sys
import time
from datetime import UTC, datetime

from ikefarm.shared.flow.conntrack import CtEntry, apply_dump
from ikefarm.shared.flow.settings import FlowSettings
from ikefarm.shared.flow.table import SessionTable


def rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def key(n: int) -> tuple[int, str, int, str, int]:
    """Distinct flows from 2^16 hosts to 2^8 servers: addresses are shared strings, as
    a dataplane's decoder would intern them."""
    return (17, HOSTS[n & 0xFFFF], 1024 + (n >> 16), SERVERS[n % 251], 53)


HOSTS = [str(ipaddress.ip_address(0x0A000000 + i)) for i in range(1 << 16)]
SERVERS = [str(ipaddress.ip_address(0xC6336400 + i)) for i in range(256)]


def timed(work) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def bench(sessions: int, conntrack: int) -> list[tuple[str, str]]:
    gc.disable()
    table = SessionTable(FlowSettings(max_sessions=sessions + 1, udp=60))
    keys = [key(n) for n in range(sessions)]
    base = rss()

    def fill() -> None:
        for k in keys:
            table.open(k, 0.0)

    opened = timed(fill)
    held = rss() - base
    results = [
        ("sessions held", f"{len(table):,}"),
        ("bytes per session (RSS growth / sessions)", f"{held / sessions:.0f}"),
        ("opens per second", f"{sessions / opened:,.0f}"),
    ]

    def refresh() -> None:
        for k in keys:
            table.refresh(k, 30.0, (1, 64, 1, 64))

    refreshed = timed(refresh)
    results.append(("refreshes per second", f"{sessions / refreshed:,.0f}"))
    idle = timed(lambda: table.tick(59.0))
    results.append(
        (f"timer pass, {sessions:,} idle sessions, nothing due (ms)", f"{idle * 1e3:.3f}")
    )
    # at 60 every session's first timer comes due and is re-armed at 90 (they were refreshed)
    rearm = timed(lambda: table.tick(60.0))
    results.append((f"timer pass re-arming {sessions:,} refreshed sessions (s)", f"{rearm:.2f}"))
    aged = timed(lambda: table.tick(90.0))
    results.append((f"timer pass ageing out {sessions:,} sessions (s)", f"{aged:.2f}"))
    assert len(table) == 0
    if conntrack:
        table = SessionTable(FlowSettings(max_sessions=conntrack + 1))
        entries = [
            CtEntry(k, (k[0], k[3], k[4], k[1], k[2]), None, (1, 64, 1, 64), 30)
            for k in keys[:conntrack]
        ]
        first = timed(lambda: apply_dump(table, entries, 0.0, ()))
        moved = [CtEntry(e.init, e.reply, None, (2, 128, 2, 128), 30) for e in entries]
        again = timed(lambda: apply_dump(table, moved, 1.0, ()))
        results.append((f"conntrack dump of {conntrack:,} entries, first (s)", f"{first:.2f}"))
        results.append((f"conntrack dump of {conntrack:,} entries, all moved (s)", f"{again:.2f}"))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    results.append(("peak RSS (MiB)", f"{usage.ru_maxrss / 1024:.0f}"))
    return results


NFT = """table inet bench {
    chain raw_output { type filter hook output priority raw; oifname "lo" notrack; }
    chain input { type filter hook input priority 0; ct state new counter; }
}
"""
SENDER = """
import socket, sys
count = int(sys.argv[1])
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for n in range(count):
    sock.sendto(b"x", ("198.51.100.1" if n % 2 else "198.51.100.3", 1 + (n // 2) % 65535))
"""


def _ip(*argv: str, stdin: str | None = None) -> None:
    subprocess.run(["ip", *argv], check=True, input=stdin, text=True, capture_output=True)


def bench_kernel(entries: int) -> list[tuple[str, str]]:
    """Real conntrack: `entries` UDP flows sent into a namespace whose nftables rule makes the
    kernel track them; the netlink source follows their NFCT events, then dumps them all."""
    from ikefarm.services.flow.conntrack import ConntrackSource

    gw, peer = f"ikfbench-gw-{os.getpid()}", f"ikfbench-pe-{os.getpid()}"
    _ip("netns", "add", gw)
    _ip("netns", "add", peer)
    try:
        _ip("link", "add", "b0", "netns", gw, "type", "veth", "peer", "name", "b1", "netns", peer)
        for ns, dev, addresses in ((gw, "b0", ("198.51.100.1/24", "198.51.100.3/24")),
                                   (peer, "b1", ("198.51.100.2/24",))):  # fmt: skip
            for address in addresses:
                _ip("-n", ns, "addr", "add", address, "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
        _ip("netns", "exec", gw, "nft", "-f", "-", stdin=NFT)
        _ip("netns", "exec", gw, "sysctl", "-qw", "net.netfilter.nf_conntrack_udp_timeout=600")

        async def run() -> list[tuple[str, str]]:
            table = SessionTable(FlowSettings(max_sessions=entries * 2))
            source = ConntrackSource(table, netns=gw, enable_accounting=False)
            await source.start(0.0)
            try:
                start = time.perf_counter()
                sender = await asyncio.create_subprocess_exec(
                    "ip", "netns", "exec", peer, sys.executable, "-c", SENDER, str(entries)
                )
                await sender.wait()
                sent = time.perf_counter() - start
                while len(table) < entries and time.perf_counter() - start < 300:
                    await source.poll(time.perf_counter() - start)  # what the ticker does
                    await asyncio.sleep(0.25)
                evented = time.perf_counter() - start
                lost = source.counters["conntrack.conntrack_events_lost"]
                held = len(table)
                polled = time.perf_counter()
                await source.poll(1.0, force=True)
                polled = time.perf_counter() - polled
                return [
                    (f"kernel conntrack: {entries:,} UDP flows sent (s)", f"{sent:.2f}"),
                    ("kernel conntrack: all in the table after (s)", f"{evented:.2f}"),
                    ("kernel conntrack: sessions held / event overruns", f"{held:,} / {lost}"),
                    (
                        f"kernel conntrack: dump + apply of {len(table):,} entries (s)",
                        f"{polled:.2f}",
                    ),
                ]
            finally:
                await source.stop()

        return asyncio.run(run())
    finally:
        for ns in (peer, gw):
            with contextlib.suppress(subprocess.CalledProcessError):
                _ip("netns", "del", ns)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sessions", type=int, default=1_000_000)
    parser.add_argument("--conntrack", type=int, default=100_000)
    parser.add_argument(
        "--kernel", type=int, default=0, help="also N real conntrack entries (root, netns)"
    )
    parser.add_argument("--results", help="append a section to this markdown file")
    args = parser.parse_args()
    results = bench(args.sessions, args.conntrack)
    if args.kernel:
        results += bench_kernel(args.kernel)
    lines = [
        f"## {datetime.now(UTC):%Y-%m-%d %H:%M} UTC: flow-session table",
        "",
        f"Command: `ops/bench/flow-table --sessions {args.sessions} --conntrack {args.conntrack}"
        + (f" --kernel {args.kernel}" if args.kernel else "")
        + (f" --results {args.results}`" if args.results else "`"),
        "",
        "| measure | value |",
        "|---|---|",
        *(f"| {name} | {value} |" for name, value in results),
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.results:
        with open(args.results, "a") as out:
            out.write("\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
