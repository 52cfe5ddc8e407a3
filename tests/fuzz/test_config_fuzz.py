"""Fuzzing the config loader: whatever a file holds, only ConfigError comes out, each problem
one printable line under 2 KB that never shows a secret, and the CLI exits 1 (issue 16).

Inputs: random bytes, invalid UTF-8 inside string values, arrays and inline tables nested
up to thousands deep, huge arrays, random TOML values under every key of the example,
and random edits of the example's text.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from ikefarm.shared.config.loader import (
    MAX_NESTING,
    Config,
    ConfigError,
    decode_config,
    nesting_depth,
    parse_config,
)
from ikefarm.shared.config.schema import SCHEMA
from ikefarm.shared.config.tree import Section, TableList, iter_reference

EXAMPLE = Path(__file__).resolve().parents[2] / "ops" / "examples" / "psk-responder.toml"
EXAMPLE_BYTES = EXAMPLE.read_bytes()
IKEFARM = Path(sys.executable).parent / "ikefarm"
MAX_LINE = 2048

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def load(data: bytes) -> Config | ConfigError:
    """What load_config does after reading the file; any exception but ConfigError escapes."""
    try:
        return parse_config(decode_config(data, "fuzz.toml"), "fuzz.toml")
    except ConfigError as exc:
        assert_bounded(exc)
        return exc


def assert_bounded(exc: ConfigError) -> None:
    text = str(exc)
    lines = text.split("\n")
    assert re.fullmatch(r"fuzz\.toml: \d+ configuration error\(s\)", lines[0]), lines[0]
    assert len(lines) >= 2
    for line in lines:
        assert len(line) < MAX_LINE, line[:200]
        assert line.isprintable(), repr(line[:200])


# --- random bytes and bad encodings --------------------------------------------------------


@FUZZ
@given(st.one_of(st.binary(max_size=8192), st.text(max_size=2000).map(str.encode)))
def test_random_bytes(data: bytes) -> None:
    load(data)


@FUZZ
@given(st.binary(min_size=1, max_size=64).filter(lambda b: b"\0" not in b), st.data())
def test_invalid_utf8_inside_a_string(junk: bytes, draw: st.DataObject) -> None:
    strings = [m.start() + 1 for m in re.finditer(rb'"[^"\n]+"', EXAMPLE_BYTES)]
    at = draw.draw(st.sampled_from(strings))
    data = EXAMPLE_BYTES[:at] + junk + EXAMPLE_BYTES[at:]
    result = load(data)
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as bad:
        assert isinstance(result, ConfigError)
        line = data.count(b"\n", 0, bad.start) + 1
        assert f"not UTF-8: invalid byte at line {line}," in str(result)
        assert f"(byte offset {bad.start})" in str(result)


# --- nesting and size ------------------------------------------------------------------------

KEYS = [
    ("ike.global-options", "retransmit-tries"),
    ("ingress", "listen"),
    ("ike", "vpn"),
    ("ike.vpn", "security-policy"),
    ("", "unknown"),
]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.sampled_from(["[", "{ a = ", "[{ b = "]), min_size=1, max_size=3000),
    st.sampled_from(KEYS),
)
def test_deep_nesting(openers: list[str], where: tuple[str, str]) -> None:
    closers = {"[": "]", "{ a = ": " }", "[{ b = ": " }]"}
    value = "".join(openers) + "1" + "".join(closers[o] for o in reversed(openers))
    table, key = where
    text = (f"[{table}]\n" if table else "") + f"{key} = {value}\n"
    depth = sum(o.count("[") + o.count("{") for o in openers)
    result = load(text.encode())
    if depth > MAX_NESTING:
        assert isinstance(result, ConfigError)
        key_path = f"{table}.{key}" if table else key
        assert f"{key_path}: arrays or inline tables nested deeper" in str(result)
    else:
        assert "nested deeper" not in str(result)


ITEMS = ['"192.0.2.1"', '"::"', "1", '"x"', "true", "[]", "{}", '"0.0.0.0"']


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.integers(0, 60_000),
    st.sampled_from(ITEMS),
    st.sampled_from(
        [
            ("ingress", "listen"),
            ("ike", "vpn"),
            ("ike.pki", "crls"),
            ("ike.global-options", "threads"),
            ("ike", "pre-shared-key"),
        ]
    ),
)
def test_huge_arrays(count: int, item: str, where: tuple[str, str]) -> None:
    table, key = where
    result = load(f"[{table}]\n{key} = [{', '.join([item] * count)}]\n".encode())
    if isinstance(result, ConfigError):
        assert len(str(result)) < 100 * MAX_LINE
        if count > 10_000:
            assert f"[... {count} items]" in str(result)


# --- random values under real keys ---------------------------------------------------------

scalars = st.one_of(
    st.text(max_size=80),
    st.text(min_size=200, max_size=3000),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.integers(min_value=10**20, max_value=10**60),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.dates(),
    st.sampled_from(["192.0.2.1", "::", "any", "10s", "1/60", "always", "0x00", "0s====", "%any"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5),
        st.dictionaries(st.text(max_size=10), inner, max_size=4),
    ),
    max_leaves=20,
)


def toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else toml_value(key)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        # JSON's escapes are TOML basic-string ones; JSON leaves DEL raw, TOML does not
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, datetime.date):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return "{" + ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + "}"


ASSIGNMENTS = [m for m in re.finditer(r"(?m)^([a-z-]+) = (.*)$", EXAMPLE.read_text())]


@FUZZ
@given(st.sampled_from(ASSIGNMENTS), values)
def test_random_values_under_every_key(assignment: re.Match[str], value: Any) -> None:
    text = EXAMPLE.read_text()
    start, end = assignment.span(2)
    rendered = toml_value(value)
    result = load((text[:start] + rendered + text[end:]).encode())
    if isinstance(result, Config):  # what config check prints loads again
        assert parse_config(result.render()).render() == result.render()
    if assignment.group(1) == "secret" and isinstance(result, ConfigError):
        for secret in _strings(value):
            if len(secret) >= 6:
                assert secret not in str(result)


LEAVES = sorted(
    path for path, spec in iter_reference(SCHEMA) if not isinstance(spec, Section | TableList)
)


def nest(path: str, value: Any) -> tuple[str, Any]:
    """`ike.vpn[].name` and a value as the top key and the inline value that sets it."""
    for segment in reversed(path.split(".")[1:]):
        key = segment.removesuffix("[]")
        value = {key: [value] if segment.endswith("[]") else value}
    top = path.split(".", maxsplit=1)[0]
    return top, value


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(LEAVES), values), min_size=1, max_size=6))
def test_random_values_under_any_schema_key(assignments: list[tuple[str, Any]]) -> None:
    merged: dict[str, Any] = {}
    for path, value in assignments:
        top, nested = nest(path, value)
        merged[top] = nested  # a later one under the same top key wins
    text = "".join(f"{key} = {toml_value(value)}\n" for key, value in merged.items())
    result = load(text.encode())
    if isinstance(result, Config):
        assert parse_config(result.render()).render() == result.render()


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    return []


@FUZZ
@given(st.data())
def test_random_edits_of_the_example(data: st.DataObject) -> None:
    text = EXAMPLE.read_text()
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(text)))
        cut = data.draw(st.integers(0, 20))
        insert = data.draw(st.one_of(st.text(max_size=20), st.sampled_from(list("[]{}\"'#=\n"))))
        text = text[:at] + insert + text[at + cut :]
    load(text.encode())


# --- the scanner that guards tomllib agrees with tomllib -----------------------------------


def depth_of(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max((depth_of(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((depth_of(v) for v in value.values()), default=0)
    return 0


tricky = st.text(alphabet=st.sampled_from(list("[]{}#='\"\\\nab")), max_size=12)
documents = st.recursive(
    st.one_of(tricky, st.integers(), st.booleans()),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.sampled_from("abc"), inner, max_size=3)
    ),
    max_leaves=30,
)


def render_tricky(value: Any, style: int) -> str:
    if isinstance(value, str):
        if style == 1 and "\n" not in value and "'" not in value:
            return f"'{value}'"
        if style == 2 and "'''" not in value:
            return f"'''{value}'''"
        if style == 3:
            escaped = value.replace("\\", "\\\\").replace('"""', '""\\"')
            return f'"""{escaped}"""'  # up to two quotes may end the content
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(render_tricky(v, style) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {render_tricky(v, style)}" for k, v in value.items()) + "}"
    return toml_value(value)


