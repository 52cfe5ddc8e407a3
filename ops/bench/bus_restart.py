"""kill -9 of the embedded nats-server, then of the keystore, three times each, under
`ikefarm up` (two workers, loopback, memory kernel backend): how long until `up` restarted it
and until every service answers `ikefarm status` again (after the broker: each with one more
reconnect counted). docs/failover.md has the numbers.

    .venv/bin/python ops/bench/bus_restart.py /tmp/bus-restart
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.conftest import EXAMPLE_CONFIG, TEST_MASTER_KEY
from tests.harness.ports import udp_ports

CLI = [sys.executable, "-m", "ikefarm.shared.cli.main"]
TRIALS = 3


def write_config(work: Path) -> Path:
    text = (
        EXAMPLE_CONFIG.read_text()
        .replace("192.0.2.1", "127.0.0.1")
        .replace('backend = "auto"', 'backend = "memory"')
    )
    ike_port, natt_port = udp_ports(2)
    farm = f'[farm]\nstate-dir = "{work / "state"}"\nike-workers = 2\n\n'
    ingress = f"[ingress]\nike-port = {ike_port}\nnatt-port = {natt_port}\n\n"
    path = work / "ikefarm.toml"
    path.write_text(text.replace("[kernel]", farm + ingress + "[kernel]"))
    return path


def main() -> int:
    work = Path(sys.argv[1])
    work.mkdir(parents=True, exist_ok=True)
    config = write_config(work)
    env = dict(os.environ, IKEFARM_MASTER_KEY=TEST_MASTER_KEY)

    def status() -> list[dict[str, Any]]:
        result = subprocess.run(
            [*CLI, "status", "-c", str(config), "--json"], capture_output=True, text=True, env=env
        )
        return list(json.loads(result.stdout)) if result.returncode == 0 else []

    def pid_of(what: str) -> int | None:
        state = json.loads((work / "state" / "up.json").read_text())
        return state["broker_pid"] if what == "broker" else state["children"]["keystore-0"]

    with (work / "up.log").open("w") as log:
        up = subprocess.Popen([*CLI, "up", "-c", str(config)], stdout=log, stderr=log, env=env)
        try:
            while len(status()) < 6:
                time.sleep(0.2)
            for what in ("broker", "keystore"):
                for trial in range(TRIALS):
                    pid = pid_of(what)
                    assert pid is not None
                    before = {
                        r["instance"]: r["counters"].get("nats_reconnects", 0) for r in status()
                    }
                    started = time.monotonic()
                    os.kill(pid, signal.SIGKILL)
                    while pid_of(what) in (None, pid):
                        time.sleep(0.02)
                    restarted = time.monotonic() - started
                    while True:
                        rows = status()
                        if what == "broker":
                            back = len(rows) == 6 and all(
                                r["counters"].get("nats_reconnects", 0)
                                > before.get(r["instance"], 0)
                                for r in rows
                            )
                        else:
                            back = any(r["name"] == "keystore" and r["uptime"] < 30 for r in rows)
                        if back:
                            break
                        time.sleep(0.05)
                    answering = time.monotonic() - started
                    print(
                        f"{what} kill {trial + 1}: restarted after {restarted:.2f} s, "
                        f"every service answering after {answering:.2f} s",
                        flush=True,
                    )
                    time.sleep(2)
        finally:
            up.send_signal(signal.SIGTERM)
            up.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
