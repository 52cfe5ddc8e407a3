"""EAP in IKE_AUTH as responder (RFC 7296 2.16; shared/ikev2/exchanges/eap.py) in the engine.

ikefarm's own initiator does not speak EAP, so the peer here is scripted: an initiator
engine makes the IKE SA (IKE_SA_INIT), its IKE_AUTH is taken off the wire, stripped of
AUTH and sent again, and the following IKE_AUTH requests (EAP responses, the last AUTH)
are built with that SA's keys. The keystore's relay is answered by `Radius`, a stand-in
for the keystore and its RADIUS server (the real ones are in tests/unit/test_radius_client
and tests/interop/test_eap_radius_strongswan). EAP-MD5 (RFC 3748 5.4) is the method.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ikefarm.proto.messages import EapAuthRequest, EapRelayReply, EapRelayRequest
from ikefarm.shared.ikev2.constants import AuthMethod, ExchangeType, NotifyType
from ikefarm.shared.ikev2.crypto.prf import Prf
from ikefarm.shared.ikev2.effects import KeystoreRequest, SendDatagram
from ikefarm.shared.ikev2.exchanges.ike_auth import signed_octets
from ikefarm.shared.ikev2.message import Message, decrypt_message, encode_message, parse_message
from ikefarm.shared.ikev2.payloads import AuthPayload, CpPayload, EapPayload, IdPayload
from ikefarm.shared.ikev2.sa import IkeSa, IkeSaState
from tests.engine_helpers import KEY_PAD, Wire, keystore_stand_in, pair

RADIUS = """
[[ike.radius-server]]
address = "127.0.0.1"
secret = "radius-secret"
"""
EAP_VPN = 'ike-policy = { remote-auth-method = "eap-radius" }'
PASSWORD = b"alice-password"
CHALLENGE = bytes(range(16))
MSK = bytes(range(64))


@dataclass
class Radius:
    """The keystore's relay and its RADIUS server, as EAP-MD5 with `password` (or a
    scripted answer per round)."""

    password: bytes = PASSWORD
    msk: bytes | None = None
    script: list[EapRelayReply | None] = field(default_factory=list)
    relayed: list[EapRelayRequest] = field(default_factory=list)

    def answer(self, request: EapRelayRequest) -> EapRelayReply | None:
        self.relayed.append(request)
        if self.script:
            return self.script.pop(0)
        eap = request.eap
        if eap[4] == 1:  # Response/Identity: an MD5-Challenge (RFC 3748 5.4)
            body = bytes((4, len(CHALLENGE))) + CHALLENGE
            ident = (eap[1] + 1) % 256
            return EapRelayReply(
                "challenge",
                eap=bytes((1, ident)) + struct.pack("!H", 4 + len(body)) + body,
                state=b"state-1",
                server=0,
            )
        expected = hashlib.md5(bytes((eap[1],)) + self.password + CHALLENGE).digest()
        if eap[4] == 4 and eap[6:22] == expected and request.state == b"state-1":
            sealed = b"sealed:" + self.msk if self.msk else b""
            return EapRelayReply(
                "accept",
                eap=bytes((3, eap[1], 0, 4)),
                sealed_msk=sealed,
                attributes={"address": ["10.9.0.42"], "dns": ["10.100.0.53"]},
                server=0,
            )
        return EapRelayReply("reject", eap=bytes((4, eap[1], 0, 4)), reason="access_reject")

    def auth(self, request: EapAuthRequest) -> object:
        """The keystore's AUTH from the MSK (services/keystore/eap.py, without the seal)."""
        from ikefarm.proto.messages import PskAuthReply

        msk = request.sealed_msk.removeprefix(b"sealed:")
        prf = Prf(request.prf_id)
        key = prf.compute(msk, KEY_PAD)
        if prf.compute(key, request.verify_octets) != request.verify_auth:
            return PskAuthReply(False, b"", "auth_mismatch")
        return PskAuthReply(True, prf.compute(key, request.sign_octets))


