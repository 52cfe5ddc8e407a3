"""Snapshots of one IKE SA's state, to continue it elsewhere (farm failover, issue 11).

`take(sa, now)` returns two typed parts:

  SaSnapshot  everything but keys: SPIs, endpoints, identities, algorithms, nonces,
              message-ID windows and the cached response, children (SPIs, selectors,
              lifetimes), the active and queued tasks (`exchanges/task.py`), timers.
              JSON-serializable (`to_json` / `from_json`), versioned.
  SaSecrets   SK_* of the IKE SA, each child's KEYMAT and the DH private values of
              tasks in flight: the part to seal before it leaves the process
              (`to_bytes` / `from_bytes`; nothing here seals or stores it yet).

`restore(engine, snapshot, secrets, now)` rebuilds the SA in an engine with the same
configuration and registers it (SA table, responder init index, child SPIs).
Times are stored relative to the `now` of the snapshot and re-based on the `now`
of the restore, so a monotonic clock of another process fits. A restored SA
continues its exchanges exactly: a retransmitted request gets the cached response,
our request in flight is retransmitted and its answer processed by the restored
task (with the same random source, byte for byte; `tests/unit/test_engine_snapshot.py`).

Not snapshotted (SnapshotError says which): an SA waiting for the keystore
(AUTHENTICATING; the peer retransmits, the adopting worker asks again), and one in
the middle of an IKE rekey (replaced, or with a crossing rekey to resolve). Partial
fragments are dropped (the peer retransmits the message).
"""

from __future__ import annotations

import functools
import ipaddress
import json
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass, replace
from types import UnionType
from typing import TYPE_CHECKING, Any, Union, get_args, get_origin, get_type_hints

from ikefarm.shared.ikev2.constants import IdType, PayloadType, TsType
from ikefarm.shared.ikev2.crypto.cipher import Cipher
from ikefarm.shared.ikev2.crypto.dh import DhExchange
from ikefarm.shared.ikev2.crypto.integrity import Integrity
from ikefarm.shared.ikev2.crypto.keys import ChildSaKeys, IkeSaKeys
from ikefarm.shared.ikev2.crypto.prf import Prf
from ikefarm.shared.ikev2.crypto.protection import SkProtection
from ikefarm.shared.ikev2.effects import Endpoint
from ikefarm.shared.ikev2.exchanges import (
    child_create,
    child_rekey,
    ike_init,
    ike_rekey,
    informational,
    reauth,
)
from ikefarm.shared.ikev2.exchanges.task import Task
from ikefarm.shared.ikev2.payloads import IdPayload, TrafficSelector
from ikefarm.shared.ikev2.policy import SecurityPolicy, VpnPolicy
from ikefarm.shared.ikev2.proposals import Algorithms
from ikefarm.shared.ikev2.sa import (
    CachedResponse,
    ChildSa,
    ChildSaState,
    IkeSa,
    IkeSaState,
    OutstandingRequest,
)

if TYPE_CHECKING:
    from ikefarm.shared.ikev2.engine import IkeEngine

SNAPSHOT_VERSION = 1


class SnapshotError(ValueError):
    """An SA that cannot be snapshotted now, or a snapshot that cannot be restored."""


# -- the public part -----------------------------------------------------------------------------

# JSON-native shapes: bytes as hex, endpoints as [address, port], times relative to `now`
Ts = list[Any]  # [ts_type, ip_protocol, start_port, end_port, start_address, end_address]


@dataclass
class ChildRequestSnapshot:
    vpn: str
    policy: str
    spi_in: str
    local_ts: list[Ts]
    remote_ts: list[Ts]
    old_child: int | None
    nonce_i: str
    retried: bool


@dataclass
class TaskSnapshot:
    kind: str  # the task class name
    policy: list[str] | None = None  # [vpn, security policy]
    child: int | None = None  # unique id of the child the task acts on
    reason: str = ""
    resolved: bool = False
    request: ChildRequestSnapshot | None = None
    spi: str = ""
    nonce_i: str = ""
    retried: bool = False
    in_flight: bool = False
    deleted_by_peer: bool = False
    policies: list[list[str]] = field(default_factory=list)


