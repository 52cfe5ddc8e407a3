"""The engine's view of the configuration: VPNs, proposals and security policies, resolved.

Built once from a `Config` (without secrets: the engine never holds a PSK or
PPK). Templates are merged with each VPN's overrides here so the exchanges read
one flat `VpnPolicy`. Algorithm names become transform numbers here.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

from ikefarm.shared.config.loader import Config, Node, ppk_identity
from ikefarm.shared.ikev2.certs import (
    certreq_authorities,
    default_local_id,
    local_certificate_chain,
)
from ikefarm.shared.ikev2.constants import EsnId, TransformType
from ikefarm.shared.ikev2.crypto.registry import AlgorithmKind, lookup
from ikefarm.shared.ikev2.payloads import Proposal, TrafficSelector, Transform
from ikefarm.shared.ikev2.pools import Pool, pools_from_config

DEFAULT_IKE_PROPOSALS: tuple[dict[str, Any], ...] = (
    {
        "aead-alg": ["aes256-gcm-128", "aes128-gcm-128", "chacha20-poly1305"],
        "prf-alg": ["hmac-sha384", "hmac-sha256", "hmac-sha512"],
        "dh-group": ["x25519", "ecp256", "ecp384", "modp3072", "modp2048"],
    },
    {
        "enc-alg": ["aes256-cbc", "aes128-cbc"],
        "auth-alg": ["hmac-sha256", "hmac-sha384", "hmac-sha512"],
        "dh-group": ["x25519", "ecp256", "ecp384", "modp3072", "modp2048"],
    },
)
DEFAULT_ESP_PROPOSALS: tuple[dict[str, Any], ...] = (
    {"aead-alg": ["aes256-gcm-128", "aes128-gcm-128", "chacha20-poly1305"], "esn": [False]},
    {
        "enc-alg": ["aes256-cbc", "aes128-cbc"],
        "auth-alg": ["hmac-sha256", "hmac-sha1"],
        "esn": [False],
    },
)

# RFC 7296 3.3.3 transform types each protocol carries, in the order they are written
IKE_TRANSFORM_ORDER = (TransformType.ENCR, TransformType.PRF, TransformType.INTEG, TransformType.DH)
ESP_TRANSFORM_ORDER = (TransformType.ENCR, TransformType.INTEG, TransformType.DH, TransformType.ESN)

# auth-alg -> PRF of the same hash, when an enc+auth proposal names no prf-alg
_PRF_FOR_AUTH = {"hmac-sha1": "hmac-sha1", "hmac-sha256": "hmac-sha256",
                 "hmac-sha384": "hmac-sha384", "hmac-sha512": "hmac-sha512"}  # fmt: skip

Algorithm = tuple[int, int | None]  # (transform id, key length in bits or None)


@dataclass(frozen=True)
class ProposalSpec:
    """One configured proposal: per transform type, the acceptable algorithms by preference."""

    transforms: dict[TransformType, tuple[Algorithm, ...]]

    def is_aead(self) -> bool:
        return TransformType.INTEG not in self.transforms

    def to_proposal(self, number: int, protocol_id: int, spi: bytes) -> Proposal:
        order = IKE_TRANSFORM_ORDER if protocol_id == 1 else ESP_TRANSFORM_ORDER
        transforms = [
            Transform(kind, transform_id, key_bits)
            for kind in order
            for transform_id, key_bits in self.transforms.get(kind, ())
        ]
        return Proposal(number, protocol_id, spi, transforms)

    def first(self, kind: TransformType) -> Algorithm | None:
        algorithms = self.transforms.get(kind)
        return algorithms[0] if algorithms else None


def _algorithms(kind: AlgorithmKind, names: list[str] | None) -> tuple[Algorithm, ...]:
    return tuple((int(a.transform_id), a.key_bits) for a in (lookup(kind, n) for n in names or []))


def ike_proposal_spec(proposal: dict[str, Any]) -> ProposalSpec:
    transforms: dict[TransformType, tuple[Algorithm, ...]] = {}
    if proposal.get("aead-alg"):
        transforms[TransformType.ENCR] = _algorithms(AlgorithmKind.AEAD, proposal["aead-alg"])
        prf_names = proposal.get("prf-alg") or ["hmac-sha256"]
    else:
        transforms[TransformType.ENCR] = _algorithms(AlgorithmKind.ENC, proposal.get("enc-alg"))
        auth_names = proposal.get("auth-alg") or []
        transforms[TransformType.INTEG] = _algorithms(AlgorithmKind.AUTH, auth_names)
        prf_names = proposal.get("prf-alg") or [_PRF_FOR_AUTH[a] for a in auth_names]
    transforms[TransformType.PRF] = _algorithms(AlgorithmKind.PRF, prf_names)
    transforms[TransformType.DH] = _algorithms(AlgorithmKind.DH, proposal.get("dh-group"))
    return ProposalSpec(transforms)


def esp_proposal_spec(proposal: dict[str, Any]) -> ProposalSpec:
    transforms: dict[TransformType, tuple[Algorithm, ...]] = {}
    if proposal.get("aead-alg"):
        transforms[TransformType.ENCR] = _algorithms(AlgorithmKind.AEAD, proposal["aead-alg"])
    else:
        transforms[TransformType.ENCR] = _algorithms(AlgorithmKind.ENC, proposal.get("enc-alg"))
        transforms[TransformType.INTEG] = _algorithms(AlgorithmKind.AUTH, proposal.get("auth-alg"))
    if proposal.get("dh-group"):
        transforms[TransformType.DH] = _algorithms(AlgorithmKind.DH, proposal["dh-group"])
    esn = proposal.get("esn") or [False]
    transforms[TransformType.ESN] = tuple(
        (int(EsnId.ESN if flag else EsnId.NO_ESN), None) for flag in esn
    )
    return ProposalSpec(transforms)


@dataclass(frozen=True)
class TsSpec:
    """A configured traffic selector; `subnet` None means the peer's (or its VIP's) address."""

    subnet: str | None
    protocol: int = 0
    port: int = 0

    def resolve(self, dynamic_address: str | None) -> TrafficSelector | None:
        ports = (self.port, self.port) if self.port else (0, 65535)
        if self.subnet is not None:
            return TrafficSelector.from_network(self.subnet, self.protocol, ports)
        if dynamic_address is None:
            return None
        prefix = 32 if ipaddress.ip_address(dynamic_address).version == 4 else 128
        return TrafficSelector.from_network(f"{dynamic_address}/{prefix}", self.protocol, ports)

    def resolve_any(self, family_address: str) -> TrafficSelector | None:
        """Without a subnet: every address of `family_address`'s family (a VIP to come)."""
        if self.subnet is not None:
            return None
        ports = (self.port, self.port) if self.port else (0, 65535)
        whole = "0.0.0.0/0" if ipaddress.ip_address(family_address).version == 4 else "::/0"
        return TrafficSelector.from_network(whole, self.protocol, ports)


