"""MOBIKE (RFC 4555): an IKE SA and its children move to other addresses, both roles.

Negotiated in IKE_AUTH: each side that has `mobike` on sends MOBIKE_SUPPORTED (3.1),
and an SA uses MOBIKE when both did (`in_use`). The initiator then floats to the NAT-T
port for IKE_AUTH even without a NAT (3.2; `ike_init`), so that a later NAT on a new
path finds IKE on 4500 already; ESP is encapsulated only when a NAT is detected.

Once MOBIKE is in use, the addresses of the IKE SA change only by an INFORMATIONAL
with UPDATE_SA_ADDRESSES (3.5), never because a request came from elsewhere (the
NAT-T address update of RFC 7296 2.23 is for SAs without MOBIKE): the engine answers
a request where it came from (RFC 7296 2.11), so the peer's probe from a new path
(strongSwan checks a path with an INFORMATIONAL before it updates) is answered there.

Responder (`respond`), for an INFORMATIONAL that carries MOBIKE notifies:

- UPDATE_SA_ADDRESSES: the IKE SA moves to the addresses and ports the request came
  from and went to; the NAT_DETECTION_* hashes of the request are checked again
  (2.23) and decide UDP encapsulation of the children, which follow the SA
  (`UpdateChildSa`, one per child). The response carries our NAT_DETECTION_* for the
  new path and echoes COOKIE2 (3.5, 3.7: the initiator's return routability check).
  Refused, with no state change: a new address of the other family (the children's
  outer family cannot change here) or one the VPN's fixed remote address does not
  match (UNACCEPTABLE_ADDRESSES, 3.5); NO_NATS_ALLOWED whose addresses are not those
  the request arrived with (UNEXPECTED_NAT_DETECTED, 3.9).
- ADDITIONAL_IP4/6_ADDRESS replace the peer's list of other addresses,
  NO_ADDITIONAL_ADDRESSES empties it (3.6); kept per SA (`IkeSa.peer_addresses`) and
  shown.
- A malformed MOBIKE notify (a length the RFC does not allow) is answered with
  INVALID_SYNTAX, changes nothing and is counted (`dropped.mobike_<reason>`).
- MOBIKE notifies on an SA without MOBIKE are ignored (counted).

Initiator (`initiate_update`, `UpdateAddressesTask`): our address is gone or a better
path appeared; the SA moves to the new local address at once (the old one may not
exist any more) and the peer is told with UPDATE_SA_ADDRESSES, COOKIE2 and our
NAT_DETECTION_* for the new path. The response must echo our COOKIE2 (3.7) or the SA
is deleted; its NAT_DETECTION_* decide encapsulation again.
"""

from __future__ import annotations

import hmac
import ipaddress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from ikefarm.shared.ikev2.constants import ExchangeType, NotifyType
from ikefarm.shared.ikev2.effects import Effect, Endpoint, Log, SaEvent, UpdateChildSa
from ikefarm.shared.ikev2.exchanges.natd import detect_nat, natd_notifies
from ikefarm.shared.ikev2.exchanges.task import Task
from ikefarm.shared.ikev2.message import Message
from ikefarm.shared.ikev2.payloads import NotifyPayload, Payload
from ikefarm.shared.ikev2.sa import ChildSaState, IkeSa

if TYPE_CHECKING:
    from ikefarm.shared.ikev2.engine import IkeEngine

# RFC 4555 3.7/4.2.5: COOKIE2 carries 8 to 64 octets
COOKIE2_MIN, COOKIE2_MAX = 8, 64
COOKIE2_SIZE = 16  # what we send, as strongSwan does
NATD_HASH_SIZE = 20  # SHA-1 (RFC 7296 2.23)
# the peer's other addresses kept per SA; more ADDITIONAL_* notifies than this are refused
MAX_PEER_ADDRESSES = 16

MOBIKE_NOTIFIES = frozenset(
    {
        NotifyType.UPDATE_SA_ADDRESSES,
        NotifyType.COOKIE2,
        NotifyType.ADDITIONAL_IP4_ADDRESS,
        NotifyType.ADDITIONAL_IP6_ADDRESS,
        NotifyType.NO_ADDITIONAL_ADDRESSES,
        NotifyType.NO_NATS_ALLOWED,
    }
)


