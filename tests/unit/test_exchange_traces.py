"""Which exchange a datagram belongs to, and the bounded tables that remember traces."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from opentelemetry.trace import SpanContext, TraceFlags

from ikefarm.services.ike.exchange_traces import (
    ExchangeTraces,
    exchange_key,
    exchange_name,
    outcome_attributes,
    parse_header,
)
from ikefarm.shared.ikev2.constants import ExchangeType, HeaderFlag, PayloadType
from ikefarm.shared.ikev2.effects import Log, PeerFailed, SaEvent
from ikefarm.shared.ikev2.message import IkeHeader

SPI_I, SPI_R = bytes.fromhex("0102030405060708"), bytes.fromhex("00050a0b0c0d0e0f")


def header(flags: HeaderFlag, message_id: int = 3) -> IkeHeader:
    return IkeHeader(
        SPI_I, SPI_R, PayloadType.SK, 2, 0, ExchangeType.INFORMATIONAL, flags, message_id, 28
    )


def context(n: int) -> SpanContext:
    return SpanContext(n + 1, n + 1, is_remote=False, trace_flags=TraceFlags(1))


def test_request_and_response_of_one_exchange_share_a_key_whoever_asked() -> None:
    peer_request = header(HeaderFlag.INITIATOR)
    our_response = header(HeaderFlag.RESPONSE)
    assert exchange_key(peer_request, received=True) == exchange_key(our_response, received=False)
    our_request = header(HeaderFlag.NONE)
    peer_response = header(HeaderFlag.RESPONSE | HeaderFlag.INITIATOR)
    assert exchange_key(our_request, received=False) == exchange_key(peer_response, received=True)
    # same SPIs and Message ID, the other side asking: another exchange (RFC 7296 2.2)
    assert exchange_key(peer_request, received=True) != exchange_key(our_request, received=False)
    assert exchange_name(peer_request) == "INFORMATIONAL"


def test_tables_are_bounded_and_remember_the_latest_exchange_per_sa() -> None:
    traces = ExchangeTraces(capacity=4)
    for n in range(10):
        traces.remember((SPI_I, n, True), context(n))
    assert len(traces.exchanges) == 1  # the SA's latest exchange the peer asked
    assert traces.exchange((SPI_I, 8, True)) is None
    assert traces.exchange((SPI_I, 9, True)) == context(9)
    assert traces.exchange((SPI_I, 9, False)) is None  # ours of that ID: another exchange
    traces.remember((SPI_I, 3, False), context(30))
    assert traces.exchange((SPI_I, 3, False)) == context(30)
    assert traces.exchange((SPI_I, 9, True)) == context(9)  # each side keeps its own
    assert traces.sa(SPI_I) == context(30)
    for n in range(10):  # other SAs push the oldest out
        traces.remember((bytes([n]) * 8, 0, True), context(100 + n))
    assert len(traces.exchanges) == 4 and len(traces.sas) == 4
    assert traces.exchange((SPI_I, 9, True)) is None  # forgotten: oldest first
    assert traces.exchange((bytes([9]) * 8, 0, True)) == context(109)


@given(st.binary(max_size=64))
def test_any_octets_parse_or_are_refused_without_raising(data: bytes) -> None:
    parsed = parse_header(data)
    if len(data) < 28:
        assert parsed is None
    else:
        assert parsed is not None
        exchange_name(parsed)
        exchange_key(parsed, received=True)


def test_outcome_names_vpn_sa_events_engine_events_and_drop_reason() -> None:
    assert outcome_attributes([]) == {}
    attributes = outcome_attributes(
        [
            Log(1, "ike", "ike_sa_established", {"vpn": "rw"}),
            Log(2, "ike", "detail"),  # below level 1: not named
            SaEvent("ike-established", 7, "rw"),
            SaEvent("child-installed", 7, "rw"),
            PeerFailed("198.51.100.9", "auth", 30.0),
        ]
    )
    assert attributes == {
        "ikefarm.vpn": "rw",
        "ikefarm.ike.events": ["ike_sa_established"],
        "ikefarm.outcome": ["ike-established", "child-installed", "auth-phase-failure"],
    }
    dropped = outcome_attributes([Log(2, "encoding", "datagram_dropped", {"reason": "bad_icv"})])
    assert dropped == {"ikefarm.drop_reason": "bad_icv"}
    many = outcome_attributes([SaEvent("child-installed", 1, None)] * 50)
    assert len(many["ikefarm.outcome"]) == 8 and "ikefarm.vpn" not in many
