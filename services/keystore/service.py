"""Keystore: holds PSKs, PPKs and private keys; computes what needs them, returns no secret.

Endpoint `subjects.KEYSTORE_CERT_AUTH` (CertAuthRequest -> CertAuthReply): certificate
AUTH (`certs.py`): signatures with the VPNs' private keys, which are read here and
nowhere else, and the verification of a peer's chain, CRLs, identity and AUTH.

Endpoint `subjects.KEYSTORE_PSK_AUTH` (PskAuthRequest -> PskAuthReply): the
PSK AUTH of RFC 7296 2.15, verified and computed here (`psk.py`), so the
`[[ike.pre-shared-key]]` secrets never travel on the bus (DESIGN principle 4).
"""

from __future__ import annotations

from typing import Any

from ikefarm.proto import subjects
from ikefarm.proto.envelope import BusError
from ikefarm.proto.messages import CertAuthReply, CertAuthRequest, PskAuthReply, PskAuthRequest
from ikefarm.services.keystore.certs import CertificateFileError, CertStore, cert_auth
from ikefarm.services.keystore.psk import PskStore, UnknownPurpose, UnsupportedPrf
from ikefarm.shared.bus.runtime import Runtime, ServiceBase, ServiceUnavailable
from ikefarm.shared.config.loader import Config


class KeystoreService(ServiceBase):
    name = "keystore"
    subsystem = "config"
    description = "ikefarm keystore: secret-bearing computations, secrets never leave"

    def __init__(self, runtime: Runtime) -> None:
        super().__init__(runtime)
        self.psks = PskStore([])
        self.certs = CertStore()

    @classmethod
    def preflight(cls, config: Config) -> None:
        try:
            CertStore.from_config(config)
        except CertificateFileError as exc:
            raise ServiceUnavailable(f"certificate authentication: {exc}") from None

    async def setup(self) -> None:
        self.certs = CertStore.from_config(self.config)
        await self.runtime.add_endpoint(
            "cert-auth", CertAuthRequest, self.on_cert_auth, subject=subjects.KEYSTORE_CERT_AUTH
        )
        self.psks = PskStore.from_config(self.config)
        await self.runtime.add_endpoint(
            "psk-auth", PskAuthRequest, self.on_psk_auth, subject=subjects.KEYSTORE_PSK_AUTH
        )
        self.log.control("psk_loaded", entries=len(self.psks))

    def gauges(self) -> dict[str, Any]:
        return {
            "psk_entries": len(self.psks),
            "private_keys": self.certs.key_count,
            "trust_anchors": len(self.certs.anchors),
            "crls": len(self.certs.crls),
        }

    async def on_cert_auth(self, request: CertAuthRequest, _msg: Any) -> CertAuthReply:
        try:
            reply = cert_auth(self.certs, request)
        except UnknownPurpose as exc:
            self.runtime.counters["cert_auth.bad_purpose"] += 1
            raise BusError("bad_field", f"CertAuthRequest.{exc}") from None
        outcome = "verified" if reply.verified else reply.reason
        self.runtime.counters[f"cert_auth.{outcome}"] += 1
        self.log.at(
            2 if reply.verified else 1,
            "cert_auth",
            result=outcome,
            vpn=request.vpn,
            purpose=request.purpose,
            peer=reply.peer_subject or None,
            method=reply.method or None,
        )
        return reply

    async def on_psk_auth(self, request: PskAuthRequest, _msg: Any) -> PskAuthReply:
        try:
            reply, entry = self.psks.authenticate(request)
        except UnsupportedPrf as exc:
            self.runtime.counters["psk_auth.bad_prf"] += 1
            raise BusError("bad_field", f"PskAuthRequest.{exc}") from None
        except UnknownPurpose as exc:
            self.runtime.counters["psk_auth.bad_purpose"] += 1
            raise BusError("bad_field", f"PskAuthRequest.{exc}") from None
        outcome = "verified" if reply.verified else reply.reason.replace("auth_", "")
        self.runtime.counters[f"psk_auth.{outcome}"] += 1
        self.log.at(
            1 if not reply.verified else 2,
            "psk_auth",
            result=outcome,
            local_id=request.local_id,
            remote_id=request.remote_id,
            entry=entry.label if entry is not None else None,
            prf_id=request.prf_id,
        )
        return reply
