"""Certificate authentication against a real strongSwan, both ways, RSA and ECDSA.

The test makes its CA with `cryptography` (tests/pki.py): the gateway's
certificate (SAN gw.example) and strongSwan's (SAN peer.example). ikefarm's
private key is read by its keystore only; strongSwan gets its own in
swanctl/private. strongSwan 5.9.8 announces SIGNATURE_HASH_ALGORITHMS by default,
so both sides sign with RFC 7427 Digital Signature (method 14); with
`signature_authentication = no` it does not, and the classic methods are used
(RSA 1, ECDSA 9). A revoked certificate (CRL file) or one signed by another CA
fails with AUTHENTICATION_FAILED on the side that verifies it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.harness.gateway import Gateway, farm_config
from tests.harness.netns import NetnsPair, wait_for
from tests.harness.strongswan import Child, Connection, StrongSwan
from tests.pki import Issued, Pki

pytestmark = [pytest.mark.interop, pytest.mark.timeout(180)]

PEER_DN = "C=CH, O=ikefarm tests, CN=peer.example"


def cert_vpn(
    name: str,
    gw: Issued,
    *,
    remote_id: str,
    remote_address: str,
    local_ts: str = "10.100.0.0/24",
    remote_ts: str = "10.200.0.0/24",
) -> str:
    return (
        f'[[ike.vpn]]\nname = "{name}"\nlocal-address = "192.0.2.1"\n'
        f'remote-address = "{remote_address}"\nlocal-id = "gw.example"\n'
        f'remote-id = "{remote_id}"\n'
        f'local-certificate = "{gw.cert_path}"\nlocal-private-key = "{gw.key_path}"\n'
        'ike-policy = { template = "ikepol", local-auth-method = "pubkey",'
        ' remote-auth-method = "pubkey" }\n'
        'ipsec-policy = { template = "ipsecpol" }\n'
        f'[[ike.vpn.security-policy]]\nname = "net"\nlocal-ts = {{ subnet = "{local_ts}" }}\n'
        f'remote-ts = {{ subnet = "{remote_ts}" }}\n'
    )


def gateway_text(workdir: Path, vpn: str, ca: Path, crls: list[Path]) -> str:
    crl_list = ", ".join(f'"{c}"' for c in crls)
    pki = f'\n[ike.pki]\nca-certificates = ["{ca}"]\ncrls = [{crl_list}]\n'
    return farm_config(workdir, psks=[], vpns=[vpn]) + pki


def strongswan_conn(peer: Issued, ca: Path, *, local_id: str | None = "peer.example") -> Connection:
    return Connection(
        name="c",
        local_addrs="192.0.2.2",
        remote_addrs="192.0.2.1",
        local_id=local_id,
        remote_id="gw.example",
        local_auth="pubkey",
        remote_auth="pubkey",
        local_certs=[peer.cert_path],
        remote_cacerts=[ca],
        proposals="aes256gcm16-prfsha384-x25519",
        children=[
            Child(
                name="net", local_ts="10.200.0.0/24", remote_ts="10.100.0.0/24",
                esp_proposals="aes256gcm16",
            )
        ],
    )  # fmt: skip


@pytest.fixture
def ns(netns_pair: NetnsPair) -> NetnsPair:
    netns_pair.peer.add_address("lo", "10.200.0.1/32")
    return netns_pair


@pytest.mark.parametrize(
    ("kind", "scheme"), [("rsa", "RSA_EMSA_PKCS1_SHA2_256"), ("ecdsa", "ECDSA_WITH_SHA256_DER")]
)
def test_strongswan_initiator_authenticates_with_certificates(
    ns: NetnsPair,
    gateway_factory: Callable[..., Gateway],
    strongswan_factory: Callable[..., StrongSwan],
    tmp_path: Path,
    kind: str,
    scheme: str,
) -> None:
    pki = Pki(tmp_path / "pki", kind)
    gw, peer_cert = pki.issue("gw", dns="gw.example"), pki.issue("peer", dns="peer.example")
    # the RSA case identifies strongSwan by its subject DN (ID_DER_ASN1_DN), ECDSA by SAN FQDN
    by_dn = kind == "rsa"
    vpn = cert_vpn("rw", gw, remote_id=PEER_DN if by_dn else "peer.example", remote_address="any")
    gateway = gateway_factory(
        ns.gw, config_text=gateway_text(tmp_path, vpn, pki.ca_path, [pki.write_crl()])
    )
    peer = strongswan_factory(ns.peer)
    conn = strongswan_conn(peer_cert, pki.ca_path, local_id=None if by_dn else "peer.example")
    peer.load([conn], private_keys=[peer_cert.key_path])
    peer.initiate(child="net", timeout=20)

    (sa,) = peer.list_sas()
    assert sa["state"] == "ESTABLISHED" and sa["child-sas"][0]["state"] == "INSTALLED"
    (row,) = gateway.wait_sas(1)
    assert (row["spi_i"], row["spi_r"]) == (sa["initiator-spi"], sa["responder-spi"])
    assert row["remote_id"].startswith("asn1dn:#") if by_dn else row["remote_id"] == "peer.example"
    assert (row["local_auth"], row["remote_auth"]) == ("DIGITAL_SIGNATURE", "DIGITAL_SIGNATURE")
    counters = gateway.counters("ike")
    assert counters.get("auth.remote.DIGITAL_SIGNATURE") == 1  # RFC 7427: both announced
    assert counters.get("auth.local.DIGITAL_SIGNATURE") == 1
    log = peer.log_text()
    assert f"authentication of 'gw.example' with {scheme} successful" in log
    assert "received cert request for" in log and "sending end entity cert" in log
    keystore = gateway.counters("keystore")
    assert keystore.get("cert_auth.verified") == 1
    # the gateway's private key appears nowhere in its logs (levels 0-3 here)
    key_body = "".join(gw.key_path.read_text().splitlines()[1:-1])
    logged = "".join(gateway.log_text().split())
    assert key_body[:64] not in logged and key_body[-64:] not in logged


@pytest.mark.parametrize(
    ("kind", "method"), [("rsa", "RSA_DIGITAL_SIGNATURE"), ("ecdsa", "ECDSA_SHA256_P256")]
)
def test_ikefarm_initiator_authenticates_with_certificates(
    ns: NetnsPair,
    gateway_factory: Callable[..., Gateway],
    strongswan_factory: Callable[..., StrongSwan],
    tmp_path: Path,
    kind: str,
    method: str,
) -> None:
    pki = Pki(tmp_path / "pki", kind)
    gw, peer_cert = pki.issue("gw", dns="gw.example"), pki.issue("peer", dns="peer.example")
    vpn = cert_vpn("hq", gw, remote_id="peer.example", remote_address="192.0.2.2")
    gateway = gateway_factory(
        ns.gw, config_text=gateway_text(tmp_path, vpn, pki.ca_path, [pki.write_crl()])
    )
    # without RFC 7427 on strongSwan's side, the classic method of each key is used
    peer = strongswan_factory(ns.peer, charon_options={"signature_authentication": False})
    peer.load([strongswan_conn(peer_cert, pki.ca_path)], private_keys=[peer_cert.key_path])

    done = gateway.run_cli("initiate", "child-sa", "security-policy", "net", "--timeout", "20")
    assert done.returncode == 0, done.stdout + done.stderr
    (row,) = gateway.show()
    (sa,) = peer.list_sas()
    assert sa["state"] == "ESTABLISHED" and sa.get("initiator") != "yes"
    assert (row["spi_i"], row["spi_r"]) == (sa["initiator-spi"], sa["responder-spi"])
    assert (row["local_auth"], row["remote_auth"]) == (method, method)
    counters = gateway.counters("ike")
    assert counters.get(f"auth.local.{method}") == 1
    assert counters.get(f"auth.remote.{method}") == 1
    assert "authentication of 'gw.example' with" in peer.log_text()


def test_ikefarm_initiator_with_rfc7427_and_a_revoked_responder_certificate(
    ns: NetnsPair,
    gateway_factory: Callable[..., Gateway],
    strongswan_factory: Callable[..., StrongSwan],
    tmp_path: Path,
) -> None:
    """ikefarm verifies strongSwan's certificate against its CRL file: revoked, refused."""
    pki = Pki(tmp_path / "pki", "ecdsa")
    gw, peer_cert = pki.issue("gw", dns="gw.example"), pki.issue("peer", dns="peer.example")
    crl = pki.revoke(peer_cert)
    vpn = cert_vpn("hq", gw, remote_id="peer.example", remote_address="192.0.2.2")
    gateway = gateway_factory(ns.gw, config_text=gateway_text(tmp_path, vpn, pki.ca_path, [crl]))
    peer = strongswan_factory(ns.peer)
    peer.load([strongswan_conn(peer_cert, pki.ca_path)], private_keys=[peer_cert.key_path])

    done = gateway.run_cli("initiate", "child-sa", "security-policy", "net", "--timeout", "20")
    assert done.returncode != 0
    assert gateway.show() == []
    counters = gateway.counters("ike")
    assert counters.get("auth_failed.certificate_revoked") == 1
    assert gateway.counters("keystore").get("cert_auth.certificate_revoked") == 1


