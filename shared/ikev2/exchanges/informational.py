"""INFORMATIONAL (RFC 7296 1.4, 1.5, 3.10.1): liveness, Delete of IKE and child SAs, both roles.

Responder: an empty request is a liveness check and gets an empty response. A
Delete of the IKE SA is acknowledged, then the SA and its children are removed.
A Delete of child SAs names the peer's inbound SPIs (our outbound); the response
names ours, as RFC 7296 1.4.1 asks, and unknown SPIs are ignored. When the
peer's Delete crosses ours for the same child, the child is removed while the
request is processed and the response leaves it out (1.4.1).

Initiator: `initiate_child_delete` / `initiate_ike_delete` queue a Delete behind
whatever request holds the window (window size 1, 2.3); the child is uninstalled
when the peer confirms, the IKE SA when the peer confirms or when the
retransmissions run out (then `dpd.peer_dead` sees the DELETING state and only
removes it). `send_liveness` sends the empty request DPD uses.

Notifications are information, never orders: INVALID_SPI (3.10.1) and any other
notify in an INFORMATIONAL are logged and counted, and nothing unprotected is
acted upon (the engine drops an unprotected message on an SA with keys).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ikefarm.shared.ikev2.constants import ExchangeType, NotifyType, ProtocolId
from ikefarm.shared.ikev2.effects import DeleteChildSa, Effect, Log, SaEvent
from ikefarm.shared.ikev2.exchanges import ike_rekey, mobike
from ikefarm.shared.ikev2.exchanges.task import Task
from ikefarm.shared.ikev2.message import Message
from ikefarm.shared.ikev2.payloads import DeletePayload, Payload
from ikefarm.shared.ikev2.sa import ChildSa, ChildSaState, IkeSa, IkeSaState

if TYPE_CHECKING:
    from ikefarm.shared.ikev2.engine import IkeEngine


# -- strongSwan-style lines (the seed's `flush` output and the level-0 audit log) ---------------


def _ts(selectors: list[Any]) -> str:
    return " ".join(str(s) for s in selectors)


def closing_child_line(child: ChildSa) -> str:
    """'closing CHILD_SA trunk{5} with SPIs cbeece64_i (0 bytes) ce0b1baf_o (0 bytes) and TS ...'"""
    return (
        f"closing CHILD_SA {child.name}{{{child.unique_id}}} with SPIs "
        f"{child.spi_in.hex()}_i (0 bytes) {child.spi_out.hex()}_o (0 bytes) "
        f"and TS {_ts(child.local_ts)} === {_ts(child.remote_ts)}"
    )


def ike_between(sa: IkeSa) -> str:
    """'192.0.2.1[localgw]...198.51.100.1[remotegw]' as strongSwan prints an IKE SA's ends."""
    local_id = str(sa.local_id) if sa.local_id is not None else "%any"
    remote_id = str(sa.remote_id) if sa.remote_id is not None else "%any"
    return f"{sa.local.address}[{local_id}]...{sa.remote.address}[{remote_id}]"


def ike_label(sa: IkeSa) -> str:
    return f"{sa.vpn.name if sa.vpn else '-'}[{sa.unique_id}]"


def deleting_ike_line(sa: IkeSa) -> str:
    """'deleting IKE_SA vpn-hq[5] between 192.0.2.1[localgw]...198.51.100.1[remotegw]'"""
    return f"deleting IKE_SA {ike_label(sa)} between {ike_between(sa)}"


def child_detail(child: ChildSa) -> dict[str, Any]:
    return {
        "name": child.name,
        "unique_id": child.unique_id,
        "spi_in": child.spi_in.hex(),
        "spi_out": child.spi_out.hex(),
    }


def successor_of(sa: IkeSa) -> IkeSa | None:
    """The IKE SA that replaced `sa` by a rekey (RFC 7296 2.18), if any."""
    return getattr(sa, "successor", None)


def _owner(sa: IkeSa, child: ChildSa) -> IkeSa | None:
    """The IKE SA holding `child` now: `sa`, or the SA that replaced it by a rekey."""
    current: IkeSa | None = sa
    while current is not None:
        if any(c is child for c in current.children):
            return current
        current = successor_of(current)
    return None


def _uninstall(sa: IkeSa, child: ChildSa, reason: str) -> list[Effect]:
    """Forget a child: the kernel deletes it, everyone hears of it."""
    child.state = ChildSaState.DELETED
    detail = {**child_detail(child), "reason": reason}
    return [
        DeleteChildSa(
            child.unique_id, child.policy.reqid, child.spi_in, child.spi_out, sa.local, sa.remote
        ),
        SaEvent("child-deleted", sa.unique_id, child.policy.vpn, detail),
        Log(0, "child", "child_sa_deleted", {"vpn": child.policy.vpn, **detail}),
    ]


