"""EAP in IKE_AUTH, responder (RFC 7296 2.16), relayed to RADIUS (`remote-auth-method =
"eap-radius"`, docs/radius.md).

    Initiator                         Responder (ikefarm)            keystore / RADIUS
    IKE_AUTH {IDi, SAi2, TSi, TSr}    no AUTH: the peer asks for EAP
                                      sign our AUTH (PSK/certificate) -> keystore
             <- {IDr, [CERT], AUTH, EAP-Request/Identity}
    {EAP-Response/Identity} ->        relay                          -> Access-Request
             <- {EAP-Request}                                        <- Access-Challenge
    {EAP-Response} -> ... (as many rounds as the method takes)
             <- {EAP-Success}                                        <- Access-Accept (+MSK)
    {AUTH} ->                         AUTH from the MSK (keystore), or from SK_pi/SK_pr
             <- {AUTH, SAr2, TSi, TSr, [CP]}                         when the method makes none

We always ask for the identity first (RFC 3748 5.1): the peer's IKE identity need not be
its EAP identity, and a peer that has no other answers with its IDi. The EAP method is
the server's business: every EAP message goes to RADIUS as it is. The conversation is the
SA's passive task between rounds (the SA stays half-open, its half-open timeout runs);
each relay is a keystore request (`EapRelayRequest`), so the engine stays sans-I/O. An
Access-Reject (or a relay the server refused) is answered with EAP-Failure and
AUTHENTICATION_FAILED, and the SA is forgotten; a RADIUS server that does not answer
decides nothing: the peer retransmits and the request is relayed again.

The final AUTHs (RFC 7296 2.16): AUTH = prf(prf(MSK, "Key Pad for IKEv2"), signed octets)
when the method made an MSK (the keystore holds it: `EapAuthRequest`), else with SK_pi
(the peer's) and SK_pr (ours) as the shared key, computed here since the engine holds them.
"""

from __future__ import annotations

import hmac
import ipaddress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from ikefarm.proto.messages import (
    CertAuthReply,
    EapAuthRequest,
    EapRelayReply,
    EapRelayRequest,
    PskAuthReply,
)
from ikefarm.shared.ikev2.constants import AuthMethod, ExchangeType, PayloadType
from ikefarm.shared.ikev2.effects import Effect, KeystoreAnswer, Log, VipLeased
from ikefarm.shared.ikev2.exchanges import auth_methods
from ikefarm.shared.ikev2.exchanges import config as cfg_exchange
from ikefarm.shared.ikev2.exchanges.task import Task
from ikefarm.shared.ikev2.message import Message
from ikefarm.shared.ikev2.payloads import AuthPayload, EapPayload, IdPayload, Payload
from ikefarm.shared.ikev2.payloads.eap import EAP_RESPONSE
from ikefarm.shared.ikev2.pools import Pool
from ikefarm.shared.ikev2.sa import IkeSa, IkeSaState

if TYPE_CHECKING:
    from ikefarm.shared.ikev2.engine import IkeEngine
    from ikefarm.shared.ikev2.policy import VpnPolicy

EAP_METHOD = auth_methods.EAP_METHOD
EAP_REQUEST = 1
EAP_SUCCESS = 3
EAP_FAILURE = 4
EAP_TYPE_IDENTITY = 1  # RFC 3748 5.1
KEY_PAD = b"Key Pad for IKEv2"  # RFC 7296 2.15
IDENTITY_MAX = 253  # one User-Name attribute (RFC 2865 5.1)


@dataclass(frozen=True)
class EapFinish:
    """What `ike_auth._responder_established` needs to close an EAP conversation."""

    request: Message  # the last IKE_AUTH request, the one answered
    payloads: tuple[Payload, ...]  # our last AUTH
    local_method: int | None
    remote_label: str
    radius_pool: Pool | None = None
    identity: str = ""  # the EAP identity (RADIUS User-Name), for accounting


