"""`show security flow session` rows and the SRX layout (seed 003; docs/flow-sessions.md).

A row is a plain dict (it crosses the bus); `row_problem` is what the CLI checks each row
against before printing it, so a malformed answer is an error line and never a crash.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from ikefarm.shared.flow.settings import protocol_name
from ikefarm.shared.flow.table import LEAF, Session

ROW_FIELDS: dict[str, type | tuple[type, ...]] = {
    "session_id": int,
    "kind": str,
    "policy": str,
    "application": str,
    "timeout": int,
    "valid": bool,
    "state": str,
    "tunnel": bool,
    "resource_manager": bool,
    "protocol": int,
    "in": list,
    "out": list,
    "in_interface": str,
    "out_interface": str,
    "packets_in": int,
    "bytes_in": int,
    "packets_out": int,
    "bytes_out": int,
    "duration": int,
    "template": int,
}
MAX_NAME = 128


def session_row(session: Session, now: float) -> dict[str, Any]:
    return {
        "session_id": session.id,
        "kind": session.kind,
        "policy": session.policy,
        "application": session.application,
        "timeout": session.remaining(now),
        "valid": session.valid,
        "state": session.state,
        "tunnel": session.tunnel,
        "resource_manager": session.resource_manager,
        "protocol": session.protocol,
        "in": list(session.init),
        "out": list(session.reply),
        "in_interface": session.ingress,
        "out_interface": session.egress,
        "packets_in": session.packets_in,
        "bytes_in": session.bytes_in,
        "packets_out": session.packets_out,
        "bytes_out": session.bytes_out,
        "duration": max(0, int(now - session.start)),
        "template": session.template.id if session.kind == LEAF and session.template else 0,
    }


def _tuple_problem(value: Any) -> str | None:
    if not isinstance(value, list) or len(value) != 5:
        return "a 5-tuple is a list of 5"
    protocol, src, sport, dst, dport = value
    for port in (protocol, sport, dport):
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            return "protocol and ports are integers 0-65535"
    for address in (src, dst):
        try:
            ipaddress.ip_address(address)
        except (ValueError, TypeError):
            return "addresses must be IP addresses"
    return None


def row_problem(row: Any) -> str | None:
    """Why a row from the bus cannot be shown, or None."""
    if not isinstance(row, dict):
        return "row is not a map"
    for name, kind in ROW_FIELDS.items():
        value = row.get(name)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            return f"{name} missing or not {getattr(kind, '__name__', kind)}"
        if isinstance(value, str) and (len(value) > MAX_NAME or not value.isprintable()):
            return f"{name} is not a short printable name"
    return _tuple_problem(row["in"]) or _tuple_problem(row["out"])


def _direction(label: str, five: list[Any], interface: str, packets: int, octets: int) -> str:
    protocol, src, sport, dst, dport = five
    return (
        f"  {label}: {src}/{sport} --> {dst}/{dport};{protocol_name(protocol)},"
        f" If: {interface or 'N/A'}, Pkts: {packets}, Bytes: {octets}"
    )


def format_sessions(rows: list[dict[str, Any]]) -> str:
    """The SRX layout: one block per session, then the total."""
    lines: list[str] = []
    for row in rows:
        state = "Valid" if row["valid"] else "Invalid"
        policy = row["policy"] or "N/A"
        extra = ""
        if row["tunnel"]:
            extra = ", Tunnel"
        elif row["kind"] == "template":
            extra = ", Multicast template"
        elif row["kind"] == "leaf":
            extra = f", Multicast leaf of {row['template']}"
        if row["application"]:
            extra += f", Application: {row['application']}"
        lines.append(
            f"Session ID: {row['session_id']}, Policy name: {policy}, "
            f"Timeout: {row['timeout']}, {state}{extra}"
        )
        lines.append(
            _direction("In", row["in"], row["in_interface"], row["packets_in"], row["bytes_in"])
        )
        if row["kind"] != "template":
            lines.append(
                _direction(
                    "Out", row["out"], row["out_interface"], row["packets_out"], row["bytes_out"]
                )
            )
        lines.append("")
    lines.append(f"Total sessions: {len(rows)}")
    return "\n".join(lines)


def format_summary(summary: dict[str, Any]) -> str:
    """`show security flow session summary` in the SRX wording, plus protocols and aging."""
    lines = [
        f"Unicast-sessions: {summary['unicast_sessions']}",
        f"Multicast-sessions: {summary['multicast_sessions']}",
        f"Failed-sessions: {summary['failed_sessions']}",
        f"Sessions-in-use: {summary['sessions_in_use']}",
        f"  Valid sessions: {summary['valid_sessions']}",
        f"  Pending sessions: {summary['pending_sessions']}",
        f"  Invalidated sessions: {summary['invalidated_sessions']}",
        f"Maximum-sessions: {summary['maximum_sessions']}",
    ]
    for name, count in summary["by_protocol"].items():
        lines.append(f"  {name}: {count}")
    aging = "on" if summary["aggressive_aging"] else "off"
    lines.append(
        f"Aggressive aging: {aging} (high-watermark {summary['high_watermark']}%, "
        f"low-watermark {summary['low_watermark']}%)"
    )
    return "\n".join(lines)


SUMMARY_FIELDS = (
    "unicast_sessions",
    "multicast_sessions",
    "failed_sessions",
    "sessions_in_use",
    "valid_sessions",
    "pending_sessions",
    "invalidated_sessions",
    "maximum_sessions",
    "high_watermark",
    "low_watermark",
)


def summary_problem(summary: Any) -> str | None:
    if not isinstance(summary, dict):
        return "summary is not a map"
    for name in SUMMARY_FIELDS:
        value = summary.get(name)
        if isinstance(value, bool) or not isinstance(value, int):
            return f"{name} missing or not int"
    if not isinstance(summary.get("aggressive_aging"), bool):
        return "aggressive_aging missing or not bool"
    protocols = summary.get("by_protocol")
    if not isinstance(protocols, dict) or len(protocols) > 256:
        return "by_protocol is not a map"
    for name, count in protocols.items():
        if not isinstance(name, str) or not name.isprintable() or len(name) > 16:
            return "by_protocol names must be short"
        if isinstance(count, bool) or not isinstance(count, int):
            return "by_protocol counts must be int"
    return None
