"""SA lifetimes: rekey before expiry, with the margin and jitter of the policy templates."""

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
