"""Benchmark: traffic through the tunnel, ikefarm's userspace dataplane beside strongSwan's.

One run, one strongSwan initiator (kernel-libipsec) in the middle, two responders
measured one after the other with the same traffic and the same algorithms
(AES-GCM-256, ESP in UDP since kernel-libipsec forces it):

    gw ns: `ikefarm up`, backend = "userspace"  --192.0.2.0/24--    peer ns: strongSwan
    ss ns: strongSwan responder, kernel-libipsec --198.51.100.0/24-- initiator (10.200.0.1)

For each responder: a TCP download and upload of `--megabytes` (Mbit/s), a
flood of 1400-octet UDP packets from the peer for `--seconds` (packets/s
delivered), and the CPU time the responder's dataplane process (ikefarm's kernel
service, strongSwan's charon) spent per ESP packet during the TCP transfers.
The initiator is the same strongSwan for both, so the ratios compare the
responders; on this 2-core machine every process shares the cores: read the
ratios, not the absolute values.

Run as root from the repository root: ops/bench/tunnel-throughput [--megabytes N]
Prints one JSON object; with --results FILE it appends a Markdown section there.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.harness.gateway import Gateway  # noqa: E402
from tests.harness.netns import Namespace, link, make_pair  # noqa: E402
from tests.harness.strongswan import Child, Connection, Psk, StrongSwan  # noqa: E402
from tests.interop.test_userspace_strongswan import CLIENT, SERVER  # noqa: E402

PSK = "bench-psk-3a9e61c0d72f5b84"
IKEFARM, STRONGSWAN, PEER_TO_SS = "192.0.2.1", "198.51.100.1", "198.51.100.2"
INNER = {"ikf": "10.100.0.1", "ss": "10.101.0.1"}
PEER_INNER = "10.200.0.1"
PORT = 5301
UDP_PAYLOAD = 1400 - 28  # a 1400-octet inner IPv4 packet

UDP_SINK = r"""
import socket, sys, time
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
sock.bind((sys.argv[1], int(sys.argv[2])))
sock.settimeout(3)
print("ready", flush=True)
count, first, last = 0, None, None
try:
    while True:
        sock.recv(2048)
        last = time.monotonic()
        first = first or last
        count += 1
except socket.timeout:
    pass
print(count, (last - first) if count > 1 else 0.0, flush=True)
"""

UDP_FLOOD = r"""
import socket, sys, time
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
payload = bytes(int(sys.argv[3]))
end = time.monotonic() + float(sys.argv[4])
sent = 0
while time.monotonic() < end:
    for _ in range(64):
        try:
            sock.sendto(payload, (sys.argv[1], int(sys.argv[2])))
            sent += 1
        except OSError:
            pass
