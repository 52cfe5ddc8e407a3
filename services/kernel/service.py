"""Kernel: programs child SAs and policies (XFRM through pyroute2, or in memory)."""

from __future__ import annotations

from ikefarm.shared.bus.runtime import ServiceBase


class KernelService(ServiceBase):
    name = "kernel"
    subsystem = "kernel"
    description = "ikefarm kernel: SAD/SPD, routes, VIPs"
