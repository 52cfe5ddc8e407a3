"""A test PKI made with `cryptography`: CAs, end-entity certificates, CRLs, written as PEM files.

Everything is generated per test (fresh keys); nothing here is a fixture file.
`Pki(dir).issue("gw", dns="gw.example")` writes `gw.pem` (certificate) and
`gw.key` (PKCS#8 private key, 0600) and returns their paths.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

Key = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

NOW = datetime.datetime.now(datetime.UTC)


def new_key(kind: str) -> Key:
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    curves = {"ecdsa": ec.SECP256R1(), "ecdsa384": ec.SECP384R1(), "ecdsa521": ec.SECP521R1()}
    return ec.generate_private_key(curves[kind])


def name(common_name: str, organization: str = "ikefarm tests") -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "CH"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


@dataclass
class Issued:
    cert: x509.Certificate
    key: Key
    cert_path: Path
    key_path: Path


@dataclass
class Pki:
    """One CA (`kind`: rsa / ecdsa) in `directory`, issuing certificates and a CRL."""

    directory: Path
    kind: str = "rsa"
    ca_name: str = "ikefarm test CA"
    parent: Pki | None = None  # an intermediate CA signed by `parent`; None: a root
    ca: Issued = field(init=False)
    revoked: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.directory = Path(self.directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        key = new_key(self.kind)
        subject = name(self.ca_name)
        signer_key = self.parent.ca.key if self.parent else key
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.parent.ca.cert.subject if self.parent else subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - datetime.timedelta(days=1))
            .not_valid_after(NOW + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(signer_key.public_key()), False
            )
        )
        cert = builder.sign(signer_key, hashes.SHA256())
        slug = self.ca_name.replace(" ", "-")
        self.ca = self._write(slug, cert, key)

    def intermediate(self, ca_name: str) -> Pki:
        """An intermediate CA under this one, issuing from its own folder."""
        return Pki(self.directory / ca_name.replace(" ", "-"), self.kind, ca_name, parent=self)

    @property
    def ca_path(self) -> Path:
        return self.ca.cert_path

    def issue(
        self,
        stem: str,
        *,
        dns: str | None = None,
        email: str | None = None,
        ip: str | None = None,
        kind: str | None = None,
        common_name: str | None = None,
    ) -> Issued:
        key = new_key(kind or self.kind)
        sans: list[x509.GeneralName] = []
        if dns:
            sans.append(x509.DNSName(dns))
        if email:
            sans.append(x509.RFC822Name(email))
        if ip:
            sans.append(x509.IPAddress(ipaddress.ip_address(ip)))
        ca_key = self.ca.key
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(common_name or dns or stem))
            .issuer_name(self.ca.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - datetime.timedelta(days=1))
            .not_valid_after(NOW + datetime.timedelta(days=30))
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        issued = self._write(stem, cert, key)
        if self.parent is not None:  # the file carries the chain: leaf, then intermediates
            chain = [cert, self.ca.cert]
            issued.cert_path.write_bytes(
                b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)
            )
        return issued

    def revoke(self, issued: Issued) -> Path:
        """Add the certificate to the CA's CRL and (re)write `<ca>.crl.pem`."""
        self.revoked.append(issued.cert.serial_number)
        return self.write_crl()

    def write_crl(self) -> Path:
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.ca.cert.subject)
            .last_update(NOW - datetime.timedelta(hours=1))
            .next_update(NOW + datetime.timedelta(days=7))
        )
        for serial in self.revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(serial)
                .revocation_date(NOW - datetime.timedelta(minutes=5))
                .build()
            )
        crl = builder.sign(self.ca.key, hashes.SHA256())
        path = self.directory / f"{self.ca.cert_path.stem}.crl.pem"
        path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
        return path

    def _write(self, stem: str, cert: x509.Certificate, key: Key) -> Issued:
        cert_path = self.directory / f"{stem}.pem"
        key_path = self.directory / f"{stem}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
        return Issued(cert, key, cert_path, key_path)


def cert_vpn_toml(
    pki: Pki,
    *,
    name: str,
    local: str,
    local_id: str,
    remote_id: str,
    cert: Path,
    key: Path,
    remote: str | None = None,
    crls: Sequence[Path] = (),
    lts: str = "10.100.0.0/24",
    rts: str = "10.200.0.0/24",
) -> str:
    """An ikefarm config with one certificate-authenticated VPN trusting `pki`'s CA."""
    remote_line = f'remote-address = "{remote}"\n' if remote else ""
    crl_list = ", ".join(f'"{c}"' for c in crls)
    return (
        f'[ike.pki]\nca-certificates = ["{pki.ca_path}"]\ncrls = [{crl_list}]\n\n'
        f'[[ike.vpn]]\nname = "{name}"\nlocal-address = "{local}"\n{remote_line}'
        f'local-id = "{local_id}"\nremote-id = "{remote_id}"\n'
        f'local-certificate = "{cert}"\nlocal-private-key = "{key}"\n'
        'ike-policy = { local-auth-method = "pubkey", remote-auth-method = "pubkey" }\n'
        f'[[ike.vpn.security-policy]]\nname = "net"\nlocal-ts = {{ subnet = "{lts}" }}\n'
        f'remote-ts = {{ subnet = "{rts}" }}\n'
    )
