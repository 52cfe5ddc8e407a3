"""Authentication methods of IKE_AUTH: which AUTH a VPN takes and gives, and the certificate
payloads around it (RFC 7296 2.15, 3.6-3.8; RFC 4754; RFC 7427).

`ike_auth` asks this module what to put in messages and what to ask the
keystore; the keystore signs and verifies (the engine holds no private key and
no trust decision). A VPN's `local-auth-method` / `remote-auth-method` are
`pre-shared-key` (SHARED_KEY_MIC) or `pubkey` (RSA 1, ECDSA 9-11 or Digital
Signature 14, whichever the key and the peer's SIGNATURE_HASH_ALGORITHMS allow).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from ikefarm.proto.messages import CertAuthReply, CertAuthRequest, PskAuthReply, PskAuthRequest
from ikefarm.shared.ikev2.certs import DN_PREFIX, dn_from_text, dn_identity_matches, looks_like_dn
from ikefarm.shared.ikev2.constants import AuthMethod, CertEncoding, NotifyType, PayloadType
from ikefarm.shared.ikev2.crypto.signature import hash_algorithms_data, parse_hash_algorithms
from ikefarm.shared.ikev2.message import Message
from ikefarm.shared.ikev2.payloads import (
    AuthPayload,
    CertPayload,
    CertReqPayload,
    IdPayload,
    NotifyPayload,
    Payload,
)

if TYPE_CHECKING:
    from ikefarm.shared.ikev2.policy import EnginePolicy, VpnPolicy
    from ikefarm.shared.ikev2.sa import IkeSa

PSK = "pre-shared-key"
PUBKEY = "pubkey"
EAP_RADIUS = "eap-radius"
EAP_METHOD = 0  # the peer sent no AUTH in its first IKE_AUTH: it asks for EAP (RFC 7296 2.16)
CERT_AUTH = "cert-auth"  # the KeystoreRequest operation for certificate AUTH (effects.CERT_AUTH)

SIGNATURE_METHODS = frozenset(
    {
        AuthMethod.RSA_DIGITAL_SIGNATURE,
        AuthMethod.ECDSA_SHA256_P256,
        AuthMethod.ECDSA_SHA384_P384,
        AuthMethod.ECDSA_SHA512_P521,
        AuthMethod.DIGITAL_SIGNATURE,
    }
)


def method_name(method: int) -> str:
    try:
        return AuthMethod(method).name
    except ValueError:
        return f"METHOD_{method}"


def accepts(vpn: VpnPolicy, method: int) -> bool:
    """Does the peer's AUTH method fit what this VPN requires of it? `EAP_METHOD` (0, no
    AUTH payload: RFC 7296 2.16) fits an `eap-radius` VPN only."""
    if vpn.remote_auth == EAP_RADIUS:
        return method == EAP_METHOD
    if vpn.remote_auth == PSK:
        return method == AuthMethod.SHARED_KEY_MIC
    if vpn.remote_auth == PUBKEY:
        return method in SIGNATURE_METHODS
    return False


def same_kind(vpn: VpnPolicy) -> bool:
    """One keystore round trip verifies and signs: both sides PSK, or both certificates."""
    return vpn.local_auth == vpn.remote_auth


def uses_pubkey(vpns: Iterable[VpnPolicy]) -> bool:
    return any(PUBKEY in (v.local_auth, v.remote_auth) for v in vpns)


# -- identities ---------------------------------------------------------------------------------


def identity_payload(text: str, payload_type: PayloadType) -> IdPayload:
    """Our configured identity as an ID payload; a DN ("C=CH, CN=gw") becomes ID_DER_ASN1_DN."""
    if text.startswith(DN_PREFIX):
        return IdPayload.from_der_dn(bytes.fromhex(text[len(DN_PREFIX) :]), payload_type)
    if looks_like_dn(text) and "@" not in text:
        return IdPayload.from_der_dn(dn_from_text(text).public_bytes(), payload_type)
    return IdPayload.from_string(text, payload_type)


def dn_matches(configured: str, presented: str) -> bool | None:
    """A configured DN against a presented ID_DER_ASN1_DN identity; None if not both DNs."""
    if presented.startswith(DN_PREFIX) and looks_like_dn(configured):
        try:
            return dn_identity_matches(configured, bytes.fromhex(presented[len(DN_PREFIX) :]))
        except ValueError:
            return False
    return None


# -- IKE_SA_INIT: SIGNATURE_HASH_ALGORITHMS (RFC 7427 4) and CERTREQ (RFC 7296 1.2) ------------


def init_notifies(vpns: Iterable[VpnPolicy]) -> list[Payload]:
    """We announce the hashes we sign and verify with when a VPN uses certificates."""
    if not uses_pubkey(vpns):
        return []
    return [NotifyPayload(NotifyType.SIGNATURE_HASH_ALGORITHMS, data=hash_algorithms_data())]


def learn_peer_hashes(sa: IkeSa, message: Message) -> None:
    notify = message.notify(NotifyType.SIGNATURE_HASH_ALGORITHMS)
    sa.peer_signature_hashes = parse_hash_algorithms(notify.data) if notify is not None else ()


def signature_hashes_for_signing(sa: IkeSa) -> list[int]:
    """RFC 7427 is used only when both sides announced it; we always do with certificates."""
    return list(sa.peer_signature_hashes)


def certreq_payloads(policy: EnginePolicy, vpns: Iterable[VpnPolicy]) -> list[Payload]:
    """One CERTREQ naming every trust anchor (RFC 7296 3.7) when a peer must show a certificate."""
    if not policy.certreq_authorities or not any(v.remote_auth == PUBKEY for v in vpns):
        return []
    data = b"".join(policy.certreq_authorities)
    return [CertReqPayload(CertEncoding.X509_SIGNATURE, data)]


# -- IKE_AUTH -----------------------------------------------------------------------------------


def certificate_payloads(vpn: VpnPolicy) -> list[Payload]:
    """Our certificate, then the intermediates of `local-certificate` (RFC 7296 3.6): what a
    CERTREQ asks for; sent always, as the peer may not know our chain."""
    if vpn.local_auth != PUBKEY:
        return []
    return [CertPayload(CertEncoding.X509_SIGNATURE, c) for c in vpn.local_certificates]


def peer_certificates(message: Message) -> list[bytes]:
    """The X.509 certificates the peer sent, end-entity first (RFC 7296 3.6)."""
    return [
        p.data
        for p in message.payloads
        if isinstance(p, CertPayload) and p.encoding == CertEncoding.X509_SIGNATURE
    ]


def reply_method(reply: PskAuthReply | CertAuthReply) -> int:
    """The AUTH method of what the keystore signed: a certificate's, or the PSK's MIC."""
    if isinstance(reply, CertAuthReply) and reply.method:
        return int(reply.method)
    return int(AuthMethod.SHARED_KEY_MIC)


def our_auth(vpn: VpnPolicy, reply: PskAuthReply | CertAuthReply) -> list[Payload]:
    """CERT payloads (with certificates) and our AUTH payload from the keystore's answer."""
    return [*certificate_payloads(vpn), AuthPayload(reply_method(reply), reply.auth)]


