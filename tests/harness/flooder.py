"""An IKE_SA_INIT flood from spoofed source addresses, for DoS tests and the benchmark.

Runs inside the peer namespace (`python -m tests.harness.flooder ...`): a raw
IPv4 socket with IP_HDRINCL writes whole packets whose source is taken in turn
from `--sources` (default 198.18.0.0/15, the range RFC 2544 reserves for
benchmark tests), each with a fresh SPIi and Ni in a copy of a real
IKE_SA_INIT (a valid KE, so a worker that lets one through does the whole DH).
The namespace of the targets must route `--sources` back to the flooder's
namespace; add `ip route add local <sources> dev lo` there too and the flooder
counts the answers (`--listen`): the N(COOKIE) responses on the wire.

Bounded: at most `--count` packets, for at most `--duration` seconds, at
`--rate` packets per second. Prints one JSON line: what was sent and heard.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import socket
import struct
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator

from ikefarm.shared.ikev2.constants import ExchangeType, NotifyType
from ikefarm.shared.ikev2.errors import MalformedMessage
from ikefarm.shared.ikev2.message import parse_message

BENCHMARK_RANGE = "198.18.0.0/15"  # RFC 2544 26.2
IKE_PORT = 500


def template_request() -> tuple[bytes, int, int]:
    """A real IKE_SA_INIT (x25519, the defaults) and the offset/length of its nonce data."""
    from tests.dos_helpers import init_requests

    (data,) = init_requests(1)
    parsed = parse_message(data)
    assert parsed.message is not None
    nonce = next(p for p in parsed.message.payloads if type(p).__name__ == "NoncePayload")
    offset = data.index(nonce.data)  # type: ignore[attr-defined]
    return data, offset, len(nonce.data)  # type: ignore[attr-defined]


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ipv4_udp(source: str, sport: int, target: str, dport: int, payload: bytes) -> bytes:
    """One IPv4 packet carrying UDP; the kernel fills in the IP checksum (IP_HDRINCL)."""
    src = ipaddress.IPv4Address(source).packed
    dst = ipaddress.IPv4Address(target).packed
    length = 8 + len(payload)
    pseudo = src + dst + struct.pack("!BBH", 0, socket.IPPROTO_UDP, length)
    header = struct.pack("!HHHH", sport, dport, length, 0)
    checksum = _checksum(pseudo + header + payload) or 0xFFFF
    udp = struct.pack("!HHHH", sport, dport, length, checksum) + payload
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0x4000, 64, socket.IPPROTO_UDP, 0, src, dst
    )
    return ip + udp


def sources(network: str) -> Iterator[str]:
    """Every host address of `network`, round and round."""
    hosts = list(ipaddress.ip_network(network).hosts())
    while True:
        yield from (str(h) for h in hosts)


class Listener(threading.Thread):
    """Counts IKE answers to the spoofed addresses that reach this namespace (raw UDP)."""

    def __init__(self, network: str) -> None:
        super().__init__(daemon=True)
        self.network = ipaddress.ip_network(network)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)
        self.sock.settimeout(0.2)
        self.stop_at = float("inf")
        self.counts: Counter[str] = Counter()  # "<responder address> <kind>" -> answers
        self.first: float | None = None
        self.last: float | None = None

    def run(self) -> None:
        while time.monotonic() < self.stop_at:
            try:
                packet = self.sock.recv(65535)
            except TimeoutError:
                continue
            header_length = (packet[0] & 0x0F) * 4
            if ipaddress.IPv4Address(packet[16:20]) not in self.network:
                continue
            sport = struct.unpack("!H", packet[header_length : header_length + 2])[0]
            if sport != IKE_PORT:
                continue
            responder = str(ipaddress.IPv4Address(packet[12:16]))
            self.counts[f"{responder} {_kind(packet[header_length + 8 :])}"] += 1
            now = time.monotonic()
            self.first = self.first if self.first is not None else now
            self.last = now


def _kind(data: bytes) -> str:
    try:
        parsed = parse_message(data)
    except MalformedMessage:
        return "malformed"
    message = parsed.message
    if message is None or parsed.header.exchange_type != ExchangeType.IKE_SA_INIT:
        return "other"
    if message.notify(NotifyType.COOKIE) is not None:
        return "cookie"
    return "other_init_response"


def flood(
    targets: list[str],
    count: int,
    rate: float,
    duration: float,
    network: str = BENCHMARK_RANGE,
    listen: bool = False,
    linger: float = 1.0,
    on_go: bool = False,
) -> dict[str, object]:
    template, nonce_at, nonce_length = template_request()
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
    listener = Listener(network) if listen else None
    if listener is not None:
        listener.start()
    if on_go:  # everything slow is done: the caller decides the moment the flood starts
        print("ready", flush=True)
        sys.stdin.readline()
    addresses = sources(network)
    used: set[str] = set()
    sent = errors = 0
    start = time.monotonic()
    interval = 1.0 / rate if rate > 0 else 0.0
    while sent < count and time.monotonic() - start < duration:
        source = next(addresses)
        used.add(source)
        body = bytearray(template)
        body[0:8] = os.urandom(8)  # SPIi
        body[nonce_at : nonce_at + nonce_length] = os.urandom(nonce_length)
        sport = 10000 + (sent % 50000)  # never 500 or 4500: real peers may sit there
        for target in targets:
            try:
                sock.sendto(ipv4_udp(source, sport, target, IKE_PORT, bytes(body)), (target, 0))
            except OSError:
                errors += 1
        sent += 1
        if interval:
            delay = start + sent * interval - time.monotonic()
            if delay > 0:
                time.sleep(delay)
    elapsed = time.monotonic() - start
    result: dict[str, object] = {
        "sent": sent,
        "packets": sent * len(targets),
        "errors": errors,
        "elapsed": round(elapsed, 3),
        "sources": len(used),
    }
    if listener is not None:
        listener.stop_at = time.monotonic() + linger
        listener.join()
        result["answers"] = dict(listener.counts)
        if listener.first is not None and listener.last is not None:
            result["answer_window"] = round(listener.last - listener.first, 3)
    sock.close()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", action="append", required=True, help="IPv4 (repeatable)")
    parser.add_argument("--count", type=int, default=5000, help="requests (per target)")
    parser.add_argument("--rate", type=float, default=1000.0, help="requests per second")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds at most")
    parser.add_argument("--sources", default=BENCHMARK_RANGE)
    parser.add_argument("--listen", action="store_true", help="count the answers")
    parser.add_argument("--linger", type=float, default=1.0, help="s to listen after the flood")
    parser.add_argument(
        "--on-go", action="store_true", help='print "ready", flood once a line comes on stdin'
    )
    args = parser.parse_args(argv)
    if args.count < 1 or args.count > 1_000_000 or args.duration > 600:
        parser.error("count 1-1000000, duration at most 600 s")
    result = flood(
        args.target,
        args.count,
        args.rate,
        args.duration,
        args.sources,
        args.listen,
        args.linger,
        args.on_go,
    )
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
