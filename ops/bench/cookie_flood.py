"""Benchmark: cookies under a spoofed IKE_SA_INIT flood, ikefarm beside strongSwan.

One run, one flood, two responders receiving the same packets:

    peer ns (flooder, strongSwan initiator) --192.0.2.0/24--   gw ns: `ikefarm up`
                                            --198.51.100.0/24-- ss ns: strongSwan responder

The flooder (tests/harness/flooder.py) sends every spoofed IKE_SA_INIT (sources
in 198.18.0.0/15, RFC 2544's benchmark range) to both responders and counts the
N(COOKIE) answers that come back on the wire. Meanwhile the strongSwan initiator
makes legitimate handshakes to each responder in turn (initiate, then terminate).
Both responders use the same thresholds: cookies from 10 half-open SAs, at most 5
half-open SAs per peer (ikefarm: cookie-threshold, block-threshold; strongSwan:
charon.cookie_threshold, charon.block_threshold).

Run as root from the repository root: ops/bench/cookie-flood [--rate N] [--duration S]
Prints one JSON object; with --results FILE it appends a Markdown section there.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.harness.flooder import BENCHMARK_RANGE  # noqa: E402
from tests.harness.gateway import Gateway  # noqa: E402
from tests.harness.netns import Namespace, link, make_pair, wait_for  # noqa: E402
from tests.harness.strongswan import Child, Connection, Psk, StrongSwan  # noqa: E402

PSK = "bench-psk-6d1f0a93c2b7e845"
IKEFARM, STRONGSWAN = "192.0.2.1", "198.51.100.1"
PEER_TO_SS = "198.51.100.2"
PROPOSAL = "aes256gcm16-prfsha384-x25519"
COOKIE_THRESHOLD = 10
BLOCK_THRESHOLD = 5


def initiator_connection(name: str, remote: str) -> Connection:
    return Connection(
        name=name,
        local_addrs="0.0.0.0",
        remote_addrs=remote,
        local_id="a.peer.example",
        remote_id="gw.example",
        proposals=PROPOSAL,
        children=[
            Child(
                name=f"{name}-net",
                local_ts="10.200.0.0/24",
                remote_ts="10.100.0.0/24",
                esp_proposals="aes256gcm16",
            )
        ],
    )


def responder_connection() -> Connection:
    return Connection(
        name="rw",
        local_addrs=STRONGSWAN,
        remote_addrs="%any",
        local_id="gw.example",
        remote_id="%any",
        proposals=PROPOSAL,
        children=[
            Child(
                name="net",
                local_ts="10.100.0.0/24",
                remote_ts="10.200.0.0/16",
                esp_proposals="aes256gcm16",
            )
        ],
    )


def start_flood(ns: Namespace, rate: float, duration: float) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "tests.harness.flooder", "--listen", "--linger", "2"]
    argv += ["--target", IKEFARM, "--target", STRONGSWAN]
    argv += ["--rate", str(rate), "--duration", str(duration)]
    argv += ["--count", str(int(rate * duration) + 1)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return ns.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)


def handshakes(
    initiator: StrongSwan, until: float, timeout: float, names: tuple[str, str]
) -> dict[str, dict[str, Any]]:
    """Initiate to each responder in turn until `until`; each attempt then terminates."""
    stats = {name: {"attempts": 0, "established": 0, "seconds": []} for name in names}
    while time.monotonic() < until:
        for name in names:
            started = time.monotonic()
            result = initiator.initiate(child=f"{name}-net", timeout=timeout, check=False)
            took = time.monotonic() - started
            stats[name]["attempts"] += 1
            if result.returncode == 0:
                stats[name]["established"] += 1
                stats[name]["seconds"].append(round(took, 3))
            initiator.terminate(ike=name, force=True, timeout=5, check=False)
    return stats


def run(rate: float, duration: float, timeout: float, workdir: Path) -> dict[str, Any]:
    pair = make_pair()
    ss_ns = Namespace("ssresp")
    gateway: Gateway | None = None
    peers: list[StrongSwan] = []
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
            extra=(
                "[ike.global-options.dos-protection]\n"
                f"cookie-threshold = {COOKIE_THRESHOLD}\nblock-threshold = {BLOCK_THRESHOLD}\n"
            ),
        )
        gateway.start()
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
        initiator = StrongSwan(pair.peer, workdir / "strongswan-initiator", name="initiator")
        peers.append(initiator)
        initiator.start()
        initiator.load(
            [initiator_connection("ikf", IKEFARM), initiator_connection("ss", STRONGSWAN)],
            psks=[Psk(PSK, ["a.peer.example", "gw.example"])],
        )
        # without a flood: both answer (the baseline the success rate compares with)
        baseline = handshakes(initiator, time.monotonic() + 0.1, timeout, ("ikf", "ss"))

        flooder = start_flood(pair.peer, rate, duration)
        wait_for(
            lambda: gateway.counters("ingress").get("gate.cookie_sent", 0) > 0,  # type: ignore[union-attr]
            timeout=15,
            what="cookies on at ikefarm",
        )
        during = handshakes(initiator, time.monotonic() + duration - 1.5, timeout, ("ikf", "ss"))
        out, err = flooder.communicate(timeout=duration + 60)
        if flooder.returncode != 0:
            raise RuntimeError(f"flooder failed: {err}")
        flood = json.loads(out.strip().splitlines()[-1])
        counters = gateway.counters("ingress")
        ike = gateway.counters("ike")
    finally:
        for peer in reversed(peers):
            peer.stop()
        if gateway is not None:
            gateway.stop()
        ss_ns.close()
        pair.close()

    answers = flood.get("answers", {})
    elapsed = max(float(flood["elapsed"]), 1e-9)

    def side(address: str, name: str) -> dict[str, Any]:
        cookies = int(answers.get(f"{address} cookie", 0))
        stats = during[name]
        return {
            "cookies": cookies,
            "cookies_per_second": round(cookies / elapsed, 1),
            "cookie_answer_ratio": round(cookies / max(1, flood["sent"]), 3),
            "other_answers": {
                k.split(" ", 1)[1]: v
                for k, v in answers.items()
                if k.startswith(address) and not k.endswith("cookie")
            },
            "handshakes": f"{stats['established']}/{stats['attempts']}",
            "success_rate": round(stats["established"] / max(1, stats["attempts"]), 3),
            "baseline": f"{baseline[name]['established']}/{baseline[name]['attempts']}",
        }

    ikefarm = side(IKEFARM, "ikf")
    strongswan = side(STRONGSWAN, "ss")
    return {
        "flood": {k: flood[k] for k in ("sent", "packets", "elapsed", "sources", "errors")},
        "offered_rate_per_target": round(flood["sent"] / elapsed, 1),
        "ikefarm": ikefarm,
        "strongswan": strongswan,
        "ratio_cookies_per_second": round(
            ikefarm["cookies_per_second"] / max(1e-9, strongswan["cookies_per_second"]), 3
        ),
        "ratio_success_rate": round(
            ikefarm["success_rate"] / max(1e-9, strongswan["success_rate"]), 3
        ),
        "ikefarm_counters": {
            "gate.cookie_sent": counters.get("gate.cookie_sent", 0),
            "gate.cookie_valid": counters.get("gate.cookie_valid", 0),
            "gate.forwarded": counters.get("gate.forwarded", 0),
            # what ingress dropped from its backlog (services/ingress/backlog.py)
            "dropped.backlog": sum(
                v for k, v in counters.items() if k.startswith("dropped.backlog")
            ),
            "dh_computed": ike.get("dh_computed", 0),
        },
    }


def markdown(result: dict[str, Any], command: str) -> str:
    i, s = result["ikefarm"], result["strongswan"]
    return (
        f"\n## {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n\n"
        f"Command: `{command}`\n\n"
        f"Flood: {result['flood']['sent']} IKE_SA_INIT to each responder from "
        f"{result['flood']['sources']} spoofed sources in {result['flood']['elapsed']} s "
        f"({result['offered_rate_per_target']}/s offered to each).\n\n"
        "| | ikefarm | strongSwan 5.9.8 | ikefarm / strongSwan |\n|---|---|---|---|\n"
        f"| cookie responses per second | {i['cookies_per_second']} | "
        f"{s['cookies_per_second']} | {result['ratio_cookies_per_second']} |\n"
        f"| cookies per flood request | {i['cookie_answer_ratio']} | "
        f"{s['cookie_answer_ratio']} | |\n"
        f"| legitimate handshakes during the flood | {i['handshakes']} "
        f"({i['success_rate']}) | {s['handshakes']} ({s['success_rate']}) | "
        f"{result['ratio_success_rate']} |\n"
        f"| handshakes without flood | {i['baseline']} | {s['baseline']} | |\n\n"
        f"ikefarm counters: `{json.dumps(result['ikefarm_counters'])}`\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=1500.0, help="flood requests/s per target")
    parser.add_argument("--duration", type=float, default=20.0, help="flood seconds")
    parser.add_argument("--timeout", type=float, default=10.0, help="s per handshake attempt")
    parser.add_argument("--results", type=Path, help="append a Markdown section to this file")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("run as root: the benchmark makes network namespaces")
    # the keystore starts only with a master key; this farm's keystore is thrown away after
    # the run and holds nothing but the benchmark's PSK
    os.environ.setdefault("IKEFARM_MASTER_KEY", "0x" + b"cookie-flood-bench-only".hex())
    with tempfile.TemporaryDirectory(prefix="ikefarm-bench-") as tmp:
        result = run(args.rate, args.duration, args.timeout, Path(tmp))
    print(json.dumps(result, indent=2))
    if args.results is not None:
        command = "ops/bench/cookie-flood " + " ".join(argv if argv is not None else sys.argv[1:])
        with args.results.open("a") as handle:
            handle.write(markdown(result, command.strip()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
