"""A handshake load generator built on ikefarm's own sans-I/O engine (`shared/ikev2/`).

One :class:`LoadGenerator` is one process's share of the load: one `IkeEngine`
acting as many initiators (PSK, x25519, AES-GCM), a UDP socket on port 500 and
one on 4500 (non-ESP marker, RFC 3948 2.2) bound to its own address, and an
open-loop schedule (`rate` new handshakes per second for `duration` seconds,
whatever the answers do). Two modes:

- ``full``: IKE_SA_INIT + IKE_AUTH with one CHILD_SA, exactly as the engine
  initiates (its own retransmissions, NAT-T float when the responder reports a
  NAT). Our AUTH is computed by the keystore's own PSK code (`PskStore`), in
  process. The SAs stay up (and answer the responder's requests) until the
  generator exits, so the responder's memory per SA can be read.
- ``init``: the IKE_SA_INIT probe. The engine builds a few real IKE_SA_INIT
  requests once; each probe is one of them with a fresh SPIi and nonce, and the
  answer is only matched by SPIi (no DH on our side), so the generator costs
  little per probe and leaves the responder one half-open SA per answer.

Latency is from sending the first IKE_SA_INIT to the IKE_SA_INIT answer
(``init``) or to the IKE_AUTH answer that establishes the SA and its child
(``full``). The generator measures its own CPU time too, so a run can tell
whether it was the bottleneck.

`python -m ops.bench.loadgen --local A --remote B --mode init|full ...` runs one
share and prints one JSON line; `ops/bench/handshake.py` starts several inside a
namespace and adds the responders' side.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import selectors
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ikefarm.proto.messages import PskAuthReply, PskAuthRequest
from ikefarm.services.keystore.psk import PskStore
from ikefarm.shared.config.loader import Config, parse_config
from ikefarm.shared.ikev2.effects import (
    Effect,
    Endpoint,
    KeystoreRequest,
    Log,
    SaEvent,
    SendDatagram,
)
from ikefarm.shared.ikev2.engine import IkeEngine
from ikefarm.shared.ikev2.errors import MalformedMessage
from ikefarm.shared.ikev2.message import parse_message
from ikefarm.shared.ikev2.payloads.nonce import NoncePayload
from ikefarm.shared.ikev2.policy import engine_policy
from tests.harness.gateway import farm_config, vpn_config

IKE_PORT, NATT_PORT = 500, 4500
NON_ESP_MARKER = b"\0\0\0\0"  # RFC 3948 2.2
IKE_SA_INIT = 34
FLAG_RESPONSE = 0x20
TEMPLATES = 32  # distinct engine-built IKE_SA_INIT requests the probe cycles through
READ_BATCH = 256  # datagrams read per wake-up before timers and sends get their turn


def initiator_config(
    local: str,
    remote: str,
    *,
    psk: str,
    local_id: str,
    remote_id: str = "gw.example",
    local_ts: str = "10.200.0.0/24",
    remote_ts: str = "10.100.0.0/24",
    retransmit_timeout: float = 4.0,
    retransmit_tries: int = 2,
) -> Config:
    """The initiators' configuration: one VPN to `remote`, DPD off (the test harness's
    farm config, so both sides speak the same proposals)."""
    vpn = vpn_config(
        "load",
        local_id=local_id,
        remote_id=remote_id,
        policies=[("net", local_ts, remote_ts)],
        local_address=local,
        remote_address=remote,
    )
    options = {"retransmit-timeout": retransmit_timeout, "retransmit-tries": retransmit_tries}
    text = farm_config(
        Path(tempfile.gettempdir()),  # [farm] is not read: the engine alone runs this config
        psks=[(local_id, remote_id, psk)],
        vpns=[vpn],
        log_level=0,
        global_options=options,
    )
    return parse_config(text)


def cpu_seconds() -> float:
    """utime + stime of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class Stats:
    """What one generator saw; `merge` adds up several processes' shares."""

    mode: str
    sent: int = 0
    answered: int = 0  # IKE_SA_INIT answered with an SA (init) / handshakes complete (full)
    refused: int = 0  # answered without an SA: a notify only (COOKIE, NO_PROPOSAL_CHOSEN, ...)
    established: int = 0
    with_child: int = 0
    failed: int = 0
    unanswered: int = 0
    latencies: list[float] = field(default_factory=list)  # s, one per answer
    per_second: list[int] = field(default_factory=list)  # answers by second since the start
    elapsed: float = 0.0  # s from the first send to the last
    cpu: float = 0.0  # this generator's own CPU seconds over the run
    errors: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dict(vars(self))

    @classmethod
    def merge(cls, shares: list[dict[str, Any]]) -> Stats:
        total = cls(mode=shares[0]["mode"] if shares else "")
        for share in shares:
            for key in ("sent", "answered", "refused", "established", "with_child"):
                setattr(total, key, getattr(total, key) + share[key])
            total.failed += share["failed"]
            total.unanswered += share["unanswered"]
            total.latencies += share["latencies"]
            for i, n in enumerate(share["per_second"]):
                if i >= len(total.per_second):
                    total.per_second.append(0)
                total.per_second[i] += n
            total.elapsed = max(total.elapsed, share["elapsed"])
            total.cpu += share["cpu"]
            for key, n in share["errors"].items():
                total.errors[key] = total.errors.get(key, 0) + n
        return total