@dataclass(repr=False)
class EapResponder(Task):
    """One EAP conversation in IKE_AUTH, from the first request to the last AUTH (passive)."""

    name: ClassVar[str] = "ike_auth"
    exchange: ClassVar[ExchangeType] = ExchangeType.IKE_AUTH

    request: Message  # the first IKE_AUTH: IDi, SA, TS, CP
    vpn: VpnPolicy
    idi: IdPayload
    step: Literal["sign", "identity", "relay", "auth", "msk-auth", "vip"] = "sign"
    idr: IdPayload | None = None
    remote_method: int = EAP_METHOD
    local_method: int | None = None
    current: Message | None = None  # the request being answered
    identifier: int = 0  # of our last EAP-Request
    identity: bytes = b""
    state: bytes = field(default=b"", repr=False)
    server: int = -1
    rounds: int = 0
    sealed_msk: bytes = field(default=b"", repr=False)
    attributes: dict[str, list[str]] = field(default_factory=dict)
    our_auth: bytes = field(default=b"", repr=False)  # our last AUTH, while VIPs are leased

    def keystore_answer(
        self,
        engine: IkeEngine,
        sa: IkeSa,
        reply: KeystoreAnswer | None,
        error: str | None,
        now: float,
    ) -> list[Effect]:
        if self.step == "sign":
            signed = reply if isinstance(reply, PskAuthReply | CertAuthReply) else None
            return _signed(engine, sa, self, signed, error, now)
        if self.step == "relay":
            relayed = reply if isinstance(reply, EapRelayReply) else None
            return _relayed(engine, sa, self, relayed, error, now)
        if self.step == "msk-auth":
            answer = reply if isinstance(reply, PskAuthReply) else None
            return _msk_checked(engine, sa, self, answer, error, now)
        if self.step == "vip":
            leased = reply if isinstance(reply, VipLeased) else None
            return _leased(engine, sa, self, leased, error, now)
        engine.count("keystore_reply_unexpected.eap")
        return []

    @property
    def session(self) -> str:
        """The conversation's name: the MSK is sealed to it (and Acct-Session-Id)."""
        return session_name(self.request.spi_i, self.request.spi_r)


def session_name(spi_i: bytes, spi_r: bytes) -> str:
    return f"{spi_i.hex()}-{spi_r.hex()}"


def _log(event: str, sa: IkeSa, **fields: Any) -> Log:
    return Log(1, "ike", event, {"unique_id": sa.unique_id, "peer": str(sa.remote), **fields})


def _fail(
    engine: IkeEngine,
    sa: IkeSa,
    task: EapResponder,
    request: Message,
    reason: str,
    now: float,
    eap: bytes = b"",
) -> list[Effect]:
    """EAP-Failure (when we have one to send) and AUTHENTICATION_FAILED; the SA goes."""
    from ikefarm.shared.ikev2.exchanges.ike_auth import fail_with

    sa.passive = None
    extra: list[Payload] = [EapPayload(eap)] if eap else []
    return fail_with(engine, sa, request, reason, now, extra, remote_id=str(task.idi))


def _wait(sa: IkeSa, task: EapResponder, step: str) -> None:
    task.step = step  # type: ignore[assignment]
    sa.state = IkeSaState.AUTHENTICATING
    sa.passive = task


def _unavailable(
    engine: IkeEngine, sa: IkeSa, task: EapResponder, what: str, error: str | None
) -> list[Effect]:
    """Nothing decided: back to half-open; the peer's retransmission asks again."""
    sa.state = IkeSaState.HALF_OPEN
    engine.count(f"eap.{what}_unavailable")
    if task.step == "sign":
        sa.passive = None  # the first request starts over
    else:
        sa.passive = task
    return [_log(f"eap_{what}_unavailable", sa, error=error or "no reply")]


# -- the first request: our AUTH, then EAP-Request/Identity -----------------------------------


def start(
    engine: IkeEngine, sa: IkeSa, request: Message, vpn: VpnPolicy, idi: IdPayload, now: float
) -> list[Effect]:
    """The peer's IKE_AUTH without AUTH: have the keystore sign ours (RFC 7296 2.16: the
    responder authenticates itself with a signature or PSK in its first answer)."""
    from ikefarm.shared.ikev2.exchanges.ike_auth import signed_octets

    assert sa.keys is not None and sa.algorithms is not None and sa.algorithms.prf is not None
    task = EapResponder(request, vpn, idi)
    task.idr = auth_methods.identity_payload(vpn.local_id, PayloadType.IDr)
    task.current = request
    sign = signed_octets(sa.init_response, sa.nonce_i, sa.keys.sk_pr, task.idr, sa)
    _wait(sa, task, "sign")
    engine.count("eap.started")
    return [engine.ask_keystore(sa, task, auth_methods.sign_request(sa, vpn, str(idi), sign))]


def _signed(
    engine: IkeEngine,
    sa: IkeSa,
    task: EapResponder,
    reply: PskAuthReply | CertAuthReply | None,
    error: str | None,
    now: float,
) -> list[Effect]:
    if error is not None or reply is None:
        return _unavailable(engine, sa, task, "keystore", error)
    request = task.request
    if not reply.auth:
        return _fail(engine, sa, task, request, reply.reason or "no_secret", now)
    assert task.idr is not None
    task.local_method = auth_methods.reply_method(reply)
    task.identifier = engine.random(1)[0]
    identity_request = bytes((EAP_REQUEST, task.identifier, 0, 5, EAP_TYPE_IDENTITY))
    payloads: list[Payload] = [
        task.idr,
        *auth_methods.our_auth(task.vpn, reply),
        EapPayload(identity_request),
    ]
    task.step = "identity"
    _next_round(sa, task, request)
    return engine.respond(sa, request, payloads)


