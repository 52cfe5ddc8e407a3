"""IKE_AUTH, both roles (RFC 7296 1.2, 2.15, 2.21.2): identities, AUTH, first child.

Neither the PSK nor a private key enters the worker: the engine builds the
signed octets and asks the keystore to verify the peer's AUTH and compute ours
(PSK here; certificates and signatures through `auth_methods`). Until it answers the
SA is AUTHENTICATING and a retransmitted request is ignored (the answer will be
sent once). A failed authentication is answered with AUTHENTICATION_FAILED
and the half-open SA is forgotten; a child that cannot be made (no proposal,
TS_UNACCEPTABLE) leaves the IKE SA established, as RFC 7296 1.2 and strongSwan
expect.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from ikefarm.proto.messages import CertAuthReply, PskAuthReply, PskAuthRequest
from ikefarm.shared.dos.admission import AUTH_PHASE
from ikefarm.shared.ikev2.constants import ExchangeType, NotifyType, PayloadType
from ikefarm.shared.ikev2.effects import (
    Effect,
    InitialContact,
    KeystoreAnswer,
    Log,
    PpkMixed,
    SaEvent,
    SaFailed,
    VipLeased,
)
from ikefarm.shared.ikev2.exchanges import auth_methods, eap, lifetimes, mobike, ppk
from ikefarm.shared.ikev2.exchanges import config as cfg_exchange
from ikefarm.shared.ikev2.exchanges.child_create import (
    ChildRequest,
    initiator_child_complete,
    initiator_child_payloads,
    respond_child,
)
from ikefarm.shared.ikev2.exchanges.task import Task
from ikefarm.shared.ikev2.message import Message
from ikefarm.shared.ikev2.payloads import AuthPayload, IdPayload, NotifyPayload, Payload
from ikefarm.shared.ikev2.policy import VpnPolicy
from ikefarm.shared.ikev2.sa import IkeSa, IkeSaState

if TYPE_CHECKING:
    from ikefarm.shared.ikev2.engine import IkeEngine
    from ikefarm.shared.ikev2.exchanges.eap import EapFinish

KEYSTORE_UNAVAILABLE = "keystore unavailable"
PSK_AUTH = "psk-auth"  # the KeystoreRequest operation for PSK AUTH (effects.PSK_AUTH)


def identity_matches(configured: str | None, presented: str) -> bool:
    """strongSwan-style: unset or `%any` matches anything, `*` wildcards match within."""
    if configured is None or configured in ("%any", "*"):
        return True
    dn = auth_methods.dn_matches(configured, presented)
    if dn is not None:
        return dn
    if "*" in configured:
        return fnmatch.fnmatchcase(presented, configured)
    return configured == presented


def choose_vpn(
    sa: IkeSa, idi: IdPayload, idr: IdPayload | None, method: int | None = None
) -> VpnPolicy | None:
    """The VPN for this peer: addresses fit (IKE_SA_INIT), IDi fits remote-id, IDr our local-id;
    among those, one that takes the peer's AUTH `method` comes first."""
    presented = str(idi)
    exact: list[VpnPolicy] = []
    loose: list[VpnPolicy] = []
    for vpn in sa.candidates:
        if not identity_matches(vpn.remote_id, presented):
            continue
        if idr is not None and not identity_matches(vpn.local_id, str(idr)):
            continue
        (exact if vpn.remote_id == presented else loose).append(vpn)
    found = exact + loose
    if method is not None:
        found.sort(key=lambda vpn: not auth_methods.accepts(vpn, method))  # stable
    return found[0] if found else None


def signed_octets(
    real_message: bytes, nonce: bytes, prf_key: bytes, id_payload: IdPayload, sa: IkeSa
) -> bytes:
    """RealMessage | Nonce | prf(SK_p, RestOfIDPayload) (RFC 7296 2.15)."""
    assert sa.prf is not None
    return real_message + nonce + sa.prf.compute(prf_key, id_payload.encode_body())


def _fail(
    engine: IkeEngine, sa: IkeSa, request: Message, reason: str, now: float, **fields: Any
) -> list[Effect]:
    return fail_with(engine, sa, request, reason, now, [], **fields)


