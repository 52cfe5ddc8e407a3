"""Benchmark: the ingress alone under a flood of IKE_SA_INIT on loopback.

One embedded nats-server, `--instances` ingress processes (`ikefarm service ingress`,
as `up` starts them), and in this process a stand-in worker that answers every
`Datagram` at once with a small `OutboundDatagram` (no engine, no DH: what is
measured is ingress and the bus, not the worker; it runs in a process of its own).
A sender thread offers
IKE_SA_INIT requests (each its own SPIi, from `--peers` source ports) at each
`--rate` for `--duration` seconds; a receiver thread matches the answers by SPIi.

Per rate it prints one JSON line: offered and answered per second, the latency of
the answers (median, 90th percentile), the CPU the ingress processes spent per
answer, and the ingress drop counters (backlog classes, the kernel's socket drops).
Cookies and per-peer limits are off, as in the issue 9 measurements.

Run from the repository root: .venv/bin/python ops/bench/ingress_flood.py [--rate N ...]
`--code DIR` runs the ingress from another checkout (`git worktree` or `git archive` of
another commit) to compare before and after on the same machine; `--loop asyncio --loop
uvloop --repeat N` runs the ingress on each event loop in turn, interleaved, and prints
the medians per loop (uvloop must be installed for that: `pip install uvloop`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import nats  # noqa: E402

from ikefarm.proto import envelope, subjects  # noqa: E402
from ikefarm.proto.messages import (  # noqa: E402
    Datagram,
    IkeLoad,
    OutboundDatagram,
    Stats,
    StatsRequest,
)
from ikefarm.shared.bus.embedded import EmbeddedNats  # noqa: E402
from tests.dos_helpers import init_requests  # noqa: E402

HERE = "127.0.0.1"
KEPT_COUNTERS = ("dropped", "gate.dropped", "received", "read_batches", "routed", "sent")


def requests(count: int) -> list[bytes]:
    """`count` IKE_SA_INIT requests (x25519 KE, a nonce), SPIi = 0x5e + the index."""
    (template,) = init_requests(1)
    return [(0x5E << 56 | index).to_bytes(8, "big") + template[8:] for index in range(count)]


def index_of(data: bytes) -> int:
    return int.from_bytes(data[:8], "big") & ((1 << 56) - 1)


def config_text(ike_port: int, natt_port: int, state: Path) -> str:
    return (
        f'[farm]\nstate-dir = "{state}"\n'
        f'[ingress]\nlisten = ["{HERE}"]\nike-port = {ike_port}\nnatt-port = {natt_port}\n'
        "[ike.global-options.dos-protection]\ncookie-threshold = 0\nblock-threshold = 0\n"
        "[ike.session.half-open]\nmax-count = 10000\n"
    )


def free_udp_ports(count: int) -> list[int]:
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(count)]
    try:
        for sock in socks:
            sock.bind((HERE, 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class StandInWorker:
    """Answers every datagram ingress publishes; reports shard 0 so ingress forwards."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.answered = 0
        self.inits: dict[str, int] = {}  # answered per ingress: its pending inits go down

    async def run(self) -> None:
        nc = await nats.connect(self.url)

        async def answer(msg: Any) -> None:
            datagram = envelope.unpack(msg.data, Datagram)
            reply = OutboundDatagram(
                datagram.local_address,
                datagram.local_port,
                datagram.remote_address,
                datagram.remote_port,
                datagram.data[:8] + bytes(28),
            )
            self.answered += 1
            self.inits[datagram.via] = self.inits.get(datagram.via, 0) + 1
            await nc.publish(subjects.INGRESS_SEND, envelope.pack(reply))

        await nc.subscribe(subjects.IKE_INIT, cb=answer)
        seq = 0
        while True:  # until the bench terminates this process
            seq += 1
            load = IkeLoad("stand-in-0", 0, seq, 0, 0, 1.0, inits=dict(self.inits))
            await nc.publish(subjects.IKE_LOAD, envelope.pack(load))
            await asyncio.sleep(0.1)


