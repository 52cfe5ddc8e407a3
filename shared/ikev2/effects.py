"""What the engine asks its driver to do. The engine returns these; it performs no I/O.

The ike service turns them into NATS messages (datagrams to ingress, child SAs to
the kernel service, keystore requests), the tests inspect them directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ikefarm.proto.messages import (
    CertAuthReply,
    CertAuthRequest,
    EapAuthRequest,
    EapRelayReply,
    EapRelayRequest,
    PskAuthReply,
    PskAuthRequest,
)
from ikefarm.shared.ikev2.crypto.keys import IkeSaKeys


@dataclass(frozen=True)
class Endpoint:
    address: str
    port: int

    def __str__(self) -> str:
        return f"{self.address}[{self.port}]"


@dataclass(frozen=True)
class SendDatagram:
    """An IKE message to send; ingress adds the non-ESP marker on port 4500."""

    local: Endpoint
    remote: Endpoint
    data: bytes
    exchange: str = ""


@dataclass(frozen=True)
class PpkMix:
    """RFC 8784 3: mix the PPK named `ppk_id` into SK_d, SK_pi and SK_pr of `keys`. Not a bus
    message: the ike service seals the keys to the keystore (`services/ike/ppk_client.py`)."""

    prf_id: int
    ppk_id: bytes
    keys: IkeSaKeys = field(repr=False)


@dataclass(frozen=True)
class PpkMixed:
    """The keystore's answer to a PpkMix, opened: the mixed keys when it has that PPK."""

    found: bool
    keys: IkeSaKeys | None = field(default=None, repr=False)
    reason: str = ""


@dataclass(frozen=True)
class VipLease:
    """Lease addresses for a peer from the VPN's pools (RFC 7296 3.15; docs/vip-pools.md).

    Not a keystore request: the ike service leases them in the farm's KV bucket and
    answers with `VipLeased`, through the same typed request/answer step."""

    pools: tuple[str, ...]  # the VPN's vip-pool names, in order
    versions: tuple[int, ...]  # 4 and/or 6: one address per family requested
    identity: str  # the peer's IDi: the same identity gets its previous address back
    ike_unique_id: int  # the lease's owner


@dataclass(frozen=True)
class VipLeased:
    """What the lease store granted: (pool, address) per family it could serve."""

    addresses: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class VipRelease:
    """The IKE SA holding these leases is gone: free them (owner-checked by the store)."""

    ike_unique_id: int
    addresses: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class LocalVip:
    """A VIP the peer assigned us: install it (or remove it) on our side (seed 004)."""

    install: bool
    address: str
    local_address: str  # our IKE address: its interface, unless install-vip-on names one
    ike_unique_id: int


# what the engine asks the keystore (or the lease store), and the typed answers it takes back
KeystoreCall = (
    PskAuthRequest | CertAuthRequest | PpkMix | VipLease | EapRelayRequest | EapAuthRequest
)
KeystoreAnswer = PskAuthReply | CertAuthReply | PpkMixed | VipLeased | EapRelayReply

PSK_AUTH = "psk-auth"
CERT_AUTH = "cert-auth"
PPK_MIX = "ppk-mix"
VIP_LEASE = "vip-lease"
EAP_RELAY = "eap-relay"
EAP_AUTH = "eap-auth"


@dataclass(frozen=True)
class KeystoreRequest:
    """A computation that needs a secret the engine must not hold.

    docs/principles.md, principle 4."""

    request_id: int
    request: KeystoreCall

    @property
    def operation(self) -> str:
        if isinstance(self.request, PpkMix):
            return PPK_MIX
        if isinstance(self.request, VipLease):
            return VIP_LEASE
        if isinstance(self.request, CertAuthRequest):
            return CERT_AUTH
        if isinstance(self.request, EapRelayRequest):
            return EAP_RELAY
        if isinstance(self.request, EapAuthRequest):
            return EAP_AUTH
        return PSK_AUTH