def fail_with(
    engine: IkeEngine,
    sa: IkeSa,
    request: Message,
    reason: str,
    now: float,
    extra: list[Payload],
    **fields: Any,
) -> list[Effect]:
    """AUTHENTICATION_FAILED (with `extra` payloads, e.g. EAP-Failure) and the SA forgotten."""
    engine.count(f"auth_failed.{reason}")
    sa.expected_request_id = request.message_id + 1
    payloads: list[Payload] = [NotifyPayload(NotifyType.AUTHENTICATION_FAILED), *extra]
    effects = engine.respond(sa, request, payloads)
    effects.append(
        Log(
            1,
            "ike",
            "authentication_failed",
            {"unique_id": sa.unique_id, "peer": str(sa.remote), "reason": reason, **fields},
        )
    )
    effects.append(SaFailed(sa.unique_id, reason))
    effects += engine.remove_sa(sa, f"authentication failed: {reason}", now, announce=False)
    if not sa.is_initiator:
        effects += engine.peer_failed(sa.remote, AUTH_PHASE, now)
    return effects


# -- tasks ------------------------------------------------------------------------------------


@dataclass(repr=False)
class IkeAuthResponder(Task):
    """The peer's IKE_AUTH while the keystore mixes a PPK and checks/computes AUTH (passive)."""

    name: ClassVar[str] = "ike_auth"
    exchange: ClassVar[ExchangeType] = ExchangeType.IKE_AUTH

    request: Message
    vpn: VpnPolicy
    idi: IdPayload
    step: Literal["ppk-mix", "auth", "vip"] = "auth"
    ppk_id: bytes = b""  # the PPK the keystore mixes (RFC 8784 3)
    idr: IdPayload | None = None  # our identity, once the keystore signs with it
    remote_method: int = 0
    # the verified AUTH answer, kept while the VIP leases are asked for (exchanges/config.py)
    auth_reply: PskAuthReply | CertAuthReply | None = None

    def keystore_answer(
        self,
        engine: IkeEngine,
        sa: IkeSa,
        reply: KeystoreAnswer | None,
        error: str | None,
        now: float,
    ) -> list[Effect]:
        sa.passive = None
        mixed, answer = _kinds(reply)
        if self.step == "ppk-mix":
            return ppk.responder_mixed(engine, sa, self, mixed, error, now)
        if self.step == "vip":
            leased = reply if isinstance(reply, VipLeased) else None
            return _responder_leased(engine, sa, self, leased, error, now)
        return _responder_answered(engine, sa, self, answer, error, now)


@dataclass(repr=False)
class IkeAuthInitiator(Task):
    """Our IKE_AUTH: PPK mix, our AUTH signed, the request, the peer's AUTH verified (active)."""

    name: ClassVar[str] = "ike_auth"
    exchange: ClassVar[ExchangeType] = ExchangeType.IKE_AUTH

    step: Literal["ppk-mix", "sign", "verify"] = "sign"
    idi: IdPayload | None = None  # our identity, as signed
    ppk_auth: bytes | None = None  # AUTH with SK_pi' while NO_PPK_AUTH is signed (RFC 8784)
    no_ppk_auth: bytes | None = None
    local_method: int | None = None
    child: ChildRequest | None = None  # the first child, proposed in the request
    response: Message | None = None  # the peer's answer, while its AUTH is verified
    idr: IdPayload | None = None
    remote_method: int | None = None

    def process(self, engine: IkeEngine, sa: IkeSa, response: Message, now: float) -> list[Effect]:
        return initiator_response(engine, sa, self, response, now)

    def keystore_answer(
        self,
        engine: IkeEngine,
        sa: IkeSa,
        reply: KeystoreAnswer | None,
        error: str | None,
        now: float,
    ) -> list[Effect]:
        mixed, answer = _kinds(reply)
        if self.step == "ppk-mix":
            return ppk.initiator_mixed(engine, sa, self, mixed, error, now)
        return _initiator_keystore_answered(engine, sa, self, answer, error, now)


def _kinds(
    reply: KeystoreAnswer | None,
) -> tuple[PpkMixed | None, PskAuthReply | CertAuthReply | None]:
    """The keystore's answer as a PPK mix or as an AUTH answer (the other one None)."""
    if isinstance(reply, PpkMixed):
        return reply, None
    if isinstance(reply, VipLeased):
        return None, None
    return None, reply


# -- responder ----------------------------------------------------------------------------------