class EapPeer:
    """The scripted EAP initiator on one wire (see the module docstring)."""

    def __init__(self, responder_vpn: str = EAP_VPN, radius: Radius | None = None) -> None:
        self.wire: Wire = pair(RADIUS, responder_vpn=responder_vpn)
        self.radius = radius or Radius()
        self.taken: list[bytes] = []
        self.responses: list[Message] = []
        self.message_id = 1

        def take_auth(side, effect) -> bool:  # type: ignore[no-untyped-def]
            if side is self.wire.initiator and effect.data[18] == ExchangeType.IKE_AUTH:
                self.taken.append(effect.data)
                return True
            return False

        wire = self.wire
        wire.run(
            wire.initiator.engine.initiate("hq", "net", wire.now), wire.initiator, drop=take_auth
        )
        [self.isa] = wire.initiator.engine.sas.values()
        first = self.open(self.taken[0], outbound=True)
        self.first = [p for p in first.payloads if not isinstance(p, AuthPayload)]

    @property
    def rsa(self) -> IkeSa | None:
        sas = list(self.wire.responder.engine.sas.values())
        return sas[0] if sas else None

    def open(self, datagram: bytes, *, outbound: bool = False) -> Message:
        keys = self.isa.outbound_keys() if outbound else self.isa.inbound_keys()
        assert self.isa.protection is not None
        return decrypt_message(parse_message(datagram), self.isa.protection, *keys)

    def send(self, payloads: list, message_id: int | None = None) -> Message | None:  # type: ignore[type-arg]
        """One IKE_AUTH request to the responder; its response (decrypted), if any."""
        message = Message(
            ExchangeType.IKE_AUTH,
            self.isa.spi_i,
            self.isa.spi_r,
            self.message_id if message_id is None else message_id,
            is_initiator=True,
            is_response=False,
            payloads=payloads,
            protected=True,
        )
        assert self.isa.protection is not None
        datagram = encode_message(message, self.isa.protection, *self.isa.outbound_keys())
        wire, responder = self.wire, self.wire.responder
        queue = responder.engine.receive(datagram, self.isa.remote, self.isa.local, wire.now)
        answer: Message | None = None
        while queue:
            effect = queue.pop(0)
            responder.effects.append(effect)
            if isinstance(effect, KeystoreRequest):
                call = effect.request
                if isinstance(call, EapRelayRequest):
                    reply = self.radius.answer(call)
                    error = None if reply is not None else "TimeoutError"
                elif isinstance(call, EapAuthRequest):
                    reply, error = self.radius.auth(call), None  # type: ignore[assignment]
                else:
                    reply, error = keystore_stand_in(responder.psk, call, effect.operation), None  # type: ignore[assignment]
                queue += responder.engine.keystore_reply(effect.request_id, reply, wire.now, error)
            elif isinstance(effect, SendDatagram):
                answer = self.open(effect.data)
        if answer is not None:
            self.responses.append(answer)
            self.message_id += 1
        return answer

    def eap_response(self, request: Message, password: bytes = PASSWORD) -> list:  # type: ignore[type-arg]
        eap = request.get(EapPayload)
        assert eap is not None and eap.code == 1
        if eap.eap_type == 1:
            return [EapPayload(bytes((2, eap.identifier, 0, 10, 1)) + b"alice")]
        digest = hashlib.md5(bytes((eap.identifier,)) + password + CHALLENGE).digest()
        return [EapPayload(bytes((2, eap.identifier, 0, 22, 4, 16)) + digest)]

    def our_auth(self, key: bytes | None = None) -> AuthPayload:
        """The initiator's last AUTH: MSK or SK_pi as the shared key (RFC 7296 2.16)."""
        assert self.isa.keys is not None and self.isa.prf is not None
        idi = next(p for p in self.first if isinstance(p, IdPayload))
        octets = signed_octets(
            self.isa.init_request, self.isa.nonce_r, self.isa.keys.sk_pi, idi, self.isa
        )
        prf = self.isa.prf
        shared = prf.compute(key or self.isa.keys.sk_pi, KEY_PAD)
        return AuthPayload(AuthMethod.SHARED_KEY_MIC, prf.compute(shared, octets))

    def run(self, password: bytes = PASSWORD) -> Message | None:
        """The whole conversation; the last response."""
        answer = self.send(self.first)
        while answer is not None and answer.get(EapPayload) is not None:
            eap = answer.get(EapPayload)
            assert eap is not None
            if eap.code == 3:
                return self.send([self.our_auth(self.radius.msk)])
            if eap.code == 4:
                return answer
            answer = self.send(self.eap_response(answer, password))
        return answer


def test_eap_md5_without_msk_establishes_the_sa_and_its_child() -> None:
    peer = EapPeer()
    first = peer.send(peer.first)
    assert first is not None
    assert [type(p).__name__ for p in first.payloads] == ["IdPayload", "AuthPayload", "EapPayload"]
    eap = first.get(EapPayload)
    assert eap is not None and (eap.code, eap.eap_type) == (1, 1)  # Request/Identity
    assert peer.rsa is not None and peer.rsa.state == IkeSaState.HALF_OPEN
    answer = peer.send(peer.eap_response(first))
    assert answer is not None and answer.get(EapPayload).eap_type == 4  # type: ignore[union-attr]
    [relayed] = peer.radius.relayed
    assert relayed.identity == b"alice" and relayed.state == b"" and relayed.server == -1
    success = peer.send(peer.eap_response(answer))
    assert success is not None and success.get(EapPayload).code == 3  # type: ignore[union-attr]
    assert peer.radius.relayed[1].state == b"state-1" and peer.radius.relayed[1].server == 0
    last = peer.send([peer.our_auth()])
    assert last is not None
    auth = last.get(AuthPayload)
    assert auth is not None and last.notify(NotifyType.AUTHENTICATION_FAILED) is None
    # the responder's last AUTH is keyed by SK_pr (no MSK)
    rsa = peer.rsa
    assert rsa is not None and rsa.state == IkeSaState.ESTABLISHED and len(rsa.children) == 1
    assert rsa.auth_methods == {"local_auth": "SHARED_KEY_MIC", "remote_auth": "EAP"}
    counters = peer.wire.responder.engine.counters
    assert counters["eap.without_msk"] == 1 and counters["ike_sa_established"] == 1
    # a retransmission of the last request gets the cached answer again
    assert peer.send([peer.our_auth()], message_id=last.message_id) is not None


