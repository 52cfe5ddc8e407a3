"""MOBIKE as initiator (RFC 4555 3.5): our address went away, or a better path appeared.

The kernel service watches our addresses (`services/kernel/addresses.py`) and publishes
`LocalAddresses` when they change. For each MOBIKE SA this worker initiated whose local
address is gone (and, with `mobike-prefer-best-path`, for each of them when an address
appeared), it asks the kernel service which source address the routing table picks
toward the peer (`RouteSourceRequest`); when that is another address ingress listens on,
the engine moves the SA there and tells the peer (`IkeEngine.move_local`).

The walk over the worker's SAs happens per address change, never per datagram.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from ikefarm.proto import subjects
from ikefarm.proto.messages import LocalAddresses, RouteSourceReply, RouteSourceRequest
from ikefarm.shared.ikev2.effects import Effect
from ikefarm.shared.ikev2.engine import IkeEngine
from ikefarm.shared.ikev2.exchanges import mobike
from ikefarm.shared.ikev2.sa import IkeSaState

ROUTE_TIMEOUT = 2.0


class LocalMoves:
    def __init__(
        self,
        runtime: Any,
        engine: IkeEngine,
        listening: set[str],
        prefer_best_path: bool,
        apply: Callable[[list[Effect]], Awaitable[None]],
    ) -> None:
        self.runtime = runtime
        self.engine = engine
        self.listening = listening  # the addresses ingress has sockets on
        self.prefer_best_path = prefer_best_path
        self.apply = apply

    async def on_addresses(self, event: LocalAddresses, _msg: Any = None) -> None:
        gone, added = set(event.gone), set(event.added)
        counters = self.runtime.counters
        for sa in list(self.engine.sas.values()):
            if not (
                sa.is_initiator
                and sa.state == IkeSaState.ESTABLISHED
                and mobike.in_use(sa)
                and sa.local_spi in self.engine.sas
            ):
                continue
            lost = sa.local.address in gone
            if not lost and not (self.prefer_best_path and added):
                continue
            source = await self._source_toward(sa.remote.address)
            if not source or source == sa.local.address:
                if lost:
                    counters["mobike.no_path"] += 1
                continue
            if source not in self.listening:
                counters["mobike.no_socket"] += 1  # ingress cannot send from there
                continue
            counters["mobike.address_gone" if lost else "mobike.better_path"] += 1
            await self.apply(self.engine.move_local(sa, source, time.monotonic()))

    async def _source_toward(self, remote: str) -> str:
        try:
            reply = await self.runtime.request(
                subjects.KERNEL_ROUTE_SOURCE,
                RouteSourceRequest(remote),
                RouteSourceReply,
                timeout=ROUTE_TIMEOUT,
            )
        except Exception:
            self.runtime.counters["mobike.route_source_errors"] += 1
            return ""
        return reply.source
