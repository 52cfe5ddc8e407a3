"""The UDP endpoints a farm's ingress serves, and the per-host lock that keeps them one farm's.

Ingress binds every endpoint with `SO_REUSEPORT` so that several ingress
processes of one farm (`[farm] ingress-instances`) share it, the kernel spreading
datagrams by flow. The same option would let a second farm, or a forgotten
`ikefarm up`, bind the same address and port without an error and take a share
of the peers' datagrams. So before binding, every ingress (and `ikefarm up`,
before it starts anything) takes the endpoint's lock (`claim`):

- the lock directory is per host and per user (`/run/ikefarm/endpoints` for root,
  else under `$XDG_RUNTIME_DIR` or `/tmp`): `SO_REUSEPORT` shares a port only
  between sockets of the same effective user, so no other user can be the other
  farm;
- each member of a farm holds a shared `flock` on the file named by the network
  namespace, port, address and the farm's id for as long as it lives; the kernel
  releases it when the process ends, however it ends, so a farm that died leaves
  nothing that blocks the next one;
- `claim` runs under an exclusive lock on the directory and refuses when a
  file of another farm for the same port and an overlapping address (equal, or
  either one the wildcard of its family) is still held; a file nobody holds is
  removed.

The farm id: `ikefarm up` makes one per run and hands it to its services in the
environment (`FARM_ID_ENV`); an ingress started alone uses the broker URL it
talks to (instances on one bus are one farm).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import ipaddress
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ikefarm.shared.config.loader import Config

FARM_ID_ENV = "IKEFARM_FARM_ID"
LOCK_DIR_ENV = "IKEFARM_ENDPOINT_LOCK_DIR"  # tests and unusual hosts; same for every farm
ROOT_LOCK_DIR = Path("/run/ikefarm/endpoints")


def canonical_address(address: str) -> str:
    """One spelling per address, so routes learned from workers match what sockets report."""
    return str(ipaddress.ip_address(address))


@dataclass(frozen=True)
class LocalEndpoint:
    address: str  # canonical spelling
    port: int
    natt: bool  # the NAT-T port: IKE after a non-ESP marker (RFC 3948 2.2)

    def __str__(self) -> str:
        return f"{self.address}[{self.port}]"


def listen_addresses(config: Config) -> list[str]:
    """`[ingress] listen` when set, else the distinct local-address of the enabled VPNs."""
    configured = config.ingress.listen
    if configured is not None:
        candidates = list(configured)
    else:
        candidates = [
            vpn.local_address
            for vpn in config.ike.vpn
            if vpn.enabled and vpn.local_address is not None
        ]
    seen: dict[str, None] = {}
    for address in candidates:
        seen.setdefault(canonical_address(address), None)
    return list(seen)


def local_endpoints(config: Config) -> list[LocalEndpoint]:
    """Every (address, port) to bind: ike-port and natt-port on each listen address."""
    ike_port = config.ingress.ike_port
    natt_port = config.ingress.natt_port
    ports = [ike_port] if ike_port == natt_port else [ike_port, natt_port]
    return [
        LocalEndpoint(address, port, natt=port == natt_port)
        for address in listen_addresses(config)
        for port in ports
    ]


class EndpointTaken(OSError):
    """Another farm serves an overlapping UDP endpoint."""

    def __init__(self, endpoint: str, holder: str) -> None:
        super().__init__(
            errno.EADDRINUSE,
            f"UDP {endpoint} is already served by another ikefarm farm ({holder}); stop that "
            "farm first or give this one other [ingress] listen addresses or ports",
        )
        self.endpoint = endpoint
        self.holder = holder


def lock_dir() -> Path:
    configured = os.environ.get(LOCK_DIR_ENV)
    if configured:
        return Path(configured)
    if os.geteuid() == 0:
        return ROOT_LOCK_DIR
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) if runtime else Path(tempfile.gettempdir()) / f"ikefarm-{os.geteuid()}"
    return base / "ikefarm" / "endpoints"


def farm_id(nats_url: str) -> str:
    """This process's farm: the id `ikefarm up` handed down, else the broker it talks to."""
    given = os.environ.get(FARM_ID_ENV)
    return given if given else f"bus {nats_url}"


