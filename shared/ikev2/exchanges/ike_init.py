"""IKE_SA_INIT, responder side (RFC 7296 1.2, 2.6-2.10, 3.3): proposal, KE, nonces, NAT-D.

A request with SPIr = 0 creates a half-open IKE SA: proposal selection by local
preference (NO_PROPOSAL_CHOSEN when nothing fits), the peer's KE group checked
against the chosen proposal (INVALID_KE_PAYLOAD naming our preferred group when
it differs), DH and the SK_* keys computed, and the response cached so a
retransmitted request gets the identical answer.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, ClassVar

from ikefarm.shared.dos.admission import INIT_PHASE
from ikefarm.shared.ikev2.constants import (
    ERROR_NOTIFY_MAX,
    ExchangeType,
    NotifyType,
    ProtocolId,
    TransformType,
)
from ikefarm.shared.ikev2.crypto.cipher import Cipher
from ikefarm.shared.ikev2.crypto.dh import InvalidKeyExchange, key_exchange_length
from ikefarm.shared.ikev2.crypto.integrity import Integrity
from ikefarm.shared.ikev2.crypto.keys import derive_ike_sa_keys
from ikefarm.shared.ikev2.crypto.prf import Prf
from ikefarm.shared.ikev2.crypto.protection import SkProtection
from ikefarm.shared.ikev2.effects import Effect, Endpoint, HalfOpen, Log, SaFailed, SendDatagram
from ikefarm.shared.ikev2.errors import UnsupportedCriticalPayload
from ikefarm.shared.ikev2.exchange_counts import RESPONDER, count_exchange, result_of
from ikefarm.shared.ikev2.exchanges import auth_methods, ppk
from ikefarm.shared.ikev2.exchanges.natd import detect_nat, natd_notifies
from ikefarm.shared.ikev2.exchanges.task import Task
from ikefarm.shared.ikev2.message import Message, ParsedMessage, encode_message, peek_header
from ikefarm.shared.ikev2.payloads import KePayload, NoncePayload, NotifyPayload, Payload, SaPayload
from ikefarm.shared.ikev2.policy import VpnPolicy
from ikefarm.shared.ikev2.proposals import offered_dh_groups, select_proposal
from ikefarm.shared.ikev2.sa import IkeSa, IkeSaState

if TYPE_CHECKING:
    from ikefarm.shared.ikev2.engine import IkeEngine

NONCE_SIZE = 32  # >= half the largest PRF key size we negotiate (RFC 7296 2.10)
RESPONDER_SPI_ZERO = bytes(8)


def _unprotected_reply(
    request: Message, payloads: list[Payload], spi_r: bytes = RESPONDER_SPI_ZERO
) -> bytes:
    reply = Message(
        exchange_type=ExchangeType.IKE_SA_INIT,
        spi_i=request.spi_i,
        spi_r=spi_r,
        message_id=request.message_id,
        is_initiator=False,
        is_response=True,
        payloads=payloads,
    )
    return encode_message(reply)


def refuse(
    engine: IkeEngine,
    request: Message,
    local: Endpoint,
    remote: Endpoint,
    notify: NotifyPayload,
    reason: str,
    now: float | None = None,
) -> list[Effect]:
    """An unprotected error response to IKE_SA_INIT; no state is kept (RFC 7296 2.21.1)."""
    engine.count(f"ike_sa_init_refused.{reason}")
    count_exchange(engine.counters, RESPONDER, ExchangeType.IKE_SA_INIT, result_of([notify]))
    data = _unprotected_reply(request, [notify])
    effects: list[Effect] = [
        SendDatagram(local, remote, data, "IKE_SA_INIT"),
        Log(
            1,
            "ike",
            "ike_sa_init_refused",
            {"peer": str(remote), "notify": NotifyType(notify.notify_type).name},
        ),
    ]
    # INVALID_KE_PAYLOAD is a retry hint, not a failure; `now` is None for an unparsed request
    if now is not None and notify.notify_type != NotifyType.INVALID_KE_PAYLOAD:
        effects += engine.peer_failed(remote, INIT_PHASE, now)
    return effects


def refuse_critical(
    engine: IkeEngine,
    datagram: bytes,
    exc: UnsupportedCriticalPayload,
    local: Endpoint,
    remote: Endpoint,
) -> list[Effect]:
    """UNSUPPORTED_CRITICAL_PAYLOAD for an IKE_SA_INIT request (RFC 7296 2.5)."""
    try:
        header = peek_header(datagram)
    except Exception:
        return []
    if header.exchange_type != ExchangeType.IKE_SA_INIT or header.is_response or any(header.spi_r):
        return []
    request = Message(
        ExchangeType.IKE_SA_INIT, header.spi_i, header.spi_r, header.message_id, True, False
    )
    notify = NotifyPayload(NotifyType.UNSUPPORTED_CRITICAL_PAYLOAD, data=bytes([exc.payload_type]))
    return refuse(engine, request, local, remote, notify, "unsupported_critical_payload")


def respond(
    engine: IkeEngine, parsed: ParsedMessage, local: Endpoint, remote: Endpoint, now: float
) -> list[Effect]:
    request = parsed.message
    if request is None:
        return engine.drop("ike_sa_init_encrypted")
    if request.message_id != 0:
        return engine.drop("invalid_message_id", got=request.message_id, expected=0)
    key = (request.spi_i, remote.address, remote.port)
    existing = engine.sas.get(engine.init_index.get(key, b""))
    if existing is not None and existing.init_request == parsed.raw and existing.last_response:
        engine.count("retransmitted_responses")
        return [
            SendDatagram(existing.local, existing.remote, d, "retransmit")
            for d in existing.last_response.datagrams
        ]
    if existing is not None:
        return engine.drop("init_for_existing_half_open")
    if engine.dos is not None:
        # the final authority on the DoS limits, before any DH is spent (shared/dos)
        refused = engine.dos.refuse(engine, remote.address, now)
        if refused is not None:
            engine.count(f"dos_refused.{refused}")
            modes = _mode_logs(engine, refused)
            return modes + engine.drop("dos_refused", limit=refused, peer=str(remote))
    if engine.policy.initiator_only:
        return refuse(
            engine,
            request,
            local,
            remote,
            NotifyPayload(NotifyType.NO_PROPOSAL_CHOSEN),
            "initiator_only",
            now,
        )

    sa_payload = request.get(SaPayload)
    ke = request.get(KePayload)
    nonce = request.get(NoncePayload)
    if sa_payload is None or ke is None or nonce is None:
        return engine.drop("ike_sa_init_missing_payload")
    candidates = engine.policy.candidates(local.address, remote.address)
    if not candidates:
        return refuse(
            engine,
            request,
            local,
            remote,
            NotifyPayload(NotifyType.NO_PROPOSAL_CHOSEN),
            "no_vpn",
            now,
        )

    selection = None
    for vpn in candidates:
        selection = select_proposal(
            vpn.ike_proposals, sa_payload.proposals, ProtocolId.IKE, prefer_dh=int(ke.dh_group)
        )
        if selection is not None:
            break
    if selection is None:
        offered = sorted(offered_dh_groups(sa_payload.proposals))
        notify = NotifyPayload(NotifyType.NO_PROPOSAL_CHOSEN)
        effects = refuse(engine, request, local, remote, notify, "no_proposal_chosen", now)
        effects.append(
            Log(1, "ike", "no_proposal_chosen", {"peer": str(remote), "offered_dh": offered})
        )
        return effects
    algorithms = selection.algorithms()
    assert algorithms.dh is not None and algorithms.prf is not None
    if ke.dh_group != algorithms.dh:
        # RFC 7296 1.2: tell the initiator which group we want; keep no state
        group = algorithms.dh.to_bytes(2, "big")
        notify = NotifyPayload(NotifyType.INVALID_KE_PAYLOAD, data=group)
        return refuse(engine, request, local, remote, notify, "invalid_ke_payload", now)
    if len(ke.key_data) != key_exchange_length(algorithms.dh):
        return engine.drop("bad_ke_length")

    dh = engine.new_dh(algorithms.dh)
    try:
        shared_secret = dh.compute_shared(ke.key_data)
    except InvalidKeyExchange:
        return refuse(
            engine,
            request,
            local,
            remote,
            NotifyPayload(NotifyType.INVALID_SYNTAX),
            "invalid_ke_value",
            now,
        )
    engine.count("dh_computed")

    lifetime = (
        engine.dos.half_open_lifetime(engine, now)
        if engine.dos is not None
        else engine.policy.half_open_timeout
    )
    spi_r = engine.new_ike_spi()
    nonce_r = engine.random(NONCE_SIZE)
    prf = Prf(algorithms.prf[0])
    cipher = Cipher(algorithms.encr[0], algorithms.encr[1])
    integrity = Integrity(algorithms.integ[0]) if algorithms.integ else None
    keys = derive_ike_sa_keys(
        prf, integrity, cipher, nonce.data, nonce_r, shared_secret, request.spi_i, spi_r
    )

    sa = IkeSa(
        unique_id=engine.new_unique_id(),
        is_initiator=False,
        spi_i=request.spi_i,
        spi_r=spi_r,
        local=local,
        remote=remote,
        state=IkeSaState.HALF_OPEN,
        created_at=now,
        candidates=candidates,
        algorithms=algorithms,
        prf=prf,
        protection=SkProtection(cipher, integrity),
        keys=keys,
        nonce_i=nonce.data,
        nonce_r=nonce_r,
        init_request=parsed.raw,
        expected_request_id=1,
        half_open_deadline=now + lifetime,
    )
    sa.peer_fragmentation = request.notify(NotifyType.IKEV2_FRAGMENTATION_SUPPORTED) is not None
    sa.peer_childless = request.notify(NotifyType.CHILDLESS_IKEV2_SUPPORTED) is not None
    auth_methods.learn_peer_hashes(sa, request)

    payloads: list[Payload] = [
        SaPayload([selection.response()]),
        KePayload(algorithms.dh, dh.public_bytes()),
        NoncePayload(nonce_r),
    ]
    nat = detect_nat(request, local, remote)
    if nat is not None:
        sa.nat_local, sa.nat_remote = nat
        payloads += natd_notifies(request.spi_i, spi_r, local, remote)
    if sa.peer_fragmentation and any(v.fragmentation for v in candidates):
        payloads.append(NotifyPayload(NotifyType.IKEV2_FRAGMENTATION_SUPPORTED))
    if sa.peer_childless:
        payloads.append(NotifyPayload(NotifyType.CHILDLESS_IKEV2_SUPPORTED))
    payloads += ppk.init_response_notifies(engine, sa, request)  # USE_PPK (RFC 8784 3)
    payloads += auth_methods.init_notifies(candidates)
    payloads += auth_methods.certreq_payloads(engine.policy, candidates)

    engine.sas[spi_r] = sa
    engine.init_index[key] = spi_r
    sa.init_index_key = key
    effects = _mode_logs(engine, None) + engine.respond(sa, request, payloads, protected=False)
    sa.init_response = sa.last_response.datagrams[0] if sa.last_response else b""
    effects.append(HalfOpen(request.spi_i, remote, lifetime))
    effects.append(
        Log(
            2,
            "ike",
            "ike_sa_init_answered",
            {
                "unique_id": sa.unique_id,
                "peer": str(remote),
                "proposal": algorithms.ike_summary(),
                "nat_local": sa.nat_local,
                "nat_remote": sa.nat_remote,
            },
        )
    )
    return effects


def _mode_logs(engine: IkeEngine, refused: str | None) -> list[Effect]:
    """Level-1 lines when this worker starts or stops refusing at a limit (not per packet)."""
    if engine.dos is None:
        return []
    return [
        Log(1, "ike", "limit_reached" if reached else "limit_cleared", {"limit": name[6:]})
        for name, reached in engine.dos.transitions(refused)
    ]


# -- initiator ----------------------------------------------------------------------------------


@dataclass(repr=False)
class IkeInitTask(Task):
    """Our IKE_SA_INIT (active). Its state (DH, nonce, cookie) is the SA's own: the engine
    hands the answer, unprotected, to `initiator_response` with the datagram it came in."""

    name: ClassVar[str] = "ike_sa_init"
    exchange: ClassVar[ExchangeType] = ExchangeType.IKE_SA_INIT


def _proposals_payload(vpn: VpnPolicy) -> SaPayload:
    return SaPayload(
        [
            spec.to_proposal(number, ProtocolId.IKE, b"")
            for number, spec in enumerate(vpn.ike_proposals, 1)
        ]
    )


def initiate(engine: IkeEngine, vpn_name: str, child_name: str | None, now: float) -> list[Effect]:
    """Start an IKE SA to the VPN's remote address (`start` without the SA)."""
    return start(engine, vpn_name, child_name, now)[1]


