"""Keystore: holds PSKs, PPKs and private keys; computes what needs them, returns no secret.

At start (`store.py`) the keystore opens its encrypted store with the master
key (missing or wrong: the process refuses to start and the file is left as
it is), imports the configuration's `[[ike.pre-shared-key]]` and `[[ike.ppk]]`
secrets into it, makes its bus transport key on the first start, and writes
the store back sealed. Everything it answers is computed from that store.

Endpoints (request/reply, docs/principles.md principle 4: no secret ever in a reply):
- `subjects.KEYSTORE_PSK_AUTH` (PskAuthRequest -> PskAuthReply): the PSK AUTH of
  RFC 7296 2.15, verified and computed here (`psk.py`).
- `subjects.KEYSTORE_TRANSPORT_KEY` (TransportKeyRequest -> TransportKeyReply):
  the public half of the transport key that PPK mixing is sealed to.
- `subjects.KEYSTORE_PPK_MIX` (PpkMixRequest -> PpkMixReply): RFC 8784 3 mixing
  of a PPK into sealed SK_d / SK_pi / SK_pr (`ppk.py`).
- `subjects.KEYSTORE_SA_SEAL` / `KEYSTORE_SA_UNSEAL` (SaSealRequest -> SaSealReply,
  SaUnsealRequest -> SaUnsealReply): SA snapshot secrets re-sealed under the keystore's
  snapshot key for JetStream, and opened again only sealed to an adopting worker
  (`sa_secrets.py`, docs/failover.md).
- `subjects.KEYSTORE_SECRET` (SecretRequest): a request for a secret itself;
  always a structured refusal ("secret_refused"), counted.
- `subjects.KEYSTORE_CERT_AUTH` (CertAuthRequest -> CertAuthReply): certificate
  AUTH (`certs.py`): signatures with the VPNs' private keys, which are read here
  and nowhere else, and the verification of a peer's chain, CRLs, identity and AUTH.
- `subjects.KEYSTORE_EAP_RELAY` (EapRelayRequest -> EapRelayReply), `KEYSTORE_EAP_AUTH`
  (EapAuthRequest -> PskAuthReply), `KEYSTORE_RADIUS_ACCOUNTING` (RadiusAccounting ->
  RadiusAccountingReply): the RADIUS client (`radius.py`, `eap.py`, docs/radius.md); the
  RADIUS shared secrets and the MSKs stay here.
"""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from ikefarm.proto import subjects
from ikefarm.proto.envelope import BusError
from ikefarm.proto.messages import (
    CertAuthReply,
    CertAuthRequest,
    EapAuthRequest,
    EapRelayReply,
    EapRelayRequest,
    PpkMixReply,
    PpkMixRequest,
    PskAuthReply,
    PskAuthRequest,
    RadiusAccounting,
    RadiusAccountingReply,
    SaSealReply,
    SaSealRequest,
    SaUnsealReply,
    SaUnsealRequest,
    SecretRequest,
    TransportKeyReply,
    TransportKeyRequest,
)
from ikefarm.services.keystore import eap as eap_module
from ikefarm.services.keystore import ppk as ppk_module
from ikefarm.services.keystore import radius
from ikefarm.services.keystore.certs import (
    CertificateFileError,
    CertStore,
    cert_auth,
    private_keys_of,
)
from ikefarm.services.keystore.ppk import BadMixRequest, PpkStore
from ikefarm.services.keystore.psk import PskStore, UnknownPurpose, UnsupportedPrf, psk_secrets
from ikefarm.services.keystore.sa_secrets import (
    SNAPSHOT_KEY,
    BadSaRequest,
    SaSecretKeeper,
    new_snapshot_key,
)
from ikefarm.services.keystore.store import (
    ORIGIN_CONFIG,
    ORIGIN_GENERATED,
    KeystoreLocked,
    SecretStore,
    StoredSecret,
    master_key,
    receive_master_key,
    store_path,
)
from ikefarm.shared.bus.runtime import Runtime, ServiceBase, ServiceUnavailable
from ikefarm.shared.bus.sealed import public_bytes
from ikefarm.shared.config.loader import Config

