"""Message schemas of the bus contract. Bump SCHEMA_VERSION on an incompatible change."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ikefarm.proto.envelope import BusMessage, message


@message("ping")
class Ping(BusMessage):
    """Liveness probe; the reply is a Pong."""


@message("pong")
class Pong(BusMessage):
    service: str
    instance: str
    version: str
    uptime: float


@message("stats-request")
class StatsRequest(BusMessage):
    """Ask a service for its counters."""


@message("stats")
class Stats(BusMessage):
    service: str
    instance: str
    version: str
    uptime: float
    requests: int
    errors: int
    counters: dict[str, Any] = field(default_factory=dict)
    gauges: dict[str, Any] = field(default_factory=dict)


# --- datagrams: ingress <-> ike -------------------------------------------------------------


@message("datagram")
class Datagram(BusMessage):
    """An IKE message received by ingress (non-ESP marker stripped), for an ike worker.

    Ingress read and checked the fixed IKE header once (RFC 7296 3.1): major version 2,
    Length equal to the octets of `data`, SPIi not zero. The header fields below are what it
    read, so the worker does not read them again (`docs/architecture.md`, "One datagram's
    way"); a datagram without them (`spi_i` empty) is read by the worker itself.
    """

    local_address: str
    local_port: int
    remote_address: str
    remote_port: int
    data: bytes
    # the ingress instance that forwarded it: workers count the IKE_SA_INIT each ingress
    # handed them (`IkeLoad.inits`), so every ingress knows which of its own are pending
    via: str = ""
    # the `via` instance takes the answer to this IKE_SA_INIT on its own subject, with the
    # init route (`OutboundDatagram.init_route`); an older ingress does not, and gets the
    # answer on the queue group and the route by `InitRoute` as before
    answer_direct: bool = False
    natt: bool = False  # it came to the NAT-T port, after a non-ESP marker (RFC 3948 2.2)
    spi_i: bytes = b""  # 8 octets, or empty: the worker reads the header itself
    spi_r: bytes = b""
    next_payload: int = 0
    minor_version: int = 0
    exchange_type: int = 0
    flags: int = 0  # I, V, R (RFC 7296 3.1); reserved bits already cleared
    message_id: int = 0


@message("init-route")
class InitRoute(BusMessage):
    """ike -> every ingress: a retransmitted IKE_SA_INIT from this peer and SPIi goes to `shard`."""

    spi_i: bytes
    remote_address: str
    remote_port: int
    shard: int
    lifetime: float


@message("datagram-out")
class OutboundDatagram(BusMessage):
    """An IKE message for ingress to send from local to remote (it adds the 4500 marker).

    With `nat_keepalive`, `data` is the single 0xFF octet of a NAT-keepalive (RFC 3948
    2.3), sent from the NAT-T port as it is, without the non-ESP marker.

    `init_route`: the answer to a new IKE_SA_INIT goes to the ingress instance that
    forwarded it (`subjects.ingress_instance_send`), the one the peer's retransmissions
    reach, with the route they must take: one bus message instead of two.
    """

    local_address: str
    local_port: int
    remote_address: str
    remote_port: int
    data: bytes
    nat_keepalive: bool = False
    init_route: InitRoute | None = None


# --- DoS protection: farm-wide load (issue 5, shared/dos) -----------------------------------


@message("ike-load")
class IkeLoad(BusMessage):
    """ike -> every ingress and worker: the load of one shard, on change and every `interval`.

    `half_open_peers` has the peers with half-open SAs (address -> count, the largest
    first, at most `shared.dos.load.MAX_PEERS_REPORTED`) when `peers_full`; otherwise only
    the peers whose count changed since the previous report (0: none left), to be merged
    into the last full table (a full one comes at least every `interval`; empty and full
    when no limit reads per-peer counts). `inits` counts, per ingress
    instance, the IKE_SA_INIT requests this worker has answered or refused since it
    started, so that instance knows how many of its own are still pending.
    """

    instance: str
    shard: int
    seq: int
    half_open: int
    established: int
    interval: float
    half_open_peers: dict[str, int] = field(default_factory=dict)
    inits: dict[str, int] = field(default_factory=dict)
    peers_full: bool = True


@message("ingress-load")
class IngressLoad(BusMessage):
    """ingress -> every ingress and worker: IKE_SA_INIT it forwarded that no worker answered yet."""

    instance: str
    seq: int
    pending: int
    interval: float


@message("peer-backoff")
class PeerBackoff(BusMessage):
    """ike -> every ingress: a negotiation from `address` failed in `phase` ("init" or "auth");
    drop its new IKE_SA_INIT for `seconds` (Junos backoff-timeouts, seed 000)."""

    address: str
    phase: str
    seconds: float


@message("cookie-secrets")
class CookieSecrets(BusMessage):
    """The farm's cookie secrets (RFC 7296 2.6), the one record of the KV bucket
    `subjects.COOKIE_SECRET_BUCKET`. Never published on a subject, never logged:
    only ingress instances read it, and they compare-and-set it to rotate."""

    version: int
    key: bytes = field(repr=False)
    created: float  # wall-clock seconds: every instance judges the age alike
    previous_version: int = -1  # -1: none
    previous_key: bytes = field(default=b"", repr=False)


# --- keystore ---------------------------------------------------------------------------------


@message("psk-auth-request")
class PskAuthRequest(BusMessage):
    """Verify the peer's PSK AUTH and compute ours (RFC 7296 2.15); the PSK stays in the keystore.

    AUTH = prf(prf(PSK, "Key Pad for IKEv2"), signed octets). The PSK is chosen by
    the identities: our `local_id` and the peer's `remote_id`.
    """

    prf_id: int
    local_id: str
    remote_id: str
    verify_octets: bytes
    verify_auth: bytes
    sign_octets: bytes
    # "verify-and-sign" (responder), "sign" (initiator, before IKE_AUTH), "verify" (initiator)
    purpose: str = "verify-and-sign"


@message("psk-auth-reply")
class PskAuthReply(BusMessage):
    verified: bool
    auth: bytes  # our AUTH data; empty unless verified
    reason: str = ""  # "", "auth_mismatch", "no_secret"


@message("eap-relay-request")
class EapRelayRequest(BusMessage):
    """One EAP message of a peer to relay to the RADIUS server (RFC 7296 2.16, RFC 3579).

    The keystore runs the RADIUS client: the shared secret never leaves it. `state` and
    `server` are what the previous answer of this conversation returned (empty/-1 on the
    first); `session` names the IKE SA the conversation belongs to (the MSK is bound to it).
    """

    vpn: str
    session: str
    identity: bytes  # the EAP identity (User-Name)
    eap: bytes  # the peer's EAP message, whole
    state: bytes = b""
    server: int = -1
    calling_station: str = ""  # the peer's address (Calling-Station-Id)
    called_station: str = ""  # our address (Called-Station-Id)


@message("eap-relay-reply")
class EapRelayReply(BusMessage):
    """The RADIUS server's answer: "challenge" (`eap` to the peer, `state` kept), "accept"
    (`eap` is EAP-Success; the MSK stays in the keystore, `sealed_msk` is it sealed under the
    keystore's own key, empty when the method made none) or "reject" (`reason`)."""

    outcome: str
    eap: bytes = b""
    state: bytes = b""
    server: int = -1
    sealed_msk: bytes = b""
    # vip-pool radius (seed 004): the address attributes of an Access-Accept, by pool keyword
    # ("address", "dns", "nbns", "subnet", "netmask"), as text
    attributes: dict[str, list[str]] = field(default_factory=dict)
    reason: str = ""


@message("eap-auth-request")
class EapAuthRequest(BusMessage):
    """The AUTH payloads after a successful EAP method that made an MSK (RFC 7296 2.16):
    prf(prf(MSK, "Key Pad for IKEv2"), signed octets), computed where the MSK is; the answer
    is a PskAuthReply."""

    prf_id: int
    session: str
    sealed_msk: bytes
    verify_octets: bytes
    verify_auth: bytes
    sign_octets: bytes


@message("radius-accounting")
class RadiusAccounting(BusMessage):
    """An Accounting-Request to send (RFC 2866): "start", "interim" or "stop"."""

    status: str
    session: str  # Acct-Session-Id
    identity: str  # User-Name
    calling_station: str = ""
    called_station: str = ""
    framed_addresses: list[str] = field(default_factory=list)
    session_time: int = 0
    input_octets: int = 0
    output_octets: int = 0
    input_packets: int = 0
    output_packets: int = 0
    terminate_cause: str = ""


@message("radius-accounting-reply")
class RadiusAccountingReply(BusMessage):
    sent: bool
    reason: str = ""


@message("transport-key-request")
class TransportKeyRequest(BusMessage):
    """Ask the keystore for the public half of its transport key (`shared/bus/sealed.py`)."""


@message("transport-key")
class TransportKeyReply(BusMessage):
    public_key: bytes  # X25519, 32 octets


@message("ppk-mix-request")
class PpkMixRequest(BusMessage):
    """Mix the PPK named by `ppk_id` into SK_d, SK_pi, SK_pr (RFC 8784 3); the PPK stays.

    `sealed_keys` is SK_d | SK_pi | SK_pr (each the PRF's key size), sealed to the
    keystore's transport key with the worker's `ephemeral` X25519 key: the bus
    never carries them readable.
    """

    prf_id: int
    ppk_id: bytes  # the PPK_ID octets without the PPK_ID type (RFC 8784 3)
    ephemeral: bytes = field(repr=False)
    sealed_keys: bytes = field(repr=False)


@message("ppk-mix-reply")
class PpkMixReply(BusMessage):
    found: bool
    sealed_keys: bytes = field(repr=False)  # SK_d' | SK_pi' | SK_pr', sealed; empty unless found
    reason: str = ""  # "", "no_ppk"


@message("sa-seal-request")
class SaSealRequest(BusMessage):
    """Keep SA snapshot secrets (docs/failover.md): each item sealed to the keystore's
    transport key on a channel opened with `ephemeral`, its `bindings` entry (the KV key of
    the snapshot) as part of the label; the keystore re-seals them under its snapshot key."""

    ephemeral: bytes = field(repr=False)
    bindings: list[str]
    items: list[bytes] = field(repr=False)


@message("sa-seal-reply")
class SaSealReply(BusMessage):
    items: list[bytes] = field(repr=False)  # under the keystore's snapshot key, per binding


@message("sa-unseal-request")
class SaUnsealRequest(BusMessage):
    """Open stored SA snapshot secrets for the worker adopting them, sealed to `ephemeral`."""

    ephemeral: bytes = field(repr=False)
    bindings: list[str]
    items: list[bytes] = field(repr=False)


@message("sa-unseal-reply")
class SaUnsealReply(BusMessage):
    items: list[bytes] = field(repr=False)  # sealed to the request's channel; b"" if refused
    refused: list[str] = field(default_factory=list)  # per item: "" or why it was refused


@message("secret-request")
class SecretRequest(BusMessage):
    """Asks for a secret itself (a PSK, a PPK, a private key): always refused, and counted."""

    kind: str
    name: str


@message("cert-auth-request")
class CertAuthRequest(BusMessage):
    """Certificate AUTH (RFC 7296 2.15, RFC 7427): the private key and trust store stay here.

    Verify: the peer's certificates (DER, end-entity first), the identity it
    presented (`peer_id_type`, `peer_id_data`), its AUTH method and data over
    `verify_octets`. Sign: `sign_octets` with the key of VPN `vpn`, by RFC 7427
    when `peer_hashes` (its SIGNATURE_HASH_ALGORITHMS) allow.
    """

    vpn: str
    purpose: str  # "verify-and-sign" (responder), "sign", "verify" (initiator)
    verify_octets: bytes = b""
    verify_method: int = 0
    verify_auth: bytes = b""
    peer_certs: list[bytes] = field(default_factory=list)
    peer_id_type: int = 0
    peer_id_data: bytes = b""
    sign_octets: bytes = b""
    peer_hashes: list[int] = field(default_factory=list)


@message("cert-auth-reply")
class CertAuthReply(BusMessage):
    verified: bool
    method: int = 0  # our AUTH method when signed
    auth: bytes = b""  # our Authentication Data; empty unless verified
    reason: str = ""  # "", "untrusted_certificate", "certificate_revoked", "auth_mismatch", ...
    peer_subject: str = ""


# --- kernel -----------------------------------------------------------------------------------


@message("child-install")
class ChildInstall(BusMessage):
    """Install one child SA pair (in and out) and its policies.

    The keys travel sealed (`shared/bus/child_keys.py`): `sealed_keys` to the kernel
    service's transport key (`subjects.KERNEL_TRANSPORT_KEY`) with the worker's
    `ephemeral` X25519 key. The four `*_key_*` fields are empty on the bus (the
    kernel service refuses a message that carries any of them) and filled in
    only inside the kernel service, once opened, for its backend.
    """

    unique_id: int
    ike_unique_id: int
    name: str
    vpn: str
    reqid: int
    protocol: str
    mode: str
    local_address: str
    local_port: int
    remote_address: str
    remote_port: int
    spi_in: bytes
    spi_out: bytes
    encr_id: int
    encr_key_bits: int | None
    integ_id: int | None
    esn: bool
    replay_window: int
    udp_encap: bool
    local_ts: list[str]
    remote_ts: list[str]
    ephemeral: bytes = field(default=b"", repr=False)
    sealed_keys: bytes = field(default=b"", repr=False)
    encr_key_in: bytes = field(default=b"", repr=False)
    encr_key_out: bytes = field(default=b"", repr=False)
    integ_key_in: bytes = field(default=b"", repr=False)
    integ_key_out: bytes = field(default=b"", repr=False)


@message("child-delete")
class ChildDelete(BusMessage):
    unique_id: int
    reqid: int
    spi_in: bytes
    spi_out: bytes
    local_address: str
    remote_address: str
    # why, for the kernel service's `child_deleted` line: empty for the IKE side's own
    # deletes (rekey, delete exchange), `ike_sa_gone` for a child whose IKE SA no worker
    # restored after its owner died (docs/failover.md)
    reason: str = ""


@message("child-update")
class ChildUpdate(BusMessage):
    """A child SA's outer endpoints changed with its IKE SA's (MOBIKE, RFC 4555 3.5): move
    both SAs (and the policies' templates) to these addresses and ports, with UDP
    encapsulation on or off. Found by `unique_id`; its SPIs must be the installed ones.
    Keys, sequence numbers and replay windows stay."""

    unique_id: int
    ike_unique_id: int
    reqid: int
    spi_in: bytes
    spi_out: bytes
    local_address: str
    local_port: int
    remote_address: str
    remote_port: int
    udp_encap: bool


@message("local-addresses")
class LocalAddresses(BusMessage):
    """kernel -> ike workers: our host's addresses changed (MOBIKE, docs/mobike.md):
    all of them now, those that appeared and those that went away."""

    present: list[str]
    added: list[str]
    gone: list[str]


@message("route-source-request")
class RouteSourceRequest(BusMessage):
    """ike -> kernel: which source address does the routing table pick toward `remote`?"""

    remote: str


@message("route-source-reply")
class RouteSourceReply(BusMessage):
    source: str  # "" when there is no route


@message("kernel-ack")
class KernelAck(BusMessage):
    ok: bool
    error: str = ""


@message("kernel-backend-request")
class KernelBackendRequest(BusMessage):
    """Ask the kernel service which backend it runs (what `[kernel] backend = "auto"` became)."""


@message("kernel-backend")
class KernelBackend(BusMessage):
    """The backend the kernel service runs: netlink, userspace or memory (services/kernel/
    backends.py); the answer to KernelBackendRequest and the EVENT_KERNEL_BACKEND event."""

    backend: str


@message("kernel-show-request")
class KernelShowRequest(BusMessage):
    """Ask the kernel service for its SAs and policies (no key material in the answer)."""


@message("kernel-state")
class KernelState(BusMessage):
    backend: str
    sas: list[dict[str, Any]]
    policies: list[dict[str, Any]]
    traps: list[dict[str, Any]] = field(default_factory=list)
    vips: list[dict[str, Any]] = field(default_factory=list)  # VIPs assigned to us


@message("trap-install")
class TrapInstall(BusMessage):
    """Install (or replace) the trap policy of a security policy: traffic matching its
    selectors raises an acquire, no SA is bound (start-action/dpd-action trap, seed 004)."""

    vpn: str
    name: str
    reqid: int
    mode: str
    local_address: str
    remote_address: str
    local_ts: list[str]
    remote_ts: list[str]


@message("trap-remove")
class TrapRemove(BusMessage):
    vpn: str
    name: str
    reqid: int


@message("vip-address")
class VipAddress(BusMessage):
    """ike -> kernel: put (install) or take away a VIP the peer assigned us, as /32 or /128,
    on `interface` (`install-vip-on`), or when that is "" on the interface that holds
    `local_address` (our IKE address), as seed 004 says."""

    install: bool
    address: str
    local_address: str
    interface: str = ""
    ike_unique_id: int = 0


@message("kernel-acquire")
class KernelAcquire(BusMessage):
    """The dataplane has traffic for a trap policy and no SA: initiate the child of `reqid`.

    `local_address`/`remote_address` are the template's (tunnel) endpoints,
    `local_ts`/`remote_ts` the triggering packet's selector (RFC 7296 2.9)."""

    backend: str
    reqid: int
    local_address: str
    remote_address: str
    local_ts: str
    remote_ts: str


@message("kernel-expire")
class KernelExpire(BusMessage):
    """An SA reached its soft (rekey the child) or hard (it is gone) lifetime."""

    backend: str
    hard: bool
    unique_id: int  # the child's, 0 when the kernel service does not know the SA
    reqid: int
    direction: str  # "in", "out" or "" when unknown
    spi: bytes
    src: str
    dst: str
    bytes: int
    packets: int


@dataclass(frozen=True)
class ChildCounters:
    """What the dataplane counted on one child SA since it was installed (both directions)."""

    unique_id: int
    bytes_in: int
    packets_in: int
    bytes_out: int
    packets_out: int


# children per KernelCounters message: a batch stays far below NATS's default 1 MB payload
MAX_COUNTERS_PER_BATCH = 2000


@message("kernel-counters")
class KernelCounters(BusMessage):
    """kernel -> ike workers, periodically: the counters of the children whose counters
    moved since the previous batch (docs/kernel-counters.md). Never per packet."""

    backend: str
    instance: str
    interval: float  # seconds between batches
    children: list[ChildCounters]


FLUSH_SELECTORS = ("unique-id", "reqid", "all")


@message("kernel-flush")
class KernelFlush(BusMessage):
    """CLI -> kernel: `flush kernel unique-id N | reqid N | all` removes those installed child
    SAs (both SAs and their policies) from the dataplane; each owning ike worker then
    deletes the child with its peer (a hard KernelExpire)."""

    selector: str  # one of FLUSH_SELECTORS
    value: int = 0


@message("kernel-flush-result")
class KernelFlushResult(BusMessage):
    removed: list[int]  # unique ids of the children removed


# --- ike workers ------------------------------------------------------------------------------


@message("ike-show-request")
class IkeShowRequest(BusMessage):
    """Every ike worker answers with the SAs it owns (`show ike-sa`)."""

    details: bool = False


@message("ike-show")
class IkeShow(BusMessage):
    instance: str
    shard: int
    sas: list[dict[str, Any]]


@message("vip-pool-show-request")
class VipPoolShowRequest(BusMessage):
    """One ike worker reads the farm's leases (`show vip-pool [NAME]`); "" = every pool."""

    name: str = ""


@message("vip-pool-show")
class VipPoolShow(BusMessage):
    """Per pool: name, size, used, free and leases [{address, identity, since, live}]."""

    pools: list[dict[str, Any]]


@message("initial-contact")
class InitialContactNotice(BusMessage):
    """ike -> every ike worker: delete older SAs between these identities (RFC 7296 2.4)."""

    local_id: str
    remote_id: str
    keep_ike_unique_id: int


@message("sa-event")
class SaEventNotice(BusMessage):
    kind: str
    ike_unique_id: int
    vpn: str | None
    instance: str
    detail: dict[str, Any] = field(default_factory=dict)


@message("ike-command")
class IkeCommand(BusMessage):
    """CLI -> ike workers: a manual SA command (seed 004 `cmd ike ...`, `flush ike ...`;
    seed 002 `ipsec clear sa`), in the words of `shared/ikev2/management.py`."""

    verb: str  # initiate, rekey, reauth, flush, clear
    target: str  # ike-sa, child-sa, sa
    selector: str  # vpn, security-policy, unique-id, all, tunnel, state
    value: str = ""
    phase: int = 0  # clear: 1 = IKE SAs, 2 = child SAs, 0 = both
    timeout: float = 10.0  # initiate: how long the worker waits for the outcome


@message("ike-command-result")
class IkeCommandResult(BusMessage):
    """One worker's answer: how many SAs it acted on and the lines the seeds print."""

    instance: str
    shard: int
    ok: bool
    count: int
    lines: list[str] = field(default_factory=list)
    error: str = ""
    ike_unique_id: int = 0  # initiate: the IKE SA
    pending_ike: list[int] = field(default_factory=list)  # IKE SAs whose Delete is under way
    # [IKE SA, child SA] unique ids whose Delete is under way
    pending_child: list[list[int]] = field(default_factory=list)


# --- flow sessions (issue 12; shared/flow, docs/flow-sessions.md) ------------------------------
# The dataplane (kernel service) publishes batches of session events on `subjects.FLOW_EVENTS`;
# nothing is published per packet: only a flow's first packet, its TCP state changes, and the
# sessions that saw traffic since the last batch (their totals) cross the bus.


@dataclass(frozen=True)
class FlowTuple:
    """A 5-tuple as the packet carries it. ICMP echo: both ports are the identifier."""

    protocol: int
    src: str
    sport: int
    dst: str
    dport: int


@dataclass(frozen=True)
class FlowOpen:
    """The first packet of a flow (after decryption, or before encryption). `reply`: the
    tuple of the answer when it is not `init` reversed (NAT). `tcp_flags` of that first
    packet ("S" for a SYN). `age`: seconds between the packet and the batch."""

    init: FlowTuple
    ingress: str
    egress: str
    policy: str = ""
    reply: FlowTuple | None = None
    tcp_flags: str = ""
    tunnel: bool = False  # an IKE/ESP flow of the gateway itself
    resource_manager: bool = False
    age: float = 0.0


@dataclass(frozen=True)
class FlowChange:
    """A TCP state change: "established" (the handshake completed), "fin" or "rst".
    `direction` "in": the packet went the way `init` says; "out": the other way. `init` may
    be either tuple of the session (the dataplane reports what it has at hand)."""

    init: FlowTuple
    change: str
    direction: str = "in"
    age: float = 0.0


@dataclass(frozen=True)
class FlowRefresh:
    """A session that saw traffic since the last batch: counters are totals since it opened,
    `idle` the seconds since its last packet."""

    init: FlowTuple
    idle: float
    packets_in: int
    bytes_in: int
    packets_out: int
    bytes_out: int


@message("flow-events")
class FlowEvents(BusMessage):
    """kernel (dataplane) -> flow: one batch, applied in order opened, changes, refreshes.
    A batch with any malformed item is refused whole and changes nothing."""

    instance: str
    seq: int
    opened: list[FlowOpen] = field(default_factory=list)
    changes: list[FlowChange] = field(default_factory=list)
    refreshes: list[FlowRefresh] = field(default_factory=list)


@dataclass(frozen=True)
class FlowVerdict:
    """A flow the dataplane must forget (and drop the packets of until a new first packet):
    reason "aged", "cleared", "handshake-timeout", "leaf", "max-sessions", "no-syn"."""

    init: FlowTuple
    reason: str


@message("flow-verdicts")
class FlowVerdicts(BusMessage):
    """flow -> kernel (dataplane): sessions closed or refused since the last one, and whether
    the table is full (refuse new flows locally until it is not)."""

    seq: int
    closed: list[FlowVerdict] = field(default_factory=list)
    table_full: bool = False


@message("flow-show-request")
class FlowShowRequest(BusMessage):
    """CLI -> flow: `show security flow session` words (shared/flow/filters.py)."""

    words: list[str] = field(default_factory=list)


@message("flow-show")
class FlowShow(BusMessage):
    instance: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    truncated: int = 0  # rows matched beyond the answer's limit


@message("flow-clear-request")
class FlowClearRequest(BusMessage):
    """CLI -> flow: `clear security flow session` words."""

    words: list[str] = field(default_factory=list)


@message("flow-clear-result")
class FlowClearResult(BusMessage):
    instance: str
    count: int
