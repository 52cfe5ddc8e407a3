"""State of IKE and child SAs as plain data, and the vSR `show ike ike-sa` text (seed 004)."""

from __future__ import annotations

from typing import Any

from ikefarm.shared.ikev2.exchanges import mobike
from ikefarm.shared.ikev2.sa import ChildSa, IkeSa


def _in(deadline: float | None, now: float) -> int | None:
    return None if deadline is None else max(0, round(deadline - now))


def child_row(child: ChildSa, now: float) -> dict[str, Any]:
    return {
        "name": child.name,
        "unique_id": child.unique_id,
        "reqid": child.policy.reqid,
        "state": str(child.state),
        "mode": child.mode,
        "protocol": "esp",
        "udp_encap": child.udp_encap,
        "proposal": child.algorithms.esp_summary(),
        "esn": child.algorithms.esn,
        "spi_in": child.spi_in.hex(),
        "spi_out": child.spi_out.hex(),
        # the kernel service's last counters of this child (KernelCounters)
        "bytes_in": child.bytes_in,
        "packets_in": child.packets_in,
        "bytes_out": child.bytes_out,
        "packets_out": child.packets_out,
        "installed_ago": max(0, round(now - child.installed_at)),
        "rekey_in": _in(child.rekey_at, now),
        "expires_in": _in(child.expire_at, now),
        "local_ts": [str(s) for s in child.local_ts],
        "remote_ts": [str(s) for s in child.remote_ts],
    }


def ike_sa_row(sa: IkeSa, now: float) -> dict[str, Any]:
    proposal = sa.algorithms.ike_summary() if sa.algorithms else ""
    if sa.ppk_used:
        proposal += "/PPK"
    return {
        "vpn": sa.vpn.name if sa.vpn else None,
        "unique_id": sa.unique_id,
        "state": str(sa.state),
        "version": 2,
        "initiator": sa.is_initiator,
        "spi_i": sa.spi_i.hex(),
        "spi_r": sa.spi_r.hex(),
        "local_address": sa.local.address,
        "local_port": sa.local.port,
        "remote_address": sa.remote.address,
        "remote_port": sa.remote.port,
        "local_id": str(sa.local_id) if sa.local_id else None,
        "remote_id": str(sa.remote_id) if sa.remote_id else None,
        "proposal": proposal,
        "udp_encap": sa.nat_detected,
        "ppk_used": sa.ppk_used,
        "established_ago": None
        if sa.established_at is None
        else max(0, round(now - sa.established_at)),
        "rekey_in": _in(sa.rekey_at, now),
        "local_auth": sa.auth_methods.get("local_auth"),
        "remote_auth": sa.auth_methods.get("remote_auth"),
        "children": [child_row(c, now) for c in sa.children],
        # virtual IPs (RFC 7296 2.19): assigned to us / leased to the peer, and the DNS
        # servers the peer's CFG_REPLY named
        "local_vips": list(sa.local_vips),
        "remote_vips": [address for _pool, address in sa.remote_vips],
        "dns": list(sa.cfg_dns),
        # MOBIKE (RFC 4555): negotiated, and the peer's other addresses it listed
        "mobike": mobike.in_use(sa),
        "peer_addresses": list(sa.peer_addresses),
    }


