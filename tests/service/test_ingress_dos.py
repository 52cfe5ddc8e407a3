"""The DoS gate against a real nats-server: two ingress instances on one address
(SO_REUSEPORT), a real ike worker, the cookie secret in the farm's KV bucket."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from ikefarm.proto import envelope, subjects
from ikefarm.proto.messages import CookieSecrets, IkeLoad, PeerBackoff
from ikefarm.services.ike.service import IkeService
from ikefarm.services.ingress.service import IngressService
from ikefarm.shared.bus.embedded import EmbeddedNats
from ikefarm.shared.bus.runtime import Runtime, subscriptions_in_place
from ikefarm.shared.config.loader import Config, load_config
from ikefarm.shared.ikev2.constants import ExchangeType, NotifyType
from ikefarm.shared.ikev2.message import Message, encode_message, parse_message
from ikefarm.shared.ikev2.payloads import NotifyPayload
from tests.dos_helpers import init_requests
from tests.engine_helpers import RESPONDER_TOML
from tests.harness.ports import udp_ports
from tests.service.test_ingress_service import stand_in_workers, wait_until

pytestmark = pytest.mark.timeout(60)


def farm_config(tmp_path: Path, ike_port: int, natt_port: int, extra: str) -> Path:
    text = RESPONDER_TOML.format(extra="", extra_vpn="").replace("192.0.2.1", "127.0.0.1")
    path = tmp_path / "farm.toml"
    path.write_text(
        f'[ingress]\nlisten = ["127.0.0.1"]\nike-port = {ike_port}\nnatt-port = {natt_port}\n'
        f"{extra}\n{text}"
    )
    return path


def two_ingress(
    nats_server: EmbeddedNats, tmp_path: Path, settings: str
) -> tuple[int, Config, Runtime, Runtime]:
    """Two ingress instances on one address and port (SO_REUSEPORT), one config; a test
    starts one or both."""
    ike_port, natt_port = udp_ports(2)
    config = load_config(farm_config(tmp_path, ike_port, natt_port, settings))
    first = Runtime(IngressService, config, nats_server.url, instance="ingress-0")
    second = Runtime(IngressService, config, nats_server.url, instance="ingress-1")
    return ike_port, config, first, second


@asynccontextmanager
async def started(*runtimes: Runtime) -> AsyncIterator[None]:
    done: list[Runtime] = []
    try:
        for runtime in runtimes:
            await runtime.start()
            done.append(runtime)
        yield
    finally:
        for runtime in reversed(done):
            await runtime.stop()


def peer_sockets(count: int) -> list[socket.socket]:
    out = []
    for _ in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(5)
        out.append(sock)
    return out


def with_cookie(data: bytes, cookie: bytes) -> bytes:
    message = parse_message(data).message
    assert message is not None
    return encode_message(
        Message(
            ExchangeType.IKE_SA_INIT,
            message.spi_i,
            bytes(8),
            0,
            True,
            False,
            [NotifyPayload(NotifyType.COOKIE, data=cookie), *message.payloads],
        )
    )


async def collector(nc: Client, subject: str) -> asyncio.Queue[Msg]:
    queue: asyncio.Queue[Msg] = asyncio.Queue()

    async def put(msg: Msg) -> None:
        await queue.put(msg)

    await nc.subscribe(subject, cb=put)
    await subscriptions_in_place(nc)
    return queue


async def test_a_cookie_from_one_instance_is_accepted_by_the_other(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    ike_port, _config, first, second = two_ingress(
        nats_server,
        tmp_path,
        '[ike.global-options.dos-protection]\ncookie-threshold = "always"\nblock-threshold = 0\n',
    )
    nc = await nats.connect(nats_server.url)
    inits = await collector(nc, subjects.IKE_INIT)
    async with started(first, second), stand_in_workers(nc, 0):
        versions = [r.service.secrets.version for r in (first, second)]  # type: ignore[union-attr]
        assert versions[0] == versions[1] is not None
        (request,) = init_requests(1)
        asking, *others = peer_sockets(24)
        asking.sendto(request, ("127.0.0.1", ike_port))
        try:
            reply = parse_message(await asyncio.to_thread(asking.recv, 2048))
        except TimeoutError:
            raise AssertionError(
                f"no answer: {dict(first.counters)} {dict(second.counters)}"
            ) from None
        assert reply.header.is_response and reply.message is not None
        cookie = reply.message.notify(NotifyType.COOKIE).data  # type: ignore[union-attr]
        issued = {r.instance: r.counters["gate.cookie_sent"] for r in (first, second)}
        assert sorted(issued.values()) == [0, 1]
        retry = with_cookie(request, cookie)
        for sock in others:  # different source ports: SO_REUSEPORT spreads them
            sock.sendto(retry, ("127.0.0.1", ike_port))
        await wait_until(lambda: inits.qsize() == len(others))
        accepted = [r.counters["gate.cookie_valid"] for r in (first, second)]
        assert all(count > 0 for count in accepted), accepted
        assert sum(accepted) == len(others)
        # the secret is in the bucket, and only there
        js = nc.jetstream()
        kv = await js.key_value(subjects.COOKIE_SECRET_BUCKET)
        record = envelope.unpack((await kv.get(subjects.COOKIE_RECORD)).value, CookieSecrets)
        assert record.version == versions[0]
        for sock in [asking, *others]:
            sock.close()
    await nc.close()


async def test_rotation_is_one_compare_and_set_and_the_previous_secret_still_works(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    _port, _config, first, second = two_ingress(
        nats_server,
        tmp_path,
        "cookie-secret-lifetime = 1\n"
        '[ike.global-options.dos-protection]\ncookie-threshold = "always"\n',
    )
    async with started(first, second):
        a, b = first.service, second.service
        assert isinstance(a, IngressService) and isinstance(b, IngressService)
        start = a.secrets.version  # type: ignore[union-attr]
        assert a.gate.cookies is not None
        old = a.gate.cookies.make(b"n" * 32, "192.0.2.2", b"s" * 8)
        await wait_until(lambda: a.secrets.version == b.secrets.version == start + 1)  # type: ignore[union-attr,operator]
        assert b.gate.cookies is not None and b.gate.cookies.verify(
            old, b"n" * 32, "192.0.2.2", b"s" * 8
        )
        # a rotation, not a re-creation: the new record carries the old secret as previous
        # (who rotated is not asserted: on a loaded machine the KV ack of the winning
        # compare-and-set can time out, and the record then arrives through the watch)
        for jar in (a.gate.cookies, b.gate.cookies):
            assert jar.previous is not None and jar.previous.version == start
        await asyncio.sleep(1.2)
        # rotations never skip a version: the loser of a compare-and-set takes the winner's
        assert abs(a.secrets.version - b.secrets.version) <= 1  # type: ignore[union-attr,operator]


async def test_half_open_limit_holds_across_two_instances_and_one_worker(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    ike_port, config, first, second = two_ingress(
        nats_server,
        tmp_path,
        "[ike.global-options.dos-protection]\ncookie-threshold = 0\n"
        "block-threshold = 0\ninit-limit-half-open = 3\n",
    )
    worker = Runtime(IkeService, config, nats_server.url, instance="ike-0", options={"shard": 0})
    nc = await nats.connect(nats_server.url)
    loads = await collector(nc, subjects.IKE_LOAD)
    async with started(worker, first, second):
        sockets = peer_sockets(20)
        for sock, request in zip(sockets, init_requests(20), strict=True):
            sock.sendto(request, ("127.0.0.1", ike_port))
        engine = worker.service.engine  # type: ignore[union-attr]

        def decided() -> tuple[int, int]:
            forwarded = sum(r.counters["gate.forwarded"] for r in (first, second))
            gated = sum(
                value
                for r in (first, second)
                for key, value in r.counters.items()
                if key.startswith("gate.dropped.limit")
            )
            return forwarded, gated

        await wait_until(lambda: sum(decided()) == 20)
        forwarded, _gated = decided()
        # every forwarded init was answered or refused by the worker before DH
        await wait_until(
            lambda: (
                engine.counters["dh_computed"]
                + engine.counters["dos_refused.limit.init-limit-half-open"]
                == forwarded
            )
        )
        assert len(engine.sas) == 3
        assert engine.counters["dh_computed"] == 3  # no DH for anything the gates refused
        await asyncio.sleep(0.3)
        snapshots = []
        while not loads.empty():
            snapshots.append(envelope.unpack((await loads.get()).data, IkeLoad))
        assert snapshots and max(s.half_open for s in snapshots) == 3
        for sock in sockets:
            sock.close()
    await nc.close()


async def test_job_load_counts_inits_a_stalled_worker_has_not_answered(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    ike_port, _config, ingress, _unused = two_ingress(
        nats_server,
        tmp_path,
        "[ike.global-options.dos-protection]\ncookie-threshold = 0\n"
        "block-threshold = 0\ninit-limit-job-load = 2\n",
    )
    nc = await nats.connect(nats_server.url)
    stalled = await collector(nc, subjects.IKE_INIT)  # takes inits, never answers
    async with started(ingress), stand_in_workers(nc, 0):
        sockets = peer_sockets(4)
        for sock, request in zip(sockets, init_requests(4), strict=True):
            sock.sendto(request, ("127.0.0.1", ike_port))
            await asyncio.sleep(0.05)
        await wait_until(lambda: ingress.counters["gate.dropped.limit.init-limit-job-load"] == 2)
        assert stalled.qsize() == 2
        state = ingress.service.dos_state()  # type: ignore[union-attr]
        assert state["pending"] == 2 and state["cookie_mode"] == "disabled"
        for sock in sockets:
            sock.close()
    await nc.close()


async def test_backoff_from_a_worker_reaches_ingress_and_bad_bus_input_is_counted(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    ike_port, _config, ingress, _unused = two_ingress(nats_server, tmp_path, "")
    nc = await nats.connect(nats_server.url)
    async with started(ingress), stand_in_workers(nc, 0):
        await nc.publish(
            subjects.INGRESS_BACKOFF, envelope.pack(PeerBackoff("127.0.0.1", "init", 30.0))
        )
        for subject in (subjects.INGRESS_BACKOFF, subjects.IKE_LOAD, subjects.INGRESS_LOAD):
            await nc.publish(subject, b"\xc1 not msgpack")
            await nc.publish(subject, envelope.pack(PeerBackoff("x", "y", 1.0))[:-3])
        await nc.publish(
            subjects.INGRESS_BACKOFF, envelope.pack(PeerBackoff("not-an-ip", "init", 3.0))
        )
        await nc.flush()
        await wait_until(lambda: ingress.counters["backoff_learned.init"] == 1)
        await wait_until(lambda: ingress.counters["backoff_refused"] == 1)
        (sock,) = peer_sockets(1)
        (request,) = init_requests(1)
        sock.sendto(request, ("127.0.0.1", ike_port))
        await wait_until(lambda: ingress.counters["gate.dropped.backoff.init-phase-failure"] == 1)
        assert ingress.counters["bus_dropped.bad_encoding"] >= 3
        sock.close()
    await nc.close()


async def test_the_cookie_secret_travels_only_inside_the_store(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    """Everything on the bus while cookies are made, checked and rotated: the secret
    appears only in the KV bucket's own traffic (its stream, its API replies)."""
    nc = await nats.connect(nats_server.url)
    seen: list[Msg] = []

    async def keep(msg: Msg) -> None:
        seen.append(msg)

    await nc.subscribe(">", cb=keep)
    await subscriptions_in_place(nc)
    ike_port, _config, first, second = two_ingress(
        nats_server,
        tmp_path,
        "cookie-secret-lifetime = 1\n"
        '[ike.global-options.dos-protection]\ncookie-threshold = "always"\n',
    )
    async with started(first, second), stand_in_workers(nc, 0):
        (sock,) = peer_sockets(1)
        for request in init_requests(3):
            sock.sendto(request, ("127.0.0.1", ike_port))
            await asyncio.to_thread(sock.recv, 2048)
        await asyncio.sleep(1.5)  # at least one rotation
        service = first.service
        assert isinstance(service, IngressService) and service.gate.cookies is not None
        keys = [service.gate.cookies.current.key]
        if service.gate.cookies.previous is not None:
            keys.append(service.gate.cookies.previous.key)
        gauges = repr(first.service.gauges() if first.service else {})  # type: ignore[union-attr]
        sock.close()
    await nc.close()
    bucket = f"KV_{subjects.COOKIE_SECRET_BUCKET}"

    def in_store(msg: Msg) -> bool:
        headers = msg.headers or {}
        return (
            msg.subject.startswith(f"$KV.{subjects.COOKIE_SECRET_BUCKET}.")
            or headers.get("Nats-Stream") == bucket
            or (msg.reply or "").startswith(f"$JS.ACK.{bucket}.")
        )

    leaks = [m.subject for m in seen for key in keys if key in m.data and not in_store(m)]
    assert leaks == []
    assert any(in_store(m) for m in seen)  # the store itself did carry it
    for key in keys:
        assert key.hex() not in gauges and repr(key) not in gauges
