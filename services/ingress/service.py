"""Ingress: owns the UDP sockets (500/4500) and routes datagrams to ike workers."""

from __future__ import annotations

from ikefarm.shared.bus.runtime import ServiceBase


class IngressService(ServiceBase):
    name = "ingress"
    subsystem = "network"
    description = "ikefarm ingress: UDP 500/4500, NAT-T, DoS gating, routing by SPI shard"
