"""IKE workers: run the IKEv2 engine and own the IKE SAs of their shard."""

from __future__ import annotations

from ikefarm.shared.bus.runtime import ServiceBase


class IkeService(ServiceBase):
    name = "ike"
    subsystem = "ike"
    description = "ikefarm ike worker: IKEv2 negotiation for one SPI shard"