@settings(max_examples=300, deadline=None)
@given(st.lists(documents, min_size=1, max_size=4), st.integers(0, 3), st.booleans())
def test_nesting_scan_agrees_with_tomllib(values_: list[Any], style: int, comments: bool) -> None:
    comment = "  # [[[ {{ \"'" if comments else ""
    text = "".join(f"k{i} = {render_tricky(v, style)}{comment}\n" for i, v in enumerate(values_))
    try:
        parsed = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        assume(False)
    assert nesting_depth(text, 10**6)[0] == max(depth_of(v) for v in parsed.values())


# --- through the command -------------------------------------------------------------------

bad_inputs = st.one_of(
    st.binary(max_size=4096).map(lambda b: b"\xff" + b),
    st.integers(MAX_NESTING + 1, 4000).map(lambda n: b"a = " + b"[" * n + b"]" * n),
    st.integers(MAX_NESTING + 1, 4000).map(lambda n: b"a = " + b"{b=" * n + b"1" + b"}" * n),
    st.integers(1025, 200_000).map(
        lambda n: b"[ingress]\nlisten = [" + b",".join([b'"::"'] * n) + b"]\n"
    ),
    st.binary(min_size=1, max_size=8).map(
        lambda junk: EXAMPLE_BYTES.replace(b'"rw"', b'"r\xc0' + junk + b'w"')
    ),
)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bad_inputs, st.sampled_from(["check", "up"]))
def test_cli_exits_1_without_a_traceback(data: bytes, command: str) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "bad.toml"
        path.write_bytes(data)
        state = Path(directory) / "state"
        argv = ["config", "check", str(path)] if command == "check" else ["up", "-c", str(path)]
        result = subprocess.run(
            [str(IKEFARM), *argv],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "IKEFARM_STATE_DIR": str(state)},
        )
        assert result.returncode == 1, result.stderr[-2000:]
        assert "Traceback" not in result.stderr and result.stdout == ""
        lines = result.stderr.splitlines()
        assert lines[0].endswith("configuration error(s)") and len(lines) >= 2
        assert all(len(line) < MAX_LINE for line in lines)
        assert not state.exists()