def _next_round(sa: IkeSa, task: EapResponder, answered: Message) -> None:
    sa.state = IkeSaState.HALF_OPEN
    sa.expected_request_id = answered.message_id + 1
    sa.passive = task


# -- the rounds -------------------------------------------------------------------------------


def proceed(
    engine: IkeEngine, sa: IkeSa, task: EapResponder, request: Message, now: float
) -> list[Effect]:
    """The peer's next IKE_AUTH request of the conversation."""
    task.current = request
    if task.step == "auth":
        auth = request.get(AuthPayload)
        if auth is None:
            return _fail(engine, sa, task, request, "eap_no_auth", now)
        return _check_auth(engine, sa, task, request, auth, now)
    eap = request.get(EapPayload)
    if eap is None or eap.code != EAP_RESPONSE:
        return _fail(engine, sa, task, request, "eap_no_response", now)
    if eap.identifier != task.identifier:
        # RFC 3748 4.1: a Response must match the Request's Identifier
        return _fail(engine, sa, task, request, "eap_identifier_mismatch", now)
    if task.step == "identity":
        if eap.eap_type != EAP_TYPE_IDENTITY:
            return _fail(engine, sa, task, request, "eap_no_identity", now)
        task.identity = eap.data[5:]
        if not task.identity:
            task.identity = task.idi.data  # an empty identity: the IKE one stands for it
        if len(task.identity) > IDENTITY_MAX:
            return _fail(engine, sa, task, request, "eap_identity_too_long", now)
    task.rounds += 1
    relay = EapRelayRequest(
        vpn=task.vpn.name,
        session=task.session,
        identity=task.identity,
        eap=eap.data,
        state=task.state,
        server=task.server,
        calling_station=f"{sa.remote.address}[{sa.remote.port}]",
        called_station=f"{sa.local.address}[{sa.local.port}]",
    )
    _wait(sa, task, "relay")
    return [engine.ask_keystore(sa, task, relay)]


def _relayed(
    engine: IkeEngine,
    sa: IkeSa,
    task: EapResponder,
    reply: EapRelayReply | None,
    error: str | None,
    now: float,
) -> list[Effect]:
    request = task.current
    assert request is not None
    if error is not None or reply is None or reply.outcome == "error":
        return _unavailable(engine, sa, task, "radius", error or (reply.reason if reply else None))
    if reply.outcome == "challenge":
        try:
            payload = EapPayload(reply.eap)
            payload.check()
        except Exception:
            return _fail(engine, sa, task, request, "eap_bad_server_message", now)
        if payload.code != EAP_REQUEST:
            return _fail(engine, sa, task, request, "eap_bad_server_message", now)
        task.identifier = payload.identifier
        task.state, task.server = reply.state, reply.server
        task.step = "relay"
        engine.count("eap.challenge")
        _next_round(sa, task, request)
        return engine.respond(sa, request, [payload])
    if reply.outcome == "accept":
        task.sealed_msk = reply.sealed_msk
        task.attributes = _checked_attributes(reply.attributes)
        task.state = b""
        task.step = "auth"
        engine.count("eap.accepted")
        _next_round(sa, task, request)
        success = reply.eap if _is_code(reply.eap, EAP_SUCCESS) else _eap_code(EAP_SUCCESS, task)
        accepted = Log(
            2,
            "ike",
            "eap_accepted",
            {"unique_id": sa.unique_id, "rounds": task.rounds, "msk": bool(task.sealed_msk)},
        )
        return [*engine.respond(sa, request, [EapPayload(success)]), accepted]
    engine.count("eap.rejected")
    failure = reply.eap if _is_code(reply.eap, EAP_FAILURE) else _eap_code(EAP_FAILURE, task)
    return _fail(engine, sa, task, request, reply.reason or "eap_rejected", now, failure)


def _is_code(eap: bytes, code: int) -> bool:
    return len(eap) == 4 and eap[0] == code and eap[2:4] == b"\x00\x04"


def _eap_code(code: int, task: EapResponder) -> bytes:
    return bytes((code, task.identifier, 0, 4))


def _checked_attributes(attributes: dict[str, list[str]]) -> dict[str, list[str]]:
    """Only well-formed addresses of the keywords a radius pool knows (they came over the bus)."""
    kept: dict[str, list[str]] = {}
    for key in ("address", "dns", "nbns", "netmask"):
        for text in attributes.get(key, [])[:8]:
            try:
                ipaddress.ip_address(text)
            except ValueError:
                continue
            kept.setdefault(key, []).append(text)
    return kept


# -- the last AUTH (RFC 7296 2.16) ----------------------------------------------------------


