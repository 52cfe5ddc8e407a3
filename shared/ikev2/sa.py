"""IKE SA and child SA state: SPIs, keys, message IDs, windows, timers (RFC 7296 2.1-2.3)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from ikefarm.shared.ikev2.crypto.dh import DhExchange
from ikefarm.shared.ikev2.crypto.keys import ChildSaKeys, IkeSaKeys
from ikefarm.shared.ikev2.crypto.prf import Prf
from ikefarm.shared.ikev2.crypto.protection import SkProtection
from ikefarm.shared.ikev2.effects import Endpoint
from ikefarm.shared.ikev2.fragments import FragmentReassembler
from ikefarm.shared.ikev2.payloads import IdPayload, TrafficSelector
from ikefarm.shared.ikev2.policy import SecurityPolicy, VpnPolicy
from ikefarm.shared.ikev2.proposals import Algorithms


class IkeSaState(StrEnum):
    CONNECTING = "connecting"  # initiator: IKE_SA_INIT sent
    HALF_OPEN = "half-open"  # responder: IKE_SA_INIT answered, IKE_AUTH not complete
    AUTHENTICATING = "authenticating"  # IKE_AUTH in progress (keystore asked)
    ESTABLISHED = "established"
    REKEYING = "rekeying"
    REKEYED = "rekeyed"  # replaced by a new IKE SA; waits for the Delete
    DELETING = "deleting"
    DELETED = "deleted"


class ChildSaState(StrEnum):
    INSTALLING = "installing"
    INSTALLED = "installed"
    REKEYING = "rekeying"
    REKEYED = "rekeyed"
    DELETING = "deleting"
    DELETED = "deleted"


@dataclass
class ChildSa:
    unique_id: int
    policy: SecurityPolicy
    spi_in: bytes
    spi_out: bytes
    algorithms: Algorithms
    keys: ChildSaKeys = field(repr=False)
    local_ts: list[TrafficSelector]
    remote_ts: list[TrafficSelector]
    mode: str
    udp_encap: bool
    state: ChildSaState = ChildSaState.INSTALLED
    installed_at: float = 0.0
    rekey_at: float | None = None
    expire_at: float | None = None
    initiated_by_us: bool = False  # we sent the request of the exchange that made it (2.17)
    nonce_i: bytes = field(default=b"", repr=False)  # the nonces of that exchange (2.8.1)
    nonce_r: bytes = field(default=b"", repr=False)
    # a rekey of this child by the peer that crossed ours (RFC 7296 2.8.1)
    collision: ChildSa | None = field(default=None, repr=False)
    rekey_in_flight: bool = False  # our CREATE_CHILD_SA rekeying it has been sent
    rekeyed_from: int | None = None  # unique id of the child this one replaced

    @property
    def name(self) -> str:
        return self.policy.name


@dataclass
class CachedResponse:
    """The last response sent, kept to answer a retransmitted request (RFC 7296 2.1)."""

    message_id: int
    datagrams: list[bytes]


@dataclass
class OutstandingRequest:
    """Our request awaiting its response (window size 1, RFC 7296 2.3), and its retransmissions."""

    message_id: int
    exchange: int
    purpose: str
    datagrams: list[bytes]
    attempt: int
    next_at: float
    context: dict[str, Any] = field(default_factory=dict)


@dataclass
class IkeSa:
    unique_id: int
    is_initiator: bool
    spi_i: bytes
    spi_r: bytes
    local: Endpoint
    remote: Endpoint
    state: IkeSaState
    created_at: float
    vpn: VpnPolicy | None = None
    candidates: list[VpnPolicy] = field(default_factory=list)
    algorithms: Algorithms | None = None
    prf: Prf | None = field(default=None, repr=False)
    protection: SkProtection | None = field(default=None, repr=False)
    keys: IkeSaKeys | None = field(default=None, repr=False)
    nonce_i: bytes = field(default=b"", repr=False)
    nonce_r: bytes = field(default=b"", repr=False)
    dh: DhExchange | None = field(default=None, repr=False)
    init_request: bytes = field(default=b"", repr=False)  # RealMessage1 (RFC 7296 2.15)
    init_response: bytes = field(default=b"", repr=False)  # RealMessage2
    local_id: IdPayload | None = None
    remote_id: IdPayload | None = None
    # message IDs (RFC 7296 2.2): the next request we expect / the next we send
    expected_request_id: int = 0
    next_request_id: int = 0
    last_response: CachedResponse | None = None
    reassembler: FragmentReassembler | None = field(default=None, repr=False)
    children: list[ChildSa] = field(default_factory=list)
    # peer capabilities learned from notifies
    peer_fragmentation: bool = False
    peer_childless: bool = False
    peer_mobike: bool = False
    # RFC 7427 4: the hashes the peer announced in SIGNATURE_HASH_ALGORITHMS
    peer_signature_hashes: tuple[int, ...] = ()
    # AUTH methods of IKE_AUTH by side, e.g. {"local_auth": "DIGITAL_SIGNATURE", ...}
    auth_methods: dict[str, str] = field(default_factory=dict)
    nat_local: bool = False  # we are behind a NAT (peer's DESTINATION_IP hash differs)
    nat_remote: bool = False  # the peer is behind a NAT (its SOURCE_IP hash differs)
    ppk_used: bool = False
    peer_use_ppk: bool = False  # the peer sent USE_PPK in IKE_SA_INIT (RFC 8784 3)
    # initiator: the keys without PPK, kept until the responder says whether it used the PPK
    no_ppk_keys: IkeSaKeys | None = field(default=None, repr=False)
    half_open_deadline: float | None = None
    # responder: this SA's key in the engine's init_index, as the IKE_SA_INIT arrived; the
    # peer's port may float to 4500 later (RFC 7296 2.23), so `remote` no longer names it
    init_index_key: tuple[bytes, str, int] | None = field(default=None, repr=False)
    last_seen: float = 0.0  # last verified protected message from the peer (liveness, DPD)
    established_at: float | None = None
    rekey_at: float | None = None
    expire_at: float | None = None
    pending: dict[str, Any] = field(default_factory=dict, repr=False)
    outstanding: OutstandingRequest | None = None
    # requests waiting for the window: each builds and sends its message when called
    queued: list[Callable[[float], list[Any]]] = field(default_factory=list, repr=False)
    cookie: bytes | None = field(default=None, repr=False)
    requested_child: SecurityPolicy | None = None
    successor: IkeSa | None = field(default=None, repr=False)  # the IKE SA that replaced this one
    # the peer's IKE rekey that crossed ours (RFC 7296 2.8.2)
    collision: IkeSa | None = field(default=None, repr=False)

    @property
    def local_spi(self) -> bytes:
        return self.spi_i if self.is_initiator else self.spi_r

    @property
    def remote_spi(self) -> bytes:
        return self.spi_r if self.is_initiator else self.spi_i

    @property
    def nat_detected(self) -> bool:
        return self.nat_local or self.nat_remote

    def outbound_keys(self) -> tuple[bytes, bytes]:
        assert self.keys is not None
        return self.keys.outbound(self.is_initiator)

    def inbound_keys(self) -> tuple[bytes, bytes]:
        assert self.keys is not None
        return self.keys.inbound(self.is_initiator)

    def child_by_spi_in(self, spi: bytes) -> ChildSa | None:
        return next((c for c in self.children if c.spi_in == spi), None)

    def child_by_spi_out(self, spi: bytes) -> ChildSa | None:
        return next((c for c in self.children if c.spi_out == spi), None)
