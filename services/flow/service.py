"""Flow: the flow-session table and its aging (Junos SRX semantics, seed 003)."""

from __future__ import annotations

from ikefarm.shared.bus.runtime import ServiceBase


class FlowService(ServiceBase):
    name = "flow"
    subsystem = "manager"
    description = "ikefarm flow: session table and aging"
