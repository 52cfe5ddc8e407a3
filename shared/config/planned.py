"""Seed options that the schema names but nothing implements yet.

Every knob of the seeds is in the schema with its name, default and range, so a
file written for the vendor's box reads the same here. Where ikefarm does not act
on a knob yet, setting it to anything but its default is refused at `config
check` (and therefore at `up` and at every service start) with "not implemented
yet", naming the issue that brings it: an operator must never believe a tunnel
has routes, a pool or session limits that nothing enforces. Leaving a planned
option at its default is accepted; the configuration reference marks it.

Paths are schema paths: `[]` stands for any item of an array of tables, and a
path that names a table covers every key beneath it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ikefarm.shared.config.kinds import show_value
from ikefarm.shared.config.tree import ConfigProblem

_ITEM_INDEX = re.compile(r"\[\d+\]")


@dataclass(frozen=True)
class Planned:
    path: str
    issue: int | None
    feature: str
    values: frozenset[str] | None = None  # only these values are refused (a Choice's option)

    @property
    def text(self) -> str:
        where = f"issue {self.issue}: " if self.issue is not None else ""
        return f"not implemented yet ({where}{self.feature})"

    def covers(self, schema_path: str) -> bool:
        return schema_path == self.path or schema_path.startswith(
            (self.path + ".", self.path + "[")
        )


PLANNED: tuple[Planned, ...] = (
    Planned(
        "ike.vpn[].ike-policy.local-auth-method",
        15,
        "EAP as initiator (ikefarm is an EAP authenticator only)",
        frozenset({"eap-radius"}),
    ),
    Planned("ike.global-options.threads", None, "the ike worker is one process per core"),
    Planned("ike.global-options.sa-table-size", None, "the SA index is a growing hash table"),
    Planned("ike.global-options.sa-table-segments", None, "the SA index is a growing hash table"),
    Planned("ike.ike-policy-template[].reauth-time", None, "periodic reauthentication"),
    Planned(
        "ike.ipsec-policy-template[].start-action",
        None,
        "start-action at start",
        frozenset({"start"}),
    ),
    Planned(
        "ike.vpn[].ipsec-policy.start-action", None, "start-action at start", frozenset({"start"})
    ),
    Planned("ike.ipsec-policy-template[].close-action", None, "close-action"),
    Planned("ike.vpn[].ipsec-policy.close-action", None, "close-action"),
)


def planned_for(schema_path: str) -> Planned | None:
    """The entry that covers a schema path (`ike.vpn[].vip-pool`), if any."""
    for planned in PLANNED:
        if planned.covers(schema_path):
            return planned
    return None


def _value_at(data: Any, path: str) -> Any:
    node = data
    for segment in path.split("."):
        key, _, rest = segment.partition("[")
        node = node[key]
        for index in re.findall(r"(\d+)\]", "[" + rest) if rest else ():
            node = node[int(index)]
    return node


def planned_problems(
    data: dict[str, Any], explicit: set[str], defaults: dict[str, Any]
) -> list[ConfigProblem]:
    """One problem per key the file sets, away from its default, that nothing implements yet.

    `defaults` maps leaf schema paths to their defaults (the walk's view of the schema)."""
    problems: list[ConfigProblem] = []
    for path in sorted(explicit):
        schema_path = _ITEM_INDEX.sub("[]", path)
        planned = planned_for(schema_path)
        if planned is None or schema_path not in defaults:
            continue  # tables: their leaves are checked one by one
        try:
            value = _value_at(data, path)
        except (KeyError, IndexError, TypeError):
            continue
        if value == defaults[schema_path] or value in (None, [], ""):
            continue
        if planned.values is not None and value not in planned.values:
            continue
        problems.append(ConfigProblem(path, f"{show_value(value)}: {planned.text}"))
    return problems
