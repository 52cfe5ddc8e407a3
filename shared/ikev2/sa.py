"""IKE SA and child SA state: SPIs, keys, message IDs, windows, timers (RFC 7296 2.1-2.3)."""

from __future__ import annotations

import heapq
import itertools
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, NoReturn

from ikefarm.shared.ikev2.crypto.dh import DhExchange
from ikefarm.shared.ikev2.crypto.keys import ChildSaKeys, IkeSaKeys
from ikefarm.shared.ikev2.crypto.prf import Prf
from ikefarm.shared.ikev2.crypto.protection import SkProtection
from ikefarm.shared.ikev2.effects import Endpoint
from ikefarm.shared.ikev2.fragments import FragmentReassembler
from ikefarm.shared.ikev2.payloads import IdPayload, TrafficSelector
from ikefarm.shared.ikev2.policy import SecurityPolicy, VpnPolicy
from ikefarm.shared.ikev2.proposals import Algorithms

if TYPE_CHECKING:
    from ikefarm.shared.ikev2.exchanges.task import Task


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


@dataclass(slots=True)
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
    # what the kernel service counted on its two SAs (KernelCounters), for show and DPD
    bytes_in: int = 0
    packets_in: int = 0
    bytes_out: int = 0
    packets_out: int = 0

    @property
    def name(self) -> str:
        return self.policy.name


@dataclass(slots=True)
class CachedResponse:
    """The last response sent, kept to answer a retransmitted request (RFC 7296 2.1)."""

    message_id: int
    datagrams: list[bytes]


@dataclass(slots=True)
class OutstandingRequest:
    """Our request awaiting its response (window size 1, RFC 7296 2.3), and its retransmissions."""

    message_id: int
    exchange: int
    task: Task  # the active task: it sent the request and processes the response
    datagrams: list[bytes]
    attempt: int
    next_at: float


@dataclass(slots=True)
class IkeSa:
    """One IKE SA: the per-SA connection state the engine's exchanges act on.

    It owns everything typed that the SA is (the role of aioquic's QuicConnection
    object, without its I/O): SPIs, endpoints, algorithms and keys, message-ID
    windows and the cached response, children, lifetimes and timers, and its tasks
    (`exchanges/task.py`: the active one in `outstanding`, the `queued` ones, a
    `passive` one waiting for the keystore). The engine is the SPI index and the
    deadline heap around the SAs; `engine.snapshot(sa, now)` / `engine.restore(...)`
    (`snapshot.py`) carry an SA to another engine, its keys apart.

    Slotted (no per-instance `__dict__`): an established SA is held for hours and a
    worker holds tens of thousands of them, so its size counts (issue 9).
    """

    # the table holding this SA and what it counts this SA as (SaTable)
    table: SaTable | None = field(default=None, init=False, repr=False, compare=False)
    counted_as: _CountKey | None = field(default=None, init=False, repr=False, compare=False)
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
    # restored from a snapshot and no verified request since: the peer's next request may be
    # one past `expected_request_id` once (the exchange before it was answered, then lost
    # with the worker that answered it; docs/failover.md). Not in snapshots: set on restore.
    message_id_jump: bool = False
    reassembler: FragmentReassembler | None = field(default=None, repr=False)
    children: list[ChildSa] = field(default_factory=list)
    # peer capabilities learned from notifies
    peer_fragmentation: bool = False
    peer_childless: bool = False
    peer_mobike: bool = False
    # MOBIKE (RFC 4555 3.6): the peer's other addresses, as its last ADDITIONAL_* listed them
    peer_addresses: tuple[str, ...] = ()
    # RFC 7427 4: the hashes the peer announced in SIGNATURE_HASH_ALGORITHMS
    peer_signature_hashes: tuple[int, ...] = ()
    # AUTH methods of IKE_AUTH by side, e.g. {"local_auth": "DIGITAL_SIGNATURE", ...}
    auth_methods: dict[str, str] = field(default_factory=dict)
    nat_local: bool = False  # we are behind a NAT (peer's DESTINATION_IP hash differs)
    nat_remote: bool = False  # the peer is behind a NAT (its SOURCE_IP hash differs)
    ppk_used: bool = False
    # responder: (pool, address) leased to the peer, and the unique id the leases are held
    # under (the SA that leased them; an IKE rekey keeps it, exchanges/config.py)
    remote_vips: list[tuple[str, str]] = field(default_factory=list)
    vip_owner: int | None = None
    # initiator: the addresses and DNS servers the peer's CFG_REPLY assigned us
    local_vips: list[str] = field(default_factory=list)
    cfg_dns: list[str] = field(default_factory=list)
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
    outstanding: OutstandingRequest | None = None
    # tasks (exchanges/task.py): ours waiting for the window, started one at a time
    queued: list[Task] = field(default_factory=list, repr=False)
    # the peer's exchange we answer once the keystore has (IKE_AUTH responder)
    passive: Task | None = field(default=None, repr=False)
    # our IKE SA rekey (ike_rekey.IkeRekeyTask) while it is queued or in flight
    rekey_task: Task | None = field(default=None, repr=False)
    # our Delete of this IKE SA is queued or sent, for this reason
    delete_reason: str | None = None
    # what runs once this IKE SA is gone (a break-before-make reauth: the new SA)
    after_delete: list[Task] = field(default_factory=list, repr=False)
    nat_keepalive_at: float | None = None  # when the next NAT keepalive is due
    cookie: bytes | None = field(default=None, repr=False)
    requested_child: SecurityPolicy | None = None
    successor: IkeSa | None = field(default=None, repr=False)  # the IKE SA that replaced this one
    # the peer's IKE rekey that crossed ours (RFC 7296 2.8.2)
    collision: IkeSa | None = field(default=None, repr=False)

    def __setattr__(self, name: str, value: Any) -> None:
        _set_field(self, name, value)
        table = self.table  # the first field __init__ sets: always there
        if table is not None:
            table.touch(self)  # its next deadline may have moved
            if name in _COUNTED_FIELDS:
                table.recount(self)

    @property
    def remote_dynamic(self) -> str:
        """The peer's side of a remote-ts without subnet: its VIP, else its address (2.19)."""
        return self.remote_vips[0][1] if self.remote_vips else self.remote.address

    @property
    def local_dynamic(self) -> str:
        """Our side of a local-ts without subnet: our assigned VIP, else our address."""
        return self.local_vips[0] if self.local_vips else self.local.address

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