def respond(engine: IkeEngine, sa: IkeSa, request: Message, now: float) -> list[Effect]:
    idi = request.get_type(PayloadType.IDi)
    idr = request.get_type(PayloadType.IDr)
    auth = request.get(AuthPayload)
    if isinstance(sa.passive, eap.EapResponder):  # the next round of an EAP conversation
        return eap.proceed(engine, sa, sa.passive, request, now)
    if not isinstance(idi, IdPayload):
        return _fail(engine, sa, request, "no_identity", now)
    if auth is None:  # the peer wants EAP (RFC 7296 2.16)
        vpn = choose_vpn(sa, idi, idr if isinstance(idr, IdPayload) else None, eap.EAP_METHOD)
        if vpn is None or not auth_methods.accepts(vpn, eap.EAP_METHOD):
            return _fail(engine, sa, request, "eap_not_supported", now, remote_id=str(idi))
        return eap.start(engine, sa, request, vpn, idi, now)
    vpn = choose_vpn(sa, idi, idr if isinstance(idr, IdPayload) else None, int(auth.method))
    if vpn is None:
        return _fail(engine, sa, request, "no_matching_vpn", now, remote_id=str(idi))
    if not auth_methods.accepts(vpn, auth.method) or not auth_methods.same_kind(vpn):
        return _fail(engine, sa, request, "auth_method", now, method=int(auth.method), vpn=vpn.name)
    task = IkeAuthResponder(request, vpn, idi)
    effects, done = ppk.respond(engine, sa, task, now)  # RFC 8784
    if done:
        return effects
    return effects + ask_keystore_auth(engine, sa, task)


def ask_keystore_auth(engine: IkeEngine, sa: IkeSa, task: IkeAuthResponder) -> list[Effect]:
    """Have the keystore verify the peer's AUTH and compute ours with the SA's SK_pi/SK_pr:
    by PSK (the data checked is the NO_PPK_AUTH one when RFC 8784 says so) or by
    certificate (the AUTH payload; a NO_PPK_AUTH is not consulted on that path)."""
    assert sa.keys is not None
    request, vpn, idi = task.request, task.vpn, task.idi
    auth = request.get(AuthPayload)
    assert auth is not None
    peer_auth = ppk.peer_auth_data(sa, request, auth)
    local_id = auth_methods.identity_payload(vpn.local_id, PayloadType.IDr)
    verify = signed_octets(sa.init_request, sa.nonce_r, sa.keys.sk_pi, idi, sa)
    sign = signed_octets(sa.init_response, sa.nonce_i, sa.keys.sk_pr, local_id, sa)
    task.step, task.idr, task.remote_method = "auth", local_id, int(auth.method)
    sa.state = IkeSaState.AUTHENTICATING
    sa.passive = task
    if vpn.remote_auth == auth_methods.PUBKEY:
        call = auth_methods.cert_request(
            sa, vpn, "verify-and-sign", peer=request, peer_id=idi, peer_auth=auth,
            verify_octets=verify, sign_octets=sign,
        )  # fmt: skip
        return [engine.ask_keystore(sa, task, call)]
    assert sa.algorithms is not None and sa.algorithms.prf is not None
    psk = PskAuthRequest(
        prf_id=sa.algorithms.prf[0],
        local_id=vpn.local_id,
        remote_id=str(idi),
        verify_octets=verify,
        verify_auth=peer_auth,
        sign_octets=sign,
    )
    return [engine.ask_keystore(sa, task, psk)]


def _responder_answered(
    engine: IkeEngine,
    sa: IkeSa,
    task: IkeAuthResponder,
    reply: PskAuthReply | CertAuthReply | None,
    error: str | None,
    now: float,
) -> list[Effect]:
    request = task.request
    if error is not None or reply is None:
        # nothing decided: the peer retransmits and we ask again
        sa.state = IkeSaState.HALF_OPEN
        engine.count("keystore_unavailable")
        return [
            Log(
                1,
                "ike",
                "keystore_unavailable",
                {"unique_id": sa.unique_id, "error": error or "no reply"},
            )
        ]
    vpn, idi = task.vpn, task.idi
    if not reply.verified:
        return _fail(
            engine,
            sa,
            request,
            reply.reason or "auth_mismatch",
            now,
            remote_id=str(idi),
            vpn=vpn.name,
        )
    versions = cfg_exchange.requested_versions(request)
    if versions and vpn.vip_pools:
        # the peer is authenticated: now lease its addresses (RFC 7296 2.19)
        task.step, task.auth_reply = "vip", reply
        sa.passive = task
        return [engine.ask_keystore(sa, task, cfg_exchange.lease_call(sa, vpn, versions, str(idi)))]
    return _responder_established(engine, sa, task, reply, None, now)