def start(
    engine: IkeEngine,
    vpn_name: str,
    child_name: str | None,
    now: float,
    *,
    remote_address: str | None = None,
    remote_id: str | None = None,
) -> tuple[IkeSa, list[Effect]]:
    """Start an IKE SA and return it; `remote_address`/`remote_id` stand in for a VPN's
    "any" (a restart of an SA the peer initiated goes back to the address and identity it
    had). ValueError for a VPN that cannot initiate."""
    vpn = engine.policy.vpn(vpn_name)
    if vpn is None:
        raise ValueError(f"no enabled vpn named {vpn_name!r}")
    if remote_address is not None or remote_id is not None:
        vpn = replace(
            vpn,
            remote_address=remote_address or vpn.remote_address,
            remote_id=remote_id or vpn.remote_id,
        )
    if vpn.remote_address == "any" or vpn.local_address is None:
        raise ValueError(f"vpn {vpn_name!r} needs local-address and a remote-address to initiate")
    child = None
    if child_name is not None:
        child = next((p for p in vpn.security_policies if p.name == child_name), None)
        if child is None:
            raise ValueError(f"vpn {vpn_name!r} has no security-policy {child_name!r}")
    group = vpn.ike_proposals[0].first(TransformType.DH)
    assert group is not None
    sa = IkeSa(
        unique_id=engine.new_unique_id(),
        is_initiator=True,
        spi_i=engine.new_ike_spi(),
        spi_r=bytes(8),
        local=Endpoint(vpn.local_address, engine.policy.ike_port),
        remote=Endpoint(vpn.remote_address, engine.policy.ike_port),
        state=IkeSaState.CONNECTING,
        created_at=now,
        vpn=vpn,
        candidates=[vpn],
        nonce_i=engine.random(NONCE_SIZE),
        dh=engine.new_dh(group[0]),
        requested_child=child,
    )
    if engine.policy.initiator_half_open_timeout is not None:
        sa.half_open_deadline = now + engine.policy.initiator_half_open_timeout
    engine.sas[sa.spi_i] = sa
    engine.count("ike_sa_initiated")
    effects: list[Effect] = [
        Log(
            1,
            "ike",
            "initiating_ike_sa",
            {"vpn": vpn.name, "unique_id": sa.unique_id, "remote": str(sa.remote)},
        )
    ]
    return sa, effects + _send_init(engine, sa, now)


