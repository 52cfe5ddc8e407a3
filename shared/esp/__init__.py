"""A sans-I/O userspace ESP codec (RFC 4303 tunnel mode, RFC 3948 classification).

The kernel service's userspace backend runs it (services/kernel/userspace.py);
see docs/esp-dataplane.md.
"""

from ikefarm.shared.esp.install import sa_pair
from ikefarm.shared.esp.natt import UdpEncapKind, classify_udp_encap
from ikefarm.shared.esp.replay import ReplayWindow
from ikefarm.shared.esp.sa import (
    Dropped,
    DropReason,
    EncapsulationRefused,
    InboundSa,
    InboundSaTable,
    Lifetime,
    LifetimeEvent,
    OutboundSa,
    SaCounters,
    Unwrapped,
)
from ikefarm.shared.esp.transforms import EspTransform, UnsupportedEspTransform

__all__ = [
    "DropReason",
    "Dropped",
    "EncapsulationRefused",
    "EspTransform",
    "InboundSa",
    "InboundSaTable",
    "Lifetime",
    "LifetimeEvent",
    "OutboundSa",
    "ReplayWindow",
    "SaCounters",
    "UdpEncapKind",
    "UnsupportedEspTransform",
    "Unwrapped",
    "classify_udp_encap",
    "sa_pair",
]