@dataclass(frozen=True)
class ChildSaInstall:
    """Everything the kernel needs to install one child SA pair and its policies."""

    unique_id: int
    ike_unique_id: int
    name: str
    vpn: str
    reqid: int
    protocol: str
    mode: str
    local: Endpoint
    remote: Endpoint
    spi_in: bytes
    spi_out: bytes
    encr_id: int
    encr_key_bits: int | None
    integ_id: int | None
    encr_key_in: bytes = field(repr=False)
    encr_key_out: bytes = field(repr=False)
    integ_key_in: bytes = field(repr=False)
    integ_key_out: bytes = field(repr=False)
    esn: bool
    replay_window: int
    udp_encap: bool
    local_ts: tuple[str, ...]
    remote_ts: tuple[str, ...]


@dataclass(frozen=True)
class InstallChildSa:
    child: ChildSaInstall


@dataclass(frozen=True)
class DeleteChildSa:
    unique_id: int
    reqid: int
    spi_in: bytes
    spi_out: bytes
    local: Endpoint
    remote: Endpoint


@dataclass(frozen=True)
class UpdateChildSa:
    """A child SA's outer endpoints changed with its IKE SA's (MOBIKE, RFC 4555 3.5): the
    kernel moves both SAs (and their policies' templates) to `local`/`remote`, with UDP
    encapsulation on or off as `udp_encap` says. SPIs, keys and counters stay."""

    unique_id: int
    ike_unique_id: int
    reqid: int
    spi_in: bytes
    spi_out: bytes
    local: Endpoint
    remote: Endpoint
    udp_encap: bool


@dataclass(frozen=True)
class SaEvent:
    """An IKE or child SA changed state (for events, show and counters)."""

    kind: str  # "ike-established", "ike-deleted", "child-installed", "child-deleted", ...
    ike_unique_id: int
    vpn: str | None
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SaFailed:
    """An IKE SA we negotiate failed before it was established, and why (`ikefarm initiate`
    reports it; the log line beside it is for people)."""

    ike_unique_id: int
    reason: str


@dataclass(frozen=True)
class ChildFailed:
    """A child we asked for (security policy `policy`) was not made, and why."""

    ike_unique_id: int
    policy: str
    reason: str


@dataclass(frozen=True)
class InitialContact:
    """RFC 7296 2.4: the peer has no other SA with us; drop older ones farm-wide."""

    local_id: str
    remote_id: str
    keep_ike_unique_id: int


@dataclass(frozen=True)
class HalfOpen:
    """A responder half-open SA exists for (SPIi, peer): retransmitted IKE_SA_INIT go here."""

    spi_i: bytes
    remote: Endpoint
    lifetime: float


@dataclass(frozen=True)
class PeerFailed:
    """A negotiation from this peer failed in `phase` ("init" or "auth"): it backs off for
    `seconds` (Junos backoff-timeouts, seed 000); ingress must learn it."""

    address: str
    phase: str
    seconds: float


@dataclass(frozen=True)
class SendKeepalive:
    """A NAT-keepalive (RFC 3948 2.3): one 0xFF octet from local to remote, no non-ESP marker."""

    local: Endpoint
    remote: Endpoint


@dataclass(frozen=True)
class InstallTrap:
    """A trap policy for a security policy: matching traffic asks for a negotiation
    (start-action or dpd-action trap, seed 004). No SA is bound to it; the kernel raises an
    acquire instead."""

    vpn: str
    name: str
    reqid: int
    mode: str
    local: str
    remote: str
    local_ts: tuple[str, ...]
    remote_ts: tuple[str, ...]


@dataclass(frozen=True)
class RemoveTrap:
    """Remove the trap policy installed for this security policy (by reqid)."""

    vpn: str
    name: str
    reqid: int


@dataclass(frozen=True)
class Log:
    """A log line for the driver to write (the engine never logs itself)."""

    level: int
    subsystem: str
    event: str
    fields: dict[str, Any] = field(default_factory=dict)


Effect = (
    SendDatagram
    | PeerFailed
    | KeystoreRequest
    | InstallChildSa
    | DeleteChildSa
    | UpdateChildSa
    | SaEvent
    | SaFailed
    | ChildFailed
    | InitialContact
    | HalfOpen
    | SendKeepalive
    | InstallTrap
    | RemoveTrap
    | VipRelease
    | LocalVip
    | Log
)