def test_strongswan_refuses_a_revoked_certificate_and_ikefarm_one_from_another_ca(
    ns: NetnsPair,
    gateway_factory: Callable[..., Gateway],
    strongswan_factory: Callable[..., StrongSwan],
    tmp_path: Path,
) -> None:
    pki = Pki(tmp_path / "pki", "rsa")
    gw, peer_cert = pki.issue("gw", dns="gw.example"), pki.issue("peer", dns="peer.example")
    crl = pki.revoke(peer_cert)  # ikefarm holds the CRL that revokes strongSwan's certificate
    vpn = cert_vpn("rw", gw, remote_id="peer.example", remote_address="any")
    gateway = gateway_factory(ns.gw, config_text=gateway_text(tmp_path, vpn, pki.ca_path, [crl]))
    peer = strongswan_factory(ns.peer)
    peer.load([strongswan_conn(peer_cert, pki.ca_path)], private_keys=[peer_cert.key_path])
    peer.initiate(child="net", timeout=20, check=False)
    wait_for(
        lambda: "AUTHENTICATION_FAILED" in peer.log_text(),
        timeout=15,
        what="strongSwan sees AUTHENTICATION_FAILED",
    )
    assert peer.list_sas() == [] and gateway.show() == []
    assert gateway.counters("ike").get("auth_failed.certificate_revoked") == 1

    # a certificate with the right names from a CA ikefarm does not trust: refused as well
    rogue = Pki(tmp_path / "rogue", "rsa", ca_name="ikefarm test CA").issue(
        "rogue-peer", dns="peer.example"
    )
    peer.load([strongswan_conn(rogue, pki.ca_path)], private_keys=[rogue.key_path])
    peer.initiate(child="net", timeout=20, check=False)
    wait_for(
        lambda: gateway.counters("ike").get("auth_failed.untrusted_certificate") == 1,
        timeout=15,
        what="ikefarm refuses the untrusted certificate",
    )
    assert peer.list_sas() == [] and gateway.show() == []


