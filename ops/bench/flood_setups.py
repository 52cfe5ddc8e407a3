"""Benchmark: legitimate setups under a spoofed IKE_SA_INIT flood, ikefarm beside strongSwan.

The issue 9 scenario: under a spoofed flood of `--rate` IKE_SA_INIT per second, a
strongSwan initiator (`retransmit_timeout = 1.0`, `retransmit_tries = 2`) sets up
`--setups` IKE SAs with a CHILD_SA, one after the other; each counts as a success
if it is up within `--deadline` seconds. Both responders run as an operator
would: cookies and the per-peer limit on, the same thresholds on both (ikefarm's
defaults, `cookie-threshold = 10` and `block-threshold = 5`; strongSwan's
`charon.cookie_threshold` and `charon.block_threshold` set alike).

    peer ns (flooder, strongSwan initiator) --192.0.2.0/24--   gw ns: `ikefarm up`
                                            --198.51.100.0/24-- ss ns: strongSwan responder

One run: the flood goes to one responder at a time (the other idle), ikefarm
then strongSwan, or the other way round on every second `--repeat`. The flooder
(tests/harness/flooder.py, `--procs` sender processes) sends from
198.18.0.0/15 (RFC 2544's benchmark range) and counts the N(COOKIE) answers on
the wire. Per responder: the setups (each's seconds), the flood actually offered,
cookie answers per second, the responder's CPU (every process in its namespace),
the datagrams its UDP sockets lost in the kernel (`RcvbufErrors`), and for ikefarm
the ingress counters that say what was dropped where.

Run as root from the repository root: ops/bench/flood-setups [--rate N] [--setups N]
Prints one JSON object; with --results FILE it appends a Markdown section there.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from ops.bench.cookie_flood import (  # noqa: E402
    BLOCK_THRESHOLD,
    COOKIE_THRESHOLD,
    IKEFARM,
    PEER_TO_SS,
    PSK,
    STRONGSWAN,
    initiator_connection,
    responder_connection,
)
from ops.bench.handshake import proc_cpu, proc_label, udp_drops  # noqa: E402
from tests.harness.flooder import BENCHMARK_RANGE  # noqa: E402
from tests.harness.gateway import Gateway  # noqa: E402
from tests.harness.netns import Namespace, link, make_pair, namespace_pids, wait_for  # noqa: E402
from tests.harness.strongswan import Psk, StrongSwan  # noqa: E402

RETRANSMIT_TIMEOUT = 1.0
RETRANSMIT_TRIES = 2
# ingress counters that say where a datagram went under the flood
INGRESS_COUNTERS = (
    "received",
    "gate.cookie_sent",
    "gate.cookie_valid",
    "gate.forwarded",
    "read_batches_full",
    "sent",
    "send_dropped.buffer_full",
)


def namespace_cpu(ns: Namespace, gateway: Gateway | None) -> dict[str, float]:
    """CPU seconds so far of every process in `ns`, by process label."""
    names: dict[int, str] = {}
    if gateway is not None:
        names = {pid: name.rstrip("0123456789-") for name, pid in gateway.service_pids().items()}
    out: dict[str, float] = {}
    for pid in namespace_pids(ns.name):
        label = proc_label(pid, names)
        out[label] = out.get(label, 0.0) + proc_cpu(pid)
    return out


def start_flood(ns: Namespace, target: str, rate: float, seconds: float, procs: int) -> Any:
    argv = [sys.executable, "-m", "tests.harness.flooder", "--listen", "--linger", "1", "--on-go"]
    argv += ["--target", target, "--rate", str(rate), "--duration", str(seconds)]
    argv += ["--count", str(int(rate * seconds) + 1), "--procs", str(procs)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = ns.popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.PIPE,
        env=env,
        text=True,
    )
    line = process.stdout.readline()
    if line.strip() != "ready":
        raise RuntimeError(f"flooder failed: {line} {process.stderr.read()}")
    process.stdin.write("go\n")
    process.stdin.flush()
    return process


def stop_flood(process: Any) -> dict[str, Any]:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=60)
    if process.returncode != 0:
        raise RuntimeError(f"flooder failed: {err}")
    return dict(json.loads(out.strip().splitlines()[-1]))


def setups(initiator: StrongSwan, name: str, count: int, deadline: float) -> list[float | None]:
    """`count` setups one after the other: seconds each took, None for a failure."""
    took: list[float | None] = []
    for _ in range(count):
        started = time.monotonic()
        result = initiator.initiate(child=f"{name}-net", timeout=deadline + 5, check=False)
        seconds = time.monotonic() - started
        took.append(round(seconds, 3) if result.returncode == 0 else None)
        initiator.terminate(ike=name, force=True, timeout=5, check=False)
        time.sleep(0.2)
    return took


def measure(
    name: str,
    target: str,
    ns: Namespace,
    flood_ns: Namespace,
    initiator: StrongSwan,
    gateway: Gateway | None,
    args: argparse.Namespace,
) -> dict[str, Any]:
    counters0 = gateway.counters("ingress") if gateway is not None else {}
    drops0 = udp_drops(ns)
    cpu0 = namespace_cpu(ns, gateway)
    seconds = args.lead + args.setups * (args.deadline + 3) + 5
    flooder = start_flood(flood_ns, target, args.rate, seconds, args.procs)
    try:
        time.sleep(args.lead)  # the flood is at full rate and the responder's cookies are on
        took = setups(initiator, name, args.setups, args.deadline)
    finally:
        flood = stop_flood(flooder)
    cpu = {k: round(v - cpu0.get(k, 0.0), 2) for k, v in namespace_cpu(ns, gateway).items()}
    drops = udp_drops(ns) - drops0
    elapsed = max(float(flood["elapsed"]), 1e-9)
    answers = flood.get("answers", {})
    cookies = int(answers.get(f"{target} cookie", 0))
    result: dict[str, Any] = {
        "setups": took,
        "succeeded": sum(1 for t in took if t is not None),
        "within_deadline": sum(1 for t in took if t is not None and t <= args.deadline),
        "slowest_s": max((t for t in took if t is not None), default=None),
        "flood_sent": flood["sent"],
        "flood_seconds": elapsed,
        "flood_rate": round(flood["sent"] / elapsed, 1),
        "cookies": cookies,
        "cookies_per_s": round(cookies / elapsed, 1),
        "cookie_answer_ratio": round(cookies / max(1, flood["sent"]), 3),
        "other_answers": {
            k.split(" ", 1)[1]: v
            for k, v in answers.items()
            if k.startswith(target) and not k.endswith("cookie")
        },
        "responder_cpu_s": cpu,
        "responder_cpu_per_flood_request_us": round(1e6 * sum(cpu.values()) / flood["sent"], 1),
        "udp_rcvbuf_drops": drops,
    }
    if gateway is not None:
        counters = gateway.counters("ingress")
        result["ingress_counters"] = {
            k: counters.get(k, 0) - counters0.get(k, 0)
            for k in sorted(counters)
            if k in INGRESS_COUNTERS or k.startswith(("dropped", "gate.dropped"))
        }
        result["dh_computed"] = gateway.counters("ike").get("dh_computed", 0)
    return result


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    pair = make_pair()
    ss_ns = Namespace("ssresp")
    gateway: Gateway | None = None
    peers: list[StrongSwan] = []
    load_start = Path("/proc/loadavg").read_text().split()[:3]
    runs: list[dict[str, Any]] = []
    try:
        link(pair.peer, ss_ns, PEER_TO_SS, STRONGSWAN)
        pair.gw.run(["ip", "route", "add", BENCHMARK_RANGE, "via", pair.peer_v4])
        ss_ns.run(["ip", "route", "add", BENCHMARK_RANGE, "via", PEER_TO_SS])
        pair.peer.run(["ip", "route", "add", "local", BENCHMARK_RANGE, "dev", "lo"])
        pair.peer.add_address("lo", "10.200.0.1/32")
        ss_ns.add_address("lo", "10.100.0.1/32")
        gateway = Gateway.psk_responder(
            pair.gw,
            workdir / "ikefarm",
            psk=PSK,
            log_level=0,
            workers=args.workers,
            extra=(
                "[ike.global-options.dos-protection]\n"
                f"cookie-threshold = {COOKIE_THRESHOLD}\nblock-threshold = {BLOCK_THRESHOLD}\n"
            ),
        )
        gateway.start(timeout=60)
        responder = StrongSwan(
            ss_ns,
            workdir / "strongswan-responder",
            name="ss-responder",
            cookie_threshold=COOKIE_THRESHOLD,
            block_threshold=BLOCK_THRESHOLD,
            log_levels={"default": 0, "ike": 0, "cfg": 0, "chd": 0, "net": 0, "enc": 0},
        )
        peers.append(responder)
        responder.start()
        responder.load([responder_connection()], psks=[Psk(PSK, ["gw.example", "%any"])])
        initiator = StrongSwan(
            pair.peer,
            workdir / "strongswan-initiator",
            name="initiator",
            retransmit_timeout=RETRANSMIT_TIMEOUT,
            retransmit_tries=RETRANSMIT_TRIES,
        )
        peers.append(initiator)
        initiator.start()
        initiator.load(
            [initiator_connection("ikf", IKEFARM), initiator_connection("ss", STRONGSWAN)],
            psks=[Psk(PSK, ["a.peer.example", "gw.example"])],
        )
        wait_for(
            lambda: initiator.initiate(child="ikf-net", timeout=10, check=False).returncode == 0,
            timeout=60,
            what="a setup to ikefarm without a flood",
        )
        initiator.terminate(ike="ikf", force=True, timeout=5, check=False)
        sides = [
            ("ikefarm", "ikf", IKEFARM, pair.gw, gateway),
            ("strongSwan", "ss", STRONGSWAN, ss_ns, None),
        ]
        for repetition in range(args.repeat):
            order = sides if repetition % 2 == 0 else sides[::-1]
            results: dict[str, Any] = {}
            for label, name, target, ns, gw in order:
                print(f"[{time.strftime('%H:%M:%S')}] {label}: flood", file=sys.stderr, flush=True)
                results[label] = measure(name, target, ns, pair.peer, initiator, gw, args)
                time.sleep(2)  # the half-open SAs of the flood's first seconds are answered
            runs.append(results)
    finally:
        for peer in reversed(peers):
            peer.stop()
        if gateway is not None:
            gateway.stop()
        ss_ns.close()
        pair.close()
    return {
        "rate": args.rate,
        "setups": args.setups,
        "deadline_s": args.deadline,
        "loadavg_start": load_start,
        "loadavg_end": Path("/proc/loadavg").read_text().split()[:3],
        "runs": runs,
    }


def markdown(result: dict[str, Any], command: str) -> str:
    lines = [
        f"\n## {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: setups under a spoofed "
        "flood\n",
        f"Command: `{command}`\n",
        f"Load average {' '.join(result['loadavg_start'])} at the start, "
        f"{' '.join(result['loadavg_end'])} at the end. strongSwan initiator with "
        f"`retransmit_timeout = {RETRANSMIT_TIMEOUT}`, `retransmit_tries = {RETRANSMIT_TRIES}`; "
        f"both responders with cookies from {COOKIE_THRESHOLD} half-open SAs and at most "
        f"{BLOCK_THRESHOLD} per peer.\n",
        "| repetition | responder | flood offered/s | setups within "
        f"{result['deadline_s']:g} s | each setup, s | cookie answers/s | responder CPU "
        "per flood request, us | lost in its socket buffers |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for number, run_ in enumerate(result["runs"], 1):
        for name, side in run_.items():
            each = ", ".join("failed" if t is None else f"{t:.2f}" for t in side["setups"])
            lines.append(
                f"| {number} | {name} | {side['flood_rate']} | "
                f"{side['within_deadline']}/{len(side['setups'])} | {each} | "
                f"{side['cookies_per_s']} | {side['responder_cpu_per_flood_request_us']} | "
                f"{side['udp_rcvbuf_drops']} |"
            )
    for number, run_ in enumerate(result["runs"], 1):
        side = run_.get("ikefarm")
        if side:
            lines.append(
                f"\nikefarm, repetition {number}: CPU s by process "
                f"`{json.dumps(side['responder_cpu_s'])}`, ingress counters "
                f"`{json.dumps(side['ingress_counters'])}`, DH computed {side['dh_computed']}."
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=20000.0, help="flood requests/s")
    parser.add_argument("--setups", type=int, default=5, help="setups per responder")
    parser.add_argument("--deadline", type=float, default=5.0, help="s a setup may take")
    parser.add_argument("--lead", type=float, default=3.0, help="s of flood before the setups")
    parser.add_argument("--procs", type=int, default=2, help="flooder sender processes")
    parser.add_argument("--workers", type=int, default=1, help="ikefarm ike workers")
    parser.add_argument("--repeat", type=int, default=1, help="interleaved repetitions")
    parser.add_argument("--results", type=Path, help="append a Markdown section to this file")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("run as root: the benchmark makes network namespaces")
    os.environ.setdefault("IKEFARM_MASTER_KEY", "0x" + b"flood-setups-bench-only".hex())
    with tempfile.TemporaryDirectory(prefix="ikefarm-bench-") as tmp:
        result = run(args, Path(tmp))
    print(json.dumps(result, indent=2))
    if args.results is not None:
        command = "ops/bench/flood-setups " + " ".join(argv if argv is not None else sys.argv[1:])
        with args.results.open("a") as handle:
            handle.write(markdown(result, command.strip()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
