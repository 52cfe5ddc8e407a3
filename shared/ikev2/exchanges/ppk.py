"""Postquantum Preshared Keys (RFC 8784), both roles: USE_PPK, PPK_IDENTITY, NO_PPK_AUTH.

IKE_SA_INIT (RFC 8784 3): an initiator whose VPN names a `ppk` sends USE_PPK;
a responder with any `[[ike.ppk]]` configured answers USE_PPK when asked.

IKE_AUTH, initiator: when both sent USE_PPK, the keystore mixes the VPN's PPK
into SK_d, SK_pi and SK_pr (SK_x' = prf+(PPK, SK_x), RFC 8784 3); AUTH is then
computed with SK_pi' and the request carries PPK_IDENTITY (PPK_ID_FIXED, the
form strongSwan and libreswan use). Unless `require-ppk`, it also carries
NO_PPK_AUTH: the AUTH data computed with the original SK_pi, so a responder
without that PPK can still authenticate us. The responder's PPK_IDENTITY in its
answer says the PPK was used; without it we go back to the original keys
(or fail, when the PPK is required).

IKE_AUTH, responder (seed 004): a PPK is used only when the peer's PPK_ID is
one configured here and, if the VPN names a `ppk`, is that one; otherwise keys
derive without PPK and the peer's NO_PPK_AUTH is what we verify. With
`require-ppk` (template or VPN) and no usable PPK: AUTHENTICATION_FAILED.

The PPK never reaches the worker: the engine asks the keystore (`PPK_MIX`) with
the current keys and gets the mixed ones back; on the bus the ike service seals
both to the keystore's transport key (`shared/bus/sealed.py`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ikefarm.shared.ikev2.constants import NotifyType
from ikefarm.shared.ikev2.crypto.keys import IkeSaKeys
from ikefarm.shared.ikev2.effects import PPK_MIX, Effect, Log, PpkMix, PpkMixed
from ikefarm.shared.ikev2.message import Message
from ikefarm.shared.ikev2.payloads import AuthPayload, NotifyPayload, Payload
from ikefarm.shared.ikev2.policy import VpnPolicy
from ikefarm.shared.ikev2.sa import IkeSa, IkeSaState

if TYPE_CHECKING:
    from ikefarm.shared.ikev2.engine import IkeEngine
    from ikefarm.shared.ikev2.exchanges.ike_auth import IkeAuthInitiator, IkeAuthResponder

__all__ = ["PPK_MIX"]
# PPK_ID types (RFC 8784 3): the octets after the type are the identity either way
PPK_ID_OPAQUE = 1
PPK_ID_FIXED = 2


def encode_ppk_identity(ppk_id: bytes) -> bytes:
    return bytes([PPK_ID_FIXED]) + ppk_id


def decode_ppk_identity(data: bytes) -> bytes | None:
    """The PPK_ID of a PPK_IDENTITY notify, or None when it is malformed."""
    if len(data) < 2 or data[0] not in (PPK_ID_OPAQUE, PPK_ID_FIXED):
        return None
    return data[1:]


def _log(sa: IkeSa, event: str, level: int = 1, **fields: Any) -> Log:
    return Log(level, "ike", event, {"unique_id": sa.unique_id, **fields})


def _mix_request(
    engine: IkeEngine, sa: IkeSa, task: IkeAuthInitiator | IkeAuthResponder, ppk_id: bytes
) -> Effect:
    assert sa.keys is not None and sa.algorithms is not None and sa.algorithms.prf is not None
    task.step = "ppk-mix"
    return engine.ask_keystore(sa, task, PpkMix(sa.algorithms.prf[0], ppk_id, sa.keys))


def _apply_mixed(sa: IkeSa, mixed: IkeSaKeys) -> None:
    """SK_d', SK_pi', SK_pr' replace the originals; the others keys stay (RFC 8784 3)."""
    assert sa.keys is not None
    sa.keys = replace(sa.keys, sk_d=mixed.sk_d, sk_pi=mixed.sk_pi, sk_pr=mixed.sk_pr)
    sa.ppk_used = True


# -- IKE_SA_INIT ----------------------------------------------------------------------------


def init_request_notifies(vpn: VpnPolicy) -> list[Payload]:
    """USE_PPK from an initiator that has a PPK for this VPN."""
    return [NotifyPayload(NotifyType.USE_PPK)] if vpn.ppk is not None else []


def init_response_notifies(engine: IkeEngine, sa: IkeSa, request: Message) -> list[Payload]:
    """USE_PPK back when the peer asked and we have PPKs at all."""
    sa.peer_use_ppk = request.notify(NotifyType.USE_PPK) is not None
    if sa.peer_use_ppk and engine.policy.ppks:
        return [NotifyPayload(NotifyType.USE_PPK)]
    return []