print(sent, flush=True)
"""


def connection(name: str, remote: str, remote_ts: str) -> Connection:
    return Connection(
        name=name,
        local_addrs="0.0.0.0",
        remote_addrs=remote,
        local_id="a.peer.example",
        remote_id="gw.example",
        proposals="aes256gcm16-prfsha384-x25519",
        children=[
            Child(
                name=f"{name}-net",
                local_ts="10.200.0.0/24",
                remote_ts=remote_ts,
                esp_proposals="aes256gcm16",
            )
        ],
    )


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tcp(server_ns: Namespace, client_ns: Namespace, address: str, size: int, upload: bool) -> float:
    """Mbit/s of one transfer of `size` octets, timed at the client."""
    server_mode, client_mode = ("sink", "send") if upload else ("send", "sink")
    args = [address, str(PORT), str(size)]
    server = server_ns.popen(
        [sys.executable, "-c", SERVER, server_mode, *args], stdout=-1, stderr=-1, text=True
    )
    assert server.stdout is not None and server.stdout.readline().strip() == "listening"
    started = time.monotonic()
    client = client_ns.run([sys.executable, "-c", CLIENT, client_mode, *args], timeout=600)
    elapsed = time.monotonic() - started
    out, _err = server.communicate(timeout=60)
    if out.strip() != client.stdout.strip():
        raise RuntimeError("the transfer arrived altered")
    return size * 8 / elapsed / 1e6


def udp(target_ns: Namespace, peer_ns: Namespace, address: str, seconds: float) -> dict[str, Any]:
    sink = target_ns.popen(
        [sys.executable, "-c", UDP_SINK, address, str(PORT)], stdout=-1, stderr=-1, text=True
    )
    assert sink.stdout is not None and sink.stdout.readline().strip() == "ready"
    flood = [sys.executable, "-c", UDP_FLOOD, address, str(PORT), str(UDP_PAYLOAD), str(seconds)]
    sent = int(peer_ns.run(flood, timeout=seconds + 30).stdout.split()[0])
    out, _err = sink.communicate(timeout=seconds + 30)
    received, span = out.split()
    rate = int(received) / max(float(span), 1e-9)
    return {
        "sent": sent,
        "received": int(received),
        "packets_per_second": round(rate),
        "mbit_per_second": round(rate * 1400 * 8 / 1e6, 1),
    }


def measure(
    name: str, target_ns: Namespace, peer_ns: Namespace, pid: int, packets: Any, args: Any
) -> dict[str, Any]:
    size = args.megabytes * 1024 * 1024
    address = INNER[name]
    cpu0, packets0 = cpu_seconds(pid), packets()
    down = tcp(target_ns, peer_ns, address, size, upload=False)
    up = tcp(target_ns, peer_ns, address, size, upload=True)
    cpu, carried = cpu_seconds(pid) - cpu0, packets() - packets0
    return {
        "tcp_download_mbit": round(down, 1),
        "tcp_upload_mbit": round(up, 1),
        "udp_1400": udp(target_ns, peer_ns, address, args.seconds),
        "esp_packets_during_tcp": carried,
        "cpu_us_per_packet": round(cpu * 1e6 / max(carried, 1), 1),
    }


def strongswan_packets(responder: StrongSwan) -> int:
    total = 0
    for sa in responder.list_sas():
        for child in sa["child-sas"]:
            total += int(child.get("packets-in", 0)) + int(child.get("packets-out", 0))
    return total


def run(args: Any, workdir: Path) -> dict[str, Any]:
    pair = make_pair()
    ss_ns = Namespace("ssresp")
    gateway: Gateway | None = None
    peers: list[StrongSwan] = []
    try:
        link(pair.peer, ss_ns, PEER_TO_SS, STRONGSWAN)
        pair.peer.add_address("lo", f"{PEER_INNER}/32")
        pair.gw.add_address("lo", f"{INNER['ikf']}/32")
        ss_ns.add_address("lo", f"{INNER['ss']}/32")
        gateway = Gateway.psk_responder(
            pair.gw,
            workdir / "ikefarm",
            psk=PSK,
            log_level=0,
            extra='\n[kernel]\nbackend = "userspace"\n',
        )
        gateway.start()
        quiet = {"default": 0, "ike": 0, "cfg": 0, "chd": 0, "net": 0, "enc": 0, "knl": 0}
        responder = StrongSwan(ss_ns, workdir / "ss-responder", name="ss-resp", log_levels=quiet)
        peers.append(responder)
        responder.start()
        responder.load(
            [
                Connection(
                    name="rw",
                    local_addrs=STRONGSWAN,
                    remote_addrs="%any",
                    local_id="gw.example",
                    remote_id="%any",
                    proposals="aes256gcm16-prfsha384-x25519",
                    children=[
                        Child(
                            name="net",
                            local_ts="10.101.0.0/24",
                            remote_ts="10.200.0.0/24",
                            esp_proposals="aes256gcm16",
                        )
                    ],
                )
            ],
            psks=[Psk(PSK, ["gw.example", "%any"])],
        )
        initiator = StrongSwan(pair.peer, workdir / "initiator", name="init", log_levels=quiet)
        peers.append(initiator)
        initiator.start()
        initiator.load(
            [
                connection("ikf", IKEFARM, "10.100.0.0/24"),
                connection("ss", STRONGSWAN, "10.101.0.0/24"),
            ],
            psks=[Psk(PSK, ["a.peer.example", "gw.example"])],
        )
        initiator.initiate(child="ikf-net", timeout=20)
        initiator.initiate(child="ss-net", timeout=20)
        kernel_pid = next(p for i, p in gateway.service_pids().items() if i.startswith("kernel"))
        charon_pid = responder.pid
        assert charon_pid is not None

        def ikefarm_packets() -> int:
            counters = gateway.counters("kernel")  # type: ignore[union-attr]
            return counters.get("esp.in.packets", 0) + counters.get("esp.out.packets", 0)

        results = {
            "ikefarm": measure("ikf", pair.gw, pair.peer, kernel_pid, ikefarm_packets, args),
            "strongswan": measure(
                "ss", ss_ns, pair.peer, charon_pid, lambda: strongswan_packets(responder), args
            ),
        }
    finally:
        for peer in reversed(peers):
            peer.stop()
        if gateway is not None:
            gateway.stop()
        ss_ns.close()
        pair.close()
    return results


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "-"


def markdown(results: dict[str, Any], command: str) -> str:
    ikf, ss = results["ikefarm"], results["strongswan"]
    rows = [
        ("TCP download, Mbit/s", ikf["tcp_download_mbit"], ss["tcp_download_mbit"]),
        ("TCP upload, Mbit/s", ikf["tcp_upload_mbit"], ss["tcp_upload_mbit"]),
        (
            "UDP 1400 octets, packets/s delivered",
            ikf["udp_1400"]["packets_per_second"],
            ss["udp_1400"]["packets_per_second"],
        ),
        (
            "UDP 1400 octets, Mbit/s delivered",
            ikf["udp_1400"]["mbit_per_second"],
            ss["udp_1400"]["mbit_per_second"],
        ),
        ("CPU per ESP packet, us", ikf["cpu_us_per_packet"], ss["cpu_us_per_packet"]),
    ]
    lines = [
        f"## {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} tunnel throughput",
        "",
        f"Command: `{command}`",
        "",
        "| | ikefarm userspace | strongSwan kernel-libipsec | ikefarm / strongSwan |",
        "|---|---|---|---|",
        *(f"| {label} | {a} | {b} | {ratio(a, b)} |" for label, a, b in rows),
        "",
        f"UDP sent by the peer: ikefarm {ikf['udp_1400']['sent']}, "
        f"strongSwan {ss['udp_1400']['sent']}.",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=int, default=20, help="per TCP transfer")
    parser.add_argument("--seconds", type=float, default=5.0, help="UDP flood duration")
    parser.add_argument("--results", type=Path, help="append a Markdown section to FILE")
    args = parser.parse_args()
    # the farm's keystore is new for this run and thrown away with it
    os.environ.setdefault("IKEFARM_MASTER_KEY", "0x" + secrets.token_hex(32))
    with tempfile.TemporaryDirectory(prefix="ikf-bench-") as tmp:
        results = run(args, Path(tmp))
    print(json.dumps(results))
    if args.results:
        command = "ops/bench/tunnel-throughput " + " ".join(sys.argv[1:])
        with args.results.open("a") as out:
            out.write("\n" + markdown(results, command.strip()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