class MalformedMobike(ValueError):
    """A MOBIKE notify whose data the RFC does not allow; `reason` names the counter."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(slots=True)
class MobikeNotifies:
    """What one message says in MOBIKE's notifies (RFC 4555 4), checked."""

    update: bool = False
    cookie2: bytes | None = None
    # None: the message says nothing about the peer's other addresses; () : it has none
    additional: tuple[str, ...] | None = None
    # NO_NATS_ALLOWED: (source, destination, source port, destination port) as the peer sent
    no_nats: tuple[str, str, int, int] | None = None
    natd: bool = False
    mobike_supported: bool = False
    errors: list[int] = field(default_factory=list)

    @property
    def any(self) -> bool:
        return (
            self.update
            or self.cookie2 is not None
            or self.additional is not None
            or self.no_nats is not None
        )


def in_use(sa: IkeSa) -> bool:
    """Both sides said MOBIKE_SUPPORTED in IKE_AUTH and our VPN has `mobike` on."""
    return sa.peer_mobike and sa.vpn is not None and sa.vpn.mobike


def read_notifies(message: Message) -> MobikeNotifies:
    """The MOBIKE notifies of a message; MalformedMobike for a length out of RFC 4555 4."""
    found = MobikeNotifies()
    additional: list[str] = []
    for notify in message.notifies():
        kind, data = int(notify.notify_type), bytes(notify.data)
        if kind == NotifyType.UPDATE_SA_ADDRESSES:
            found.update = True
        elif kind == NotifyType.MOBIKE_SUPPORTED:
            found.mobike_supported = True
        elif kind == NotifyType.COOKIE2:
            if not COOKIE2_MIN <= len(data) <= COOKIE2_MAX:
                raise MalformedMobike("cookie2_length")
            found.cookie2 = data
        elif kind in (NotifyType.ADDITIONAL_IP4_ADDRESS, NotifyType.ADDITIONAL_IP6_ADDRESS):
            size = 4 if kind == NotifyType.ADDITIONAL_IP4_ADDRESS else 16
            if len(data) != size:
                raise MalformedMobike("additional_address_length")
            additional.append(str(ipaddress.ip_address(data)))
            if len(additional) > MAX_PEER_ADDRESSES:
                raise MalformedMobike("too_many_additional_addresses")
        elif kind == NotifyType.NO_ADDITIONAL_ADDRESSES:
            found.additional = found.additional or ()
        elif kind == NotifyType.NO_NATS_ALLOWED:
            found.no_nats = _no_nats(data)
        elif kind in (NotifyType.NAT_DETECTION_SOURCE_IP, NotifyType.NAT_DETECTION_DESTINATION_IP):
            if len(data) != NATD_HASH_SIZE:
                raise MalformedMobike("natd_length")
            found.natd = True
        elif kind in (NotifyType.UNACCEPTABLE_ADDRESSES, NotifyType.UNEXPECTED_NAT_DETECTED):
            found.errors.append(kind)
    if additional:
        if found.additional == ():
            raise MalformedMobike("additional_and_no_additional")
        found.additional = tuple(additional)
    return found


def _no_nats(data: bytes) -> tuple[str, str, int, int]:
    """RFC 4555 4.2.6: source address, destination address, source port, destination port."""
    if len(data) == 12:
        size = 4
    elif len(data) == 36:
        size = 16
    else:
        raise MalformedMobike("no_nats_allowed_length")
    source = str(ipaddress.ip_address(data[:size]))
    destination = str(ipaddress.ip_address(data[size : 2 * size]))
    ports = data[2 * size :]
    return source, destination, int.from_bytes(ports[:2], "big"), int.from_bytes(ports[2:], "big")


def record_auth(engine: IkeEngine, sa: IkeSa, message: Message) -> None:
    """IKE_AUTH (either role): the peer's other addresses, if it listed them (3.4, 3.6).
    A malformed list is ignored here (counted): IKE_AUTH does not fail for it."""
    try:
        found = read_notifies(message)
    except MalformedMobike as exc:
        engine.count(f"dropped.mobike_{exc.reason}")
        return
    if found.additional is not None:
        sa.peer_addresses = found.additional


def auth_notifies(sa: IkeSa) -> list[Payload]:
    """Our MOBIKE_SUPPORTED for the IKE_AUTH response, when both sides want MOBIKE."""
    if in_use(sa):
        return [NotifyPayload(NotifyType.MOBIKE_SUPPORTED)]
    return []


# -- responder ----------------------------------------------------------------------------------


NATD_NOTIFIES = frozenset(
    {NotifyType.NAT_DETECTION_SOURCE_IP, NotifyType.NAT_DETECTION_DESTINATION_IP}
)


