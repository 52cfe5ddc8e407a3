"""A docker engine and the compose CLI for the compose test (tests/interop/test_compose_stack.py).

No image registry is reachable on the test machine, but Debian's `docker.io` runs.
When no engine answers (`$DOCKER_HOST`, else /var/run/docker.sock), `Dockerd`
starts one for the test on its own socket, stopped again afterwards, with its
images kept in `DATA_ROOT` between runs (the base image and the build cache make a
second run quick). It is started so that it changes nothing else on the host:
no iptables rules or FORWARD policy (`--iptables=false`), no ip_forward sysctl,
no default bridge. Published ports then go through docker's userland proxy in the
host's network namespace; the stack's own network is a bridge compose creates.
An engine started here begins without the network store of an earlier one
(`DATA_ROOT/network`): a test's networks live no longer than the test, and an
engine killed mid-run leaves address pools there that the next run's fixed
subnet collides with ("Pool overlaps with other one on this address space").
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

DATA_ROOT = Path(os.environ.get("IKEFARM_TEST_DOCKER_ROOT", "/var/lib/ikefarm-test/docker"))
SOCKET = Path("/run/ikefarm-test-docker.sock")
EXEC_ROOT = Path("/run/ikefarm-test-docker")
SYSTEM_SOCKET = Path("/var/run/docker.sock")


def missing() -> str | None:
    """What this machine lacks to run the compose test, or None."""
    if os.geteuid() != 0:
        return "root (dockerd and network namespaces)"
    for tool, package in (
        ("dockerd", "docker.io"),
        ("docker", "docker.io"),
        ("debootstrap", "debootstrap"),
    ):
        if shutil.which(tool) is None:
            return f"{tool} (apt-get install {package}, or ops/install-test-peers)"
    if compose_cli() is None:
        return "docker compose or docker-compose (apt-get install docker-compose)"
    return None


def compose_cli() -> list[str] | None:
    """`docker compose` (v2 plugin) when present, else Debian's `docker-compose` 1.29."""
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run(
            [docker, "compose", "version"], capture_output=True, check=False, timeout=30
        )
        if probe.returncode == 0:
            return [docker, "compose"]
    found = shutil.which("docker-compose")
    return [found] if found else None


def answers(host: str) -> bool:
    try:
        result = subprocess.run(
            ["docker", "version", "--format", "{{.Server.Version}}"],
            env={**os.environ, "DOCKER_HOST": host},
            capture_output=True,
            check=False,
            timeout=20,
        )
    except subprocess.TimeoutExpired:
        return False
    return result.returncode == 0


class Dockerd:
    """A docker engine for the test: a running one, else one started here (and stopped)."""

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.host = ""

    def start(self, timeout: float = 60.0) -> str:
        for host in (
            os.environ.get("DOCKER_HOST", ""),
            f"unix://{SYSTEM_SOCKET}",
            f"unix://{SOCKET}",
        ):
            if host and answers(host):
                self.host = host
                return host
        DATA_ROOT.mkdir(parents=True, exist_ok=True)
        EXEC_ROOT.mkdir(parents=True, exist_ok=True)
        # no engine runs on DATA_ROOT (none answered): its network store is stale
        shutil.rmtree(DATA_ROOT / "network", ignore_errors=True)
        argv = [
            "dockerd",
            "--host", f"unix://{SOCKET}",
            "--data-root", str(DATA_ROOT),
            "--exec-root", str(EXEC_ROOT / "exec"),
            "--pidfile", str(EXEC_ROOT / "dockerd.pid"),
            "--iptables=false",
            "--ip6tables=false",
            "--ip-forward=false",
            "--bridge=none",
        ]  # fmt: skip
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.host = f"unix://{SOCKET}"
        deadline = time.monotonic() + timeout
        while not answers(self.host):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"dockerd did not start: {self.log_tail()}")
            time.sleep(0.5)
        return self.host

    def log_tail(self, size: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-size:]
        except OSError:
            return ""

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the engine this test started (its own pid only); a running one is left be."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
