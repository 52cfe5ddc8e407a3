"""The configuration reference, generated from the schema so docs and code cannot drift."""

from __future__ import annotations

from typing import Any

from ikefarm.shared.config.kinds import Kind
from ikefarm.shared.config.schema import SCHEMA
from ikefarm.shared.config.tree import Section, TableList, iter_reference


def _default_text(kind: Kind) -> str:
    default: Any = kind.default
    if default is None:
        return "unset"
    if isinstance(default, bool):
        return "true" if default else "false"
    if isinstance(default, str):
        return f'"{default}"' if default else '"" (empty)'
    return str(default)


def reference_markdown() -> str:
    lines = ["| key | allowed | default | meaning |", "|---|---|---|---|"]
    for path, spec in iter_reference(SCHEMA):
        if isinstance(spec, Section):
            if spec.doc:
                lines.append(f"| **[{path}]** | table | | {spec.doc} |")
            continue
        if isinstance(spec, TableList):
            lines.append(f"| **[[{path}]]** | array of tables | | {spec.doc} |")
            continue
        cells = (spec.describe(), _default_text(spec), spec.doc)
        allowed, default, meaning = (c.replace("|", "\\|") for c in cells)
        lines.append(f"| `{path}` | {allowed} | {default} | {meaning} |")
    return "\n".join(lines) + "\n"
