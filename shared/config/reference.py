"""The configuration reference, generated from the schema so docs and code cannot drift."""

from __future__ import annotations

from typing import Any

from ikefarm.shared.config.kinds import Kind
from ikefarm.shared.config.planned import planned_for
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
        planned = planned_for(path)
        if isinstance(spec, Section | TableList):
            doc = spec.doc
            if planned is not None and planned.path == path:
                doc = f"{doc}; **{planned.text}**".lstrip("; ")
            if isinstance(spec, TableList):
                lines.append(f"| **[[{path}]]** | array of tables | | {doc} |")
            elif doc:
                lines.append(f"| **[{path}]** | table | | {doc} |")
            continue
        meaning = spec.doc
        if planned is not None:
            refused = (
                " or ".join(f'"{v}"' for v in sorted(planned.values))
                if planned.values
                else "anything but the default"
            )
            meaning = f"{meaning}; {refused}: **{planned.text}**".lstrip("; ")
        cells = (spec.describe(), _default_text(spec), meaning)
        allowed, default, meaning = (c.replace("|", "\\|") for c in cells)
        lines.append(f"| `{path}` | {allowed} | {default} | {meaning} |")
    return "\n".join(lines) + "\n"
