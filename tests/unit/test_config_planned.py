"""Seed options nothing implements yet: refused when set away from their default, never ignored."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from ikefarm.shared.config.loader import LEAF_DEFAULTS, ConfigError, parse_config
from ikefarm.shared.config.planned import PLANNED, planned_for
from ikefarm.shared.config.reference import reference_markdown
from ikefarm.shared.config.schema import SCHEMA
from ikefarm.shared.config.tree import iter_reference

EXAMPLE = Path(__file__).resolve().parents[2] / "ops" / "examples" / "psk-responder.toml"
SCHEMA_PATHS = {path for path, _spec in iter_reference(SCHEMA)}


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as refused:
        parse_config(text)
    return [str(p) for p in refused.value.problems]


@pytest.mark.parametrize("planned", PLANNED, ids=lambda p: p.path)
def test_every_planned_path_names_a_schema_key(planned) -> None:  # type: ignore[no-untyped-def]
    assert planned.path in SCHEMA_PATHS


# a non-default value per kind of planned key, set inside the example so everything else is valid
SETTINGS = [
    ("[ike.global-options]\nthreads = 4\n", "ike.global-options.threads", None),
    ("[ike.global-options]\nsa-table-size = 1024\n", "ike.global-options.sa-table-size", None),
]


@pytest.mark.parametrize(("snippet", "path", "issue"), SETTINGS)
def test_a_planned_key_set_away_from_its_default_is_refused(
    snippet: str, path: str, issue: int | None
) -> None:
    found = problems(EXAMPLE.read_text() + "\n" + snippet)
    ours = [p for p in found if p.startswith(path + ":")]
    assert ours, found
    assert "not implemented yet" in ours[0]
    if issue is not None:
        assert f"(issue {issue}:" in ours[0]
    assert all("not implemented yet" in p for p in found), found


def test_planned_keys_inside_vpn_items_are_refused_with_their_index() -> None:
    text = EXAMPLE.read_text().replace(
        'local-auth-method = "pre-shared-key"',
        'local-auth-method = "eap-radius"',
    )
    [refusal] = problems(text)
    assert refusal.startswith(
        'ike.vpn[0].ike-policy.local-auth-method: "eap-radius": not implemented yet (issue 15:'
    ), refusal


def test_mobike_loads() -> None:
    text = EXAMPLE.read_text().replace(
        'remote-auth-method = "pre-shared-key" }',
        'remote-auth-method = "pre-shared-key", mobike = true }',
    )
    assert parse_config(text).ike.vpn[0].ike_policy.mobike is True


def test_a_planned_key_at_its_default_loads() -> None:
    config = parse_config(
        EXAMPLE.read_text() + "\n[ike.global-options]\nsa-table-size = 1\nthreads = 16\n"
    )
    assert config.is_explicit("ike.global-options.threads")


def test_only_the_planned_value_of_a_choice_is_refused() -> None:
    eap = EXAMPLE.read_text().replace(
        'local-auth-method = "pre-shared-key"', 'local-auth-method = "eap-radius"'
    )
    [refusal] = problems(eap)
    assert refusal.startswith('ike.vpn[0].ike-policy.local-auth-method: "eap-radius": ')
    assert "(issue 15: EAP as initiator" in refusal
    start = EXAMPLE.read_text().replace(
        'ipsec-policy = { template = "ipsecpol0" }',
        'ipsec-policy = { template = "ipsecpol0", start-action = "none" }',
    )
    assert parse_config(start).ike.vpn[0].ipsec_policy.start_action == "none"


def test_the_reference_marks_every_planned_key() -> None:
    reference = reference_markdown()
    for path in LEAF_DEFAULTS:
        if planned_for(path) is None:
            continue
        [row] = [line for line in reference.splitlines() if line.startswith(f"| `{path}` |")]
        assert "not implemented yet" in row, row


def test_config_check_names_the_key_in_one_line(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(EXAMPLE.read_text() + "\n[ike.global-options]\nthreads = 4\n")
    result = subprocess.run(
        [sys.executable, "-m", "ikefarm.shared.cli.main", "config", "check", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if "threads" in line]
    assert len(lines) == 1, result.stderr
    assert re.search(r"threads: 4: not implemented yet", lines[0])
    assert "Traceback" not in result.stderr


def test_snmp_is_implemented_and_loads() -> None:
    config = parse_config(EXAMPLE.read_text() + "\n[ike.global-options]\nsnmp = true\n")
    assert config.ike.global_options.snmp is True