def _note_notifies(engine: IkeEngine, sa: IkeSa, message: Message) -> list[Effect]:
    """Log and count the notifies of an INFORMATIONAL; none of them changes state here."""
    effects: list[Effect] = []
    for notify in message.notifies():
        if notify.notify_type == NotifyType.INVALID_SPI:
            # RFC 7296 3.10.1: the SPI of an ESP/AH packet the peer could not place. A hint
            # (it may be stale, crossed with a rekey or a delete): never acted upon.
            spi = bytes(notify.spi or notify.data[:4])
            known = sa.child_by_spi_out(spi) if len(spi) == 4 else None
            engine.count("invalid_spi_notified")
            effects.append(
                Log(
                    1,
                    "child",
                    "invalid_spi_notified",
                    {
                        "unique_id": sa.unique_id,
                        "spi": spi.hex(),
                        "child": known.unique_id if known is not None else None,
                    },
                )
            )
            continue
        if int(notify.notify_type) in mobike.MOBIKE_NOTIFIES | mobike.NATD_NOTIFIES:
            continue  # RFC 4555: mobike.respond acts on these
        name = _notify_name(notify.notify_type)
        engine.count(f"informational_notify.{name.lower()}")
        effects.append(
            Log(2, "ike", "informational_notify", {"unique_id": sa.unique_id, "notify": name})
        )
    return effects


def _notify_name(notify_type: int) -> str:
    try:
        return NotifyType(notify_type).name
    except ValueError:
        return f"NOTIFY_{notify_type}"


# -- responder ----------------------------------------------------------------------------------


def respond(engine: IkeEngine, sa: IkeSa, request: Message, now: float) -> list[Effect]:
    if not request.protected:  # the engine drops these first; never act on one (3.10.1)
        return engine.drop("unprotected_informational")
    noted = _note_notifies(engine, sa, request)
    deletes = request.get_all(DeletePayload)
    if any(d.protocol_id == ProtocolId.IKE for d in deletes):
        engine.count("ike_sa_deleted_by_peer")
        effects = noted + engine.respond(sa, request, [])
        if ike_rekey.deleted_by_peer_while_rekeying(engine, sa, now):
            return effects
        effects += engine.remove_sa(sa, "deleted by peer", now)
        return effects + run_after_delete(engine, sa, now)
    if not deletes and mobike.wants(sa, request):
        local, remote = engine.request_path or (sa.local, sa.remote)
        return noted + mobike.respond(engine, sa, request, local, remote, now)
    if not deletes:
        engine.count("liveness_answered")
        return noted + engine.respond(sa, request, [])

    answer: list[Payload] = []
    effects: list[Effect] = []
    for delete in deletes:
        if delete.protocol_id not in (ProtocolId.ESP, ProtocolId.AH):
            continue
        ours: list[bytes] = []
        for spi in delete.spis:
            child = sa.child_by_spi_out(spi)
            if child is None or child.state == ChildSaState.DELETED:
                engine.count("delete_unknown_child_spi")
                continue
            engine.count("child_sa_deleted_by_peer")
            if child.state == ChildSaState.DELETING:
                # our Delete of it crossed this one: remove it now, answer without it (1.4.1)
                engine.count("child_delete_collisions")
            else:
                ours.append(child.spi_in)
            effects += _uninstall(sa, child, "deleted by peer")
        if ours:
            answer.append(DeletePayload(delete.protocol_id, ours))
    sa.children = [c for c in sa.children if c.state != ChildSaState.DELETED]
    return noted + engine.respond(sa, request, answer) + effects


# -- initiator ----------------------------------------------------------------------------------


@dataclass(repr=False)
class LivenessTask(Task):
    """An empty INFORMATIONAL request (RFC 7296 1.4): the peer must answer it (DPD)."""

    name: ClassVar[str] = "dpd"
    exchange: ClassVar[ExchangeType] = ExchangeType.INFORMATIONAL

    def build(self, engine: IkeEngine, sa: IkeSa, now: float) -> list[Effect]:
        return engine.send_request(sa, ExchangeType.INFORMATIONAL, [], now, self)

    def process(self, engine: IkeEngine, sa: IkeSa, response: Message, now: float) -> list[Effect]:
        if not response.protected:
            return engine.drop("unprotected_informational")
        effects = _note_notifies(engine, sa, response)
        engine.count("liveness_confirmed")
        return effects + engine.request_done(sa, now)


