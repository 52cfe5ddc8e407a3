"""RFC 8784 PPKs between two engines in memory, both roles, with the keystore stand-in mixing."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from ikefarm.shared.ikev2.constants import ExchangeType, NotifyType, PrfId
from ikefarm.shared.ikev2.crypto.keys import IkeSaKeys, mix_ppk
from ikefarm.shared.ikev2.crypto.prf import Prf
from ikefarm.shared.ikev2.effects import KeystoreRequest, SendDatagram
from ikefarm.shared.ikev2.exchanges.ppk import decode_ppk_identity, encode_ppk_identity
from ikefarm.shared.ikev2.message import Message, decrypt_message, parse_message
from ikefarm.shared.ikev2.sa import IkeSa, IkeSaState
from ikefarm.shared.ikev2.show import ike_sa_row
from tests.engine_helpers import Wire, pair

PPK = b"post-quantum-preshared-key-0123456789abcdef"
OTHER = b"some-other-ppk-nobody-shares-here"
PPKS = '\n[[ike.ppk]]\nname = "{name}"\nid = "{id}"\nsecret = "{secret}"\n'


def ppk_table(name: str, identity: str, secret: bytes) -> str:
    return PPKS.format(name=name, id=identity, secret=secret.decode())


def ppk_wire(
    initiator: dict[str, bytes] | None = None,
    responder: dict[str, bytes] | None = None,
    *,
    initiator_vpn: str = "",
    responder_vpn: str = "",
    responder_extra: str = "",
    responder_keystore: dict[bytes, bytes] | None = None,
) -> Wire:
    """Two engines with these PPKs (PPK_ID -> PPK, each named after its PPK_ID) configured and in
    their keystores; the initiator's VPN uses its first one."""
    initiator, responder = initiator or {}, responder or {}
    first = next(iter(initiator), None)
    return pair(
        responder_extra=responder_extra + "".join(ppk_table(k, k, v) for k, v in responder.items()),
        initiator_extra="".join(ppk_table(k, k, v) for k, v in initiator.items()),
        initiator_vpn=(f'ppk = "{first}"\n' if first else "") + initiator_vpn,
        responder_vpn=responder_vpn,
        initiator_ppks={k.encode(): v for k, v in initiator.items()},
        responder_ppks=(
            {k.encode(): v for k, v in responder.items()}
            if responder_keystore is None
            else responder_keystore
        ),
    )


def run(wire: Wire) -> tuple[IkeSa | None, IkeSa | None]:
    wire.run(wire.initiator.engine.initiate("hq", "net", wire.now), wire.initiator)
    i_sas = list(wire.initiator.engine.sas.values())
    r_sas = list(wire.responder.engine.sas.values())
    return (i_sas[0] if i_sas else None), (r_sas[0] if r_sas else None)


def ike_auth_messages(wire: Wire, i_sa: IkeSa) -> list[Message]:
    """The IKE_AUTH request and response as the peers saw them, decrypted."""
    assert i_sa.keys is not None and i_sa.protection is not None
    out = []
    for sender, data in wire.log:
        parsed = parse_message(data)
        if parsed.header.exchange_type != ExchangeType.IKE_AUTH:
            continue
        from_initiator = sender == wire.initiator.address
        sk_e, sk_a = i_sa.keys.outbound(from_initiator)
        out.append(decrypt_message(parsed, i_sa.protection, sk_e, sk_a))
    return out


def init_notifies(wire: Wire) -> list[set[int]]:
    return [
        {n.notify_type for n in parse_message(d).message.notifies()}  # type: ignore[union-attr]
        for _s, d in wire.log
        if parse_message(d).header.exchange_type == ExchangeType.IKE_SA_INIT
    ]


def both_established(i_sa: IkeSa | None, r_sa: IkeSa | None) -> tuple[IkeSa, IkeSa]:
    assert i_sa is not None and r_sa is not None
    assert i_sa.state == r_sa.state == IkeSaState.ESTABLISHED
    return i_sa, r_sa


def test_ppk_used_both_roles_and_keys_agree() -> None:
    wire = ppk_wire({"ppk-id-1": PPK}, {"ppk-id-1": PPK})
    i_sa, r_sa = both_established(*run(wire))
    assert i_sa.ppk_used and r_sa.ppk_used
    assert i_sa.keys == r_sa.keys and i_sa.no_ppk_keys is None
    assert [NotifyType.USE_PPK in n for n in init_notifies(wire)] == [True, True]
    request, response = ike_auth_messages(wire, i_sa)
    identity = request.notify(NotifyType.PPK_IDENTITY)
    assert identity is not None and identity.data == b"\x02ppk-id-1"  # PPK_ID_FIXED
    assert request.notify(NotifyType.NO_PPK_AUTH) is not None  # not required: both AUTHs
    answer = response.notify(NotifyType.PPK_IDENTITY)
    assert answer is not None and answer.data == b""
    (i_child,), (r_child,) = i_sa.children, r_sa.children
    assert i_child.keys == r_child.keys  # from SK_d', the same on both sides
    assert ike_sa_row(r_sa, wire.now)["proposal"].endswith("/PPK")
    assert ike_sa_row(i_sa, wire.now)["ppk_used"] is True
    # the PPK is never in what the engine asks the keystore: only its PPK_ID
    for effect in wire.initiator.effects + wire.responder.effects:
        if isinstance(effect, KeystoreRequest):
            assert PPK not in repr(effect.request).encode()
            assert PPK.hex() not in repr(effect.request)