def _namespace() -> str:
    """The network namespace: the same address and port in two namespaces never collide."""
    try:
        return f"net{os.stat('/proc/self/ns/net').st_ino}"
    except OSError:
        return "net"


def _farm_tag(farm: str) -> str:
    return hashlib.sha256(farm.encode()).hexdigest()[:16]


def _overlaps(ours: str, theirs: str) -> bool:
    if ours == theirs:
        return True
    try:
        mine, other = ipaddress.ip_address(ours), ipaddress.ip_address(theirs)
    except ValueError:
        return False
    return mine.version == other.version and (mine.is_unspecified or other.is_unspecified)


@dataclass(frozen=True)
class _Held:
    fd: int
    path: Path
    mutex: Path  # the lock directory, flock'ed while claims are checked


class EndpointClaim:
    """The shared locks this process holds on its farm's endpoints; `release` (or process
    exit) gives them up. The last member of a farm to release an endpoint removes its file."""

    def __init__(self) -> None:
        self._files: list[_Held] = []

    def release(self) -> None:
        for held in self._files:
            with contextlib.suppress(OSError):
                _release_one(held)
        self._files.clear()

    def __len__(self) -> int:
        return len(self._files)

    def paths(self) -> list[Path]:
        return [held.path for held in self._files]


def claim(
    endpoints: list[tuple[str, int]],
    farm: str,
    holder: str,
    directory: Path | None = None,
    into: EndpointClaim | None = None,
) -> EndpointClaim:
    """Hold every endpoint for `farm`, or raise `EndpointTaken` (holding none of them).

    `holder` describes this farm to the operator of the one refused (a pid, a state dir).
    """
    directory = directory or lock_dir()
    directory.mkdir(parents=True, exist_ok=True, mode=0o755)
    namespace = _namespace()
    tag = _farm_tag(farm)
    held = into if into is not None else EndpointClaim()
    taken: list[_Held] = []
    try:
        for address, port in endpoints:
            canonical = canonical_address(address)
            taken.append(_claim_one(directory, namespace, canonical, port, tag, holder))
    except BaseException:
        for one in taken:
            _release_one(one)
        raise
    held._files.extend(taken)
    return held


def _claim_one(
    directory: Path, namespace: str, address: str, port: int, tag: str, holder: str
) -> _Held:
    prefix = f"{namespace}-{port}-"
    mutex = os.open(directory, os.O_RDONLY)  # the directory itself: no file left behind
    try:
        fcntl.flock(mutex, fcntl.LOCK_EX)
        for entry in directory.iterdir():
            name = entry.name
            if not name.startswith(prefix):
                continue
            their_address, _, their_tag = name[len(prefix) :].rpartition(".")
            if their_tag == tag or not _overlaps(address, their_address):
                continue
            other = _still_held(entry)
            if other is not None:
                raise EndpointTaken(f"{address}[{port}]", other)
        path = directory / f"{prefix}{address}.{tag}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pass  # a member of this farm holds it already and said who the farm is
            else:  # the farm's first: say who holds it (under the mutex, so no one looks)
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps({"holder": holder, "pid": os.getpid()}).encode(), 0)
            fcntl.flock(fd, fcntl.LOCK_SH)
        except BaseException:
            os.close(fd)
            raise
        return _Held(fd, path, directory)
    finally:
        os.close(mutex)  # also releases the mutex


def _release_one(held: _Held) -> None:
    """Give up one endpoint; remove its file when no other member of the farm holds it."""
    try:
        mutex = os.open(held.mutex, os.O_RDONLY)
    except OSError:
        os.close(held.fd)
        return
    try:
        fcntl.flock(mutex, fcntl.LOCK_EX)
        try:
            fcntl.flock(held.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # no one else holds it
        except BlockingIOError:
            pass
        else:
            with contextlib.suppress(FileNotFoundError):
                held.path.unlink()
        os.close(held.fd)
    finally:
        os.close(mutex)


def _still_held(path: Path) -> str | None:
    """The holder's description when some process still holds `path`; else remove it."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                text = os.pread(fd, 4096, 0).decode(errors="replace")
                return str(json.loads(text).get("holder", "unknown"))
            except ValueError:
                return "unknown holder"
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # left by a farm that ended: nobody holds it
        return None
    finally:
        os.close(fd)
