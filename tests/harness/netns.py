"""Network namespaces, veth links and processes inside them, for interop tests.

Everything here shells out to iproute2 (`ip netns ...`, `ip link ...`): it is
what the humans debugging a failed test will type, and it needs no state in
this process beyond the list of namespaces and processes to clean up.

Names are unique across pytest-xdist workers and runs: ``ikf<worker>-<pid>-<n>``
(pid and counter in base 36), at most 15 characters so they can also name
interfaces. A namespace whose creating pid is dead is stale and
:func:`reap_stale` removes it (a worker killed by a timeout leaves them behind).

Every wait has a timeout; cleanup kills every process in the namespace (the
ones we started and any they forked) before deleting it, and never raises.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

PREFIX = "ikf"
IFNAMSIZ = 15  # usable characters in a Linux interface name
DEFAULT_TIMEOUT = 10.0

_counter = itertools.count()
_counter_lock = threading.Lock()
_live: dict[str, Namespace] = {}  # name -> namespace, for cleanup_all()


class NetnsError(RuntimeError):
    """A namespace operation failed; the message carries the command and its stderr."""


def _b36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = digits[r] + out
        if n == 0:
            return out


def _worker_tag() -> str:
    """`gw3` -> `3`, outside xdist -> `m` (master)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    m = re.fullmatch(r"gw(\d+)", worker)
    return m.group(1) if m else "m"


def unique_name(prefix: str = PREFIX) -> str:
    """A namespace/interface name unique to this worker, pid and call (<= 15 chars)."""
    with _counter_lock:
        n = next(_counter)
    name = f"{prefix}{_worker_tag()}-{_b36(os.getpid())}-{_b36(n)}"
    if len(name) > IFNAMSIZ:
        raise NetnsError(f"namespace name {name!r} is longer than {IFNAMSIZ} characters")
    return name


_NAME_RE = re.compile(rf"^{PREFIX}(?:\d+|m)-([0-9a-z]+)-[0-9a-z]+$")


