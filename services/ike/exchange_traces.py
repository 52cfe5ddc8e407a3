"""One trace per IKE exchange (docs/principles.md, principle 5), kept by the ike worker.

An exchange is a request and its response (RFC 7296 1.2), named by the IKE SA's
SPIi, the Message ID and which side sent the request. Every datagram ingress
forwards starts a new trace there (ingress holds no IKE state); the worker puts
its handling under the trace of the exchange the datagram belongs to:

- the first datagram of an exchange (a peer's new request) continues ingress's
  trace, which becomes the exchange's trace;
- a retransmitted request, the retried IKE_SA_INIT with a COOKIE, and the
  response to a request of ours join the exchange's trace, linked to the trace
  ingress started for that datagram;
- a request the worker starts itself (retransmit timers, DPD, rekey, expiry,
  an initiation) opens a new trace when it is the exchange's first datagram,
  linked to the IKE SA's latest exchange; its retransmissions are spans of
  that same trace.

Both tables are bounded LRUs (`capacity`): a lookup or an insert costs the same
at any number of SAs, and an exchange forgotten long after it ended only means
its late retransmission starts a trace of its own. Of each IKE SA the exchange
table keeps the latest exchange the peer asked and the latest one we asked (one
of each is in flight at a time, RFC 7296 2.3 with a window of 1): a retransmission
of an exchange before those starts a trace of its own, as a forgotten one does.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterable
from typing import Any, Generic, TypeVar

from opentelemetry.trace import SpanContext

from ikefarm.shared.ikev2.constants import ExchangeType, HeaderFlag
from ikefarm.shared.ikev2.effects import Log, PeerFailed, SaEvent
from ikefarm.shared.ikev2.errors import MalformedMessage
from ikefarm.shared.ikev2.message import IkeHeader

DEFAULT_CAPACITY = 65536
MAX_EVENTS = 8  # engine events named on one span

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

ExchangeKey = tuple[bytes, int, bool]  # SPIi, Message ID, request sent by the peer


class Lru(Generic[K, V]):
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[K, V] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: K) -> V | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)


def exchange_key(header: IkeHeader, received: bool) -> ExchangeKey:
    """Received with R clear, or sent with R set: the peer asked (RFC 7296 3.1 flags)."""
    response = bool(header.flags & HeaderFlag.RESPONSE)
    return (header.spi_i, header.message_id, received != response)


def parse_header(data: bytes) -> IkeHeader | None:
    try:
        return IkeHeader.parse(data)
    except (MalformedMessage, ValueError):
        return None


def exchange_name(header: IkeHeader) -> str:
    try:
        return ExchangeType(header.exchange_type).name
    except ValueError:
        return str(int(header.exchange_type))


class ExchangeTraces:
    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        # (SPIi, the peer asked) -> (Message ID, trace): each SA's latest exchange per side
        self.exchanges: Lru[tuple[bytes, bool], tuple[int, SpanContext]] = Lru(capacity)
        self.sas: Lru[bytes, SpanContext] = Lru(capacity)  # SPIi -> latest exchange

    def exchange(self, key: ExchangeKey) -> SpanContext | None:
        spi_i, message_id, peer_asked = key
        latest = self.exchanges.get((spi_i, peer_asked))
        return latest[1] if latest is not None and latest[0] == message_id else None

    def sa(self, spi_i: bytes) -> SpanContext | None:
        return self.sas.get(spi_i)

    def remember(self, key: ExchangeKey, context: SpanContext) -> None:
        spi_i, message_id, peer_asked = key
        self.exchanges.put((spi_i, peer_asked), (message_id, context))
        self.sas.put(spi_i, context)


def outcome_attributes(effects: Iterable[Any]) -> dict[str, Any]:
    """What the engine made of a datagram or a timer, for the span that carries it: the
    VPN, what happened to SAs (`ike-established`, `child-installed`, ...), the engine's
    level 0-1 events, and the drop reason of a dropped datagram."""
    attributes: dict[str, Any] = {}
    events: list[str] = []
    outcomes: list[str] = []
    for effect in effects:
        if isinstance(effect, Log):
            if effect.event == "datagram_dropped":
                attributes["ikefarm.drop_reason"] = str(effect.fields.get("reason", ""))
            elif effect.level <= 1 and len(events) < MAX_EVENTS:
                events.append(effect.event)
        elif isinstance(effect, SaEvent):
            if effect.vpn:
                attributes["ikefarm.vpn"] = effect.vpn
            if len(outcomes) < MAX_EVENTS:
                outcomes.append(effect.kind)
        elif isinstance(effect, PeerFailed) and len(outcomes) < MAX_EVENTS:
            outcomes.append(f"{effect.phase}-phase-failure")
    if events:
        attributes["ikefarm.ike.events"] = events
    if outcomes:
        attributes["ikefarm.outcome"] = outcomes
    return attributes