def test_unknown_ppk_id_not_required_establishes_without_ppk() -> None:
    wire = ppk_wire({"unknown-id": PPK}, {"other-id": OTHER})
    i_sa, r_sa = both_established(*run(wire))
    assert not i_sa.ppk_used and not r_sa.ppk_used
    assert i_sa.keys == r_sa.keys  # the initiator went back to the keys without PPK
    assert wire.responder.engine.counters["ppk_not_used.unknown_ppk_id"] == 1
    assert wire.initiator.engine.counters["ppk_not_used.declined_by_peer"] == 1
    assert i_sa.children[0].keys == r_sa.children[0].keys
    assert not ike_sa_row(r_sa, wire.now)["proposal"].endswith("/PPK")


def test_responder_vpn_ppk_forbids_any_other_ppk() -> None:
    # both PPKs are configured on the responder, but its VPN names "a": "b" is not accepted
    wire = ppk_wire({"id-b": PPK}, {"id-a": OTHER, "id-b": PPK}, responder_vpn='ppk = "id-a"')
    i_sa, r_sa = both_established(*run(wire))
    assert not i_sa.ppk_used and not r_sa.ppk_used


def test_required_on_responder_and_absent_on_peer_is_authentication_failed() -> None:
    wire = ppk_wire(responder={"id": PPK}, responder_vpn="ike-policy = { require-ppk = true }")
    i_sa, r_sa = run(wire)
    assert i_sa is None and r_sa is None
    assert wire.responder.engine.counters["auth_failed.ppk_required"] == 1
    assert wire.initiator.engine.counters["auth_failed.rejected_by_peer"] == 1
    last = parse_message(wire.log[-1][1])
    assert last.header.is_response and last.header.exchange_type == ExchangeType.IKE_AUTH


def test_required_by_template_overridable_per_vpn() -> None:
    template = (
        '\n[[ike.ike-policy-template]]\nname = "t"\nrequire-ppk = true\n'
        "[[ike.ike-policy-template.ike-proposal]]\n"
        'aead-alg = "aes256-gcm-128"\nprf-alg = "hmac-sha256"\ndh-group = "x25519"\n'
    )
    required = ppk_wire(
        responder={"id": PPK},
        responder_extra=template,
        responder_vpn='ike-policy = { template = "t" }',
    )
    assert run(required) == (None, None)
    assert required.responder.engine.counters["auth_failed.ppk_required"] == 1
    relaxed = ppk_wire(
        responder={"id": PPK},
        responder_extra=template,
        responder_vpn='ike-policy = { template = "t", require-ppk = false }',
    )
    _, r_sa = both_established(*run(relaxed))
    assert not r_sa.ppk_used


def test_required_on_initiator_with_peer_without_ppk_fails_before_auth() -> None:
    wire = ppk_wire({"id": PPK}, initiator_vpn="ike-policy = { require-ppk = true }")
    assert run(wire) == (None, None) or wire.initiator.engine.sas == {}
    assert wire.initiator.engine.counters["auth_failed.ppk_required.peer_without_ppk"] == 1
    sent = [parse_message(d).header.exchange_type for s, d in wire.log if s == "192.0.2.2"]
    assert ExchangeType.IKE_AUTH not in sent


def test_required_on_both_sends_no_no_ppk_auth() -> None:
    wire = ppk_wire(
        {"id": PPK},
        {"id": PPK},
        initiator_vpn="ike-policy = { require-ppk = true }",
        responder_vpn="ike-policy = { require-ppk = true }",
    )
    i_sa, r_sa = both_established(*run(wire))
    assert i_sa.ppk_used and r_sa.ppk_used
    request, _ = ike_auth_messages(wire, i_sa)
    assert request.notify(NotifyType.NO_PPK_AUTH) is None


def test_peer_insisting_on_an_unknown_ppk_fails() -> None:
    # the initiator requires its PPK (no NO_PPK_AUTH); the responder has another one
    wire = ppk_wire(
        {"q-id": PPK}, {"r-id": OTHER}, initiator_vpn="ike-policy = { require-ppk = true }"
    )
    assert run(wire) == (None, None)
    assert wire.responder.engine.counters["auth_failed.ppk_unavailable"] == 1


