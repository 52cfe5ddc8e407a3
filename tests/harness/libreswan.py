"""A real libreswan 4.10 pluto inside a test namespace.

libreswan's Debian package conflicts with strongSwan's, so it is not
installed: ops/install-test-peers unpacks it into a cache dir
($IKEFARM_LIBRESWAN_DIR, default /var/cache/ikefarm-test/libreswan). pluto
runs in its own mount namespace where that tree's ``usr/libexec/ipsec`` is
bind-mounted on ``/usr/libexec/ipsec`` (pluto execs ``addconn`` from there at
start-up) and /run is a private tmpfs; its control socket lives in a short
private dir on the host, so ``whack``/``addconn`` reach it from the namespace.

This kernel has no ESP: libreswan establishes the IKE SA, fails to install
its CHILD SA in the kernel, deletes the IKE SA and (because ``--initiate``
asked for it to stay up) revives the connection in a loop. Judge libreswan
interop by the IKE SA: :meth:`Libreswan.ike_sa_established` reads pluto's
log for ``"<conn>" #N: initiator established IKE SA`` (or
``responder established IKE SA``). The harness stops the loop by default
(``--impair revival``; ``revive=True`` keeps it). pluto deletes its IKE SA
without a Delete notify, so the peer keeps its side of it.
``impair=["omit-v2-ike-auth-child"]`` makes IKE_AUTH childless, so the IKE SA
survives on both sides.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .netns import Namespace, NetnsError, read_text, signal_and_wait, wait_for

DEFAULT_ROOT = "/var/cache/ikefarm-test/libreswan"
INSTALL_HINT = "needs libreswan: run ops/install-test-peers (as root)"


def root() -> Path:
    """Where the libreswan .deb is unpacked ($IKEFARM_LIBRESWAN_DIR or the default)."""
    return Path(os.environ.get("IKEFARM_LIBRESWAN_DIR", DEFAULT_ROOT))


def libexec(tool: str) -> Path:
    return root() / "usr/libexec/ipsec" / tool


def missing() -> str | None:
    """None when the unpacked libreswan and certutil are usable, else why (with the fix)."""
    for tool in ("pluto", "whack", "addconn"):
        if not os.access(libexec(tool), os.X_OK):
            return f"{libexec(tool)} not found; {INSTALL_HINT}"
    if shutil.which("certutil") is None:
        return f"certutil not found (Debian package libnss3-tools); {INSTALL_HINT}"
    return None


class LibreswanError(RuntimeError):
    """pluto did not come up or a whack/addconn command failed."""


# --------------------------------------------------------------------------
# ipsec.conf / ipsec.secrets builders
# --------------------------------------------------------------------------


def lsw_id(ident: str) -> str:
    """An identity as libreswan writes it: IPs and `@x`, `%any`, DNs as they are, else `@x`."""
    try:
        ipaddress.ip_address(ident)
    except ValueError:
        pass
    else:
        return ident
    if ident.startswith(("@", "%")) or "=" in ident:
        return ident
    return "@" + ident


def _secret(secret: str | bytes) -> str:
    """A quoted string when that is safe, hex otherwise (the bytes are the same)."""
    if isinstance(secret, str) and secret[:2] in ("0x", "0s"):
        return secret
    raw = secret.encode() if isinstance(secret, str) else bytes(secret)
    text = raw.decode("ascii", "replace")
    if text.isprintable() and '"' not in text and "\\" not in text and raw.isascii():
        return f'"{text}"'
    return "0x" + raw.hex()


@dataclass
class LibreswanConn:
    """One `conn` section. `left` is this pluto, `right` the peer.

    ids go through lsw_id() (a bare FQDN gets its `@`). `ppk` is "insist",
    "permit" or "no"; `ike`/`esp` use libreswan's syntax, e.g.
    ``aes_gcm256-sha2_384-dh31`` / ``aes_gcm256``. Anything else goes in
    `options` (key -> value).
    """

    name: str = "c"
    left: str = "%defaultroute"
    right: str = "%any"
    leftid: str | None = None
    rightid: str | None = None
    leftsubnet: str | Sequence[str] | None = None
    rightsubnet: str | Sequence[str] | None = None
    authby: str = "secret"
    ikev2: str = "insist"
    ike: str | None = None
    esp: str | None = None
    ppk: str | None = None
    encapsulation: str | None = None
    dpddelay: str | int | None = None
    dpdtimeout: str | int | None = None
    ikelifetime: str | None = None
    salifetime: str | None = None
    auto: str | None = None  # the harness adds conns itself with addconn
    options: Mapping[str, Any] = field(default_factory=dict)

    def text(self) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name):
            raise ValueError(f"conn name {self.name!r} has characters libreswan rejects")

        def subnets(v: str | Sequence[str] | None) -> str | None:
            if v is None or isinstance(v, str):
                return v
            return ",".join(v)

        items: dict[str, Any] = {
            "authby": self.authby,
            "ikev2": self.ikev2,
            "left": self.left,
            "leftid": lsw_id(self.leftid) if self.leftid else None,
            "leftsubnet": subnets(self.leftsubnet),
            "right": self.right,
            "rightid": lsw_id(self.rightid) if self.rightid else None,
            "rightsubnet": subnets(self.rightsubnet),
            "ike": self.ike,
            "esp": self.esp,
            "ppk": self.ppk,
            "encapsulation": self.encapsulation,
            "dpddelay": self.dpddelay,
            "dpdtimeout": self.dpdtimeout,
            "ikelifetime": self.ikelifetime,
            "salifetime": self.salifetime,
            "auto": self.auto,
            **self.options,
        }
        lines = [f"conn {self.name}"]
        for key, val in items.items():
            if val is None:
                continue
            sval = ("yes" if val else "no") if isinstance(val, bool) else str(val)
            if "\n" in sval:
                raise ValueError(f"{key} may not contain a newline")
            lines.append(f"\t{key}={sval}")
        return "\n".join(lines) + "\n"


@dataclass
class LibreswanPsk:
    """`ID ID : PSK "secret"` in ipsec.secrets."""

    secret: str | bytes
    ids: Sequence[str] = ()

    def text(self) -> str:
        ids = " ".join(lsw_id(i) for i in self.ids)
        return f"{ids} : PSK {_secret(self.secret)}".strip() + "\n"


@dataclass
class LibreswanPpk:
    """`ID ID : PPKS "ppk-id" "secret"` in ipsec.secrets (RFC 8784 PPK)."""

    ppk_id: str
    secret: str | bytes
    ids: Sequence[str] = ()

    def text(self) -> str:
        if '"' in self.ppk_id:
            raise ValueError("a PPK id may not contain a double quote")
        ids = " ".join(lsw_id(i) for i in self.ids)
        return f'{ids} : PPKS "{self.ppk_id}" {_secret(self.secret)}'.strip() + "\n"


def ipsec_conf(conns: Sequence[LibreswanConn], *, setup: Mapping[str, Any] | None = None) -> str:
    """ipsec.conf text: a `config setup` section and the conns."""
    out = ["config setup"]
    for key, val in (setup or {}).items():
        out.append(f"\t{key}={val}")
    out.append("")
    out.extend(c.text() for c in conns)
    return "\n".join(out)


# --------------------------------------------------------------------------
# whack output
# --------------------------------------------------------------------------

# `000 #1: "c":4500 STATE_V2_ESTABLISHED_IKE_SA (established IKE SA); REKEY in ...`
# or, for an instance of a template conn, `#2: "c"[1] 192.0.2.1:4500 STATE_...`.
_STATE_RE = re.compile(
    r'#(?P<serial>\d+): "(?P<conn>[^"]+)"\S*(?: \S+)? (?P<state>STATE_\w+) \((?P<desc>[^)]*)\)'
)


def parse_showstates(text: str) -> list[dict[str, Any]]:
    """`whack --showstates` -> [{"serial": 1, "conn": "c", "state": "STATE_V2_...", ...}]."""
    states = []
    for line in text.splitlines():
        m = _STATE_RE.search(line)
        if m:
            states.append(
                {
                    "serial": int(m.group("serial")),
                    "conn": m.group("conn"),
                    "state": m.group("state"),
                    "desc": m.group("desc"),
                    "line": line.strip(),
                }
            )
    return states


def _established_re(conn: str) -> re.Pattern[str]:
    # Non-debug pluto log lines look like `<date>: "c" #1: initiator established IKE SA; ...`;
    # debug lines (`<date>: | ...`) also say "established IKE SA" and must not count.
    return re.compile(
        rf'^[^|]*?"{re.escape(conn)}"(?:\[\d+\])?(?: \S+)? #\d+: '
        r"(?:initiator|responder) established IKE SA",
        re.MULTILINE,
    )


# --------------------------------------------------------------------------
# the daemon
# --------------------------------------------------------------------------


class Libreswan:
    """pluto in `ns`, with config, secrets, NSS db and log under `workdir`.

    `impair` items are passed as `--impair X` to pluto (see `whack --impair
    help`). Unless `revive` is set, "revival" is among them: without it, a
    connection that was `--initiate`d and lost its IKE SA (always, here: no
    ESP) is re-initiated in a loop, piling IKE SAs up on the peer. `debug`
    sets plutodebug (None for none; "base" is verbose but shows no secrets;
    never use "private" here).
    """

    def __init__(
        self,
        ns: Namespace,
        workdir: str | Path,
        *,
        name: str = "pluto",
        debug: str | None = "base",
        impair: Sequence[str] = (),
        revive: bool = False,
        setup: Mapping[str, Any] | None = None,
    ) -> None:
        self.ns = ns
        self.name = name
        self.workdir = Path(workdir)
        self.conf_path = self.workdir / "ipsec.conf"
        self.secrets_path = self.workdir / "ipsec.secrets"
        self.nss_dir = self.workdir / "nss"
        self.ipsec_d = self.workdir / "ipsec.d"
        self.log_path = self.workdir / "pluto.log"
        # The control socket path must fit in 108 bytes: keep it outside workdir.
        self.rundir = Path(tempfile.mkdtemp(prefix="ikf-lsw-"))
        self.ctl_path = self.rundir / "pluto.ctl"
        self.impair = list(impair)
        if not revive and "revival" not in self.impair:
            self.impair.append("revival")
        self.setup: dict[str, Any] = {"logfile": str(self.log_path), "logappend": "no"}
        if debug:
            self.setup["plutodebug"] = debug
        self.setup.update(setup or {})
        self.conns: list[LibreswanConn] = []
        self.secrets: list[LibreswanPsk | LibreswanPpk] = []
        self.proc: subprocess.Popen[Any] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    # -- config ------------------------------------------------------------------
    def write_config(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.ipsec_d.mkdir(exist_ok=True)
        self.conf_path.write_text(ipsec_conf(self.conns, setup=self.setup))
        self.secrets_path.write_text("".join(s.text() for s in self.secrets))
        self.secrets_path.chmod(0o600)

    def _init_nss(self) -> None:
        if (self.nss_dir / "cert9.db").exists():
            return
        self.nss_dir.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(
            ["certutil", "-N", "-d", f"sql:{self.nss_dir}", "--empty-password"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if proc.returncode != 0:
            raise LibreswanError(f"certutil -N failed: {proc.stdout}{proc.stderr}")

    # -- lifecycle -----------------------------------------------------------------
    def start(self, timeout: float = 10.0) -> Libreswan:
        """Start pluto and wait until whack answers and UDP 500 is bound."""
        if self.proc is not None:
            raise LibreswanError(f"{self.name} already started")
        self.write_config()
        self._init_nss()
        src = root() / "usr/libexec/ipsec"
        if os.path.isdir("/usr/libexec/ipsec"):
            bind = f"mount --bind {shlex.quote(str(src))} /usr/libexec/ipsec"
        else:
            # No such dir on the host (libreswan is not installed): cover all of
            # /usr/libexec in this private mount namespace instead of creating it.
            bind = f"mount --bind {shlex.quote(str(src.parent))} /usr/libexec"
        argv = [
            str(libexec("pluto")), "--nofork",
            "--config", str(self.conf_path),
            "--secretsfile", str(self.secrets_path),
            "--nssdir", str(self.nss_dir),
            "--rundir", str(self.rundir),
            "--ipsecdir", str(self.ipsec_d),
            "--logfile", str(self.log_path),
            "--no-dnssec",
        ]  # fmt: skip
        for item in self.impair:
            argv += ["--impair", item]
        script = f"{bind} && mount -t tmpfs tmpfs /run && exec {shlex.join(argv)}"
        out = open(self.workdir / "pluto.stdout", "wb")  # noqa: SIM115 - child owns it
        try:
            self.proc = self.ns.popen(
                ["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        finally:
            out.close()
        try:
            wait_for(self._ready, timeout=timeout, interval=0.05, what=f"{self.name} ctl socket")
            self.ns.wait_udp_port(500, timeout=timeout)
        except TimeoutError as exc:
            raise LibreswanError(f"{exc}\n--- {self.name} log ---\n{self.log_tail()}") from exc
        if self.conns:  # load() before start(): add them now (pluto adds only auto=add ones)
            self.addconn(*(c.name for c in self.conns))
        return self

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise LibreswanError(
                f"{self.name} exited with {self.proc.returncode}\n{self.log_tail()}"
                f"\n--- stdout ---\n{read_text(self.workdir / 'pluto.stdout', 4000)}"
            )
        if not self.ctl_path.exists():
            return False
        return self.whack("--status", check=False, timeout=5).returncode == 0

    def stop(self, timeout: float = 5.0) -> None:
        """Stop pluto (SIGTERM, then SIGKILL) and remove its socket dir. Idempotent."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            try:
                os.kill(proc.pid, signal.SIGCONT)
                os.kill(proc.pid, signal.SIGTERM)
                proc.wait(timeout=timeout)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout)
        shutil.rmtree(self.rundir, ignore_errors=True)

    def pause(self) -> None:
        """SIGSTOP pluto and wait until it is stopped (for liveness/DPD tests)."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def _signal(self, sig: signal.Signals) -> None:
        if self.proc is None or self.proc.poll() is not None:
            raise LibreswanError(f"{self.name} is not running")
        signal_and_wait(self.proc.pid, sig)

    def __enter__(self) -> Libreswan:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- driving it ----------------------------------------------------------------
    def _tool(
        self, argv: list[str], *, timeout: float, check: bool
    ) -> subprocess.CompletedProcess[str]:
        try:
            proc = self.ns.run(argv, timeout=timeout, check=False)
        except NetnsError as exc:
            raise LibreswanError(f"{exc}\n--- {self.name} log ---\n{self.log_tail()}") from exc
        if check and proc.returncode != 0:
            raise LibreswanError(
                f"{Path(argv[0]).name} {' '.join(argv[1:])} failed ({proc.returncode}):\n"
                f"{proc.stdout}{proc.stderr}\n--- {self.name} log ---\n{self.log_tail()}"
            )
        return proc

    def whack(
        self, *args: str, timeout: float = 10.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """`whack --ctlsocket <ours> ARGS` in the namespace."""
        argv = [str(libexec("whack")), "--ctlsocket", str(self.ctl_path), *args]
        return self._tool(argv, timeout=timeout, check=check)

    def addconn(self, *names: str, timeout: float = 10.0) -> None:
        argv = [
            str(libexec("addconn")), "--config", str(self.conf_path),
            "--ctlsocket", str(self.ctl_path), *names,
        ]  # fmt: skip
        self._tool(argv, timeout=timeout, check=True)

    def load(
        self,
        conns: Sequence[LibreswanConn],
        secrets: Sequence[LibreswanPsk | LibreswanPpk] = (),
    ) -> None:
        """Write ipsec.conf/ipsec.secrets; if running, reread secrets and add the conns."""
        self.conns = list(conns)
        self.secrets = list(secrets)
        self.write_config()
        if self.proc is not None:
            self.whack("--rereadsecrets")
            self.addconn(*(c.name for c in self.conns))

    def initiate(
        self,
        conn: str,
        *,
        timeout: float = 15.0,
        check: bool = False,
        asynchronous: bool = False,
    ) -> subprocess.CompletedProcess[str]:
        """`whack --name CONN --initiate`: returns once IKE_AUTH is done; output is the story.

        `check` is off by default: with no ESP in this kernel the CHILD SA
        always fails, so whack's exit code says nothing about the IKE SA.
        With `asynchronous`, whack returns at once (for peers that never answer:
        pluto's own retransmits would outlast `timeout`).
        """
        args = ["--name", conn, "--initiate"]
        if asynchronous:
            args.append("--asynchronous")
        return self.whack(*args, timeout=timeout, check=check)

    def terminate(self, conn: str, *, timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
        return self.whack("--name", conn, "--terminate", timeout=timeout, check=False)

    def status(self) -> str:
        """`whack --status` text (connections, algorithms, states)."""
        return self.whack("--status").stdout

    def traffic_status(self) -> str:
        return self.whack("--trafficstatus").stdout

    def states(self) -> list[dict[str, Any]]:
        """Current states from `whack --showstates` (see parse_showstates())."""
        return parse_showstates(self.whack("--showstates").stdout)

    def ike_sa_established(self, conn: str) -> bool:
        """True once pluto logged that an IKE SA of `conn` was established.

        This holds even after the SA was deleted again (which libreswan does
        when the kernel refuses its CHILD SA): that is the interop fact.
        """
        return bool(_established_re(conn).search(self.log_text()))

    def ike_sa_up(self, conn: str) -> bool:
        """True while an established IKE SA of `conn` exists (from --showstates)."""
        return any(s["conn"] == conn and "ESTABLISHED_IKE_SA" in s["state"] for s in self.states())

    def wait_ike_sa_established(self, conn: str, *, timeout: float = 10.0) -> None:
        try:
            wait_for(
                lambda: self.ike_sa_established(conn),
                timeout=timeout,
                what=f"libreswan IKE SA {conn}",
            )
        except TimeoutError as exc:
            raise LibreswanError(f"{exc}\n--- {self.name} log ---\n{self.log_tail()}") from exc

    # -- logs ------------------------------------------------------------------------
    def log_text(self) -> str:
        return read_text(self.log_path, limit=64 << 20)

    def log_lines(self, debug: bool = False) -> list[str]:
        """Log lines; without `debug`, only pluto's non-debug lines (no `| `)."""
        lines = self.log_text().splitlines()
        if debug:
            return lines
        return [ln for ln in lines if not re.match(r"^[^|]*?: \|", ln)]

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_lines()[-lines:])
