"""The `netlink` source of the flow service: kernel conntrack through pyroute2.

Sessions come from conntrack: a dump at start, then NFCT events (new, update, destroy) as
they happen, and a dump every `POLL_INTERVAL` seconds for the counters (conntrack sends no
event per packet; a session whose counters moved is refreshed), or less often when dumps
take long (at most a fifth of the time goes to dumping). Events lost to a full socket buffer
are made up by the next dump. The session table decides
when a session ends: ageing, clearing and refusal (max-sessions) delete the conntrack entry,
and an entry whose kernel timeout is shorter than the table's is extended so the kernel does
not end it first. Parsing and the table updates are sans-I/O (`shared/flow/conntrack.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections import Counter
from pathlib import Path
from typing import Any

from ikefarm.shared.flow.conntrack import (
    ICMP_ECHO_REQUEST,
    CtEntry,
    apply_dump,
    apply_event,
    event_kind,
    parse_entry,
)
from ikefarm.shared.flow.table import Closed, FiveTuple, Refused, SessionTable

POLL_INTERVAL = 2.0  # s between dumps that read the counters
# NFNLGRP_CONNTRACK_NEW, _UPDATE, _DESTROY as a bind() bit mask (groups 1, 2, 3)
NFCT_GROUPS = 0x1 | 0x2 | 0x4
ACCOUNTING = Path("/proc/sys/net/netfilter/nf_conntrack_acct")
FAMILIES = (socket.AF_INET, socket.AF_INET6)
SO_RCVBUFFORCE = 33  # linux/socket.h: SO_RCVBUF beyond rmem_max, for CAP_NET_ADMIN
EVENT_BUFFER = 16 << 20  # room for a burst of NFCT events before the kernel drops some
DUMP_SHARE = 4  # a dump that took d seconds is not repeated before 4 d more (CPU bound)


class ConntrackUnavailable(RuntimeError):
    """ctnetlink cannot be used here (not root, no nf_conntrack_netlink)."""


def _nfct_tuple(key: FiveTuple) -> Any:
    from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

    protocol, src, sport, dst, dport = key
    family = socket.AF_INET6 if ":" in src else socket.AF_INET
    if protocol in ICMP_ECHO_REQUEST:
        return NFCTAttrTuple(
            family=family,
            saddr=src,
            daddr=dst,
            proto=protocol,
            icmp_id=sport,
            icmp_type=ICMP_ECHO_REQUEST[protocol],
            icmp_code=0,
        )
    return NFCTAttrTuple(
        family=family, saddr=src, daddr=dst, proto=protocol, sport=sport, dport=dport
    )


class ConntrackSource:
    def __init__(
        self,
        table: SessionTable,
        *,
        tunnel_ports: tuple[int, ...] = (500, 4500),
        counters: Counter[str] | None = None,
        log: Any = None,
        netns: str | None = None,
        enable_accounting: bool = True,
        poll_interval: float = POLL_INTERVAL,
    ) -> None:
        self.table = table
        self.tunnel_ports = tunnel_ports
        self.counters: Counter[str] = counters if counters is not None else Counter()
        self.log = log
        self.netns = netns
        self.enable_accounting = enable_accounting
        self.poll_interval = poll_interval
        self._events: Any = None
        self._requests: dict[int, Any] = {}
        self._reader: asyncio.Task[None] | None = None
        self._last_poll = -1e18
        self._interval = poll_interval
        self._clock: Any = None
        self._pending: set[asyncio.Task[None]] = set()

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self, now: float, clock: Any = None) -> None:
        """Open the sockets, read the table from a dump, then follow the events."""
        from pyroute2.netlink.nfnetlink.nfctsocket import AsyncNFCTSocket

        self._clock = clock or asyncio.get_running_loop().time
        if self.enable_accounting and self.netns is None:
            try:
                ACCOUNTING.write_text("1\n")  # counters for new entries (per network namespace)
            except OSError as exc:
                self._note("conntrack_accounting_off", error=type(exc).__name__)
        try:
            kwargs = {"netns": self.netns} if self.netns else {}
            self._events = AsyncNFCTSocket(**kwargs)
            await self._events.bind(groups=NFCT_GROUPS)
            with contextlib.suppress(OSError, AttributeError):  # root only; else the default
                self._events.socket.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, EVENT_BUFFER)
            for family in FAMILIES:
                self._requests[family] = AsyncNFCTSocket(nfgen_family=family, **kwargs)
        except Exception as exc:
            await self.stop()
            raise ConntrackUnavailable(
                f"cannot open ctnetlink ({type(exc).__name__}: {exc}); the netlink flow source "
                "needs root and nf_conntrack_netlink"
            ) from None
        self._reader = asyncio.create_task(self._read_events(), name="flow-conntrack-events")
        await self.poll(now, force=True)

    async def stop(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
            self._reader = None
        for sock in (self._events, *self._requests.values()):
            if sock is not None:
                with contextlib.suppress(Exception):
                    sock.close()
        self._events, self._requests = None, {}

    def _note(self, event: str, **fields: Any) -> None:
        self.counters[f"conntrack.{event}"] += 1
        if self.log is not None:
            self.log.control(event, **fields)

    # --- events and dumps ----------------------------------------------------------------------

    async def _read_events(self) -> None:
        while True:
            try:
                async for msg in self._events.get():
                    self._on_event(msg)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # ENOBUFS and the like: the next dump resynchronises
                self._note("conntrack_events_lost", error=type(exc).__name__)
                self._last_poll = -1e18
                await asyncio.sleep(0.1)

    def _on_event(self, msg: Any) -> None:
        entry = parse_entry(msg)
        if entry is None:
            self.counters["conntrack.event_ignored"] += 1
            return
        self.counters["conntrack.events"] += 1
        kind = event_kind(msg)
        gone, refused = apply_event(self.table, kind, entry, self._clock(), self.tunnel_ports)
        self.counters["conntrack.gone"] += len(gone)
        if refused:
            task = asyncio.get_running_loop().create_task(self.closed([], refused))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def _dump(self) -> list[CtEntry]:
        entries: list[CtEntry] = []
        for sock in self._requests.values():
            async for msg in await sock.dump():
                entry = parse_entry(msg)
                if entry is not None:
                    entries.append(entry)
        return entries

    async def poll(self, now: float, force: bool = False) -> None:
        """Every poll interval: a dump for counters and missed events (called by the ticker)."""
        if not force and now - self._last_poll < self._interval:
            return
        self._last_poll = now
        began = time.monotonic()
        try:
            entries = await self._dump()
        except Exception as exc:
            self._note("conntrack_dump_failed", error=type(exc).__name__)
            return
        # a large conntrack table takes long to dump and parse: keep the dumps to a share
        self._interval = max(self.poll_interval, DUMP_SHARE * (time.monotonic() - began))
        current = self._clock()
        closed, refused, short = apply_dump(
            self.table, entries, current, self.tunnel_ports, started=now
        )
        self.counters["conntrack.dumps"] += 1
        self.counters["conntrack.gone"] += len(closed)
        for entry, session in short:
            await self._request(
                "set",
                entry.init,
                timeout=session.remaining(current) + int(self.poll_interval) + 1,
            )
        await self.closed([], refused)

    async def verify(self, sessions: list[Any], now: float) -> None:
        """Before the table ends sessions whose time is up, ask the kernel about each: one
        whose counters moved since the last dump saw traffic and is refreshed instead
        (dumps of a large conntrack table come seldom). Costs what is due."""
        for session in sessions:
            tuple_orig = _nfct_tuple(session.init)
            sock = self._requests.get(tuple_orig.family)
            if sock is None:
                continue
            try:
                answer = await sock.entry("get", tuple_orig=tuple_orig)
            except Exception:  # ENOENT: gone from the kernel; the table ends it too
                self.counters["conntrack.verify_gone"] += 1
                continue
            entry = parse_entry(answer[0]) if answer else None
            if entry is None or entry.counters is None:
                continue
            if entry.counters[0] != session.packets_in or entry.counters[2] != session.packets_out:
                self.counters["conntrack.verify_refreshed"] += 1
                self.table.refresh(session.init, now, entry.counters)

    # --- enforcement ---------------------------------------------------------------------------

    async def closed(self, closed: list[Closed], refused: list[Refused]) -> None:
        """Aged, cleared and refused flows: their conntrack entries are deleted."""
        keys = [c.session.init for c in closed if c.session.kind != "leaf"]
        keys += [r.key for r in refused]
        for key in keys:
            if await self._request("del", key):
                self.counters["conntrack.deleted"] += 1

    async def _request(self, command: str, key: FiveTuple, **kwargs: Any) -> bool:
        tuple_orig = _nfct_tuple(key)
        sock = self._requests.get(tuple_orig.family)
        if sock is None:
            return False
        try:
            await sock.entry(command, tuple_orig=tuple_orig, **kwargs)
        except Exception as exc:  # ENOENT: the kernel ended it meanwhile
            self.counters[f"conntrack.{command}_failed"] += 1
            if self.log is not None:
                self.log.debug("conntrack_request_failed", command=command, error=str(exc))
            return False
        return True