# -- responder ------------------------------------------------------------------------------


def acceptable_ppk_ids(engine: IkeEngine, vpn: VpnPolicy) -> set[bytes]:
    """The VPN's `ppk` only, when it names one (seed 004); else every configured PPK."""
    if vpn.ppk is not None:
        return {engine.policy.ppks[vpn.ppk]} if vpn.ppk in engine.policy.ppks else set()
    return set(engine.policy.ppks.values())


def respond(
    engine: IkeEngine, sa: IkeSa, task: IkeAuthResponder, now: float
) -> tuple[list[Effect], bool]:
    """Decide on the PPK before AUTH is checked: (effects, done). Done: the keystore was asked
    to mix, or the SA failed; not done: go on without PPK, after these log lines."""
    identity = task.request.notify(NotifyType.PPK_IDENTITY)
    ppk_id = decode_ppk_identity(identity.data) if identity is not None else None
    if ppk_id is not None and ppk_id in acceptable_ppk_ids(engine, task.vpn):
        sa.state = IkeSaState.AUTHENTICATING
        sa.passive = task
        task.ppk_id = ppk_id
        return [_mix_request(engine, sa, task, ppk_id)], True
    return _without_ppk(engine, sa, task, "unknown_ppk_id" if identity else "no_ppk", now)


def _without_ppk(
    engine: IkeEngine, sa: IkeSa, task: IkeAuthResponder, why: str, now: float
) -> tuple[list[Effect], bool]:
    from ikefarm.shared.ikev2.exchanges.ike_auth import _fail

    request, vpn = task.request, task.vpn
    if vpn.require_ppk:
        return _fail(engine, sa, request, "ppk_required", now, vpn=vpn.name, ppk=why), True
    identity = request.notify(NotifyType.PPK_IDENTITY)
    if identity is None:
        return [], False
    if request.notify(NotifyType.NO_PPK_AUTH) is None:
        # the peer signed only with its PPK: nothing we could verify
        return _fail(engine, sa, request, "ppk_unavailable", now, vpn=vpn.name), True
    engine.count(f"ppk_not_used.{why}")
    ppk_id = decode_ppk_identity(identity.data)
    return [_log(sa, "ppk_not_used", reason=why, ppk_id=ppk_id.hex() if ppk_id else None)], False


def peer_auth_data(sa: IkeSa, request: Message, auth: AuthPayload) -> bytes:
    """What the peer's AUTH is to be checked against: its NO_PPK_AUTH when it offered a PPK we
    did not use (RFC 8784 3), else the AUTH payload."""
    no_ppk_auth = request.notify(NotifyType.NO_PPK_AUTH)
    if not sa.ppk_used and request.notify(NotifyType.PPK_IDENTITY) and no_ppk_auth is not None:
        return no_ppk_auth.data
    return auth.data


def auth_response_notifies(sa: IkeSa) -> list[Payload]:
    """The responder's PPK_IDENTITY, without data, when it used the PPK (RFC 8784 3)."""
    return [NotifyPayload(NotifyType.PPK_IDENTITY)] if sa.ppk_used and not sa.is_initiator else []


# -- initiator ------------------------------------------------------------------------------


def initiator_start(engine: IkeEngine, sa: IkeSa, now: float) -> list[Effect]:
    """After IKE_SA_INIT: mix our PPK first when both sides sent USE_PPK, then sign."""
    from ikefarm.shared.ikev2.exchanges import ike_auth

    vpn = sa.vpn
    assert vpn is not None
    task = ike_auth.IkeAuthInitiator()
    if vpn.ppk is not None and sa.peer_use_ppk and vpn.ppk in engine.policy.ppks:
        return [_mix_request(engine, sa, task, engine.policy.ppks[vpn.ppk])]
    if vpn.require_ppk:
        reason = "peer_without_ppk" if vpn.ppk is not None else "no_ppk_configured"
        return ike_auth._initiator_failed(engine, sa, f"ppk_required.{reason}", now)
    effects: list[Effect] = []
    if vpn.ppk is not None:
        engine.count("ppk_not_used.peer_without_ppk")
        effects.append(_log(sa, "ppk_not_used", reason="peer_without_ppk", vpn=vpn.name))
    return effects + ike_auth.initiator_sign(engine, sa, task, now)


