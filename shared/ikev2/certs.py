"""X.509 helpers shared by the engine's policy and the keystore (public data only).

- reading certificate and CRL files (PEM, several per file, or DER);
- the CERTREQ Certification Authority value: SHA-1 of a CA's SubjectPublicKeyInfo
  (RFC 7296 3.7);
- does an IKE identity (RFC 7296 3.5) name this certificate: ID_DER_ASN1_DN
  against the subject, ID_FQDN / ID_RFC822_ADDR / ID_IPV4_ADDR / ID_IPV6_ADDR
  against the subjectAltName (RFC 4945 3.1);
- distinguished names written as text in the config ("CN=gw, O=Example").

Private keys are not read here: only the keystore opens them (services/keystore/certs.py).
"""

from __future__ import annotations

import hashlib
import ipaddress
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from ikefarm.shared.config.kinds import one_line, show_value
from ikefarm.shared.ikev2.constants import IdType

MAX_FILE_SIZE = 16 * 1024 * 1024  # a certificate chain, CRL or key; not /dev/zero
PEM_CERTIFICATE = b"-----BEGIN CERTIFICATE-----"
PEM_CRL = b"-----BEGIN X509 CRL-----"
DN_PREFIX = "asn1dn:#"  # how IdPayload prints a DER DN identity


class CertificateFileError(ValueError):
    """A certificate, key or CRL file named in the config cannot be used."""


def read_file(path: str | Path) -> bytes:
    """A file named in the config; CertificateFileError says which and why it cannot be read."""
    try:
        with Path(path).open("rb") as file:
            data = file.read(MAX_FILE_SIZE + 1)
    except OSError as exc:
        raise CertificateFileError(f"{_shown(path)}: {exc.strerror or exc}") from None
    except ValueError as exc:  # a NUL byte in the path
        raise CertificateFileError(f"{_shown(path)}: {exc}") from None
    if len(data) > MAX_FILE_SIZE:
        raise CertificateFileError(f"{_shown(path)}: larger than {MAX_FILE_SIZE >> 20} MiB")
    return data


def _is_file(path: str) -> bool:
    try:
        return Path(path).is_file()
    except OSError:  # a name too long for the file system
        return False


def _shown(path: str | Path) -> str:
    """A path as error messages name it: whole when short, else cut with its length."""
    return one_line(str(path), 64)


def load_certificates(path: str | Path) -> list[x509.Certificate]:
    """Every certificate of a PEM file (in order) or the one of a DER file."""
    data = read_file(path)
    try:
        if PEM_CERTIFICATE in data:
            return x509.load_pem_x509_certificates(data)
        return [x509.load_der_x509_certificate(data)]
    except ValueError:
        raise CertificateFileError(f"{_shown(path)}: not a PEM or DER X.509 certificate") from None


def load_crl(path: str | Path) -> x509.CertificateRevocationList:
    data = read_file(path)
    try:
        if PEM_CRL in data:
            return x509.load_pem_x509_crl(data)
        return x509.load_der_x509_crl(data)
    except ValueError:
        raise CertificateFileError(f"{_shown(path)}: not a PEM or DER X.509 CRL") from None


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.DER)


def certreq_authority(cert: x509.Certificate) -> bytes:
    """SHA-1 of the CA's SubjectPublicKeyInfo: one CERTREQ entry (RFC 7296 3.7)."""
    spki = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha1(spki, usedforsecurity=False).digest()


def dn_from_text(text: str) -> x509.Name:
    """A distinguished name as strongSwan writes it ("C=CH, O=Example, CN=gw"): RDNs in order.

    RFC 4514 strings list the last RDN first; strongSwan lists them in encoding
    order, which is what operators copy from `openssl x509 -subject`-style output.
    """
    parts = [p.strip() for p in text.replace(",", "/").split("/") if p.strip()]
    try:
        return x509.Name.from_rfc4514_string(",".join(reversed(parts)))
    except ValueError:
        raise ValueError(f"{text!r} is not a distinguished name") from None


def dn_text(name: x509.Name) -> str:
    """strongSwan's rendering: attributes in encoding order, ", " between them."""
    return ", ".join(attr.rfc4514_string() for rdn in name.rdns for attr in rdn)


def looks_like_dn(text: str) -> bool:
    return "=" in text and not text.startswith("@")


