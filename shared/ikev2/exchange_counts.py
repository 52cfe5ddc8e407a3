"""Exchange counts by type, role and result, kept in the engine's counters.

An exchange is a request and its response (RFC 7296 1.2). The engine counts one
when it sends the response to a peer's request (`responder`), when the response
to its own request arrives (`initiator`), and when its request went unanswered
after the last retransmission (`initiator`, result `timeout`). The result is
`ok`, or the name of the first error notification the response carries
(RFC 7296 3.10.1: types below 16384), or `COOKIE` for an IKE_SA_INIT response
that asks for one (RFC 7296 2.6). Counter names are
`exchange.<role>.<EXCHANGE>.<result>`; the metrics endpoint exports them as
`ikefarm_ike_exchanges_total{role, exchange, result}`. Every part comes from a
closed set (the exchange and notify enums, else `exchange-N` / `error-N`), so
the number of series is bounded whatever peers send.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from ikefarm.shared.ikev2.constants import ExchangeType, NotifyType
from ikefarm.shared.ikev2.payloads import NotifyPayload, Payload

PREFIX = "exchange."
RESPONDER = "responder"
INITIATOR = "initiator"
OK = "ok"
TIMEOUT = "timeout"


def exchange_label(exchange_type: int) -> str:
    try:
        return ExchangeType(exchange_type).name
    except ValueError:
        return f"exchange-{int(exchange_type)}"


def result_of(payloads: Iterable[Payload]) -> str:
    """`ok`, the first error notify's name, or `COOKIE`."""
    cookie = False
    for payload in payloads:
        if not isinstance(payload, NotifyPayload):
            continue
        kind = int(payload.notify_type)
        if kind < NotifyType.INITIAL_CONTACT:  # an error type (RFC 7296 3.10.1)
            try:
                return NotifyType(kind).name
            except ValueError:
                return f"error-{kind}"
        cookie = cookie or kind == NotifyType.COOKIE
    return "COOKIE" if cookie else OK


def count_exchange(counters: Counter[str], role: str, exchange_type: int, result: str) -> None:
    counters[f"{PREFIX}{role}.{exchange_label(exchange_type)}.{result}"] += 1


def parse_counter(name: str) -> tuple[str, str, str] | None:
    """(role, exchange, result) of an `exchange.` counter name, else None."""
    if not name.startswith(PREFIX):
        return None
    parts = name[len(PREFIX) :].split(".")
    if len(parts) != 3 or parts[0] not in (RESPONDER, INITIATOR):
        return None
    return parts[0], parts[1], parts[2]
