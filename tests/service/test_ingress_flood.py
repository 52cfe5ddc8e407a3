"""Ingress under a flood, against a real nats-server and real UDP sockets on loopback: batched
reads, the backlog's classes, drop counters, the kernel's drops in stats, several instances
sharing the endpoints and another farm refused.

The datagrams are sent while the test holds the event loop (plain blocking `sendto` on
loopback, no await in between), so they all wait in the ingress socket when it first reads:
the backlog the tests look at is certain, not a matter of timing.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from ikefarm.proto import envelope, subjects
from ikefarm.proto.messages import Datagram, InitRoute, OutboundDatagram, Stats, StatsRequest
from ikefarm.proto.sharding import spi_for_shard
from ikefarm.services.ingress.backlog import Backlog
from ikefarm.services.ingress.service import IngressService
from ikefarm.shared.bus.embedded import EmbeddedNats
from ikefarm.shared.bus.runtime import Runtime, subscriptions_in_place
from ikefarm.shared.config.loader import Config, load_config
from ikefarm.shared.ikev2.constants import ExchangeType, NotifyType
from ikefarm.shared.ikev2.message import Message, encode_message, parse_message
from ikefarm.shared.ikev2.payloads import NoncePayload, NotifyPayload
from ikefarm.shared.udp_endpoints import FARM_ID_ENV, lock_dir
from tests.harness.ports import udp_ports
from tests.service.test_ingress_dos import started
from tests.service.test_ingress_service import stand_in_workers, wait_until
from tests.service.test_up import SERVICES, status

pytestmark = pytest.mark.timeout(90)

SHARD = 7
# cookies and per-peer limits off: every datagram the backlog lets through is published
NO_LIMITS = (
    "[ike.global-options.dos-protection]\ncookie-threshold = 0\nblock-threshold = 0\n"
    "[ike.session.half-open]\nmax-count = 10000\n"
)


def spi(index: int) -> bytes:
    return (0x1000_0000_0000_0000 + index).to_bytes(8, "big")


def new_init(index: int, cookie: bytes | None = None) -> bytes:
    payloads: list[object] = [NoncePayload(index.to_bytes(4, "big") * 8)]
    if cookie is not None:  # RFC 7296 2.6: N(COOKIE) first
        payloads.insert(0, NotifyPayload(NotifyType.COOKIE, data=cookie))
    return encode_message(
        Message(ExchangeType.IKE_SA_INIT, spi(index), bytes(8), 0, True, False, payloads)  # type: ignore[arg-type]
    )


def established(index: int) -> bytes:
    """An IKE_AUTH for an SA of shard SHARD (its SPIr names the shard)."""
    ours = spi_for_shard(SHARD, index.to_bytes(6, "big"))
    return encode_message(Message(ExchangeType.IKE_AUTH, spi(index), ours, 1, True, False, []))


def config(tmp_path: Path, ike_port: int, natt_port: int, extra: str = NO_LIMITS) -> Config:
    path = tmp_path / f"ingress-{ike_port}.toml"
    path.write_text(
        f'[ingress]\nlisten = ["127.0.0.1"]\nike-port = {ike_port}\nnatt-port = {natt_port}\n'
        + extra
    )
    return load_config(path)


class Published:
    """Every datagram ingress publishes to a worker, in the order it published them."""

    def __init__(self) -> None:
        self.order: list[tuple[str, Datagram]] = []

    async def take(self, msg: Msg) -> None:
        if msg.subject == subjects.IKE_INIT or msg.subject.startswith("ikefarm.ike.shard."):
            self.order.append((msg.subject, envelope.unpack(msg.data, Datagram)))

    @classmethod
    async def on(cls, nc: Client) -> Published:
        published = cls()
        await nc.subscribe("ikefarm.ike.>", cb=published.take)
        await subscriptions_in_place(nc)
        return published

    def kinds(self) -> list[str]:
        """ "e" (IKE_AUTH of an SA), "c" (IKE_SA_INIT with a cookie), "n" (new IKE_SA_INIT)."""
        out = []
        for _subject, datagram in self.order:
            if datagram.exchange_type == ExchangeType.IKE_AUTH:
                out.append("e")
            elif datagram.next_payload == 41:  # N(COOKIE) first
                out.append("c")
            else:
                out.append("n")
        return out


@dataclass
class OneIngress:
    runtime: Runtime
    nc: Client
    published: Published
    ike_port: int

    @property
    def service(self) -> IngressService:
        assert isinstance(self.runtime.service, IngressService)
        return self.runtime.service


@asynccontextmanager
async def one_ingress(
    nats_server: EmbeddedNats, tmp_path: Path, extra: str = NO_LIMITS
) -> AsyncIterator[OneIngress]:
    """A started ingress (no limits unless `extra` says) with stand-in owners of shards 0 and
    SHARD."""
    ike_port, natt_port = udp_ports(2)
    runtime = Runtime(IngressService, config(tmp_path, ike_port, natt_port, extra), nats_server.url)
    nc = await nats.connect(nats_server.url)
    try:
        published = await Published.on(nc)
        async with started(runtime), stand_in_workers(nc, 0, SHARD):
            yield OneIngress(runtime, nc, published, ike_port)
    finally:
        await nc.close()


@pytest.fixture
def peer() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    yield sock
    sock.close()


async def test_established_and_cookie_datagrams_overtake_a_backlog_of_new_inits(
    nats_server: EmbeddedNats, tmp_path: Path, peer: socket.socket
) -> None:
    new, cookies, sas = 1000, 30, 30
    async with one_ingress(nats_server, tmp_path) as farm:
        runtime, published = farm.runtime, farm.published
        target = ("127.0.0.1", farm.ike_port)
        # all sent before ingress reads one: new inits first, the others behind them
        for index in range(new):
            peer.sendto(new_init(index), target)
        for index in range(cookies):
            peer.sendto(new_init(new + index, cookie=b"c" * 20), target)
        for index in range(sas):
            peer.sendto(established(index), target)
        counters = runtime.counters
        await wait_until(
            lambda: (
                len(published.order) + counters["dropped.backlog_stale.new"] >= new + cookies + sas
            ),
            timeout=60,
        )
    kinds = published.kinds()
    assert kinds.count("e") == sas and kinds.count("c") == cookies, counters
    # the datagrams sent last were served before most of the new inits sent before them
    last_sa = max(i for i, kind in enumerate(kinds) if kind == "e")
    last_cookie = max(i for i, kind in enumerate(kinds) if kind == "c")
    new_before = kinds[: max(last_sa, last_cookie)].count("n")
    assert new_before < new // 3, (new_before, kinds[:400])
    assert last_sa < last_cookie or kinds[last_sa + 1 : last_cookie + 1].count("e") == 0
    # the header went along, as ingress read it
    _subject, first = published.order[kinds.index("e")]
    assert first.spi_r[:2] == SHARD.to_bytes(2, "big") and first.message_id == 1
    assert first.exchange_type == ExchangeType.IKE_AUTH and first.spi_i == first.data[:8]
    # read in batches, not one datagram per turn of the loop
    assert counters["received"] == new + cookies + sas
    assert counters["read_batches_full"] >= 1
    assert counters["read_batches"] < counters["received"] // 10
    assert not any(name.startswith("dropped.backlog.") for name in counters)


async def test_with_cookies_on_new_inits_are_answered_as_they_are_read_and_never_queued(
    nats_server: EmbeddedNats, tmp_path: Path, peer: socket.socket
) -> None:
    new, cookies, sas = 300, 10, 20
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    always = (
        '[ike.global-options.dos-protection]\ncookie-threshold = "always"\nblock-threshold = 0\n'
    )
    async with one_ingress(nats_server, tmp_path, always) as farm:
        runtime, published = farm.runtime, farm.published
        target = ("127.0.0.1", farm.ike_port)
        # held behind the flood: SAs' datagrams and inits bringing a (wrong) cookie back
        for index in range(new):
            peer.sendto(new_init(index), target)
        for index in range(cookies):
            peer.sendto(new_init(new + index, cookie=b"c" * 36), target)
        for index in range(sas):
            peer.sendto(established(index), target)
        counters = runtime.counters
        await wait_until(
            lambda: (
                counters["gate.cookie_sent"] == new + cookies
                and published.kinds().count("e") == sas
            ),
            timeout=60,
        )
        service = farm.service
    # the flood never waited in the backlog: only what must reach a worker, and the
    # returning cookies (checked in their turn, invalid here, so asked again)
    assert service.backlog.peak <= sas + cookies, service.backlog.peak
    assert counters["gate.cookie_invalid"] == cookies
    assert published.kinds().count("n") == 0 and published.kinds().count("c") == 0
    assert counters["received"] == new + cookies + sas
    assert counters["routed.init"] == new + cookies
    assert not any(name.startswith("dropped.") for name in counters), dict(counters)
    # each answered from the socket it came to: N(COOKIE) alone, for its SPIi
    peer.settimeout(5)
    answered = set()
    for _ in range(new + cookies):
        data, source = peer.recvfrom(2048)
        assert source == target
        reply = parse_message(data)
        assert reply.header.is_response and reply.header.spi_r == bytes(8)
        assert reply.message is not None and len(reply.message.payloads) == 1
        assert reply.message.notify(NotifyType.COOKIE) is not None
        answered.add(reply.header.spi_i)
    assert answered == {spi(index) for index in range(new + cookies)}


async def test_a_full_backlog_drops_new_inits_for_established_sas_and_counts_them(
    nats_server: EmbeddedNats, tmp_path: Path, peer: socket.socket
) -> None:
    new, sas = 600, 20
    async with one_ingress(nats_server, tmp_path) as farm:
        runtime, published = farm.runtime, farm.published
        farm.service.backlog = Backlog(64)
        target = ("127.0.0.1", farm.ike_port)
        for index in range(new):
            peer.sendto(new_init(index), target)
        for index in range(sas):
            peer.sendto(established(index), target)
        counters = runtime.counters
        dropped = "dropped.backlog.new"
        await wait_until(
            lambda: (
                counters["received"] == new + sas
                and len(published.order) + counters[dropped] + counters["dropped.backlog_stale.new"]
                == new + sas
            ),
            timeout=60,
        )
        kinds = published.kinds()
        assert kinds.count("e") == sas  # not one lost
        assert counters[dropped] >= new - 64 * 8, dict(counters)  # most new inits: no room
        assert counters["dropped.backlog.established"] == 0
        assert kinds.count("n") == new - counters[dropped] - counters["dropped.backlog_stale.new"]
        stats = await ingress_stats(farm.nc, runtime)
        assert stats.counters[dropped] == counters[dropped]
        assert stats.gauges["backlog"]["peak"] == 64


async def ingress_stats(nc: Client, runtime: Runtime) -> Stats:
    reply = await nc.request(
        subjects.instance_endpoint("ingress", runtime.instance, "stats"),
        envelope.pack(StatsRequest()),
        timeout=5,
    )
    stats = envelope.unpack_reply(reply.data, Stats)
    assert isinstance(stats, Stats)
    return stats


async def test_datagrams_the_kernel_dropped_show_in_stats(
    nats_server: EmbeddedNats, tmp_path: Path, peer: socket.socket
) -> None:
    async with one_ingress(nats_server, tmp_path) as farm:
        runtime, nc, ike_port = farm.runtime, farm.nc, farm.ike_port
        sock = farm.service.endpoints[("127.0.0.1", ike_port)].sock
        before = (await ingress_stats(nc, runtime)).gauges["socket"]
        assert before["drops"] == 0 and before["receive_buffer"] >= 1 << 20
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the minimum, about
        sent = 200
        for index in range(sent):
            peer.sendto(new_init(index), ("127.0.0.1", ike_port))
        await wait_until(lambda: runtime.counters["routed.init"] > 0)
        after = (await ingress_stats(nc, runtime)).gauges["socket"]
        assert after["drops"] == sent - runtime.counters["received"] > 0, after
        # the namespace's count includes these sockets' (and anyone else's)
        assert after["rcvbuf_errors"] >= after["drops"]


async def test_two_instances_share_the_endpoint_and_both_serve(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    ike_port, natt_port = udp_ports(2)
    farm = config(tmp_path, ike_port, natt_port)
    first = Runtime(IngressService, farm, nats_server.url, instance="ingress-0")
    second = Runtime(IngressService, farm, nats_server.url, instance="ingress-1")
    nc = await nats.connect(nats_server.url)
    published = await Published.on(nc)
    peers = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(64)]
    try:
        async with started(first, second), stand_in_workers(nc, 0, SHARD):
            for index, sock in enumerate(peers):  # 64 flows: SO_REUSEPORT spreads them
                sock.sendto(new_init(index), ("127.0.0.1", ike_port))
            await wait_until(lambda: len(published.order) == len(peers))
            routed = [r.counters["routed.init"] for r in (first, second)]
            assert all(routed) and sum(routed) == len(peers), routed
            # a datagram for an SA goes to its shard whichever instance reads it
            peers[0].sendto(established(1), ("127.0.0.1", ike_port))
            await wait_until(lambda: len(published.order) == len(peers) + 1)
            assert published.order[-1][0] == subjects.ike_shard(SHARD)
    finally:
        for sock in peers:
            sock.close()
        await nc.close()


async def test_another_farm_on_the_same_endpoint_is_refused_at_start(
    nats_server: EmbeddedNats, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ike_port, natt_port = udp_ports(2)
    farm = config(tmp_path, ike_port, natt_port)
    monkeypatch.setenv(FARM_ID_ENV, "up farm-a")
    ours = Runtime(IngressService, farm, nats_server.url, instance="ingress-0")
    sibling = Runtime(IngressService, farm, nats_server.url, instance="ingress-1")
    async with started(ours, sibling):  # one farm's instances share
        monkeypatch.setenv(FARM_ID_ENV, "up farm-b")
        other = Runtime(IngressService, farm, nats_server.url, instance="ingress-0")
        with pytest.raises(OSError, match=r"127\.0\.0\.1\[\d+\] is already served by another"):
            await other.start()
        await other.stop()
        assert other.service is not None and not other.service.endpoints
    # the first farm is gone: the other may start now
    async with started(Runtime(IngressService, farm, nats_server.url, instance="ingress-0")):
        pass


def test_a_second_ikefarm_up_on_the_same_address_and_port_is_refused(
    authorized_farm: tuple[Path, Path],
    ikefarm_argv: list[str],
    loopback_config: Path,
    tmp_path: Path,
) -> None:
    """Two `ikefarm up`, each with its own state dir, on one listen address and ports: the
    second stops at once and says why; the first goes on. The host's lock directory."""
    state_dir, _log = authorized_farm
    second_config = tmp_path / "second.toml"
    second_config.write_text(
        loopback_config.read_text().replace(f'"{state_dir}"', f'"{tmp_path / "state-2"}"')
    )
    assert second_config.read_text() != loopback_config.read_text()
    first_pid = json.loads((state_dir / "up.json").read_text())["pid"]
    port = load_config(loopback_config).ingress.ike_port
    assert list(lock_dir().glob(f"*-{port}-127.0.0.1.*"))  # the first farm's, held
    second = subprocess.run(
        [*ikefarm_argv, "up", "-c", str(second_config)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert second.returncode == 1
    assert "is already served by another ikefarm farm (ikefarm up pid" in second.stderr
    assert f"pid {first_pid}, state dir {state_dir}" in second.stderr
    assert not (tmp_path / "state-2" / "up.json").exists()  # it started nothing
    assert set(status(ikefarm_argv, loopback_config)) == SERVICES


async def test_each_instance_learns_the_init_routes_of_the_flows_it_serves(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    """Two instances, many peers: a worker's answer to an IKE_SA_INIT goes to the instance
    that forwarded it, with the init route; the peer's retransmission (same flow, so the
    same socket under SO_REUSEPORT) reaches that instance and goes to the worker that holds
    the half-open SA, never to the queue group again."""
    ike_port, natt_port = udp_ports(2)
    farm = config(tmp_path, ike_port, natt_port)
    instances = [
        Runtime(IngressService, farm, nats_server.url, instance=f"ingress-{i}") for i in (0, 1)
    ]
    nc = await nats.connect(nats_server.url)
    retransmitted: list[Datagram] = []

    async def worker(msg: Msg) -> None:  # a stand-in worker of shard SHARD
        datagram = envelope.unpack(msg.data, Datagram)
        if msg.subject == subjects.ike_shard(SHARD):
            retransmitted.append(datagram)
            return
        assert datagram.answer_direct  # this ingress takes the answer on its own subject
        subject = subjects.ingress_instance_send(datagram.via)
        assert subject is not None
        answer = OutboundDatagram(
            datagram.local_address,
            datagram.local_port,
            datagram.remote_address,
            datagram.remote_port,
            datagram.data[:8] + bytes(28),
            init_route=InitRoute(
                datagram.spi_i, datagram.remote_address, datagram.remote_port, SHARD, 30.0
            ),
        )
        await nc.publish(subject, envelope.pack(answer))

    await nc.subscribe(subjects.IKE_INIT, cb=worker)
    await nc.subscribe(subjects.ike_shard(SHARD), cb=worker)
    await subscriptions_in_place(nc)
    peers = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(24)]
    try:
        async with started(*instances), stand_in_workers(nc, 0, SHARD):
            for index, sock in enumerate(peers):
                sock.setblocking(False)
                sock.sendto(new_init(index), ("127.0.0.1", ike_port))
            loop = asyncio.get_running_loop()
            for index, sock in enumerate(peers):  # the answer came back: retransmit anyway
                answer = await asyncio.wait_for(loop.sock_recv(sock, 2048), 10)
                assert answer[:8] == spi(index)
                sock.sendto(new_init(index), ("127.0.0.1", ike_port))
            await wait_until(lambda: len(retransmitted) == len(peers))
            assert sorted(d.spi_i for d in retransmitted) == sorted(spi(i) for i in range(24))
            learned = [r.counters["init_route_learned"] for r in instances]
            assert all(learned) and sum(learned) == len(peers), learned  # each its own flows
            assert sum(r.counters["routed.init"] for r in instances) == len(peers)
    finally:
        for sock in peers:
            sock.close()
        await nc.close()
