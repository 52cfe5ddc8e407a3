"""ikefarm itself as a test peer: `ikefarm up` inside a namespace, and the CLI to look at it.

The gateway runs exactly as an operator starts it (embedded nats-server, one
process per service) inside the namespace the test made, so everything it binds
is on that namespace's addresses.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.harness.netns import Namespace, wait_for

SERVICES = {"ingress", "ike", "keystore", "kernel", "flow"}

GATEWAY_TOML = """
[farm]
state-dir = "{state_dir}"
ike-workers = {workers}

[ike.logging.daemon]
default = {log_level}

[[ike.ike-policy-template]]
name = "ikepol"
{ike_template_extra}
[[ike.ike-policy-template.ike-proposal]]
aead-alg = ["aes256-gcm-128", "aes128-gcm-128"]
prf-alg = ["hmac-sha384", "hmac-sha256"]
dh-group = ["x25519", "ecp256", "modp2048"]
[[ike.ike-policy-template.ike-proposal]]
enc-alg = ["aes128-cbc", "aes256-cbc"]
auth-alg = ["hmac-sha256", "hmac-sha384"]
dh-group = ["x25519", "ecp256", "modp2048"]

[[ike.ipsec-policy-template]]
name = "ipsecpol"
replay-window = 64
{ipsec_template_extra}
[[ike.ipsec-policy-template.esp-proposal]]
aead-alg = ["aes256-gcm-128", "aes128-gcm-128"]
dh-group = ["x25519", "ecp256", "modp2048"]
esn = [false]
[[ike.ipsec-policy-template.esp-proposal]]
aead-alg = ["aes256-gcm-128", "aes128-gcm-128"]
esn = [false]
[[ike.ipsec-policy-template.esp-proposal]]
enc-alg = ["aes128-cbc", "aes256-cbc"]
auth-alg = ["hmac-sha256"]
esn = [false]

[[ike.pre-shared-key]]
local-id = "gw.example"
secret = "{psk}"