def dn_identity_matches(configured: str, der_dn: bytes) -> bool:
    """A configured DN (text) against the DER DN of an ID_DER_ASN1_DN identity.

    Compared as DER after encoding the text the way `cryptography` encodes names
    (UTF8String, PrintableString for C): the way ikefarm's and the tests' certificates
    are made. A DN spelled with other string types matches by the certificate instead.
    """
    try:
        return dn_from_text(configured).public_bytes() == der_dn
    except ValueError:
        return False


def identity_names_certificate(id_type: int, data: bytes, cert: x509.Certificate) -> bool:
    """Does the IKE identity name this certificate (RFC 4945 3.1)?"""
    if id_type == IdType.ID_DER_ASN1_DN:
        return data == cert.subject.public_bytes()
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    if id_type == IdType.ID_FQDN:
        wanted = data.decode("ascii", "replace").rstrip(".").casefold()
        names = san.get_values_for_type(x509.DNSName)
        return any(n.rstrip(".").casefold() == wanted for n in names)
    if id_type == IdType.ID_RFC822_ADDR:
        wanted = data.decode("ascii", "replace").casefold()
        return any(n.casefold() == wanted for n in san.get_values_for_type(x509.RFC822Name))
    if id_type in (IdType.ID_IPV4_ADDR, IdType.ID_IPV6_ADDR):
        try:
            address = ipaddress.ip_address(data)
        except ValueError:
            return False
        return address in san.get_values_for_type(x509.IPAddress)
    return False


def local_certificate_chain(path: str | None) -> tuple[bytes, ...]:
    """DER of our certificate and its intermediates, from `local-certificate` (public data)."""
    return tuple(der(c) for c in load_certificates(path)) if path else ()


def default_local_id(chain: tuple[bytes, ...]) -> str | None:
    """With a certificate and no local-id, we are its subject DN (as strongSwan does)."""
    if not chain:
        return None
    return DN_PREFIX + x509.load_der_x509_certificate(chain[0]).subject.public_bytes().hex()


def certreq_authorities(paths: list[str]) -> tuple[bytes, ...]:
    return tuple(certreq_authority(c) for path in paths for c in load_certificates(path))


def certificate_problems(config: Any) -> list[tuple[str, str]]:
    """Config rules of certificate authentication, as (key path, problem) pairs.

    Certificate and CRL files must be readable X.509; a private key file must
    exist (only the keystore reads its content); a `pubkey` side needs its
    certificate and key, or trust anchors to check the peer with. Both sides of a
    VPN use the same kind of authentication.
    """
    problems: list[tuple[str, str]] = []
    pki = config.ike.pki
    for index, path in enumerate(pki.ca_certificates):
        problems += _file_problem(f"ike.pki.ca-certificates[{index}]", path, load_certificates)
    for index, path in enumerate(pki.crls):
        problems += _file_problem(f"ike.pki.crls[{index}]", path, load_crl)
    for index, vpn in enumerate(config.ike.vpn):
        where = f"ike.vpn[{index}]"
        local, remote = vpn.ike_policy.local_auth_method, vpn.ike_policy.remote_auth_method
        if "pubkey" in (local, remote) and local != remote:
            problems.append(
                (f"{where}.ike-policy", f"{local} / {remote}: both sides must use the same kind")
            )
        if vpn.local_certificate:
            problems += _file_problem(
                f"{where}.local-certificate", vpn.local_certificate, load_certificates
            )
        if vpn.local_private_key and not _is_file(vpn.local_private_key):
            problems.append(
                (f"{where}.local-private-key", f"{show_value(vpn.local_private_key)} is not a file")
            )
        if local == "pubkey":
            for key in ("local-certificate", "local-private-key"):
                if not vpn[key]:
                    problems.append((f"{where}.{key}", "is required with local-auth-method pubkey"))
        if remote == "pubkey" and not pki.ca_certificates:
            problems.append(
                (
                    "ike.pki.ca-certificates",
                    f"vpn {show_value(vpn.name)}: remote-auth-method pubkey needs a trust anchor",
                )
            )
    return problems


def _file_problem(where: str, path: str, load: Any) -> list[tuple[str, str]]:
    try:
        load(path)
    except CertificateFileError as exc:
        return [(where, str(exc))]
    return []
