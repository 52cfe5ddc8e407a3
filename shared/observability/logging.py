"""structlog JSON lines with the vSR levels (0-4), subsystems and facilities (seed 004).

A message of level N from subsystem S is written once for each facility
(`daemon`, `authpriv`) whose level for S (or its `default`) is N or more, with
`facility` telling which; `disable` turns a facility off. Level meanings:
0 audit (SA up/down), 1 control flow and errors, 2 detailed debugging,
3 raw hex dumps, 4 sensitive material (keys).

Secrets never leave below level 4: the `redact` processor replaces `Secret`
objects and any field whose name marks key material before rendering.

Where lines go: JSON lines on stderr always (what containers collect), and, when
the host has a syslog socket (`/dev/log`), each line also to syslog with the
facility it was written for (daemon = 3, authpriv = 10, RFC 5424 6.2.1), tagged
`ikefarm-<service>[pid]`, its severity from the level (0 notice, 1 info, 2-4 debug).
The socket is written without blocking: a line syslog cannot take now is dropped
and counted (`syslog_dropped`), never waited for.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
import sys
import time
from collections.abc import Mapping, MutableMapping
from typing import Any, TextIO

import structlog
from opentelemetry import trace

from ikefarm.shared.config.kinds import Secret

SUBSYSTEMS = (
    "asn1",
    "child",
    "config",
    "daemon",
    "encoding",
    "ike",
    "ipsec",
    "job",
    "kernel",
    "manager",
    "network",
)
FACILITIES = ("daemon", "authpriv")
SENSITIVE_LEVEL = 4
# field names whose values are key material: kept only at level 4
SENSITIVE_FIELDS = frozenset(
    {
        "secret",
        "psk",
        "ppk",
        "private_key",
        "sk_d",
        "sk_ai",
        "sk_ar",
        "sk_ei",
        "sk_er",
        "sk_pi",
        "sk_pr",
        "keymat",
        "shared_secret",
        "key",
        "keys",
        "password",
    }
)

SYSLOG_SOCKET = "/dev/log"
SYSLOG_FACILITY = {"daemon": 3, "authpriv": 10}  # RFC 5424 6.2.1
SYSLOG_SEVERITY = {0: 5, 1: 6}  # notice, info; every other level debug (7)
SYSLOG_DEBUG = 7
# the seed's words about level 4
SENSITIVE_WARNING = "level 4 also includes sensitive material in dumps, e.g. keys"

_levels: dict[str, dict[str, int | None]] = {}
_syslog: socket.socket | None = None
syslog_dropped = 0
_stream: TextIO = sys.stderr
_context: dict[str, Any] = {}
_logger: Any = None  # the configured structlog logger (None: structlog's default, lazily)


def _facility_levels(
    section: Mapping[str, Any] | None, default: int | str
) -> dict[str, int | None]:
    section = section or {}
    base = section.get("default", default)
    levels: dict[str, int | None] = {}
    for subsystem in SUBSYSTEMS:
        value = section.get(subsystem)
        value = base if value is None else value
        levels[subsystem] = None if value == "disable" else int(value)
    return levels


def _open_syslog(path: str | None) -> socket.socket | None:
    """A non-blocking datagram socket connected to the syslog socket, if there is one."""
    if not path:
        return None
    try:
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            return None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    except OSError:
        return None
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        return None
    sock.setblocking(False)
    return sock


def configure_logging(
    service: str,
    instance: str,
    logging_config: Mapping[str, Any] | None = None,
    stream: TextIO | None = None,
    log_format: str = "json",
    syslog_path: str | None = SYSLOG_SOCKET,
) -> None:
    """Set the per-facility levels from `[ike.logging]` and where lines go."""
    global _stream, _logger, _syslog
    logging_config = logging_config or {}
    _levels["daemon"] = _facility_levels(logging_config.get("daemon"), 0)
    _levels["authpriv"] = _facility_levels(logging_config.get("authpriv"), "disable")
    override = os.environ.get("IKEFARM_LOG_LEVEL")
    if override is not None and override.isdigit():
        _levels["daemon"] = dict.fromkeys(SUBSYSTEMS, int(override))
    _stream = stream or sys.stderr
    _context.clear()
    _context.update(service=service, instance=instance)
    if _syslog is not None:
        _syslog.close()
    _syslog = _open_syslog(syslog_path)
    renderer: Any = (
        structlog.processors.JSONRenderer(sort_keys=False)
        if log_format == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            add_trace_ids,
            redact,
            to_syslog,
            renderer,
        ],
        wrapper_class=structlog.BoundLogger,
        # one write per line (print() writes the line and its newline apart)
        logger_factory=structlog.WriteLoggerFactory(file=_stream),
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(level=logging.WARNING, stream=_stream)
    # bound once per configuration: a lazy proxy rebuilds its processor chain per line
    _logger = structlog.get_logger().bind()
    for facility, levels in _levels.items():
        if any(level == SENSITIVE_LEVEL for level in levels.values()):
            get_logger("daemon").audit(
                "sensitive_logging_enabled", log_facility=facility, warning=SENSITIVE_WARNING
            )


def to_syslog(
    _logger: Any, _method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Send the (already redacted) line to syslog with its facility; stderr gets it too."""
    global syslog_dropped
    if _syslog is None:
        return event
    facility = SYSLOG_FACILITY.get(str(event.get("facility")), SYSLOG_FACILITY["daemon"])
    level = event.get("level")
    severity = SYSLOG_SEVERITY.get(level, SYSLOG_DEBUG) if isinstance(level, int) else 6
    stamp = time.strftime("%b %e %H:%M:%S")
    tag = f"ikefarm-{_context.get('service', 'cli')}[{os.getpid()}]"
    body = json.dumps(dict(event), default=str, separators=(",", ":"))
    try:
        _syslog.send(f"<{facility * 8 + severity}>{stamp} {tag}: {body}".encode())
    except OSError:  # full (EAGAIN), syslogd gone, line too long: dropped, counted
        syslog_dropped += 1
    return event


