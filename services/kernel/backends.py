"""Which kernel backend runs: `[kernel] backend` and, for `auto`, a probe of the kernel.

- `memory`: the SAD/SPD in a dict, a test double (tests and hosts without any dataplane).
- `netlink`: Linux XFRM (netlink.py).
- `userspace`: the userspace ESP dataplane, loaded lazily from `USERSPACE_MODULE`
  (`USERSPACE_CLASS`); where it is absent it is refused as not implemented.
- `auto` (the default): `netlink` when the kernel accepts an ESP state, else
  `userspace`. The probe adds one throwaway ESP state (AES-GCM, a random SPI
  toward a TEST-NET address) in the service's network namespace and deletes it
  at once; its answer is cached for the life of the process.
"""

from __future__ import annotations

import importlib
import secrets
from dataclasses import dataclass
from functools import cache
from typing import Any

from ikefarm.services.kernel import xfrm

BACKENDS = ("auto", "netlink", "userspace", "memory")
USERSPACE_MODULE = "ikefarm.services.kernel.userspace"
USERSPACE_CLASS = "UserspaceKernel"
PROBE_SRC = "192.0.2.1"  # RFC 5737 TEST-NET-1: never a real peer
PROBE_DST = "192.0.2.2"
USERSPACE_NOT_IMPLEMENTED = (
    'userspace backend not implemented yet; use backend = "netlink" on a kernel with ESP '
    'states, or backend = "memory" (a test double that protects no packet)'
)


class BackendUnavailable(Exception):
    """The chosen backend cannot run here; the sentence says why and what to use instead."""


@dataclass(frozen=True)
class Choice:
    """The backend to run and why (logged at level 1 when the service starts)."""

    backend: str
    reason: str


@cache
def probe_esp(netns: str | None = None) -> tuple[bool, str]:
    """(accepted, why): can this kernel hold an ESP state? Leaves nothing behind."""
    spi = 0xC0000000 | secrets.randbits(30)
    spec = xfrm.SaSpec(
        src=PROBE_SRC,
        dst=PROBE_DST,
        spi=spi,
        reqid=0,
        aead=xfrm.Algorithm("rfc4106(gcm(aes))", secrets.token_bytes(20), 128),
    )
    try:
        with xfrm.XfrmSocket(netns) as sock:
            try:
                sock.add_sa(spec)
            except xfrm.XfrmError as refused:
                return False, str(refused)
            try:
                sock.delete_sa(PROBE_SRC, PROBE_DST, spi)
            except xfrm.XfrmError as exc:
                return True, f"the kernel took an ESP state (removing the probe: {exc})"
            return True, "the kernel took an ESP state (probe added and removed)"
    except OSError as exc:
        return False, f"no XFRM netlink socket: {exc}"


def userspace_class() -> type[Any]:
    """The userspace backend's class, imported only when it is asked for."""
    try:
        module = importlib.import_module(USERSPACE_MODULE)
        return getattr(module, USERSPACE_CLASS)  # type: ignore[no-any-return]
    except (ImportError, AttributeError):
        raise BackendUnavailable(USERSPACE_NOT_IMPLEMENTED) from None


def choose(configured: str, netns: str | None = None) -> Choice:
    """The backend for `[kernel] backend = configured`; raises BackendUnavailable."""
    if configured not in BACKENDS:
        raise BackendUnavailable(f"unknown kernel backend {configured!r}")
    if configured == "auto":
        accepted, why = probe_esp(netns)
        if accepted:
            return Choice("netlink", f"auto: {why}")
        choice = Choice("userspace", f"auto: {why}")
        try:
            userspace_class()
        except BackendUnavailable:
            raise BackendUnavailable(
                f"auto chose the userspace backend ({why}), but it is not implemented yet; "
                'set backend = "memory" (a test double that protects no packet) meanwhile'
            ) from None
        return choice
    if configured == "userspace":
        userspace_class()
    return Choice(configured, "configured")
