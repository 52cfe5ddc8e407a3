"""Junos `full-open incoming-exchange-max-rates` (seed 000): exchanges a peer starts on an
established IKE SA, each limited to "count/seconds".

* ike-rekey: CREATE_CHILD_SA with an SA payload for protocol IKE (RFC 7296 1.3.2), per peer;
* ipsec-rekey: CREATE_CHILD_SA with REKEY_SA (RFC 7296 1.3.3), per tunnel (peer and child);
* keepalive: an empty INFORMATIONAL, i.e. a liveness check / DPD (RFC 7296 1.4), per peer.

These requests are encrypted, so the engine checks them after decryption and
before the request counts (its message ID is not consumed): an excess request
is dropped and counted, and the peer's retransmission gets through once the
window has room. Only accepted requests take a place in the window.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field

from ikefarm.shared.config.kinds import Rate
from ikefarm.shared.dos.limits import DosLimits
from ikefarm.shared.ikev2.constants import ExchangeType, NotifyType, ProtocolId
from ikefarm.shared.ikev2.message import Message
from ikefarm.shared.ikev2.payloads import SaPayload
from ikefarm.shared.ikev2.sa import IkeSa

MAX_KEYS = 65536

IKE_REKEY = "ike-rekey"
IPSEC_REKEY = "ipsec-rekey"
KEEPALIVE = "keepalive"


@dataclass
class SlidingWindow:
    """At most `rate.count` events per `rate.seconds` for each key; bounded key table."""

    rate: Rate
    capacity: int = MAX_KEYS
    _events: OrderedDict[object, deque[float]] = field(default_factory=OrderedDict)

    def allow(self, key: object, now: float) -> bool:
        self._forget_idle(now)
        window = self._events.get(key)
        if window is None:
            window = self._events[key] = deque()
            while len(self._events) > self.capacity:
                self._events.popitem(last=False)
        while window and window[0] <= now - self.rate.seconds:
            window.popleft()
        if len(window) >= self.rate.count:
            return False
        window.append(now)
        self._events.move_to_end(key)
        return True

    def _forget_idle(self, now: float) -> None:
        """Drop keys whose events all left the window, so the table holds the peers of the
        last `rate.seconds`, not every peer ever seen. Keys are in the order of their last
        accepted event: the first one is the idlest. Two per call keep up with one new key
        per call."""
        for _ in range(2):
            if not self._events:
                return
            key, window = next(iter(self._events.items()))
            if window and window[-1] > now - self.rate.seconds:
                return
            del self._events[key]


def classify(sa: IkeSa, request: Message) -> tuple[str, object] | None:
    """Which limited exchange a decrypted request is, with its key; None if not limited."""
    peer = sa.remote.address
    if request.exchange_type == ExchangeType.INFORMATIONAL:
        return (KEEPALIVE, peer) if not request.payloads else None
    if request.exchange_type != ExchangeType.CREATE_CHILD_SA:
        return None
    sa_payload = request.get(SaPayload)
    if sa_payload is not None and any(
        p.protocol_id == ProtocolId.IKE for p in sa_payload.proposals
    ):
        return IKE_REKEY, peer
    rekey = request.notify(NotifyType.REKEY_SA)
    if rekey is None:
        return None
    child = sa.child_by_spi_out(rekey.spi)
    tunnel = child.name if child is not None else rekey.spi.hex()
    return IPSEC_REKEY, (peer, sa.vpn.name if sa.vpn else "", tunnel)


class ExchangeRates:
    def __init__(self, limits: DosLimits) -> None:
        self.windows: dict[str, SlidingWindow] = {}
        for name, rate in (
            (IKE_REKEY, limits.ike_rekey_rate),
            (IPSEC_REKEY, limits.ipsec_rekey_rate),
            (KEEPALIVE, limits.keepalive_rate),
        ):
            if rate is not None:
                self.windows[name] = SlidingWindow(rate)

    def exceeded(self, sa: IkeSa, request: Message, now: float) -> str | None:
        """The name of the rate this request exceeds, or None (and then it is counted)."""
        if not self.windows:
            return None
        kind = classify(sa, request)
        if kind is None:
            return None
        name, key = kind
        window = self.windows.get(name)
        if window is None or window.allow(key, now):
            return None
        return name
