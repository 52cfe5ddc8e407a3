"""A real FreeRADIUS 3 (Debian's `freeradius`) inside a test namespace.

Each :class:`FreeRadius` gets a private config dir: a `radiusd.conf` this module writes
(one client, the `files`, `eap` and `detail` modules, one virtual server with an auth and
an acct listener), the `users` file the test gives, and Debian's dictionaries. It runs in
the foreground (`freeradius -f`), logging authentications (`Login OK`, `Login incorrect`)
to `radius.log`; accounting records go to `acct/detail`. Passwords are never logged by
this configuration (`auth_badpass`/`auth_goodpass` are off).

EAP methods: md5 always; tls when `tls` names (ca, server certificate, server key) PEM
files (made by tests/pki.py).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .netns import Namespace, read_text, signal_and_wait, wait_for

FREERADIUS = os.environ.get("IKEFARM_FREERADIUS", "/usr/sbin/freeradius")
DICTIONARY = "/usr/share/freeradius/dictionary"
INSTALL_HINT = "needs FreeRADIUS: run ops/install-test-peers (as root)"


def missing() -> str | None:
    if not os.access(FREERADIUS, os.X_OK) or not os.path.exists(DICTIONARY):
        return f"{FREERADIUS} not found; {INSTALL_HINT}"
    return None


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    certificate: Path
    key: Path


RADIUSD_CONF = """
prefix = /usr
exec_prefix = /usr
sysconfdir = /etc
localstatedir = /var
sbindir = /usr/sbin
logdir = {dir}
raddbdir = {dir}
radacctdir = {dir}/acct
name = freeradius
confdir = {dir}
run_dir = {dir}
db_dir = {dir}
libdir = /usr/lib/freeradius
pidfile = {dir}/radiusd.pid
max_request_time = 30
cleanup_delay = 5
max_requests = 1024
hostname_lookups = no
log {{
    destination = files
    file = {dir}/radius.log
    auth = yes
    auth_badpass = no
    auth_goodpass = no
}}
security {{
    allow_core_dumps = no
    max_attributes = 200
    reject_delay = 0
    status_server = no
}}
thread pool {{
    start_servers = 1
    max_servers = 2
    min_spare_servers = 1
    max_spare_servers = 2
    max_requests_per_server = 0
}}
client ikefarm {{
    ipaddr = {client}
    secret = {secret}
    require_message_authenticator = yes
}}
modules {{
    files {{
        filename = {dir}/users
    }}
    eap {{
        default_eap_type = {default_eap}
        timer_expire = 60
        ignore_unknown_eap_types = no
        max_sessions = 64
        md5 {{
        }}
{tls}
    }}
    detail {{
        filename = {dir}/acct/detail
        escape_filenames = no
        permissions = 0600
        header = "%t"
    }}
}}
server default {{
    listen {{
        type = auth
        ipaddr = {address}
        port = {auth_port}
    }}
    listen {{
        type = acct
        ipaddr = {address}
        port = {acct_port}
    }}
    authorize {{
        eap {{
            ok = return
        }}
        files
    }}
    authenticate {{
        eap
    }}
    post-auth {{
        Post-Auth-Type REJECT {{
            eap
        }}
    }}
    accounting {{
        detail
    }}
}}
"""

TLS_CONF = """
        tls-config tls-common {{
            private_key_file = {key}
            certificate_file = {certificate}
            ca_file = {ca}
            ca_path = {dir}
            tls_min_version = "1.2"
            tls_max_version = "1.2"
            cipher_list = "DEFAULT"
        }}
        tls {{
            tls = tls-common
        }}
"""


class FreeRadius:
    """FreeRADIUS on `address` in `ns`, answering the client at `client` with `secret`."""

    def __init__(
        self,
        ns: Namespace,
        workdir: Path,
        *,
        users: str,
        secret: str,
        address: str = "127.0.0.1",
        client: str = "127.0.0.1",
        auth_port: int = 1812,
        acct_port: int = 1813,
        tls: TlsFiles | None = None,
        default_eap: str = "md5",
    ) -> None:
        self.ns = ns
        self.name = "freeradius"
        self.dir = workdir
        self.log_path = workdir / "radius.log"
        self.auth_port = auth_port
        self.acct_port = acct_port
        self.proc: subprocess.Popen[bytes] | None = None
        (workdir / "acct").mkdir(parents=True, exist_ok=True)
        (workdir / "dictionary").write_text(f"$INCLUDE {DICTIONARY}\n")
        (workdir / "users").write_text(users)
        tls_text = ""
        if tls is not None:
            for name, path in (("ca.pem", tls.ca), ("server.pem", tls.certificate)):
                shutil.copy(path, workdir / name)
            shutil.copy(tls.key, workdir / "server.key")
            os.chmod(workdir / "server.key", 0o600)
            tls_text = TLS_CONF.format(
                key=workdir / "server.key",
                certificate=workdir / "server.pem",
                ca=workdir / "ca.pem",
                dir=workdir,
            )
        (workdir / "radiusd.conf").write_text(
            RADIUSD_CONF.format(
                dir=workdir,
                client=client,
                secret=secret,
                address=address,
                auth_port=auth_port,
                acct_port=acct_port,
                tls=tls_text,
                default_eap=default_eap,
            )
        )
        os.chmod(workdir / "radiusd.conf", 0o600)

    def start(self, timeout: float = 20.0) -> None:
        out = open(self.dir / "stdout.log", "wb")  # noqa: SIM115 - owned by the process
        self.proc = self.ns.popen([FREERADIUS, "-f", "-d", str(self.dir)], stdout=out)
        wait_for(
            lambda: "Ready to process requests" in self.log_text() or self.proc.poll() is not None,  # type: ignore[union-attr]
            timeout=timeout,
            what="FreeRADIUS ready",
        )
        if self.proc.poll() is not None:
            raise RuntimeError(f"FreeRADIUS exited: {read_text(self.dir / 'stdout.log')[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            signal_and_wait(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=5)
        self.proc = None

    def log_text(self) -> str:
        path = self.dir / "radius.log"
        return read_text(path) if path.exists() else ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def detail_text(self) -> str:
        path = self.dir / "acct" / "detail"
        return read_text(path) if path.exists() else ""

    def detail_records(self) -> list[dict[str, str]]:
        """The accounting records of the detail file, attribute -> value (quotes removed)."""
        records: list[dict[str, str]] = []
        for block in self.detail_text().split("\n\n"):
            record: dict[str, str] = {}
            for line in block.splitlines():
                if "=" not in line or not line.startswith(("\t", " ")):
                    continue
                key, _, value = line.strip().partition(" = ")
                record[key] = value.strip('"')
            if record:
                records.append(record)
        return records
