"""`ikefarm up` as an operator runs it: discovery, clean SIGTERM, broker loss and return."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from ikefarm.shared.config.loader import load_config

SERVICES = {"ingress", "ike", "keystore", "kernel", "flow"}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purposes
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def wait_for(predicate, timeout: float, step: float = 0.1):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    return predicate()


def status(argv: list[str], config: Path) -> dict[str, dict]:
    result = subprocess.run(
        [*argv, "status", "-c", str(config), "--json"], capture_output=True, text=True, timeout=30
    )
    if result.returncode != 0:
        return {}
    return {row["name"]: row for row in json.loads(result.stdout)}


@pytest.fixture
def farm(ikefarm_argv: list[str], loopback_config: Path, tmp_path: Path):  # type: ignore[no-untyped-def]
    log = (tmp_path / "up.log").open("w+")
    process = subprocess.Popen(
        [*ikefarm_argv, "up", "-c", str(loopback_config)], stdout=log, stderr=log
    )
    state_file = Path(load_config(loopback_config).farm.state_dir) / "up.json"
    try:
        yield process, state_file, log
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()


def test_up_status_and_clean_sigterm(farm, ikefarm_argv: list[str], loopback_config: Path) -> None:  # type: ignore[no-untyped-def]
    process, state_file, _log = farm
    rows = wait_for(
        lambda: (r := status(ikefarm_argv, loopback_config)) and set(r) == SERVICES and r, 20
    )
    assert set(rows) == SERVICES
    for row in rows.values():
        assert row["version"] == "0.1.0" and row["uptime"] >= 0
    # the DoS gate's mode and the farm's half-open count, in JSON and in the table
    dos = rows["ingress"]["gauges"]["dos"]
    assert dos["cookie_mode"] == "threshold 10" and dos["cookies_active"] is False
    assert dos["half_open"] == 0 and dos["cookie_secret_version"] == 1
    table = subprocess.run(
        [*ikefarm_argv, "status", "-c", str(loopback_config)],
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    assert "DoS protection:" in table
    assert "ingress-0: cookies off (threshold 10), half-open 0 (pending 0" in table
    assert "ike-0: half-open 0 (peak 0), established 0" in table

    state = json.loads(state_file.read_text())
    pids = [state["broker_pid"], *state["children"].values()]
    assert len(pids) == 6 and all(alive(pid) for pid in pids)

    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=5) == 0
    assert time.monotonic() - started < 5
    assert wait_for(lambda: not any(alive(pid) for pid in pids), 1)
    assert not state_file.exists()


def test_services_reconnect_when_the_broker_comes_back(
    farm, ikefarm_argv: list[str], loopback_config: Path
) -> None:  # type: ignore[no-untyped-def]
    process, state_file, log = farm
    assert wait_for(lambda: set(status(ikefarm_argv, loopback_config)) == SERVICES, 20)
    broker_pid = json.loads(state_file.read_text())["broker_pid"]
    os.kill(broker_pid, signal.SIGKILL)

    def log_text() -> str:
        log.flush()
        return Path(log.name).read_text()

    assert wait_for(lambda: log_text().count('"nats_disconnected"') >= 5, 10)
    assert '"embedded_nats_restarted"' in wait_for(
        lambda: "embedded_nats_restarted" in log_text() and log_text(), 15
    )
    assert wait_for(lambda: log_text().count('"nats_reconnected"') >= 5, 15)
    rows = wait_for(
        lambda: (r := status(ikefarm_argv, loopback_config)) and set(r) == SERVICES and r, 20
    )
    assert set(rows) == SERVICES
    assert all(row["counters"].get("nats_reconnects", 0) >= 1 for row in rows.values())
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=5) == 0


def test_service_alone_against_external_nats(
    nats_server, ikefarm_argv: list[str], loopback_config: Path
) -> None:  # type: ignore[no-untyped-def]
    service = subprocess.Popen(
        [
            *ikefarm_argv,
            "service",
            "keystore",
            "-c",
            str(loopback_config),
            "--nats",
            nats_server.url,
            "--instance",
            "ks-alone",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:

        def found() -> bool:
            result = subprocess.run(
                [*ikefarm_argv, "status", "--nats", nats_server.url, "--json"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            return result.returncode == 0 and any(
                r["instance"] == "ks-alone" for r in json.loads(result.stdout)
            )

        assert wait_for(found, 15)
        service.send_signal(signal.SIGTERM)
        assert service.wait(timeout=5) == 0
    finally:
        if service.poll() is None:
            service.kill()
            service.wait()