def initiator_signed(
    engine: IkeEngine, sa: IkeSa, task: IkeAuthInitiator, auth: bytes, now: float
) -> list[Effect] | None:
    """Our AUTH (with SK_pi') is signed; unless the PPK is required sign once more with the
    original SK_pi for NO_PPK_AUTH. None: nothing more to sign."""
    from ikefarm.shared.ikev2.exchanges import ike_auth

    assert sa.vpn is not None
    if sa.no_ppk_keys is None or sa.vpn.require_ppk:
        return None
    if task.ppk_auth is not None:
        task.no_ppk_auth = auth
        return None
    effects = ike_auth.initiator_sign(engine, sa, task, now, sk_pi=sa.no_ppk_keys.sk_pi)
    task.ppk_auth = auth
    return effects


def auth_request_notifies(sa: IkeSa, task: IkeAuthInitiator, engine: IkeEngine) -> list[Payload]:
    """PPK_IDENTITY (and NO_PPK_AUTH when it was signed) for our IKE_AUTH request."""
    if sa.no_ppk_keys is None or sa.vpn is None or sa.vpn.ppk is None:
        return []
    payloads: list[Payload] = [
        NotifyPayload(
            NotifyType.PPK_IDENTITY, data=encode_ppk_identity(engine.policy.ppks[sa.vpn.ppk])
        )
    ]
    if task.no_ppk_auth is not None:
        payloads.append(NotifyPayload(NotifyType.NO_PPK_AUTH, data=task.no_ppk_auth))
    return payloads


def our_auth(task: IkeAuthInitiator, signed: bytes) -> bytes:
    """The AUTH payload data: the one signed with SK_pi' when a NO_PPK_AUTH was signed after."""
    return task.ppk_auth if task.ppk_auth is not None else signed


def initiator_settle(engine: IkeEngine, sa: IkeSa, response: Message) -> str | None:
    """The responder's answer says whether it used the PPK; returns a failure reason or None."""
    used = response.notify(NotifyType.PPK_IDENTITY) is not None
    assert sa.vpn is not None
    if sa.no_ppk_keys is None:
        return "unexpected_ppk_identity" if used else None
    if used:
        sa.no_ppk_keys = None
        return None
    if sa.vpn.require_ppk:
        return "ppk_not_used_by_peer"
    # the peer authenticated us with NO_PPK_AUTH: back to the keys without PPK
    sa.keys, sa.no_ppk_keys, sa.ppk_used = sa.no_ppk_keys, None, False
    engine.count("ppk_not_used.declined_by_peer")
    return None


# -- keystore answers -----------------------------------------------------------------------


def _mixed_keys(reply: PpkMixed | None) -> IkeSaKeys | None:
    if reply is None or not reply.found or not isinstance(reply.keys, IkeSaKeys):
        return None
    return reply.keys


def initiator_mixed(
    engine: IkeEngine,
    sa: IkeSa,
    task: IkeAuthInitiator,
    reply: PpkMixed | None,
    error: str | None,
    now: float,
) -> list[Effect]:
    from ikefarm.shared.ikev2.exchanges import ike_auth

    if error is not None or reply is None:
        return ike_auth.initiator_keystore_unavailable(engine, sa, error, now)
    mixed = _mixed_keys(reply)
    if mixed is not None:
        sa.no_ppk_keys = sa.keys
        _apply_mixed(sa, mixed)
        return ike_auth.initiator_sign(engine, sa, task, now)
    assert sa.vpn is not None
    if sa.vpn.require_ppk:
        return ike_auth._initiator_failed(engine, sa, "ppk_required.no_ppk_in_keystore", now)
    engine.count("ppk_not_used.no_ppk_in_keystore")
    return [
        _log(sa, "ppk_not_used", reason="no_ppk_in_keystore"),
        *ike_auth.initiator_sign(engine, sa, task, now),
    ]


def responder_mixed(
    engine: IkeEngine,
    sa: IkeSa,
    task: IkeAuthResponder,
    reply: PpkMixed | None,
    error: str | None,
    now: float,
) -> list[Effect]:
    from ikefarm.shared.ikev2.exchanges import ike_auth

    if error is not None or reply is None:
        engine.count("keystore_unavailable")
        sa.state = IkeSaState.HALF_OPEN  # the peer retransmits, we ask again
        return [_log(sa, "keystore_unavailable", error=error or "no reply")]
    effects: list[Effect] = []
    mixed = _mixed_keys(reply)
    if mixed is not None:
        _apply_mixed(sa, mixed)
        effects.append(_log(sa, "ppk_used", level=2, ppk_id=task.ppk_id.hex()))
    else:
        sa.state = IkeSaState.HALF_OPEN
        effects, done = _without_ppk(engine, sa, task, "no_ppk_in_keystore", now)
        if done:
            return effects
    return effects + ike_auth.ask_keystore_auth(engine, sa, task)
