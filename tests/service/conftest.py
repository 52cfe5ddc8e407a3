"""Fixtures of the service tier."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from ikefarm.shared.config.loader import load_config
from tests.service.test_up import SERVICES, status, wait_for


@pytest.fixture
def authorized_farm(ikefarm_argv: list[str], loopback_config: Path, tmp_path: Path):  # type: ignore[no-untyped-def]
    """`ikefarm up` on loopback with its embedded broker and per-user credentials: yields its
    state dir and log path."""
    log_path = tmp_path / "up.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [*ikefarm_argv, "up", "-c", str(loopback_config)], stdout=log, stderr=log
        )
    state_dir = Path(load_config(loopback_config).farm.state_dir)
    try:
        rows = wait_for(
            lambda: (r := status(ikefarm_argv, loopback_config)) and set(r) == SERVICES and r, 30
        )
        assert rows and set(rows) == SERVICES, log_path.read_text()[-3000:]
        yield state_dir, log_path
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