def flood(
    target: tuple[str, int], rate: int, duration: float, peers: int, messages: list[bytes]
) -> dict[str, Any]:
    socks = []
    for _ in range(peers):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((HERE, 0))
        sock.setblocking(False)
        socks.append(sock)
    count = min(len(messages), int(rate * duration))
    sent_at = [0.0] * count
    latencies: list[float] = []
    done = threading.Event()

    def receive() -> None:
        while not done.is_set():
            ready, _, _ = select.select(socks, [], [], 0.1)
            now = time.monotonic()
            for sock in ready:
                while True:
                    try:
                        data = sock.recv(2048)
                    except BlockingIOError:
                        break
                    index = index_of(data)
                    if index < count and sent_at[index]:
                        latencies.append(now - sent_at[index])

    receiver = threading.Thread(target=receive, daemon=True)
    receiver.start()
    start = time.monotonic()
    for index in range(count):
        due = start + index / rate
        delay = due - time.monotonic()
        if delay > 0.0005:
            time.sleep(delay)
        sent_at[index] = time.monotonic()
        with contextlib.suppress(BlockingIOError):
            socks[index % peers].sendto(messages[index], target)
    sent_time = time.monotonic() - start
    time.sleep(3.0)  # answers still under way
    done.set()
    receiver.join()
    for sock in socks:
        sock.close()
    latencies.sort()
    return {
        "offered_per_s": round(count / sent_time),
        "sent": count,
        "answered": len(latencies),
        "answered_per_s": round(len(latencies) / sent_time),
        "answered_share": round(len(latencies) / count, 3) if count else 0,
        "latency_ms_median": round(statistics.median(latencies) * 1000, 2) if latencies else None,
        "latency_ms_p90": round(latencies[int(len(latencies) * 0.9)] * 1000, 2)
        if latencies
        else None,
    }


async def ingress_counters(url: str, instances: list[str]) -> dict[str, Any]:
    nc = await nats.connect(url)
    out: dict[str, Any] = {}
    try:
        for instance in instances:
            reply = await nc.request(
                subjects.instance_endpoint("ingress", instance, "stats"),
                envelope.pack(StatsRequest()),
                timeout=5,
            )
            stats = envelope.unpack_reply(reply.data, Stats)
            keep = {
                k: v
                for k, v in stats.counters.items()
                if k.startswith(
                    ("dropped", "gate.dropped", "received", "read_batches", "routed", "sent")
                )
            }
            out[instance] = {"counters": keep, "socket": stats.gauges.get("socket")}
    finally:
        await nc.close()
    return out


# the ingress's entry point with uvloop's event loop policy (`--loop uvloop`): the same
# `ikefarm service ingress`, only asyncio.run() makes a uvloop loop
UVLOOP_MAIN = (
    "import asyncio, sys, uvloop; asyncio.set_event_loop_policy(uvloop.EventLoopPolicy()); "
    "from ikefarm.shared.cli.main import main; sys.argv[0] = 'ikefarm'; sys.exit(main())"
)


