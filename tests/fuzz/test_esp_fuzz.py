"""Hostile bytes into the ESP codec (shared/esp/): typed drops only, counters add up, and
the SA still opens the next genuine packet."""

from __future__ import annotations

from collections import Counter

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ikefarm.shared.esp import (
    Dropped,
    EspTransform,
    InboundSa,
    InboundSaTable,
    OutboundSa,
    UdpEncapKind,
    Unwrapped,
    classify_udp_encap,
)
from tests.esp_helpers import ALGORITHMS, SPI, ipv4_packet, ipv6_packet, keys

FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SPI_BYTES = SPI.to_bytes(4, "big")


def new_pair(names: tuple[str, str | None], esn: bool, window: int) -> tuple[OutboundSa, InboundSa]:
    transform = EspTransform.from_names(*names)
    encr, integ = keys(transform)
    return (
        OutboundSa(SPI, transform, encr, integ, esn=esn),
        InboundSa(SPI, transform, encr, integ, esn=esn, replay_window=window),
    )


def tally(inbound: InboundSa, results: list[Unwrapped | Dropped]) -> None:
    """Every result is typed and the SA's counters say the same as the results."""
    delivered = [r for r in results if isinstance(r, Unwrapped)]
    dropped = Counter(str(r.reason) for r in results if isinstance(r, Dropped))
    assert len(delivered) + sum(dropped.values()) == len(results)
    assert inbound.counters.packets == len(delivered)
    assert inbound.counters.bytes == sum(len(r.inner) for r in delivered)
    assert +inbound.counters.drops == dropped


algorithm = st.sampled_from(ALGORITHMS)


@FUZZ
@given(
    names=algorithm,
    esn=st.booleans(),
    window=st.sampled_from([0, 1, 32, 4096]),
    blobs=st.lists(
        st.one_of(st.binary(max_size=120), st.binary(max_size=120).map(SPI_BYTES.__add__)),
        max_size=8,
    ),
)
def test_random_bytes_are_dropped_by_reason(
    names: tuple[str, str | None], esn: bool, window: int, blobs: list[bytes]
) -> None:
    outbound, inbound = new_pair(names, esn, window)
    table = InboundSaTable()
    table.add(inbound)
    results = [table.decapsulate(blob) for blob in blobs]
    assert all(isinstance(r, Dropped) for r in results)
    at_sa = [r for r, b in zip(results, blobs, strict=True) if b[:4] == SPI_BYTES and len(b) >= 8]
    tally(inbound, at_sa)
    assert sum(table.drops.values()) == len(results) - len(at_sa)
    for blob in blobs:
        classify_udp_encap(blob)  # total: one of four kinds for any bytes
    genuine = outbound.encapsulate(ipv6_packet())
    assert table.decapsulate(genuine) == Unwrapped(ipv6_packet(), SPI, 1)


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10_000), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 10_000), st.just(0)),
    st.tuples(st.just("append"), st.integers(1, 40), st.integers(0, 255)),
    st.tuples(st.just("seq"), st.integers(0, (1 << 32) - 1), st.just(0)),
)


def mutate(packet: bytes, change: tuple[str, int, int]) -> bytes:
    kind, where, value = change
    if kind == "flip":
        index = where % len(packet)
        return packet[:index] + bytes([packet[index] ^ value]) + packet[index + 1 :]
    if kind == "truncate":
        return packet[: where % len(packet)]
    if kind == "append":
        return packet + bytes([value]) * where
    if int.from_bytes(packet[4:8], "big") == where:
        where ^= 1
    return packet[:4] + where.to_bytes(4, "big") + packet[8:]


@FUZZ
@given(
    names=algorithm,
    esn=st.booleans(),
    window=st.sampled_from([0, 32, 4096]),
    steps=st.lists(st.tuples(st.booleans(), mutation), min_size=1, max_size=10),
)
def test_mutated_packets_never_pass_and_never_hurt_the_sa(
    names: tuple[str, str | None],
    esn: bool,
    window: int,
    steps: list[tuple[bool, tuple[str, int, int]]],
) -> None:
    """Every octet of an ESP packet is authenticated: any change is a drop, whatever it hits."""
    outbound, inbound = new_pair(names, esn, window)
    results: list[Unwrapped | Dropped] = []
    for number, (deliver_genuine, change) in enumerate(steps, start=1):
        inner = ipv4_packet(seq=number)
        packet = outbound.encapsulate(inner)
        result = inbound.decapsulate(mutate(packet, change))
        results.append(result)
        assert isinstance(result, Dropped)
        if deliver_genuine:
            result = inbound.decapsulate(packet)
            results.append(result)
            assert result == Unwrapped(inner, SPI, number)
    tally(inbound, results)
    last = outbound.encapsulate(ipv4_packet(b"after"))
    assert inbound.decapsulate(last) == Unwrapped(ipv4_packet(b"after"), SPI, outbound.seq)


@FUZZ
@given(st.binary(max_size=64))
def test_classifier_is_total(payload: bytes) -> None:
    kind = classify_udp_encap(payload)
    if kind == UdpEncapKind.ESP:
        assert len(payload) >= 8 and payload[:4] != bytes(4)
    elif kind == UdpEncapKind.IKE:
        assert payload[:4] == bytes(4) and len(payload) >= 32
    elif kind == UdpEncapKind.KEEPALIVE:
        assert payload == b"\xff"
