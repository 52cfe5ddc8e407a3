"""IKE_SA_INIT, responder side (RFC 7296 1.2, 2.6-2.10, 3.3): proposal, KE, nonces, NAT-D.

A request with SPIr = 0 creates a half-open IKE SA: proposal selection by local
preference (NO_PROPOSAL_CHOSEN when nothing fits), the peer's KE group checked
against the chosen proposal (INVALID_KE_PAYLOAD naming our preferred group when
it differs), DH and the SK_* keys computed, and the response cached so a
retransmitted request gets the identical answer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ikefarm.shared.ikev2.constants import (
    ExchangeType,
    NotifyType,
    ProtocolId,
)
from ikefarm.shared.ikev2.crypto.cipher import Cipher
from ikefarm.shared.ikev2.crypto.dh import DhExchange, InvalidKeyExchange, key_exchange_length
from ikefarm.shared.ikev2.crypto.integrity import Integrity
from ikefarm.shared.ikev2.crypto.keys import derive_ike_sa_keys
from ikefarm.shared.ikev2.crypto.prf import Prf
from ikefarm.shared.ikev2.crypto.protection import SkProtection
from ikefarm.shared.ikev2.effects import Effect, Endpoint, HalfOpen, Log, SendDatagram
from ikefarm.shared.ikev2.errors import UnsupportedCriticalPayload
from ikefarm.shared.ikev2.exchanges.natd import detect_nat, natd_notifies
from ikefarm.shared.ikev2.message import Message, ParsedMessage, encode_message, peek_header
from ikefarm.shared.ikev2.payloads import KePayload, NoncePayload, NotifyPayload, Payload, SaPayload
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
) -> list[Effect]:
    """An unprotected error response to IKE_SA_INIT; no state is kept (RFC 7296 2.21.1)."""
    engine.count(f"ike_sa_init_refused.{reason}")
    data = _unprotected_reply(request, [notify])
    return [
        SendDatagram(local, remote, data, "IKE_SA_INIT"),
        Log(
            1,
            "ike",
            "ike_sa_init_refused",
            {"peer": str(remote), "notify": NotifyType(notify.notify_type).name},
        ),
    ]


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
    if engine.policy.initiator_only:
        return refuse(
            engine,
            request,
            local,
            remote,
            NotifyPayload(NotifyType.NO_PROPOSAL_CHOSEN),
            "initiator_only",
        )

    sa_payload = request.get(SaPayload)
    ke = request.get(KePayload)
    nonce = request.get(NoncePayload)
    if sa_payload is None or ke is None or nonce is None:
        return engine.drop("ike_sa_init_missing_payload")
    candidates = engine.policy.candidates(local.address, remote.address)
    if not candidates:
        return refuse(
            engine, request, local, remote, NotifyPayload(NotifyType.NO_PROPOSAL_CHOSEN), "no_vpn"
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
        effects = refuse(engine, request, local, remote, notify, "no_proposal_chosen")
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
        return refuse(engine, request, local, remote, notify, "invalid_ke_payload")
    if len(ke.key_data) != key_exchange_length(algorithms.dh):
        return engine.drop("bad_ke_length")

    dh = DhExchange.generate(algorithms.dh)
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
        )
    engine.count("dh_computed")

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
        half_open_deadline=now + engine.policy.half_open_timeout,
    )
    sa.peer_fragmentation = request.notify(NotifyType.IKEV2_FRAGMENTATION_SUPPORTED) is not None
    sa.peer_childless = request.notify(NotifyType.CHILDLESS_IKEV2_SUPPORTED) is not None

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

    engine.sas[spi_r] = sa
    engine.init_index[(request.spi_i, remote.address, remote.port)] = spi_r
    effects = engine.respond(sa, request, payloads, protected=False)
    sa.init_response = sa.last_response.datagrams[0] if sa.last_response else b""
    effects.append(HalfOpen(request.spi_i, remote, engine.policy.half_open_timeout))
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