def wants(sa: IkeSa, message: Message) -> bool:
    """Whether `respond` handles this INFORMATIONAL request: it carries a MOBIKE notify, or,
    on an SA with MOBIKE, NAT_DETECTION_* (a path check or a NAT mapping check, 3.5, 3.8)."""
    kinds = {int(n.notify_type) for n in message.notifies()}
    return bool(kinds & MOBIKE_NOTIFIES) or (bool(kinds & NATD_NOTIFIES) and in_use(sa))


def respond(
    engine: IkeEngine, sa: IkeSa, request: Message, local: Endpoint, remote: Endpoint, now: float
) -> list[Effect]:
    """An INFORMATIONAL request with MOBIKE notifies, from `remote` to `local` (RFC 4555 3.5)."""
    if not in_use(sa):
        engine.count("mobike.not_negotiated")
        return engine.respond(sa, request, [])
    try:
        found = read_notifies(request)
    except MalformedMobike as exc:
        effects = engine.drop(f"mobike_{exc.reason}", unique_id=sa.unique_id)
        return effects + engine.respond(sa, request, [NotifyPayload(NotifyType.INVALID_SYNTAX)])
    effects: list[Effect] = []
    if found.additional is not None:
        sa.peer_addresses = found.additional
        engine.count("mobike.peer_addresses")
    answer: list[Payload] = []
    if found.update:
        refused = _refusal(sa, found, local, remote)
        if refused is not None:
            engine.count(f"mobike.refused.{refused.name.lower()}")
            effects.append(
                Log(
                    1,
                    "ike",
                    "mobike_update_refused",
                    {
                        "unique_id": sa.unique_id,
                        "notify": refused.name,
                        "from": str(remote),
                        "to": str(local),
                    },
                )
            )
            return effects + engine.respond(sa, request, [NotifyPayload(refused)])
        nat = detect_nat(request, local, remote) if found.natd else None
        effects += move(engine, sa, local, remote, nat, "peer")
    if found.natd:
        # RFC 4555 3.5: our NAT_DETECTION_* for the path this response takes
        answer += natd_notifies(request.spi_i, request.spi_r, local, remote)
    if found.cookie2 is not None:
        answer.append(NotifyPayload(NotifyType.COOKIE2, data=found.cookie2))  # 3.7: echoed
    return engine.respond(sa, request, answer) + effects


def _refusal(
    sa: IkeSa, found: MobikeNotifies, local: Endpoint, remote: Endpoint
) -> NotifyType | None:
    """Why an UPDATE_SA_ADDRESSES is not acted upon (RFC 4555 3.5, 3.9), or None."""
    if found.no_nats is not None and found.no_nats != (
        remote.address,
        local.address,
        remote.port,
        local.port,
    ):
        return NotifyType.UNEXPECTED_NAT_DETECTED
    if _version(remote.address) != _version(sa.remote.address):
        return NotifyType.UNACCEPTABLE_ADDRESSES  # the children cannot change outer family here
    assert sa.vpn is not None
    if sa.vpn.remote_address not in ("any", remote.address):
        return NotifyType.UNACCEPTABLE_ADDRESSES  # the VPN names its peer's address
    return None


def _version(address: str) -> int:
    return ipaddress.ip_address(address).version


def move(
    engine: IkeEngine,
    sa: IkeSa,
    local: Endpoint,
    remote: Endpoint,
    nat: tuple[bool, bool] | None,
    by: str,
) -> list[Effect]:
    """Put the IKE SA and its children on the path local <-> remote; `nat` is what the
    NAT_DETECTION_* hashes said on it (None: unchanged)."""
    old_local, old_remote = sa.local, sa.remote
    encap_before = sa.nat_detected
    if nat is not None:
        sa.nat_local, sa.nat_remote = nat
    if nat is not None and sa.nat_local and not encap_before:
        sa.nat_keepalive_at = None  # the keepalive timer starts again for the new NAT
    sa.local, sa.remote = local, remote
    if (old_local, old_remote) == (local, remote) and encap_before == sa.nat_detected:
        engine.count("mobike.unchanged")
        return []
    engine.count(f"mobike.moved_by_{by}")
    return [
        *_children_follow(sa),
        SaEvent(
            "ike-moved",
            sa.unique_id,
            sa.vpn.name if sa.vpn else None,
            {
                "spi_i": sa.spi_i.hex(),
                "spi_r": sa.spi_r.hex(),
                "old_local": str(old_local),
                "old_remote": str(old_remote),
                "local": str(local),
                "remote": str(remote),
                "udp_encap": sa.nat_detected,
                "by": by,
            },
        ),
        Log(
            0,
            "ike",
            "ike_sa_moved",
            {
                "vpn": sa.vpn.name if sa.vpn else None,
                "unique_id": sa.unique_id,
                "old": f"{old_local}...{old_remote}",
                "new": f"{local}...{remote}",
                "udp_encap": sa.nat_detected,
                "by": by,
            },
        ),
    ]


