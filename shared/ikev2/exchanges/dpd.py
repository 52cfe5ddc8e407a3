"""Dead peer detection (seed 004, RFC 7296 2.4): liveness checks and dpd-action.

If nothing protected has come from the peer for dpd-delay, an empty
INFORMATIONAL request is sent; when its retransmissions run out the peer is
dead and each child's dpd-action (clear, restart, trap) is applied.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ikefarm.shared.ikev2.effects import Effect
from ikefarm.shared.ikev2.sa import IkeSa

if TYPE_CHECKING:
    from ikefarm.shared.ikev2.engine import IkeEngine


def on_timer(engine: IkeEngine, sa: IkeSa, now: float) -> list[Effect]:
    return []


def deadline(sa: IkeSa) -> float | None:
    return None


def peer_dead(engine: IkeEngine, sa: IkeSa, now: float) -> list[Effect]:
    return engine.remove_sa(sa, "peer not responding", now)
