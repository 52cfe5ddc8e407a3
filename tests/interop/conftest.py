"""Fixtures for interop tests: namespaces and real IKE peers, all cleaned up.

    netns_pair          two linked namespaces, "gw" and "peer" (see NetnsPair)
    strongswan_factory  make(ns, name="strongswan", *, start=True, **opts) -> StrongSwan
    libreswan_factory   make(ns, name="libreswan", *, start=True, **opts) -> Libreswan
    freeradius_factory  make(ns, *, start=True, **FreeRadius options) -> FreeRadius

A factory skips the test (saying what is missing and how to install it) when
its peer, root, or a tool is missing; under `CI=true` it fails the test instead
(tests/harness/prerequisites.py): CI runs ops/install-test-peers first, so a
missing prerequisite there is a broken run, not a pass. When a test fails, the
tail of every peer's log is attached to its report.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

_REPO = Path(__file__).resolve().parents[2]
if str(_REPO) not in sys.path:  # makes `tests.harness` importable without an install
    sys.path.insert(0, str(_REPO))

from tests.harness import freeradius, libreswan, netns, prerequisites, strongswan  # noqa: E402
from tests.harness.freeradius import FreeRadius  # noqa: E402
from tests.harness.gateway import Gateway  # noqa: E402
from tests.harness.libreswan import Libreswan  # noqa: E402
from tests.harness.netns import Namespace, NetnsPair  # noqa: E402
from tests.harness.strongswan import StrongSwan  # noqa: E402

_PEERS = pytest.StashKey[list[Any]]()


def _require_netns() -> None:
    if os.geteuid() != 0:
        prerequisites.missing("needs root: interop tests create network namespaces")
    for tool in ("ip", "unshare", "mount"):
        if shutil.which(tool) is None:
            prerequisites.missing(
                f"needs {tool}: run ops/install-test-peers (iproute2, util-linux)"
            )


@pytest.fixture(scope="session")
def _reaped_stale_namespaces() -> Iterator[None]:
    """Remove namespaces left by runs whose worker died; at the end, any of ours still open."""
    _require_netns()
    netns.reap_stale()
    yield
    netns.cleanup_all()


@pytest.fixture
def netns_pair(_reaped_stale_namespaces: None) -> Iterator[NetnsPair]:
    """Namespaces "gw" (192.0.2.1/24, 2001:db8::1/64) and "peer" (.2, ::2) on one veth."""
    pair = netns.make_pair()
    try:
        yield pair
    finally:
        pair.close()


def _register(request: pytest.FixtureRequest, peer: Any) -> None:
    request.node.stash.setdefault(_PEERS, []).append(peer)


@pytest.fixture
def strongswan_factory(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Callable[..., StrongSwan]]:
    """make(ns, name="strongswan", *, start=True, **StrongSwan options) -> StrongSwan."""
    _require_netns()
    reason = strongswan.missing()
    if reason:
        prerequisites.missing(reason)
    made: list[StrongSwan] = []

    def make(
        ns: Namespace, name: str = "strongswan", *, start: bool = True, **opts: Any
    ) -> StrongSwan:
        workdir = tmp_path / f"{name}-{len(made)}"
        workdir.mkdir(parents=True)
        ss = StrongSwan(ns, workdir, name=name, **opts)
        made.append(ss)
        _register(request, ss)
        if start:
            ss.start()
        return ss

    try:
        yield make
    finally:
        for ss in reversed(made):
            ss.stop()


@pytest.fixture
def gateway_factory(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Callable[..., Gateway]]:
    """make(ns, **Gateway.psk_responder options) -> a started `ikefarm up` in that namespace."""
    _require_netns()
    made: list[Gateway] = []

    def make(
        ns: Namespace, *, start: bool = True, config_text: str | None = None, **opts: Any
    ) -> Gateway:
        workdir = tmp_path / f"ikefarm-{len(made)}"
        if config_text is not None:
            gateway = Gateway(ns, workdir, config_text)
        else:
            gateway = Gateway.psk_responder(ns, workdir, **opts)
        made.append(gateway)
        _register(request, gateway)
        if start:
            gateway.start()
        return gateway

    try:
        yield make
    finally:
        for gateway in reversed(made):
            gateway.stop()


@pytest.fixture
def libreswan_factory(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Callable[..., Libreswan]]:
    """make(ns, name="libreswan", *, start=True, **Libreswan options) -> Libreswan."""
    _require_netns()
    reason = libreswan.missing()
    if reason:
        prerequisites.missing(reason)
    made: list[Libreswan] = []

    def make(
        ns: Namespace, name: str = "libreswan", *, start: bool = True, **opts: Any
    ) -> Libreswan:
        workdir = tmp_path / f"{name}-{len(made)}"
        workdir.mkdir(parents=True)
        lsw = Libreswan(ns, workdir, name=name, **opts)
        made.append(lsw)
        _register(request, lsw)
        if start:
            lsw.start()
        return lsw

    try:
        yield make
    finally:
        for lsw in reversed(made):
            lsw.stop()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """On failure, attach the last lines of each peer's log to the report."""
    report = yield
    if report.failed and report.when in ("setup", "call"):
        for peer in item.stash.get(_PEERS, []):
            try:
                tail = peer.log_tail(80)
            except Exception as exc:
                tail = f"(log unreadable: {exc})"
            report.sections.append((f"{peer.name} log ({peer.log_path})", tail))
    return report


@pytest.fixture
def freeradius_factory(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Callable[..., FreeRadius]]:
    """make(ns, *, start=True, **FreeRadius options) -> a FreeRADIUS in that namespace."""
    _require_netns()
    reason = freeradius.missing()
    if reason:
        prerequisites.missing(reason)
    made: list[FreeRadius] = []

    def make(ns: Namespace, *, start: bool = True, **opts: Any) -> FreeRadius:
        workdir = tmp_path / f"freeradius-{len(made)}"
        server = FreeRadius(ns, workdir, **opts)
        made.append(server)
        _register(request, server)
        if start:
            server.start()
        return server

    try:
        yield make
    finally:
        for server in reversed(made):
            server.stop()