def _responder_leased(
    engine: IkeEngine,
    sa: IkeSa,
    task: IkeAuthResponder,
    leased: VipLeased | None,
    error: str | None,
    now: float,
) -> list[Effect]:
    if error is not None or task.auth_reply is None:
        # the lease store did not answer: nothing decided, the peer retransmits
        sa.state = IkeSaState.HALF_OPEN
        engine.count("vip.lease_unavailable")
        return [Log(1, "ike", "vip_lease_unavailable", {"unique_id": sa.unique_id, "error": error})]
    return _responder_established(engine, sa, task, task.auth_reply, leased, now)


def _responder_established(
    engine: IkeEngine,
    sa: IkeSa,
    task: IkeAuthResponder,
    reply: PskAuthReply | CertAuthReply | None,
    leased: VipLeased | None,
    now: float,
    *,
    eap_finish: EapFinish | None = None,
) -> list[Effect]:
    """AUTH verified (and the VIPs leased, when asked): the SA is established, answer.

    After EAP (RFC 7296 2.16, `exchanges/eap.py`) the answer goes to the last IKE_AUTH
    request and carries only our last AUTH; the child and the CFG_REQUEST are the first
    request's."""
    request, vpn, idi = task.request, task.vpn, task.idi
    answer_to = eap_finish.request if eap_finish is not None else request
    sa.vpn = vpn
    sa.local_id = task.idr
    sa.remote_id = idi
    sa.state = IkeSaState.ESTABLISHED
    sa.established_at = now
    sa.half_open_deadline = None
    sa.expected_request_id = answer_to.message_id + 1
    sa.peer_mobike = request.notify(NotifyType.MOBIKE_SUPPORTED) is not None
    mobike.record_auth(engine, sa, request)
    lifetimes.start_ike_sa(engine, sa, now)
    engine.count("ike_sa_established")
    _release_init_messages(sa)

    assert task.idr is not None
    payloads: list[Payload]
    if eap_finish is not None:
        payloads = [*eap_finish.payloads, *mobike.auth_notifies(sa)]  # RFC 4555 3.1
        used = auth_methods.count_methods(engine, sa, eap_finish.local_method, None)
        used["remote_auth"] = eap_finish.remote_label
        engine.count(f"auth.remote.{eap_finish.remote_label}")
        sa.auth_methods = dict(used)
    else:
        assert reply is not None
        payloads = [
            task.idr,
            *auth_methods.our_auth(vpn, reply),
            *ppk.auth_response_notifies(sa),
            *mobike.auth_notifies(sa),  # RFC 4555 3.1
        ]
        used = auth_methods.count_methods(
            engine, sa, auth_methods.reply_method(reply), task.remote_method
        )
    effects: list[Effect] = []
    effects_after: list[Effect] = []
    child_allowed = True
    versions = cfg_exchange.requested_versions(request)
    if leased is not None or (versions and vpn.vip_pools):
        radius_pool = eap_finish.radius_pool if eap_finish is not None else None
        cp_payloads, child_allowed = cfg_exchange.reply_payloads(
            engine, sa, leased, versions, radius_pool
        )
        payloads += cp_payloads
        if not child_allowed:
            effects_after.append(
                Log(1, "ike", "vip_pool_exhausted", {"vpn": vpn.name, "unique_id": sa.unique_id})
            )
    if child_allowed:
        child = respond_child(engine, sa, vpn, request, now, first_child=True)
        payloads += child.payloads
        effects_after += child.effects
    response_effects = engine.respond(sa, answer_to, payloads)

    assert sa.algorithms is not None
    detail = {
        "local": str(sa.local),
        "remote": str(sa.remote),
        "local_id": str(sa.local_id),
        "remote_id": str(idi),
        "spi_i": sa.spi_i.hex(),
        "spi_r": sa.spi_r.hex(),
        "proposal": sa.algorithms.ike_summary(),
        "ppk_used": sa.ppk_used,
        **used,
    }
    if sa.remote_vips:
        detail["remote_vips"] = [address for _pool, address in sa.remote_vips]
    if eap_finish is not None and eap_finish.identity:
        detail["eap_identity"] = eap_finish.identity
    effects += response_effects
    effects.append(SaEvent("ike-established", sa.unique_id, vpn.name, detail))
    effects.append(
        Log(0, "ike", "ike_sa_established", {"vpn": vpn.name, "unique_id": sa.unique_id, **detail})
    )
    effects += effects_after
    if request.notify(NotifyType.INITIAL_CONTACT) is not None:
        effects.append(InitialContact(str(sa.local_id), str(idi), sa.unique_id))
    return effects


# -- initiator ----------------------------------------------------------------------------------


