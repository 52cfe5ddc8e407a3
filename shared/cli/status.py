"""`ikefarm status`: services found through NATS micro discovery ($SRV.INFO / $SRV.STATS).

Discovery asks each service kind on its own subject (`$SRV.INFO.ikefarm-<kind>`), which only
that kind's bus user may subscribe to (proto/subjects.py), and keeps a reply only when it names
the kind asked and is well formed: another bus user cannot slip a row in, and a malformed
reply is an error line, never a crash.
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass
from typing import Any

import nats
from nats.aio.client import Client

from ikefarm.proto import envelope, subjects
from ikefarm.proto.messages import Stats, StatsRequest

SERVICE_PREFIX = subjects.MICRO_NAME_PREFIX
# an instance name becomes a subject token (`ikefarm.<service>.<instance>.stats`)
_INSTANCE = re.compile(r"[A-Za-z0-9_-]{1,128}")


def shown(value: object, limit: int = 60) -> str:
    """A value that came from the bus, safe to print on one line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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


async def ike_sa_rows(
    nc: Client, details: bool, window: float = 0.5, problems: list[str] | None = None
) -> list[dict[str, Any]]:
    """Every worker's `show ike-sa` rows, by unique id; `problems` gets one line per
    reply or row left out (malformed), never the row itself."""
    from ikefarm.proto.messages import IkeShow, IkeShowRequest
    from ikefarm.shared.ikev2.show import row_problem

    problems = problems if problems is not None else []
    replies = await gather(nc, subjects.IKE_SHOW, envelope.pack(IkeShowRequest(details)), window)
    rows: list[dict[str, Any]] = []
    for reply in replies:
        if not reply.data:  # the broker's "no responders" status
            continue
        try:
            show = envelope.unpack_reply(reply.data, IkeShow)
        except envelope.BusError as exc:
            problems.append(f"a worker answered badly: {shown(str(exc), 200)}")
            continue
        for row in show.sas:
            problem = row_problem(row)
            if problem is None:
                rows.append(row)
            else:
                problems.append(f"ignored a malformed row from {shown(show.instance)}: {problem}")
    rows.sort(key=lambda r: r["unique_id"])
    return rows


async def discover(
    nc: Client, window: float = 0.5, problems: list[str] | None = None
) -> list[ServiceRow]:
    """One row per running ikefarm service instance, with its own counters.

    `problems` collects one line per reply that was left out.
    """
    problems = problems if problems is not None else []
    found = await asyncio.gather(*(_discover_kind(nc, kind, window) for kind in subjects.SERVICES))
    rows: list[ServiceRow] = []
    for kind_rows, kind_problems in found:
        rows += kind_rows
        problems += kind_problems
    rows.sort(key=lambda r: (subjects.SERVICES.index(r.name), r.instance))
    return rows


def _json_map(raw: bytes) -> dict[str, Any] | None:
    try:
        decoded = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    return decoded if isinstance(decoded, dict) else None


async def _discover_kind(
    nc: Client, service: str, window: float
) -> tuple[list[ServiceRow], list[str]]:
    """The instances of one service kind, asked on that kind's own discovery subjects."""
    name = subjects.micro_name(service)
    problems: list[str] = []
    infos, stat_replies = await asyncio.gather(
        gather(nc, subjects.micro_subject("INFO", service), window=window),
        gather(nc, subjects.micro_subject("STATS", service), window=window),
    )
    stats: dict[str, dict[str, Any]] = {}
    for msg in stat_replies:
        reply = _json_map(msg.data)
        if reply is not None and reply.get("name") == name and isinstance(reply.get("id"), str):
            stats[reply["id"]] = reply
    rows: list[ServiceRow] = []
    for msg in infos:
        if not msg.data:  # the broker's "no responders" status
            continue
        info = _json_map(msg.data)
        if info is None or info.get("name") != name:
            got = info.get("name") if info is not None else msg.data[:40]
            problems.append(f"ignored a discovery reply for {name} that names {shown(got)}")
            continue
        metadata = info.get("metadata") if isinstance(info.get("metadata"), dict) else {}
        instance = metadata.get("instance", info.get("id"))
        version = info.get("version", "?")
        if not isinstance(instance, str) or not _INSTANCE.fullmatch(instance):
            problems.append(f"ignored a {service} instance named {shown(instance)}")
            continue
        if not isinstance(version, str):
            problems.append(f"ignored {service} instance {instance}: version {shown(version)}")
            continue
        detail = await _instance_stats(nc, service, instance)
        micro_stats = stats.get(str(info.get("id")), {})
        endpoints = [e for e in micro_stats.get("endpoints") or [] if isinstance(e, dict)]

        def endpoint_sum(key: str, endpoints: list[dict[str, Any]] = endpoints) -> int:
            return sum(e[key] for e in endpoints if isinstance(e.get(key), int))

        rows.append(
            ServiceRow(
                name=service,
                instance=instance,
                version=version,
                uptime=detail.uptime if detail else 0.0,
                requests=detail.requests if detail else endpoint_sum("num_requests"),
                errors=detail.errors if detail else endpoint_sum("num_errors"),
                counters=detail.counters if detail else {},
                gauges=detail.gauges if detail else {},
            )
        )
    return rows, problems


async def _instance_stats(nc: Client, service: str, instance: str) -> Stats | None:
    """The instance's own counters, kept only when they come from that service and instance."""
    subject = subjects.instance_endpoint(service, instance, "stats")
    try:
        reply = await nc.request(subject, envelope.pack(StatsRequest()), timeout=1.0)
        stats = envelope.unpack_reply(reply.data, Stats)
    except Exception:
        return None
    if stats.service != service or stats.instance != instance:
        return None
    return stats


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


def format_shards(rows: list[ServiceRow]) -> str:
    """One line per shard an ike worker holds: its own, and those it adopted from a worker
    whose lease lapsed (docs/failover.md), with the age of the lease (seconds since the
    holder last renewed it; a lease not renewed for 10 s lapses)."""
    lines: list[tuple[int, str]] = []
    for row in rows:
        gauges = row.gauges if isinstance(row.gauges, dict) else {}
        shard = gauges.get("shard")
        if row.name != "ike" or not isinstance(shard, int):
            continue
        lines.append(
            (
                shard,
                f"shard {shard}: {row.instance} (own, lease age {_age(gauges.get('lease_age'))})",
            )
        )
        adopted = gauges.get("adopted_shards")
        for item in adopted if isinstance(adopted, list) else []:
            if not isinstance(item, dict) or not isinstance(item.get("shard"), int):
                continue
            since = _age(item.get("adopted_for"))
            text = (
                f"shard {item['shard']}: {row.instance} (adopted {since} ago, "
                f"{shown(item.get('restored'))} SAs restored, "
                f"lease age {_age(item.get('lease_age'))})"
            )
            lines.append((item["shard"], text))
    return "\n".join(text for _shard, text in sorted(lines))


def _age(value: object) -> str:
    return f"{value:g}s" if isinstance(value, int | float) else "?"


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
