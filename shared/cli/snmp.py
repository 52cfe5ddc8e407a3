"""IKE state over SNMP (seed 004 `snmp`): a net-snmp `pass_persist` program.

`ikefarm snmp pass-persist -c FILE` is started by net-snmp's snmpd (a
`pass_persist` line in snmpd.conf), speaks its line protocol on stdin/stdout and
answers from what the farm reports over the bus to the CLI user `admin`: the ike
workers' `show ike-sa` rows and their `stats` (the numbers `ikefarm status` shows).
It reads the bus at most once every `cache` seconds (a walk is many `getnext`s),
and refuses to start unless `[ike.global-options] snmp = true`.

The OID tree sits under BASE = 1.3.6.1.4.1.32473.1. Enterprise number 32473 is
the one RFC 5612 sets aside for documentation and examples: the subtree is NOT
registered to ikefarm; move it with `--base` to a subtree you own.

    BASE.1.1.0  ikeSaCount          Gauge32   IKE SAs of every worker, any state
    BASE.1.2.0  ikeSaEstablished    Gauge32   of them, established
    BASE.1.3.0  ikeSaHalfOpen       Gauge32   half-open (either role), from the workers' stats
    BASE.1.4.0  childSaCount        Gauge32   child SAs of those IKE SAs
    BASE.1.5.0  ikeErrors           Counter64 the workers' error counters summed (below)
    BASE.1.6.0  ikeWorkers          Gauge32   ike workers that answered
    BASE.2.1.C.I  ikeSaTable, row I = 1..ikeSaCount in unique-id order, column C:
        1 uniqueId (string)  2 vpn  3 state  4 localAddress  5 remoteAddress
        6 localId  7 remoteId  8 childSas (Gauge32)  9 spiI (hex)  10 spiR (hex)
        11 establishedSeconds (Gauge32, 0 while not established)
    BASE.3.1.C.I  ikeErrorTable, row I = 1.. in name order: 1 name (string),
        2 count (Counter64). The error counters are the workers' `dropped.*`,
        `auth_failed.*` and `request_timeout.*` counters, summed over workers.

Row indexes are positions, so they move when SAs come and go; the unique id
(column 1) names an SA. Nothing here can write (`set` is answered `not-writable`).
"""

from __future__ import annotations

import asyncio
import bisect
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import IO, Any

BASE = (1, 3, 6, 1, 4, 1, 32473, 1)
ERROR_PREFIXES = ("dropped.", "auth_failed.", "request_timeout.")
DEFAULT_CACHE = 5.0  # s a bus snapshot answers for
MAX_OID_LENGTH = 128  # sub-identifiers accepted in a request
MAX_LINE = 1024  # characters read from snmpd per line
GAUGE_MAX = 2**32 - 1
COUNTER64_MAX = 2**64 - 1

Oid = tuple[int, ...]
Entry = tuple[Oid, str, str]  # oid, pass_persist type, value