def test_strongswan_responder_refuses_ikefarm_certificate_from_another_ca(
    ns: NetnsPair,
    gateway_factory: Callable[..., Gateway],
    strongswan_factory: Callable[..., StrongSwan],
    tmp_path: Path,
) -> None:
    pki = Pki(tmp_path / "pki", "ecdsa")
    rogue_ca = Pki(tmp_path / "rogue", "ecdsa", ca_name="ikefarm test CA")
    gw = rogue_ca.issue("gw", dns="gw.example")  # wrongly signed for strongSwan
    peer_cert = pki.issue("peer", dns="peer.example")
    vpn = cert_vpn("hq", gw, remote_id="peer.example", remote_address="192.0.2.2")
    gateway = gateway_factory(
        ns.gw, config_text=gateway_text(tmp_path, vpn, pki.ca_path, [pki.write_crl()])
    )
    peer = strongswan_factory(ns.peer)
    peer.load([strongswan_conn(peer_cert, pki.ca_path)], private_keys=[peer_cert.key_path])

    done = gateway.run_cli("initiate", "child-sa", "security-policy", "net", "--timeout", "20")
    assert done.returncode != 0
    assert gateway.show() == [] and peer.list_sas() == []
    assert gateway.counters("ike").get("auth_failed.rejected_by_peer") == 1
    log = peer.log_text()
    assert "no trusted ECDSA public key found for 'gw.example'" in log
    assert "generating IKE_AUTH response 1 [ N(AUTH_FAILED) ]" in log  # AUTHENTICATION_FAILED
