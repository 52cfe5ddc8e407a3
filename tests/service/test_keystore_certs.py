"""The keystore's certificate AUTH endpoint over a real nats-server: signatures made where the
private key lives, peers verified against the trust store and CRLs; no key ever answered or
logged; bad requests get structured errors; a bad key file stops the keystore with a reason."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from pathlib import Path

import msgpack
import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from nats.aio.client import Client

from ikefarm.proto import envelope, subjects
from ikefarm.proto.envelope import BusError
from ikefarm.proto.messages import CertAuthReply, CertAuthRequest
from ikefarm.services.keystore.service import KeystoreService
from ikefarm.shared.bus.embedded import EmbeddedNats
from ikefarm.shared.bus.runtime import Runtime, ServiceUnavailable
from ikefarm.shared.config.loader import parse_config
from ikefarm.shared.ikev2.certs import load_crl
from ikefarm.shared.ikev2.constants import AuthMethod, IdType
from ikefarm.shared.ikev2.crypto.signature import sign, verify
from tests.pki import Pki, cert_vpn_toml
from tests.service import test_keystore_psk

log_stream = test_keystore_psk.log_stream  # the same level-3 log capture

OCTETS = b"IKE_SA_INIT response | Ni | prf(SK_pr, IDr')"


def config_text(pki: Pki, gw_cert: Path, gw_key: Path, crl: Path) -> str:
    return cert_vpn_toml(
        pki, name="rw", local="192.0.2.1", local_id="gw.example", remote_id="peer.example",
        cert=gw_cert, key=gw_key, crls=[crl],
    )  # fmt: skip


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "pki", "ecdsa")


@pytest.fixture
async def keystore(
    nats_server: EmbeddedNats, pki: Pki, log_stream: io.StringIO
) -> AsyncIterator[Runtime]:
    gw = pki.issue("gw", dns="gw.example")
    config = parse_config(config_text(pki, gw.cert_path, gw.key_path, pki.write_crl()))
    runtime = Runtime(KeystoreService, config, nats_server.url, instance="keystore-0")
    await runtime.start()
    runtime.options["gw"] = gw
    try:
        yield runtime
    finally:
        await runtime.stop()


def private_key_texts(key: object) -> list[bytes]:
    from cryptography.hazmat.primitives import serialization

    pem = key.private_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    scalar = key.private_numbers().private_value  # type: ignore[attr-defined]
    raw = scalar.to_bytes((scalar.bit_length() + 7) // 8, "big")
    return [pem, raw, raw.hex().encode()]


async def ask(nc: Client, payload: bytes) -> bytes:
    return (await nc.request(subjects.KEYSTORE_CERT_AUTH, payload, timeout=3)).data


async def test_sign_verify_and_refuse_over_the_bus(
    keystore: Runtime, nats_client: Client, pki: Pki, log_stream: io.StringIO
) -> None:
    gw = keystore.options["gw"]
    peer = pki.issue("peer", dns="peer.example")
    peer_method, peer_auth = sign(peer.key, b"peer octets", [2, 3, 4])
    request = CertAuthRequest(
        vpn="rw",
        purpose="verify-and-sign",
        verify_octets=b"peer octets",
        verify_method=int(peer_method),
        verify_auth=peer_auth,
        peer_certs=[peer.cert.public_bytes(Encoding.DER)],
        peer_id_type=int(IdType.ID_FQDN),
        peer_id_data=b"peer.example",
        sign_octets=OCTETS,
        peer_hashes=[2, 3, 4],
    )
    raw = await ask(nats_client, envelope.pack(request))
    reply = envelope.unpack_reply(raw, CertAuthReply)
    assert reply.verified and reply.method == AuthMethod.DIGITAL_SIGNATURE
    verify(gw.cert.public_key(), reply.method, reply.auth, OCTETS)  # ours, by the gw's key
    assert "peer.example" in reply.peer_subject

    # revoked: no signature of ours leaves the keystore
    crl = pki.revoke(peer)
    assert crl.exists()
    keystore.service.certs.crls[:] = [load_crl(crl)]  # type: ignore[union-attr]
    reply = envelope.unpack_reply(await ask(nats_client, envelope.pack(request)), CertAuthReply)
    assert reply == CertAuthReply(
        verified=False, reason="certificate_revoked", peer_subject=reply.peer_subject
    )
    assert keystore.counters["cert_auth.verified"] == 1
    assert keystore.counters["cert_auth.certificate_revoked"] == 1

    # malformed requests are structured errors, never a crash
    for payload in (
        envelope.pack(CertAuthRequest(vpn="rw", purpose="give-me-the-key")),
        msgpack.packb({"v": 1, "kind": "cert-auth-request", "body": {"vpn": 7}}),
        b"\xc1 not msgpack",
    ):
        with pytest.raises(BusError) as refused:
            envelope.unpack_reply(await ask(nats_client, payload), CertAuthReply)
        assert refused.value.code in ("bad_field", "bad_encoding", "bad_envelope", "bad_version")
    # and the service still answers
    reply = envelope.unpack_reply(
        await ask(
            nats_client, envelope.pack(CertAuthRequest(vpn="rw", purpose="sign", sign_octets=b"x"))
        ),
        CertAuthReply,
    )
    assert reply.verified and reply.method == AuthMethod.ECDSA_SHA256_P256

    logged = log_stream.getvalue()
    assert '"event": "cert_auth"' in logged
    for text in private_key_texts(gw.key):
        assert text not in raw and text not in logged.encode()


def test_a_key_that_is_not_the_certificates_stops_the_keystore(pki: Pki) -> None:
    gw, other = pki.issue("gw", dns="gw.example"), pki.issue("other", dns="other.example")
    config = parse_config(config_text(pki, gw.cert_path, other.key_path, pki.write_crl()))
    with pytest.raises(ServiceUnavailable, match="is not the key of"):
        KeystoreService.preflight(config)
    broken = pki.directory / "broken.key"
    broken.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    config = parse_config(config_text(pki, gw.cert_path, broken, pki.write_crl()))
    with pytest.raises(ServiceUnavailable, match="not an unencrypted PEM/DER private key"):
        KeystoreService.preflight(config)


def test_private_keys_are_sealed_in_the_store_with_the_other_secrets(
    pki: Pki, tmp_path: Path
) -> None:
    from ikefarm.services.keystore.certs import private_key_der
    from ikefarm.services.keystore.service import PRIVATE_KEY, load_store, open_store

    gw = pki.issue("gw", dns="gw.example")
    store_file = tmp_path / "sealed.bin"
    text = config_text(pki, gw.cert_path, gw.key_path, pki.write_crl())
    config = parse_config(text + f'\n[keystore]\nstore-file = "{store_file}"\n')
    load_store(config)
    der = private_key_der(gw.key)
    assert der not in store_file.read_bytes()  # sealed, not copied
    (entry,) = open_store(config).entries(PRIVATE_KEY)
    assert (entry.name, entry.secret) == ("rw", der)
