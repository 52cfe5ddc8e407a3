"""A missing interop prerequisite skips the test, naming it; under CI=true it fails the run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import prerequisites

REPO = Path(__file__).resolve().parents[2]
# an interop test whose fixtures check root and the namespace tools first
INTEROP_TEST = "tests/interop/test_harness_selftest.py::test_strongswan_pair_psk_tunnel"


def test_outside_ci_a_missing_prerequisite_skips_with_its_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="needs charon"):
        prerequisites.missing("needs charon")
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception):
        prerequisites.missing("needs charon")


@pytest.mark.parametrize("value", ["true", "TRUE", "True"])
def test_under_ci_a_missing_prerequisite_fails(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("CI", value)
    with pytest.raises(pytest.fail.Exception, match=r"CI=true.*needs charon"):
        prerequisites.missing("needs charon")


def _run_interop_without_tools(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess[str]:
    """The interop test in a pytest of its own whose PATH has no `ip`, `unshare`, `mount`."""
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PATH"] = str(tmp_path)  # an empty directory: no tool is found
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:xdist", "-rsE",
         "-q", INTEROP_TEST],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_an_interop_run_without_its_tools_fails_under_ci_and_skips_otherwise(
    tmp_path: Path,
) -> None:
    skipped = _run_interop_without_tools(tmp_path, None)
    missing_thing = "needs root" if os.geteuid() != 0 else "needs ip"
    assert skipped.returncode == 0, skipped.stdout[-2000:]
    assert " skipped in " in skipped.stdout and missing_thing in skipped.stdout
    assert "passed" not in skipped.stdout and "error" not in skipped.stdout
    failed = _run_interop_without_tools(tmp_path, "true")
    assert failed.returncode == 1, failed.stdout[-2000:]
    assert "CI=true and a test prerequisite is missing" in failed.stdout
    assert missing_thing in failed.stdout and "skipped" not in failed.stdout
    assert " error" in failed.stdout  # each parametrization errors at setup