@dataclass(frozen=True)
class SecurityPolicy:
    name: str
    vpn: str
    reqid: int
    local_ts: TsSpec
    remote_ts: TsSpec
    mode: str
    esp_proposals: tuple[ProposalSpec, ...]
    replay_window: int
    dpd_action: str
    start_action: str
    close_action: str
    rekey_time: float
    life_time: float
    rand_time: float
    priority: int = 0
    inject_routes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class VpnPolicy:
    name: str
    local_address: str | None
    remote_address: str  # an address or "any"
    local_id: str
    remote_id: str | None  # None: any identity
    local_auth: str
    remote_auth: str
    ike_proposals: tuple[ProposalSpec, ...]
    dpd_delay: float
    require_ppk: bool
    mobike: bool
    fragmentation: bool
    rekey_time: float
    reauth_time: float
    over_time: float
    rand_time: float
    ppk: str | None
    vip_request: tuple[str, ...]
    vip_pools: tuple[str, ...]
    security_policies: tuple[SecurityPolicy, ...]
    # pubkey: our certificate then its intermediates (DER), sent as CERT payloads
    local_certificates: tuple[bytes, ...] = ()

    def matches_addresses(self, local: str, remote: str) -> int:
        """0 = no match; higher = more specific (exact remote beats "any")."""
        if self.local_address is not None and self.local_address != local:
            return 0
        if self.remote_address == "any":
            return 1
        return 2 if self.remote_address == remote else 0