class LoadGenerator:
    """Many initiators in one engine, against the responder at `remote` (ports 500/4500)."""

    def __init__(
        self,
        local: str,
        remote: str,
        *,
        psk: str,
        local_id: str,
        mode: str = "full",
        remote_id: str = "gw.example",
        ike_port: int = IKE_PORT,
        natt_port: int = NATT_PORT,
    ) -> None:
        if mode not in ("full", "init"):
            raise ValueError(f"mode {mode!r} is not 'full' or 'init'")
        self.mode = mode
        self.local, self.remote = local, remote
        self.ike_port, self.natt_port = ike_port, natt_port
        config = initiator_config(local, remote, psk=psk, local_id=local_id, remote_id=remote_id)
        self.keys = PskStore.from_config(config)
        self.engine = IkeEngine(engine_policy(config), shard=0)
        self.stats = Stats(mode=mode)
        self.pending: dict[Any, float] = {}  # SPIi (init) or IKE unique id (full) -> sent at
        self.children: set[int] = set()
        self.started = 0.0
        self.sockets: dict[int, socket.socket] = {}
        self.templates: list[tuple[bytes, int, int]] = []

    # -- sockets ---------------------------------------------------------------------------
    def open(self) -> None:
        for port in (self.ike_port, self.natt_port):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            sock.bind((self.local, port))
            sock.setblocking(False)
            self.sockets[port] = sock

    def close(self) -> None:
        for sock in self.sockets.values():
            sock.close()
        self.sockets.clear()

    def _send(self, effect: SendDatagram) -> None:
        data = effect.data
        if effect.local.port == self.natt_port:
            data = NON_ESP_MARKER + data
        try:
            remote = (effect.remote.address, effect.remote.port)
            self.sockets[effect.local.port].sendto(data, remote)
        except OSError as exc:
            self._error(f"send.{exc.errno}")

    def _error(self, key: str) -> None:
        self.stats.errors[key] = self.stats.errors.get(key, 0) + 1

    # -- the engine's effects ---------------------------------------------------------------
    def _apply(self, effects: list[Effect], now: float) -> None:
        queue = list(effects)
        while queue:
            effect = queue.pop(0)
            if isinstance(effect, SendDatagram):
                self._send(effect)
            elif isinstance(effect, KeystoreRequest):
                queue += self.engine.keystore_reply(effect.request_id, self._keystore(effect), now)
            elif isinstance(effect, SaEvent):
                self._event(effect, now)

    def _keystore(self, effect: KeystoreRequest) -> PskAuthReply:
        """Our PSK AUTH, by the keystore's own code (the generator holds the PSK itself)."""
        assert isinstance(effect.request, PskAuthRequest)
        reply, _ = self.keys.authenticate(effect.request)
        return reply

    def _event(self, event: SaEvent, now: float) -> None:
        uid = event.ike_unique_id
        if event.kind == "ike-established":
            self.stats.established += 1
        elif event.kind == "child-installed":
            self.children.add(uid)
            self.stats.with_child += 1
        elif event.kind == "ike-deleted" and uid in self.pending:
            self.pending.pop(uid)
            self.stats.failed += 1
            return
        if uid in self.children and uid in self.pending:
            self._answered(now - self.pending.pop(uid), now)

    def _answered(self, latency: float, now: float) -> None:
        self.stats.answered += 1
        self.stats.latencies.append(round(latency, 6))
        second = int(now - self.started)
        while len(self.stats.per_second) <= second:
            self.stats.per_second.append(0)
        self.stats.per_second[second] += 1

    # -- one new handshake ------------------------------------------------------------------
    def _start_full(self, now: float) -> None:
        effects = self.engine.initiate("load", "net", now)
        uid = next(
            e.fields["unique_id"]
            for e in effects
            if isinstance(e, Log) and e.event == "initiating_ike_sa"
        )
        self.pending[uid] = now
        self._apply(effects, now)

    def _build_templates(self) -> None:
        """A few real IKE_SA_INIT requests from the engine, and where their nonce sits."""
        for _ in range(TEMPLATES):
            effects = self.engine.initiate("load", None, 0.0)
            data = next(e.data for e in effects if isinstance(e, SendDatagram))
            parsed = parse_message(data)
            assert parsed.message is not None
            nonce = next(p for p in parsed.message.payloads if isinstance(p, NoncePayload))
            self.templates.append((data, data.index(nonce.data), len(nonce.data)))
        # the engine forgets them: answers are matched here, by SPIi
        self.engine = IkeEngine(self.engine.policy, shard=0)

    def _start_init(self, now: float) -> None:
        data, nonce_at, size = self.templates[self.stats.sent % len(self.templates)]
        spi_i = os.urandom(8)
        data = spi_i + data[8:nonce_at] + os.urandom(size) + data[nonce_at + size :]
        self.pending[spi_i] = now
        try:
            self.sockets[self.ike_port].sendto(data, (self.remote, self.ike_port))
        except OSError as exc:
            self._error(f"send.{exc.errno}")

    # -- datagrams in -----------------------------------------------------------------------
    def _receive(self, port: int, data: bytes, source: tuple[str, int], now: float) -> None:
        if port == self.natt_port:
            if not data.startswith(NON_ESP_MARKER):
                return  # a keepalive or ESP: nothing for us
            data = data[4:]
        if self.mode == "init":
            self._receive_probe_answer(data, now)
            return
        local = Endpoint(self.local, port)
        remote = Endpoint(source[0], source[1])
        self._apply(self.engine.receive(data, local, remote, now), now)

    def _receive_probe_answer(self, data: bytes, now: float) -> None:
        if len(data) < 28 or data[18] != IKE_SA_INIT or not data[19] & FLAG_RESPONSE:
            self._error("not_an_init_answer")
            return
        sent = self.pending.pop(data[:8], None)
        if sent is None:
            self._error("unknown_spi")
            return
        if any(data[8:16]):
            self._answered(now - sent, now)
        else:
            self.stats.refused += 1
            try:
                parsed = parse_message(data)
            except MalformedMessage:
                return
            if parsed.message is not None:
                for payload in parsed.message.payloads:
                    name = getattr(payload, "notify_type", None)
                    if name is not None:
                        self._error(f"notify.{int(name)}")

    # -- the loop ---------------------------------------------------------------------------
    def warm_up(self, timeout: float = 10.0) -> bool:
        """One full handshake before the load: later SAs then carry no INITIAL_CONTACT,
        which would make the responder delete the ones before (RFC 7296 2.4)."""
        if self.mode != "full":
            return True
        stats, self.stats = self.stats, Stats(mode=self.mode)
        self.started = time.monotonic()
        self._start_full(self.started)
        self._pump(self.started + timeout, lambda: not self.pending)
        ok = self.stats.answered == 1
        self.stats = stats
        self.pending.clear()
        return ok

    def run(
        self,
        rate: float,
        duration: float,
        *,
        drain: float = 3.0,
        answers: int | None = None,
    ) -> Stats:
        """Start `rate` handshakes per second for `duration` s (or until `answers` came back),
        then wait up to `drain` s for the last answers."""
        if self.mode == "init" and not self.templates:
            self._build_templates()
        cpu0 = cpu_seconds()
        self.started = time.monotonic()
        total = max(1, int(rate * duration))
        interval = 1.0 / rate
        start = self._start_init if self.mode == "init" else self._start_full

        def sending() -> bool:
            return self.stats.sent < total and (answers is None or self.stats.answered < answers)

        next_send = self.started
        last_send = self.started
        while sending():
            now = time.monotonic()
            while sending() and next_send <= now:
                start(now)
                self.stats.sent += 1
                next_send += interval
                last_send = now
            self._pump(min(next_send, self.started + duration + 1.0), lambda: False)
        self.stats.elapsed = round(last_send - self.started, 3)
        self._pump(time.monotonic() + drain, lambda: not self.pending)
        self.stats.unanswered = len(self.pending)
        self.stats.cpu = round(cpu_seconds() - cpu0, 4)
        return self.stats

    def _pump(self, until: float, done: Any) -> None:
        """Read datagrams and run the engine's timers until `until` or `done()`."""
        selector = selectors.DefaultSelector()
        for port, sock in self.sockets.items():
            selector.register(sock, selectors.EVENT_READ, port)
        try:
            while not done():
                now = time.monotonic()
                deadline = self.engine.next_deadline()
                if deadline is not None and deadline <= now:
                    self._apply(self.engine.on_timer(now), now)
                    deadline = self.engine.next_deadline()
                if now >= until:
                    return
                wait = until - now if deadline is None else min(until, deadline) - now
                for key, _ in selector.select(max(0.0, wait)):
                    sock: socket.socket = key.fileobj  # type: ignore[assignment]
                    for _ in range(READ_BATCH):
                        try:
                            data, source = sock.recvfrom(65535)
                        except BlockingIOError:
                            break
                        self._receive(key.data, data, source, time.monotonic())
        finally:
            selector.close()

    def serve(self, seconds: float) -> None:
        """Keep the SAs answering (DPD, deletes) for `seconds` more."""
        self._pump(time.monotonic() + seconds, lambda: False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--local", required=True, help="our address (ports 500 and 4500)")
    parser.add_argument("--remote", required=True, help="the responder's address")
    parser.add_argument("--mode", choices=("full", "init"), default="full")
    parser.add_argument("--rate", type=float, default=100.0, help="new handshakes per second")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of sending")
    parser.add_argument("--answers", type=int, help="stop sending after this many answers")
    parser.add_argument("--drain", type=float, default=3.0, help="s to wait for late answers")
    parser.add_argument("--hold", type=float, default=0.0, help="s to keep the SAs after")
    parser.add_argument("--psk", default=os.environ.get("LOADGEN_PSK", ""))
    parser.add_argument("--local-id", default="load.peer.example")
    parser.add_argument("--remote-id", default="gw.example")
    parser.add_argument(
        "--wait-go", action="store_true", help='print "ready", then start on a line on stdin'
    )
    args = parser.parse_args(argv)
    generator = LoadGenerator(
        args.local,
        args.remote,
        psk=args.psk,
        local_id=args.local_id,
        mode=args.mode,
        remote_id=args.remote_id,
    )
    generator.open()
    try:
        if not generator.warm_up():
            print(json.dumps({"error": "warm-up handshake failed"}), flush=True)
            return 1
        if args.wait_go:
            print("ready", flush=True)
            sys.stdin.readline()
        stats = generator.run(args.rate, args.duration, drain=args.drain, answers=args.answers)
        print(json.dumps(stats.to_json()), flush=True)
        if args.hold > 0:
            generator.serve(args.hold)
    finally:
        generator.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
