"""Certificate authentication where the private keys live (RFC 7296 2.15, 3.6-3.8; RFC 7427).

The keystore reads each VPN's `local-private-key` at start and never lets it
out: it signs the octets the ike worker sends. It also holds the trust store
(`[ike.pki] ca-certificates`) and the CRLs (`[ike.pki] crls`), and verifies a
peer: its certificate chain up to a trust anchor (`cryptography`'s X.509 path
validation), no certificate of the chain revoked by a CRL of its issuer, the
presented identity named by the end-entity certificate (RFC 4945 3.1), and
finally its AUTH signature over the signed octets.

Every refusal is a `reason` label, never an exception: a malformed certificate
is an authentication failure, not a crash.
"""

from __future__ import annotations

import datetime
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_der_private_key,
    load_pem_private_key,
)
from cryptography.x509.verification import (
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from ikefarm.proto.messages import CertAuthReply, CertAuthRequest
from ikefarm.services.keystore.psk import UnknownPurpose
from ikefarm.shared.config.loader import Config
from ikefarm.shared.ikev2.certs import (
    CertificateFileError,
    der,
    identity_names_certificate,
    load_certificates,
    load_crl,
    read_file,
)
from ikefarm.shared.ikev2.crypto.signature import (
    PrivateKey,
    SignatureError,
    key_type,
    sign,
    verify,
)

PURPOSES = frozenset({"verify-and-sign", "sign", "verify"})  # as for PSK AUTH
MAX_PEER_CERTIFICATES = 8  # an end-entity certificate and a few intermediates


@dataclass(frozen=True)
class LocalCredential:
    """A VPN's private key (kept here) and its certificate."""

    vpn: str
    certificate: x509.Certificate
    key: PrivateKey = field(repr=False)


@dataclass(frozen=True)
class Outcome:
    verified: bool
    reason: str = ""
    method: int = 0
    auth: bytes = b""
    subject: str = ""


class CertStore:
    def __init__(
        self,
        credentials: Sequence[LocalCredential] = (),
        anchors: Sequence[x509.Certificate] = (),
        crls: Sequence[x509.CertificateRevocationList] = (),
    ) -> None:
        self._credentials = {c.vpn: c for c in credentials}
        self.anchors = list(anchors)
        self.crls = list(crls)

    def __repr__(self) -> str:
        return (
            f"CertStore({len(self._credentials)} keys, {len(self.anchors)} anchors,"
            f" {len(self.crls)} crls)"
        )

    @property
    def key_count(self) -> int:
        return len(self._credentials)

    @classmethod
    def from_config(
        cls, config: Config, sealed_keys: Mapping[str, bytes] | None = None
    ) -> CertStore:
        """Read keys, anchors and CRLs; CertificateFileError names the file that is wrong.

        `sealed_keys` (VPN name -> PKCS#8 DER, from the keystore's encrypted store) are
        used instead of reading `local-private-key` again."""
        credentials = []
        for vpn in config.ike.vpn:
            key_path = vpn.local_private_key
            if not key_path:
                continue
            if not vpn.local_certificate:
                raise CertificateFileError(
                    f"vpn {vpn.name}: local-private-key without local-certificate"
                )
            certificate = load_certificates(vpn.local_certificate)[0]
            stored = (sealed_keys or {}).get(vpn.name)
            key = load_private_key(key_path) if stored is None else private_key_from_der(stored)
            spki = certificate.public_key().public_bytes(*_SPKI)
            if spki != key.public_key().public_bytes(*_SPKI):
                raise CertificateFileError(
                    f"vpn {vpn.name}: {key_path} is not the key of {vpn.local_certificate}"
                )
            credentials.append(LocalCredential(vpn.name, certificate, key))
        anchors = [c for path in config.ike.pki.ca_certificates for c in load_certificates(path)]
        crls = [load_crl(path) for path in config.ike.pki.crls]
        return cls(credentials, anchors, crls)

    # -- signing ---------------------------------------------------------------------------

    def sign(self, vpn: str, octets: bytes, peer_hashes: Sequence[int]) -> Outcome:
        credential = self._credentials.get(vpn)
        if credential is None:
            return Outcome(False, "no_private_key")
        try:
            method, auth = sign(credential.key, octets, peer_hashes)
        except SignatureError as exc:
            return Outcome(False, exc.reason)
        return Outcome(True, method=int(method), auth=auth)

    # -- verification ----------------------------------------------------------------------

    def verify_peer(
        self,
        certificates: Sequence[bytes],
        id_type: int,
        id_data: bytes,
        method: int,
        auth: bytes,
        octets: bytes,
        now: datetime.datetime | None = None,
    ) -> Outcome:
        """The whole check of a peer's certificate AUTH; `reason` says what failed."""
        if not certificates:
            return Outcome(False, "no_certificate")
        if len(certificates) > MAX_PEER_CERTIFICATES:
            return Outcome(False, "too_many_certificates")
        try:
            chain = [x509.load_der_x509_certificate(bytes(c)) for c in certificates]
        except ValueError:
            return Outcome(False, "malformed_certificate")
        leaf = chain[0]
        subject = _subject_text(leaf)
        if not self.anchors:
            return Outcome(False, "no_trust_anchor", subject=subject)
        moment = now or datetime.datetime.now(datetime.UTC)
        try:
            path = self._verifier(moment).verify(leaf, chain[1:])
        except (VerificationError, ValueError):
            return Outcome(False, "untrusted_certificate", subject=subject)
        if self._revoked(path):
            return Outcome(False, "certificate_revoked", subject=subject)
        if not identity_names_certificate(id_type, id_data, leaf):
            return Outcome(False, "identity_not_in_certificate", subject=subject)
        try:
            verify(leaf.public_key(), method, auth, octets)  # type: ignore[arg-type]
        except SignatureError as exc:
            return Outcome(False, exc.reason, subject=subject)
        return Outcome(True, subject=subject)

    def _verifier(self, moment: datetime.datetime) -> x509.verification.ClientVerifier:
        # IKE certificates need not follow the Web PKI profile for end entities (no EKU
        # or SAN rules); CAs still must be CAs (basicConstraints, keyCertSign).
        return (
            PolicyBuilder()
            .store(Store(self.anchors))
            .time(moment)
            .extension_policies(
                ca_policy=ExtensionPolicy.webpki_defaults_ca(),
                ee_policy=ExtensionPolicy.permit_all(),
            )
            .build_client_verifier()
        )

    def _revoked(self, path: x509.verification.VerifiedClient) -> bool:
        """A certificate of the validated chain listed by a CRL its issuer signed (RFC 5280 6.3)."""
        chain = path.chain
        for cert, issuer in itertools.pairwise(chain):
            for crl in self.crls:
                if crl.issuer != issuer.subject:
                    continue
                try:
                    if not crl.is_signature_valid(issuer.public_key()):  # type: ignore[arg-type]
                        continue
                except (TypeError, ValueError):
                    continue
                if crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None:
                    return True
        return False

    def local_certificate_der(self, vpn: str) -> bytes | None:
        credential = self._credentials.get(vpn)
        return der(credential.certificate) if credential else None


def cert_auth(store: CertStore, request: CertAuthRequest) -> CertAuthReply:
    """Answer one CertAuthRequest: verify the peer first (unless only signing), then sign.

    Raises UnknownPurpose for a purpose that is not one of PURPOSES.
    """
    if request.purpose not in PURPOSES:
        raise UnknownPurpose(request.purpose)
    subject = ""
    if request.purpose != "sign":
        checked = store.verify_peer(
            request.peer_certs,
            request.peer_id_type,
            request.peer_id_data,
            request.verify_method,
            request.verify_auth,
            request.verify_octets,
        )
        subject = checked.subject
        if not checked.verified:
            return CertAuthReply(verified=False, reason=checked.reason, peer_subject=subject)
        if request.purpose == "verify":
            return CertAuthReply(verified=True, peer_subject=subject)
    signed = store.sign(request.vpn, request.sign_octets, request.peer_hashes)
    if not signed.verified:
        return CertAuthReply(verified=False, reason=signed.reason, peer_subject=subject)
    return CertAuthReply(
        verified=True, method=signed.method, auth=signed.auth, peer_subject=subject
    )


def private_key_der(key: PrivateKey) -> bytes:
    """PKCS#8 DER of a key, for the keystore's sealed store (never written anywhere else)."""
    return key.private_bytes(Encoding.DER, PrivateFormat.PKCS8, NoEncryption())


def private_key_from_der(data: bytes) -> PrivateKey:
    return load_der_private_key(data, password=None)  # type: ignore[return-value]


def private_keys_of(config: Config) -> dict[str, bytes]:
    """VPN name -> PKCS#8 DER of each `local-private-key`, to seal into the store."""
    return {
        vpn.name: private_key_der(load_private_key(vpn.local_private_key))
        for vpn in config.ike.vpn
        if vpn.local_private_key
    }


def load_private_key(path: str) -> PrivateKey:
    """A PEM or DER (PKCS#8, PKCS#1, SEC1) private key without a passphrase."""
    data = read_file(path)
    try:
        key = (
            load_pem_private_key(data, password=None)
            if b"-----BEGIN" in data
            else load_der_private_key(data, password=None)
        )
    except (ValueError, TypeError):
        # the exception text could quote key material: say only what the file is not
        raise CertificateFileError(f"{path}: not an unencrypted PEM/DER private key") from None
    try:
        key_type(key)  # type: ignore[arg-type]
    except SignatureError:
        raise CertificateFileError(f"{path}: only RSA, ECDSA and Ed25519 keys sign") from None
    return key  # type: ignore[return-value]


def _subject_text(cert: x509.Certificate) -> str:
    try:
        return cert.subject.rfc4514_string()
    except ValueError:
        return "<unprintable subject>"


_SPKI = (Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