def format_summary(rows: list[dict[str, Any]]) -> str:
    header = ("VPN", "Local-Addr", "Local-ID", "Remote-Addr", "Remote-ID", "State", "Child-SAs")
    lines = [header] + [
        (
            str(r["vpn"] or "-"),
            r["local_address"],
            str(r["local_id"] or "-"),
            r["remote_address"],
            str(r["remote_id"] or "-"),
            r["state"],
            str(len(r["children"])),
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        " ".join(c.ljust(widths[i]) for i, c in enumerate(line)).rstrip() for line in lines
    )


def format_details(rows: list[dict[str, Any]]) -> str:
    out: list[str] = []
    for r in rows:
        spis = f"{r['spi_i']}_i {r['spi_r']}_r"
        out.append(f"{r['vpn'] or '-'}: #{r['unique_id']}, {r['state'].upper()}, IKEv2, {spis}")
        out.append(f"  local  '{r['local_id'] or ''}' @ {r['local_address']}[{r['local_port']}]")
        out.append(f"  remote '{r['remote_id'] or ''}' @ {r['remote_address']}[{r['remote_port']}]")
        if r["proposal"]:
            out.append(f"  {r['proposal']}")
        if r["established_ago"] is not None:
            timing = f"  established {r['established_ago']}s ago"
            if r["rekey_in"] is not None:
                timing += f", rekeying in {r['rekey_in']}s"
            out.append(timing)
        for label, key in (("local ", "local_vips"), ("remote", "remote_vips")):
            vips = r.get(key)
            if isinstance(vips, list) and vips:
                out.append(f"  {label} vip {' '.join(str(v) for v in vips)}")
        dns = r.get("dns")
        if isinstance(dns, list) and dns:
            out.append(f"  dns {' '.join(str(v) for v in dns)}")
        if r.get("mobike"):
            others = r.get("peer_addresses")
            listed = " ".join(str(v) for v in others) if isinstance(others, list) else ""
            out.append(f"  mobike, peer's other addresses: {listed or 'none'}")
        for c in r["children"]:
            mode = c["mode"].upper()
            head = f"  {c['name']}: #{c['unique_id']}, reqid {c['reqid']}, {c['state'].upper()}"
            out.append(f"{head}, {mode}, {c['proposal']}")
            timing = f"    installed {c['installed_ago']}s ago"
            if c["rekey_in"] is not None:
                timing += f", rekeying in {c['rekey_in']}s"
            if c["expires_in"] is not None:
                timing += f", expires in {c['expires_in']}s"
            out.append(timing)
            out.append(f"    in  {c['spi_in']}, {c['bytes_in']} bytes, {c['packets_in']} packets")
            out.append(
                f"    out {c['spi_out']}, {c['bytes_out']} bytes, {c['packets_out']} packets"
            )
            out.append(f"    local  {' '.join(c['local_ts'])}")
            out.append(f"    remote {' '.join(c['remote_ts'])}")
    return "\n".join(out)


# What a row gathered from the bus must hold before the CLI formats it: the types that
# `ike_sa_row` / `child_row` produce. A row from a worker of another version, or one a
# misbehaving client slipped in, is reported and left out, never a crash.
_OPTIONAL_STR = (str, type(None))
_OPTIONAL_INT = (int, type(None))
IKE_SA_ROW_FIELDS: dict[str, tuple[type, ...]] = {
    "vpn": _OPTIONAL_STR,
    "unique_id": (int,),
    "state": (str,),
    "spi_i": (str,),
    "spi_r": (str,),
    "local_address": (str,),
    "local_port": (int,),
    "remote_address": (str,),
    "remote_port": (int,),
    "local_id": _OPTIONAL_STR,
    "remote_id": _OPTIONAL_STR,
    "proposal": (str,),
    "established_ago": _OPTIONAL_INT,
    "rekey_in": _OPTIONAL_INT,
    "children": (list,),
}
CHILD_ROW_FIELDS: dict[str, tuple[type, ...]] = {
    "name": (str,),
    "unique_id": (int,),
    "reqid": (int,),
    "state": (str,),
    "mode": (str,),
    "proposal": (str,),
    "spi_in": (str,),
    "spi_out": (str,),
    "bytes_in": (int,),
    "packets_in": (int,),
    "bytes_out": (int,),
    "packets_out": (int,),
    "installed_ago": (int,),
    "rekey_in": _OPTIONAL_INT,
    "expires_in": _OPTIONAL_INT,
    "local_ts": (list,),
    "remote_ts": (list,),
}


def _field_problem(row: object, fields: dict[str, tuple[type, ...]], what: str) -> str | None:
    if not isinstance(row, dict):
        return f"{what} is a {type(row).__name__}, not a table"
    for key, types in fields.items():
        if key not in row:
            return f"{what} has no {key!r}"
        value = row[key]
        # bool is an int to Python; no field here may be one
        if isinstance(value, bool) or not isinstance(value, types):
            return f"{what} has {key!r} of type {type(value).__name__}"
    return None


def row_problem(row: object) -> str | None:
    """Why an IKE SA row cannot be shown (None when it can)."""
    problem = _field_problem(row, IKE_SA_ROW_FIELDS, "the IKE SA row")
    if problem is not None:
        return problem
    assert isinstance(row, dict)
    for child in row["children"]:
        problem = _field_problem(child, CHILD_ROW_FIELDS, "a child SA row")
        if problem is not None:
            return problem
        if not all(isinstance(ts, str) for ts in (*child["local_ts"], *child["remote_ts"])):
            return "a child SA row has a traffic selector that is not text"
    return None


def _table(lines: list[tuple[str, ...]], indent: str = "") -> list[str]:
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return [
        indent + " ".join(c.ljust(widths[i]) for i, c in enumerate(line)).rstrip() for line in lines
    ]


def format_vip_pools(pools: list[Any]) -> str:
    """`show vip-pool`: one line per pool (Pool Size Used Free), then its leases (Address,
    Identity, Since, State) in the column layout of `show ike ike-sa` (vSR seed 004). A
    malformed entry from the bus is shown as far as it goes, never a crash."""
    import time

    out: list[str] = []
    for pool in pools:
        if not isinstance(pool, dict):
            continue
        head = ("Pool", "Size", "Used", "Free")
        row = tuple(str(pool.get(k, "?")) for k in ("name", "size", "used", "free"))
        out += _table([head, row])
        leases = [lease for lease in pool.get("leases") or [] if isinstance(lease, dict)]
        if leases:
            lines: list[tuple[str, ...]] = [("Address", "Identity", "Since", "State")]
            for lease in leases:
                since = lease.get("since")
                when = (
                    time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(since))
                    if isinstance(since, int | float) and since > 0
                    else "-"
                )
                state = "online" if lease.get("live") is True else "stale"
                identity = str(lease.get("identity") or "-")
                lines.append((str(lease.get("address", "?")), identity, when, state))
            out += _table(lines, "  ")
    return "\n".join(out)