# what SaTable counts an SA as, from the fields in _COUNTED_FIELDS:
# (half-open, established, responder half-open peer address, identities of an established SA,
#  its VPN policy's id while established)
_CountKey = tuple[bool, bool, str | None, tuple[str, str] | None, int | None]
_COUNTED_FIELDS = frozenset(
    {"state", "established_at", "is_initiator", "remote", "local_id", "remote_id", "vpn"}
)
_set_field = object.__setattr__


def _count_key(sa: IkeSa) -> _CountKey:
    half_open = sa.established_at is None
    identities = None
    if not half_open and sa.local_id is not None and sa.remote_id is not None:
        identities = (str(sa.local_id), str(sa.remote_id))
    return (
        half_open,
        sa.state == IkeSaState.ESTABLISHED,
        sa.remote.address if half_open and not sa.is_initiator else None,
        identities,
        id(sa.vpn) if not half_open and sa.vpn is not None else None,
    )


# stale timer-heap entries (of removed or rescheduled SAs) tolerated before a compaction
STALE_TIMER_SLACK = 64


class SaTable(dict[bytes, IkeSa]):
    """An engine's IKE SAs by local SPI, with the counts admission and load reports read,
    and a heap of the SAs' next deadlines for the timers.

    The counts change with the SAs (insertion, removal, and every assignment to a
    field in `_COUNTED_FIELDS`, through `IkeSa.__setattr__`), so reading them is
    O(1): no walk over the table per IKE_SA_INIT or per load report. The same
    bookkeeping indexes established SAs by their identities (initial contact,
    RFC 7296 2.4) and by VPN policy.

    Timers: an SA is "touched" when it is inserted, when any of its fields is
    assigned, and when the engine hands it an input (which may change it in place:
    children, the outstanding request, `pending`). `deadline(sa)` is recomputed
    for the touched SAs only, when the next deadline or the due SAs are asked for,
    so `next_deadline()` and a timer tick cost O(log n) per SA that changed or is due.
    """

    def __init__(self, deadline: Callable[[IkeSa], float | None] | None = None) -> None:
        super().__init__()
        self._deadline = deadline
        self._touched: dict[int, IkeSa] = {}
        self._heap: list[tuple[float, int, IkeSa]] = []
        self._scheduled: dict[int, tuple[float, int]] = {}  # id(sa) -> its live heap entry
        self._sequence = itertools.count()
        self.half_open = 0  # established_at is None, either role
        self.established = 0  # state ESTABLISHED
        self.responder_half_open = 0  # of the half-open, those the peer initiated
        self.half_open_peers: Counter[str] = Counter()  # responder half-open SAs by peer address
        # peers whose half_open_peers count changed, for a driver that opts in (set()) and
        # drains it: the ike service's incremental load reports (shared/dos/load.py)
        self.peer_changes: set[str] | None = None
        self._by_identities: dict[tuple[str, str], dict[int, IkeSa]] = {}
        self._established_by_vpn: Counter[int] = Counter()

    def __setitem__(self, spi: bytes, sa: IkeSa) -> None:
        known = self.get(spi)
        if known is sa:
            return
        if sa.table is not None:
            raise ValueError("the IKE SA is already in an SA table")
        if known is not None:
            self._forget(known)
        super().__setitem__(spi, sa)
        sa.table = self
        self.recount(sa)

    def __delitem__(self, spi: bytes) -> None:
        self._forget(self[spi])
        super().__delitem__(spi)

    def pop(self, spi: bytes, *default: Any) -> Any:
        sa = self.get(spi)
        if sa is None:
            return super().pop(spi, *default)
        self._forget(sa)
        return super().pop(spi)

    def _refused(self, *_args: Any, **_kwargs: Any) -> NoReturn:
        raise TypeError("SaTable changes only by [spi] = sa, del and pop")

    clear = popitem = setdefault = update = __ior__ = _refused  # type: ignore[assignment]

    def recount(self, sa: IkeSa) -> None:
        key = _count_key(sa)
        if key != sa.counted_as:
            self._apply(sa, sa.counted_as, -1)
            self._apply(sa, key, 1)
            sa.counted_as = key

    def _forget(self, sa: IkeSa) -> None:
        self._apply(sa, sa.counted_as, -1)
        sa.counted_as = None
        sa.table = None
        self._touched.pop(id(sa), None)
        self._scheduled.pop(id(sa), None)  # its heap entry is stale from now on

    # -- deadlines ------------------------------------------------------------------------

    def touch(self, sa: IkeSa) -> None:
        """`sa` may have changed: recompute its deadline before the next one is read."""
        if self._deadline is not None:
            self._touched[id(sa)] = sa

    def _schedule(self) -> None:
        assert self._deadline is not None
        while self._touched:
            _key, sa = self._touched.popitem()
            if sa.table is not self:
                continue
            when = self._deadline(sa)
            live = self._scheduled.get(id(sa))
            if live is not None and live[0] == when:
                continue
            if when is None:
                self._scheduled.pop(id(sa), None)
                continue
            entry = (when, next(self._sequence))
            self._scheduled[id(sa)] = entry
            heapq.heappush(self._heap, (*entry, sa))
        if len(self._heap) > 2 * len(self._scheduled) + STALE_TIMER_SLACK:  # mostly stale: compact
            self._heap = [e for e in self._heap if self._live(e)]
            heapq.heapify(self._heap)

    def _live(self, entry: tuple[float, int, IkeSa]) -> bool:
        when, sequence, sa = entry
        return self._scheduled.get(id(sa)) == (when, sequence) and sa.table is self

    def next_deadline(self) -> float | None:
        """The earliest deadline of any SA, or None when no SA has one."""
        self._schedule()
        while self._heap and not self._live(self._heap[0]):
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else None

    def due(self, now: float) -> list[IkeSa]:
        """The SAs whose deadline is `now` or earlier, earliest first; each is touched, so
        its next deadline is computed after the caller has run its timers."""
        self._schedule()
        due: list[IkeSa] = []
        while self._heap and self._heap[0][0] <= now:
            entry = heapq.heappop(self._heap)
            if self._live(entry):
                sa = entry[2]
                del self._scheduled[id(sa)]
                self.touch(sa)
                due.append(sa)
        return due

    def _apply(self, sa: IkeSa, key: _CountKey | None, delta: int) -> None:
        if key is None:
            return
        half_open, established, peer, identities, vpn = key
        self.half_open += delta if half_open else 0
        self.established += delta if established else 0
        if peer is not None:
            self.responder_half_open += delta
            _add(self.half_open_peers, peer, delta)
            if self.peer_changes is not None:
                self.peer_changes.add(peer)
        if vpn is not None:
            _add(self._established_by_vpn, vpn, delta)
        if identities is not None:
            bucket = self._by_identities.setdefault(identities, {})
            if delta > 0:
                bucket[id(sa)] = sa
            else:
                bucket.pop(id(sa), None)
                if not bucket:
                    del self._by_identities[identities]

    def established_between(self, local_id: str, remote_id: str) -> Iterable[IkeSa]:
        """Established (or since rekeyed, deleting) SAs between these identities."""
        return list(self._by_identities.get((local_id, remote_id), {}).values())

    def has_established(self, vpn: VpnPolicy) -> bool:
        """Whether an SA of this VPN policy object was established and is still here."""
        return self._established_by_vpn.get(id(vpn), 0) > 0


def _add(counter: Counter[Any], key: Any, delta: int) -> None:
    value = counter.get(key, 0) + delta
    if value > 0:
        counter[key] = value
    else:
        counter.pop(key, None)
