"""Sections of the configuration schema and the walk that checks a TOML tree against them.

A `Section` is a TOML table with a fixed set of keys; a `TableList` is an array of
tables (`[[ike.vpn]]`) whose items are sections. The walk collects every problem
(unknown key with the nearest valid name, refused value with its range) instead
of stopping at the first, so an operator fixes a file in one pass.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from ikefarm.shared.config.kinds import Kind, ValueRefused


@dataclass
class Section:
    fields: dict[str, Kind | Section | TableList]
    doc: str = ""
    # a table that may be given inline as a plain value, e.g. `local-ts = { subnet = ... }`


@dataclass
class TableList:
    item: Section
    key: str | None = "name"  # item key that must be unique across the list
    doc: str = ""


@dataclass(frozen=True)
class ConfigProblem:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@dataclass
class WalkResult:
    value: Any
    explicit: set[str] = field(default_factory=set)
    problems: list[ConfigProblem] = field(default_factory=list)


def _show(raw: Any) -> str:
    if isinstance(raw, str):
        return f'"{raw}"'
    if isinstance(raw, bool):
        return "true" if raw else "false"
    return repr(raw)


def nearest_key(unknown: str, known: list[str]) -> str | None:
    matches = difflib.get_close_matches(unknown, known, n=1, cutoff=0.6)
    return matches[0] if matches else None


def walk_section(section: Section, raw: Any, path: str, result: WalkResult) -> dict[str, Any]:
    if not isinstance(raw, Mapping):
        result.problems.append(ConfigProblem(path, f"must be a table, got {_show(raw)}"))
        raw = {}
    known = list(section.fields)
    for key in raw:
        if key not in section.fields:
            hint = nearest_key(key, known)
            suggestion = (
                f"; did you mean '{hint}'?" if hint else f"; valid keys: {', '.join(known)}"
            )
            result.problems.append(ConfigProblem(_join(path, key), f"unknown key{suggestion}"))
    out: dict[str, Any] = {}
    for key, spec in section.fields.items():
        child_path = _join(path, key)
        present = key in raw
        if present:
            result.explicit.add(child_path)
        if isinstance(spec, Section):
            out[key] = walk_section(spec, raw.get(key, {}), child_path, result)
        elif isinstance(spec, TableList):
            out[key] = walk_table_list(spec, raw.get(key, []), child_path, result)
        elif present:
            try:
                out[key] = spec.parse(raw[key])
            except ValueRefused as exc:
                shown = "<masked>" if "secret" in key else _show(raw[key])
                result.problems.append(ConfigProblem(child_path, f"{shown} {exc}"))
                out[key] = spec.default
        else:
            out[key] = spec.default
    return out


def walk_table_list(spec: TableList, raw: Any, path: str, result: WalkResult) -> list[Any]:
    if isinstance(raw, Mapping):
        raw = [raw]
    if not isinstance(raw, list):
        result.problems.append(ConfigProblem(path, "must be an array of tables ([[...]])"))
        return []
    items = []
    seen: dict[Any, int] = {}
    for index, item in enumerate(raw):
        item_path = f"{path}[{index}]"
        parsed = walk_section(spec.item, item, item_path, result)
        if spec.key is not None:
            name = parsed.get(spec.key)
            if name is None:
                result.problems.append(ConfigProblem(item_path, f"'{spec.key}' is required"))
            elif name in seen:
                result.problems.append(
                    ConfigProblem(
                        f"{item_path}.{spec.key}",
                        f"{_show(name)} is already used by {path}[{seen[name]}]",
                    )
                )
            else:
                seen[name] = index
        items.append(parsed)
    return items


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def iter_reference(
    section: Section, path: str = ""
) -> Iterator[tuple[str, Kind | Section | TableList]]:
    """Every key of the schema with its spec, in schema order, for the reference docs."""
    for key, spec in section.fields.items():
        child = _join(path, key)
        yield child, spec
        if isinstance(spec, Section):
            yield from iter_reference(spec, child)
        elif isinstance(spec, TableList):
            yield from iter_reference(spec.item, child + "[]")