def _check_auth(
    engine: IkeEngine,
    sa: IkeSa,
    task: EapResponder,
    request: Message,
    auth: AuthPayload,
    now: float,
) -> list[Effect]:
    from ikefarm.shared.ikev2.exchanges.ike_auth import signed_octets

    assert sa.keys is not None and sa.prf is not None and sa.algorithms is not None
    assert task.idr is not None and sa.algorithms.prf is not None
    if auth.method != AuthMethod.SHARED_KEY_MIC:
        return _fail(engine, sa, task, request, "eap_auth_method", now)
    verify = signed_octets(sa.init_request, sa.nonce_r, sa.keys.sk_pi, task.idi, sa)
    sign = signed_octets(sa.init_response, sa.nonce_i, sa.keys.sk_pr, task.idr, sa)
    if task.sealed_msk:
        call = EapAuthRequest(
            prf_id=sa.algorithms.prf[0],
            session=task.session,
            sealed_msk=task.sealed_msk,
            verify_octets=verify,
            verify_auth=auth.data,
            sign_octets=sign,
        )
        _wait(sa, task, "msk-auth")
        return [engine.ask_keystore(sa, task, call)]
    # no MSK (EAP-MD5 and the like): SK_pi / SK_pr are the shared keys (RFC 7296 2.16)
    prf = sa.prf
    expected = prf.compute(prf.compute(sa.keys.sk_pi, KEY_PAD), verify)
    if not hmac.compare_digest(expected, auth.data):
        return _fail(engine, sa, task, request, "auth_mismatch", now)
    engine.count("eap.without_msk")
    ours = prf.compute(prf.compute(sa.keys.sk_pr, KEY_PAD), sign)
    return _authenticated(engine, sa, task, ours, now)


def _msk_checked(
    engine: IkeEngine,
    sa: IkeSa,
    task: EapResponder,
    reply: PskAuthReply | None,
    error: str | None,
    now: float,
) -> list[Effect]:
    request = task.current
    assert request is not None
    if error is not None or reply is None:
        sa.state = IkeSaState.HALF_OPEN
        task.step = "auth"
        sa.passive = task
        engine.count("eap.keystore_unavailable")
        return [_log("eap_keystore_unavailable", sa, error=error or "no reply")]
    if not reply.verified:
        return _fail(engine, sa, task, request, reply.reason or "auth_mismatch", now)
    return _authenticated(engine, sa, task, reply.auth, now)


def _authenticated(
    engine: IkeEngine, sa: IkeSa, task: EapResponder, ours: bytes, now: float
) -> list[Effect]:
    """The peer is authenticated: lease VIPs when asked (from its RADIUS pool first), then
    establish the SA."""
    task.our_auth = ours
    versions = cfg_exchange.requested_versions(task.request)
    vpn = task.vpn
    if versions and vpn.vip_pools:
        own = task_pool(task)
        missing = tuple(
            v for v in versions if own is None or not cfg_exchange.radius_grants(own, (v,))
        )
        others = tuple(p for p in vpn.vip_pools if p != cfg_exchange.RADIUS_POOL)
        if missing and others:
            call = cfg_exchange.lease_call(sa, vpn, missing, str(task.idi))
            _wait(sa, task, "vip")
            return [engine.ask_keystore(sa, task, call)]
    return _leased(engine, sa, task, None, None, now)


def task_pool(task: EapResponder) -> Pool | None:
    if cfg_exchange.RADIUS_POOL not in task.vpn.vip_pools:
        return None
    return cfg_exchange.radius_pool(task.attributes)


def _leased(
    engine: IkeEngine,
    sa: IkeSa,
    task: EapResponder,
    leased: VipLeased | None,
    error: str | None,
    now: float,
) -> list[Effect]:
    from ikefarm.shared.ikev2.exchanges.ike_auth import _responder_established

    request = task.current
    assert request is not None
    if error is not None:
        sa.state = IkeSaState.HALF_OPEN
        task.step = "auth"
        sa.passive = task
        engine.count("vip.lease_unavailable")
        return [_log("vip_lease_unavailable", sa, error=error)]
    sa.passive = None
    own = task_pool(task)
    versions = cfg_exchange.requested_versions(task.request)
    granted: list[tuple[str, str]] = []
    if own is not None:
        granted = cfg_exchange.radius_grants(own, versions)
    if leased is not None:
        granted += list(leased.addresses)
    combined = VipLeased(tuple(granted)) if own is not None or leased is not None else None
    finish = EapFinish(
        request=request,
        payloads=(AuthPayload(AuthMethod.SHARED_KEY_MIC, task.our_auth),),
        local_method=task.local_method,
        remote_label="EAP",
        radius_pool=own,
        identity=task.identity.decode("utf-8", "replace"),
    )
    return _responder_established(engine, sa, task, None, combined, now, eap_finish=finish)  # type: ignore[arg-type]
