"""`ikefarm status`: services found through NATS micro discovery ($SRV.INFO / $SRV.STATS)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import nats
from nats.aio.client import Client

from ikefarm.proto import envelope, subjects
from ikefarm.proto.messages import Stats, StatsRequest

SERVICE_PREFIX = "ikefarm-"


@dataclass
class ServiceRow:
    name: str
    instance: str
    version: str
    uptime: float
    requests: int
    errors: int
    counters: dict[str, Any]
    gauges: dict[str, Any]


async def gather(nc: Client, subject: str, payload: bytes = b"", window: float = 0.5) -> list[Any]:
    """Publish to a subject every instance answers, and collect replies for `window` seconds."""
    inbox = nc.new_inbox()
    replies: list[Any] = []
    sub = await nc.subscribe(inbox)
    await nc.publish(subject, payload, reply=inbox)
    await nc.flush()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + window
    while (left := deadline - loop.time()) > 0:
        try:
            msg = await sub.next_msg(timeout=left)
        except (TimeoutError, nats.errors.TimeoutError):
            break
        replies.append(msg)
    await sub.unsubscribe()
    return replies


async def discover(nc: Client, window: float = 0.5) -> list[ServiceRow]:
    """One row per running ikefarm service instance, with its own counters."""
    infos = [json.loads(m.data) for m in await gather(nc, "$SRV.INFO", window=window)]
    stats = {
        json.loads(m.data)["id"]: json.loads(m.data)
        for m in await gather(nc, "$SRV.STATS", window=window)
    }
    rows: list[ServiceRow] = []
    for info in infos:
        if not info.get("name", "").startswith(SERVICE_PREFIX):
            continue
        service = info["name"][len(SERVICE_PREFIX) :]
        instance = (info.get("metadata") or {}).get("instance", info["id"])
        micro_stats = stats.get(info["id"], {})
        detail = await _instance_stats(nc, service, instance)
        endpoints = micro_stats.get("endpoints") or []
        rows.append(
            ServiceRow(
                name=service,
                instance=instance,
                version=info.get("version", "?"),
                uptime=detail.uptime if detail else 0.0,
                requests=detail.requests
                if detail
                else sum(e.get("num_requests", 0) for e in endpoints),
                errors=detail.errors if detail else sum(e.get("num_errors", 0) for e in endpoints),
                counters=detail.counters if detail else {},
                gauges=detail.gauges if detail else {},
            )
        )
    rows.sort(
        key=lambda r: (
            subjects.SERVICES.index(r.name) if r.name in subjects.SERVICES else 99,
            r.instance,
        )
    )
    return rows


async def _instance_stats(nc: Client, service: str, instance: str) -> Stats | None:
    subject = subjects.instance_endpoint(service, instance, "stats")
    try:
        reply = await nc.request(subject, envelope.pack(StatsRequest()), timeout=1.0)
        return envelope.unpack_reply(reply.data, Stats)
    except Exception:
        return None


def format_uptime(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"


def format_table(rows: list[ServiceRow]) -> str:
    header = ("SERVICE", "INSTANCE", "VERSION", "UPTIME", "REQUESTS", "ERRORS")
    lines = [header] + [
        (r.name, r.instance, r.version, format_uptime(r.uptime), str(r.requests), str(r.errors))
        for r in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(line)).rstrip() for line in lines
    )


def format_dos(rows: list[ServiceRow]) -> str:
    """One line per ingress instance: the DoS gate's cookie mode and the farm's load as it
    sees it; one per ike worker: its half-open and established SAs (issue 5)."""
    lines = []
    for row in rows:
        dos = row.gauges.get("dos") if isinstance(row.gauges, dict) else None
        if row.name == "ingress" and isinstance(dos, dict):
            cookies = "on" if dos.get("cookies_active") else "off"
            lines.append(
                f"{row.instance}: cookies {cookies} ({dos.get('cookie_mode')}), "
                f"half-open {dos.get('half_open')} (pending {dos.get('pending')}, "
                f"peak {dos.get('half_open_peak')}), established {dos.get('established')}, "
                f"backing off {dos.get('backoff_peers')} peers"
            )
        elif row.name == "ike" and "half_open" in row.gauges:
            lines.append(
                f"{row.instance}: half-open {row.gauges.get('half_open')} "
                f"(peak {row.gauges.get('half_open_peak')}), "
                f"established {row.gauges.get('established')}"
            )
    return "\n".join(lines)
