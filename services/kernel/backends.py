"""Which kernel backend runs: `[kernel] backend` and, for `auto`, a probe of the kernel.

- `memory`: the SAD/SPD in a dict, a test double (tests and hosts without any dataplane).
- `netlink`: Linux XFRM (netlink.py).
- `userspace`: the userspace ESP dataplane (userspace.py, docs/esp-dataplane.md).
- `auto` (the default): `netlink` when the kernel accepts an ESP state, else
  `userspace`. The probe adds one throwaway ESP state (AES-GCM, a random SPI
  toward a TEST-NET address) in the service's network namespace and deletes it
  at once; its answer is cached for the life of the process.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from functools import cache

from ikefarm.services.kernel import xfrm

BACKENDS = ("auto", "netlink", "userspace", "memory")
PROBE_SRC = "192.0.2.1"  # RFC 5737 TEST-NET-1: never a real peer
PROBE_DST = "192.0.2.2"


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


def choose(configured: str, netns: str | None = None) -> Choice:
    """The backend for `[kernel] backend = configured`; raises BackendUnavailable."""
    if configured not in BACKENDS:
        raise BackendUnavailable(f"unknown kernel backend {configured!r}")
    if configured == "auto":
        accepted, why = probe_esp(netns)
        if accepted:
            return Choice("netlink", f"auto: {why}")
        return Choice("userspace", f"auto: {why}")
    return Choice(configured, "configured")