@dataclass(frozen=True)
class RetransmitPolicy:
    tries: int
    timeout: float
    base: float
    jitter: int
    limit: int


JUNOS_INITIATOR_HALF_OPEN_TIMEOUT = 60.0


@dataclass(frozen=True)
class EnginePolicy:
    vpns: tuple[VpnPolicy, ...]
    retransmit: RetransmitPolicy
    initiator_only: bool
    make_before_break: bool
    half_open_timeout: float
    # Junos (seed 000): "Initiator continues to use 60 seconds" for its half-open SAs. It
    # applies where the operator configured [ike.session.half-open]; otherwise the vSR
    # retransmission schedule alone ends an unanswered initiation.
    initiator_half_open_timeout: float | None = None
    fragment_size: int = 1280
    tx_invalid_cookie: bool = False  # JunosE (seed 002): answer unknown SPIs, rate-limited
    ike_port: int = 500
    natt_port: int = 4500
    # `[[ike.ppk]]` name -> PPK_ID octets: identities only, the secrets stay in the keystore
    ppks: dict[str, bytes] = field(default_factory=dict)
    # CERTREQ Certification Authority values of our trust anchors (RFC 7296 3.7)
    certreq_authorities: tuple[bytes, ...] = ()
    # `[[ike.pool]]` by name: the addresses and attributes of CFG_REPLY (exchanges/config.py)
    pools: dict[str, Pool] = field(default_factory=dict)

    def vpn(self, name: str) -> VpnPolicy | None:
        return next((v for v in self.vpns if v.name == name), None)

    def candidates(self, local: str, remote: str) -> list[VpnPolicy]:
        """Enabled VPNs whose addresses fit, the most specific first (stable otherwise)."""
        scored = [(v.matches_addresses(local, remote), i, v) for i, v in enumerate(self.vpns)]
        return [v for score, _i, v in sorted(scored, key=lambda t: (-t[0], t[1])) if score > 0]


def _pick(override: Any, template_value: Any) -> Any:
    return template_value if override is None else override


def _template(templates: list[Node], name: str | None) -> Node | None:
    return next((t for t in templates if t.name == name), None) if name else None


