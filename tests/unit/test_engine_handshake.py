"""Two engines, one initiator and one responder, negotiate in memory (RFC 7296 1.2-1.4)."""

from __future__ import annotations

from dataclasses import replace

from ikefarm.shared.ikev2.constants import ExchangeType, NotifyType, ProtocolId
from ikefarm.shared.ikev2.effects import DeleteChildSa, InstallChildSa, KeystoreRequest, SaEvent
from ikefarm.shared.ikev2.exchanges.informational import IkeDeleteTask
from ikefarm.shared.ikev2.message import Message, encode_message, parse_message
from ikefarm.shared.ikev2.payloads import DeletePayload, NotifyPayload
from ikefarm.shared.ikev2.sa import IkeSaState
from tests.engine_helpers import pair


def established(wire):  # type: ignore[no-untyped-def]
    start = wire.initiator.engine.initiate("hq", "net", wire.now)
    wire.run(start, wire.initiator)
    (i_sa,) = wire.initiator.engine.sas.values()
    (r_sa,) = wire.responder.engine.sas.values()
    return i_sa, r_sa


def test_psk_handshake_establishes_ike_and_child_on_both_sides() -> None:
    wire = pair()
    i_sa, r_sa = established(wire)
    assert i_sa.state == r_sa.state == IkeSaState.ESTABLISHED
    assert (i_sa.spi_i, i_sa.spi_r) == (r_sa.spi_i, r_sa.spi_r)
    assert r_sa.spi_r[:2] == (1).to_bytes(2, "big") and i_sa.spi_i[:2] == (2).to_bytes(2, "big")
    (i_child,) = i_sa.children
    (r_child,) = r_sa.children
    assert i_child.spi_in == r_child.spi_out and i_child.spi_out == r_child.spi_in
    assert [str(s) for s in r_child.local_ts] == ["10.100.0.0/24"]
    assert [str(s) for s in r_child.remote_ts] == ["10.200.0.0/24"]
    assert i_child.keys == r_child.keys
    installs = [e.child for e in wire.responder.effects if isinstance(e, InstallChildSa)]
    assert len(installs) == 1 and installs[0].spi_in == r_child.spi_in
    assert installs[0].encr_key_in == i_child.keys.encr_i  # initiator-to-responder key inbound
    kinds = [e.kind for e in wire.responder.effects if isinstance(e, SaEvent)]
    assert kinds == ["ike-established", "child-installed"]
    # the PSK never travels in a keystore request
    for effect in wire.responder.effects + wire.initiator.effects:
        if isinstance(effect, KeystoreRequest):
            assert b"shared-secret" not in repr(effect.request).encode()


def test_wrong_psk_gives_authentication_failed_and_no_sa_remains() -> None:
    wire = pair(initiator_psk=b"not-the-right-secret")
    established_count = wire.responder.engine.counters
    start = wire.initiator.engine.initiate("hq", "net", wire.now)
    wire.run(start, wire.initiator)
    assert wire.responder.engine.sas == {}
    assert wire.initiator.engine.sas == {}
    assert established_count["auth_failed.auth_mismatch"] == 1
    assert wire.initiator.engine.counters["auth_failed.rejected_by_peer"] == 1
    last = parse_message(wire.log[-1][1])
    assert last.header.is_response and last.protected


def test_no_matching_proposal_is_refused_without_state() -> None:
    responder = (
        '[[ike.ike-policy-template]]\nname = "t"\n[[ike.ike-policy-template.ike-proposal]]\n'
        'aead-alg = "aes128-gcm-128"\nprf-alg = "hmac-sha256"\ndh-group = "ecp256"\n'
    )
    initiator = (
        '[[ike.ike-policy-template]]\nname = "t"\n[[ike.ike-policy-template.ike-proposal]]\n'
        'enc-alg = "aes256-cbc"\nauth-alg = "hmac-sha512"\ndh-group = "modp2048"\n'
    )
    wire = pair(
        responder,
        initiator,
        responder_vpn='ike-policy = { template = "t" }',
        initiator_vpn='ike-policy = { template = "t" }',
    )
    wire.run(wire.initiator.engine.initiate("hq", "net", wire.now), wire.initiator)
    assert wire.responder.engine.sas == {} and wire.initiator.engine.sas == {}
    assert wire.responder.engine.counters["ike_sa_init_refused.no_proposal_chosen"] == 1
    assert wire.initiator.engine.counters["initiation_failed.no_proposal_chosen"] == 1


def test_invalid_ke_payload_makes_the_initiator_retry_with_the_named_group() -> None:
    responder = (
        '[[ike.ike-policy-template]]\nname = "t"\n[[ike.ike-policy-template.ike-proposal]]\n'
        'aead-alg = "aes256-gcm-128"\nprf-alg = "hmac-sha256"\ndh-group = ["ecp256"]\n'
    )
    initiator = (
        '[[ike.ike-policy-template]]\nname = "t"\n[[ike.ike-policy-template.ike-proposal]]\n'
        'aead-alg = "aes256-gcm-128"\nprf-alg = "hmac-sha256"\ndh-group = ["x25519", "ecp256"]\n'
    )
    wire = pair(
        responder,
        initiator,
        responder_vpn='ike-policy = { template = "t" }',
        initiator_vpn='ike-policy = { template = "t" }',
    )
    i_sa, r_sa = established(wire)
    assert r_sa.algorithms.dh == 19 and i_sa.algorithms.dh == 19
    assert wire.responder.engine.counters["ike_sa_init_refused.invalid_ke_payload"] == 1
    assert wire.initiator.engine.counters["invalid_ke_retries"] == 1


