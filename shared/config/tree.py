"""Sections of the configuration schema and the walk that checks a TOML tree against them.

A `Section` is a TOML table with a fixed set of keys; a `TableList` is an array of
tables (`[[ike.vpn]]`) whose items are sections. The walk collects every problem
(unknown key with the nearest valid name, refused value with its range) instead
of stopping at the first, so an operator fixes a file in one pass. Each problem is
one line naming the key; values appear only as `show_value` cuts them.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from ikefarm.shared.config.kinds import Kind, ValueRefused, one_line, show_key, show_value

MAX_TABLE_ITEMS = 10_000  # items of one array of tables ([[ike.vpn]], ...)
MAX_PROBLEMS = 100  # problems kept and reported; the rest are only counted
MAX_PATH_CHARS = 512
MAX_MESSAGE_CHARS = 1024


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
    """One problem, one line: whatever a message was built from, it stays printable and short."""

    path: str
    message: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", one_line(self.path, MAX_PATH_CHARS))
        object.__setattr__(self, "message", one_line(self.message, MAX_MESSAGE_CHARS))

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@dataclass
class WalkResult:
    value: Any
    explicit: set[str] = field(default_factory=set)
    problems: list[ConfigProblem] = field(default_factory=list)
    omitted: int = 0  # problems beyond MAX_PROBLEMS, counted only

    @property
    def full(self) -> bool:
        return len(self.problems) >= MAX_PROBLEMS

    def add(self, path: str, message: str) -> None:
        if self.full:
            self.omitted += 1
        else:
            self.problems.append(ConfigProblem(path, message))


def nearest_key(unknown: str, known: list[str]) -> str | None:
    matches = difflib.get_close_matches(unknown, known, n=1, cutoff=0.6)
    return matches[0] if matches else None


def walk_section(section: Section, raw: Any, path: str, result: WalkResult) -> dict[str, Any]:
    if not isinstance(raw, Mapping):
        result.add(path, f"must be a table, got {show_value(raw)}")
        raw = {}
    known = list(section.fields)
    for key in raw:
        if key not in section.fields:
            if result.full:  # spare the nearest-name search for what is not shown
                result.omitted += 1
                continue
            hint = nearest_key(key, known)
            suggestion = (
                f"; did you mean '{hint}'?" if hint else f"; valid keys: {', '.join(known)}"
            )
            result.add(_join(path, show_key(key)), f"unknown key{suggestion}")
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
                shown = "<masked>" if "secret" in key else show_value(raw[key])
                result.add(child_path, f"{shown} {exc}")
                out[key] = spec.default
        else:
            out[key] = spec.default
    return out


def walk_table_list(spec: TableList, raw: Any, path: str, result: WalkResult) -> list[Any]:
    if isinstance(raw, Mapping):
        raw = [raw]
    if not isinstance(raw, list):
        result.add(path, "must be an array of tables ([[...]])")
        return []
    if len(raw) > MAX_TABLE_ITEMS:
        result.add(path, f"{show_value(raw)} has more than the {MAX_TABLE_ITEMS} items allowed")
        return []
    items = []
    seen: dict[Any, int] = {}
    for index, item in enumerate(raw):
        item_path = f"{path}[{index}]"
        parsed = walk_section(spec.item, item, item_path, result)
        if spec.key is not None:
            name = parsed.get(spec.key)
            if name is None:
                result.add(item_path, f"'{spec.key}' is required")
            elif name in seen:
                result.add(
                    f"{item_path}.{spec.key}",
                    f"{show_value(name)} is already used by {path}[{seen[name]}]",
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