@dataclass(repr=False)
class ChildDeleteTask(Task):
    """Our Delete of one child (RFC 7296 1.4.1); it is uninstalled when the peer confirms.
    Queued on the SA that held the child; `resolved` once it follows the child to the SA
    that replaced it by a rekey."""

    name: ClassVar[str] = "informational"
    exchange: ClassVar[ExchangeType] = ExchangeType.INFORMATIONAL

    child: ChildSa
    reason: str = "deleted"
    resolved: bool = False

    def build(self, engine: IkeEngine, sa: IkeSa, now: float) -> list[Effect]:
        if sa.local_spi not in engine.sas:
            return []
        child = self.child
        if not self.resolved:
            owner = _owner(sa, child)
            if owner is None or child.state == ChildSaState.DELETED:
                return engine.request_done(sa, now)
            if owner is not sa:  # the IKE SA was rekeyed meanwhile: the new one carries it
                moved = ChildDeleteTask(child, self.reason, resolved=True)
                return engine.queue_task(owner, moved, now) + engine.request_done(sa, now)
        if not any(c is child for c in sa.children) or child.state == ChildSaState.DELETED:
            return engine.request_done(sa, now)
        payloads: list[Payload] = [DeletePayload(ProtocolId.ESP, [child.spi_in])]
        return engine.send_request(sa, ExchangeType.INFORMATIONAL, payloads, now, self)

    def process(self, engine: IkeEngine, sa: IkeSa, response: Message, now: float) -> list[Effect]:
        if not response.protected:
            return engine.drop("unprotected_informational")
        effects = _note_notifies(engine, sa, response)
        child = self.child
        if any(c is child for c in sa.children) and child.state != ChildSaState.DELETED:
            engine.count("child_sa_deleted_by_us")
            effects += _uninstall(sa, child, self.reason)
        sa.children = [c for c in sa.children if c.state != ChildSaState.DELETED]
        return effects + engine.request_done(sa, now)


@dataclass(repr=False)
class IkeDeleteTask(Task):
    """Our Delete of the IKE SA and so its children (RFC 7296 1.4.1)."""

    name: ClassVar[str] = "informational"
    exchange: ClassVar[ExchangeType] = ExchangeType.INFORMATIONAL

    reason: str = "deleted"

    def build(self, engine: IkeEngine, sa: IkeSa, now: float) -> list[Effect]:
        if sa.local_spi not in engine.sas:
            return []
        sa.state = IkeSaState.DELETING
        payloads: list[Payload] = [DeletePayload(ProtocolId.IKE, [])]
        return engine.send_request(sa, ExchangeType.INFORMATIONAL, payloads, now, self)

    def process(self, engine: IkeEngine, sa: IkeSa, response: Message, now: float) -> list[Effect]:
        if not response.protected:
            return engine.drop("unprotected_informational")
        effects = _note_notifies(engine, sa, response)
        engine.count("ike_sa_deleted_by_us")
        sa.outstanding = None
        effects += engine.remove_sa(sa, self.reason, now)
        return effects + run_after_delete(engine, sa, now)


def initiate_child_delete(
    engine: IkeEngine, sa: IkeSa, child: ChildSa, now: float, reason: str = "deleted"
) -> list[Effect]:
    """Delete one child with the peer (RFC 7296 1.4.1); uninstalled when the peer confirms."""
    if child.state in (ChildSaState.DELETING, ChildSaState.DELETED):
        return []
    child.state = ChildSaState.DELETING
    effects: list[Effect] = [
        Log(
            0,
            "child",
            "closing_child_sa",
            {"vpn": child.policy.vpn, **child_detail(child), "line": closing_child_line(child)},
        )
    ]
    return effects + engine.queue_task(sa, ChildDeleteTask(child, reason), now)


def initiate_ike_delete(
    engine: IkeEngine, sa: IkeSa, now: float, reason: str, then: Task | None = None
) -> list[Effect]:
    """Delete the IKE SA (and so its children) with the peer; `then` starts once it is gone
    (with the gone SA as its argument)."""
    if then is not None:
        sa.after_delete.append(then)
    if sa.local_spi not in engine.sas:
        return run_after_delete(engine, sa, now)
    if sa.delete_reason is not None:
        return []
    sa.delete_reason = reason
    effects: list[Effect] = []
    if successor_of(sa) is None:
        effects.append(
            Log(
                0,
                "ike",
                "deleting_ike_sa",
                {
                    "vpn": sa.vpn.name if sa.vpn else None,
                    "unique_id": sa.unique_id,
                    "reason": reason,
                    "line": deleting_ike_line(sa),
                },
            )
        )
    if sa.established_at is None:
        # nothing to tell a peer that never authenticated: just forget it
        return effects + engine.remove_sa(sa, reason, now) + run_after_delete(engine, sa, now)
    return effects + engine.queue_task(sa, IkeDeleteTask(reason), now)


def run_after_delete(engine: IkeEngine, sa: IkeSa, now: float) -> list[Effect]:
    """The IKE SA is gone: start what was waiting for that (a break-before-make reauth)."""
    effects: list[Effect] = []
    waiting, sa.after_delete = sa.after_delete, []
    for task in waiting:
        effects += task.build(engine, sa, now)
    return effects


def send_liveness(engine: IkeEngine, sa: IkeSa, now: float) -> list[Effect]:
    """An empty INFORMATIONAL request (RFC 7296 1.4): the peer must answer it."""
    return LivenessTask().build(engine, sa, now)
