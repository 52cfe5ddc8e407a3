"""A real strongSwan charon inside a test namespace, driven through swanctl.

Each :class:`StrongSwan` gets a private config dir (``strongswan.conf``,
``swanctl/swanctl.conf`` and the credential folders) and runs
``ip netns exec NS unshare -m sh -c 'mount -t tmpfs tmpfs /run && exec charon'``
so its pid file and sockets in /run never meet another instance's. The vici
socket is moved out of /run into a short private dir on the host file system
(``charon.plugins.vici.socket``), so swanctl can reach it from anywhere.

IPsec runs in userspace (kernel-libipsec over a TUN device ``ipsec0``): this
kernel has XFRM but no ESP. What that implies for a test:

* libipsec forces UDP encapsulation: charon fakes a NAT (``nat-fake=yes`` as
  responder, ``nat-remote=yes`` as initiator, and ``nat-any=yes``), floats to
  port 4500 and every CHILD_SA shows ``encap=yes``.
* Installing a CHILD_SA installs a route (table 220, dev ipsec0) whatever
  ``install_routes`` says, with a source address taken from the local TS:
  the namespace must own an address inside its local TS (put one on ``lo``),
  else charon logs "unable to install IPsec policies (SPD) in kernel" and
  answers TS_UNACCEPTABLE. A remote TS equal to the IKE peer's address
  (the default dynamic TS of a host-to-host tunnel) fails the same way
  ("conflicts with IKE traffic").

Building config: :class:`Connection`, :class:`Child`, :class:`Psk`,
:class:`Ppk` and :func:`swanctl_conf`; charon options go to the
:class:`StrongSwan` constructor. Secrets are written hex-encoded (``0x...``)
so no quoting rule can bite, and never logged by this module.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .netns import Namespace, NetnsError, read_text, signal_and_wait, wait_for

CHARON = os.environ.get("IKEFARM_CHARON", "/usr/lib/ipsec/charon")
SWANCTL = os.environ.get("IKEFARM_SWANCTL", "/usr/sbin/swanctl")
INSTALL_HINT = "needs strongSwan: run ops/install-test-peers (as root)"

# Enough for PSK/PPK/cert auth with AES-GCM/CBC, SHA1/2, MODP/ECP/x25519,
# userspace ESP (kernel-libipsec) with kernel-netlink for addresses/routes.
DEFAULT_PLUGINS = [
    "random",
    "nonce",
    "openssl",
    "aes",
    "sha1",
    "sha2",
    "hmac",
    "kdf",
    "gcm",
    "curve25519",
    "x509",
    "pubkey",
    "pem",
    "pkcs1",
    "pkcs8",
    "constraints",
    "revocation",
    "kernel-libipsec",
    "kernel-netlink",
    "socket-default",
    "vici",
]

# Level 2 for the IKE/config/child subsystems shows proposals, TS selection,
# SPIs and state changes; nothing at these levels prints key material.
DEFAULT_LOG_LEVELS: dict[str, int] = {
    "default": 1,
    "ike": 2,
    "cfg": 2,
    "chd": 2,
    "knl": 1,
    "net": 1,
    "enc": 1,
    "esp": 1,
}

_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


class StrongSwanError(RuntimeError):
    """A swanctl command failed or charon did not come up."""


def missing() -> str | None:
    """None when charon and swanctl are installed, else the reason (with the fix)."""
    for path in (CHARON, SWANCTL):
        if not os.access(path, os.X_OK):
            return f"{path} not found; {INSTALL_HINT}"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun missing: kernel-libipsec needs the tun driver"
    return None


# --------------------------------------------------------------------------
# strongSwan settings syntax (strongswan.conf and swanctl.conf share it)
# --------------------------------------------------------------------------


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (list, tuple)):
        return ", ".join(_value(x) for x in v)
    s = str(v)
    if "\n" in s or "\r" in s:
        raise ValueError(f"setting value may not contain a newline: {s!r}")
    return s


def render_settings(tree: Mapping[str, Any], indent: int = 0) -> str:
    """Render a nested dict as strongSwan settings; None values are left out.

    A dict value is a section; a bool is yes/no; a list is comma-joined; the
    special key ``"__lines__"`` holds raw lines emitted as they are.
    """
    pad = "    " * indent
    out: list[str] = []
    for key, val in tree.items():
        if val is None:
            continue
        if key == "__lines__":
            out.extend(f"{pad}{line}" for line in val)
        elif isinstance(val, Mapping):
            out.append(f"{pad}{key} {{")
            out.append(render_settings(val, indent + 1).rstrip("\n"))
            out.append(f"{pad}}}")
        else:
            out.append(f"{pad}{key} = {_value(val)}")
    return "\n".join(line for line in out if line != "") + "\n"


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """`over` merged into a copy of `base`, sections recursively."""
    out = dict(base)
    for key, val in over.items():
        if isinstance(val, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], val)
        else:
            out[key] = val
    return out


def encode_secret(secret: str | bytes) -> str:
    """A secret as strongSwan writes it: `0x`/`0s` strings pass through, else hex."""
    if isinstance(secret, str) and secret[:2] in ("0x", "0s"):
        return secret
    raw = secret.encode() if isinstance(secret, str) else bytes(secret)
    return "0x" + raw.hex()


# --------------------------------------------------------------------------
# swanctl.conf builder
# --------------------------------------------------------------------------


def _list(v: str | Sequence[str] | None) -> list[str] | None:
    if v is None:
        return None
    if isinstance(v, str):
        return [v]
    return list(v)


def _check_name(kind: str, name: str) -> str:
    if not _NAME_RE.match(name):
        raise ValueError(f"{kind} name {name!r} must match {_NAME_RE.pattern}")
    return name


@dataclass
class Child:
    """One `children.<name>` section of a swanctl connection."""

    name: str = "net"
    local_ts: str | Sequence[str] | None = None
    remote_ts: str | Sequence[str] | None = None
    esp_proposals: str | Sequence[str] | None = None
    mode: str | None = None  # tunnel, transport, ...
    start_action: str | None = None  # none, trap, start
    dpd_action: str | None = None  # clear, trap, restart
    close_action: str | None = None
    rekey_time: str | int | None = None
    life_time: str | int | None = None
    options: Mapping[str, Any] = field(default_factory=dict)  # any other key
    extra_lines: Sequence[str] = ()  # raw lines inside the section

    def settings(self) -> dict[str, Any]:
        tree: dict[str, Any] = {
            "local_ts": _list(self.local_ts),
            "remote_ts": _list(self.remote_ts),
            "esp_proposals": _list(self.esp_proposals),
            "mode": self.mode,
            "start_action": self.start_action,
            "dpd_action": self.dpd_action,
            "close_action": self.close_action,
            "rekey_time": self.rekey_time,
            "life_time": self.life_time,
        }
        tree.update(self.options)
        if self.extra_lines:
            tree["__lines__"] = list(self.extra_lines)
        return tree


@dataclass
class Connection:
    """One `connections.<name>` section (IKEv2 by default).

    Authentication is PSK on both sides unless `local_auth`/`remote_auth`
    say otherwise (e.g. "pubkey"). Certificate slots take file paths; the
    files are copied into the instance's swanctl dir by StrongSwan.load():
    `local_certs` into x509/, `remote_cacerts` into x509ca/, `remote_certs`
    (a pinned peer certificate) into x509/.
    """

    name: str = "c"
    local_addrs: str | Sequence[str] | None = None
    remote_addrs: str | Sequence[str] | None = None
    local_id: str | None = None
    remote_id: str | None = None
    local_auth: str = "psk"
    remote_auth: str = "psk"
    local_eap_id: str | None = None  # `local.eap_id`: the EAP identity, when not the IKE one
    local_certs: Sequence[str | Path] = ()
    remote_certs: Sequence[str | Path] = ()
    remote_cacerts: Sequence[str | Path] = ()
    proposals: str | Sequence[str] | None = None  # e.g. "aes256gcm16-prfsha384-x25519"
    version: int | None = 2
    local_port: int | None = None
    remote_port: int | None = None
    encap: bool | None = None
    mobike: bool | None = None
    fragmentation: str | bool | None = None
    dpd_delay: str | int | None = None
    dpd_timeout: str | int | None = None
    rekey_time: str | int | None = None  # IKE_SA rekey
    reauth_time: str | int | None = None
    over_time: str | int | None = None
    unique: str | None = None
    ppk_id: str | None = None
    ppk_required: bool | None = None
    children: Sequence[Child] = field(default_factory=lambda: [Child()])
    options: Mapping[str, Any] = field(default_factory=dict)  # any other key
    extra_lines: Sequence[str] = ()  # raw lines inside the section

    def settings(self) -> dict[str, Any]:
        local: dict[str, Any] = {"auth": self.local_auth, "id": self.local_id}
        if self.local_eap_id is not None:
            local["eap_id"] = self.local_eap_id
        if self.local_certs:
            local["certs"] = [Path(p).name for p in self.local_certs]
        remote: dict[str, Any] = {"auth": self.remote_auth, "id": self.remote_id}
        if self.remote_certs:
            remote["certs"] = [Path(p).name for p in self.remote_certs]
        if self.remote_cacerts:
            remote["cacerts"] = [Path(p).name for p in self.remote_cacerts]
        tree: dict[str, Any] = {
            "version": self.version,
            "local_addrs": _list(self.local_addrs),
            "remote_addrs": _list(self.remote_addrs),
            "local_port": self.local_port,
            "remote_port": self.remote_port,
            "proposals": _list(self.proposals),
            "encap": self.encap,
            "mobike": self.mobike,
            "fragmentation": self.fragmentation,
            "dpd_delay": self.dpd_delay,
            "dpd_timeout": self.dpd_timeout,
            "rekey_time": self.rekey_time,
            "reauth_time": self.reauth_time,
            "over_time": self.over_time,
            "unique": self.unique,
            "ppk_id": self.ppk_id,
            "ppk_required": self.ppk_required,
            "local": local,
            "remote": remote,
            "children": {_check_name("child", c.name): c.settings() for c in self.children},
        }
        tree.update(self.options)
        if self.extra_lines:
            tree["__lines__"] = list(self.extra_lines)
        return tree


@dataclass
class Psk:
    """An IKE pre-shared key for the given identities (`secrets.ike-N`)."""

    secret: str | bytes
    ids: Sequence[str] = ()


@dataclass
class Ppk:
    """A post-quantum preshared key (RFC 8784) under `ppk_id` (`secrets.ppk-N`)."""

    ppk_id: str
    secret: str | bytes


def swanctl_conf(
    connections: Sequence[Connection],
    psks: Sequence[Psk] = (),
    ppks: Sequence[Ppk] = (),
    extra: str = "",
) -> str:
    """The text of a swanctl.conf with these connections and secrets."""
    secrets: dict[str, Any] = {}
    for i, psk in enumerate(psks, 1):
        entry: dict[str, Any] = {f"id-{j}": ident for j, ident in enumerate(psk.ids, 1)}
        entry["secret"] = encode_secret(psk.secret)
        secrets[f"ike-{i}"] = entry
    for i, ppk in enumerate(ppks, 1):
        secrets[f"ppk-{i}"] = {"id-1": ppk.ppk_id, "secret": encode_secret(ppk.secret)}
    tree: dict[str, Any] = {
        "connections": {_check_name("connection", c.name): c.settings() for c in connections},
        "secrets": secrets,
    }
    text = render_settings(tree)
    if extra:
        text += extra.rstrip("\n") + "\n"
    return text


# --------------------------------------------------------------------------
# `swanctl --raw` output parser
# --------------------------------------------------------------------------

# A value ends where the next `key=`, `key {`, `key [` or `}` starts. vici
# keys are lower-case words with dashes; values (ids, DNs) may hold spaces
# and upper-case `CN=`, so a value runs until such a lower-case key follows.
_TOKEN_RE = re.compile(
    r"""\s*(?:
        (?P<close>\})
      | (?P<section>[^\s=\[\]{}]+)\s+\{
      | (?P<list>[a-z0-9_-]+)=\[(?P<items>[^\]]*)\]
      | (?P<key>[a-z0-9_-]+)=(?P<value>.*?)(?=\s+(?:[a-z0-9_-]+=|[^\s=\[\]{}]+\s+\{)|\s*\})
    )""",
    re.VERBOSE,
)


def parse_raw_section(text: str, pos: int = 0) -> tuple[dict[str, Any], int]:
    """Parse the body of a `{...}` block from `pos` (just after `{`) to its `}`."""
    out: dict[str, Any] = {}
    while True:
        m = _TOKEN_RE.match(text, pos)
        if not m:
            if text[pos:].strip() == "":
                return out, len(text)
            raise ValueError(f"cannot parse swanctl --raw output at: {text[pos : pos + 60]!r}")
        pos = m.end()
        if m.group("close"):
            return out, pos
        if m.group("section"):
            sub, pos = parse_raw_section(text, pos)
            out[m.group("section")] = sub
        elif m.group("list"):
            out[m.group("list")] = m.group("items").split()
        else:
            out[m.group("key")] = m.group("value")


def parse_raw(text: str, label: str) -> list[dict[str, Any]]:
    """Every `<label> {...}` message in swanctl --raw output, parsed to dicts.

    e.g. ``list-sa event {c {uniqueid=1 state=ESTABLISHED ... child-sas {net-1 {...}}}}``
    gives ``[{"c": {"uniqueid": "1", "state": "ESTABLISHED", ..., "child-sas": {...}}}]``.
    """
    msgs = []
    prefix = label + " {"
    for line in text.splitlines():
        if line.startswith(prefix):
            body, _ = parse_raw_section(line, len(prefix))
            msgs.append(body)
    return msgs


def parse_list_sas(text: str) -> list[dict[str, Any]]:
    """`swanctl --list-sas --raw` -> one dict per IKE SA.

    The vici keys stay as strongSwan names them (``state``, ``initiator-spi``,
    ``responder-spi``, ``local-host``, ``local-id``, ``remote-host``,
    ``remote-id``, ``encr-alg``, ``encr-keysize``, ``integ-alg``,
    ``prf-alg``, ``dh-group``, ``ppk`` (``yes`` when a PPK was used),
    ``initiator``, ``nat-*``...), plus ``name`` (the connection name), and
    ``child-sas`` becomes a list of dicts, each with ``name`` (the child
    config), ``key`` (e.g. ``net-1``), ``state``, ``protocol``, ``mode``,
    ``encap``, ``spi-in``, ``spi-out``, ``encr-alg``, ``encr-keysize``,
    ``integ-alg``, ``dh-group``, ``local-ts``/``remote-ts`` (lists)...
    Values are strings (lists of strings for TS); absent keys are absent.
    """
    sas = []
    for msg in parse_raw(text, "list-sa event"):
        for name, body in msg.items():
            sa = {"name": name, **body}
            children = []
            for key, child in (body.get("child-sas") or {}).items():
                children.append({"key": key, **child})
            sa["child-sas"] = children
            sas.append(sa)
    return sas


def parse_list_conns(text: str) -> dict[str, dict[str, Any]]:
    """`swanctl --list-conns --raw` -> {connection name: settings as charon reports them}."""
    conns: dict[str, dict[str, Any]] = {}
    for msg in parse_raw(text, "list-conn event"):
        conns.update(msg)
    return conns


# --------------------------------------------------------------------------
# the daemon
# --------------------------------------------------------------------------


class StrongSwan:
    """charon in `ns`, configured under `workdir` (created if needed).

    Named charon options map to ``charon.<option>`` in strongswan.conf
    (None leaves charon's default); `charon_options` is deep-merged into
    the ``charon`` section last, for anything else (e.g.
    ``{"dos_protection": False, "init_limit_half_open": 5}``).
    `install_routes`/`install_virtual_ip` default to off; kernel-libipsec
    installs its own TUN routes regardless (see the module docstring).
    Call start(), then load(...), then initiate()/list_sas()/...
    """

    def __init__(
        self,
        ns: Namespace,
        workdir: str | Path,
        *,
        name: str = "charon",
        plugins: Sequence[str] = DEFAULT_PLUGINS,
        log_levels: Mapping[str, int] | None = None,
        install_routes: bool = False,
        install_virtual_ip: bool = False,
        port: int | None = None,
        port_nat_t: int | None = None,
        cookie_threshold: int | None = None,
        block_threshold: int | None = None,
        retransmit_timeout: float | None = None,
        retransmit_tries: int | None = None,
        retransmit_base: float | None = None,
        retransmit_jitter: int | None = None,
        make_before_break: bool | None = None,
        charon_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.ns = ns
        self.name = name
        self.workdir = Path(workdir)
        self.swanctl_dir = self.workdir / "swanctl"
        self.conf_path = self.workdir / "strongswan.conf"
        self.log_path = self.workdir / "charon.log"
        # Unix socket paths are limited to 108 bytes: keep it short, outside workdir.
        self.rundir = Path(tempfile.mkdtemp(prefix="ikf-ss-"))
        self.vici_path = self.rundir / "charon.vici"
        self.proc: subprocess.Popen[Any] | None = None
        self.port = port or 500
        levels = dict(DEFAULT_LOG_LEVELS)
        levels.update(log_levels or {})
        charon: dict[str, Any] = {
            "load": " ".join(plugins),  # space-separated, not a list
            "install_routes": install_routes,
            "install_virtual_ip": install_virtual_ip,
            "port": port,
            "port_nat_t": port_nat_t,
            "cookie_threshold": cookie_threshold,
            "block_threshold": block_threshold,
            "retransmit_timeout": retransmit_timeout,
            "retransmit_tries": retransmit_tries,
            "retransmit_base": retransmit_base,
            "retransmit_jitter": retransmit_jitter,
            "make_before_break": make_before_break,
            "filelog": {
                "test": {
                    "path": str(self.log_path),
                    "time_format": "%H:%M:%S",
                    "ike_name": True,
                    "flush_line": True,
                    "append": False,
                    **levels,
                }
            },
            "plugins": {"vici": {"socket": f"unix://{self.vici_path}"}},
        }
        if charon_options:
            charon = deep_merge(charon, charon_options)
        self.settings: dict[str, Any] = {"charon": charon}

    # -- lifecycle -------------------------------------------------------------
    @property
    def uri(self) -> str:
        return f"unix://{self.vici_path}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["STRONGSWAN_CONF"] = str(self.conf_path)
        env["SWANCTL_DIR"] = str(self.swanctl_dir)
        return env

    def write_config(self) -> None:
        for sub in ("", "x509", "x509ca", "x509crl", "private", "pubkey"):
            (self.swanctl_dir / sub).mkdir(parents=True, exist_ok=True)
        self.conf_path.write_text(render_settings(self.settings))
        swanctl = self.swanctl_dir / "swanctl.conf"
        if not swanctl.exists():
            swanctl.write_text("")

    def start(self, timeout: float = 10.0) -> StrongSwan:
        """Start charon and wait until vici answers and the IKE port is bound."""
        if self.proc is not None:
            raise StrongSwanError(f"{self.name} already started")
        self.write_config()
        out = open(self.workdir / "charon.stdout", "wb")  # noqa: SIM115 - child owns it
        try:
            self.proc = self.ns.popen(
                [
                    "unshare", "-m", "--propagation", "private", "sh", "-c",
                    f"mount -t tmpfs tmpfs /run && exec {shlex.quote(CHARON)}",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self._env(),
            )  # fmt: skip
        finally:
            out.close()
        try:
            wait_for(self._vici_ready, timeout=timeout, interval=0.05, what=f"{self.name} vici")
            self.ns.wait_udp_port(self.port, timeout=timeout)
        except TimeoutError as exc:
            raise StrongSwanError(f"{exc}\n--- {self.name} log ---\n{self.log_tail()}") from exc
        return self

    def _vici_ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise StrongSwanError(
                f"{self.name} exited with {self.proc.returncode}\n{self.log_tail()}"
                f"\n--- stdout ---\n{read_text(self.workdir / 'charon.stdout', 4000)}"
            )
        if not self.vici_path.exists():
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(1.0)
            try:
                sock.connect(str(self.vici_path))
            except OSError:
                return False
        return True

    def stop(self, timeout: float = 5.0) -> None:
        """Stop charon (SIGTERM, then SIGKILL) and remove its socket dir. Idempotent."""
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
        """SIGSTOP charon and wait until it is stopped: it stops answering (for DPD tests)."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT charon after pause()."""
        self._signal(signal.SIGCONT)

    def _signal(self, sig: signal.Signals) -> None:
        if self.proc is None or self.proc.poll() is not None:
            raise StrongSwanError(f"{self.name} is not running")
        signal_and_wait(self.proc.pid, sig)

    def __enter__(self) -> StrongSwan:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- logs ------------------------------------------------------------------
    def log_text(self) -> str:
        """The whole charon log so far."""
        return read_text(self.log_path, limit=64 << 20)

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(read_text(self.log_path).splitlines()[-lines:])

    # -- swanctl ---------------------------------------------------------------
    def swanctl(
        self, *args: str, timeout: float = 10.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run `swanctl ARGS --uri <this charon>` in the namespace."""
        argv = [SWANCTL, *args, "--uri", self.uri]
        try:
            proc = self.ns.run(argv, timeout=timeout, check=False, env=self._env())
        except NetnsError as exc:
            raise StrongSwanError(f"{exc}\n--- {self.name} log ---\n{self.log_tail()}") from exc
        if check and proc.returncode != 0:
            raise StrongSwanError(
                f"swanctl {' '.join(args)} failed ({proc.returncode}) on {self.name}:\n"
                f"{proc.stdout}{proc.stderr}\n--- {self.name} log ---\n{self.log_tail()}"
            )
        return proc

    def load(
        self,
        connections: Sequence[Connection] = (),
        psks: Sequence[Psk] = (),
        ppks: Sequence[Ppk] = (),
        *,
        private_keys: Sequence[str | Path] = (),
        cacerts: Sequence[str | Path] = (),
        crls: Sequence[str | Path] = (),
        extra: str = "",
        text: str | None = None,
    ) -> None:
        """Write swanctl.conf (from the builders, or `text` verbatim) and `--load-all`.

        Certificates named in the connections' cert slots, `cacerts`, `crls` and
        `private_keys` are copied into x509/, x509ca/, x509crl/ and private/ first.
        """
        for conn in connections:
            for path in (*conn.local_certs, *conn.remote_certs):
                shutil.copy(path, self.swanctl_dir / "x509" / Path(path).name)
            for path in conn.remote_cacerts:
                shutil.copy(path, self.swanctl_dir / "x509ca" / Path(path).name)
        for path in cacerts:
            shutil.copy(path, self.swanctl_dir / "x509ca" / Path(path).name)
        for path in private_keys:
            shutil.copy(path, self.swanctl_dir / "private" / Path(path).name)
        for path in crls:
            shutil.copy(path, self.swanctl_dir / "x509crl" / Path(path).name)
        conf = text if text is not None else swanctl_conf(connections, psks, ppks, extra)
        (self.swanctl_dir / "swanctl.conf").write_text(conf)
        self.swanctl("--load-all", "--noprompt", "--file", str(self.swanctl_dir / "swanctl.conf"))

    def initiate(
        self,
        child: str | None = None,
        ike: str | None = None,
        *,
        timeout: float = 10.0,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """`swanctl --initiate`; waits for the result (raises on failure if `check`)."""
        args = ["--initiate", "--timeout", str(max(1, math.ceil(timeout)))]
        if child:
            args += ["--child", child]
        if ike:
            args += ["--ike", ike]
        return self.swanctl(*args, timeout=timeout + 5, check=check)

    def terminate(
        self,
        ike: str | None = None,
        child: str | None = None,
        *,
        ike_id: int | None = None,
        child_id: int | None = None,
        force: bool = False,
        timeout: float = 10.0,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """`swanctl --terminate` an IKE or CHILD SA by name or unique id."""
        args = ["--terminate", "--timeout", str(max(1, math.ceil(timeout)))]
        for flag, val in (("--ike", ike), ("--child", child)):
            if val:
                args += [flag, val]
        for flag, num in (("--ike-id", ike_id), ("--child-id", child_id)):
            if num is not None:
                args += [flag, str(num)]
        if force:
            args.append("--force")
        return self.swanctl(*args, timeout=timeout + 5, check=check)

    def rekey(
        self,
        child: str | None = None,
        ike: str | None = None,
        *,
        reauth: bool = False,
        timeout: float = 10.0,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """`swanctl --rekey` (asynchronous in charon: poll list_sas() for the result)."""
        args = ["--rekey"]
        if child:
            args += ["--child", child]
        if ike:
            args += ["--ike", ike]
        if reauth:
            args.append("--reauth")
        return self.swanctl(*args, timeout=timeout, check=check)

    def list_sas(self, ike: str | None = None) -> list[dict[str, Any]]:
        """IKE SAs (optionally only those of connection `ike`); see parse_list_sas()."""
        args = ["--list-sas", "--raw"]
        if ike:
            args += ["--ike", ike]
        return parse_list_sas(self.swanctl(*args).stdout)

    def list_conns(self) -> dict[str, dict[str, Any]]:
        """Loaded connections as charon reports them (`swanctl --list-conns --raw`)."""
        return parse_list_conns(self.swanctl("--list-conns", "--raw").stdout)

    def ike_sa(self, ike: str | None = None, state: str | None = "ESTABLISHED") -> dict | None:
        """The first IKE SA (of connection `ike`, in `state` unless None), or None."""
        for sa in self.list_sas(ike):
            if state is None or sa.get("state") == state:
                return sa
        return None

    def wait_ike_sa(
        self, ike: str | None = None, state: str = "ESTABLISHED", *, timeout: float = 10.0
    ) -> dict[str, Any]:
        """Wait until an IKE SA (of `ike`) is in `state`; return it."""
        try:
            return wait_for(
                lambda: self.ike_sa(ike, state), timeout=timeout, what=f"IKE SA {ike} {state}"
            )
        except TimeoutError as exc:
            raise StrongSwanError(f"{exc}\n--- {self.name} log ---\n{self.log_tail()}") from exc

    def wait_child_sa(
        self, child: str, state: str = "INSTALLED", *, timeout: float = 10.0
    ) -> dict[str, Any]:
        """Wait until a CHILD SA of config `child` is in `state`; return it."""

        def find() -> dict[str, Any] | None:
            for sa in self.list_sas():
                for c in sa["child-sas"]:
                    if c.get("name") == child and c.get("state") == state:
                        return c
            return None

        try:
            return wait_for(find, timeout=timeout, what=f"CHILD SA {child} {state}")
        except TimeoutError as exc:
            raise StrongSwanError(f"{exc}\n--- {self.name} log ---\n{self.log_tail()}") from exc


def host(addr: str) -> str:
    """Normalise an address as charon prints it (compressed IPv6)."""
    return str(ipaddress.ip_address(addr))


def net_to_net(
    local_addrs: str = "192.0.2.2",
    remote_addrs: str = "192.0.2.1",
    local_id: str = "a.peer.example",
    remote_id: str = "gw.example",
    *,
    name: str = "c",
    esp_proposals: str = "aes256gcm16",
) -> Connection:
    """The peer side every PSK responder test starts from: connection `c`, child `c-net`
    10.200.0.0/24 <-> 10.100.0.0/24, AES-GCM-256 with x25519."""
    return Connection(
        name=name,
        local_addrs=local_addrs,
        remote_addrs=remote_addrs,
        local_id=local_id,
        remote_id=remote_id,
        proposals="aes256gcm16-prfsha384-x25519",
        children=[
            Child(
                name=f"{name}-net",
                local_ts="10.200.0.0/24",
                remote_ts="10.100.0.0/24",
                esp_proposals=esp_proposals,
            )
        ],
    )