def test_ts_unacceptable_keeps_the_ike_sa() -> None:
    wire = pair()
    # the initiator asks for a remote subnet the responder does not protect
    policy = wire.initiator.engine.policy
    vpn = policy.vpns[0]
    sp = replace(
        vpn.security_policies[0],
        remote_ts=replace(vpn.security_policies[0].remote_ts, subnet="10.99.0.0/24"),
    )
    wire.initiator.engine.policy = replace(policy, vpns=(replace(vpn, security_policies=(sp,)),))
    i_sa, r_sa = established(wire)
    assert i_sa.state == r_sa.state == IkeSaState.ESTABLISHED
    assert i_sa.children == [] and r_sa.children == []
    assert wire.responder.engine.counters["ts_unacceptable"] == 1
    assert wire.initiator.engine.counters["child_refused_by_peer"] == 1


def test_retransmitted_request_gets_the_cached_response() -> None:
    wire = pair()
    i_sa, r_sa = established(wire)
    auth_request = next(
        d for a, d in wire.log if a == "192.0.2.2" and parse_message(d).header.message_id == 1
    )
    before = len(wire.log)
    out = wire.responder.engine.receive(auth_request, r_sa.local, i_sa.local, wire.now)
    assert len(out) == 1 and out[0].data == wire.log[before - 1][1]
    assert wire.responder.engine.counters["retransmitted_responses"] == 1


def test_delete_from_peer_removes_children_and_sa() -> None:
    wire = pair()
    i_sa, _r_sa = established(wire)
    effects = wire.initiator.engine.send_request(
        i_sa,
        ExchangeType.INFORMATIONAL,
        [DeletePayload(ProtocolId.IKE, [])],
        wire.now,
        IkeDeleteTask(),
    )
    wire.run(effects, wire.initiator)
    assert wire.responder.engine.sas == {} and wire.initiator.engine.sas == {}
    assert any(isinstance(e, DeleteChildSa) for e in wire.responder.effects)


def test_unknown_spi_and_garbage_are_counted_not_raised() -> None:
    wire = pair()
    engine = wire.responder.engine
    i_sa, r_sa = established(wire)
    assert engine.receive(b"\x00" * 10, r_sa.local, i_sa.local, wire.now)
    assert engine.counters["dropped.truncated_header"] == 1
    request = bytearray(
        next(d for a, d in wire.log if a == "192.0.2.2" and parse_message(d).header.message_id == 1)
    )
    request[8:16] = b"\x00\x01" + b"\xff" * 6  # a responder SPI of our shard that does not exist
    engine.receive(bytes(request), r_sa.local, i_sa.local, wire.now)
    assert engine.counters["dropped.unknown_spi"] == 1
    assert r_sa.state == IkeSaState.ESTABLISHED


def test_cookie_request_makes_the_initiator_retry_with_the_cookie_first() -> None:
    """RFC 7296 2.6: the initiator repeats IKE_SA_INIT with the COOKIE notify as the
    first payload, and the responder's answer to that goes on to IKE_AUTH."""
    wire = pair()
    cookie = bytes(range(1, 21))
    asked: list[bool] = []

    def demand_cookie(side, effect) -> bool:  # type: ignore[no-untyped-def]
        request = parse_message(effect.data)
        if side is not wire.initiator or request.header.exchange_type != ExchangeType.IKE_SA_INIT:
            return False
        first = request.payloads[0]
        if isinstance(first, NotifyPayload) and first.notify_type == NotifyType.COOKIE:
            assert first.data == cookie
            return False
        asked.append(True)
        answer = Message(
            exchange_type=ExchangeType.IKE_SA_INIT,
            spi_i=request.header.spi_i,
            spi_r=bytes(8),
            message_id=0,
            is_initiator=False,
            is_response=True,
            payloads=[NotifyPayload(NotifyType.COOKIE, data=cookie)],
        )
        wire.run(
            wire.initiator.engine.receive(
                encode_message(answer), effect.remote, effect.local, wire.now
            ),
            wire.initiator,
            drop=demand_cookie,
        )
        return True

    wire.run(
        wire.initiator.engine.initiate("hq", "net", wire.now), wire.initiator, drop=demand_cookie
    )
    (i_sa,) = wire.initiator.engine.sas.values()
    (r_sa,) = wire.responder.engine.sas.values()
    assert asked == [True]
    assert i_sa.state == r_sa.state == IkeSaState.ESTABLISHED
    assert wire.initiator.engine.counters["cookie_retries"] == 1


def test_initiator_only_refuses_every_incoming_ike_sa_init() -> None:
    wire = pair(responder_extra="[ike.global-options]\ninitiator-only = true")
    wire.run(wire.initiator.engine.initiate("hq", "net", wire.now), wire.initiator)
    assert wire.responder.engine.sas == {} and wire.initiator.engine.sas == {}
    assert wire.responder.engine.counters["ike_sa_init_refused.initiator_only"] == 1
