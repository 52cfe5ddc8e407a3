"""Any datagram handed to ingress routing gives a route or a counted `Dropped`, nothing else."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from ikefarm.proto import subjects
from ikefarm.proto.sharding import shard_of_spi
from ikefarm.services.ingress.routing import (
    Dropped,
    InitRouteTable,
    Route,
    Router,
    route_datagram,
)
from ikefarm.shared.ikev2.constants import NON_ESP_MARKER, ExchangeType
from ikefarm.shared.ikev2.message import Message, encode_message

PEER = "203.0.113.9"

KNOWN_COUNTERS = {
    "nat_keepalive",
    "esp_in_udp",
    "dropped.empty",
    "dropped.truncated_header",
    "dropped.invalid_major_version",
    "dropped.zero_spi",
}


@st.composite
def ike_datagrams(draw: st.DrawFn) -> bytes:
    """A well-formed IKE header (+ empty chain), then some of its octets mutated."""
    data = bytearray(
        encode_message(
            Message(
                exchange_type=draw(st.sampled_from([*ExchangeType, 0, 33, 255])),
                spi_i=draw(st.binary(min_size=8, max_size=8)),
                spi_r=draw(st.sampled_from([bytes(8)]) | st.binary(min_size=8, max_size=8)),
                message_id=draw(st.integers(0, 2**32 - 1)),
                is_initiator=draw(st.booleans()),
                is_response=draw(st.booleans()),
            )
        )
    )
    for _ in range(draw(st.integers(0, 4))):
        position = draw(st.integers(0, len(data) - 1))
        data[position] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(data)))
    data = data[:cut] if draw(st.booleans()) else data
    return bytes(data) + draw(st.binary(max_size=16))


datagrams = (
    st.binary(max_size=64)
    | ike_datagrams()
    | ike_datagrams().map(lambda d: NON_ESP_MARKER + d)
    | st.sampled_from([b"", b"\xff", NON_ESP_MARKER, b"\xff\xff", b"\x00"])
)


def check(route: Route) -> None:
    header = route.header
    if route.kind == "init":
        assert route.subject == subjects.IKE_INIT
        assert header.exchange_type == ExchangeType.IKE_SA_INIT and not header.is_response
        assert header.spi_r == bytes(8)
    else:
        assert route.subject == subjects.ike_shard(route.shard or 0)
    assert len(route.data) >= 28


@settings(max_examples=1000, deadline=None)
@given(
    st.lists(st.tuples(datagrams, st.booleans()), min_size=1, max_size=20),
    st.lists(
        st.tuples(st.binary(min_size=8, max_size=8), st.integers(0, 0xFFFF), st.floats(-5, 60)),
        max_size=4,
    ),
    st.floats(0, 100),
)
def test_router_never_raises_and_counts_every_datagram(
    received: list[tuple[bytes, bool]], routes: list[tuple[bytes, int, float]], now: float
) -> None:
    table = InitRouteTable(capacity=2)
    for spi_i, shard, lifetime in routes:
        table.learn(PEER, 500, spi_i, shard, lifetime, now=0.0)
    router = Router(Counter(), table)
    expected: Counter[str] = Counter()
    for data, natt in received:
        verdict = router.route(data, natt=natt, remote_address=PEER, remote_port=500, now=now)
        if isinstance(verdict, Dropped):
            assert verdict.counter in KNOWN_COUNTERS
            expected[verdict.counter] += 1
        else:
            assert isinstance(verdict, Route)
            check(verdict)
            expected[verdict.counter] += 1
    assert router.counters == expected
    assert sum(router.counters.values()) == len(received)
    assert len(table) <= 2


@settings(max_examples=500, deadline=None)
@given(ike_datagrams(), st.booleans())
def test_mutated_ike_headers_route_by_the_spi_they_carry(data: bytes, natt: bool) -> None:
    wire = NON_ESP_MARKER + data if natt else data
    try:
        route = route_datagram(
            wire,
            natt=natt,
            remote_address=PEER,
            remote_port=4500,
            init_routes=InitRouteTable(),
            now=0,
        )
    except Dropped as dropped:
        assert dropped.counter in KNOWN_COUNTERS
        return
    check(route)
    assert route.data == data
    if route.kind == "shard":
        header = route.header
        ours = header.spi_r if header.is_initiator else header.spi_i
        assert route.shard == shard_of_spi(ours)