def _peer_label(sa: IkeSa) -> str:
    assert sa.vpn is not None
    return sa.vpn.remote_id or sa.remote.address


def initiator_sign(
    engine: IkeEngine, sa: IkeSa, task: IkeAuthInitiator, now: float, sk_pi: bytes | None = None
) -> list[Effect]:
    """Ask the keystore for our AUTH over InitiatorSignedOctets (RFC 7296 2.15); `sk_pi`
    other than the SA's is the one without PPK, for NO_PPK_AUTH (RFC 8784 3)."""
    assert sa.vpn is not None and sa.keys is not None and sa.algorithms is not None
    assert sa.algorithms.prf is not None
    idi = auth_methods.identity_payload(sa.vpn.local_id, PayloadType.IDi)
    sign = signed_octets(sa.init_request, sa.nonce_r, sk_pi or sa.keys.sk_pi, idi, sa)
    task.step, task.idi = "sign", idi
    call = auth_methods.sign_request(sa, sa.vpn, _peer_label(sa), sign)
    return [engine.ask_keystore(sa, task, call)]


def _initiator_send_auth(
    engine: IkeEngine,
    sa: IkeSa,
    task: IkeAuthInitiator,
    reply: PskAuthReply | CertAuthReply,
    now: float,
) -> list[Effect]:
    assert sa.vpn is not None and task.idi is not None
    sa.local_id = task.idi
    payloads: list[Payload] = [task.idi, *auth_methods.certificate_payloads(sa.vpn)]
    payloads += auth_methods.certreq_payloads(engine.policy, [sa.vpn])
    if not engine.sas.has_established(sa.vpn):
        payloads.append(NotifyPayload(NotifyType.INITIAL_CONTACT))
    if sa.vpn.remote_id:
        payloads.append(auth_methods.identity_payload(sa.vpn.remote_id, PayloadType.IDr))
    auth = AuthPayload(auth_methods.reply_method(reply), ppk.our_auth(task, reply.auth))
    task.local_method = int(auth.method)
    payloads.append(auth)
    payloads += ppk.auth_request_notifies(sa, task, engine)
    policy = sa.requested_child
    if policy is None and not sa.peer_childless and sa.vpn.security_policies:
        policy = sa.vpn.security_policies[0]  # the peer cannot do childless (RFC 6023)
    if policy is not None:
        child_payloads, task.child = initiator_child_payloads(engine, sa, policy, first_child=True)
        payloads += child_payloads
    if sa.vpn.mobike:
        payloads.append(NotifyPayload(NotifyType.MOBIKE_SUPPORTED))
    cfg_request = cfg_exchange.request_payload(sa.vpn)
    if cfg_request is not None:
        payloads.append(cfg_request)
    sa.state = IkeSaState.AUTHENTICATING
    return engine.send_request(sa, ExchangeType.IKE_AUTH, payloads, now, task)


def initiator_response(
    engine: IkeEngine, sa: IkeSa, task: IkeAuthInitiator, response: Message, now: float
) -> list[Effect]:
    """The responder's IKE_AUTH answer: have the keystore verify its AUTH before trusting it."""
    sa.outstanding = None
    if response.notify(NotifyType.AUTHENTICATION_FAILED) is not None:
        return _initiator_failed(engine, sa, "rejected_by_peer", now)
    idr = response.get_type(PayloadType.IDr)
    auth = response.get(AuthPayload)
    if not isinstance(idr, IdPayload) or auth is None:
        return _initiator_failed(engine, sa, "incomplete_response", now)
    assert sa.vpn is not None and sa.keys is not None and sa.algorithms is not None
    assert sa.algorithms.prf is not None
    if not identity_matches(sa.vpn.remote_id, str(idr)):
        return _initiator_failed(engine, sa, "unexpected_identity", now, remote_id=str(idr))
    if not auth_methods.accepts(sa.vpn, auth.method):
        return _initiator_failed(engine, sa, "auth_method", now, method=int(auth.method))
    ppk_failure = ppk.initiator_settle(engine, sa, response)  # RFC 8784: did it use the PPK?
    if ppk_failure is not None:
        return _initiator_failed(engine, sa, ppk_failure, now)
    verify = signed_octets(sa.init_response, sa.nonce_i, sa.keys.sk_pr, idr, sa)
    task.step, task.response, task.idr = "verify", response, idr
    task.remote_method = int(auth.method)
    if sa.vpn.remote_auth == auth_methods.PUBKEY:
        call = auth_methods.cert_request(
            sa, sa.vpn, "verify", peer=response, peer_id=idr, peer_auth=auth, verify_octets=verify
        )
        return [engine.ask_keystore(sa, task, call)]
    psk = PskAuthRequest(
        prf_id=sa.algorithms.prf[0],
        local_id=sa.vpn.local_id,
        remote_id=str(idr),
        verify_octets=verify,
        verify_auth=auth.data,
        sign_octets=b"",
        purpose="verify",
    )
    return [engine.ask_keystore(sa, task, psk)]