[[ike.vpn]]
name = "rw"
local-address = "{address}"
remote-address = "any"
local-id = "gw.example"
remote-id = "*.peer.example"
ike-policy = {{ template = "ikepol" }}
ipsec-policy = {{ template = "ipsecpol" }}
[[ike.vpn.security-policy]]
name = "net"
local-ts = {{ subnet = "10.100.0.0/24" }}
remote-ts = {{ subnet = "10.200.0.0/16" }}
{extra}
"""


class Gateway:
    name = "ikefarm"

    def __init__(self, ns: Namespace, workdir: Path, config_text: str) -> None:
        self.ns = ns
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.workdir / "ikefarm.toml"
        self.config_path.write_text(config_text)
        self.log_path = self.workdir / "ikefarm.log"
        self.process: subprocess.Popen[bytes] | None = None

    @classmethod
    def psk_responder(
        cls,
        ns: Namespace,
        workdir: Path,
        *,
        psk: str,
        address: str = "192.0.2.1",
        workers: int = 1,
        log_level: int = 1,
        extra: str = "",
        ike_template_extra: str = "",
        ipsec_template_extra: str = "",
    ) -> Gateway:
        text = GATEWAY_TOML.format(
            state_dir=Path(workdir) / "state",
            workers=workers,
            log_level=log_level,
            psk=psk,
            address=address,
            extra=extra,
            ike_template_extra=ike_template_extra,
            ipsec_template_extra=ipsec_template_extra,
        )
        return cls(ns, workdir, text)

    def cli(self) -> list[str]:
        return [sys.executable, "-m", "ikefarm.shared.cli.main"]

    def start(self, timeout: float = 30.0) -> None:
        log = self.log_path.open("wb")
        self.process = self.ns.popen(
            [*self.cli(), "up", "-c", str(self.config_path)], stdout=log, stderr=log
        )
        wait_for(
            lambda: set(self.status()) >= SERVICES, timeout=timeout, what="ikefarm services up"
        )
        wait_for(
            lambda: 500 in self.ns.udp_ports(), timeout=timeout, what="ingress bound to UDP 500"
        )

    def run_cli(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        return self.ns.run(
            [*self.cli(), *args, "-c", str(self.config_path)], timeout=timeout, check=False
        )

    def status(self) -> dict[str, list[dict[str, Any]]]:
        result = self.run_cli("status", "--json")
        if result.returncode != 0:
            return {}
        rows: dict[str, list[dict[str, Any]]] = {}
        for row in json.loads(result.stdout):
            rows.setdefault(row["name"], []).append(row)
        return rows

    def show(self) -> list[dict[str, Any]]:
        result = self.run_cli("show", "ike-sa", "details", "--json")
        assert result.returncode == 0, result.stderr
        return list(json.loads(result.stdout))

    def show_text(self, *words: str) -> str:
        result = self.run_cli("show", "ike-sa", *words)
        assert result.returncode == 0, result.stderr
        return result.stdout

    def counters(self, service: str) -> dict[str, int]:
        """Runtime counters and engine counters of every instance of a service, summed."""
        total: dict[str, int] = {}
        for row in self.status().get(service, []):
            sources = [row.get("counters", {}), row.get("gauges", {}).get("engine", {})]
            for source in sources:
                for key, value in source.items():
                    total[key] = total.get(key, 0) + int(value)
        return total

    def service_pids(self) -> dict[str, int]:
        """instance name -> pid of each service process, from the `up.json` of `ikefarm up`."""
        for path in self.workdir.glob("state/up.json"):
            return dict(json.loads(path.read_text())["children"])
        return {}

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 80) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def log_events(self) -> list[dict[str, Any]]:
        events = []
        for line in self.log_text().splitlines():
            if line.startswith("{"):
                try:
                    events.append(json.loads(line))
                except ValueError:
                    continue
        return events

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        code = self.process.returncode
        self.process = None
        return code

    def wait_sas(self, count: int, timeout: float = 15.0) -> list[dict[str, Any]]:
        def ready() -> list[dict[str, Any]] | None:
            rows = [r for r in self.show() if r["state"] == "established"]
            return rows if len(rows) >= count else None

        return wait_for(ready, timeout=timeout, what=f"{count} established IKE SAs on ikefarm")

    @staticmethod
    def sleep(seconds: float) -> None:
        time.sleep(seconds)


# -- ikefarm facing strongSwan with VPNs of its own (initiator, DPD, NAT-T, management) --------


def vpn_config(
    name: str,
    *,
    local_id: str,
    remote_id: str | None,
    policies: list[tuple[str, str, str]],
    local_address: str = "192.0.2.1",
    remote_address: str = "192.0.2.2",
    ipsec: dict[str, str] | None = None,
) -> str:
    """One [[ike.vpn]] with its security policies (name, local-ts, remote-ts)."""
    lines = [
        "[[ike.vpn]]",
        f'name = "{name}"',
        f'local-address = "{local_address}"',
        f'remote-address = "{remote_address}"',
        f'local-id = "{local_id}"',
    ]
    if remote_id is not None:
        lines.append(f'remote-id = "{remote_id}"')
    lines.append('ike-policy = { template = "ikepol" }')
    overrides = "".join(f', {key} = "{value}"' for key, value in (ipsec or {}).items())
    lines.append(f'ipsec-policy = {{ template = "ipsecpol"{overrides} }}')
    for policy, local_ts, remote_ts in policies:
        lines += [
            "[[ike.vpn.security-policy]]",
            f'name = "{policy}"',
            f'local-ts = {{ subnet = "{local_ts}" }}',
            f'remote-ts = {{ subnet = "{remote_ts}" }}',
        ]
    return "\n".join(lines) + "\n"


def farm_config(
    workdir: Path,
    *,
    psks: list[tuple[str, str, str]],
    vpns: list[str],
    workers: int = 1,
    log_level: int = 1,
    global_options: dict[str, Any] | None = None,
    dpd_delay: str = "0s",
    dpd_action: str = "restart",
    kernel_backend: str = "memory",
    start_action: str = "trap",
) -> str:
    """A whole ikefarm config: PSKs (local-id, remote-id, secret), `vpn_config()` blocks.

    The kernel backend defaults to `memory` (the test double): these farms test IKE.
    """
    options = "".join(
        f"{key} = {json.dumps(value)}\n" for key, value in (global_options or {}).items()
    )
    keys = "".join(
        f'[[ike.pre-shared-key]]\nlocal-id = "{local}"\nremote-id = "{remote}"\n'
        f'secret = "{secret}"\n\n'
        for local, remote, secret in psks
    )
    return (
        f'[farm]\nstate-dir = "{Path(workdir) / "state"}"\nike-workers = {workers}\n\n'
        f'[kernel]\nbackend = "{kernel_backend}"\n\n'
        f"[ike.logging.daemon]\ndefault = {log_level}\n\n"
        f"[ike.global-options]\n{options}\n"
        f'[[ike.ike-policy-template]]\nname = "ikepol"\ndpd-delay = "{dpd_delay}"\n'
        "[[ike.ike-policy-template.ike-proposal]]\n"
        'aead-alg = ["aes256-gcm-128"]\nprf-alg = ["hmac-sha384"]\ndh-group = ["x25519"]\n\n'
        f'[[ike.ipsec-policy-template]]\nname = "ipsecpol"\ndpd-action = "{dpd_action}"\n'
        f'start-action = "{start_action}"\n'
        "[[ike.ipsec-policy-template.esp-proposal]]\n"
        'aead-alg = ["aes256-gcm-128"]\nesn = [false]\n\n'
        f"{keys}" + "\n".join(vpns)
    )
