"""The `[flow]` options as the session table reads them (seed 003; docs/flow-sessions.md)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

# IP protocol names the commands and `[[flow.application]]` accept, with their numbers (IANA)
PROTOCOLS: dict[str, int] = {
    "icmp": 1,
    "igmp": 2,
    "tcp": 6,
    "udp": 17,
    "gre": 47,
    "esp": 50,
    "ah": 51,
    "icmp6": 58,
    "pim": 103,
    "sctp": 132,
}
PROTOCOL_NAMES: dict[int, str] = {number: name for name, number in PROTOCOLS.items()}
TCP, UDP, ICMP, ICMP6 = 6, 17, 1, 58


def protocol_name(number: int) -> str:
    return PROTOCOL_NAMES.get(number, str(number))


def protocol_number(raw: str | int) -> int:
    """`tcp` or `6` -> 6; ValueError for anything else."""
    if isinstance(raw, int) and not isinstance(raw, bool):
        number = raw
    elif isinstance(raw, str) and raw.lower() in PROTOCOLS:
        return PROTOCOLS[raw.lower()]
    elif isinstance(raw, str) and raw.isdigit() and len(raw) <= 3:
        number = int(raw)
    else:
        raise ValueError(f"protocol must be a name ({', '.join(PROTOCOLS)}) or 0-255")
    if not 0 <= number <= 255:
        raise ValueError("protocol must be 0-255")
    return number


@dataclass(frozen=True)
class Application:
    """A custom application (seed 003's multicast example): protocol + destination port, tied
    to policies, with its own inactivity timeout overriding the protocol's."""

    name: str
    protocol: int
    destination_port: int  # 0 = any
    inactivity_timeout: int
    policies: frozenset[str] = frozenset()  # empty: any policy

    def applies_to(self, policy: str) -> bool:
        return not self.policies or policy in self.policies


@dataclass(frozen=True)
class FlowSettings:
    max_sessions: int = 1_000_000
    tcp: int = 1800
    udp: int = 60
    icmp: int = 60
    other: int = 1800
    invalidated: int = 4
    tcp_initial_timeout: int = 20
    time_wait_state: int | None = None
    rst_invalidate_session: bool = False
    fin_invalidate_session: bool = False
    no_syn_check: bool = False
    no_sequence_check: bool = False
    tcp_mss: int | None = None
    early_ageout: int = 20
    high_watermark: int = 100
    low_watermark: int = 100
    applications: tuple[Application, ...] = field(default=())

    def protocol_timeout(self, protocol: int) -> int:
        if protocol == TCP:
            return self.tcp
        if protocol == UDP:
            return self.udp
        if protocol in (ICMP, ICMP6):
            return self.icmp
        return self.other

    @classmethod
    def from_config(cls, flow: Any) -> FlowSettings:
        """From the loaded `[flow]` section (a config node or a plain mapping)."""
        data: Mapping[str, Any] = flow.to_dict() if hasattr(flow, "to_dict") else flow
        timeouts = data.get("session-timeouts", {})
        tcp = data.get("tcp-session", {})
        aging = data.get("aging", {})
        return cls(
            max_sessions=data.get("max-sessions", 1_000_000),
            tcp=timeouts.get("tcp", 1800),
            udp=timeouts.get("udp", 60),
            icmp=timeouts.get("icmp", 60),
            other=timeouts.get("other", 1800),
            invalidated=timeouts.get("invalidated", 4),
            tcp_initial_timeout=tcp.get("tcp-initial-timeout", 20),
            time_wait_state=tcp.get("time-wait-state"),
            rst_invalidate_session=bool(tcp.get("rst-invalidate-session", False)),
            fin_invalidate_session=bool(tcp.get("fin-invalidate-session", False)),
            no_syn_check=bool(tcp.get("no-syn-check", False)),
            no_sequence_check=bool(tcp.get("no-sequence-check", False)),
            tcp_mss=tcp.get("tcp-mss"),
            early_ageout=aging.get("early-ageout", 20),
            high_watermark=aging.get("high-watermark", 100),
            low_watermark=aging.get("low-watermark", 100),
            applications=tuple(_applications(data.get("application", []))),
        )


def _applications(items: Iterable[Mapping[str, Any]]) -> Iterable[Application]:
    for item in items:
        yield Application(
            name=item["name"],
            protocol=protocol_number(item["protocol"]),
            destination_port=item.get("destination-port", 0) or 0,
            inactivity_timeout=item["inactivity-timeout"],
            policies=frozenset(item.get("policy", []) or []),
        )


def config_problems(flow: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(path, text) for the `[flow]` values the session table cannot honour."""
    problems: list[tuple[str, str]] = []
    names: set[str] = set()
    for index, app in enumerate(flow.get("application", [])):
        where = f"flow.application[{index}]"
        for key in ("name", "protocol", "inactivity-timeout"):
            if app.get(key) is None:
                problems.append((f"{where}.{key}", "is required"))
        if app.get("name") in names:
            problems.append((f"{where}.name", f"{app['name']!r} is defined twice"))
        names.add(app.get("name"))
    # docs/flow-sessions.md "TCP checks": only the userspace dataplane acts on packets
    tcp_mss = flow.get("tcp-session", {}).get("tcp-mss")
    if flow.get("source", "dataplane") != "dataplane" and tcp_mss is not None:
        problems.append(("flow.tcp-session.tcp-mss", 'acts only with flow.source = "dataplane"'))
    return problems
