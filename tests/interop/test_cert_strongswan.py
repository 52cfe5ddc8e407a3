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

import subprocess
from collections.abc import Callable
from dataclasses import dataclass
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


@dataclass
class Scene:
    pki: Pki
    gw: Issued
    peer_cert: Issued
    gateway: Gateway
    peer: StrongSwan


@pytest.fixture
def scene(
    netns_pair: NetnsPair,
    gateway_factory: Callable[..., Gateway],
    strongswan_factory: Callable[..., StrongSwan],
    tmp_path: Path,
) -> Callable[..., Scene]:
    """make(kind, ...): a CA, both certificates, ikefarm in "gw", strongSwan (loaded) in "peer".

    `initiator`: ikefarm initiates (VPN "hq" to 192.0.2.2), else strongSwan does (VPN "rw").
    `revoke_peer`: ikefarm's CRL file revokes strongSwan's certificate. `rogue_gw`: the
    gateway's certificate comes from another CA with the same name. `gw_intermediate`: it
    comes from an intermediate CA that only ikefarm's CERT payloads tell strongSwan about.
    """
    netns_pair.peer.add_address("lo", "10.200.0.1/32")

    def make(
        kind: str,
        *,
        initiator: bool,
        revoke_peer: bool = False,
        rogue_gw: bool = False,
        gw_intermediate: bool = False,
        remote_id: str = "peer.example",
        peer_local_id: str | None = "peer.example",
        charon_options: dict[str, object] | None = None,
    ) -> Scene:
        pki = Pki(tmp_path / "pki", kind)
        issuer = Pki(tmp_path / "rogue", kind, ca_name=pki.ca_name) if rogue_gw else pki
        if gw_intermediate:
            issuer = pki.intermediate("ikefarm gateway CA")
        gw = issuer.issue("gw", dns="gw.example")
        peer_cert = pki.issue("peer", dns="peer.example")
        crl = pki.revoke(peer_cert) if revoke_peer else pki.write_crl()
        vpn = (
            cert_vpn("hq", gw, remote_id=remote_id, remote_address="192.0.2.2")
            if initiator
            else cert_vpn("rw", gw, remote_id=remote_id, remote_address="any")
        )
        gateway = gateway_factory(
            netns_pair.gw, config_text=gateway_text(tmp_path, vpn, pki.ca_path, [crl])
        )
        peer = strongswan_factory(netns_pair.peer, charon_options=charon_options)
        conn = strongswan_conn(peer_cert, pki.ca_path, local_id=peer_local_id)
        peer.load([conn], private_keys=[peer_cert.key_path])
        return Scene(pki, gw, peer_cert, gateway, peer)

    return make


def initiate(gateway: Gateway) -> subprocess.CompletedProcess[str]:
    return gateway.run_cli("initiate", "child-sa", "security-policy", "net", "--timeout", "20")


@pytest.mark.parametrize(
    ("kind", "scheme"), [("rsa", "RSA_EMSA_PKCS1_SHA2_256"), ("ecdsa", "ECDSA_WITH_SHA256_DER")]
)
def test_strongswan_initiator_authenticates_with_certificates(
    scene: Callable[..., Scene], kind: str, scheme: str
) -> None:
    # the RSA case identifies strongSwan by its subject DN (ID_DER_ASN1_DN), ECDSA by SAN FQDN
    by_dn = kind == "rsa"
    made = scene(
        kind,
        initiator=False,
        remote_id=PEER_DN if by_dn else "peer.example",
        peer_local_id=None if by_dn else "peer.example",
    )
    gateway, peer = made.gateway, made.peer
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
    assert gateway.counters("keystore").get("cert_auth.verified") == 1
    # the gateway's private key appears nowhere in its logs (levels 0-3 here)
    key_body = "".join(made.gw.key_path.read_text().splitlines()[1:-1])
    logged = "".join(gateway.log_text().split())
    assert key_body[:64] not in logged and key_body[-64:] not in logged


