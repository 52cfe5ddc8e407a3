"""Message schemas of the bus contract. Bump SCHEMA_VERSION on an incompatible change."""

from __future__ import annotations

from dataclasses import field
from typing import Any

from ikefarm.proto.envelope import BusMessage, message


@message("ping")
class Ping(BusMessage):
    """Liveness probe; the reply is a Pong."""


@message("pong")
class Pong(BusMessage):
    service: str
    instance: str
    version: str
    uptime: float


@message("stats-request")
class StatsRequest(BusMessage):
    """Ask a service for its counters."""


@message("stats")
class Stats(BusMessage):
    service: str
    instance: str
    version: str
    uptime: float
    requests: int
    errors: int
    counters: dict[str, Any] = field(default_factory=dict)
    gauges: dict[str, Any] = field(default_factory=dict)