TRANSPORT_KEY = ("transport-key", "bus")
PRIVATE_KEY = "private-key"  # a VPN's `local-private-key`, PKCS#8 DER, sealed with the rest


class KeystoreUnavailable(ServiceUnavailable):
    """The store cannot be opened; the process exits with this text (no key material in it)."""


def open_store(config: Config) -> SecretStore:
    """Open the store with the master key, or raise KeystoreUnavailable saying why."""
    try:
        return SecretStore.open(store_path(config), master_key(config))
    except KeystoreLocked as exc:
        raise KeystoreUnavailable(f"keystore locked: {exc}") from None


def load_store(config: Config) -> tuple[SecretStore, bool]:
    """Open the store, import the configuration's secrets, make the transport key once.

    Returns the store and whether it changed (and so was written back)."""
    store = open_store(config)
    changed = store.replace_kind("psk", psk_secrets(config), ORIGIN_CONFIG)
    changed |= store.replace_kind(ppk_module.KIND, ppk_module.ppk_secrets(config), ORIGIN_CONFIG)
    private_keys = [
        StoredSecret(PRIVATE_KEY, vpn, der) for vpn, der in private_keys_of(config).items()
    ]
    changed |= store.replace_kind(PRIVATE_KEY, private_keys, ORIGIN_CONFIG)
    if store.get(*TRANSPORT_KEY) is None:
        private = X25519PrivateKey.generate().private_bytes(
            Encoding.Raw, PrivateFormat.Raw, NoEncryption()
        )
        store.put(StoredSecret(*TRANSPORT_KEY, private, origin=ORIGIN_GENERATED))
        changed = True
    if store.get(*eap_module.MSK_KEY) is None:
        store.put(
            StoredSecret(*eap_module.MSK_KEY, eap_module.new_msk_key(), origin=ORIGIN_GENERATED)
        )
        changed = True
    if store.get(*SNAPSHOT_KEY) is None:
        store.put(StoredSecret(*SNAPSHOT_KEY, new_snapshot_key(), origin=ORIGIN_GENERATED))
        changed = True
    if changed or not store.path.exists():
        store.save()
    return store, changed