def run_once(args: argparse.Namespace, rates: list[int], loop: str) -> list[dict[str, Any]]:
    """A fresh broker, ingress processes and stand-in worker; each rate in turn."""
    out = []
    messages = requests(int(max(rates) * args.duration) + 1)
    with tempfile.TemporaryDirectory(prefix="ingress-flood-") as tmp:
        base = Path(tmp)
        broker = EmbeddedNats(base / "nats")
        broker.start()
        children: list[subprocess.Popen[bytes]] = []
        helpers: list[subprocess.Popen[bytes]] = []
        environ = dict(os.environ, IKEFARM_LOG_LEVEL="0")
        if args.code is not None:
            package = base / "code" / "ikefarm"
            package.mkdir(parents=True)
            (package / "__init__.py").write_text("")
            for folder in ("proto", "shared", "services"):
                (package / folder).symlink_to(args.code.resolve() / folder)
            environ["PYTHONPATH"] = str(base / "code")
        try:
            ike_port, natt_port = free_udp_ports(2)
            config = base / "ingress.toml"
            config.write_text(config_text(ike_port, natt_port, base / "state"))
            names = [f"ingress-{i}" for i in range(args.instances)]
            for name in names:
                profile = ["-m", "cProfile", "-o", str(args.profile)] if args.profile else []
                if name != names[0]:
                    profile = []
                entry = ["-m", "ikefarm.shared.cli.main"]
                if loop == "uvloop":
                    entry = ["-c", UVLOOP_MAIN]
                argv = [sys.executable, *profile, *entry, "service", "ingress"]
                argv += ["-c", str(config), "--nats", broker.url, "--instance", name]
                children.append(subprocess.Popen(argv, env=environ, stdin=subprocess.DEVNULL))
            stand_in = [sys.executable, __file__, "--stand-in", broker.url]
            helpers.append(subprocess.Popen(stand_in, stdin=subprocess.DEVNULL))
            time.sleep(3.0)  # ingress started, has heard the stand-in's load report
            for rate in rates:
                cpu_before = sum(cpu_seconds(c.pid) for c in children)
                result = flood((HERE, ike_port), rate, args.duration, args.peers, messages)
                cpu = sum(cpu_seconds(c.pid) for c in children) - cpu_before
                result["ingress_cpu_s"] = round(cpu, 2)
                result["ingress_cpu_us_per_answer"] = (
                    round(cpu / result["answered"] * 1e6) if result["answered"] else None
                )
                result["rate"] = rate
                result["instances"] = args.instances
                result["loop"] = loop
                result["loadavg"] = Path("/proc/loadavg").read_text().split()[:3]
                result["ingress"] = asyncio.run(ingress_counters(broker.url, names))
                print(json.dumps(result), flush=True)
                out.append(result)
                messages = requests(int(max(rates) * args.duration) + 1)  # fresh SPIs
        finally:
            for child in [*children, *helpers]:
                child.terminate()
            for child in children:
                try:
                    child.wait(5)
                except subprocess.TimeoutExpired:
                    child.kill()
            broker.stop()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=int, action="append", help="offered IKE_SA_INIT/s")
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--peers", type=int, default=64, help="source ports")
    parser.add_argument("--instances", type=int, default=1, help="ingress processes")
    parser.add_argument("--code", type=Path, help="run the ingress from this checkout")
    parser.add_argument("--profile", type=Path, help="cProfile the first ingress into FILE")
    parser.add_argument(
        "--loop",
        action="append",
        choices=["asyncio", "uvloop"],
        help="event loop of the ingress (repeatable: each in turn, interleaved by --repeat)",
    )
    parser.add_argument("--repeat", type=int, default=1, help="rounds over the loops")
    parser.add_argument("--stand-in", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stand_in:
        asyncio.run(StandInWorker(args.stand_in).run())
        return 0
    rates = args.rate or [1000, 4000, 10000]
    loops = args.loop or ["asyncio"]
    results: list[dict[str, Any]] = []
    for round_ in range(args.repeat):
        for loop in loops if round_ % 2 == 0 else loops[::-1]:
            results += run_once(args, rates, loop)
    if len(loops) > 1:  # the median per loop and rate, over the rounds
        for rate in rates:
            for loop in loops:
                runs = [r for r in results if r["rate"] == rate and r["loop"] == loop]
                summary = {
                    "summary": True,
                    "rate": rate,
                    "loop": loop,
                    "runs": len(runs),
                    "answered_share": statistics.median(r["answered_share"] for r in runs),
                    "ingress_cpu_us_per_answer": statistics.median(
                        r["ingress_cpu_us_per_answer"] or 0 for r in runs
                    ),
                    "latency_ms_median": statistics.median(
                        r["latency_ms_median"] or 0 for r in runs
                    ),
                }
                print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