def add_trace_ids(
    _logger: Any, _method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    span = trace.get_current_span()
    context = span.get_span_context()
    if context.is_valid:
        event["trace_id"] = format(context.trace_id, "032x")
        event["span_id"] = format(context.span_id, "016x")
    return event


def _redact_value(value: Any) -> Any:
    if isinstance(value, Secret):
        return "<secret>"
    if isinstance(value, Mapping):
        return {
            k: ("<redacted>" if k in SENSITIVE_FIELDS else _redact_value(v))
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [_redact_value(v) for v in value]
    return value


def redact(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    if event.get("level") == SENSITIVE_LEVEL:
        return event
    for key in list(event):
        if key in SENSITIVE_FIELDS:
            event[key] = "<redacted>"
        else:
            event[key] = _redact_value(event[key])
    return event


class SubsystemLogger:
    """The logger of one subsystem: `log.at(1, "ike_sa_established", vpn="rw")`."""

    def __init__(self, subsystem: str) -> None:
        if subsystem not in SUBSYSTEMS:
            raise ValueError(f"unknown log subsystem {subsystem!r}")
        self.subsystem = subsystem

    def enabled(self, level: int) -> bool:
        return any(
            (lvl := _levels.get(facility, {}).get(self.subsystem)) is not None and level <= lvl
            for facility in FACILITIES
        )

    def at(self, level: int, event: str, **fields: Any) -> None:
        for facility in FACILITIES:
            limit = _levels.get(facility, {}).get(self.subsystem)
            if limit is None or level > limit:
                continue
            # one dict, so a field named like a context key (service, instance) can never
            # make the call itself fail: a log line must not take its process down
            record = {
                **_context,
                **fields,
                "subsystem": self.subsystem,
                "level": level,
                "facility": facility,
            }
            (_logger or structlog.get_logger()).msg(event, **record)

    def audit(self, event: str, **fields: Any) -> None:
        self.at(0, event, **fields)

    def control(self, event: str, **fields: Any) -> None:
        self.at(1, event, **fields)

    def debug(self, event: str, **fields: Any) -> None:
        self.at(2, event, **fields)

    def raw(self, event: str, **fields: Any) -> None:
        self.at(3, event, **fields)


def get_logger(subsystem: str) -> SubsystemLogger:
    return SubsystemLogger(subsystem)