@dataclass
class FarmState:
    """What one bus snapshot says: the SA rows and each ike worker's stats."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    workers: list[tuple[Mapping[str, Any], Mapping[str, Any]]] = field(default_factory=list)


def parse_oid(text: str) -> Oid | None:
    """`.1.3.6...` or `1.3.6...` as a tuple; None for anything else."""
    text = text.strip()
    if text.startswith("."):
        text = text[1:]
    parts = text.split(".")
    if not text or len(parts) > MAX_OID_LENGTH:
        return None
    oid: list[int] = []
    for part in parts:
        if not part.isdigit() or not part.isascii() or len(part) > 10:
            return None
        value = int(part)
        if value > 2**32 - 1:
            return None
        oid.append(value)
    return tuple(oid)


def oid_text(oid: Oid) -> str:
    return "." + ".".join(str(n) for n in oid)


def _text(value: Any) -> str:
    """A one-line string value: snmpd reads one line per value."""
    text = "" if value is None else str(value)
    return "".join(c if c.isprintable() else "?" for c in text)[:255]


def _gauge(value: Any) -> str:
    number = value if isinstance(value, int) and not isinstance(value, bool) else 0
    return str(min(max(number, 0), GAUGE_MAX))


def _counter64(value: int) -> str:
    return str(min(max(value, 0), COUNTER64_MAX))


def error_counts(workers: Iterable[tuple[Mapping[str, Any], Mapping[str, Any]]]) -> dict[str, int]:
    """The error counters of every worker (service counters and engine counters), summed."""
    total: dict[str, int] = {}
    for counters, gauges in workers:
        engine = gauges.get("engine")
        for source in (counters, engine if isinstance(engine, Mapping) else {}):
            for name, count in source.items():
                if (
                    isinstance(name, str)
                    and name.startswith(ERROR_PREFIXES)
                    and isinstance(count, int)
                    and not isinstance(count, bool)
                ):
                    total[name] = total.get(name, 0) + count
    return total


def build_tree(state: FarmState, base: Oid = BASE) -> list[Entry]:
    """Every OID the snapshot answers, in OID order."""
    rows = state.rows
    errors = error_counts(state.workers)
    half_open = sum(
        g.get("half_open", 0)
        for _c, g in state.workers
        if isinstance(g.get("half_open", 0), int) and not isinstance(g.get("half_open"), bool)
    )
    children = sum(len(r.get("children") or []) for r in rows)
    entries: list[Entry] = [
        ((*base, 1, 1, 0), "gauge", _gauge(len(rows))),
        ((*base, 1, 2, 0), "gauge", _gauge(sum(r.get("state") == "established" for r in rows))),
        ((*base, 1, 3, 0), "gauge", _gauge(half_open)),
        ((*base, 1, 4, 0), "gauge", _gauge(children)),
        ((*base, 1, 5, 0), "counter64", _counter64(sum(errors.values()))),
        ((*base, 1, 6, 0), "gauge", _gauge(len(state.workers))),
    ]
    columns: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
        ("string", lambda r: _text(r.get("unique_id"))),
        ("string", lambda r: _text(r.get("vpn") or "")),
        ("string", lambda r: _text(r.get("state"))),
        ("string", lambda r: _text(r.get("local_address"))),
        ("string", lambda r: _text(r.get("remote_address"))),
        ("string", lambda r: _text(r.get("local_id") or "")),
        ("string", lambda r: _text(r.get("remote_id") or "")),
        ("gauge", lambda r: _gauge(len(r.get("children") or []))),
        ("string", lambda r: _text(r.get("spi_i"))),
        ("string", lambda r: _text(r.get("spi_r"))),
        ("gauge", lambda r: _gauge(r.get("established_ago") or 0)),
    ]
    for column, (kind, value) in enumerate(columns, start=1):
        for index, row in enumerate(rows, start=1):
            entries.append(((*base, 2, 1, column, index), kind, value(row)))
    names = sorted(errors)
    for index, name in enumerate(names, start=1):
        entries.append(((*base, 3, 1, 1, index), "string", _text(name)))
    for index, name in enumerate(names, start=1):
        entries.append(((*base, 3, 1, 2, index), "counter64", _counter64(errors[name])))
    entries.sort(key=lambda e: e[0])
    return entries


def answer(entries: list[Entry], command: str, oid: Oid | None) -> str:
    """The reply to `get` or `getnext` of `oid`: three lines, or `NONE`."""
    if oid is None:
        return "NONE\n"
    oids = [e[0] for e in entries]
    if command == "get":
        at = bisect.bisect_left(oids, oid)
        found = entries[at] if at < len(entries) and oids[at] == oid else None
    else:
        at = bisect.bisect_right(oids, oid)
        found = entries[at] if at < len(entries) else None
    if found is None:
        return "NONE\n"
    return f"{oid_text(found[0])}\n{found[1]}\n{found[2]}\n"


class PassPersist:
    """The pass_persist conversation; `fetch` returns a fresh FarmState (None: the farm
    did not answer, every request then gets NONE until it does)."""

    def __init__(
        self,
        fetch: Callable[[], FarmState | None],
        cache: float = DEFAULT_CACHE,
        base: Oid = BASE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.fetch = fetch
        self.cache = cache
        self.base = base
        self.clock = clock
        self._entries: list[Entry] = []
        self._at = -float("inf")

    def entries(self) -> list[Entry]:
        now = self.clock()
        if now - self._at >= self.cache:
            state = self.fetch()
            self._entries = build_tree(state, self.base) if state is not None else []
            self._at = now
        return self._entries

    def serve(self, stdin: IO[str], stdout: IO[str]) -> None:
        """Until snmpd closes stdin (or sends an empty line)."""

        def line() -> str | None:
            text = stdin.readline(MAX_LINE)
            if not text:
                return None
            if not text.endswith("\n"):  # longer than MAX_LINE: drop the rest of it
                while (more := stdin.readline(MAX_LINE)) and not more.endswith("\n"):
                    pass
            return text.strip()

        while (command := line()) is not None:
            lowered = command.lower()
            if lowered == "":
                return
            if lowered == "ping":
                reply = "PONG\n"
            elif lowered in ("get", "getnext"):
                requested = line()
                if requested is None:
                    return
                reply = answer(self.entries(), lowered, parse_oid(requested))
            elif lowered == "set":
                if line() is None or line() is None:  # the OID, then "TYPE VALUE"
                    return
                reply = "not-writable\n"
            else:
                reply = "NONE\n"
            stdout.write(reply)
            stdout.flush()


def bus_fetcher(url: str, credentials: str | None, window: float) -> Callable[[], FarmState | None]:
    """A fetch for PassPersist that asks the farm over NATS as `admin`, each time on a
    connection of its own (a walk refreshes every `cache` seconds at most)."""
    from ikefarm.shared.cli.manage import connect
    from ikefarm.shared.cli.status import discover, ike_sa_rows

    async def snapshot() -> FarmState | None:
        try:
            nc = await connect(url, credentials)
        except Exception as exc:
            print(f"ikefarm snmp: cannot reach NATS at {url}: {exc}", file=sys.stderr)
            return None
        problems: list[str] = []
        try:
            rows, services = await asyncio.gather(
                ike_sa_rows(nc, False, window, problems), discover(nc, window, problems)
            )
        finally:
            await nc.close()
        for problem in problems:
            print(f"ikefarm snmp: {problem}", file=sys.stderr)
        workers = [(s.counters, s.gauges) for s in services if s.name == "ike"]
        return FarmState(rows, workers)

    def fetch() -> FarmState | None:
        return asyncio.run(snapshot())

    return fetch
