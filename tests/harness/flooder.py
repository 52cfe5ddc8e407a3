"""An IKE_SA_INIT flood from spoofed source addresses, for DoS tests and the benchmark.

Runs inside the peer namespace (`python -m tests.harness.flooder ...`): raw IPv4
sockets with IP_HDRINCL write whole packets whose source is taken in turn from
`--sources` (default 198.18.0.0/15, the range RFC 2544 reserves for benchmark
tests), each a copy of a real IKE_SA_INIT (a valid KE, so a worker that lets one
through does the whole DH) with its own SPIi and Ni. The namespace of the targets
must route `--sources` back to the flooder's namespace; add `ip route add local
<sources> dev lo` there too and the flooder counts the answers (`--listen`): the
N(COOKIE) responses on the wire.

Fast enough for 20,000 requests/s on a small machine: each target's packet is
built once and then only patched in place per request (source address, source
port, SPIi, the first octets of Ni); the UDP checksum is zero ("no checksum",
RFC 768; the kernel fills the IPv4 header checksum, IP_HDRINCL); `--procs` sender
processes share the rate, each sending from its own slice of the sources, in
bursts paced by the clock. Bounded: at most `--count` requests, for at most
`--duration` seconds, at `--rate` requests per second; SIGTERM ends it sooner.
Prints one JSON line: what was sent and heard.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import multiprocessing
import os
import signal
import socket
import struct
import sys
import threading
import time
from collections import Counter
from multiprocessing.connection import Connection
from typing import Any

from ikefarm.shared.ikev2.constants import ExchangeType, NotifyType, PayloadType
from ikefarm.shared.ikev2.errors import MalformedMessage
from ikefarm.shared.ikev2.message import parse_message

BENCHMARK_RANGE = "198.18.0.0/15"  # RFC 2544 26.2
IKE_PORT = 500
IP_HEADER = 20
UDP_HEADER = 8
BURST = 64  # requests sent per clock check, at most
# where one answer's IKE header and first payload are, counted from the UDP payload (RFC
# 7296 3.1, 3.2, 3.10): exchange type, flags, next payload; a notify's message type
_EXCHANGE_AT, _FLAGS_AT, _NEXT_PAYLOAD_AT, _NOTIFY_TYPE_AT = 18, 19, 16, 28 + 6
_RESPONSE_FLAG = 0x20


def template_request() -> tuple[bytes, int, int]:
    """A real IKE_SA_INIT (x25519, the defaults) and the offset/length of its nonce data."""
    from tests.dos_helpers import init_requests

    (data,) = init_requests(1)
    parsed = parse_message(data)
    assert parsed.message is not None
    nonce = next(p for p in parsed.message.payloads if type(p).__name__ == "NoncePayload")
    offset = data.index(nonce.data)  # type: ignore[attr-defined]
    return data, offset, len(nonce.data)  # type: ignore[attr-defined]


def _ip_header(src: bytes, dst: bytes, payload_length: int) -> bytes:
    return struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        IP_HEADER + payload_length,
        0,
        0x4000,  # don't fragment
        64,
        socket.IPPROTO_UDP,
        0,
        src,
        dst,
    )


def answer_kind(data: bytes) -> str:
    """What an answer is, from fixed offsets only (cheap enough for tens of thousands a
    second): a cookie request is an IKE_SA_INIT response whose first payload is N(COOKIE)."""
    if len(data) < _NOTIFY_TYPE_AT + 2:
        return "malformed"
    if data[_EXCHANGE_AT] != ExchangeType.IKE_SA_INIT or not data[_FLAGS_AT] & _RESPONSE_FLAG:
        return "other"
    if data[_NEXT_PAYLOAD_AT] == PayloadType.NOTIFY and (
        int.from_bytes(data[_NOTIFY_TYPE_AT : _NOTIFY_TYPE_AT + 2], "big") == NotifyType.COOKIE
    ):
        return "cookie"
    return "other_init_response"


class Listener(threading.Thread):
    """Counts IKE answers to the spoofed addresses that reach this namespace (raw UDP)."""

    def __init__(self, network: str) -> None:
        super().__init__(daemon=True)
        net = ipaddress.ip_network(network)
        self.low = int(net.network_address)
        self.high = int(net.broadcast_address)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.sock.settimeout(0.2)
        self.stop_at = float("inf")
        self.counts: Counter[str] = Counter()  # "<responder address> <kind>" -> answers
        self.first: float | None = None
        self.last: float | None = None

    def run(self) -> None:
        recv = self.sock.recv
        while time.monotonic() < self.stop_at:
            try:
                packet = recv(65535)
            except TimeoutError:
                continue
            header_length = (packet[0] & 0x0F) * 4
            if not self.low <= int.from_bytes(packet[16:20], "big") <= self.high:
                continue
            if int.from_bytes(packet[header_length : header_length + 2], "big") != IKE_PORT:
                continue
            responder = socket.inet_ntoa(packet[12:16])
            kind = answer_kind(packet[header_length + UDP_HEADER :])
            if kind == "malformed":  # not fixed-offset readable: let the parser say
                kind = _kind(packet[header_length + UDP_HEADER :])
            self.counts[f"{responder} {kind}"] += 1
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


def _send(
    index: int,
    procs: int,
    targets: list[str],
    count: int,
    rate: float,
    duration: float,
    network: str,
    start_at: float,
    stop: Any,
    results: Connection,
) -> None:
    """One sender process: requests index, index + procs, ... of the flood, to every target."""
    template, nonce_at, _nonce_length = template_request()
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    net = ipaddress.ip_network(network)
    first_host = int(net.network_address) + (1 if net.num_addresses > 2 else 0)
    hosts = max(1, net.num_addresses - (2 if net.num_addresses > 2 else 0))
    udp_length = UDP_HEADER + len(template)
    packets = []
    for target in targets:
        dst = ipaddress.IPv4Address(target).packed
        packet = bytearray(_ip_header(bytes(4), dst, udp_length))
        packet += struct.pack("!HHHH", 0, IKE_PORT, udp_length, 0) + template
        packets.append((packet, (target, 0)))
    ike_at = IP_HEADER + UDP_HEADER
    nonce_at += ike_at
    stamp = os.urandom(4)  # this run's requests differ from another run's
    share = count // procs + (1 if index < count % procs else 0)
    per_second = rate / procs
    pack_into = struct.pack_into
    sent = errors = 0
    while time.monotonic() < start_at:
        time.sleep(min(0.01, max(0.0, start_at - time.monotonic())))
    start = time.monotonic()
    while sent < share and not stop.is_set():
        now = time.monotonic()
        if now - start >= duration:
            break
        due = min(int((now - start) * per_second) + 1, share) - sent if per_second > 0 else share
        if due <= 0:
            time.sleep(min(0.002, max(0.0, sent / per_second - (now - start))))
            continue
        for _ in range(min(due, BURST)):
            number = index + sent * procs  # the request's number in the whole flood
            source = first_host + number % hosts
            sport = 10000 + number % 50000  # never 500 or 4500: real peers may sit there
            for packet, address in packets:
                pack_into("!I", packet, 12, source)
                pack_into("!H", packet, IP_HEADER, sport)
                pack_into("!4sI", packet, ike_at, stamp, number)  # SPIi
                pack_into("!4sI", packet, nonce_at, stamp, number)  # Ni's first octets
                try:
                    sock.sendto(packet, address)
                except OSError:
                    errors += 1
            sent += 1
    elapsed = time.monotonic() - start
    sock.close()
    results.send({"sent": sent, "errors": errors, "elapsed": elapsed})
    results.close()


def flood(
    targets: list[str],
    count: int,
    rate: float,
    duration: float,
    network: str = BENCHMARK_RANGE,
    listen: bool = False,
    linger: float = 1.0,
    on_go: bool = False,
    procs: int = 1,
) -> dict[str, object]:
    listener = Listener(network) if listen else None
    if listener is not None:
        listener.start()
    template_request()  # the template's imports are done before the clock starts
    if on_go:  # everything slow is done: the caller decides the moment the flood starts
        print("ready", flush=True)
        sys.stdin.readline()
    context = multiprocessing.get_context("fork")
    stop = context.Event()
    # SIGTERM ends the flood early, and its counts are still printed
    signal.signal(signal.SIGTERM, lambda _signum, _frame: stop.set())
    start_at = time.monotonic() + 0.05
    workers: list[tuple[Any, Connection]] = []
    for index in range(procs):
        receive, send = context.Pipe(duplex=False)
        process = context.Process(
            target=_send,
            args=(index, procs, targets, count, rate, duration, network, start_at, stop, send),
            daemon=True,
        )
        process.start()
        send.close()
        workers.append((process, receive))
    shares = []
    for process, receive in workers:
        shares.append(receive.recv())
        process.join()
    sent = sum(s["sent"] for s in shares)
    hosts = ipaddress.ip_network(network).num_addresses
    hosts = hosts - 2 if hosts > 2 else hosts
    result: dict[str, object] = {
        "sent": sent,
        "packets": sent * len(targets),
        "errors": sum(s["errors"] for s in shares),
        "elapsed": round(max(s["elapsed"] for s in shares), 3),
        "sources": min(sent, hosts),
        "procs": procs,
    }
    if listener is not None:
        listener.stop_at = time.monotonic() + linger
        listener.join()
        result["answers"] = dict(listener.counts)
        if listener.first is not None and listener.last is not None:
            result["answer_window"] = round(listener.last - listener.first, 3)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", action="append", required=True, help="IPv4 (repeatable)")
    parser.add_argument("--count", type=int, default=5000, help="requests (per target)")
    parser.add_argument("--rate", type=float, default=1000.0, help="requests per second")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds at most")
    parser.add_argument("--sources", default=BENCHMARK_RANGE)
    parser.add_argument("--procs", type=int, default=1, help="sender processes (1-16)")
    parser.add_argument("--listen", action="store_true", help="count the answers")
    parser.add_argument("--linger", type=float, default=1.0, help="s to listen after the flood")
    parser.add_argument(
        "--on-go", action="store_true", help='print "ready", flood once a line comes on stdin'
    )
    args = parser.parse_args(argv)
    if args.count < 1 or args.count > 10_000_000 or args.duration > 600:
        parser.error("count 1-10000000, duration at most 600 s")
    if not 1 <= args.procs <= 16:
        parser.error("procs 1-16")
    result = flood(
        args.target,
        args.count,
        args.rate,
        args.duration,
        args.sources,
        args.listen,
        args.linger,
        args.on_go,
        args.procs,
    )
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
