"""Any datagram handed to ingress routing gives a route or a counted `Dropped`, nothing else."""

from __future__ import annotations

import dataclasses
from collections import Counter

import msgpack
from hypothesis import given, settings
from hypothesis import strategies as st

from ikefarm.proto import envelope, subjects
from ikefarm.proto.messages import Datagram
from ikefarm.proto.sharding import shard_of_spi
from ikefarm.services.ingress.backlog import CLASS_NAMES, Backlog
from ikefarm.services.ingress.routing import (
    Dropped,
    InitRouteTable,
    Route,
    Router,
    route_datagram,
)
from ikefarm.shared.bus.datagram import carried_header, datagram_message
from ikefarm.shared.ikev2.constants import NON_ESP_MARKER, ExchangeType
from ikefarm.shared.ikev2.effects import Endpoint
from ikefarm.shared.ikev2.engine import IkeEngine
from ikefarm.shared.ikev2.errors import MalformedMessage
from ikefarm.shared.ikev2.message import IkeHeader, Message, encode_message, parse_message
from ikefarm.shared.ikev2.policy import engine_policy
from tests.engine_helpers import RESPONDER_TOML, config

PEER = "203.0.113.9"

KNOWN_COUNTERS = {
    "nat_keepalive",
    "esp_in_udp",
    "dropped.empty",
    "dropped.truncated_header",
    "dropped.invalid_major_version",
    "dropped.zero_spi",
    "dropped.truncated_message",
    "dropped.trailing_data",
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
    assert header.length == len(route.data)  # checked once, at ingress


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


def fresh_route(wire: bytes, natt: bool) -> Route:
    """The route of one datagram from PEER with no init route learned."""
    return route_datagram(
        wire, natt=natt, remote_address=PEER, remote_port=4500, init_routes=InitRouteTable(), now=0
    )


@settings(max_examples=500, deadline=None)
@given(ike_datagrams(), st.booleans())
def test_mutated_ike_headers_route_by_the_spi_they_carry(data: bytes, natt: bool) -> None:
    try:
        route = fresh_route(NON_ESP_MARKER + data if natt else data, natt)
    except Dropped as dropped:
        assert dropped.counter in KNOWN_COUNTERS
        return
    check(route)
    assert route.data == data
    if route.kind == "shard":
        header = route.header
        ours = header.spi_r if header.is_initiator else header.spi_i
        assert route.shard == shard_of_spi(ours)


# --- the header a Datagram carries to the worker (read once, at ingress) --------------------


@settings(max_examples=500, deadline=None)
@given(ike_datagrams(), st.booleans())
def test_the_carried_header_is_the_header_of_the_datagram(data: bytes, natt: bool) -> None:
    """Whatever ingress routes reaches the worker with the header the octets hold, across
    the bus encoding, so the worker's engine sees what it would have read itself."""
    try:
        route = fresh_route(data, natt=False)
    except Dropped:
        return
    message = datagram_message(
        route.header, route.data, local=("192.0.2.1", 500), remote=(PEER, 500), natt=natt
    )
    carried = carried_header(envelope.unpack(envelope.pack(message), Datagram))
    assert carried == IkeHeader.parse(route.data)
    assert outcome(route.data, carried) == outcome(route.data, None)


def outcome(data: bytes, header: IkeHeader | None) -> object:
    try:
        return parse_message(data, header).header
    except MalformedMessage as exc:
        return exc.reason


DATAGRAM_FIELDS = {f.name for f in dataclasses.fields(Datagram)}
datagram_fields = st.fixed_dictionaries(
    {
        "local_address": st.just("192.0.2.1"),
        "local_port": st.just(500),
        "remote_address": st.just(PEER),
        "remote_port": st.just(500),
        "data": st.binary(max_size=80) | ike_datagrams(),
        "via": st.text(max_size=8),
        "natt": st.booleans(),
        "spi_i": st.binary(max_size=10),
        "spi_r": st.binary(max_size=10),
        "next_payload": st.integers(-3, 300),
        "minor_version": st.integers(-1, 20),
        "exchange_type": st.integers(-1, 300),
        "flags": st.integers(-1, 300),
        "message_id": st.integers(-1, 2**33),
    }
)


@settings(max_examples=500, deadline=None)
@given(datagram_fields)
def test_a_worker_takes_only_a_carried_header_that_can_be_true(fields: dict) -> None:  # type: ignore[type-arg]
    """Any field values a (buggy) ingress could put in a Datagram: the header is refused
    (the worker reads the octets itself) or in range and as long as the data; the engine
    answers or drops either way and never raises."""
    datagram = Datagram(**fields)
    header = carried_header(datagram)
    if header is not None:
        assert len(header.spi_i) == len(header.spi_r) == 8 and any(header.spi_i)
        assert header.length == len(datagram.data) >= 28
        assert 0 <= header.message_id <= 0xFFFFFFFF
        assert header.major_version == 2
    engine = IkeEngine(engine_policy(config(RESPONDER_TOML)), shard=1)
    effects = engine.receive(
        datagram.data, Endpoint("192.0.2.1", 500), Endpoint(PEER, 500), 0.0, header
    )
    assert isinstance(effects, list)


@settings(max_examples=300, deadline=None)
@given(
    datagram_fields,
    st.dictionaries(
        st.sampled_from(sorted(DATAGRAM_FIELDS)),
        st.none()
        | st.integers(-(2**63), 2**64 - 1)
        | st.binary(max_size=30)
        | st.text(max_size=10)
        | st.booleans(),
        max_size=6,
    ),
    st.sets(st.sampled_from(sorted(DATAGRAM_FIELDS)), max_size=3),
)
def test_a_malformed_datagram_message_is_refused_with_a_bus_error(
    fields: dict,  # type: ignore[type-arg]
    changed: dict,  # type: ignore[type-arg]
    missing: set[str],
) -> None:
    body = {**fields, **changed}
    for name in missing:
        body.pop(name, None)
    raw = msgpack.packb({"v": envelope.SCHEMA_VERSION, "kind": "datagram", "body": body})
    try:
        datagram = envelope.unpack(raw, Datagram)
    except envelope.BusError as exc:
        assert exc.code in {"bad_field", "missing_field"}
        return
    carried_header(datagram)  # well-typed now: taken or refused, never an exception


# --- the backlog under any sequence of arrivals and turns -----------------------------------


@settings(max_examples=300, deadline=None)
@given(
    st.integers(1, 8),
    st.lists(
        st.tuples(st.sampled_from(["push", "pop"]), st.integers(0, 2), st.floats(0, 0.6)),
        max_size=80,
    ),
)
def test_the_backlog_loses_nothing_uncounted_and_serves_the_best_class_first(
    capacity: int, steps: list[tuple[str, int, float]]
) -> None:
    backlog: Backlog[tuple[int, int]] = Backlog(capacity)
    now, pushed, served = 0.0, 0, 0
    for action, klass, elapsed in steps:
        now += elapsed
        if action == "push":
            waiting = backlog.sizes()
            backlog.push(klass, (klass, pushed), now)
            pushed += 1
        else:
            waiting = backlog.sizes()
            item = backlog.pop(now)
            if item is not None:
                served += 1
                better = [n for i, n in enumerate(CLASS_NAMES) if i < item[0]]
                assert all(waiting[name] == 0 for name in better)
        assert len(backlog) <= capacity
        assert len(backlog) == sum(backlog.sizes().values())
    assert pushed == served + sum(backlog.dropped) + backlog.stale + len(backlog)