def test_an_msk_keys_both_last_auths_and_radius_attributes_make_the_vip() -> None:
    vpn = EAP_VPN + '\nvip-pool = ["radius"]'
    peer = EapPeer(vpn, Radius(msk=MSK))
    from ikefarm.shared.ikev2.constants import CfgAttribute, CfgType
    from ikefarm.shared.ikev2.payloads import ConfigAttribute

    peer.first.append(
        CpPayload(
            CfgType.CFG_REQUEST,
            [
                ConfigAttribute(CfgAttribute.INTERNAL_IP4_ADDRESS),
                ConfigAttribute(CfgAttribute.INTERNAL_IP4_DNS),
            ],
        )
    )
    last = peer.run()
    assert last is not None and last.get(AuthPayload) is not None
    rsa = peer.rsa
    assert rsa is not None and rsa.state == IkeSaState.ESTABLISHED
    assert rsa.remote_vips == [("radius", "10.9.0.42")]
    cp = last.get(CpPayload)
    assert cp is not None and cp.cfg_type == CfgType.CFG_REPLY
    assert {str(a.address()) for a in cp.attributes} == {"10.9.0.42", "10.100.0.53"}
    assert peer.wire.responder.engine.counters["eap.without_msk"] == 0
    # the SA goes: nothing to release in a lease store (the pool was its own)
    effects = peer.wire.responder.engine.remove_sa(rsa, "test", peer.wire.now)
    assert not [e for e in effects if type(e).__name__ == "VipRelease"]


def test_a_wrong_password_is_answered_with_eap_failure_and_authentication_failed() -> None:
    peer = EapPeer()
    last = peer.run(password=b"wrong")
    assert last is not None and last.notify(NotifyType.AUTHENTICATION_FAILED) is not None
    assert last.get(EapPayload).code == 4  # type: ignore[union-attr]
    assert peer.rsa is None
    assert peer.wire.responder.engine.counters["auth_failed.access_reject"] == 1


def test_a_wrong_last_auth_fails() -> None:
    peer = EapPeer()
    answer = peer.send(peer.first)
    while answer is not None and answer.get(EapPayload).code == 1:  # type: ignore[union-attr]
        answer = peer.send(peer.eap_response(answer))
    last = peer.send([AuthPayload(AuthMethod.SHARED_KEY_MIC, bytes(48))])
    assert last is not None and last.notify(NotifyType.AUTHENTICATION_FAILED) is not None
    assert peer.rsa is None


def test_a_silent_radius_decides_nothing_and_the_retransmission_is_relayed_again() -> None:
    peer = EapPeer(radius=Radius(script=[None]))
    first = peer.send(peer.first)
    assert first is not None
    response = peer.eap_response(first)
    assert peer.send(response) is None  # no answer yet
    assert peer.rsa is not None and peer.rsa.state == IkeSaState.HALF_OPEN
    again = peer.send(response)  # the peer's retransmission
    assert again is not None and again.get(EapPayload).eap_type == 4  # type: ignore[union-attr]
    assert len(peer.radius.relayed) == 2
    assert peer.wire.responder.engine.counters["eap.radius_unavailable"] == 1


def test_a_vpn_without_eap_refuses_a_peer_without_auth() -> None:
    peer = EapPeer(responder_vpn="")
    answer = peer.send(peer.first)
    assert answer is not None and answer.notify(NotifyType.AUTHENTICATION_FAILED) is not None
    assert peer.wire.responder.engine.counters["auth_failed.eap_not_supported"] == 1


eap_octets = st.builds(
    lambda code, ident, body: bytes((code, ident)) + struct.pack("!H", 4 + len(body)) + body,
    st.integers(0, 255),
    st.integers(0, 255),
    st.binary(max_size=40),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    peer_eap=st.lists(eap_octets, min_size=1, max_size=3),
    server=st.lists(
        st.builds(
            EapRelayReply,
            outcome=st.sampled_from(["challenge", "accept", "reject", "error", "nonsense"]),
            eap=st.binary(max_size=30) | eap_octets,
            state=st.binary(max_size=8),
            server=st.integers(-3, 3),
            sealed_msk=st.binary(max_size=8),
            attributes=st.dictionaries(
                st.sampled_from(["address", "dns", "x"]), st.lists(st.text(max_size=12), max_size=2)
            ),
        ),
        max_size=3,
    ),
)
def test_any_eap_payloads_and_relay_answers_are_answered_or_fail_cleanly(
    peer_eap: list[bytes], server: list[EapRelayReply]
) -> None:
    peer = EapPeer(radius=Radius(script=list(server)))
    first = peer.send(peer.first)
    assert first is not None
    for data in peer_eap:
        try:
            payload = EapPayload(data)
            payload.check()
        except Exception:
            continue  # the codec refuses it before the engine sees it
        peer.send([payload])
        rsa = peer.rsa
        if rsa is None:
            break
        assert rsa.state in (IkeSaState.HALF_OPEN, IkeSaState.AUTHENTICATING)
