"""Flow: the flow-session table and its aging (Junos SRX semantics, seed 003).

A thin adapter around `shared/flow` (docs/flow-sessions.md):

- `[flow] source = "dataplane"`: batched session events from the kernel service's
  dataplane on `subjects.FLOW_EVENTS` (`FlowEvents`; never one per packet) are checked
  whole, then applied; what closes or is refused goes back as `FlowVerdicts` on
  `subjects.KERNEL_FLOW_VERDICTS`.
- `[flow] source = "netlink"`: sessions come from kernel conntrack through pyroute2
  (`services/flow/conntrack.py`); ageing and clearing delete the conntrack entries.
- Endpoints: `subjects.FLOW_SHOW` (FlowShowRequest -> FlowShow) and `subjects.FLOW_CLEAR`
  (FlowClearRequest -> FlowClearResult), words as in `shared/flow/filters.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from typing import Any

from ikefarm.proto import subjects
from ikefarm.proto.envelope import BusError
from ikefarm.proto.messages import (
    FlowClearRequest,
    FlowClearResult,
    FlowEvents,
    FlowShow,
    FlowShowRequest,
    FlowVerdicts,
)
from ikefarm.shared.bus.runtime import Runtime, ServiceBase, ServiceUnavailable
from ikefarm.shared.config.loader import Config
from ikefarm.shared.flow.events import EventError, apply_batch, check_batch, verdicts
from ikefarm.shared.flow.filters import FilterError, parse_words
from ikefarm.shared.flow.settings import FlowSettings
from ikefarm.shared.flow.show import session_row
from ikefarm.shared.flow.table import Closed, Refused, SessionTable

TICK = 0.25  # s between timer passes at most; a pass costs what comes due
MAX_SHOW_ROWS = 2000  # rows per answer (the envelope is bounded); the rest are counted


class FlowService(ServiceBase):
    name = "flow"
    subsystem = "manager"
    description = "ikefarm flow: session table and aging"

    def __init__(self, runtime: Runtime) -> None:
        super().__init__(runtime)
        self.settings = FlowSettings.from_config(self.config.flow)
        self.table = SessionTable(self.settings)
        self.source = self.config.flow.source
        self._ticker: asyncio.Task[None] | None = None
        self._verdict_seq = 0
        self._full = False
        self.conntrack: Any = None

    @classmethod
    def preflight(cls, config: Config) -> None:
        """The netlink source reads and deletes conntrack entries: that takes root
        (CAP_NET_ADMIN); say so before `up` starts restarting the service forever."""
        if config.flow.source == "netlink" and os.geteuid() != 0:
            raise ServiceUnavailable(
                '[flow] source = "netlink" needs root (CAP_NET_ADMIN) for ctnetlink; '
                'run as root or use source = "dataplane"'
            )

    @staticmethod
    def now() -> float:
        return time.monotonic()

    async def setup(self) -> None:
        if self.source == "netlink":
            from ikefarm.services.flow.conntrack import ConntrackSource, ConntrackUnavailable

            self.conntrack = ConntrackSource(
                self.table,
                tunnel_ports=(self.config.ingress.ike_port, self.config.ingress.natt_port),
                counters=self.runtime.counters,
                log=self.log,
            )
            try:
                await self.conntrack.start(self.now(), clock=self.now)
            except ConntrackUnavailable as exc:
                raise ServiceUnavailable(str(exc)) from None
        else:
            await self.runtime.subscribe(subjects.FLOW_EVENTS, FlowEvents, self.on_events)
        await self.runtime.add_endpoint(
            "show", FlowShowRequest, self.on_show, subject=subjects.FLOW_SHOW
        )
        await self.runtime.add_endpoint(
            "clear", FlowClearRequest, self.on_clear, subject=subjects.FLOW_CLEAR
        )
        self._ticker = asyncio.create_task(self._tick_forever(), name="flow-tick")
        self.log.control(
            "flow_started", source=self.source, max_sessions=self.settings.max_sessions
        )

    async def teardown(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        if self.conntrack is not None:
            await self.conntrack.stop()

    def gauges(self) -> dict[str, Any]:
        return {
            "sessions": len(self.table),
            "max_sessions": self.settings.max_sessions,
            "aggressive_aging": self.table.aggressive,
            "source": self.source,
            **{f"table.{k}": v for k, v in self.table.counters.items()},
        }

    # --- the dataplane's events ----------------------------------------------------------------

    async def on_events(self, batch: FlowEvents, _msg: Any) -> None:
        try:
            checked = check_batch(batch)
        except EventError as exc:
            self.runtime.counters[f"events_dropped.{exc.code}"] += 1
            self.log.control("flow_events_dropped", code=exc.code, reason=exc.text)
            return
        self.runtime.counters["events_batches"] += 1
        applied = apply_batch(self.table, checked, self.now())
        self.runtime.counters["events_unknown_session"] += applied.unknown
        await self._closed([], applied.refused)

    async def _closed(self, closed: list[Closed], refused: list[Refused]) -> None:
        """Tell the source what left the table: verdicts to the dataplane, or conntrack."""
        full = len(self.table) >= self.settings.max_sessions
        if self.conntrack is not None:
            await self.conntrack.closed(closed, refused)
            return
        if not closed and not refused and full == self._full:
            return
        self._full = full
        self._verdict_seq += 1
        message = FlowVerdicts(
            seq=self._verdict_seq, closed=verdicts(closed, refused), table_full=full
        )
        await self.runtime.publish(subjects.KERNEL_FLOW_VERDICTS, message)

    async def _tick_forever(self) -> None:
        while True:
            try:
                now = self.now()
                if self.conntrack is not None:
                    await self.conntrack.poll(now)
                    await self.conntrack.verify(self.table.due(now), now)
                closed = self.table.tick(now)
                if closed:
                    for item in closed:
                        self.runtime.counters[f"closed.{item.reason}"] += 1
                    await self._closed(closed, [])
                elif self._full != (len(self.table) >= self.settings.max_sessions):
                    await self._closed([], [])
            except Exception as exc:  # a tick must never stop ageing for good
                self.runtime.counters["tick_failed"] += 1
                self.log.control("flow_tick_failed", error=type(exc).__name__)
            await asyncio.sleep(TICK)

    # --- commands ------------------------------------------------------------------------------

    async def on_show(self, request: FlowShowRequest, _msg: Any) -> FlowShow:
        try:
            match, summary = parse_words("show", request.words)
        except FilterError as exc:
            raise BusError("bad_field", f"show: {exc}") from None
        now = self.now()
        if summary:
            return FlowShow(instance=self.runtime.instance, summary=self.table.summary(now))
        rows = []
        truncated = 0
        for session in self.table.select(match):
            if len(rows) < MAX_SHOW_ROWS:
                rows.append(session_row(session, now))
            else:
                truncated += 1
        rows.sort(key=lambda r: r["session_id"])
        return FlowShow(instance=self.runtime.instance, rows=rows, truncated=truncated)

    async def on_clear(self, request: FlowClearRequest, _msg: Any) -> FlowClearResult:
        try:
            match, _ = parse_words("clear", request.words)
        except FilterError as exc:
            raise BusError("bad_field", f"clear: {exc}") from None
        closed = self.table.clear(match)
        self.runtime.counters["cleared"] += len(closed)
        self.log.control("flow_sessions_cleared", words=request.words, count=len(closed))
        await self._closed(closed, [])
        return FlowClearResult(instance=self.runtime.instance, count=len(closed))
