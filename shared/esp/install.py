"""The ESP SA pair of a child SA the IKEv2 engine negotiated (`ChildSaInstall`).

Also from a `ChildInstall` the kernel service opened (same field names).
The engine has already put each direction's keys in place (encr/integ_key_in
protect what the peer sends us, RFC 7296 2.17), so this only maps fields.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from ikefarm.proto.messages import ChildInstall
from ikefarm.shared.esp.sa import InboundSa, Lifetime, OutboundSa
from ikefarm.shared.esp.transforms import EspTransform
from ikefarm.shared.ikev2.effects import ChildSaInstall

__all__ = ["sa_pair"]


def sa_pair(
    install: ChildSaInstall | ChildInstall,
    *,
    lifetime_in: Lifetime | None = None,
    lifetime_out: Lifetime | None = None,
    random: Callable[[int], bytes] = os.urandom,
) -> tuple[InboundSa, OutboundSa]:
    """(inbound, outbound) ESP SAs for `install`; only tunnel-mode ESP is implemented."""
    if install.protocol != "esp" or install.mode != "tunnel":
        raise ValueError(
            f"the userspace ESP codec implements tunnel-mode ESP only,"
            f" not {install.protocol} in {install.mode} mode"
        )
    transform = EspTransform(install.encr_id, install.encr_key_bits, install.integ_id)
    inbound = InboundSa(
        int.from_bytes(install.spi_in, "big"),
        transform,
        install.encr_key_in,
        install.integ_key_in,
        esn=install.esn,
        replay_window=install.replay_window,
        lifetime=lifetime_in,
    )
    outbound = OutboundSa(
        int.from_bytes(install.spi_out, "big"),
        transform,
        install.encr_key_out,
        install.integ_key_out,
        esn=install.esn,
        lifetime=lifetime_out,
        random=random,
    )
    return inbound, outbound