@pytest.mark.parametrize(
    ("kind", "method"), [("rsa", "RSA_DIGITAL_SIGNATURE"), ("ecdsa", "ECDSA_SHA256_P256")]
)
def test_ikefarm_initiator_authenticates_with_certificates(
    scene: Callable[..., Scene], kind: str, method: str
) -> None:
    # without RFC 7427 on strongSwan's side, the classic method of each key is used
    made = scene(kind, initiator=True, charon_options={"signature_authentication": False})
    gateway, peer = made.gateway, made.peer
    done = initiate(gateway)
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
    scene: Callable[..., Scene],
) -> None:
    """ikefarm verifies strongSwan's certificate against its CRL file: revoked, refused."""
    made = scene("ecdsa", initiator=True, revoke_peer=True)
    done = initiate(made.gateway)
    assert done.returncode != 0
    assert made.gateway.show() == []
    assert made.gateway.counters("ike").get("auth_failed.certificate_revoked") == 1
    assert made.gateway.counters("keystore").get("cert_auth.certificate_revoked") == 1


def test_strongswan_refuses_a_revoked_certificate_and_ikefarm_one_from_another_ca(
    scene: Callable[..., Scene], tmp_path: Path
) -> None:
    made = scene("rsa", initiator=False, revoke_peer=True)
    gateway, peer = made.gateway, made.peer
    peer.initiate(child="net", timeout=20, check=False)
    wait_for(
        lambda: "AUTHENTICATION_FAILED" in peer.log_text(),
        timeout=15,
        what="strongSwan sees AUTHENTICATION_FAILED",
    )
    assert peer.list_sas() == [] and gateway.show() == []
    assert gateway.counters("ike").get("auth_failed.certificate_revoked") == 1

    # a certificate with the right names from a CA ikefarm does not trust: refused as well
    rogue = Pki(tmp_path / "rogue", "rsa", ca_name=made.pki.ca_name).issue(
        "rogue-peer", dns="peer.example"
    )
    peer.load([strongswan_conn(rogue, made.pki.ca_path)], private_keys=[rogue.key_path])
    peer.initiate(child="net", timeout=20, check=False)
    wait_for(
        lambda: gateway.counters("ike").get("auth_failed.untrusted_certificate") == 1,
        timeout=15,
        what="ikefarm refuses the untrusted certificate",
    )
    assert peer.list_sas() == [] and gateway.show() == []


def test_strongswan_responder_refuses_ikefarm_certificate_from_another_ca(
    scene: Callable[..., Scene],
) -> None:
    made = scene("ecdsa", initiator=True, rogue_gw=True)  # wrongly signed for strongSwan
    done = initiate(made.gateway)
    assert done.returncode != 0
    assert made.gateway.show() == [] and made.peer.list_sas() == []
    assert made.gateway.counters("ike").get("auth_failed.rejected_by_peer") == 1
    log = made.peer.log_text()
    assert "no trusted ECDSA public key found for 'gw.example'" in log
    assert "generating IKE_AUTH response 1 [ N(AUTH_FAILED) ]" in log  # AUTHENTICATION_FAILED


def test_ikefarm_sends_its_chain_through_an_intermediate_ca(scene: Callable[..., Scene]) -> None:
    """RFC 7296 3.6: strongSwan trusts only the root; ikefarm's CERT payloads carry the rest."""
    made = scene("ecdsa", initiator=True, gw_intermediate=True)
    done = initiate(made.gateway)
    assert done.returncode == 0, done.stdout + done.stderr
    (sa,) = made.peer.list_sas()
    assert sa["state"] == "ESTABLISHED"
    log = made.peer.log_text()
    assert 'received issuer cert "C=CH, O=ikefarm tests, CN=ikefarm gateway CA"' in log
    assert "authentication of 'gw.example' with ECDSA_WITH_SHA256_DER successful" in log
