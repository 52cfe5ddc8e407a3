"""Ingress: owns the UDP sockets (500/4500) and routes datagrams to ike workers.

Received: each socket is read in batches of up to `READ_BATCH` datagrams per
readiness event (until it would block); each datagram's IKE header is read once
there (NAT-T demultiplexing and routing, `routing.py`), and the datagram waits in
the `backlog.py` priority queue: datagrams for existing SAs first, then
IKE_SA_INITs that return a cookie, then new ones, each drop counted by class. The
routing task takes up to `ROUTE_BATCH` at a time, one span per IKE datagram so
the worker continues the trace, a `Datagram` carrying the header already read
(`shared/bus/datagram.py`) on the worker's subject; between batches it yields, so
the bus (sends, load reports) and the sockets are served during a flood and their
publications leave in one write. Sent: `OutboundDatagram` from `subjects.INGRESS_SEND`
(queue group `ingress`) leaves from the socket bound to its local endpoint (a
NAT-keepalive, flagged `nat_keepalive`, as its single 0xFF octet without the
non-ESP marker, RFC 3948 2.3); the answer to an IKE_SA_INIT this instance
forwarded comes on its own subject (`subjects.ingress_instance_send`) with the
init route attached. Learned: those init routes, and the `InitRoute`s a worker
publishes to all ingress instances otherwise. Every socket is claimed for this
farm first (`shared/udp_endpoints.py`): another farm on it is refused at start.
See `docs/architecture.md`.

DoS gate (`shared/dos/gate.py`, issue 5): a new IKE_SA_INIT (SPIr = 0, no init
route) is decided before it reaches a worker: forwarded, answered with a
stateless N(COOKIE) straight from this socket, or dropped with a counted
reason. While cookies are on, one without a cookie is decided and answered as it
is read (`_gate_at_read`): a spoofed flood never waits in the backlog. The gate
sees the farm's load from the workers' `IkeLoad` and the other ingress
instances' `IngressLoad`; this instance reports its own pending inits the same
way. The cookie secret comes from the farm's KV bucket
(`cookie_secret.py`).

Owned shards: the same `IkeLoad` reports tell which shards have a live worker
(`routing.ShardOwners`); a datagram for a shard nobody owns, or a new
IKE_SA_INIT while no worker reports at all, is dropped and counted
(`dropped.shard_unowned`, `dropped.no_worker`) instead of being published to a
subject nobody listens to. For its first `OWNERS_LEARNING` seconds an ingress
has not heard every worker yet and forwards as before; so too after it was
itself stopped or starved (`owners_relearn`), when the reports it missed may
still wait unread behind the datagrams.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import math
import os
import socket
import time
from typing import Any

from nats.aio.msg import Msg
from opentelemetry.trace import SpanKind, Status, StatusCode

from ikefarm.proto import subjects
from ikefarm.proto.messages import (
    IkeLoad,
    IngressLoad,
    InitRoute,
    KernelBackend,
    KernelBackendRequest,
    OutboundDatagram,
    PeerBackoff,
)
from ikefarm.services.ingress import major_version
from ikefarm.services.ingress.backlog import (
    CLASS_NAMES,
    ESTABLISHED,
    NEW,
    RETURNS_COOKIE,
    Backlog,
    returns_cookie,
)
from ikefarm.services.ingress.cookie_secret import CookieSecretStore
from ikefarm.services.ingress.routing import (
    NAT_KEEPALIVE,
    NO_WORKER,
    ROUTE_SHARD,
    SHARD_UNOWNED,
    ZERO_SPI,
    Dropped,
    InitRouteTable,
    Route,
    Router,
    ShardOwners,
)
from ikefarm.services.ingress.sockets import (
    LocalEndpoint,
    local_endpoints,
    open_udp_socket,
    socket_statistics,
)
from ikefarm.shared.bus.datagram import datagram_message
from ikefarm.shared.bus.runtime import Runtime, ServiceBase
from ikefarm.shared.dos.cookies import CookieJar, init_request
from ikefarm.shared.dos.gate import COOKIE, DROP, IngressGate, Verdict
from ikefarm.shared.dos.limits import dos_limits
from ikefarm.shared.dos.load import STALE_AFTER, FarmLoad
from ikefarm.shared.ikev2.constants import (
    IKE_HEADER_LENGTH,
    NON_ESP_MARKER,
    ExchangeType,
    HeaderFlag,
)
from ikefarm.shared.ikev2.message import IKE_MAJOR_VERSION
from ikefarm.shared.observability.tracing import tracer
from ikefarm.shared.udp_endpoints import (
    EndpointClaim,
    canonical_address,
    claim,
    farm_id,
)
from ikefarm.shared.xfrm_socket import decapsulate_esp_in_udp

# received datagrams waiting to be routed; beyond this the worst class is dropped (backlog.py)
RECEIVE_QUEUE_SIZE = 4096
# datagrams read from one socket per readiness event before the loop runs something else:
# reading and classifying one costs a few microseconds, routing it (gate, span, publish) far
# more, so more are read than routed per turn of the loop: under a flood the backlog, not
# the socket buffer, fills, and its classes decide what is served first
READ_BATCH = 256
# datagrams routed (and published) between two yields of the routing task
ROUTE_BATCH = 32
# sends from the bus between two yields: a read of the broker socket brings hundreds at once
SEND_BATCH = 64
MAX_DATAGRAM = 65535
# drops that are normal traffic on the NAT-T port, not IKE: no span for them
_UNTRACED_DROPS = frozenset({"nat_keepalive", "esp_in_udp", "empty"})
LOAD_INTERVAL = 1.0  # s between IngressLoad reports when nothing changes
MODE_CHECK = 0.25  # s between looks at the gate's modes (cookies on/off, limits)
# workers report every second (services/ike LOAD_INTERVAL): after this long listening an
# ingress has heard every live one, and a shard still unreported has no owner
OWNERS_LEARNING = STALE_AFTER * 1.0
# this long without a beat of the load task (every MODE_CHECK / 5): the process was stopped
# or starved, and the workers' reports it missed may still be unread
STALLED_AFTER = 0.5
# how long the first ask for the kernel service's backend is retried while none answers; a
# kernel service that starts later says it on EVENT_KERNEL_BACKEND
BACKEND_ASK_FOR = 30.0
KERNEL_BACKENDS = frozenset({"netlink", "userspace", "memory"})
# datagrams for shards nobody owns can come in floods: one debug line per this many seconds
UNOWNED_LOG_EVERY = 1.0
_UNOWNED_DROPS = frozenset({SHARD_UNOWNED, NO_WORKER})
# RFC 7296 3.1 header octets the read path looks at before anything is decoded
_SPI_R_AT, _VERSION_AT, _EXCHANGE_AT, _FLAGS_AT = 8, 17, 18, 19
_IKE_SA_INIT = int(ExchangeType.IKE_SA_INIT)
_RESPONSE = int(HeaderFlag.RESPONSE)


class _Received:
    """A datagram read and routed (its header read once), waiting for its turn."""

    __slots__ = (
        "data",
        "endpoint",
        "gated",
        "received_ns",
        "remote_address",
        "remote_port",
        "verdict",
    )

    def __init__(
        self,
        endpoint: LocalEndpoint,
        data: bytes,
        remote_address: str,
        remote_port: int,
        received_ns: int,
        verdict: Route | Dropped,
        gated: Verdict | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.data = data
        self.remote_address = remote_address
        self.remote_port = remote_port
        self.received_ns = received_ns
        self.verdict = verdict
        self.gated = gated  # the DoS gate's verdict when it was decided at the read


class _UdpEndpoint:
    """One bound non-blocking socket: the loop calls `service.readable` when it has data."""

    def __init__(self, endpoint: LocalEndpoint, sock: socket.socket) -> None:
        self.endpoint = endpoint
        self.sock = sock
        self.fd = sock.fileno()


def _errno(exc: Exception) -> int | None:
    return exc.errno if isinstance(exc, OSError) else None


class IngressService(ServiceBase):
    name = "ingress"
    subsystem = "network"
    description = "ikefarm ingress: UDP 500/4500, NAT-T, DoS gating, routing by SPI shard"

    def __init__(self, runtime: Runtime) -> None:
        super().__init__(runtime)
        self.router = Router(self.runtime.counters, InitRouteTable())
        self.endpoints: dict[tuple[str, int], _UdpEndpoint] = {}
        self.natt_port: int = self.config.ingress.natt_port
        self.backlog: Backlog[_Received] = Backlog(RECEIVE_QUEUE_SIZE)
        self._backlog_ready = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self._claim = EndpointClaim()
        self._sends_since_yield = 0
        self._answers_direct = False  # subscribed to its own send subject
        self.gate = IngressGate(
            dos_limits(self.config),
            FarmLoad(self.runtime.instance),
            counters=self.runtime.counters,
        )
        self.secrets: CookieSecretStore | None = None
        self._load_seq = time.time_ns() // 1_000_000  # above any earlier life's
        self._reported_pending = -1
        self._load_task: asyncio.Task[None] | None = None
        self._major_version_answers = major_version.new_bucket()
        self._unowned_log_at = -math.inf
        self._unowned_unlogged = 0
        self._beat = time.monotonic()
        self._cookies_inline = False
        self._log_cookies = False
        # what the kernel service runs (`auto`: learned on the bus) and whether the NAT-T
        # sockets carry UDP_ENCAP because of it
        self.kernel_backend = self.config.kernel.backend
        self.udp_encap = False
        self._backend_task: asyncio.Task[None] | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    async def setup(self) -> None:
        loop = asyncio.get_running_loop()
        wanted = local_endpoints(self.config)
        # which part takes ESP-in-UDP off the NAT-T port (docs/kernel-netlink.md, "The IKE
        # sockets"): the userspace dataplane reads it from its own raw socket (the filter
        # keeps it off ours), the kernel's SAs need UDP_ENCAP; `auto` gets the filter and
        # UDP_ENCAP only once the kernel service says it became netlink (without ESP
        # states the kernel answers ESP-in-UDP on a UDP_ENCAP socket with an ICMP error);
        # with `memory` ingress sees and counts it
        backend = self.config.kernel.backend
        esp_elsewhere = backend in ("userspace", "auto")
        esp_in_kernel = backend == "netlink"
        self.udp_encap = esp_in_kernel
        if not wanted:
            self.log.control(
                "no_listen_address", hint="set [ingress] listen or a vpn local-address"
            )
        try:
            # another farm on these endpoints is refused here; our own instances share them
            claim(
                [(e.address, e.port) for e in wanted],
                farm_id(self.runtime.nats_url),
                f"ingress {self.runtime.instance}, pid {os.getpid()}",
                into=self._claim,
            )
            for endpoint in wanted:
                try:
                    sock = open_udp_socket(
                        endpoint.address,
                        endpoint.port,
                        drop_esp=endpoint.natt and esp_elsewhere,
                        kernel_esp=endpoint.natt and esp_in_kernel,
                        require_bypass=backend == "netlink",
                    )
                except OSError as exc:
                    raise OSError(
                        exc.errno, f"ingress cannot bind UDP {endpoint}: {exc.strerror}"
                    ) from None
                protocol = _UdpEndpoint(endpoint, sock)
                self.endpoints[(endpoint.address, endpoint.port)] = protocol
                loop.add_reader(protocol.fd, self.readable, protocol)
                self.log.control("listening", local=str(endpoint), natt=endpoint.natt)
        except BaseException:
            self._close_sockets()
            raise
        assert self.runtime.nc is not None
        self.secrets = CookieSecretStore(
            self.runtime.nc,
            float(self.config.ingress.cookie_secret_lifetime),
            self._take_cookie_jar,
            self.runtime.counters,
        )
        await self.secrets.start()
        self.runtime.on_reconnect(self.secrets.rewatch)
        self.router.owners = ShardOwners(time.monotonic(), OWNERS_LEARNING)
        await self.runtime.subscribe(subjects.IKE_LOAD, IkeLoad, self.on_ike_load, traced=False)
        await self.runtime.subscribe(
            subjects.INGRESS_LOAD, IngressLoad, self.on_ingress_load, traced=False
        )
        await self.runtime.subscribe(subjects.INGRESS_BACKOFF, PeerBackoff, self.on_backoff)
        self.log.control("dos_gate", cookie_mode=self.gate.limits.cookie_mode)
        self._load_task = asyncio.create_task(self._report_load(), name="ingress-load")
        self._worker = asyncio.create_task(self._route_received(), name="ingress-route")
        await self.runtime.subscribe(
            subjects.INGRESS_SEND, OutboundDatagram, self.on_send, queue=subjects.QUEUE_INGRESS
        )
        own_send = subjects.ingress_instance_send(self.runtime.instance)
        if own_send is not None:  # answers to the IKE_SA_INITs this instance forwarded
            await self.runtime.subscribe(own_send, OutboundDatagram, self.on_send)
            self._answers_direct = True
        # no queue group: every ingress instance must learn every init route
        await self.runtime.subscribe(subjects.INGRESS_INIT_ROUTE, InitRoute, self.on_init_route)
        if backend == "auto":
            # told at the kernel service's start (it starts later) or asked (it runs)
            await self.runtime.subscribe(
                subjects.EVENT_KERNEL_BACKEND, KernelBackend, self.on_kernel_backend
            )
            self._backend_task = asyncio.create_task(self._ask_kernel_backend(), name="backend")

    async def _ask_kernel_backend(self) -> None:
        """Which backend `auto` became, asked once (retried while no kernel service answers);
        one that starts later publishes it and `on_kernel_backend` hears that."""
        try:
            reply = await self.runtime.request(
                subjects.KERNEL_BACKEND,
                KernelBackendRequest(),
                KernelBackend,
                retry_for=BACKEND_ASK_FOR,
                idempotent=True,
            )
        except Exception as exc:  # NoResponders, timeout, a refusal: the event still comes
            self.log.control("kernel_backend_unknown", error=type(exc).__name__)
            return
        await self.on_kernel_backend(reply, None)

    async def on_kernel_backend(self, message: KernelBackend, _msg: Any) -> None:
        """`UDP_ENCAP` on the NAT-T sockets while the kernel decapsulates (netlink), off
        otherwise (docs/kernel-netlink.md, "The IKE sockets")."""
        if message.backend not in KERNEL_BACKENDS:
            self.runtime.counters["kernel_backend.unknown"] += 1
            return
        on = message.backend == "netlink"
        self.kernel_backend = message.backend
        if on == self.udp_encap:
            return
        for protocol in self.endpoints.values():
            if protocol.endpoint.natt:
                decapsulate_esp_in_udp(protocol.sock, on)
        self.udp_encap = on
        self.log.control("natt_udp_encap", backend=message.backend, udp_encap=on)

    async def teardown(self) -> None:
        if self._backend_task is not None:
            self._backend_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._backend_task
            self._backend_task = None
        self._close_sockets()
        if self.secrets is not None:
            await self.secrets.stop()
        if self._load_task is not None:
            self._load_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._load_task
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None

    def _close_sockets(self) -> None:
        loop = asyncio.get_running_loop()
        for protocol in self.endpoints.values():
            loop.remove_reader(protocol.fd)
            protocol.sock.close()
        self.endpoints.clear()
        self._claim.release()

    def gauges(self) -> dict[str, Any]:
        now = time.monotonic()
        self.router.init_routes.purge(now)
        owners = self.router.owners
        return {
            "sockets": len(self.endpoints),
            "init_routes": len(self.router.init_routes),
            "receive_queue": len(self.backlog),
            "backlog": {**self.backlog.sizes(), "peak": self.backlog.peak},
            "socket": socket_statistics([p.sock for p in self.endpoints.values()]),
            "owned_shards": owners.shards(now) if owners is not None else [],
            "owners_learning": owners.learning(now) if owners is not None else True,
            "kernel_backend": self.kernel_backend,
            "natt_udp_encap": self.udp_encap,
            "dos": self.dos_state(),
        }

    def dos_state(self) -> dict[str, Any]:
        now = time.monotonic()
        gate = self.gate
        return {
            "cookie_mode": gate.limits.cookie_mode,
            "cookies_active": gate.cookies_active(now),
            "half_open": gate.half_open(now),
            "half_open_peak": gate.half_open_peak,
            "pending": gate.load.pending(now),
            "established": gate.load.established(now),
            "workers_reporting": gate.load.shards(now),
            "backoff_peers": len(gate.backoff),
            "cookie_secret_version": self.secrets.version if self.secrets else None,
        }

    def _take_cookie_jar(self, jar: CookieJar) -> None:
        self.gate.cookies = jar

    # --- received datagrams ------------------------------------------------------------------

    def readable(self, protocol: _UdpEndpoint) -> None:
        """Loop callback: read up to READ_BATCH datagrams (until the socket would block), read
        each one's header and queue it by class; the routing task does the rest."""
        sock, endpoint = protocol.sock, protocol.endpoint
        counters = self.runtime.counters
        received_ns = time.time_ns()
        now = time.monotonic()
        self._check_stall(now)  # before routing: after a stop, shard owners are learned anew
        # cookies on: a new IKE_SA_INIT is answered at its read, never queued (see received)
        self._cookies_inline = self.gate.cookies is not None and self.gate.cookies_active(now)
        self._log_cookies = self._cookies_inline and self.log.enabled(3)  # raw: each cookie
        read = 0
        for _ in range(READ_BATCH):
            try:
                data, remote = sock.recvfrom(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:  # e.g. an ICMP error queued on the socket
                counters["socket_errors"] += 1
                self.log.debug(
                    "socket_error", local=str(endpoint), error=type(exc).__name__, errno=exc.errno
                )
                continue
            read += 1
            try:
                self.received(endpoint, data, remote, now, received_ns)
            except Exception as exc:  # one bad datagram never stops the reading
                counters["handler_failed"] += 1
                self.log.control("datagram_handling_failed", error=type(exc).__name__)
        if read:
            counters["received"] += read
            counters["read_batches"] += 1
            if read == READ_BATCH:
                counters["read_batches_full"] += 1

    def received(
        self,
        endpoint: LocalEndpoint,
        data: bytes,
        remote: tuple[Any, ...],
        now: float,
        received_ns: int,
    ) -> None:
        """One datagram read: routed (its header read here, once) and queued by class."""
        remote_address = str(remote[0])
        if ":" in remote_address:  # IPv4 text from the kernel is canonical already
            remote_address = canonical_address(remote_address)
        remote_port = int(remote[1])
        gated: Verdict | None = None
        if self._cookies_inline:
            gated = self._gate_at_read(endpoint, data, remote_address, remote_port, now)
            if gated is not None and gated.action == COOKIE:
                return
        verdict = self.router.route(
            data,
            natt=endpoint.natt,
            remote_address=remote_address,
            remote_port=remote_port,
            now=now,
        )
        if isinstance(verdict, Route):
            if verdict.kind == ROUTE_SHARD:
                klass = ESTABLISHED
            elif returns_cookie(verdict.data, int(verdict.header.next_payload)):
                klass = RETURNS_COOKIE
            else:
                klass = NEW
        elif verdict.reason in _UNTRACED_DROPS:
            return  # counted by the router
        elif verdict.reason in _UNOWNED_DROPS:
            # counted by the router; no span each, so a flood of them costs no traces
            self._log_unowned(verdict, remote_address, remote_port, now)
            return
        else:
            klass = NEW  # dropped with a span and a log line, or answered (major version)
        if gated is not None and not isinstance(verdict, Route):
            gated = None  # not a new init after all (cannot be: the same octets were read)
        item = _Received(endpoint, data, remote_address, remote_port, received_ns, verdict, gated)
        dropped = self.backlog.push(klass, item, now)
        if dropped is not None:
            self.runtime.counters[f"dropped.backlog.{CLASS_NAMES[dropped]}"] += 1
        self._backlog_ready.set()

    def _gate_at_read(
        self, endpoint: LocalEndpoint, data: bytes, address: str, port: int, now: float
    ) -> Verdict | None:
        """While cookies are on, a new IKE_SA_INIT without a cookie is decided as it is read
        and, as nearly always, answered with N(COOKIE) at once (RFC 7296 2.6: stateless): a
        spoofed flood then costs one read, one HMAC and one send per packet, and never fills
        the backlog that established SAs and returning cookies share. None when the datagram
        is anything else (it is routed and queued as usual); a verdict other than COOKIE (a
        drop, or a forward when the half-open count fell at that instant) goes with the
        datagram through the queue, so the gate decides each datagram once."""
        message = data
        if endpoint.natt:
            if not data.startswith(NON_ESP_MARKER):
                return None
            message = data[len(NON_ESP_MARKER) :]
        if (
            len(message) < IKE_HEADER_LENGTH
            or message[_EXCHANGE_AT] != _IKE_SA_INIT
            or message[_FLAGS_AT] & _RESPONSE
            or message[_VERSION_AT] >> 4 != IKE_MAJOR_VERSION
            or message[_SPI_R_AT : _SPI_R_AT + 8] != ZERO_SPI
            or message[:8] == ZERO_SPI
        ):
            return None
        request = init_request(message)
        if request is None or request.cookie is not None:
            return None  # malformed (the router says why), or a cookie returning: queued
        router = self.router
        if router.init_routes.lookup(address, port, request.spi_i, now) is not None:
            return None  # a retransmission, for the worker that holds its half-open SA
        if router.owners is not None and not router.owners.any_owned(now):
            return None  # the router drops it (no_worker)
        gated = self.gate.decide(request, address, now)
        self._log_mode_changes()
        if gated.action == COOKIE and gated.reply is not None:
            self.runtime.counters["routed.init"] += 1
            self._send_raw(endpoint, gated.reply, address, port)
            if self._log_cookies:
                self.log.raw("cookie_sent", remote=f"{address}[{port}]")
        return gated

    async def _route_received(self) -> None:
        counters = self.runtime.counters
        while True:
            if not len(self.backlog):
                self._backlog_ready.clear()
                await self._backlog_ready.wait()
            now = time.monotonic()
            self._check_stall(now)
            for _ in range(ROUTE_BATCH):
                item = self.backlog.pop(now)
                if item is None:
                    break
                try:
                    await self.handle_datagram(item, now)
                except Exception as exc:  # one bad datagram never stops the routing task
                    counters["handler_failed"] += 1
                    self.log.control("datagram_handling_failed", error=type(exc).__name__)
            if self.backlog.stale:
                counters["dropped.backlog_stale.new"] = self.backlog.stale
            # the reads, the sends and the broker get their turn; what was published in
            # this batch leaves in one write to the broker
            await asyncio.sleep(0)

    async def handle_datagram(self, item: _Received, now: float) -> None:
        endpoint = item.endpoint
        remote_address, remote_port = item.remote_address, item.remote_port
        verdict = item.verdict
        if isinstance(verdict, Dropped) and verdict.reason == "invalid_major_version":
            self._answer_major_version(endpoint, item.data, remote_address, remote_port, now)
        gated = item.gated
        if gated is None and isinstance(verdict, Route) and verdict.subject == subjects.IKE_INIT:
            gated = self._gate(verdict, remote_address, now)
            if gated.action == COOKIE and gated.reply is not None:
                # stateless and cheap on purpose: a flood is answered without a span each
                # (counted as gate.cookie_sent); the retry with the cookie gets its span
                self._send_raw(endpoint, gated.reply, remote_address, remote_port)
                self.log.raw("cookie_sent", remote=f"{remote_address}[{remote_port}]")
                return
        with tracer().start_as_current_span(
            "ingress.datagram",
            kind=SpanKind.SERVER,
            start_time=item.received_ns,
            attributes={
                "net.host.ip": endpoint.address,
                "net.host.port": endpoint.port,
                "net.peer.ip": remote_address,
                "net.peer.port": remote_port,
                "ikefarm.instance": self.runtime.instance,
            },
        ) as span:
            if isinstance(verdict, Dropped):
                span.set_attribute("ikefarm.route", "dropped")
                span.set_attribute("ikefarm.drop_reason", verdict.reason)
                span.set_status(Status(StatusCode.ERROR, verdict.reason))
                self.log.debug(
                    "datagram_dropped",
                    reason=verdict.reason,
                    local=str(endpoint),
                    remote=f"{remote_address}[{remote_port}]",
                    length=len(item.data),
                )
                return
            self._annotate(span, verdict)
            via = ""
            if gated is not None:
                span.set_attribute("ikefarm.dos.half_open", self.gate.half_open(now))
                span.set_attribute("ikefarm.dos.cookie_mode", self.gate.limits.cookie_mode)
                span.set_attribute("ikefarm.dos.cookies_active", self.gate.cookies_active(now))
                span.set_attribute("ikefarm.dos.gate", gated.action)
                if gated.action == DROP:
                    span.set_attribute("ikefarm.drop_reason", gated.reason)
                    span.set_status(Status(StatusCode.ERROR, gated.reason))
                    self.log.debug(
                        "ike_sa_init_gated",
                        reason=gated.reason,
                        remote=f"{remote_address}[{remote_port}]",
                    )
                    return
                via = self.runtime.instance
                self._reported_pending = -1  # report the new pending count soon
            try:
                await self.runtime.publish(
                    verdict.subject,
                    datagram_message(
                        verdict.header,
                        verdict.data,
                        local=(endpoint.address, endpoint.port),
                        remote=(remote_address, remote_port),
                        natt=endpoint.natt,
                        via=via,
                        answer_direct=bool(via) and self._answers_direct,
                    ),
                )
            except Exception as exc:
                self.runtime.counters["publish_failed"] += 1
                span.set_status(Status(StatusCode.ERROR, "publish_failed"))
                self.log.control("datagram_publish_failed", error=type(exc).__name__)
                return
            self.log.debug(
                "datagram_routed",
                exchange=_exchange_name(verdict.header.exchange_type),
                message_id=verdict.header.message_id,
                response=verdict.header.is_response,
                route=verdict.kind,
                shard=verdict.shard,
                local=str(endpoint),
                remote=f"{remote_address}[{remote_port}]",
            )

    def _check_stall(self, now: float) -> None:
        if now - self._beat > STALLED_AFTER and self.router.owners is not None:
            self.router.owners.relearn(now)
            self.runtime.counters["owners_relearn"] += 1
        self._beat = max(self._beat, now)

    def _log_unowned(self, dropped: Dropped, address: str, port: int, now: float) -> None:
        if now - self._unowned_log_at < UNOWNED_LOG_EVERY:
            self._unowned_unlogged += 1
            return
        self.log.debug(
            "datagram_dropped",
            reason=dropped.reason,
            shard=dropped.shard,
            remote=f"{address}[{port}]",
            not_logged_before=self._unowned_unlogged,
        )
        self._unowned_log_at = now
        self._unowned_unlogged = 0

    @staticmethod
    def _annotate(span: Any, route: Route) -> None:
        header = route.header
        span.set_attribute("ike.exchange_type", _exchange_name(header.exchange_type))
        span.set_attribute("ike.message_id", header.message_id)
        span.set_attribute("ike.spi_i", header.spi_i.hex())
        span.set_attribute("ike.spi_r", header.spi_r.hex())
        span.set_attribute("ike.response", header.is_response)
        span.set_attribute("ikefarm.route", route.kind)
        span.set_attribute("messaging.destination", route.subject)
        if route.shard is not None:
            span.set_attribute("ikefarm.shard", route.shard)

    def _gate(self, route: Route, remote_address: str, now: float) -> Verdict:
        """The DoS gate's verdict on a new IKE_SA_INIT (SPIr = 0, no init route)."""
        request = init_request(route.data, route.header)
        if request is None:
            verdict = self.gate.drop("malformed_ike_sa_init")
        else:
            verdict = self.gate.decide(request, remote_address, now)
        self._log_mode_changes()
        return verdict

    def _answer_major_version(
        self, endpoint: LocalEndpoint, data: bytes, address: str, port: int, now: float
    ) -> None:
        """RFC 7296 2.5: tell the sender of a higher major version which one we speak."""
        message = data[len(NON_ESP_MARKER) :] if endpoint.natt else data
        answer = major_version.answer(message)
        if answer is None:
            return
        if not self._major_version_answers.allow(now):
            self.runtime.counters["invalid_major_version_rate_limited"] += 1
            return
        self._send_raw(endpoint, answer, address, port)
        self.runtime.counters["invalid_major_version_sent"] += 1

    def _send_raw(self, endpoint: LocalEndpoint, data: bytes, address: str, port: int) -> None:
        protocol = self.endpoints.get((endpoint.address, endpoint.port))
        if protocol is None:
            self.runtime.counters["send_no_socket"] += 1
            return
        if endpoint.natt:
            data = NON_ESP_MARKER + data  # RFC 3948 2.2
        if self._sendto(protocol, data, address, port):
            self.runtime.counters["sent"] += 1

    def _sendto(self, protocol: _UdpEndpoint, data: bytes, address: str, port: int) -> bool:
        """Send now or count why not: a full socket buffer drops (UDP), it never queues."""
        try:
            protocol.sock.sendto(data, (address, port))
        except (BlockingIOError, InterruptedError):
            self.runtime.counters["send_dropped.buffer_full"] += 1
            return False
        except OSError as exc:
            self.runtime.counters["socket_errors"] += 1
            self.log.debug(
                "socket_error",
                local=str(protocol.endpoint),
                error=type(exc).__name__,
                errno=_errno(exc),
            )
            return False
        return True

    def _log_mode_changes(self) -> None:
        for change in self.gate.take_changes():
            if change.what == "cookies":
                event = "cookies_on" if change.active else "cookies_off"
            else:
                event = "limit_reached" if change.active else "limit_cleared"
            self.runtime.counters[f"dos_mode.{event}"] += 1
            self.log.control(event, limit=change.what, half_open=change.half_open)

    # --- farm-wide load ----------------------------------------------------------------------

    async def on_ike_load(self, message: IkeLoad, _msg: Msg) -> None:
        now = time.monotonic()
        refused = self.gate.load.update_shard(message, now)
        if refused is not None:
            self.runtime.counters[f"load_refused.{refused}"] += 1
            return
        if self.router.owners is not None:
            # validated by update_shard: a shard number and a positive finite interval
            self.router.owners.reported(message.shard, message.interval, now)

    async def on_ingress_load(self, message: IngressLoad, _msg: Msg) -> None:
        refused = self.gate.load.update_ingress(message, time.monotonic())
        if refused is not None:
            self.runtime.counters[f"load_refused.{refused}"] += 1

    async def on_backoff(self, message: PeerBackoff, _msg: Msg) -> None:
        try:
            peer = canonical_address(message.address)
        except ValueError:
            self.runtime.counters["backoff_refused"] += 1
            return
        if message.phase not in ("init", "auth"):
            self.runtime.counters["backoff_refused"] += 1
            return
        self.gate.backoff.add(peer, message.phase, message.seconds, time.monotonic())
        self.runtime.counters[f"backoff_learned.{message.phase}"] += 1

    async def _report_load(self) -> None:
        """IngressLoad when the pending count changed (checked often) and every LOAD_INTERVAL;
        the gate's modes are re-evaluated on the same beat, so "cookies off" shows up too."""
        since = LOAD_INTERVAL
        while True:
            await asyncio.sleep(MODE_CHECK / 5)
            since += MODE_CHECK / 5
            now = time.monotonic()
            self._check_stall(now)
            pending = self.gate.load.own_pending(now)
            if pending == self._reported_pending and since < LOAD_INTERVAL:
                continue
            self.gate.refresh_modes(now)
            self._log_mode_changes()
            self._load_seq += 1
            self._reported_pending = pending
            since = 0.0
            try:
                await self.runtime.publish(
                    subjects.INGRESS_LOAD,
                    IngressLoad(self.runtime.instance, self._load_seq, pending, LOAD_INTERVAL),
                )
            except Exception as exc:
                self.runtime.counters["load_publish_failed"] += 1
                self.log.debug("load_publish_failed", error=type(exc).__name__)

    # --- bus handlers ------------------------------------------------------------------------

    async def on_send(self, message: OutboundDatagram, _msg: Msg) -> None:
        """Send an ike worker's datagram from the socket bound to its local endpoint (and
        learn the init route an IKE_SA_INIT answer brings along)."""
        self._sends_since_yield += 1
        if self._sends_since_yield >= SEND_BATCH:
            # one read of the broker socket can bring hundreds of these: let the socket
            # reads and the routing task run between them
            self._sends_since_yield = 0
            await asyncio.sleep(0)
        if message.init_route is not None:
            self._learn_init_route(message.init_route)
        try:
            local = (canonical_address(message.local_address), message.local_port)
            remote = ipaddress.ip_address(message.remote_address)
        except ValueError:
            self.runtime.counters["send_bad_address"] += 1
            self.log.control("send_bad_address", local=message.local_address)
            return
        protocol = self.endpoints.get(local)
        if protocol is None:
            self.runtime.counters["send_no_socket"] += 1
            self.log.control("send_no_socket", local=f"{local[0]}[{local[1]}]", remote=str(remote))
            return
        if remote.version != ipaddress.ip_address(local[0]).version or not (
            0 < message.remote_port <= 0xFFFF
        ):
            self.runtime.counters["send_bad_address"] += 1
            self.log.control(
                "send_bad_address",
                local=f"{local[0]}[{local[1]}]",
                remote=f"{remote}[{message.remote_port}]",
            )
            return
        data = message.data
        if message.nat_keepalive:
            # RFC 3948 2.3: one 0xFF octet, from the NAT-T port, with no non-ESP marker
            if data != NAT_KEEPALIVE or not protocol.endpoint.natt:
                self.runtime.counters["send_bad_keepalive"] += 1
                self.log.control(
                    "send_bad_keepalive", local=str(protocol.endpoint), length=len(data)
                )
                return
            if self._sendto(protocol, data, str(remote), message.remote_port):
                self.runtime.counters["sent_nat_keepalive"] += 1
            return
        if protocol.endpoint.natt:
            data = NON_ESP_MARKER + data  # RFC 3948 2.2
        if not self._sendto(protocol, data, str(remote), message.remote_port):
            return
        self.runtime.counters["sent"] += 1
        self.log.debug(
            "datagram_sent",
            local=str(protocol.endpoint),
            remote=f"{remote}[{message.remote_port}]",
            length=len(data),
        )

    async def on_init_route(self, message: InitRoute, _msg: Msg) -> None:
        """A worker holds the half-open SA of (peer, SPIi): its retransmissions go there."""
        self._learn_init_route(message)

    def _learn_init_route(self, message: InitRoute) -> None:
        try:
            self.router.init_routes.learn(
                message.remote_address,
                message.remote_port,
                message.spi_i,
                message.shard,
                message.lifetime,
                time.monotonic(),
            )
        except ValueError as exc:
            self.runtime.counters["init_route_refused"] += 1
            self.log.control("init_route_refused", reason=str(exc))
            return
        self.runtime.counters["init_route_learned"] += 1
        self.log.debug(
            "init_route_learned",
            remote=f"{message.remote_address}[{message.remote_port}]",
            spi_i=message.spi_i.hex(),
            shard=message.shard,
            lifetime=message.lifetime,
        )


def _exchange_name(exchange_type: Any) -> str:
    return str(getattr(exchange_type, "name", exchange_type))
