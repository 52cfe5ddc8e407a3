"""Fixtures for the kernel tier: the real kernel, programmed through netlink in a namespace.

    netns        a fresh network namespace (tests/harness/netns.py), deleted after the test
    xfrm_socket  an XfrmSocket inside `netns`
    strace       the strace binary (the byte-for-byte tests capture iproute2's requests)

A missing prerequisite (root, iproute2, strace) skips the test naming it, and
fails it under `CI=true` (tests/harness/prerequisites.py).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from ikefarm.services.kernel.xfrm import XfrmSocket
from tests.harness import netns as harness_netns
from tests.harness import prerequisites
from tests.harness.netns import Namespace
from tests.kernel.capture import strace_path


def _require_netns() -> None:
    if os.geteuid() != 0:
        prerequisites.missing("needs root: kernel tests create network namespaces")
    if shutil.which("ip") is None:
        prerequisites.missing("needs ip: run ops/install-test-peers (iproute2)")


@pytest.fixture(scope="session")
def _reaped_stale_namespaces() -> Iterator[None]:
    _require_netns()
    harness_netns.reap_stale()
    yield
    harness_netns.cleanup_all()


@pytest.fixture
def netns(_reaped_stale_namespaces: None) -> Iterator[Namespace]:
    with Namespace("kernel") as ns:
        yield ns


@pytest.fixture
def xfrm_socket(netns: Namespace) -> Iterator[XfrmSocket]:
    sock = XfrmSocket(netns.name)
    try:
        yield sock
    finally:
        sock.close()


@pytest.fixture
def strace() -> str:
    path = strace_path()
    if path is None:
        prerequisites.missing("needs strace: run ops/install-test-peers (strace)")
    return path
