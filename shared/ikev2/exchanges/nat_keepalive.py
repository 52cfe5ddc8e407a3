"""NAT keepalives (RFC 3948 2.3, RFC 7296 2.23): keep the NAT mapping in front of us open.

Only the side behind a NAT sends them (`IkeSa.nat_local`: the peer's
NAT_DETECTION_DESTINATION_IP hash did not match our address), from the NAT-T
port the SA floated to: a single 0xFF octet, without the non-ESP marker, every
`INTERVAL` seconds (20 s, the RFC's suggestion and strongSwan's default). The
peer's ingress drops them as keepalives; ours does the same with theirs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ikefarm.shared.ikev2.effects import Effect, SendKeepalive
from ikefarm.shared.ikev2.sa import IkeSa, IkeSaState

if TYPE_CHECKING:
    from ikefarm.shared.ikev2.engine import IkeEngine

INTERVAL = 20.0


def deadline(sa: IkeSa) -> float | None:
    if not sa.nat_local or sa.established_at is None:
        return None
    if sa.state not in (IkeSaState.ESTABLISHED, IkeSaState.REKEYING):
        return None
    due = sa.nat_keepalive_at
    return due if due is not None else sa.established_at + INTERVAL


def on_timer(engine: IkeEngine, sa: IkeSa, now: float) -> list[Effect]:
    due = deadline(sa)
    if due is None or now < due:
        return []
    sa.nat_keepalive_at = now + INTERVAL
    if sa.local.port != engine.policy.natt_port:
        return []  # still on the IKE port: no NAT-T socket to send from (RFC 3948 2.3)
    engine.count("nat_keepalives_sent")
    return [SendKeepalive(sa.local, sa.remote)]
