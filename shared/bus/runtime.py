"""What every ikefarm service process runs on: NATS connection, discovery, envelopes, spans, drain.

A service is a thin adapter (`ServiceBase` subclass): in `setup()` it declares
endpoints (request/reply, registered with `nats.micro` so `$SRV.PING/INFO/STATS`
discovery works with standard NATS tooling) and subscriptions (events); the
runtime decodes envelopes, continues the caller's trace from `traceparent`,
answers structured errors for bad input, counts every drop by reason, and on
SIGTERM drains the connection so nothing in flight is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.micro import add_service
from nats.micro.request import Request
from nats.micro.service import Service as MicroService
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from ikefarm.proto import envelope, subjects
from ikefarm.proto.envelope import BusError, BusMessage
from ikefarm.proto.messages import Ping, Pong, Stats, StatsRequest
from ikefarm.shared.bus import gc_freeze
from ikefarm.shared.bus.auth import read_credentials
from ikefarm.shared.bus.servers import server_urls
from ikefarm.shared.config.loader import Config
from ikefarm.shared.observability.latency import BUS_REQUEST_DURATION, Latencies
from ikefarm.shared.observability.logging import configure_logging, get_logger
from ikefarm.shared.observability.tracing import (
    configure_tracing,
    extract_context,
    inject_headers,
    shutdown_tracing,
    tracer,
)

if TYPE_CHECKING:
    from ikefarm.shared.observability.metrics import MetricsExport, MetricsServer

VERSION = "0.1.0"
M = TypeVar("M", bound=BusMessage)
RequestHandler = Callable[[Any, Msg | Request], Awaitable[BusMessage | dict[str, Any]]]
EventHandler = Callable[[Any, Msg], Awaitable[None]]

log = get_logger("daemon")
RETRY_FIRST_DELAY = 0.05  # s: Runtime.request(retry_for=...) backoff
RETRY_MAX_DELAY = 1.0


def default_instance(service: str) -> str:
    host = socket.gethostname().replace(".", "_")
    return f"{service}-{host}-{os.getpid()}"


async def subscriptions_in_place(nc: Client, timeout: float = 5.0) -> None:
    """Return once the server has every subscription this connection made so far.

    nats-py's flush() writes its PING straight to the socket while earlier SUBs may
    still sit in the client's pending buffer, so a PONG proves nothing about them.
    A message to a fresh inbox goes through that buffer behind them instead: when it
    comes back, the server has processed every earlier SUB, and a publisher on any
    other connection reaches them.
    """
    inbox = nc.new_inbox()
    echo = await nc.subscribe(inbox, max_msgs=1)
    await nc.publish(inbox, b"")
    await echo.next_msg(timeout=timeout)


class ServiceUnavailable(RuntimeError):
    """This service cannot run with this config; the message says why and what to do."""


class ServiceBase:
    """One service kind. Subclasses set `name` and `subsystem` and register in `setup()`."""

    name: ClassVar[str] = ""
    subsystem: ClassVar[str] = "daemon"
    description: ClassVar[str] = ""
    # "uvloop": the process runs on uvloop, whose loop and transports cost about half of
    # asyncio's per bus message (ops/bench/RESULTS.md, "uvloop"); "asyncio": the stdlib loop.
    # Not for the kernel service (uvloop refuses its netlink socket as a datagram endpoint:
    # "cannot open a UDP handle, invalid family 16") nor the keystore (uvloop's own pipes)
    event_loop: ClassVar[str] = "asyncio"

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.config = runtime.config
        self.log = get_logger(self.subsystem)

    @classmethod
    def preflight(cls, config: Config) -> None:
        """Refuse a config this service cannot run with, before touching the bus.

        Raise ServiceUnavailable with a sentence for the operator.
        """

    async def setup(self) -> None:
        """Declare endpoints and subscriptions."""

    async def before_drain(self) -> None:
        """Give back what other processes wait for (a claimed shard) while still connected."""

    async def teardown(self) -> None:
        """Release what setup() took; called after the connection drained."""

    def gauges(self) -> dict[str, Any]:
        """Current values (queue depth, table sizes) for the stats endpoint."""
        return {}


class Runtime:
    def __init__(
        self,
        service_cls: type[ServiceBase],
        config: Config,
        nats_url: str,
        instance: str | None = None,
        options: dict[str, Any] | None = None,
    ) -> None:
        self.service_cls = service_cls
        self.name = service_cls.name
        self.config = config
        self.nats_url = nats_url
        self.instance = instance or default_instance(self.name)
        self._endpoint_tasks: set[asyncio.Task[None]] = set()  # concurrent endpoints
        self.options = options or {}
        self.counters: Counter[str] = Counter()
        self.started = time.monotonic()
        self.nc: Client | None = None
        self.micro: MicroService | None = None
        self.service: ServiceBase | None = None
        self._stop = asyncio.Event()
        self._requests = 0
        self._errors = 0
        self._subscriptions: list[Any] = []
        self._connected = False
        self._last_connect_error = -1e9
        self._reconnect_listeners: list[Callable[[], None]] = []
        self.metrics: MetricsServer | None = None
        self._metrics_export: MetricsExport | None = None
        self.latencies = Latencies()

    # --- lifecycle -----------------------------------------------------------------------

    async def connect(self, attempts: int | None = None) -> Client:
        """Connect with backoff; once connected nats-py reconnects on its own, forever.

        A stop request (SIGTERM) ends the attempt at once: nats-py's connect() with
        unlimited reconnects retries an unreachable broker inside the call forever, so
        it runs as a task raced against the stop event.
        """
        delay = 0.1
        attempt = 0
        auth: dict[str, str] = {}
        if self.options.get("credentials"):
            user = read_credentials(self.options["credentials"])
            auth = {"user": user.user, "password": user.password}
        while True:
            attempt += 1
            connecting = asyncio.ensure_future(
                nats.connect(
                    servers=server_urls(self.nats_url),
                    **auth,
                    name=self.instance,
                    # replies come to this service kind's own inbox prefix, the only one
                    # its bus user may subscribe to (proto/subjects.py)
                    inbox_prefix=subjects.inbox_prefix(self.name),
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.25,
                    connect_timeout=2,
                    allow_reconnect=True,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                    error_cb=self._on_connect_error,
                    closed_cb=self._on_closed,
                )
            )
            stopping = asyncio.ensure_future(self._stop.wait())
            await asyncio.wait({connecting, stopping}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if self._stop.is_set():
                connecting.cancel()
                with contextlib.suppress(BaseException):
                    await connecting
                raise ConnectionAbortedError("stopped while connecting")
            try:
                nc = connecting.result()
                self._connected = True
                return nc
            except Exception as exc:
                if attempts is not None and attempt >= attempts:
                    raise
                log.control(
                    "nats_connect_failed", url=self.nats_url, error=str(exc), retry_in=delay
                )
                try:
                    await asyncio.wait_for(self._stop.wait(), delay)
                    raise ConnectionAbortedError("stopped while connecting") from exc
                except TimeoutError:
                    pass
                delay = min(delay * 2, 5.0)

    async def _on_connect_error(self, exc: Exception) -> None:
        """Before the first connection nats-py retries inside connect(): say why (level 0, an
        operator must see a service that cannot reach its broker), at most every 5 s."""
        if self._connected:
            await self._on_error(exc)
            return
        now = time.monotonic()
        if now - self._last_connect_error >= 5.0:
            self._last_connect_error = now
            reason = str(exc) or type(exc).__name__
            log.audit("nats_connect_failed", url=self.nats_url, error=reason)

    async def _on_disconnected(self) -> None:
        self.counters["nats_disconnects"] += 1
        log.audit("nats_disconnected", url=self.nats_url)

    async def _on_reconnected(self) -> None:
        self.counters["nats_reconnects"] += 1
        log.audit("nats_reconnected", url=self.nats_url)
        for listener in list(self._reconnect_listeners):
            listener()

    def on_reconnect(self, listener: Callable[[], None]) -> None:
        """Call `listener` after each reconnect. nats-py sends the subscriptions again by
        itself, but a JetStream watch (an ordered push consumer on the server) does not
        survive a server restart: nothing arrives and nothing ends it, so its owner starts
        a new one from here."""
        self._reconnect_listeners.append(listener)

    async def _on_error(self, exc: Exception) -> None:
        log.debug("nats_error", error=str(exc))

    async def _on_closed(self) -> None:
        log.debug("nats_closed")

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(signum, self.request_stop)
        try:
            await self.start()
        except ConnectionAbortedError:
            return 0
        await self._stop.wait()
        await self.stop()
        return 0

    async def start(self) -> None:
        from ikefarm.shared.bus import kv  # it imports this module

        kv.use_replicas(self.config.nats.replicas)  # before the service creates any bucket
        self.nc = await self.connect()
        self.micro = await add_service(
            self.nc,
            name=f"ikefarm-{self.name}",
            version=VERSION,
            description=self.service_cls.description or f"ikefarm {self.name} service",
            metadata={"instance": self.instance, "pid": str(os.getpid())},
        )
        self.service = self.service_cls(self)
        for endpoint, request_type, handler in (
            ("ping", Ping, self._handle_ping),
            ("stats", StatsRequest, self._handle_stats),
        ):
            await self.add_endpoint(endpoint, request_type, handler)
            await self.add_endpoint(
                f"{endpoint}-instance",
                request_type,
                handler,
                subject=subjects.instance_endpoint(self.name, self.instance, endpoint),
            )
        self._make_metrics_export()
        await self.service.setup()
        await subscriptions_in_place(self.nc)
        self._start_metrics()
        log.audit("service_started", nats=self.nats_url, version=VERSION)

    def _metrics_listen(self) -> str:
        return str(self.options.get("metrics_listen") or self.config.telemetry.metrics_listen)

    def _make_metrics_export(self) -> None:
        """The OpenTelemetry meter, before setup so its bus requests are measured too."""
        if not self._metrics_listen():
            return
        from ikefarm.shared.observability.metrics import MetricsExport, loop_source

        self._metrics_export = MetricsExport(
            self.name,
            self.instance,
            VERSION,
            self.latencies,
            loop_source(asyncio.get_running_loop(), self.stats_snapshot),
        )

    def _start_metrics(self) -> None:
        """The Prometheus endpoint (`[telemetry] metrics-listen`), when one is configured.

        An address it cannot bind is logged at level 0; the service runs on without it."""
        listen = self._metrics_listen()
        export = self._metrics_export
        if not listen or export is None:
            return
        from ikefarm.shared.observability.metrics import MetricsServer

        try:
            self.metrics = MetricsServer(listen, export)
        except (OSError, ValueError) as exc:
            log.audit("metrics_listen_failed", listen=listen, error=str(exc))
            return
        log.control("metrics_listening", listen=listen, port=self.metrics.port)

    async def stop(self) -> None:
        log.control("service_draining")
        if self.micro is not None:
            with contextlib.suppress(Exception):
                await self.micro.stop()
        if self.service is not None and self.nc is not None and not self.nc.is_closed:
            with contextlib.suppress(Exception):
                await self.service.before_drain()
        if self.nc is not None and not self.nc.is_closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.nc.drain(), 3)
        if self.service is not None:
            await self.service.teardown()
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        if self._metrics_export is not None:
            self._metrics_export.close()
            self._metrics_export = None
        log.audit("service_stopped")
        shutdown_tracing()

    # --- endpoints and subscriptions ------------------------------------------------------

    async def add_endpoint(
        self,
        endpoint: str,
        request_type: type[M],
        handler: RequestHandler,
        subject: str | None = None,
        queue_group: str | None = None,
        concurrent: bool = False,
    ) -> None:
        """A request/reply endpoint answered by any instance (queue group) of this service.

        `concurrent`: each request runs in a task of its own, so one that waits on the
        network (a RADIUS server) does not hold the ones behind it."""
        assert self.micro is not None
        subject = subject or subjects.service_endpoint(self.name, endpoint)

        async def answer(request: Request) -> None:
            reply, failed = await self._dispatch(endpoint, subject, request_type, handler, request)
            if failed:
                # micro's error header wants an HTTP-like status; the body says precisely
                status = "500" if failed == "internal_error" else "400"
                await request.respond_error(code=status, description=failed, data=reply)
            else:
                await request.respond(reply)

        async def on_request(request: Request) -> None:
            if not concurrent:
                await answer(request)
                return
            task = asyncio.create_task(answer(request))
            self._endpoint_tasks.add(task)
            task.add_done_callback(self._endpoint_tasks.discard)

        await self.micro.add_endpoint(
            name=endpoint, subject=subject, handler=on_request, queue_group=queue_group or "q"
        )

    async def _dispatch(
        self,
        endpoint: str,
        subject: str,
        request_type: type[M],
        handler: RequestHandler,
        request: Msg | Request,
    ) -> tuple[bytes, str]:
        """Decode, trace and run one request; returns (reply bytes, error code or "")."""
        self._requests += 1
        headers = request.headers
        with tracer().start_as_current_span(
            f"{self.name}.{endpoint}",
            context=extract_context(headers),
            kind=SpanKind.SERVER,
            attributes={"messaging.destination": subject, "ikefarm.instance": self.instance},
        ) as span:
            try:
                decoded = envelope.unpack(request.data, request_type)
                result = await handler(decoded, request)
                return envelope.pack_reply(result), ""
            except BusError as exc:
                return self._refuse(span, endpoint, exc.code, exc.message), exc.code
            except Exception as exc:
                log.control("handler_failed", endpoint=endpoint, error=type(exc).__name__)
                return self._refuse(
                    span, endpoint, "internal_error", type(exc).__name__
                ), "internal_error"

    def _refuse(self, span: trace.Span, endpoint: str, code: str, text: str) -> bytes:
        self._errors += 1
        self.counters[f"bus_refused.{code}"] += 1
        span.set_status(Status(StatusCode.ERROR, code))
        log.control("bus_request_refused", endpoint=endpoint, code=code, reason=text)
        return envelope.pack_error(code, text)

    async def subscribe(
        self,
        subject: str,
        message_type: type[M],
        handler: EventHandler,
        queue: str | None = None,
        span_name: str | None = None,
        traced: bool = True,
    ) -> Any:
        """An event subscription (returned, for a service that ends it before it stops);
        bad messages are counted and dropped, never fatal.

        `traced=False` for periodic reports (the load snapshots every second): a span
        each would make a trace each, burying the exchanges' traces."""
        assert self.nc is not None

        async def on_message(msg: Msg) -> None:
            with (
                tracer().start_as_current_span(
                    span_name or f"{self.name}.{message_type.KIND}",
                    context=extract_context(msg.headers),
                    kind=SpanKind.CONSUMER,
                )
                if traced
                else contextlib.nullcontext(trace.INVALID_SPAN)
            ) as span:
                try:
                    decoded = envelope.unpack(msg.data, message_type)
                except BusError as exc:
                    self.counters[f"bus_dropped.{exc.code}"] += 1
                    span.set_status(Status(StatusCode.ERROR, exc.code))
                    log.control("bus_message_dropped", subject=msg.subject, code=exc.code)
                    if msg.reply:
                        await msg.respond(envelope.pack_error(exc.code, exc.message))
                    return
                try:
                    await handler(decoded, msg)
                except Exception as exc:
                    self.counters["handler_failed"] += 1
                    span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
                    log.control("handler_failed", subject=msg.subject, error=type(exc).__name__)

        subscription = await self.nc.subscribe(subject, queue=queue or "", cb=on_message)
        self._subscriptions.append(subscription)
        return subscription

    async def publish(self, subject: str, message: BusMessage) -> None:
        assert self.nc is not None
        await self.nc.publish(subject, envelope.pack(message), headers=inject_headers())

    async def request(
        self,
        subject: str,
        message: BusMessage,
        reply_type: type[M] | None = None,
        timeout: float = 2.0,
        retry_for: float = 0.0,
        idempotent: bool = False,
    ) -> Any:
        """One request; with `retry_for`, asked again with backoff (50 ms doubling to 1 s)
        for up to that long while no instance of the service is there (NoResponders: it is
        restarting, `ikefarm up` brings it back; the request reached nobody, so asking again
        is always safe) and, for an `idempotent` request, when the answer timed out (the
        instance died with the request in hand)."""
        deadline = time.monotonic() + retry_for
        delay = RETRY_FIRST_DELAY
        while True:
            try:
                return await self._request_once(subject, message, reply_type, timeout)
            except (NoRespondersError, TimeoutError) as exc:
                if isinstance(exc, TimeoutError) and not idempotent:
                    raise
                if time.monotonic() + delay > deadline:
                    raise
                self.counters["bus_request_retried"] += 1
                log.debug("bus_request_retried", subject=subject, error=type(exc).__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_DELAY)

    async def _request_once(
        self, subject: str, message: BusMessage, reply_type: type[M] | None, timeout: float
    ) -> Any:
        assert self.nc is not None
        started = time.monotonic()
        try:
            with tracer().start_as_current_span(f"request {subject}", kind=SpanKind.CLIENT):
                reply = await self.nc.request(
                    subject, envelope.pack(message), timeout=timeout, headers=inject_headers()
                )
        finally:
            # a timeout counts with the time it took: slow answers and none look alike
            self.latencies.observe(BUS_REQUEST_DURATION, time.monotonic() - started, subject)
        return envelope.unpack_reply(reply.data, reply_type)

    # --- built-in endpoints ----------------------------------------------------------------

    def uptime(self) -> float:
        return time.monotonic() - self.started

    async def _handle_ping(self, _request: Ping, _msg: Any) -> Pong:
        return Pong(self.name, self.instance, VERSION, round(self.uptime(), 3))

    async def _handle_stats(self, _request: StatsRequest, _msg: Any) -> Stats:
        return self.stats_snapshot()

    def stats_snapshot(self) -> Stats:
        """What the `stats` endpoint answers and the metrics endpoint exports."""
        gauges = self.service.gauges() if self.service else {}
        return Stats(
            service=self.name,
            instance=self.instance,
            version=VERSION,
            uptime=round(self.uptime(), 3),
            requests=self._requests,
            errors=self._errors,
            counters=dict(self.counters),
            gauges=gauges,
        )