class KeystoreService(ServiceBase):
    name = "keystore"
    subsystem = "config"
    description = "ikefarm keystore: secret-bearing computations, secrets never leave"

    def __init__(self, runtime: Runtime) -> None:
        super().__init__(runtime)
        self.psks = PskStore([])
        self.ppks = PpkStore([])
        self._transport: X25519PrivateKey | None = None
        self.certs = CertStore()
        self.sa_keeper: SaSecretKeeper | None = None
        self.eap: eap_module.EapRelay | None = None

    @classmethod
    def receive_master_key(cls, config: Config, fd: int | None) -> None:
        """At process start: read the master key once (the pipe `fd` from `ikefarm up`, else
        the environment variable, which is then deleted from this process's environment)."""
        receive_master_key(config, fd)

    @classmethod
    def preflight(cls, config: Config) -> None:
        open_store(config)
        try:
            CertStore.from_config(config)
        except CertificateFileError as exc:
            raise ServiceUnavailable(f"certificate authentication: {exc}") from None

    async def setup(self) -> None:
        store, changed = load_store(self.config)
        self.psks = PskStore.from_secrets(store.entries("psk"))
        self.ppks = PpkStore.from_secrets(store.entries(ppk_module.KIND))
        transport = store.get(*TRANSPORT_KEY)
        assert transport is not None
        self._transport = X25519PrivateKey.from_private_bytes(transport.secret)
        snapshot_key = store.get(*SNAPSHOT_KEY)
        assert snapshot_key is not None
        self.sa_keeper = SaSecretKeeper(self._transport, snapshot_key.secret)
        sealed_keys = {entry.name: entry.secret for entry in store.entries(PRIVATE_KEY)}
        self.certs = CertStore.from_config(self.config, sealed_keys)
        msk_key = store.get(*eap_module.MSK_KEY)
        assert msk_key is not None
        client = radius.RadiusClient(radius.servers_from_config(self.config), self.runtime.counters)
        self.eap = eap_module.EapRelay(client, msk_key.secret, self.runtime.counters)
        for endpoint, request_type, handler, subject in (
            ("psk-auth", PskAuthRequest, self.on_psk_auth, subjects.KEYSTORE_PSK_AUTH),
            ("ppk-mix", PpkMixRequest, self.on_ppk_mix, subjects.KEYSTORE_PPK_MIX),
            (
                "transport-key",
                TransportKeyRequest,
                self.on_transport_key,
                subjects.KEYSTORE_TRANSPORT_KEY,
            ),
            ("sa-seal", SaSealRequest, self.on_sa_seal, subjects.KEYSTORE_SA_SEAL),
            ("sa-unseal", SaUnsealRequest, self.on_sa_unseal, subjects.KEYSTORE_SA_UNSEAL),
            ("secret", SecretRequest, self.on_secret_request, subjects.KEYSTORE_SECRET),
            ("cert-auth", CertAuthRequest, self.on_cert_auth, subjects.KEYSTORE_CERT_AUTH),
            ("eap-relay", EapRelayRequest, self.on_eap_relay, subjects.KEYSTORE_EAP_RELAY),
            ("eap-auth", EapAuthRequest, self.on_eap_auth, subjects.KEYSTORE_EAP_AUTH),
            (
                "radius-accounting",
                RadiusAccounting,
                self.on_radius_accounting,
                subjects.KEYSTORE_RADIUS_ACCOUNTING,
            ),
        ):
            await self.runtime.add_endpoint(
                endpoint,
                request_type,
                handler,
                subject=subject,
                concurrent=endpoint in ("eap-relay", "radius-accounting"),  # wait on RADIUS
            )
        self.log.control(
            "keystore_opened",
            path=str(store.path),
            entries=len(store),
            written=changed,
        )
        self.log.control("psk_loaded", entries=len(self.psks))
        self.log.control("ppk_loaded", entries=len(self.ppks))

    def gauges(self) -> dict[str, Any]:
        return {
            "psk_entries": len(self.psks),
            "ppk_entries": len(self.ppks),
            "private_keys": self.certs.key_count,
            "trust_anchors": len(self.certs.anchors),
            "crls": len(self.certs.crls),
            "radius_servers": len(self.eap.client.servers) if self.eap is not None else 0,
        }

    def _outcome(self, operation: str, outcome: str, succeeded: bool, **fields: Any) -> None:
        """Count an answer by outcome; log it at level 2, a refusal at level 1."""
        self.runtime.counters[f"{operation}.{outcome}"] += 1
        self.log.at(2 if succeeded else 1, operation, result=outcome, **fields)

    async def on_cert_auth(self, request: CertAuthRequest, _msg: Any) -> CertAuthReply:
        try:
            reply = cert_auth(self.certs, request)
        except UnknownPurpose as exc:
            self.runtime.counters["cert_auth.bad_purpose"] += 1
            raise BusError("bad_field", f"CertAuthRequest.{exc}") from None
        self._outcome(
            "cert_auth",
            "verified" if reply.verified else reply.reason,
            reply.verified,
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
        self._outcome(
            "psk_auth",
            "verified" if reply.verified else reply.reason.replace("auth_", ""),
            reply.verified,
            local_id=request.local_id,
            remote_id=request.remote_id,
            entry=entry.label if entry is not None else None,
            prf_id=request.prf_id,
        )
        return reply

    async def on_eap_relay(self, request: EapRelayRequest, _msg: Any) -> EapRelayReply:
        assert self.eap is not None
        if not self.eap.client.servers:
            self.runtime.counters["eap_relay.no_server"] += 1
            raise BusError("unavailable", "no [[ike.radius-server]] is configured")
        reply = await self.eap.relay(request)
        self._outcome(
            "eap_relay",
            reply.outcome,
            reply.outcome in ("challenge", "accept"),
            vpn=request.vpn,
            session=request.session,
            server=reply.server,
            reason=reply.reason or None,
            msk=bool(reply.sealed_msk),
        )
        return reply

    async def on_eap_auth(self, request: EapAuthRequest, _msg: Any) -> PskAuthReply:
        assert self.eap is not None
        try:
            reply = self.eap.auth(request)
        except UnsupportedPrf as exc:
            self.runtime.counters["eap_auth.bad_prf"] += 1
            raise BusError("bad_field", f"EapAuthRequest.{exc}") from None
        self._outcome(
            "eap_auth",
            "verified" if reply.verified else reply.reason,
            reply.verified,
            session=request.session,
        )
        return reply

    async def on_radius_accounting(
        self, request: RadiusAccounting, _msg: Any
    ) -> RadiusAccountingReply:
        assert self.eap is not None
        if not self.eap.client.servers:
            raise BusError("unavailable", "no [[ike.radius-server]] is configured")
        try:
            reply = await self.eap.account(request)
        except ValueError as exc:
            self.runtime.counters["radius_accounting.bad_request"] += 1
            raise BusError("bad_field", f"RadiusAccounting.{exc}") from None
        self._outcome(
            "radius_accounting",
            request.status if reply.sent else "unanswered",
            reply.sent,
            session=request.session,
        )
        return reply

    async def on_transport_key(self, _request: TransportKeyRequest, _msg: Any) -> TransportKeyReply:
        assert self._transport is not None
        return TransportKeyReply(public_key=public_bytes(self._transport))

    async def on_ppk_mix(self, request: PpkMixRequest, _msg: Any) -> PpkMixReply:
        assert self._transport is not None
        try:
            reply, entry = self.ppks.mix(request, self._transport)
        except BadMixRequest as exc:
            self.runtime.counters["ppk_mix.bad_request"] += 1
            raise BusError("bad_field", f"PpkMixRequest.{exc}") from None
        self._outcome(
            "ppk_mix",
            "mixed" if reply.found else reply.reason,
            reply.found,
            ppk=entry.name if entry is not None else None,
            ppk_id=request.ppk_id.hex(),
            prf_id=request.prf_id,
        )
        return reply

    async def on_sa_seal(self, request: SaSealRequest, _msg: Any) -> SaSealReply:
        assert self.sa_keeper is not None
        try:
            reply = self.sa_keeper.seal(request)
        except BadSaRequest as exc:
            self.runtime.counters["sa_seal.bad_request"] += 1
            raise BusError("bad_field", f"SaSealRequest.{exc}") from None
        self.runtime.counters["sa_seal.items"] += len(reply.items)
        return reply

    async def on_sa_unseal(self, request: SaUnsealRequest, _msg: Any) -> SaUnsealReply:
        assert self.sa_keeper is not None
        try:
            reply = self.sa_keeper.unseal(request)
        except BadSaRequest as exc:
            self.runtime.counters["sa_unseal.bad_request"] += 1
            raise BusError("bad_field", f"SaUnsealRequest.{exc}") from None
        refused = sum(1 for r in reply.refused if r)
        self.runtime.counters["sa_unseal.items"] += len(reply.items) - refused
        if refused:
            self.runtime.counters["sa_unseal.refused"] += refused
            self.log.at(1, "sa_unseal_refused", items=refused, reason="seal_broken")
        return reply

    async def on_secret_request(self, request: SecretRequest, _msg: Any) -> None:
        self.runtime.counters["secret_requests_refused"] += 1
        self.log.at(1, "secret_request_refused", kind=request.kind, name=request.name)
        raise BusError(
            "secret_refused",
            "the keystore never returns a PSK, PPK or private key; it computes with them",
        )