def _send_init(engine: IkeEngine, sa: IkeSa, now: float) -> list[Effect]:
    assert sa.vpn is not None and sa.dh is not None
    payloads: list[Payload] = []
    if sa.cookie is not None:
        payloads.append(NotifyPayload(NotifyType.COOKIE, data=sa.cookie))  # first (RFC 7296 2.6)
    payloads += [
        _proposals_payload(sa.vpn),
        KePayload(sa.dh.group, sa.dh.public_bytes()),
        NoncePayload(sa.nonce_i),
    ]
    payloads += natd_notifies(sa.spi_i, bytes(8), sa.local, sa.remote)
    if sa.vpn.fragmentation:
        payloads.append(NotifyPayload(NotifyType.IKEV2_FRAGMENTATION_SUPPORTED))
    payloads.append(NotifyPayload(NotifyType.CHILDLESS_IKEV2_SUPPORTED))
    payloads += ppk.init_request_notifies(sa.vpn)  # USE_PPK (RFC 8784 3)
    payloads += auth_methods.init_notifies([sa.vpn])
    sa.next_request_id = 0
    effects = engine.send_request(
        sa, ExchangeType.IKE_SA_INIT, payloads, now, IkeInitTask(), protected=False
    )
    sa.init_request = sa.outstanding.datagrams[0] if sa.outstanding else b""
    return effects