def engine_policy(config: Config) -> EnginePolicy:
    ike = config.ike
    vpns: list[VpnPolicy] = []
    reqid = 0
    for vpn in ike.vpn:
        if not vpn.enabled:
            continue
        ike_template = _template(ike.ike_policy_template, vpn.ike_policy.template)
        ipsec_template = _template(ike.ipsec_policy_template, vpn.ipsec_policy.template)
        ike_raw = [p.to_dict() for p in ike_template.ike_proposal] if ike_template else []
        esp_raw = [p.to_dict() for p in ipsec_template.esp_proposal] if ipsec_template else []
        ike_proposals = tuple(ike_proposal_spec(p) for p in ike_raw or DEFAULT_IKE_PROPOSALS)
        esp_proposals = tuple(esp_proposal_spec(p) for p in esp_raw or DEFAULT_ESP_PROPOSALS)

        def ike_value(key: str, default: Any, template: Node | None = ike_template) -> Any:
            return template[key] if template is not None else default

        def ipsec_value(key: str, default: Any, template: Node | None = ipsec_template) -> Any:
            return template[key] if template is not None else default

        rekey = ike_value("rekey-time", 14400.0)
        over = ike_value("over-time", None)
        over = rekey * 0.1 if over is None else over
        rand = ike_value("rand-time", None)
        policies = []
        for sp in vpn.security_policy:
            reqid += 1
            child_rekey = ipsec_value("rekey-time", 3600.0)
            life = ipsec_value("life-time", None)
            life = child_rekey * 1.1 if life is None else life
            child_rand = ipsec_value("rand-time", None)
            routes = {k: v for k, v in sp.inject_routes.to_dict().items() if v is not None}
            policies.append(
                SecurityPolicy(
                    name=sp.name,
                    vpn=vpn.name,
                    reqid=reqid,
                    local_ts=TsSpec(sp.local_ts.subnet, sp.local_ts.protocol, sp.local_ts.port),
                    remote_ts=TsSpec(sp.remote_ts.subnet, sp.remote_ts.protocol, sp.remote_ts.port),
                    mode=sp.mode,
                    esp_proposals=esp_proposals,
                    replay_window=_pick(
                        vpn.ipsec_policy.replay_window, ipsec_value("replay-window", 32)
                    ),
                    dpd_action=_pick(
                        vpn.ipsec_policy.dpd_action, ipsec_value("dpd-action", "restart")
                    ),
                    start_action=_pick(
                        vpn.ipsec_policy.start_action, ipsec_value("start-action", "trap")
                    ),
                    close_action=_pick(
                        vpn.ipsec_policy.close_action, ipsec_value("close-action", "none")
                    ),
                    rekey_time=child_rekey,
                    life_time=life,
                    rand_time=max(0.0, life - child_rekey) if child_rand is None else child_rand,
                    priority=sp.priority,
                    inject_routes=routes,
                )
            )
        chain = local_certificate_chain(vpn.local_certificate)
        vpns.append(
            VpnPolicy(
                name=vpn.name,
                local_address=vpn.local_address,
                remote_address=vpn.remote_address,
                local_id=vpn.local_id or default_local_id(chain) or vpn.local_address or "%any",
                remote_id=vpn.remote_id,
                local_auth=vpn.ike_policy.local_auth_method,
                remote_auth=vpn.ike_policy.remote_auth_method,
                ike_proposals=ike_proposals,
                dpd_delay=_pick(vpn.ike_policy.dpd_delay, ike_value("dpd-delay", 0.0)),
                require_ppk=_pick(vpn.ike_policy.require_ppk, ike_value("require-ppk", False)),
                mobike=_pick(vpn.ike_policy.mobike, ike_value("mobike", False)),
                fragmentation=ike_value("fragmentation", True),
                rekey_time=rekey,
                reauth_time=ike_value("reauth-time", 0.0),
                over_time=over,
                rand_time=over if rand is None else rand,
                ppk=vpn.ppk,
                vip_request=tuple(vpn.vip_request),
                vip_pools=tuple(vpn.vip_pool),
                security_policies=tuple(policies),
                local_certificates=chain,
            )
        )
    options = ike.global_options
    return EnginePolicy(
        vpns=tuple(vpns),
        retransmit=RetransmitPolicy(
            tries=options.retransmit_tries,
            timeout=options.retransmit_timeout,
            base=options.retransmit_base,
            jitter=options.retransmit_jitter,
            limit=options.retransmit_limit,
        ),
        initiator_only=options.initiator_only,
        make_before_break=options.make_before_break,
        half_open_timeout=float(ike.session.half_open.timeout),
        initiator_half_open_timeout=(
            JUNOS_INITIATOR_HALF_OPEN_TIMEOUT
            if any(path.startswith("ike.session.half-open") for path in config.explicit)
            else None
        ),
        tx_invalid_cookie=bool(options.tx_invalid_cookie),
        ike_port=config.ingress.ike_port,
        natt_port=config.ingress.natt_port,
        ppks={p.name: identity for p in ike.ppk if (identity := ppk_identity(p)) is not None},
        certreq_authorities=certreq_authorities(ike.pki.ca_certificates),
        pools=pools_from_config(ike.pool),
    )