@dataclass
class OutstandingSnapshot:
    message_id: int
    exchange: int
    datagrams: list[str]
    attempt: int
    next_at: float
    task: TaskSnapshot


@dataclass
class ChildSnapshot:
    unique_id: int
    vpn: str
    policy: str
    spi_in: str
    spi_out: str
    algorithms: dict[str, Any]
    local_ts: list[Ts]
    remote_ts: list[Ts]
    mode: str
    udp_encap: bool
    state: str
    installed_at: float
    rekey_at: float | None
    expire_at: float | None
    initiated_by_us: bool
    nonce_i: str
    nonce_r: str
    rekey_in_flight: bool
    rekeyed_from: int | None


@dataclass
class SaSnapshot:
    """One IKE SA without its keys; `to_json` for storage, `from_json` checks the schema."""

    version: int
    unique_id: int
    is_initiator: bool
    spi_i: str
    spi_r: str
    local: list[Any]
    remote: list[Any]
    state: str
    created_at: float
    vpn: str | None
    vpn_remote_address: str | None  # a VPN's "any" made concrete (restart of a peer's SA)
    vpn_remote_id: str | None
    candidates: list[str]
    algorithms: dict[str, Any] | None
    nonce_i: str
    nonce_r: str
    init_request: str
    init_response: str
    local_id: list[Any] | None  # [id type, data, payload type]
    remote_id: list[Any] | None
    expected_request_id: int
    next_request_id: int
    last_response: list[Any] | None  # [message id, [datagram, ...]]
    children: list[ChildSnapshot]
    peer_fragmentation: bool
    peer_childless: bool
    peer_mobike: bool
    peer_signature_hashes: list[int]
    auth_methods: dict[str, str]
    nat_local: bool
    nat_remote: bool
    ppk_used: bool
    peer_use_ppk: bool
    half_open_deadline: float | None
    init_index_key: list[Any] | None
    last_seen: float
    established_at: float | None
    rekey_at: float | None
    expire_at: float | None
    outstanding: OutstandingSnapshot | None
    queued: list[TaskSnapshot]
    rekey_task: str | None  # "outstanding" or "queued.N": which task is our IKE rekey
    delete_reason: str | None
    after_delete: list[TaskSnapshot]
    nat_keepalive_at: float | None
    cookie: str | None
    requested_child: str | None
    # virtual IPs (exchanges/config.py): leased to the peer as [pool, address] under
    # `vip_owner`, assigned to us, and the DNS servers received; absent in older snapshots
    remote_vips: list[list[str]] = field(default_factory=list)
    vip_owner: int | None = None
    local_vips: list[str] = field(default_factory=list)
    cfg_dns: list[str] = field(default_factory=list)
    # MOBIKE (RFC 4555 3.6): the peer's other addresses; absent in older snapshots
    peer_addresses: list[str] = field(default_factory=list)

    def to_json(self) -> bytes:
        return json.dumps(_plain(self), separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> SaSnapshot:
        try:
            raw = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise SnapshotError(f"snapshot is not JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise SnapshotError("snapshot is not an object")
        if raw.get("version") != SNAPSHOT_VERSION:
            raise SnapshotError(
                f"snapshot schema version {raw.get('version')!r}, this worker reads "
                f"{SNAPSHOT_VERSION}"
            )
        built = _build(cls, raw, "snapshot")
        assert isinstance(built, cls)
        return built


def _unfit(path: str, what: str = "") -> SnapshotError:
    return SnapshotError(f"snapshot does not fit schema {SNAPSHOT_VERSION}: {path}{what}")


def _build(tp: Any, raw: Any, path: str) -> Any:
    """`raw` (parsed JSON) checked against the type `tp` of the schema and built into it."""
    if tp is Any:
        return raw
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, UnionType):
        for arm in args:
            try:
                return _build(arm, raw, path)
            except SnapshotError:
                continue
        raise _unfit(path)
    if is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(raw, dict):
            raise _unfit(path)
        hints = _hints(tp)
        if set(raw) - {f.name for f in fields(tp)}:
            raise _unfit(path, " has unknown fields")
        values = {}
        for f in fields(tp):
            if f.name in raw:
                values[f.name] = _build(hints[f.name], raw[f.name], f"{path}.{f.name}")
            elif f.default is MISSING and f.default_factory is MISSING:
                raise _unfit(f"{path}.{f.name}", " is missing")
        return tp(**values)
    if origin is list:
        if not isinstance(raw, list):
            raise _unfit(path)
        return [_build(args[0], item, f"{path}[{i}]") for i, item in enumerate(raw)]
    if origin is dict:
        if not isinstance(raw, dict):
            raise _unfit(path)
        return {str(k): _build(args[1], v, f"{path}.{k}") for k, v in raw.items()}
    fits = {
        type(None): raw is None,
        bool: isinstance(raw, bool),
        int: isinstance(raw, int) and not isinstance(raw, bool),
        float: isinstance(raw, int | float) and not isinstance(raw, bool),
        str: isinstance(raw, str),
    }.get(tp, False)
    if not fits:
        raise _unfit(path)
    return float(raw) if tp is float else raw


@functools.cache
def _hints(tp: type) -> dict[str, Any]:
    return get_type_hints(tp, globals())


# -- the part to seal ----------------------------------------------------------------------------


@dataclass(repr=False)
class SaSecrets:
    """The keys of one snapshot: never logged, never on the bus unsealed."""

    ike: IkeSaKeys | None = None
    children: dict[int, ChildSaKeys] = field(default_factory=dict)
    dh: dict[str, tuple[int, bytes]] = field(default_factory=dict)  # slot -> (group, private)

    def __repr__(self) -> str:
        return f"SaSecrets(<{len(self.children)} children, {len(self.dh)} DH>)"

    def to_bytes(self) -> bytes:
        """The octets to seal (issue 11: to a key the keystore holds)."""
        return json.dumps(
            {
                "ike": _hex_fields(self.ike) if self.ike is not None else None,
                "children": {str(k): _hex_fields(v) for k, v in self.children.items()},
                "dh": {slot: [g, p.hex()] for slot, (g, p) in self.dh.items()},
            },
            sort_keys=True,
        ).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> SaSecrets:
        try:
            raw = json.loads(data)
            ike = raw["ike"]
            return cls(
                ike=IkeSaKeys(**_unhex(ike)) if ike is not None else None,
                children={int(k): ChildSaKeys(**_unhex(v)) for k, v in raw["children"].items()},
                dh={s: (int(g), bytes.fromhex(p)) for s, (g, p) in raw["dh"].items()},
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise SnapshotError(f"snapshot secrets do not fit: {type(exc).__name__}") from None


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def _plain(value: Any) -> Any:
    """What `dataclasses.asdict` makes of a snapshot, for JSON, without its deep copies."""
    cls = type(value)
    if cls in (str, int, float, bool) or value is None:
        return value
    names = _FIELD_NAMES.get(cls)
    if names is None and is_dataclass(value) and not isinstance(value, type):
        names = _FIELD_NAMES[cls] = tuple(f.name for f in fields(value))
    if names is not None:
        return {name: _plain(getattr(value, name)) for name in names}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


def _hex_fields(keys: IkeSaKeys | ChildSaKeys) -> dict[str, str]:
    return {f.name: getattr(keys, f.name).hex() for f in fields(keys)}


def _unhex(raw: dict[str, str]) -> dict[str, bytes]:
    return {name: bytes.fromhex(value) for name, value in raw.items()}


# -- taking a snapshot ---------------------------------------------------------------------------


def _rel(when: float | None, now: float) -> float | None:
    return None if when is None else when - now


def _ts(selectors: list[TrafficSelector]) -> list[Ts]:
    return [
        [int(s.ts_type), s.ip_protocol, s.start_port, s.end_port, str(s.start_address),
         str(s.end_address)]
        for s in selectors
    ]  # fmt: skip


def _algorithms(algorithms: Algorithms) -> dict[str, Any]:
    return asdict(algorithms)


def _identity(payload: IdPayload | None) -> list[Any] | None:
    if payload is None:
        return None
    return [int(payload.id_type), payload.data.hex(), int(payload.payload_type)]


def _policy_ref(policy: SecurityPolicy) -> list[str]:
    return [policy.vpn, policy.name]


def _child_request(
    request: child_create.ChildRequest | None, slot: str, secrets: SaSecrets
) -> ChildRequestSnapshot | None:
    if request is None:
        return None
    if request.dh is not None:
        secrets.dh[f"{slot}.request"] = (request.dh.group, request.dh.private_bytes())
    return ChildRequestSnapshot(
        vpn=request.policy.vpn,
        policy=request.policy.name,
        spi_in=request.spi_in.hex(),
        local_ts=_ts(request.local_ts),
        remote_ts=_ts(request.remote_ts),
        old_child=request.old_child.unique_id if request.old_child is not None else None,
        nonce_i=request.nonce_i.hex(),
        retried=request.retried,
    )


def _task(task: Task, slot: str, secrets: SaSecrets) -> TaskSnapshot:
    kind = type(task).__name__
    if isinstance(task, ike_init.IkeInitTask | informational.LivenessTask):
        return TaskSnapshot(kind)
    if isinstance(task, child_create.NewChildTask) and task.policy is not None:
        request = _child_request(task.request, slot, secrets)
        return TaskSnapshot(kind, policy=_policy_ref(task.policy), request=request)
    if isinstance(task, child_rekey.ChildRekeyTask) and task.child is not None:
        request = _child_request(task.request, slot, secrets)
        return TaskSnapshot(kind, child=task.child.unique_id, request=request)
    if isinstance(task, ike_rekey.IkeRekeyTask):
        if task.dh is not None:
            secrets.dh[slot] = (task.dh.group, task.dh.private_bytes())
        return TaskSnapshot(
            kind,
            spi=task.spi.hex(),
            nonce_i=task.nonce_i.hex(),
            retried=task.retried,
            in_flight=task.in_flight,
            deleted_by_peer=task.deleted_by_peer,
        )
    if isinstance(task, informational.ChildDeleteTask):
        return TaskSnapshot(
            kind, child=task.child.unique_id, reason=task.reason, resolved=task.resolved
        )
    if isinstance(task, informational.IkeDeleteTask):
        return TaskSnapshot(kind, reason=task.reason)
    if isinstance(task, reauth.ReestablishChildTask):
        return TaskSnapshot(kind, policy=_policy_ref(task.policy))
    if isinstance(task, reauth.RetireOldTask):
        return TaskSnapshot(kind, spi=task.old_spi.hex())
    if isinstance(task, reauth.ReauthNewTask):
        return TaskSnapshot(kind, policies=[_policy_ref(p) for p in task.policies])
    raise SnapshotError(f"task {kind} cannot be snapshotted")


# what the peer announced and what NAT detection found: copied as they are, both ways
_FLAGS = (
    "peer_fragmentation",
    "peer_childless",
    "peer_mobike",
    "nat_local",
    "nat_remote",
    "ppk_used",
    "peer_use_ppk",
)


def take(sa: IkeSa, now: float) -> tuple[SaSnapshot, SaSecrets]:
    """The SA's state at `now`, keys apart; SnapshotError when it is mid-keystore or
    mid-rekey (see the module docstring)."""
    if sa.state in (IkeSaState.AUTHENTICATING, IkeSaState.DELETED) or sa.passive is not None:
        raise SnapshotError(f"IKE SA #{sa.unique_id} is {sa.state}: not now")
    if sa.successor is not None or sa.collision is not None or sa.state == IkeSaState.REKEYED:
        raise SnapshotError(f"IKE SA #{sa.unique_id} is in the middle of a rekey")
    if any(c.collision is not None for c in sa.children):
        raise SnapshotError(f"IKE SA #{sa.unique_id} has a child rekey collision to resolve")
    if sa.dh is not None and sa.state != IkeSaState.CONNECTING:
        raise SnapshotError(f"IKE SA #{sa.unique_id} holds a DH key outside IKE_SA_INIT")
    secrets = SaSecrets(ike=sa.keys, children={c.unique_id: c.keys for c in sa.children})
    if sa.dh is not None:
        secrets.dh["sa"] = (sa.dh.group, sa.dh.private_bytes())
    outstanding = None
    if sa.outstanding is not None:
        out = sa.outstanding
        outstanding = OutstandingSnapshot(
            message_id=out.message_id,
            exchange=out.exchange,
            datagrams=[d.hex() for d in out.datagrams],
            attempt=out.attempt,
            next_at=out.next_at - now,
            task=_task(out.task, "outstanding", secrets),
        )
    live_children = {c.unique_id for c in sa.children}
    # a delete of a child no longer here would do nothing when it starts: left out
    kept = [
        t
        for t in sa.queued
        if not isinstance(t, informational.ChildDeleteTask) or t.child.unique_id in live_children
    ]
    queued = [_task(t, f"queued.{i}", secrets) for i, t in enumerate(kept)]
    rekey_slot = None
    if sa.rekey_task is not None:
        if sa.outstanding is not None and sa.outstanding.task is sa.rekey_task:
            rekey_slot = "outstanding"
        elif sa.rekey_task in kept:
            rekey_slot = f"queued.{kept.index(sa.rekey_task)}"
    vpn = sa.vpn
    configured_vpn = vpn.name if vpn is not None else None
    snapshot = SaSnapshot(
        version=SNAPSHOT_VERSION,
        unique_id=sa.unique_id,
        is_initiator=sa.is_initiator,
        spi_i=sa.spi_i.hex(),
        spi_r=sa.spi_r.hex(),
        local=[sa.local.address, sa.local.port],
        remote=[sa.remote.address, sa.remote.port],
        state=str(sa.state),
        created_at=sa.created_at - now,
        vpn=configured_vpn,
        vpn_remote_address=vpn.remote_address if vpn is not None else None,
        vpn_remote_id=vpn.remote_id if vpn is not None else None,
        candidates=[v.name for v in sa.candidates],
        algorithms=_algorithms(sa.algorithms) if sa.algorithms is not None else None,
        nonce_i=sa.nonce_i.hex(),
        nonce_r=sa.nonce_r.hex(),
        init_request=sa.init_request.hex(),
        init_response=sa.init_response.hex(),
        local_id=_identity(sa.local_id),
        remote_id=_identity(sa.remote_id),
        expected_request_id=sa.expected_request_id,
        next_request_id=sa.next_request_id,
        last_response=(
            [sa.last_response.message_id, [d.hex() for d in sa.last_response.datagrams]]
            if sa.last_response is not None
            else None
        ),
        children=[_child(c, now) for c in sa.children],
        peer_signature_hashes=list(sa.peer_signature_hashes),
        auth_methods=dict(sa.auth_methods),
        **{name: getattr(sa, name) for name in _FLAGS},
        half_open_deadline=_rel(sa.half_open_deadline, now),
        init_index_key=(
            [sa.init_index_key[0].hex(), sa.init_index_key[1], sa.init_index_key[2]]
            if sa.init_index_key is not None
            else None
        ),
        last_seen=sa.last_seen - now,
        established_at=_rel(sa.established_at, now),
        rekey_at=_rel(sa.rekey_at, now),
        expire_at=_rel(sa.expire_at, now),
        outstanding=outstanding,
        queued=queued,
        rekey_task=rekey_slot,
        delete_reason=sa.delete_reason,
        after_delete=[_task(t, f"after.{i}", secrets) for i, t in enumerate(sa.after_delete)],
        nat_keepalive_at=_rel(sa.nat_keepalive_at, now),
        cookie=sa.cookie.hex() if sa.cookie is not None else None,
        requested_child=sa.requested_child.name if sa.requested_child is not None else None,
        remote_vips=[[pool, address] for pool, address in sa.remote_vips],
        vip_owner=sa.vip_owner,
        local_vips=list(sa.local_vips),
        cfg_dns=list(sa.cfg_dns),
        peer_addresses=list(sa.peer_addresses),
    )
    return snapshot, secrets


def _child(child: ChildSa, now: float) -> ChildSnapshot:
    return ChildSnapshot(
        unique_id=child.unique_id,
        vpn=child.policy.vpn,
        policy=child.policy.name,
        spi_in=child.spi_in.hex(),
        spi_out=child.spi_out.hex(),
        algorithms=_algorithms(child.algorithms),
        local_ts=_ts(child.local_ts),
        remote_ts=_ts(child.remote_ts),
        mode=child.mode,
        udp_encap=child.udp_encap,
        state=str(child.state),
        installed_at=child.installed_at - now,
        rekey_at=_rel(child.rekey_at, now),
        expire_at=_rel(child.expire_at, now),
        initiated_by_us=child.initiated_by_us,
        nonce_i=child.nonce_i.hex(),
        nonce_r=child.nonce_r.hex(),
        rekey_in_flight=child.rekey_in_flight,
        rekeyed_from=child.rekeyed_from,
    )


# -- restoring -----------------------------------------------------------------------------------


def _at(delta: float | None, now: float) -> float | None:
    return None if delta is None else now + delta


def _selectors(raw: list[Ts]) -> list[TrafficSelector]:
    return [
        TrafficSelector(TsType(t), p, sp, ep, ipaddress.ip_address(a), ipaddress.ip_address(b))
        for t, p, sp, ep, a, b in raw
    ]


def _algorithms_from(raw: dict[str, Any]) -> Algorithms:
    def pair(value: Any) -> tuple[int, int | None] | None:
        if value is None:
            return None
        if (
            not isinstance(value, list)
            or len(value) != 2
            or not isinstance(value[0], int)
            or not isinstance(value[1], int | None)
        ):
            raise SnapshotError(f"an algorithm is [transform id, key bits], not {value!r}")
        return (value[0], value[1])

    encr = pair(raw["encr"])
    assert encr is not None
    return Algorithms(encr, pair(raw["integ"]), pair(raw["prf"]), raw["dh"], bool(raw["esn"]))


def _identity_from(raw: list[Any] | None) -> IdPayload | None:
    if raw is None:
        return None
    id_type, data, payload_type = raw
    return IdPayload(IdType(id_type), bytes.fromhex(data), PayloadType(payload_type))


class _Restorer:
    def __init__(self, engine: IkeEngine, secrets: SaSecrets, now: float) -> None:
        self.engine = engine
        self.secrets = secrets
        self.now = now
        self.children: dict[int, ChildSa] = {}

    def vpn(self, name: str) -> VpnPolicy:
        vpn = self.engine.policy.vpn(name)
        if vpn is None:
            raise SnapshotError(f"no enabled vpn named {name!r} here")
        return vpn

    def policy(self, ref: list[str]) -> SecurityPolicy:
        vpn_name, name = ref
        found = next((p for p in self.vpn(vpn_name).security_policies if p.name == name), None)
        if found is None:
            raise SnapshotError(f"vpn {vpn_name!r} has no security-policy {name!r} here")
        return found

    def dh(self, slot: str) -> DhExchange | None:
        found = self.secrets.dh.get(slot)
        return None if found is None else DhExchange.from_private_bytes(found[0], found[1])

    def child(self, unique_id: int | None) -> ChildSa:
        if unique_id is None or unique_id not in self.children:
            raise SnapshotError(f"a task names child #{unique_id}, which the snapshot lacks")
        return self.children[unique_id]

    def request(
        self, raw: ChildRequestSnapshot | None, slot: str
    ) -> child_create.ChildRequest | None:
        if raw is None:
            return None
        return child_create.ChildRequest(
            policy=self.policy([raw.vpn, raw.policy]),
            spi_in=bytes.fromhex(raw.spi_in),
            local_ts=_selectors(raw.local_ts),
            remote_ts=_selectors(raw.remote_ts),
            old_child=self.child(raw.old_child) if raw.old_child is not None else None,
            nonce_i=bytes.fromhex(raw.nonce_i),
            dh=self.dh(f"{slot}.request"),
            retried=raw.retried,
        )

    def task(self, raw: TaskSnapshot, slot: str) -> Task:
        kind = raw.kind
        if kind == "IkeInitTask":
            return ike_init.IkeInitTask()
        if kind == "LivenessTask":
            return informational.LivenessTask()
        if kind == "NewChildTask" and raw.policy is not None:
            request = self.request(raw.request, slot)
            return child_create.NewChildTask(request=request, policy=self.policy(raw.policy))
        if kind == "ChildRekeyTask":
            request = self.request(raw.request, slot)
            return child_rekey.ChildRekeyTask(request=request, child=self.child(raw.child))
        if kind == "IkeRekeyTask":
            return ike_rekey.IkeRekeyTask(
                spi=bytes.fromhex(raw.spi),
                dh=self.dh(slot),
                nonce_i=bytes.fromhex(raw.nonce_i),
                retried=raw.retried,
                in_flight=raw.in_flight,
                deleted_by_peer=raw.deleted_by_peer,
            )
        if kind == "ChildDeleteTask":
            return informational.ChildDeleteTask(self.child(raw.child), raw.reason, raw.resolved)
        if kind == "IkeDeleteTask":
            return informational.IkeDeleteTask(raw.reason)
        if kind == "ReestablishChildTask" and raw.policy is not None:
            return reauth.ReestablishChildTask(self.policy(raw.policy))
        if kind == "RetireOldTask":
            return reauth.RetireOldTask(bytes.fromhex(raw.spi))
        if kind == "ReauthNewTask":
            return reauth.ReauthNewTask([self.policy(p) for p in raw.policies])
        raise SnapshotError(f"unknown task {kind!r} in the snapshot")


def restore(engine: IkeEngine, snapshot: SaSnapshot, secrets: SaSecrets, now: float) -> IkeSa:
    """Rebuild the SA of `snapshot` in `engine` at `now` and register it there."""
    try:
        return _restore(engine, snapshot, secrets, now)
    except SnapshotError:
        raise
    except Exception as exc:  # anything a corrupted snapshot trips over: refused, never a crash
        raise SnapshotError(f"snapshot does not restore: {type(exc).__name__}: {exc}") from None


def _restore(engine: IkeEngine, snap: SaSnapshot, secrets: SaSecrets, now: float) -> IkeSa:
    if snap.version != SNAPSHOT_VERSION:
        raise SnapshotError(f"snapshot schema version {snap.version}, not {SNAPSHOT_VERSION}")
    at = _Restorer(engine, secrets, now)
    vpn: VpnPolicy | None = None
    if snap.vpn is not None:
        vpn = at.vpn(snap.vpn)
        if (vpn.remote_address, vpn.remote_id) != (snap.vpn_remote_address, snap.vpn_remote_id):
            vpn = replace(vpn, remote_address=snap.vpn_remote_address, remote_id=snap.vpn_remote_id)
    algorithms = _algorithms_from(snap.algorithms) if snap.algorithms is not None else None
    prf = protection = None
    if algorithms is not None:
        assert algorithms.prf is not None
        prf = Prf(algorithms.prf[0])
        integrity = Integrity(algorithms.integ[0]) if algorithms.integ else None
        protection = SkProtection(Cipher(algorithms.encr[0], algorithms.encr[1]), integrity)
    if algorithms is not None and secrets.ike is None:
        raise SnapshotError("the secrets lack the IKE SA's keys")
    spi_i, spi_r = bytes.fromhex(snap.spi_i), bytes.fromhex(snap.spi_r)
    local_spi = spi_i if snap.is_initiator else spi_r
    if local_spi in engine.sas:
        raise SnapshotError(f"an IKE SA with SPI {local_spi.hex()} is already here")
    for raw in snap.children:
        keys = secrets.children.get(raw.unique_id)
        if keys is None:
            raise SnapshotError(f"the secrets lack child #{raw.unique_id}'s keys")
        at.children[raw.unique_id] = ChildSa(
            unique_id=raw.unique_id,
            policy=at.policy([raw.vpn, raw.policy]),
            spi_in=bytes.fromhex(raw.spi_in),
            spi_out=bytes.fromhex(raw.spi_out),
            algorithms=_algorithms_from(raw.algorithms),
            keys=keys,
            local_ts=_selectors(raw.local_ts),
            remote_ts=_selectors(raw.remote_ts),
            mode=raw.mode,
            udp_encap=raw.udp_encap,
            state=ChildSaState(raw.state),
            installed_at=now + raw.installed_at,
            rekey_at=_at(raw.rekey_at, now),
            expire_at=_at(raw.expire_at, now),
            initiated_by_us=raw.initiated_by_us,
            nonce_i=bytes.fromhex(raw.nonce_i),
            nonce_r=bytes.fromhex(raw.nonce_r),
            rekey_in_flight=raw.rekey_in_flight,
            rekeyed_from=raw.rekeyed_from,
        )
    candidates = [at.vpn(name) for name in snap.candidates]
    requested = None
    if snap.requested_child is not None and vpn is not None:
        requested = at.policy([vpn.name, snap.requested_child])
    sa = IkeSa(
        unique_id=snap.unique_id,
        is_initiator=snap.is_initiator,
        spi_i=spi_i,
        spi_r=spi_r,
        local=Endpoint(snap.local[0], int(snap.local[1])),
        remote=Endpoint(snap.remote[0], int(snap.remote[1])),
        state=IkeSaState(snap.state),
        created_at=now + snap.created_at,
        vpn=vpn,
        candidates=candidates,
        algorithms=algorithms,
        prf=prf,
        protection=protection,
        keys=secrets.ike,
        nonce_i=bytes.fromhex(snap.nonce_i),
        nonce_r=bytes.fromhex(snap.nonce_r),
        dh=at.dh("sa"),
        init_request=bytes.fromhex(snap.init_request),
        init_response=bytes.fromhex(snap.init_response),
        local_id=_identity_from(snap.local_id),
        remote_id=_identity_from(snap.remote_id),
        expected_request_id=snap.expected_request_id,
        next_request_id=snap.next_request_id,
        last_response=(
            CachedResponse(snap.last_response[0], [bytes.fromhex(d) for d in snap.last_response[1]])
            if snap.last_response is not None
            else None
        ),
        children=list(at.children.values()),
        peer_signature_hashes=tuple(snap.peer_signature_hashes),
        auth_methods=dict(snap.auth_methods),
        **{name: getattr(snap, name) for name in _FLAGS},
        half_open_deadline=_at(snap.half_open_deadline, now),
        last_seen=now + snap.last_seen,
        established_at=_at(snap.established_at, now),
        rekey_at=_at(snap.rekey_at, now),
        expire_at=_at(snap.expire_at, now),
        delete_reason=snap.delete_reason,
        nat_keepalive_at=_at(snap.nat_keepalive_at, now),
        cookie=bytes.fromhex(snap.cookie) if snap.cookie is not None else None,
        requested_child=requested,
        remote_vips=[(pair[0], pair[1]) for pair in snap.remote_vips if len(pair) == 2],
        vip_owner=snap.vip_owner,
        local_vips=list(snap.local_vips),
        cfg_dns=list(snap.cfg_dns),
        peer_addresses=tuple(snap.peer_addresses),
    )
    if snap.outstanding is not None:
        out = snap.outstanding
        sa.outstanding = OutstandingRequest(
            message_id=out.message_id,
            exchange=out.exchange,
            task=at.task(out.task, "outstanding"),
            datagrams=[bytes.fromhex(d) for d in out.datagrams],
            attempt=out.attempt,
            next_at=now + out.next_at,
        )
    sa.queued = [at.task(t, f"queued.{i}") for i, t in enumerate(snap.queued)]
    sa.after_delete = [at.task(t, f"after.{i}") for i, t in enumerate(snap.after_delete)]
    if snap.rekey_task == "outstanding" and sa.outstanding is not None:
        sa.rekey_task = sa.outstanding.task
    elif snap.rekey_task is not None and snap.rekey_task.startswith("queued."):
        sa.rekey_task = sa.queued[int(snap.rekey_task.split(".", 1)[1])]
    key = None
    if snap.init_index_key is not None:
        spi, address, port = snap.init_index_key
        key = (bytes.fromhex(spi), str(address), int(port))
        sa.init_index_key = key
    for payload in (sa.local_id, sa.remote_id):
        str(payload)  # a malformed identity fails here, not in the SA table's bookkeeping
    # the snapshot may have missed the last exchange the peer started (docs/failover.md)
    sa.message_id_jump = True
    engine.adopt(sa)
    if key is not None:
        engine.init_index[key] = local_spi
    return sa