def initiator_response(
    engine: IkeEngine, sa: IkeSa, parsed: ParsedMessage, response: Message, now: float
) -> list[Effect]:
    """The IKE_SA_INIT answer: retry with a cookie or group, fail, or go on to IKE_AUTH."""
    assert sa.vpn is not None
    cookie = response.notify(NotifyType.COOKIE)
    if cookie is not None:
        if sa.cookie is not None and sa.cookie == cookie.data:
            return engine.drop("repeated_cookie")
        engine.count("cookie_retries")
        sa.cookie = cookie.data
        sa.outstanding = None
        return [
            Log(2, "ike", "retrying_with_cookie", {"unique_id": sa.unique_id}),
            *_send_init(engine, sa, now),
        ]
    invalid_ke = response.notify(NotifyType.INVALID_KE_PAYLOAD)
    if invalid_ke is not None and len(invalid_ke.data) == 2:
        group = int.from_bytes(invalid_ke.data, "big")
        acceptable = {
            g for spec in sa.vpn.ike_proposals for g, _ in spec.transforms.get(TransformType.DH, ())
        }
        if group not in acceptable or (sa.dh is not None and sa.dh.group == group):
            return _initiation_failed(engine, sa, "invalid_ke_payload", now, group=group)
        engine.count("invalid_ke_retries")
        sa.dh = engine.new_dh(group)
        sa.outstanding = None
        return [
            Log(2, "ike", "retrying_with_group", {"unique_id": sa.unique_id, "group": group}),
            *_send_init(engine, sa, now),
        ]
    errors = [n for n in response.notifies() if n.notify_type <= ERROR_NOTIFY_MAX]
    if errors:
        name = _notify_name(errors[0].notify_type)
        return _initiation_failed(engine, sa, name.lower(), now, notify=name)
    sa_payload = response.get(SaPayload)
    ke = response.get(KePayload)
    nonce = response.get(NoncePayload)
    if sa_payload is None or ke is None or nonce is None or len(sa_payload.proposals) != 1:
        return engine.drop("ike_sa_init_response_incomplete")
    selection = select_proposal(sa.vpn.ike_proposals, sa_payload.proposals, ProtocolId.IKE)
    if selection is None or len(selection.offered.transforms) != len(selection.chosen):
        return _initiation_failed(engine, sa, "proposal_not_offered", now)
    algorithms = selection.algorithms()
    assert sa.dh is not None and algorithms.prf is not None
    if ke.dh_group != sa.dh.group or algorithms.dh != sa.dh.group:
        return _initiation_failed(engine, sa, "ke_group_mismatch", now)
    try:
        shared_secret = sa.dh.compute_shared(ke.key_data)
    except InvalidKeyExchange:
        return _initiation_failed(engine, sa, "invalid_ke_value", now)
    sa.spi_r = response.spi_r
    sa.nonce_r = nonce.data
    sa.init_response = parsed.raw
    sa.algorithms = algorithms
    sa.prf = Prf(algorithms.prf[0])
    cipher = Cipher(algorithms.encr[0], algorithms.encr[1])
    integrity = Integrity(algorithms.integ[0]) if algorithms.integ else None
    sa.protection = SkProtection(cipher, integrity)
    sa.keys = derive_ike_sa_keys(
        sa.prf, integrity, cipher, sa.nonce_i, sa.nonce_r, shared_secret, sa.spi_i, sa.spi_r
    )
    sa.dh = None
    engine.count("dh_computed")
    sa.peer_fragmentation = response.notify(NotifyType.IKEV2_FRAGMENTATION_SUPPORTED) is not None
    sa.peer_childless = response.notify(NotifyType.CHILDLESS_IKEV2_SUPPORTED) is not None
    auth_methods.learn_peer_hashes(sa, response)
    nat = detect_nat(response, sa.local, sa.remote)
    if nat is not None:
        sa.nat_local, sa.nat_remote = nat
    if sa.nat_detected or (nat is not None and sa.vpn is not None and sa.vpn.mobike):
        # RFC 7296 2.23: float to port 4500 for everything after IKE_SA_INIT; with MOBIKE
        # even without a NAT, when the responder can do NAT-T (RFC 4555 3.2)
        sa.local = Endpoint(sa.local.address, engine.policy.natt_port)
        sa.remote = Endpoint(sa.remote.address, engine.policy.natt_port)
    sa.state = IkeSaState.AUTHENTICATING
    sa.outstanding = None
    sa.peer_use_ppk = response.notify(NotifyType.USE_PPK) is not None
    return ppk.initiator_start(engine, sa, now)


def _notify_name(notify_type: int) -> str:
    try:
        return NotifyType(notify_type).name
    except ValueError:
        return f"NOTIFY_{notify_type}"


def _initiation_failed(
    engine: IkeEngine, sa: IkeSa, reason: str, now: float, **fields: object
) -> list[Effect]:
    engine.count(f"initiation_failed.{reason}")
    effects: list[Effect] = [
        Log(
            1,
            "ike",
            "ike_sa_initiation_failed",
            {"unique_id": sa.unique_id, "reason": reason, **fields},
        ),
        SaFailed(sa.unique_id, reason),
    ]
    return effects + engine.remove_sa(sa, reason, now)
