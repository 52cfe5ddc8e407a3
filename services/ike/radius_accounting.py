"""RADIUS accounting of IKE SAs (RFC 2866; docs/radius.md): the ike worker's side.

With `[ike.radius] accounting = true`, every IKE SA of a VPN that authenticates its peers
by `eap-radius` is accounted: Accounting-Request Start when it is established (with the
assigned addresses), Interim-Update every `interim-interval` seconds (0: none), Stop with
the session time, the counters and a cause when it goes. The keystore sends the requests
(it holds the RADIUS shared secrets): this module only says what to send, over
`subjects.KEYSTORE_RADIUS_ACCOUNTING`.

Acct-Session-Id is the IKE SA's first SPI pair (as the EAP conversation named it), kept
across IKE rekeys, which move the session to the new SA. Counters are the sums of the
SA's child SAs as the kernel service last reported them (docs/kernel-counters.md); a
child that is gone (rekeyed, deleted) counts with what was last seen of it at a report.

The state is one small record per accounted SA; an interim tick walks the records
(not the packets): nothing here runs per datagram.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

from ikefarm.proto.messages import RadiusAccounting
from ikefarm.shared.ikev2.effects import SaEvent
from ikefarm.shared.ikev2.exchanges.auth_methods import EAP_RADIUS
from ikefarm.shared.ikev2.sa import IkeSa

# why an IKE SA went (shared/ikev2 remove_sa reasons) -> Acct-Terminate-Cause (RFC 2866 5.10)
_CAUSES = (
    ("deleted by peer", "user-request"),
    ("peer not responding", "lost-carrier"),
    ("delete not answered", "lost-carrier"),
    ("initial contact", "user-request"),
    ("expired", "session-timeout"),
    ("lifetime", "session-timeout"),
    ("command", "admin-reset"),
    ("cli", "admin-reset"),
)


def terminate_cause(reason: str) -> str:
    for words, cause in _CAUSES:
        if words in reason:
            return cause
    return "nas-request"


@dataclass
class Session:
    session: str
    identity: str
    calling_station: str
    called_station: str
    addresses: list[str]
    started: float
    sa: IkeSa | None  # the SA that carries the session (a rekey moves it)
    # child unique id -> (octets in, octets out, packets in, packets out) last seen
    seen: dict[int, tuple[int, int, int, int]] = field(default_factory=dict)


Send = Callable[[RadiusAccounting], Awaitable[None]]


class Accounting:
    def __init__(
        self,
        vpns_accounted: set[str],
        interim: float,
        send: Send,
        counters: Any,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.vpns = vpns_accounted
        self.interim = interim
        self._send = send
        self.counters = counters
        self.sessions: dict[int, Session] = {}  # by the IKE SA's unique id
        self._clock = clock
        self._tasks: set[asyncio.Task[None]] = set()

    @classmethod
    def from_config(cls, config: Any, send: Send, counters: Any) -> Accounting | None:
        if not config.ike.radius.accounting:
            return None
        vpns = {
            vpn.name
            for vpn in config.ike.vpn
            if vpn.ike_policy.remote_auth_method == EAP_RADIUS and vpn.enabled
        }
        return cls(vpns, float(config.ike.radius.interim_interval), send, counters)

    def _spawn(self, message: RadiusAccounting) -> None:
        task = asyncio.create_task(self._send(message))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def observe(self, event: SaEvent, sa_of: Callable[[SaEvent], IkeSa | None]) -> None:
        """An SA event of the engine: start, move or stop a session (`sa_of`: the SA an
        established or rekeyed event names)."""
        if event.kind == "ike-established" and event.vpn in self.vpns:
            detail = event.detail
            session = Session(
                session=f"{detail.get('spi_i', '')}-{detail.get('spi_r', '')}",
                identity=str(detail.get("eap_identity") or detail.get("remote_id", "")),
                calling_station=str(detail.get("remote", "")),
                called_station=str(detail.get("local", "")),
                addresses=list(detail.get("remote_vips", [])),
                started=self._clock(),
                sa=sa_of(event),
            )
            self.sessions[event.ike_unique_id] = session
            self.counters["radius_accounting.start"] += 1
            self._spawn(self._message("start", session))
        elif event.kind == "ike-rekeyed":
            old, new = event.detail.get("old"), event.detail.get("new")
            moved = self.sessions.pop(old, None) if isinstance(old, int) else None
            if moved is not None and isinstance(new, int):
                moved.sa = sa_of(event) or moved.sa
                self.sessions[new] = moved
        elif event.kind == "ike-deleted":
            session = self.sessions.pop(event.ike_unique_id, None)
            if session is None:
                return
            reason = str(event.detail.get("reason", ""))
            if reason == "rekeyed":
                return
            self.counters["radius_accounting.stop"] += 1
            message = self._message("stop", session)
            self._spawn(replace(message, terminate_cause=terminate_cause(reason)))

    def _message(self, status: str, session: Session) -> RadiusAccounting:
        if session.sa is not None:
            for child in session.sa.children:
                session.seen[child.unique_id] = (
                    child.bytes_in,
                    child.bytes_out,
                    child.packets_in,
                    child.packets_out,
                )
        octets_in = sum(c[0] for c in session.seen.values())
        octets_out = sum(c[1] for c in session.seen.values())
        packets_in = sum(c[2] for c in session.seen.values())
        packets_out = sum(c[3] for c in session.seen.values())
        return RadiusAccounting(
            status=status,
            session=session.session,
            identity=session.identity,
            calling_station=session.calling_station,
            called_station=session.called_station,
            framed_addresses=list(session.addresses),
            session_time=int(self._clock() - session.started),
            input_octets=octets_in,
            output_octets=octets_out,
            input_packets=packets_in,
            output_packets=packets_out,
        )

    def interim_updates(self) -> int:
        """Interim-Update for every session (one tick of the interval)."""
        for session in list(self.sessions.values()):
            self._spawn(self._message("interim", session))
        self.counters["radius_accounting.interim"] += len(self.sessions)
        return len(self.sessions)

    async def run_interim(self) -> None:
        if self.interim <= 0:
            return
        while True:
            await asyncio.sleep(self.interim)
            self.interim_updates()
