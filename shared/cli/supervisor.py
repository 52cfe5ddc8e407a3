"""`ikefarm up`: the embedded broker and one OS process per service instance, supervised.

A service that exits on its own is restarted with backoff (a gateway keeps
serving); so is the embedded broker, on the same port and store, retried with
backoff until it starts, each failure logged at level 0. `up.json` in the state
directory always names the broker and children running now (null while one is
down). SIGTERM or SIGINT stops every child (SIGTERM, then SIGKILL after a grace
period), then the broker, and exits 0. Children carry PR_SET_PDEATHSIG so even a
killed supervisor leaves nothing behind. With an external NATS (`[nats] url`, or
`servers`: one cluster's nodes) no broker is started; every service gets the
servers as one comma-separated `--nats` and nats-py moves between them.

The master key: `up` takes the variable named by `[keystore] master-key-env`
(and `IKEFARM_MASTER_KEY`) out of its own environment before it starts anything,
so neither the broker nor any service inherits it, and hands the key to each
keystore process it starts through a pipe (`--master-key-fd`), never on a command
line. With `[keystore] master-key-file` the keystore reads the file itself.

The UDP endpoints: before it starts anything, `up` claims the ingress endpoints for
this run of the farm (`shared/udp_endpoints.py`) and refuses to start, naming the
holder, when another farm (or a forgotten `up`) serves an overlapping address and
port; its ingress instances learn the run's farm id from the environment and share
the endpoints with each other (SO_REUSEPORT), never with another farm.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ikefarm.shared.bus.auth import CREDENTIALS_DIR, ensure_credentials, write_server_config
from ikefarm.shared.bus.embedded import (
    BrokerError,
    EmbeddedNats,
    default_state_dir,
    die_with_parent,
)
from ikefarm.shared.bus.servers import configured_nats_url
from ikefarm.shared.config.kinds import format_listen, parse_listen
from ikefarm.shared.config.loader import Config
from ikefarm.shared.observability.logging import get_logger
from ikefarm.shared.udp_endpoints import (
    FARM_ID_ENV,
    EndpointClaim,
    EndpointTaken,
    claim,
    local_endpoints,
)

log = get_logger("daemon")
GRACE_SECONDS = 3.0
UP_STATE_FILE = "up.json"
DEFAULT_MASTER_KEY_ENV = "IKEFARM_MASTER_KEY"
MASTER_KEY_FD_OPTION = "--master-key-fd"
# the broker's restart backoff: 0.5 s doubling to 30 s; back to 0.5 s after a stable run
BROKER_BACKOFF_FIRST = 0.5
BROKER_BACKOFF_MAX = 30.0
BROKER_STABLE_SECONDS = 60.0


def take_master_key(config: Config) -> bytearray | None:
    """Remove the master key variables from this process's environment; return the key text
    when the keystore is to get it from `up` (no `master-key-file`), else None."""
    variable = config.keystore.master_key_env
    key: bytearray | None = None
    if not config.keystore.master_key_file and variable and os.environ.get(variable):
        key = bytearray(os.environ[variable].encode())
    for name in {variable, DEFAULT_MASTER_KEY_ENV}:
        if name:
            os.environ.pop(name, None)
    return key


@dataclass
class Child:
    service: str
    instance: str
    argv: list[str]
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    next_start: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def start(self, environ: Mapping[str, str], master_key: bytearray | None = None) -> None:
        """Start the process; `master_key` goes down a pipe whose read end only it inherits."""
        if master_key is None:
            self.process = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                env=environ,
                preexec_fn=die_with_parent,  # noqa: PLW1509
            )
            return
        read_end, write_end = os.pipe()
        try:
            try:
                self.process = subprocess.Popen(
                    [*self.argv, MASTER_KEY_FD_OPTION, str(read_end)],
                    stdin=subprocess.DEVNULL,
                    env=environ,
                    pass_fds=(read_end,),
                    preexec_fn=die_with_parent,  # noqa: PLW1509
                )
            finally:
                os.close(read_end)
            # at most 4096 characters (the preflight refused more): the pipe buffer (64 KiB)
            # takes them whole, so this never waits for the child
            view = memoryview(master_key)
            with contextlib.suppress(BrokenPipeError):  # it died already: restarted as usual
                while view:
                    view = view[os.write(write_end, view) :]
        finally:
            os.close(write_end)

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
    if config.telemetry.metrics_listen:
        # one host, one port each: the configured one, then the next ones in this order
        address, port = parse_listen(config.telemetry.metrics_listen)
        for offset, child in enumerate(children):
            if port + offset > 65535:
                log.audit("metrics_port_exhausted", instance=child.instance, base=port)
                continue
            child.argv += ["--metrics-listen", format_listen(address, port + offset)]
    return children


class Supervisor:
    def __init__(
        self, config: Config, config_path: str, master_key: bytearray | None = None
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.state_dir = state_dir_of(config)
        self.broker: EmbeddedNats | None = None
        self.children: list[Child] = []
        self.stopping = False
        self.credentials_dir: Path | None = None
        self.nats_url = ""
        self.environ: dict[str, str] = {}
        self._master_key: bytearray | None = None
        self._given_master_key = master_key  # read from `up --master-key-fd`
        self.broker_failures = 0  # exits and failed starts since it last ran stably
        self.broker_next_start = 0.0  # monotonic time of the next attempt; 0: none planned
        self.broker_started_at = 0.0
        self.endpoints = EndpointClaim()  # this run's hold on the ingress UDP endpoints

    def _on_signal(self, signum: int, _frame: object) -> None:
        log.control("supervisor_signal", signal=signal.Signals(signum).name)
        self.stopping = True

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        # before anything is started: no child may inherit the master key
        self._master_key = take_master_key(self.config)
        if self._given_master_key is not None:
            self._master_key = self._given_master_key
        self.environ = dict(os.environ)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        farm = f"up {uuid.uuid4().hex}"
        try:
            self.endpoints = claim(
                [(e.address, e.port) for e in local_endpoints(self.config)],
                farm,
                f"ikefarm up pid {os.getpid()}, state dir {self.state_dir.resolve()}",
            )
        except EndpointTaken as exc:
            print(f"ikefarm up: {exc.strerror}", file=sys.stderr)
            return 1
        except OSError as exc:
            print(f"ikefarm up: cannot lock the ingress endpoints: {exc}", file=sys.stderr)
            return 1
        self.environ[FARM_ID_ENV] = farm
        nats_url = configured_nats_url(self.config)
        if not nats_url:
            # one NATS user per service, allowed only its own subjects (proto/subjects.py)
            self.credentials_dir = self.state_dir / CREDENTIALS_DIR
            users = ensure_credentials(self.credentials_dir)
            server_config = write_server_config(self.credentials_dir, users)
            store = Path(self.config.nats.store_dir or self.state_dir / "nats")
            self.broker = EmbeddedNats(store, config_file=server_config, environ=self.environ)
            try:
                self.broker.start()
            except (BrokerError, OSError) as exc:
                print(f"ikefarm up: the embedded nats-server did not start: {exc}", file=sys.stderr)
                return 1
            self.broker_started_at = time.monotonic()
            nats_url = self.broker.url
            log.audit(
                "embedded_nats_started", url=nats_url, pid=self.broker.pid, users=sorted(users)
            )
        elif self.config.nats.credentials and Path(self.config.nats.credentials).is_dir():
            # an external NATS set up with `ikefarm config nats-auth DIR`
            self.credentials_dir = Path(self.config.nats.credentials)
        self.nats_url = nats_url
        self.children = plan_children(self.config, self.config_path, nats_url, self.credentials_dir)
        try:
            for child in self.children:
                self._start(child)
            self._write_state()
            count = len(self.children)
            print(f"ikefarm up: nats {nats_url}, {count} service processes", flush=True)
            while not self.stopping:
                self._supervise()
                time.sleep(0.1)
        finally:
            self._shutdown()
        return 0

    def _start(self, child: Child) -> None:
        """Start one child; only the keystore gets the master key (a fresh pipe each time)."""
        key = self._master_key if child.service == "keystore" else None
        try:
            child.start(self.environ, key)
        except OSError as exc:
            child.process = None
            log.audit("service_start_failed", child=child.instance, error=str(exc))

    def _supervise(self) -> None:
        now = time.monotonic()
        changed = self._supervise_broker(now)
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
                changed = True
            elif now >= child.next_start:
                child.next_start = 0.0
                self._start(child)
                changed = True
        if changed:
            self._write_state()

    def _supervise_broker(self, now: float) -> bool:
        """Bring the embedded broker back on the same port and store (the services keep
        reconnecting to that URL): after an exit or a failed start, retry with backoff until
        it runs. True when what runs changed (up.json is then rewritten)."""
        broker = self.broker
        if broker is None or self.stopping:
            return False
        if broker.process is not None and broker.process.poll() is None:
            return False
        if self.broker_next_start == 0.0:
            code = None
            if broker.process is not None:
                code = broker.process.returncode
                broker.process = None
                if now - self.broker_started_at >= BROKER_STABLE_SECONDS:
                    self.broker_failures = 0
            self.broker_failures += 1
            delay = min(BROKER_BACKOFF_FIRST * 2 ** (self.broker_failures - 1), BROKER_BACKOFF_MAX)
            self.broker_next_start = now + delay
            if code is not None:
                log.audit("embedded_nats_exited", code=code, restart_in=delay)
            return True
        if now < self.broker_next_start:
            return False
        self.broker_next_start = 0.0
        try:
            broker.start()
        except (BrokerError, OSError) as exc:
            broker.process = None
            log.audit(
                "embedded_nats_restart_failed",
                error=str(exc),
                failures=self.broker_failures,
                retry_in=min(BROKER_BACKOFF_FIRST * 2**self.broker_failures, BROKER_BACKOFF_MAX),
            )
            return False
        self.broker_started_at = time.monotonic()
        log.audit("embedded_nats_restarted", url=broker.url, pid=broker.pid)
        return True

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
        self.endpoints.release()  # its ingress instances are gone: another farm may come
        if self.broker is not None:
            self.broker.stop()
        if self._master_key is not None:
            self._master_key[:] = bytes(len(self._master_key))
        (self.state_dir / UP_STATE_FILE).unlink(missing_ok=True)
        log.audit("supervisor_stopped")

    def _write_state(self) -> None:
        """up.json: the processes running now (null for one that is down), written whole
        (a temporary file renamed over the old one) so a reader never sees half of it."""
        broker = self.broker
        state = {
            "nats_url": self.nats_url,
            "pid": os.getpid(),
            "config": self.config_path,
            "broker_pid": broker.pid if broker and broker.process else None,
            "children": {
                c.instance: c.process.pid if c.running and c.process else None
                for c in self.children
            },
            "credentials_dir": str(self.credentials_dir) if self.credentials_dir else None,
        }
        path = self.state_dir / UP_STATE_FILE
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text(json.dumps(state, indent=2))
        os.replace(temporary, path)


def read_up_state(state_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((state_dir / UP_STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