def _initiator_failed(
    engine: IkeEngine, sa: IkeSa, reason: str, now: float, **fields: Any
) -> list[Effect]:
    engine.count(f"auth_failed.{reason}")
    effects: list[Effect] = [
        Log(
            1,
            "ike",
            "authentication_failed",
            {"unique_id": sa.unique_id, "peer": str(sa.remote), "reason": reason, **fields},
        ),
        SaFailed(sa.unique_id, reason),
    ]
    return effects + engine.remove_sa(sa, f"authentication failed: {reason}", now, announce=False)


def initiator_keystore_unavailable(
    engine: IkeEngine, sa: IkeSa, error: str | None, now: float
) -> list[Effect]:
    """Our negotiation cannot go on without the keystore: it fails (the responder keeps a
    half-open SA and lets the peer retransmit instead)."""
    engine.count("keystore_unavailable")
    return [
        Log(
            1,
            "ike",
            "keystore_unavailable",
            {"unique_id": sa.unique_id, "error": error or "no reply"},
        ),
        SaFailed(sa.unique_id, KEYSTORE_UNAVAILABLE),
        *engine.remove_sa(sa, KEYSTORE_UNAVAILABLE, now, announce=False),
    ]


def _initiator_keystore_answered(
    engine: IkeEngine,
    sa: IkeSa,
    task: IkeAuthInitiator,
    reply: PskAuthReply | CertAuthReply | None,
    error: str | None,
    now: float,
) -> list[Effect]:
    if error is not None or reply is None:
        return initiator_keystore_unavailable(engine, sa, error, now)
    if task.step == "sign":
        if not reply.auth:
            return _initiator_failed(engine, sa, reply.reason or "no_secret", now)
        more = ppk.initiator_signed(engine, sa, task, reply.auth, now)  # NO_PPK_AUTH to sign
        if more is not None:
            return more
        return _initiator_send_auth(engine, sa, task, reply, now)
    if not reply.verified:
        return _initiator_failed(engine, sa, reply.reason or "auth_mismatch", now)
    vpn = sa.vpn
    assert vpn is not None and sa.algorithms is not None and task.response is not None
    response = task.response
    sa.remote_id = task.idr
    sa.state = IkeSaState.ESTABLISHED
    sa.established_at = now
    sa.expected_request_id = 0
    sa.peer_mobike = response.notify(NotifyType.MOBIKE_SUPPORTED) is not None
    mobike.record_auth(engine, sa, response)
    vip_effects = cfg_exchange.record_reply(engine, sa, response)
    lifetimes.start_ike_sa(engine, sa, now)
    engine.count("ike_sa_established")
    _release_init_messages(sa)
    used = auth_methods.count_methods(engine, sa, task.local_method, task.remote_method)
    detail = {
        "local": str(sa.local),
        "remote": str(sa.remote),
        "local_id": str(sa.local_id),
        "remote_id": str(sa.remote_id),
        "spi_i": sa.spi_i.hex(),
        "spi_r": sa.spi_r.hex(),
        "proposal": sa.algorithms.ike_summary(),
        "ppk_used": sa.ppk_used,
        **used,
    }
    if sa.local_vips:
        detail["local_vips"] = list(sa.local_vips)
        detail["dns"] = list(sa.cfg_dns)
    effects: list[Effect] = [
        SaEvent("ike-established", sa.unique_id, vpn.name, detail),
        Log(0, "ike", "ike_sa_established", {"vpn": vpn.name, "unique_id": sa.unique_id, **detail}),
        *vip_effects,
    ]
    if task.child is not None:
        effects += initiator_child_complete(
            engine, sa, response, task.child, now, first_child=True
        ).effects
    return effects + engine.request_done(sa, now)


def _release_init_messages(sa: IkeSa) -> None:
    """RealMessage1/2 (RFC 7296 2.15) are signed in IKE_AUTH and never again: an
    established SA does not keep them (their ~600 octets are a tenth of its size)."""
    sa.init_request = b""
    sa.init_response = b""
