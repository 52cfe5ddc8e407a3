"""Ingress routing, pure: NAT-T demultiplexing, init routes, shard extraction, drop counters."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ikefarm.proto import subjects
from ikefarm.proto.sharding import spi_for_shard
from ikefarm.services.ingress.routing import (
    Dropped,
    InitRouteTable,
    Route,
    Router,
    ShardOwners,
    canonical_address,
    read_header,
    route_datagram,
)
from ikefarm.shared.ikev2.constants import NON_ESP_MARKER, ExchangeType
from ikefarm.shared.ikev2.errors import MalformedMessage
from ikefarm.shared.ikev2.message import IkeHeader, Message, encode_message, peek_header

PEER = "198.51.100.7"
SPI_I = bytes.fromhex("0102030405060708")
ZERO = bytes(8)


def ike(
    exchange: ExchangeType = ExchangeType.IKE_SA_INIT,
    spi_i: bytes = SPI_I,
    spi_r: bytes = ZERO,
    *,
    initiator: bool = True,
    response: bool = False,
    message_id: int = 0,
) -> bytes:
    return encode_message(
        Message(
            exchange_type=exchange,
            spi_i=spi_i,
            spi_r=spi_r,
            message_id=message_id,
            is_initiator=initiator,
            is_response=response,
        )
    )


def route(
    data: bytes, *, natt: bool = False, table: InitRouteTable | None = None, now: float = 0.0
) -> Route:
    return route_datagram(
        data,
        natt=natt,
        remote_address=PEER,
        remote_port=500,
        init_routes=table if table is not None else InitRouteTable(),
        now=now,
    )


def dropped(data: bytes, *, natt: bool = False) -> Dropped:
    with pytest.raises(Dropped) as verdict:
        route(data, natt=natt)
    return verdict.value


def test_ike_sa_init_request_goes_to_the_init_queue() -> None:
    result = route(ike())
    assert result.subject == subjects.IKE_INIT == "ikefarm.ike.init"
    assert result.kind == "init" and result.shard is None and result.counter == "routed.init"
    assert result.header.exchange_type == ExchangeType.IKE_SA_INIT
    assert result.data == ike()


def test_non_esp_marker_is_stripped_on_the_natt_port() -> None:
    result = route(NON_ESP_MARKER + ike(), natt=True)
    assert result.subject == subjects.IKE_INIT
    assert result.data == ike()


def test_nat_keepalive_and_esp_in_udp_are_counted_not_routed() -> None:
    keepalive = dropped(b"\xff", natt=True)
    assert keepalive.counter == "nat_keepalive"
    esp = dropped(bytes.fromhex("c0ffee01") + bytes(40), natt=True)
    assert esp.counter == "esp_in_udp"
    # on the IKE port a 0xFF octet is just a truncated IKE header
    assert dropped(b"\xff").counter == "dropped.truncated_header"
    assert dropped(b"").counter == "dropped.empty"
    # on the NAT-T port, the marker alone is an empty (truncated) IKE message
    assert dropped(NON_ESP_MARKER, natt=True).counter == "dropped.truncated_header"


def test_malformed_headers_are_dropped_by_reason() -> None:
    assert dropped(ike()[:27]).counter == "dropped.truncated_header"
    wrong_version = bytearray(ike())
    wrong_version[17] = 0x30  # major version 3
    assert dropped(bytes(wrong_version)).counter == "dropped.invalid_major_version"
    assert dropped(ike(spi_i=ZERO)).counter == "dropped.zero_spi"
    assert dropped(ike(ExchangeType.IKE_AUTH, spi_r=ZERO, message_id=1)).counter == (
        "dropped.zero_spi"
    )


@given(st.binary(max_size=40))
def test_the_ingress_reads_a_header_as_the_engine_does(data: bytes) -> None:
    try:
        expected: IkeHeader | str = peek_header(data)
    except MalformedMessage as exc:
        expected = exc.reason
    try:
        found: IkeHeader | str = read_header(data)
    except Dropped as exc:
        found = exc.reason
    assert found == expected
    if isinstance(found, IkeHeader):
        assert isinstance(expected, IkeHeader)
        assert type(found.exchange_type) is type(expected.exchange_type)
        assert type(found.next_payload) is type(expected.next_payload)
        assert type(found.flags) is type(expected.flags)


@pytest.mark.parametrize("shard", [0, 1, 7, 0xABCD, 0xFFFF])
def test_later_datagrams_route_by_the_shard_in_our_spi(shard: int) -> None:
    ours = spi_for_shard(shard, bytes.fromhex("aabbccddeeff"))
    # from the original initiator (I flag): our SPI is SPIr
    request = route(ike(ExchangeType.IKE_AUTH, SPI_I, ours, initiator=True, message_id=1))
    assert request.subject == subjects.ike_shard(shard) == f"ikefarm.ike.shard.{shard}.datagram"
    assert request.kind == "shard" and request.shard == shard and request.counter == "routed.shard"
    # the initiator answering our request (no I flag): our SPI is still SPIr
    answer = route(ike(ExchangeType.INFORMATIONAL, SPI_I, ours, initiator=True, response=True))
    assert answer.shard == shard
    # we were the original initiator, the peer writes without the I flag: our SPI is SPIi
    peer_spi = bytes.fromhex("1111222233334444")
    mine = route(ike(ExchangeType.INFORMATIONAL, ours, peer_spi, initiator=False, message_id=3))
    assert mine.shard == shard
    # an IKE_SA_INIT response to our own initiation carries SPIi = ours
    init_answer = route(ike(spi_i=ours, spi_r=peer_spi, initiator=False, response=True))
    assert init_answer.shard == shard and init_answer.kind == "shard"


def test_learned_init_route_sends_retransmissions_to_the_same_shard() -> None:
    table = InitRouteTable()
    table.learn(PEER, 500, SPI_I, shard=42, lifetime=30.0, now=100.0)
    retransmit = route(ike(), table=table, now=110.0)
    assert retransmit.subject == subjects.ike_shard(42)
    assert retransmit.kind == "shard" and retransmit.shard == 42
    # another SPIi, another port or another peer: still a fresh IKE_SA_INIT
    assert route(ike(spi_i=bytes(7) + b"\x09"), table=table, now=110.0).kind == "init"
    other_port = route_datagram(
        ike(), natt=False, remote_address=PEER, remote_port=4500, init_routes=table, now=110.0
    )
    assert other_port.kind == "init"
    other_peer = route_datagram(
        ike(), natt=False, remote_address="198.51.100.8", remote_port=500, init_routes=table, now=1
    )
    assert other_peer.kind == "init"


def test_init_routes_expire_after_their_lifetime() -> None:
    table = InitRouteTable()
    table.learn(PEER, 500, SPI_I, shard=3, lifetime=10.0, now=0.0)
    assert table.lookup(PEER, 500, SPI_I, now=9.9) == 3
    assert route(ike(), table=table, now=10.0).kind == "init"
    assert len(table) == 0
    # a lifetime of zero forgets a route the worker no longer holds
    table.learn(PEER, 500, SPI_I, shard=3, lifetime=10.0, now=0.0)
    table.learn(PEER, 500, SPI_I, shard=3, lifetime=0.0, now=1.0)
    assert table.lookup(PEER, 500, SPI_I, now=1.0) is None
    # purge drops every expired entry, whatever its position
    table.learn(PEER, 1, SPI_I, shard=1, lifetime=100.0, now=0.0)
    table.learn(PEER, 2, SPI_I, shard=2, lifetime=5.0, now=0.0)
    assert table.purge(now=6.0) == 1 and len(table) == 1


def test_init_route_table_is_capped_dropping_the_oldest() -> None:
    table = InitRouteTable(capacity=3)
    for port in range(1, 6):
        table.learn(PEER, port, SPI_I, shard=port, lifetime=60.0, now=0.0)
    assert len(table) == 3 and table.evicted == 2
    assert table.lookup(PEER, 1, SPI_I, now=1.0) is None
    assert table.lookup(PEER, 2, SPI_I, now=1.0) is None
    assert [table.lookup(PEER, p, SPI_I, now=1.0) for p in (3, 4, 5)] == [3, 4, 5]
    # learning again refreshes an entry: it becomes the newest
    table.learn(PEER, 3, SPI_I, shard=33, lifetime=60.0, now=2.0)
    table.learn(PEER, 6, SPI_I, shard=6, lifetime=60.0, now=2.0)
    assert table.lookup(PEER, 4, SPI_I, now=3.0) is None
    assert table.lookup(PEER, 3, SPI_I, now=3.0) == 33


def test_init_route_refuses_what_cannot_be_a_route() -> None:
    table = InitRouteTable()
    for bad in (
        {"spi_i": b"\x01" * 7},
        {"shard": 1 << 16},
        {"shard": -1},
        {"remote_port": 70000},
        {"lifetime": float("nan")},
        {"lifetime": float("inf")},
        {"remote_address": "not-an-address"},
    ):
        args = {
            "remote_address": PEER,
            "remote_port": 500,
            "spi_i": SPI_I,
            "shard": 1,
            "lifetime": 1.0,
            "now": 0.0,
        }
        args.update(bad)
        with pytest.raises(ValueError):
            table.learn(**args)  # type: ignore[arg-type]
    assert len(table) == 0


def test_addresses_are_canonical_so_learned_routes_match() -> None:
    table = InitRouteTable()
    table.learn("2001:DB8:0:0::1", 500, SPI_I, shard=9, lifetime=60.0, now=0.0)
    address = canonical_address("2001:db8::1")
    assert table.lookup(address, 500, SPI_I, now=1.0) == 9


def test_router_counts_every_verdict() -> None:
    router = Router()
    common = {"remote_address": PEER, "remote_port": 4500, "now": 0.0}
    assert isinstance(router.route(NON_ESP_MARKER + ike(), natt=True, **common), Route)
    assert isinstance(router.route(b"\xff", natt=True, **common), Dropped)
    assert isinstance(router.route(b"\x00\x00\x00\x01abcd", natt=True, **common), Dropped)
    assert isinstance(router.route(b"junk", natt=False, **common), Dropped)
    ours = spi_for_shard(5, bytes(6))
    shard = router.route(ike(ExchangeType.IKE_AUTH, SPI_I, ours), natt=False, **common)
    assert isinstance(shard, Route) and shard.shard == 5
    assert dict(router.counters) == {
        "routed.init": 1,
        "routed.shard": 1,
        "nat_keepalive": 1,
        "esp_in_udp": 1,
        "dropped.truncated_header": 1,
    }


def test_shard_owners_follow_the_workers_reports() -> None:
    owners = ShardOwners(started=0.0, learning=3.0)
    # listening for less than three report intervals: not every worker was heard yet
    assert owners.learning(2.9) and owners.owned(7, 2.9) and owners.any_owned(2.9)
    assert not owners.learning(3.0) and not owners.owned(7, 3.0) and not owners.any_owned(3.0)
    owners.reported(7, interval=1.0, now=3.5)
    assert owners.owned(7, 6.5) and owners.any_owned(6.5) and owners.shards(6.5) == [7]
    assert not owners.owned(8, 6.5)
    # three intervals without a report: the worker is gone
    assert not owners.owned(7, 6.6) and not owners.any_owned(6.6)
    assert owners.shards(6.6) == []
    # this process was stopped: what it missed may still be unread, so it learns again
    owners.relearn(now=7.0)
    assert owners.learning(9.9) and owners.owned(7, 9.9) and not owners.learning(10.0)
    owners.reported(7, interval=0.5, now=10.0)  # back, reporting faster
    assert owners.owned(7, 11.5) and not owners.owned(7, 11.6)
    for shard, interval in ((-1, 1.0), (1 << 16, 1.0), (1, 0.0), (1, float("nan"))):
        with pytest.raises(ValueError):
            owners.reported(shard, interval, now=12.0)


def test_router_drops_what_no_worker_owns_by_reason() -> None:
    owners = ShardOwners(started=0.0, learning=0.0)
    table = InitRouteTable()
    router = Router(init_routes=table, owners=owners)
    common = {"natt": False, "remote_address": PEER, "remote_port": 500, "now": 1.0}
    auth_for = {s: ike(ExchangeType.IKE_AUTH, SPI_I, spi_for_shard(s, bytes(6))) for s in (1, 2)}
    # nobody reports yet: a new IKE_SA_INIT has no worker, a shard's datagram no owner
    no_worker = router.route(ike(), **common)
    assert isinstance(no_worker, Dropped) and no_worker.counter == "dropped.no_worker"
    unowned = router.route(auth_for[1], **common)
    assert isinstance(unowned, Dropped) and unowned.reason == "shard_unowned"
    assert unowned.shard == 1
    owners.reported(1, interval=1.0, now=1.0)
    assert isinstance(router.route(ike(), **common), Route)  # any worker takes a new one
    assert isinstance(router.route(auth_for[1], **common), Route)
    assert isinstance(router.route(auth_for[2], **common), Dropped)
    # a retransmitted IKE_SA_INIT pinned to a worker that is gone goes to any worker
    table.learn(PEER, 500, SPI_I, shard=2, lifetime=30.0, now=1.0)
    fallback = router.route(ike(), **common)
    assert isinstance(fallback, Route) and fallback.subject == subjects.IKE_INIT
    # malformed input is still dropped for what it is, before any ownership question
    assert isinstance(router.route(b"junk", **common), Dropped)
    assert dict(router.counters) == {
        "dropped.no_worker": 1,
        "dropped.shard_unowned": 2,
        "routed.init": 2,
        "routed.shard": 1,
        "init_route_unowned": 1,
        "dropped.truncated_header": 1,
    }
