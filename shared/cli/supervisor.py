"""`ikefarm up`: the embedded broker and one OS process per service instance, supervised.

A service that exits on its own is restarted with backoff (a gateway keeps
serving). SIGTERM or SIGINT stops every child (SIGTERM, then SIGKILL after a
grace period), then the broker, and exits 0. Children carry PR_SET_PDEATHSIG so
even a killed supervisor leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ikefarm.shared.bus.auth import CREDENTIALS_DIR, ensure_credentials, write_server_config
from ikefarm.shared.bus.embedded import EmbeddedNats, default_state_dir, die_with_parent
from ikefarm.shared.config.loader import Config
from ikefarm.shared.observability.logging import get_logger

log = get_logger("daemon")
GRACE_SECONDS = 3.0
UP_STATE_FILE = "up.json"


@dataclass
class Child:
    service: str
    instance: str
    argv: list[str]
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    next_start: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def start(self) -> None:
        self.process = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            preexec_fn=die_with_parent,  # noqa: PLW1509
        )

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


def state_dir_of(config: Config) -> Path:
    configured = config.farm.state_dir
    return Path(configured) if configured else default_state_dir()


def service_argv(
    service: str,
    config_path: str,
    nats_url: str,
    instance: str,
    shard: int | None,
    credentials_dir: Path | None = None,
) -> list[str]:
    argv = [
        sys.executable, "-m", "ikefarm.shared.cli.main", "service", service,
        "-c", config_path, "--nats", nats_url, "--instance", instance,
    ]  # fmt: skip
    if shard is not None:
        argv += ["--shard", str(shard)]
    if credentials_dir is not None:
        # the path, never the password, goes on the command line
        argv += ["--nats-credentials", str(credentials_dir / f"{service}.json")]
    return argv


def plan_children(
    config: Config, config_path: str, nats_url: str, credentials_dir: Path | None = None
) -> list[Child]:
    children: list[Child] = []
    for index in range(config.farm.ingress_instances):
        name = f"ingress-{index}"
        children.append(
            Child(
                "ingress",
                name,
                service_argv("ingress", config_path, nats_url, name, None, credentials_dir),
            )
        )
    for shard in range(config.farm.ike_workers):
        name = f"ike-{shard}"
        argv = service_argv("ike", config_path, nats_url, name, shard, credentials_dir)
        children.append(Child("ike", name, argv))
    for service in ("keystore", "kernel", "flow"):
        name = f"{service}-0"
        children.append(
            Child(
                service,
                name,
                service_argv(service, config_path, nats_url, name, None, credentials_dir),
            )
        )
    return children


class Supervisor:
    def __init__(self, config: Config, config_path: str) -> None:
        self.config = config
        self.config_path = config_path
        self.state_dir = state_dir_of(config)
        self.broker: EmbeddedNats | None = None
        self.children: list[Child] = []
        self.stopping = False
        self.credentials_dir: Path | None = None

    def _on_signal(self, signum: int, _frame: object) -> None:
        log.control("supervisor_signal", signal=signal.Signals(signum).name)
        self.stopping = True

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        nats_url = self.config.nats.url
        if not nats_url:
            # one NATS user per service, allowed only its own subjects (proto/subjects.py)
            self.credentials_dir = self.state_dir / CREDENTIALS_DIR
            users = ensure_credentials(self.credentials_dir)
            server_config = write_server_config(self.credentials_dir, users)
            store = Path(self.config.nats.store_dir or self.state_dir / "nats")
            self.broker = EmbeddedNats(store, config_file=server_config)
            self.broker.start()
            nats_url = self.broker.url
            log.audit(
                "embedded_nats_started", url=nats_url, pid=self.broker.pid, users=sorted(users)
            )
        elif self.config.nats.credentials and Path(self.config.nats.credentials).is_dir():
            # an external NATS set up with `ikefarm config nats-auth DIR`
            self.credentials_dir = Path(self.config.nats.credentials)
        self.children = plan_children(self.config, self.config_path, nats_url, self.credentials_dir)
        for child in self.children:
            child.start()
        self._write_state(nats_url)
        print(f"ikefarm up: nats {nats_url}, {len(self.children)} service processes", flush=True)
        try:
            while not self.stopping:
                self._supervise()
                time.sleep(0.1)
        finally:
            self._shutdown()
        return 0

    def _supervise(self) -> None:
        now = time.monotonic()
        broker = self.broker
        if broker is not None and broker.process is not None and broker.process.poll() is not None:
            # the services keep reconnecting; bring their broker back on the same port and store
            log.audit("embedded_nats_exited", code=broker.process.returncode)
            broker.process = None
            try:
                broker.start()
                log.audit("embedded_nats_restarted", url=broker.url, pid=broker.pid)
            except Exception as exc:
                log.control("embedded_nats_restart_failed", error=str(exc))
        for child in self.children:
            if child.running or self.stopping:
                continue
            if child.next_start == 0.0:
                code = child.process.returncode if child.process else None
                child.restarts += 1
                child.next_start = now + min(0.5 * 2 ** min(child.restarts, 6), 30.0)
                log.control(
                    "service_exited", child=child.instance, code=code, restarts=child.restarts
                )
            elif now >= child.next_start:
                child.next_start = 0.0
                child.start()

    def _shutdown(self) -> None:
        for child in self.children:
            if child.running and child.process is not None:
                child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + GRACE_SECONDS
        for child in self.children:
            if child.process is None:
                continue
            try:
                child.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.control("service_killed", child=child.instance)
                child.process.kill()
                child.process.wait()
        if self.broker is not None:
            self.broker.stop()
        (self.state_dir / UP_STATE_FILE).unlink(missing_ok=True)
        log.audit("supervisor_stopped")

    def _write_state(self, nats_url: str) -> None:
        state = {
            "nats_url": nats_url,
            "pid": os.getpid(),
            "config": self.config_path,
            "broker_pid": self.broker.pid if self.broker else None,
            "children": {c.instance: c.process.pid for c in self.children if c.process},
            "credentials_dir": str(self.credentials_dir) if self.credentials_dir else None,
        }
        path = self.state_dir / UP_STATE_FILE
        path.write_text(json.dumps(state, indent=2))


def read_up_state(state_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((state_dir / UP_STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