def _loop_factory(service_cls: type[ServiceBase]) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop for the services that ask for it (`ServiceBase.event_loop`), else asyncio's own."""
    if service_cls.event_loop == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return None


def run_service(
    service_cls: type[ServiceBase],
    config: Config,
    nats_url: str,
    instance: str | None = None,
    options: dict[str, Any] | None = None,
) -> int:
    """Entry point of `ikefarm service NAME`: logging, tracing, then the runtime until SIGTERM."""
    try:
        service_cls.preflight(config)
    except ServiceUnavailable as exc:
        print(f"ikefarm {service_cls.name}: {exc}", file=sys.stderr)
        return 1
    runtime = Runtime(service_cls, config, nats_url, instance, options)
    configure_logging(
        service_cls.name,
        runtime.instance,
        config.ike.logging.to_dict(),
        log_format=config.telemetry.log_format,
    )
    configure_tracing(service_cls.name, runtime.instance, config.telemetry.otlp_endpoint)
    # what the imports made (~40,000 objects) lives as long as the process: out of the
    # collector's sight, a full collection no longer walks it each time (~110 ms of a
    # loaded machine's CPU, a pause of the event loop; ops/bench/RESULTS.md, issue 9);
    # so do the survivors of every later full collection (a worker's SAs: gc_freeze.py)
    gc_freeze.install()
    try:
        with asyncio.Runner(loop_factory=_loop_factory(service_cls)) as runner:
            return runner.run(runtime.run())
    except ServiceUnavailable as exc:
        # found only once connected (e.g. the broker lacks JetStream): one sentence, exit 1
        print(f"ikefarm {service_cls.name}: {exc}", file=sys.stderr)
        return 1