def sign_request(
    sa: IkeSa, vpn: VpnPolicy, remote_id: str, sign_octets: bytes
) -> CertAuthRequest | PskAuthRequest:
    """The keystore call that makes our AUTH over `sign_octets` (RFC 7296 2.15), with
    the VPN's own method; nothing to verify."""
    if vpn.local_auth == PUBKEY:
        return cert_request(sa, vpn, "sign", sign_octets=sign_octets)
    assert sa.algorithms.prf is not None
    return PskAuthRequest(
        prf_id=sa.algorithms.prf[0],
        local_id=vpn.local_id,
        remote_id=remote_id,
        verify_octets=b"",
        verify_auth=b"",
        sign_octets=sign_octets,
        purpose="sign",
    )


def cert_request(
    sa: IkeSa,
    vpn: VpnPolicy,
    purpose: str,
    *,
    peer: Message | None = None,
    peer_id: IdPayload | None = None,
    peer_auth: AuthPayload | None = None,
    verify_octets: bytes = b"",
    sign_octets: bytes = b"",
) -> CertAuthRequest:
    """A CertAuthRequest: what to verify, what to sign, nothing secret."""
    return CertAuthRequest(
        vpn=vpn.name,
        purpose=purpose,
        verify_octets=verify_octets,
        verify_method=int(peer_auth.method) if peer_auth is not None else 0,
        verify_auth=peer_auth.data if peer_auth is not None else b"",
        peer_certs=peer_certificates(peer) if peer is not None else [],
        peer_id_type=int(peer_id.id_type) if peer_id is not None else 0,
        peer_id_data=peer_id.data if peer_id is not None else b"",
        sign_octets=sign_octets,
        peer_hashes=signature_hashes_for_signing(sa),
    )


_SIDE_KEYS = {"local": "local_auth", "remote": "remote_auth"}


def count_methods(
    engine: Any, sa: IkeSa, local_method: int | None, remote_method: int | None
) -> dict[str, str]:
    """Count the AUTH methods used (`auth.local.DIGITAL_SIGNATURE`, ...); `show` names them."""
    names: dict[str, str] = {}
    for side, method in (("local", local_method), ("remote", remote_method)):
        if method is None:
            continue
        names[_SIDE_KEYS[side]] = method_name(method)  # shared key strings: one per SA adds up
        engine.count(f"auth.{side}.{method_name(method)}")
    sa.auth_methods = names
    return names
