"""Certificate authentication: AUTH signatures (RFC 7296 2.15, 3.8; RFC 4754; RFC 7427),
identities against certificates (RFC 4945 3.1), chain and CRL checks, and two engines
authenticating each other with certificates through the keystore's code."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ikefarm.proto.messages import CertAuthRequest
from ikefarm.services.keystore.certs import CertStore, cert_auth
from ikefarm.services.keystore.psk import UnknownPurpose
from ikefarm.shared.config.loader import parse_config
from ikefarm.shared.ikev2 import management
from ikefarm.shared.ikev2.certs import (
    certreq_authority,
    dn_from_text,
    identity_names_certificate,
)
from ikefarm.shared.ikev2.constants import AuthMethod, HashAlgorithm, IdType, NotifyType
from ikefarm.shared.ikev2.crypto.prf import Prf
from ikefarm.shared.ikev2.crypto.signature import (
    SCHEMES,
    SignatureError,
    hash_algorithms_data,
    parse_hash_algorithms,
    sign,
    verify,
)
from ikefarm.shared.ikev2.effects import KeystoreRequest
from ikefarm.shared.ikev2.engine import IkeEngine
from ikefarm.shared.ikev2.exchanges.auth_methods import identity_payload
from ikefarm.shared.ikev2.exchanges.ike_auth import signed_octets
from ikefarm.shared.ikev2.management import Watches, parse_words
from ikefarm.shared.ikev2.message import parse_message
from ikefarm.shared.ikev2.payloads import CertPayload, CertReqPayload, IdPayload
from ikefarm.shared.ikev2.policy import engine_policy
from ikefarm.shared.ikev2.sa import IkeSaState
from tests.engine_helpers import Side, Wire
from tests.pki import NOW, Pki, cert_vpn_toml, name, new_key

ALL_HASHES = [int(h) for h in HashAlgorithm]
OCTETS = b"RealMessage1 | NonceRData | prf(SK_pi, RestOfInitIDPayload)"


@pytest.fixture(scope="module")
def rsa_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("rsa"), "rsa")


@pytest.fixture(scope="module")
def ec_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("ec"), "ecdsa")


# -- RFC 7427 AlgorithmIdentifier encoding --------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "digest", "scheme_name"),
    [
        ("rsa", hashes.SHA256(), "sha256WithRSAEncryption"),
        ("rsa", hashes.SHA384(), "sha384WithRSAEncryption"),
        ("rsa", hashes.SHA512(), "sha512WithRSAEncryption"),
        ("ecdsa", hashes.SHA256(), "ecdsa-with-SHA256"),
        ("ecdsa", hashes.SHA384(), "ecdsa-with-SHA384"),
        ("ecdsa", hashes.SHA512(), "ecdsa-with-SHA512"),
    ],
)
def test_algorithm_identifiers_are_the_der_a_certificate_carries(
    tmp_path: Path, kind: str, digest: hashes.HashAlgorithm, scheme_name: str
) -> None:
    """RFC 7427 3 / Appendix A: the same DER AlgorithmIdentifier X.509 uses for the signature."""
    from cryptography import x509

    key = new_key(kind)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name("x"))
        .issuer_name(name("x"))
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW)
        .not_valid_after(NOW)
        .sign(key, digest)
    )
    (scheme,) = [s for s in SCHEMES if s.name == scheme_name]
    # Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signatureValue }
    tbs = cert.tbs_certificate_bytes
    outer = cert.public_bytes(Encoding.DER)
    after_tbs = outer[outer.index(tbs) + len(tbs) :]
    assert after_tbs.startswith(scheme.algorithm_identifier)
    data = scheme.auth_data(b"SIG")
    assert data[0] == len(scheme.algorithm_identifier) and data.endswith(b"SIG")


def test_signature_hash_algorithms_notify_data_round_trips() -> None:
    data = hash_algorithms_data()
    assert data == bytes.fromhex("0002000300040005")  # SHA2-256/384/512, Identity (RFC 7427 7)
    assert parse_hash_algorithms(data) == (2, 3, 4, 5)
    assert parse_hash_algorithms(data + b"\x01") == (2, 3, 4, 5)  # odd octet ignored


# -- AUTH values --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "expected", "length"),
    [
        ("rsa", AuthMethod.RSA_DIGITAL_SIGNATURE, 256),
        ("ecdsa", AuthMethod.ECDSA_SHA256_P256, 64),
        ("ecdsa384", AuthMethod.ECDSA_SHA384_P384, 96),
        ("ecdsa521", AuthMethod.ECDSA_SHA512_P521, 132),
    ],
)
def test_without_rfc7427_the_key_gives_its_classic_method(kind: str, expected, length) -> None:  # type: ignore[no-untyped-def]
    key = new_key(kind)
    method, data = sign(key, OCTETS, [])
    assert method == expected and len(data) == length  # RFC 4754 7: r | s fixed length
    verify(key.public_key(), method, data, OCTETS)
    with pytest.raises(SignatureError) as refused:
        verify(key.public_key(), method, data, OCTETS + b"x")
    assert refused.value.reason == "auth_mismatch"


@pytest.mark.parametrize(
    ("kind", "peer", "scheme_name"),
    [
        ("rsa", ALL_HASHES, "sha256WithRSAEncryption"),
        ("rsa", [4], "sha512WithRSAEncryption"),
        ("ecdsa", ALL_HASHES, "ecdsa-with-SHA256"),
        ("ecdsa384", ALL_HASHES, "ecdsa-with-SHA384"),
        ("ecdsa", [3], "ecdsa-with-SHA384"),
    ],
)
def test_rfc7427_digital_signature_when_the_peer_announced_hashes(
    kind: str, peer: list[int], scheme_name: str
) -> None:
    key = new_key(kind)
    method, data = sign(key, OCTETS, peer)
    assert method == AuthMethod.DIGITAL_SIGNATURE
    (scheme,) = [s for s in SCHEMES if s.name == scheme_name]
    assert data[1 : 1 + data[0]] == scheme.algorithm_identifier
    verify(key.public_key(), method, data, OCTETS)


def test_a_signature_from_another_key_or_method_is_refused() -> None:
    key, other = new_key("ecdsa"), new_key("rsa")
    method, data = sign(key, OCTETS, ALL_HASHES)
    for public, claimed, value, reason in [
        (other.public_key(), method, data, "key_type_mismatch"),
        (key.public_key(), AuthMethod.ECDSA_SHA384_P384, data, "key_type_mismatch"),
        (key.public_key(), AuthMethod.SHARED_KEY_MIC, data, "unsupported_auth_method"),
        (key.public_key(), method, b"", "malformed_auth"),
        (key.public_key(), method, b"\x0c\x30\x0a", "malformed_auth"),
        (key.public_key(), method, b"\x02\x30\x00", "unsupported_signature_algorithm"),
    ]:
        with pytest.raises(SignatureError) as refused:
            verify(public, claimed, value, OCTETS)
        assert refused.value.reason == reason


def test_signed_octets_are_message_nonce_and_prf_of_the_id_body() -> None:
    """RFC 7296 2.15: RealMessage1 | NonceRData | prf(SK_pi, RestOfInitIDPayload)."""

    class FakeSa:
        prf = Prf(5)  # PRF_HMAC_SHA2_256

    idi = IdPayload.from_fqdn("peer.example")
    octets = signed_octets(b"MSG1", b"NONCE", b"K" * 32, idi, FakeSa())  # type: ignore[arg-type]
    mac = hmac.HMAC(b"K" * 32, hashes.SHA256())
    mac.update(bytes([IdType.ID_FQDN, 0, 0, 0]) + b"peer.example")
    assert octets == b"MSG1NONCE" + mac.finalize()


# -- identities ---------------------------------------------------------------------------


def test_identities_are_matched_against_subject_and_subject_alt_names(rsa_pki: Pki) -> None:
    issued = rsa_pki.issue("alice", dns="alice.example", email="alice@example", ip="192.0.2.9")
    cert = issued.cert
    subject = cert.subject.public_bytes()
    assert identity_names_certificate(IdType.ID_DER_ASN1_DN, subject, cert)
    assert identity_names_certificate(IdType.ID_FQDN, b"ALICE.example", cert)
    assert identity_names_certificate(IdType.ID_RFC822_ADDR, b"alice@example", cert)
    assert identity_names_certificate(IdType.ID_IPV4_ADDR, bytes([192, 0, 2, 9]), cert)
    assert not identity_names_certificate(IdType.ID_FQDN, b"bob.example", cert)
    assert not identity_names_certificate(IdType.ID_IPV4_ADDR, bytes([192, 0, 2, 8]), cert)
    assert not identity_names_certificate(IdType.ID_DER_ASN1_DN, b"\x30\x00", cert)
    assert not identity_names_certificate(IdType.ID_KEY_ID, b"alice", cert)
    # a DN written in the config as strongSwan writes it is that certificate's subject
    text = "C=CH, O=ikefarm tests, CN=alice.example"
    assert dn_from_text(text).public_bytes() == subject
    assert identity_payload(text, IdPayload.WIRE_TYPES[0]).data == subject


# -- chains and CRLs ----------------------------------------------------------------------


def _store(pki: Pki, crl: Path | None = None) -> CertStore:
    from ikefarm.shared.ikev2.certs import load_certificates, load_crl

    return CertStore((), load_certificates(pki.ca_path), [load_crl(crl)] if crl else [])


def _peer_request(issued, octets: bytes, id_data: bytes, **over) -> CertAuthRequest:  # type: ignore[no-untyped-def]
    method, auth = sign(issued.key, octets, ALL_HASHES)
    params = {
        "vpn": "v",
        "purpose": "verify",
        "verify_octets": octets,
        "verify_method": int(method),
        "verify_auth": auth,
        "peer_certs": [issued.cert.public_bytes(Encoding.DER)],
        "peer_id_type": int(IdType.ID_FQDN),
        "peer_id_data": id_data,
    }
    params.update(over)
    return CertAuthRequest(**params)


def test_chain_crl_identity_and_signature_checks(rsa_pki: Pki, tmp_path: Path) -> None:
    good = rsa_pki.issue("good", dns="good.example")
    store = _store(rsa_pki)
    assert cert_auth(store, _peer_request(good, OCTETS, b"good.example")).verified

    def reason(request: CertAuthRequest, using: CertStore = store) -> str:
        reply = cert_auth(using, request)
        assert not reply.verified and reply.auth == b""
        return reply.reason

    assert reason(_peer_request(good, OCTETS, b"other.example")) == "identity_not_in_certificate"
    assert reason(_peer_request(good, OCTETS, b"good.example", verify_octets=b"x")) == (
        "auth_mismatch"
    )
    assert reason(_peer_request(good, OCTETS, b"good.example", peer_certs=[])) == "no_certificate"
    assert reason(_peer_request(good, OCTETS, b"good.example", peer_certs=[b"\x30\x03junk"])) == (
        "malformed_certificate"
    )
    assert reason(_peer_request(good, OCTETS, b"good.example", peer_certs=[b"x"] * 9)) == (
        "too_many_certificates"
    )
    rogue = Pki(tmp_path / "rogue", "rsa", ca_name="ikefarm test CA").issue(
        "good", dns="good.example"
    )  # same names, wrong signer
    assert reason(_peer_request(rogue, OCTETS, b"good.example")) == "untrusted_certificate"
    assert reason(_peer_request(good, OCTETS, b"good.example"), CertStore()) == "no_trust_anchor"
    revoked = rsa_pki.issue("revoked", dns="revoked.example")
    crl = rsa_pki.revoke(revoked)
    with_crl = _store(rsa_pki, crl)
    assert reason(_peer_request(revoked, OCTETS, b"revoked.example"), with_crl) == (
        "certificate_revoked"
    )
    assert cert_auth(with_crl, _peer_request(good, OCTETS, b"good.example")).verified
    with pytest.raises(UnknownPurpose):
        cert_auth(store, _peer_request(good, OCTETS, b"good.example", purpose="export-key"))
    # signing without a key for the VPN is a refusal, not an exception
    assert cert_auth(store, CertAuthRequest(vpn="nope", purpose="sign")).reason == "no_private_key"


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    certs=st.lists(st.binary(max_size=80), max_size=3),
    method=st.integers(0, 255),
    auth=st.binary(max_size=80),
    id_type=st.integers(0, 255),
)
def test_garbage_from_the_peer_is_an_answer_never_an_exception(
    rsa_pki: Pki, certs: list[bytes], method: int, auth: bytes, id_type: int
) -> None:
    store = _store(rsa_pki)
    request = CertAuthRequest(
        vpn="v", purpose="verify-and-sign", verify_octets=OCTETS, verify_method=method,
        verify_auth=auth, peer_certs=certs, peer_id_type=id_type, peer_id_data=b"x",
    )  # fmt: skip
    reply = cert_auth(store, request)
    assert not reply.verified and reply.reason and reply.auth == b""


# -- two engines ---------------------------------------------------------------------------


def cert_pair(pki: Pki, *, revoke_initiator: bool = False, initiator_pki: Pki | None = None):  # type: ignore[no-untyped-def]
    gw = pki.issue("gw", dns="gw.example")
    peer = (initiator_pki or pki).issue("peer", dns="peer.example")
    crl = pki.revoke(peer) if revoke_initiator else pki.write_crl()
    responder = parse_config(
        cert_vpn_toml(
            pki, name="rw", local="192.0.2.1", local_id="gw.example", remote_id="peer.example",
            cert=gw.cert_path, key=gw.key_path, crls=[crl],
        )
    )  # fmt: skip
    initiator = parse_config(
        cert_vpn_toml(
            pki, name="hq", local="192.0.2.2", remote="192.0.2.1", local_id="peer.example",
            remote_id="gw.example", cert=peer.cert_path, key=peer.key_path, crls=[crl],
            lts="10.200.0.0/24", rts="10.100.0.0/24",
        )
    )  # fmt: skip
    return Wire(
        Side(IkeEngine(engine_policy(initiator), shard=2), b"", "192.0.2.2",
             certs=CertStore.from_config(initiator)),
        Side(IkeEngine(engine_policy(responder), shard=1), b"", "192.0.2.1",
             certs=CertStore.from_config(responder)),
    )  # fmt: skip


@pytest.mark.parametrize("kind", ["rsa", "ecdsa"])
def test_engines_authenticate_each_other_with_certificates(tmp_path: Path, kind: str) -> None:
    wire = cert_pair(Pki(tmp_path, kind))
    wire.run(wire.initiator.engine.initiate("hq", "net", wire.now), wire.initiator)
    (i_sa,) = wire.initiator.engine.sas.values()
    (r_sa,) = wire.responder.engine.sas.values()
    assert i_sa.state == r_sa.state == IkeSaState.ESTABLISHED
    assert len(i_sa.children) == len(r_sa.children) == 1
    both = {"local_auth": "DIGITAL_SIGNATURE", "remote_auth": "DIGITAL_SIGNATURE"}
    assert i_sa.auth_methods == r_sa.auth_methods == both
    for side in (wire.initiator, wire.responder):
        counters = side.engine.counters
        assert counters["auth.local.DIGITAL_SIGNATURE"] == 1  # both announced RFC 7427
        assert counters["auth.remote.DIGITAL_SIGNATURE"] == 1
    init_request, init_response = (parse_message(d).message for _a, d in wire.log[:2])
    for message in (init_request, init_response):
        assert message.notify(NotifyType.SIGNATURE_HASH_ALGORITHMS) is not None
    (certreq,) = [p for p in init_response.payloads if isinstance(p, CertReqPayload)]
    assert len(certreq.data) == 20  # one SHA-1 SPKI hash: our single trust anchor
    # private keys never travel in keystore requests: only octets, certificates and identities
    for effect in wire.initiator.effects + wire.responder.effects:
        assert "PRIVATE KEY" not in repr(getattr(effect, "params", {}))
    certs = [p for p in parse_message(wire.log[2][1]).message or [] if isinstance(p, CertPayload)]
    assert certs == []  # IKE_AUTH is encrypted: the CERT payloads are inside SK


def test_a_revoked_initiator_certificate_fails_with_authentication_failed(tmp_path: Path) -> None:
    wire = cert_pair(Pki(tmp_path, "rsa"), revoke_initiator=True)
    wire.run(wire.initiator.engine.initiate("hq", "net", wire.now), wire.initiator)
    assert wire.responder.engine.sas == {} and wire.initiator.engine.sas == {}
    assert wire.responder.engine.counters["auth_failed.certificate_revoked"] == 1
    assert wire.initiator.engine.counters["auth_failed.rejected_by_peer"] == 1


def test_a_certificate_from_another_ca_fails_with_authentication_failed(tmp_path: Path) -> None:
    wire = cert_pair(Pki(tmp_path / "a", "ecdsa"), initiator_pki=Pki(tmp_path / "b", "ecdsa"))
    wire.run(wire.initiator.engine.initiate("hq", "net", wire.now), wire.initiator)
    assert wire.responder.engine.sas == {}
    assert wire.responder.engine.counters["auth_failed.untrusted_certificate"] == 1


def test_certreq_authority_is_sha1_of_the_spki(rsa_pki: Pki) -> None:
    import hashlib

    from cryptography.hazmat.primitives.serialization import PublicFormat

    spki = rsa_pki.ca.cert.public_key().public_bytes(
        Encoding.DER, PublicFormat.SubjectPublicKeyInfo
    )
    assert certreq_authority(rsa_pki.ca.cert) == hashlib.sha1(spki).digest()


def test_certificate_config_problems_are_refused_at_load(tmp_path: Path, rsa_pki: Pki) -> None:
    from ikefarm.shared.config.loader import ConfigError

    gw = rsa_pki.issue("cfg-gw", dns="gw.example")
    base = cert_vpn_toml(
        rsa_pki, name="v", local="192.0.2.1", local_id="gw.example", remote_id="p.example",
        cert=gw.cert_path, key=gw.key_path,
    )  # fmt: skip
    parse_config(base)  # the good one loads
    junk = tmp_path / "junk.pem"
    junk.write_text("-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")
    cases = {
        str(rsa_pki.ca_path): str(junk),  # ca and certificate unreadable as X.509
        f'local-private-key = "{gw.key_path}"': 'local-private-key = "/nonexistent.key"',
        'remote-auth-method = "pubkey"': 'remote-auth-method = "pre-shared-key"',
    }
    expected = [
        "ike.pki.ca-certificates[0]",
        "ike.vpn[0].local-private-key",
        "ike.vpn[0].ike-policy",
    ]
    for (old, new), key in zip(cases.items(), expected, strict=True):
        with pytest.raises(ConfigError) as refused:
            parse_config(base.replace(old, new))
        assert key in str(refused.value)
    with pytest.raises(ConfigError) as refused:
        parse_config(base.replace(f'local-certificate = "{gw.cert_path}"\n', ""))
    assert "ike.vpn[0].local-certificate" in str(refused.value)


def test_a_malformed_cert_payload_is_authentication_failed_and_counted(tmp_path: Path) -> None:
    wire = cert_pair(Pki(tmp_path, "ecdsa"))
    engine = wire.initiator.engine
    (vpn,) = engine.policy.vpns
    garbage = replace(vpn, local_certificates=(b"\x30\x82\xff\xffnot a certificate",))
    engine.policy = replace(engine.policy, vpns=(garbage,))
    wire.run(engine.initiate("hq", "net", wire.now), wire.initiator)
    assert wire.responder.engine.sas == {} and engine.sas == {}
    assert wire.responder.engine.counters["auth_failed.malformed_certificate"] == 1
    assert engine.counters["auth_failed.rejected_by_peer"] == 1


def test_the_chain_through_an_intermediate_ca_is_sent_and_verified(tmp_path: Path) -> None:
    """RFC 7296 3.6/3.7: our certificate and its intermediates go in CERT payloads; the peer
    trusts only the root."""
    root = Pki(tmp_path, "rsa")
    wire = cert_pair(root, initiator_pki=root.intermediate("ikefarm sub CA"))
    wire.run(wire.initiator.engine.initiate("hq", "net", wire.now), wire.initiator)
    (r_sa,) = wire.responder.engine.sas.values()
    assert r_sa.state == IkeSaState.ESTABLISHED
    (asked,) = [e for e in wire.responder.effects if isinstance(e, KeystoreRequest)]
    assert len(asked.request.peer_certs) == 2  # leaf, then the intermediate


def test_the_responder_picks_the_vpn_that_takes_the_peers_auth_method(tmp_path: Path) -> None:
    wire = cert_pair(Pki(tmp_path, "ecdsa"))
    psk_first = parse_config(
        '[[ike.pre-shared-key]]\nsecret = "a-psk-for-the-other-vpn"\n\n'
        '[[ike.vpn]]\nname = "rw-psk"\nlocal-address = "192.0.2.1"\nlocal-id = "gw.example"\n'
        'remote-id = "peer.example"\n[[ike.vpn.security-policy]]\nname = "net"\n'
        'local-ts = { subnet = "10.100.0.0/24" }\nremote-ts = { subnet = "10.200.0.0/24" }\n'
    )
    responder = wire.responder.engine
    psk_vpn = engine_policy(psk_first).vpns[0]
    responder.policy = replace(responder.policy, vpns=(psk_vpn, *responder.policy.vpns))
    wire.run(wire.initiator.engine.initiate("hq", "net", wire.now), wire.initiator)
    (r_sa,) = responder.sas.values()
    assert r_sa.state == IkeSaState.ESTABLISHED and r_sa.vpn is not None
    assert r_sa.vpn.name == "rw"  # the certificate VPN, though the PSK one comes first


def test_initiate_prints_the_signature_methods_not_pre_shared_key(tmp_path: Path) -> None:
    """`initiate` (and its vSR lines) names the AUTH method each side really used."""
    wire = cert_pair(Pki(tmp_path, "ecdsa"))
    command = parse_words("initiate", ["child-sa", "security-policy", "net"])
    outcome = management.execute(wire.initiator.engine, command, wire.now)
    watch = management.watch_for(outcome, command)
    assert watch is not None
    watches = Watches()
    watches.add(watch)
    wire.run(outcome.effects, wire.initiator)
    assert watches.observe(wire.initiator.engine, wire.initiator.effects, wire.now) == [watch]
    assert watch.ok
    assert watch.lines[:2] == [
        "authentication of 'peer.example' (myself) with digital signature",
        "authentication of 'gw.example' with digital signature successful",
    ]
    assert not any("pre-shared key" in line for line in watch.lines)


def test_established_lines_word_each_method_as_charon_does() -> None:
    detail = {"local_id": "a", "remote_id": "b", "local": "192.0.2.1[500]", "remote": "x[500]"}
    mixed = {**detail, "local_auth": "SHARED_KEY_MIC", "remote_auth": "ECDSA_SHA256_P256"}
    assert management.established_lines(None, mixed, "hq[1]", 0.0)[:2] == [
        "authentication of 'a' (myself) with pre-shared key",
        "authentication of 'b' with ECDSA-256 signature successful",
    ]
    rsa = {**detail, "local_auth": "RSA_DIGITAL_SIGNATURE", "remote_auth": "METHOD_200"}
    assert management.established_lines(None, rsa, "hq[1]", 0.0)[:2] == [
        "authentication of 'a' (myself) with RSA signature",
        "authentication of 'b' with METHOD_200 successful",
    ]
    assert management.established_lines(None, detail, "hq[1]", 0.0)[:2] == [
        "authentication of 'a' (myself)",  # no method known: none is claimed
        "authentication of 'b' successful",
    ]