def _children_follow(sa: IkeSa) -> list[Effect]:
    """Each live child takes the IKE SA's addresses and encapsulation (RFC 4555 3.5)."""
    effects: list[Effect] = []
    for child in sa.children:
        if child.state == ChildSaState.DELETED:
            continue
        child.udp_encap = sa.nat_detected
        effects.append(
            UpdateChildSa(
                unique_id=child.unique_id,
                ike_unique_id=sa.unique_id,
                reqid=child.policy.reqid,
                spi_in=child.spi_in,
                spi_out=child.spi_out,
                local=sa.local,
                remote=sa.remote,
                udp_encap=child.udp_encap,
            )
        )
    return effects


# -- initiator ----------------------------------------------------------------------------------


@dataclass(repr=False)
class UpdateAddressesTask(Task):
    """Our INFORMATIONAL with UPDATE_SA_ADDRESSES, COOKIE2 and NAT_DETECTION_* (RFC 4555 3.5)."""

    name: ClassVar[str] = "mobike"
    exchange: ClassVar[ExchangeType] = ExchangeType.INFORMATIONAL

    cookie2: bytes = field(default=b"", repr=False)

    def build(self, engine: IkeEngine, sa: IkeSa, now: float) -> list[Effect]:
        if sa.local_spi not in engine.sas or sa.delete_reason is not None:
            return engine.request_done(sa, now) if sa.local_spi in engine.sas else []
        self.cookie2 = engine.random(COOKIE2_SIZE)
        payloads: list[Payload] = [
            NotifyPayload(NotifyType.UPDATE_SA_ADDRESSES),
            NotifyPayload(NotifyType.COOKIE2, data=self.cookie2),
            *natd_notifies(sa.spi_i, sa.spi_r, sa.local, sa.remote),
        ]
        engine.count("mobike.update_sent")
        return engine.send_request(sa, ExchangeType.INFORMATIONAL, payloads, now, self)

    def process(self, engine: IkeEngine, sa: IkeSa, response: Message, now: float) -> list[Effect]:
        if not response.protected:
            return engine.drop("unprotected_informational")
        try:
            found = read_notifies(response)
        except MalformedMobike as exc:
            found = None
            effects = engine.drop(f"mobike_{exc.reason}", unique_id=sa.unique_id)
        else:
            effects = []
        echoed = found.cookie2 if found is not None else None
        if echoed is None or not hmac.compare_digest(echoed, self.cookie2):
            # RFC 4555 3.7: the answer did not come from who we sent it to
            engine.count("mobike.cookie2_mismatch")
            effects.append(Log(1, "ike", "mobike_cookie2_mismatch", {"unique_id": sa.unique_id}))
            effects += engine.request_done(sa, now)
            return effects + engine.delete_ike(sa, now, "cookie2 mismatch")
        assert found is not None
        for error in found.errors:
            engine.count(f"mobike.update_refused.{NotifyType(error).name.lower()}")
            effects.append(
                Log(
                    1,
                    "ike",
                    "mobike_update_refused_by_peer",
                    {"unique_id": sa.unique_id, "notify": NotifyType(error).name},
                )
            )
        if found.additional is not None:
            sa.peer_addresses = found.additional
        if not found.errors:
            engine.count("mobike.update_confirmed")
            if found.natd:
                nat = detect_nat(response, sa.local, sa.remote)
                if nat is not None and nat != (sa.nat_local, sa.nat_remote):
                    effects += move(engine, sa, sa.local, sa.remote, nat, "us")
        return effects + engine.request_done(sa, now)


def initiate_update(engine: IkeEngine, sa: IkeSa, local_address: str, now: float) -> list[Effect]:
    """Move the SA to our address `local_address` and tell the peer (RFC 4555 3.5).

    The move happens now (the old address may be gone); the NAT-T port is used on a new
    address, as after IKE_AUTH with MOBIKE (3.2)."""
    if not in_use(sa):
        engine.count("mobike.not_negotiated")
        return []
    if _version(local_address) != _version(sa.remote.address):
        engine.count("mobike.no_path")
        return []
    engine.sas.touch(sa)
    local = Endpoint(local_address, engine.policy.natt_port)
    effects = move(engine, sa, local, sa.remote, None, "us")
    return effects + engine.queue_task(sa, UpdateAddressesTask(), now)