def _cmd(
    argv: Sequence[str],
    *,
    timeout: float = DEFAULT_TIMEOUT,
    check: bool = True,
    input: str | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            env=dict(env) if env is not None else None,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise NetnsError(f"timed out after {timeout}s: {' '.join(argv)}") from exc
    if check and proc.returncode != 0:
        raise NetnsError(
            f"exit {proc.returncode}: {' '.join(argv)}\n"
            f"stdout: {proc.stdout.strip()}\nstderr: {proc.stderr.strip()}"
        )
    return proc


def list_namespaces() -> list[str]:
    """Names of all named network namespaces on the host (`ip netns list`)."""
    out = _cmd(["ip", "netns", "list"]).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def namespace_pids(name: str) -> list[int]:
    """Pids of every process whose network namespace is `name` (empty if it is gone)."""
    proc = _cmd(["ip", "netns", "pids", name], check=False)
    if proc.returncode != 0:
        return []
    return [int(tok) for tok in proc.stdout.split() if tok.isdigit()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_pids(pids: Iterable[int], timeout: float = 3.0) -> None:
    """SIGTERM, then SIGKILL whatever is still alive after `timeout`."""
    pids = [p for p in pids if p != os.getpid()]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)  # a SIGSTOPped process cannot act on SIGTERM
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_pid_alive(p) for p in pids):
        time.sleep(0.05)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _delete_namespace(name: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        pids = namespace_pids(name)
        if not pids:
            break
        _kill_pids(pids, timeout=1.0)
        if time.monotonic() > deadline:
            break
    _cmd(["ip", "netns", "delete", name], check=False)


def reap_stale() -> list[str]:
    """Delete harness namespaces whose creating process is dead; return their names."""
    reaped = []
    for name in list_namespaces():
        m = _NAME_RE.match(name)
        if not m:
            continue
        pid = int(m.group(1), 36)
        if pid == os.getpid() or _pid_alive(pid):
            continue
        _delete_namespace(name)
        reaped.append(name)
    return reaped


def cleanup_all() -> None:
    """Close every namespace this process still has open (last-resort fixture cleanup)."""
    for ns in list(_live.values()):
        ns.close()


@dataclass
class Namespace:
    """A named network namespace with `lo` up. Use as a context manager or call close().

    `label` is only for humans (it shows in the repr); the kernel-visible
    name is :attr:`name`, unique per worker, pid and call.
    """

    label: str = "ns"
    name: str = field(default_factory=unique_name)
    procs: list[subprocess.Popen[Any]] = field(default_factory=list, repr=False)
    closed: bool = field(default=False, repr=False)
    _created: bool = field(default=False, repr=False)
    _ifcount: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        _cmd(["ip", "netns", "add", self.name])
        self._created = True
        _live[self.name] = self
        try:
            self.run(["ip", "link", "set", "lo", "up"])
        except BaseException:
            self.close()
            raise

    # -- context manager ---------------------------------------------------
    def __enter__(self) -> Namespace:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- running things ----------------------------------------------------
    def argv(self, argv: Sequence[str]) -> list[str]:
        """`argv` prefixed so it runs inside this namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float = DEFAULT_TIMEOUT,
        check: bool = True,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv` in the namespace, capture text output, raise NetnsError on failure."""
        return _cmd(self.argv(argv), timeout=timeout, check=check, input=input, env=env)

    def popen(
        self,
        argv: Sequence[str],
        *,
        stdout: int | IO[Any] | None = subprocess.DEVNULL,
        stderr: int | IO[Any] | None = subprocess.STDOUT,
        stdin: int | IO[Any] | None = subprocess.DEVNULL,
        env: Mapping[str, str] | None = None,
        text: bool = False,
    ) -> subprocess.Popen[Any]:
        """Start `argv` in the namespace in its own session; it is killed on close()."""
        proc = subprocess.Popen(
            self.argv(argv),
            stdout=stdout,
            stderr=stderr,
            stdin=stdin,
            env=dict(env) if env is not None else None,
            start_new_session=True,
            text=text,
        )
        self.procs.append(proc)
        return proc

    def pids(self) -> list[int]:
        """Every process currently in this namespace."""
        return namespace_pids(self.name)

    # -- addresses and links -----------------------------------------------
    def next_ifname(self) -> str:
        name = f"eth{self._ifcount}"
        self._ifcount += 1
        return name

    def add_address(self, ifname: str, cidr: str) -> None:
        """Add `cidr` to `ifname`; IPv6 addresses skip DAD so they are usable at once."""
        iface = ipaddress.ip_interface(cidr)
        argv = ["ip", "addr", "add", str(iface), "dev", ifname]
        if iface.version == 6:
            argv.append("nodad")
        self.run(argv)

    def addresses(self, ifname: str | None = None) -> list[str]:
        """Addresses (CIDR strings) configured in the namespace, optionally on one interface."""
        argv = ["ip", "-o", "addr", "show"]
        if ifname:
            argv += ["dev", ifname]
        out = self.run(argv).stdout
        return re.findall(r"\binet6? (\S+)", out)

    def ping(
        self, dst: str, *, src: str | None = None, count: int = 1, timeout: float = 5.0
    ) -> bool:
        """True if `dst` answers `count` pings within `timeout` seconds."""
        argv = ["ping", "-n", "-q", "-c", str(count), "-W", str(max(1, int(timeout)))]
        if src:
            argv += ["-I", src]
        argv.append(dst)
        proc = self.run(argv, timeout=timeout + count + 2, check=False)
        return proc.returncode == 0

    # -- UDP sockets ---------------------------------------------------------
    def udp_ports(self) -> set[int]:
        """Local UDP ports bound in this namespace (IPv4 and IPv6), from /proc/net/udp*."""
        out = self.run(["cat", "/proc/net/udp", "/proc/net/udp6"]).stdout
        return parse_proc_net_udp(out)

    def wait_udp_port(self, port: int, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Block until something binds UDP `port` in this namespace; TimeoutError if not."""
        deadline = time.monotonic() + timeout
        while True:
            if port in self.udp_ports():
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"UDP port {port} not bound in {self.name} after {timeout}s")
            time.sleep(0.05)

    # -- cleanup ---------------------------------------------------------------
    def close(self) -> None:
        """Kill every process in the namespace and delete it. Idempotent, never raises."""
        if self.closed:
            return
        self.closed = True
        _live.pop(self.name, None)
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGCONT)
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=3)
        if self._created:
            with contextlib.suppress(Exception):  # cleanup must go on
                _delete_namespace(self.name)


def parse_proc_net_udp(text: str) -> set[int]:
    """Local ports from the text of /proc/net/udp and /proc/net/udp6 (header lines skipped)."""
    ports: set[int] = set()
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 2 or ":" not in fields[1] or fields[0] == "sl":
            continue
        try:
            ports.add(int(fields[1].rsplit(":", 1)[1], 16))
        except ValueError:
            continue
    return ports


@dataclass(frozen=True)
class Veth:
    """One veth pair: `if_a` lives in `ns_a`, `if_b` in `ns_b`."""

    ns_a: Namespace
    ns_b: Namespace
    if_a: str
    if_b: str
    addrs_a: tuple[str, ...]
    addrs_b: tuple[str, ...]


def _with_prefix(addr: str, prefix: int | None) -> str:
    if "/" in addr:
        return str(ipaddress.ip_interface(addr))
    ip = ipaddress.ip_address(addr)
    if prefix is None:
        prefix = 24 if ip.version == 4 else 64
    return f"{ip}/{prefix}"


def _as_list(addrs: str | Sequence[str] | None) -> list[str]:
    if addrs is None:
        return []
    if isinstance(addrs, str):
        return [addrs]
    return list(addrs)


def link(
    ns_a: Namespace,
    ns_b: Namespace,
    addr_a: str | Sequence[str] | None = None,
    addr_b: str | Sequence[str] | None = None,
    prefix: int | None = None,
    *,
    name_a: str | None = None,
    name_b: str | None = None,
    mtu: int | None = None,
) -> Veth:
    """Join two namespaces with a veth pair, address both ends and bring them up.

    Addresses are one string or a list (IPv4 and IPv6 mixed); one without
    "/len" gets `prefix`, or /24 (IPv4) / /64 (IPv6) when `prefix` is None.
    The ends are created directly inside their namespaces, so their names
    (default `eth0`, `eth1`, ... per namespace) never clash on the host.
    """
    if_a = name_a or ns_a.next_ifname()
    if_b = name_b or ns_b.next_ifname()
    for ifname in (if_a, if_b):
        if len(ifname) > IFNAMSIZ:
            raise NetnsError(f"interface name {ifname!r} is longer than {IFNAMSIZ} characters")
    _cmd(
        [
            "ip", "link", "add", "name", if_a, "netns", ns_a.name, "type", "veth",
            "peer", "name", if_b, "netns", ns_b.name,
        ]
    )  # fmt: skip
    cidrs_a = [_with_prefix(a, prefix) for a in _as_list(addr_a)]
    cidrs_b = [_with_prefix(a, prefix) for a in _as_list(addr_b)]
    for ns, ifname, cidrs in ((ns_a, if_a, cidrs_a), (ns_b, if_b, cidrs_b)):
        if mtu:
            ns.run(["ip", "link", "set", ifname, "mtu", str(mtu)])
        for cidr in cidrs:
            ns.add_address(ifname, cidr)
        ns.run(["ip", "link", "set", ifname, "up"])
    return Veth(ns_a, ns_b, if_a, if_b, tuple(cidrs_a), tuple(cidrs_b))


GW_V4, PEER_V4 = "192.0.2.1", "192.0.2.2"
GW_V6, PEER_V6 = "2001:db8::1", "2001:db8::2"


@dataclass
class NetnsPair:
    """Namespaces "gw" (192.0.2.1/24, 2001:db8::1/64) and "peer" (.2 / ::2) on one veth."""

    gw: Namespace
    peer: Namespace
    link: Veth
    gw_v4: str = GW_V4
    peer_v4: str = PEER_V4
    gw_v6: str = GW_V6
    peer_v6: str = PEER_V6

    @property
    def names(self) -> list[str]:
        return [self.gw.name, self.peer.name]

    def close(self) -> None:
        """Kill everything in both namespaces and delete them (idempotent, never raises)."""
        self.peer.close()
        self.gw.close()

    def __enter__(self) -> NetnsPair:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_pair() -> NetnsPair:
    """Two fresh namespaces, "gw" and "peer", linked as NetnsPair describes."""
    gw = Namespace("gw")
    try:
        peer = Namespace("peer")
        try:
            veth = link(gw, peer, [GW_V4, GW_V6], [PEER_V4, PEER_V6])
        except BaseException:
            peer.close()
            raise
    except BaseException:
        gw.close()
        raise
    return NetnsPair(gw, peer, veth)


# Module-level spellings, for code that prefers functions over methods.
def run(
    ns: Namespace,
    argv: Sequence[str],
    *,
    timeout: float = DEFAULT_TIMEOUT,
    check: bool = True,
    input: str | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `argv` inside `ns` (see Namespace.run)."""
    return ns.run(argv, timeout=timeout, check=check, input=input, env=env)


def popen(ns: Namespace, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
    """Start `argv` inside `ns`; killed when `ns` closes (see Namespace.popen)."""
    return ns.popen(argv, **kwargs)


def wait_udp_port(ns: Namespace, port: int, *, timeout: float = DEFAULT_TIMEOUT) -> None:
    """Wait until UDP `port` is bound inside `ns` (see Namespace.wait_udp_port)."""
    ns.wait_udp_port(port, timeout=timeout)


def wait_for(
    predicate: Any, *, timeout: float = DEFAULT_TIMEOUT, interval: float = 0.1, what: str = ""
) -> Any:
    """Poll `predicate()` until it returns something truthy; return it or raise TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what or predicate!r}")
        time.sleep(interval)


def process_state(pid: int) -> str:
    """The one-letter state of `pid` from /proc (R, S, T for stopped, Z...), "" if gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return ""
    for line in status.splitlines():
        if line.startswith("State:"):
            return line.split()[1]
    return ""


def signal_and_wait(pid: int, sig: signal.Signals, *, timeout: float = 5.0) -> None:
    """Send SIGSTOP/SIGCONT to `pid` and wait until /proc shows it stopped/running."""
    os.kill(pid, sig)
    if sig == signal.SIGSTOP:
        wait_for(
            lambda: process_state(pid) in ("T", "t"),
            timeout=timeout,
            interval=0.01,
            what=f"pid {pid} to stop",
        )
    elif sig == signal.SIGCONT:
        wait_for(
            lambda: process_state(pid) not in ("T", "t"),
            timeout=timeout,
            interval=0.01,
            what=f"pid {pid} to continue",
        )


def read_text(path: str | Path, limit: int = 1 << 20) -> str:
    """The last `limit` bytes of a (log) file as text, '' if it does not exist."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - limit))
            return fh.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""