def test_keystore_without_the_ppk_falls_back_when_allowed() -> None:
    # the policy names the PPK_ID but the responder's keystore has no such secret
    wire = ppk_wire({"id": PPK}, {"id": PPK}, responder_keystore={})
    i_sa, r_sa = both_established(*run(wire))
    assert not i_sa.ppk_used and not r_sa.ppk_used
    assert wire.responder.engine.counters["ppk_not_used.no_ppk_in_keystore"] == 1


def test_no_use_ppk_from_a_responder_without_ppks() -> None:
    wire = ppk_wire({"id": PPK})
    i_sa, _ = both_established(*run(wire))
    assert [NotifyType.USE_PPK in n for n in init_notifies(wire)] == [True, False]
    assert not i_sa.ppk_used
    assert wire.initiator.engine.counters["ppk_not_used.peer_without_ppk"] == 1
    requests = [e for e in wire.initiator.effects if isinstance(e, KeystoreRequest)]
    assert all(r.operation != "ppk-mix" for r in requests)


def test_ppk_identity_encoding() -> None:
    assert encode_ppk_identity(b"bar") == b"\x02bar"
    assert decode_ppk_identity(b"\x02bar") == b"bar"
    assert decode_ppk_identity(b"\x01\x07\x00") == b"\x07\x00"  # PPK_ID_OPAQUE
    assert decode_ppk_identity(b"\x02") is None and decode_ppk_identity(b"\x09ab") is None


def _prf_plus(digest: str, key: bytes, seed: bytes, length: int) -> bytes:
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.new(key, block + seed + bytes([counter]), digest).digest()
        out += block
        counter += 1
    return out[:length]


@pytest.mark.parametrize(
    ("prf_id", "digest"),
    [(PrfId.HMAC_SHA2_256, "sha256"), (PrfId.HMAC_SHA2_384, "sha384"), (PrfId.HMAC_SHA1, "sha1")],
)
def test_mix_ppk_is_prf_plus_keyed_with_the_ppk(prf_id: int, digest: str) -> None:
    """RFC 8784 3: SK_d' = prf+(PPK, SK_d) etc., each the PRF's preferred key length."""
    size = hashlib.new(digest).digest_size
    keys = IkeSaKeys(
        bytes(range(size)), b"ai", b"ar", b"ei", b"er", bytes([1]) * size, bytes([2]) * size
    )
    mixed = mix_ppk(Prf(prf_id), PPK, keys)
    assert mixed.sk_d == _prf_plus(digest, PPK, keys.sk_d, size)
    assert mixed.sk_pi == _prf_plus(digest, PPK, keys.sk_pi, size)
    assert mixed.sk_pr == _prf_plus(digest, PPK, keys.sk_pr, size)
    assert (mixed.sk_ai, mixed.sk_ar, mixed.sk_ei, mixed.sk_er) == (b"ai", b"ar", b"ei", b"er")
    # one block of HMAC-SHA-256 by hand: T1 = prf(PPK, SK_d | 0x01)
    if digest == "sha256":
        assert mixed.sk_d == hmac.new(PPK, keys.sk_d + b"\x01", "sha256").digest()


def test_keystore_unavailable_during_mix_keeps_the_responder_half_open() -> None:
    wire = ppk_wire({"id": PPK}, {"id": PPK})
    captured: list[KeystoreRequest] = []
    responder = wire.responder.engine
    original = responder.keystore_reply

    def fail_first(request_id, reply, now, error=None):  # type: ignore[no-untyped-def]
        if not captured:
            captured.append(request_id)
            return original(request_id, None, now, error="TimeoutError")
        return original(request_id, reply, now, error)

    responder.keystore_reply = fail_first  # type: ignore[method-assign]
    wire.run(wire.initiator.engine.initiate("hq", "net", wire.now), wire.initiator)
    (r_sa,) = responder.sas.values()
    assert r_sa.state == IkeSaState.HALF_OPEN and responder.counters["keystore_unavailable"] == 1
    # the initiator retransmits its IKE_AUTH: this time the keystore answers
    (i_sa,) = wire.initiator.engine.sas.values()
    assert i_sa.outstanding is not None
    wire.run(
        [SendDatagram(i_sa.local, i_sa.remote, d) for d in i_sa.outstanding.datagrams],
        wire.initiator,
    )
    i_sa, r_sa = both_established(i_sa, r_sa)
    assert i_sa.ppk_used and r_sa.ppk_used


def test_same_ppk_id_with_another_secret_is_authentication_failed() -> None:
    # the PPK is used (its PPK_ID is known), so there is no falling back to NO_PPK_AUTH
    wire = ppk_wire({"id": PPK}, {"id": OTHER})
    assert run(wire) == (None, None)
    assert wire.responder.engine.counters["auth_failed.auth_mismatch"] == 1
    assert wire.initiator.engine.counters["auth_failed.rejected_by_peer"] == 1
