"""IKE workers: run the sans-I/O engine for one SPI shard and carry out its effects over NATS.

Datagrams arrive from ingress (new IKE_SA_INIT through the workers' queue group,
everything else on this worker's shard subject); the engine's effects become
bus messages: datagrams back to ingress, PSK computations to the keystore,
child SAs to the kernel service, events for everyone. The worker holds no
secret: its config copy has the secrets stripped.

Manual SA control (`shared/ikev2/management.py`): `subjects.IKE_COMMAND` reaches
every worker (rekey, reauth, flush, clear act on the SAs each one owns; each
answers with its count and lines, the CLI gathers them); `subjects.IKE_INITIATE`
reaches one worker of the queue group and `ike_shard_command(shard)` the owner of
a shard: an initiation is answered once it is established or has failed (or the
request's timeout passed). A malformed command gets a structured error, is
counted and changes nothing.

The kernel service's batched per-child counters and its EXPIRE events reach the
engine through `kernel_events.py`: counters for `show ike-sa details` and DPD
liveness, soft EXPIRE -> child rekey, hard EXPIRE -> child delete.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import math
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

from nats.aio.msg import Msg
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode

from ikefarm.proto import envelope, subjects
from ikefarm.proto.messages import (
    CertAuthReply,
    CertAuthRequest,
    ChildDelete,
    ChildInstall,
    ChildUpdate,
    Datagram,
    EapAuthRequest,
    EapRelayReply,
    EapRelayRequest,
    IkeCommand,
    IkeCommandResult,
    IkeLoad,
    IkeShow,
    IkeShowRequest,
    InitialContactNotice,
    InitRoute,
    KernelAck,
    KernelAcquire,
    KernelCounters,
    KernelExpire,
    KernelShowRequest,
    KernelState,
    LocalAddresses,
    OutboundDatagram,
    PeerBackoff,
    PskAuthReply,
    RadiusAccounting,
    RadiusAccountingReply,
    SaEventNotice,
    TrapInstall,
    TrapRemove,
    VipAddress,
    VipPoolShow,
    VipPoolShowRequest,
)
from ikefarm.proto.sharding import shard_of_spi
from ikefarm.services.ike import kernel_events, sa_store, unique_ids
from ikefarm.services.ike.adoption import AdoptedShard, ShardWatch, orphan_children
from ikefarm.services.ike.exchange_traces import (
    ExchangeTraces,
    exchange_key,
    exchange_name,
    outcome_attributes,
    parse_header,
)
from ikefarm.services.ike.mobike_moves import LocalMoves
from ikefarm.services.ike.ppk_client import PpkClient
from ikefarm.services.ike.radius_accounting import Accounting
from ikefarm.services.ike.sa_store import SaStore
from ikefarm.services.ike.shard_claim import (
    RENEW_INTERVAL,
    SHARD_AUTO,
    ShardClaim,
    ShardLost,
)
from ikefarm.services.ike.transport_keys import TransportKey
from ikefarm.services.ike.unique_ids import UniqueIds
from ikefarm.services.ike.vip_leases import VipLeases
from ikefarm.shared.bus.child_keys import SEALED_KEYS_REFUSED, ChildKeys, ChildKeySealer
from ikefarm.shared.bus.datagram import carried_header
from ikefarm.shared.bus.runtime import ServiceBase
from ikefarm.shared.dos.admission import WorkerAdmission, local_load
from ikefarm.shared.dos.limits import dos_limits
from ikefarm.shared.dos.load import FarmLoad, PeerReports
from ikefarm.shared.ikev2 import management
from ikefarm.shared.ikev2.constants import HeaderFlag
from ikefarm.shared.ikev2.effects import (
    DeleteChildSa,
    Effect,
    Endpoint,
    HalfOpen,
    InitialContact,
    InstallChildSa,
    InstallTrap,
    KeystoreAnswer,
    KeystoreRequest,
    LocalVip,
    Log,
    PeerFailed,
    PpkMix,
    RemoveTrap,
    SaEvent,
    SendDatagram,
    SendKeepalive,
    UpdateChildSa,
    VipLease,
    VipRelease,
)
from ikefarm.shared.ikev2.engine import IkeEngine
from ikefarm.shared.ikev2.message import IkeHeader
from ikefarm.shared.ikev2.policy import engine_policy
from ikefarm.shared.ikev2.sa import ChildSaState, IkeSa
from ikefarm.shared.ikev2.show import ike_sa_row
from ikefarm.shared.ikev2.state_counts import StateCounts
from ikefarm.shared.ikev2.traps import AcquireGate, start_traps
from ikefarm.shared.observability.latency import IKE_HANDSHAKE_DURATION
from ikefarm.shared.observability.logging import get_logger
from ikefarm.shared.observability.tracing import tracer
from ikefarm.shared.udp_endpoints import listen_addresses

KEYSTORE_TIMEOUT = 2.0
# a keystore restarting (`ikefarm up` brings a dead one back within seconds) is asked again
# with backoff for this long before the exchange is left to the peer's retransmission; an AUTH
# computation is idempotent, so one whose answer timed out is asked again too
KEYSTORE_RETRY = 10.0  # a first restart answers again after about 6 s on a loaded machine
KERNEL_TIMEOUT = 2.0
TIMER_IDLE = 1.0
MAX_INITIATE_WAIT = 300.0
LOAD_INTERVAL = 1.0  # s between IkeLoad snapshots when nothing changes
LOAD_MIN_SPACING = 0.02  # s: changes within this are reported together
MAX_INGRESS_TRACKED = 1024
# what the engine made of the effects being applied, for the spans of the datagrams they send
_OUTCOME: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "ike_outcome", default=None
)


def trap_message(effect: InstallTrap) -> TrapInstall:
    """The bus request for an engine's InstallTrap effect."""
    return TrapInstall(
        vpn=effect.vpn,
        name=effect.name,
        reqid=effect.reqid,
        mode=effect.mode,
        local_address=effect.local,
        remote_address=effect.remote,
        local_ts=list(effect.local_ts),
        remote_ts=list(effect.remote_ts),
    )


class IkeService(ServiceBase):
    name = "ike"
    subsystem = "ike"
    description = "ikefarm ike worker: IKEv2 negotiation for one SPI shard"
    event_loop = "uvloop"  # every datagram is two or more bus messages (RESULTS.md, uvloop)

    async def setup(self) -> None:
        shard = self.runtime.options.get("shard")
        self.shard_claim: ShardClaim | None = None  # `--shard auto`
        self.lease: ShardClaim | None = None  # a shard given by number
        self._renewer: asyncio.Task[None] | None = None
        if shard == SHARD_AUTO:
            assert self.runtime.nc is not None
            self.shard_claim = ShardClaim(self.runtime.nc, self.runtime.instance)
            self.shard = await self.shard_claim.claim()
            self.log.control("shard_claimed", shard=self.shard)
        else:
            self.shard = int(shard) if shard is not None else 0
            # the shard is a lease: its SA snapshots go to whoever holds it (docs/failover.md)
            assert self.runtime.nc is not None
            self.lease = ShardClaim(self.runtime.nc, self.runtime.instance)
            await self.lease.hold(self.shard)
            self.log.control("shard_lease_held", shard=self.shard)
        self.admission = WorkerAdmission(
            dos_limits(self.config),
            shard=self.shard,
            workers=1 if self.shard_claim else int(self.config.farm.ike_workers),
            load=FarmLoad(self.runtime.instance),
        )
        # unique ids reserved farm-wide before the first SA can want one
        self._ids_wanted = asyncio.Event()
        self.unique_ids = UniqueIds(self.shard, on_want=self._ids_wanted.set)
        assert self.runtime.nc is not None
        self._id_bucket = await unique_ids.open_bucket(self.runtime.nc)
        first, end = await unique_ids.reserve(self._id_bucket, self.shard, 1)
        self.unique_ids.add_block(first, end)
        # ids of this shard below this were handed out by its earlier lives
        self._first_unique_id = self.shard * unique_ids.SHARD_SPAN + first
        self.engine = IkeEngine(
            engine_policy(self.config.without_secrets()),
            self.shard,
            dos=self.admission,
            unique_ids=self.unique_ids.take,
        )
        # an EAP relay waits while the keystore tries every RADIUS server (docs/radius.md)
        self.radius_wait = KEYSTORE_TIMEOUT + sum(
            float(s.timeout) * (int(s.retries) + 1) for s in self.config.ike.radius_server
        )
        # RADIUS accounting (docs/radius.md), sent by the keystore
        self.accounting = Accounting.from_config(
            self.config, self._send_accounting, self.runtime.counters
        )
        self._accounting_task: asyncio.Task[None] | None = None
        if self.accounting is not None and self.accounting.interim > 0:
            self._accounting_task = asyncio.create_task(self.accounting.run_interim())
        # farm-wide VIP leases (docs/vip-pools.md), when some VPN hands out addresses
        self.vip_leases: VipLeases | None = None
        self._vip_keeper: asyncio.Task[None] | None = None
        if any(set(vpn.vip_pools) - {"radius"} for vpn in self.engine.policy.vpns):
            self.vip_leases = VipLeases(
                self.runtime.nc, self.engine.policy.pools, self.runtime.counters
            )
            await self.vip_leases.open()
        # this shard's SAs continue from their snapshots (docs/failover.md) before any
        # datagram of theirs is taken: a worker restarted on its shard, or one that claimed it
        self.sa_store = SaStore(
            self.runtime,
            self.engine,
            self.shard,
            await sa_store.open_bucket(self.runtime.nc),
            self.log,
        )
        restored = await self.sa_store.load()
        self.log.control("snapshots_restored", shard=self.shard, sas=restored)
        self._restored = restored
        await self.adopt_vip_leases(self.shard)
        # load reports carry the peers whose half-open count changed, not every peer
        limits = self.admission.limits
        self.peer_reports = PeerReports(
            LOAD_INTERVAL, limits.block_threshold is not None or limits.discard_duplicate
        )
        self._peer_changes: set[str] = set()
        self.engine.sas.peer_changes = self._peer_changes
        # IKE_SA_INIT answered (or refused) per ingress instance, reported in IkeLoad
        self.inits_answered: dict[str, int] = {}
        # snapshots are ordered by seq; a restarted worker starts above its last life's
        self._load_seq = time.time_ns() // 1_000_000
        self._load_dirty = asyncio.Event()
        self._last_load: tuple[int, int, int] | None = None
        self.half_open_peak = 0  # the most half-open SAs this worker ever held at once
        self._tasks: set[asyncio.Task[Any]] = set()
        self._wake = asyncio.Event()
        # when the timer loop wakes by itself; apply() wakes it earlier only for an earlier
        # deadline (not for every datagram: two loop turns and a timer pass each)
        self._timer_at = -math.inf
        self._stopping = False
        self.watches = management.Watches()
        self.traces = ExchangeTraces()
        self.state_counts = StateCounts()
        self.ppk_client = PpkClient(self.runtime, KEYSTORE_TIMEOUT)
        self.kernel_key = TransportKey(self.runtime, subjects.KERNEL_TRANSPORT_KEY, KERNEL_TIMEOUT)
        self.child_sealer = ChildKeySealer()
        self._waiting: dict[int, asyncio.Future[management.Watch]] = {}
        runtime = self.runtime
        await runtime.subscribe(
            subjects.IKE_INIT, Datagram, self.on_datagram, queue=subjects.QUEUE_IKE_WORKERS
        )
        await runtime.subscribe(subjects.ike_shard(self.shard), Datagram, self.on_datagram)
        # shards of workers whose lease lapsed, adopted by this one (adoption.py)
        self.shard_watch = ShardWatch(
            runtime.nc,
            runtime.instance,
            self.shard,
            self.adopt_shard,
            self.hand_back_shard,
            self.log,
            runtime.counters,
        )
        await runtime.subscribe(subjects.IKE_SHOW, IkeShowRequest, self.on_show)
        await runtime.subscribe(
            subjects.IKE_VIP_POOL_SHOW,
            VipPoolShowRequest,
            self.on_vip_pool_show,
            queue=subjects.QUEUE_IKE_WORKERS,
        )
        await runtime.subscribe(
            subjects.IKE_INITIAL_CONTACT, InitialContactNotice, self.on_initial_contact
        )
        await runtime.subscribe(subjects.IKE_COMMAND, IkeCommand, self.on_command)
        for subject in (subjects.IKE_INITIATE, subjects.ike_shard_command(self.shard)):
            await runtime.subscribe(
                subject, IkeCommand, self.on_command, queue=subjects.QUEUE_IKE_WORKERS
            )
        self._watcher: asyncio.Task[None] | None = None
        await runtime.subscribe(subjects.IKE_LOAD, IkeLoad, self.on_load, traced=False)
        # the kernel service's per-child counters and EXPIRE events (kernel_events.py)
        await runtime.subscribe(
            subjects.IKE_KERNEL_COUNTERS, KernelCounters, self.on_kernel_counters, traced=False
        )
        await runtime.subscribe(subjects.EVENT_KERNEL_EXPIRE, KernelExpire, self.on_kernel_expire)
        # MOBIKE as initiator: our address went away or a better path appeared (docs/mobike.md)
        if any(vpn.mobike for vpn in self.engine.policy.vpns):
            moves = LocalMoves(
                runtime,
                self.engine,
                set(listen_addresses(self.config)),
                bool(self.config.ike.global_options.mobike_prefer_best_path),
                self.apply,
            )
            await runtime.subscribe(
                subjects.EVENT_KERNEL_ADDRESSES, LocalAddresses, moves.on_addresses
            )
        # start-action = trap: shard 0's worker owns the traps and the ACQUIREs they raise
        # (one owner, so one initiation per ACQUIRE; docs/esp-dataplane.md)
        self.acquires = AcquireGate(float(self.config.ike.global_options.acquire_timeout))
        if self.shard == 0:
            await runtime.subscribe(
                subjects.EVENT_KERNEL_ACQUIRE, KernelAcquire, self.on_kernel_acquire
            )
            self._spawn(self.install_start_traps())
        # ingress forwards to a shard only while its owner reports: the first report goes
        # out before this worker counts as started, not up to a LOAD_INTERVAL later
        await self.publish_load()
        self._timer = asyncio.create_task(self.run_timers())
        self._reporter = asyncio.create_task(self.report_load())
        self._persister = asyncio.create_task(self.sa_store.run())
        self._id_keeper = asyncio.create_task(
            unique_ids.keep_reserved(self._id_bucket, self.unique_ids, self._ids_wanted, self.log)
        )
        if self.shard_claim is not None:
            self._renewer = asyncio.create_task(self.renew_claim(self.shard_claim))
        elif self.lease is not None:
            self._renewer = asyncio.create_task(self.renew_claim(self.lease, count_workers=False))
        # this shard's kernel state, when an earlier life of the shard may have left some
        # (its unique ids started above 1): adopted children kept, orphans gone
        if self._restored or self._first_unique_id > self.shard * unique_ids.SHARD_SPAN + 1:
            self._spawn(self.reconcile_kernel(self.shard, below=self._first_unique_id))
        self._watcher = asyncio.create_task(self.watch_shards())
        if self.vip_leases is not None:
            self._vip_keeper = asyncio.create_task(self.vip_leases.keep_alive(self.log))
        self.log.control("ike_worker_ready", shard=self.shard)

    async def reconcile_kernel(self, shard: int, below: int | None = None) -> None:
        """The kernel state of a shard this worker just took (its own on start, or one it
        adopted) against the SAs it restored (docs/failover.md):

        - adopted children whose kernel state is gone (the kernel service restarted too,
          and its userspace dataplane with it) are rekeyed at once: the peer's replay
          window rules out installing the old keys again, and a fresh child restores the
          traffic. Children the kernel still has are left as they are.
        - kernel children made by the shard's earlier owner (unique ids are the shard's,
          `unique_ids.py`; below `below` for this worker's own shard) whose IKE SA was not
          restored (no record, a refused one) are gone for good: deleted in the kernel and
          logged (`child_deleted`, reason `ike_sa_gone`), counted `orphan_child_deleted`."""
        state: KernelState | None = None
        for attempt in range(3):  # the kernel service may start after this worker
            try:
                state = await self.runtime.request(
                    subjects.KERNEL_SHOW, KernelShowRequest(), KernelState, timeout=KERNEL_TIMEOUT
                )
                break
            except Exception as exc:
                if attempt == 2:
                    self.runtime.counters["kernel_reconcile_failed"] += 1
                    self.log.control("kernel_reconcile_failed", error=type(exc).__name__)
                    return
                await asyncio.sleep(1.0)
        assert state is not None
        present = {str(row.get("spi", "")) for row in state.sas}
        now = time.monotonic()
        effects: list[Effect] = []
        known: set[int] = set()
        for sa in list(self.engine.sas.values()):
            for child in list(sa.children):
                known.add(child.unique_id)
                if (
                    shard_of_spi(sa.local_spi) == shard
                    and child.state == ChildSaState.INSTALLED
                    and child.spi_in.hex() not in present
                ):
                    self.runtime.counters["adopted_child_missing_in_kernel"] += 1
                    effects += self.engine.rekey_child(sa, child, now)
        if effects:
            self.log.control("adopted_children_rekeyed", shard=shard)
        await self.apply(effects)
        orphans = orphan_children(state.sas, shard, known, below)
        if orphans:  # an IKE rekey may have moved a child to an SA of another shard
            known |= await self._farm_children()
            orphans = [d for d in orphans if d.unique_id not in known]
        for delete in orphans:
            self.runtime.counters["orphan_child_deleted"] += 1
            self.log.audit("orphan_child", shard=shard, unique_id=delete.unique_id)
            await self._kernel(subjects.KERNEL_CHILD_DELETE, delete, "delete", delete.unique_id)

    async def _farm_children(self) -> set[int]:
        """The unique ids of the children every other worker holds (`show ike-sa`)."""
        from ikefarm.shared.cli.status import gather

        assert self.runtime.nc is not None
        held: set[int] = set()
        for reply in await gather(
            self.runtime.nc, subjects.IKE_SHOW, envelope.pack(IkeShowRequest()), 2.0
        ):
            with contextlib.suppress(Exception):  # a bad answer: its children count as gone
                show = envelope.unpack_reply(reply.data, IkeShow)
                for row in show.sas:
                    held.update(int(c["unique_id"]) for c in row.get("children", []))
        return held

    async def watch_shards(self) -> None:
        """Look at the shard leases every RENEW_INTERVAL: adopt what lapsed, hand back what
        its worker wants back (adoption.py)."""
        while not self._stopping:
            await asyncio.sleep(RENEW_INTERVAL)
            try:
                await self.shard_watch.tick()
            except Exception as exc:  # the broker away: the next look
                self.runtime.counters["shard_watch_failed"] += 1
                self.log.control("shard_watch_failed", error=type(exc).__name__)

    async def _subscribe_shard(self, shard: int) -> list[Any]:
        return [
            await self.runtime.subscribe(subjects.ike_shard(shard), Datagram, self.on_datagram),
            await self.runtime.subscribe(
                subjects.ike_shard_command(shard),
                IkeCommand,
                self.on_command,
                queue=subjects.QUEUE_IKE_WORKERS,
            ),
        ]

    async def adopt_shard(self, shard: int, claim: ShardClaim) -> None:
        """Continue the SAs of `shard`, whose lease this worker now holds: restore them, move
        their VIP leases here, take the shard's datagrams and report it to ingress."""
        adopted = AdoptedShard(shard, claim, time.monotonic())
        self.engine.adopted_shards.add(shard)
        adopted.restored = await self.sa_store.load(shard)
        self.shard_watch.adopted[shard] = adopted
        await self.adopt_vip_leases(shard)
        adopted.subscriptions = await self._subscribe_shard(shard)
        self._wake.set()  # the restored SAs' timers
        await self.publish_load()  # ingress forwards the shard here from now on
        self.log.audit("shard_adopted", shard=shard, sas=adopted.restored)
        self._spawn(self.reconcile_kernel(shard))

    async def hand_back_shard(self, adopted: AdoptedShard) -> None:
        """Stop taking the shard's datagrams, write its SAs and forget them here; the worker
        that wants it back restores them once the lease is released (adoption.py)."""
        for subscription in adopted.subscriptions:
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()
        try:
            count = await self.sa_store.hand_back(adopted.shard, time.monotonic())
        except Exception:
            adopted.subscriptions = await self._subscribe_shard(adopted.shard)
            raise
        self.engine.adopted_shards.discard(adopted.shard)
        self.log.audit("shard_handed_back", shard=adopted.shard, sas=count)

    async def adopt_vip_leases(self, shard: int) -> None:
        """The VIP leases of the shard's restored SAs name this worker's life from now on,
        so no allocation reclaims an address still in use (docs/vip-pools.md)."""
        if self.vip_leases is None:
            return
        for sa in list(self.engine.sas.values()):
            if shard_of_spi(sa.local_spi) != shard or not sa.remote_vips:
                continue
            try:
                await self.vip_leases.adopt(sa.vip_owner or sa.unique_id, sa.remote_vips)
            except Exception as exc:
                self.runtime.counters["vip.adopt_failed"] += 1
                self.log.control("vip_adopt_failed", shard=shard, error=type(exc).__name__)

    async def renew_claim(self, claim: ShardClaim, count_workers: bool = True) -> None:
        """Keep this worker's shard; with `--shard auto` the farm's worker count is the
        number of shards reporting their load (this one included), so each worker's share
        of the farm-wide limits follows `docker compose up --scale ike=N`."""
        while True:
            await asyncio.sleep(RENEW_INTERVAL)
            if count_workers:  # on_load ignores this worker's own reports: others, plus this one
                self.admission.workers = 1 + self.admission.load.shards(time.monotonic())
            try:
                await claim.renew()
            except ShardLost as exc:
                # another worker holds the shard and its SAs now: write none of them again
                self.sa_store.shards.discard(self.shard)
                self.log.audit("shard_lost", shard=self.shard, reason=str(exc))
                self.runtime.request_stop()
                return
            except Exception as exc:  # broker away: nats-py reconnects, the TTL is the bound
                self.runtime.counters["shard_renew_failed"] += 1
                self.log.control("shard_renew_failed", shard=self.shard, error=type(exc).__name__)

    async def before_drain(self) -> None:
        leases = getattr(self, "vip_leases", None)
        if leases is not None:
            if self._vip_keeper is not None:
                self._vip_keeper.cancel()
            await leases.retire()
        self._persister.cancel()
        with contextlib.suppress(Exception):  # what changed last goes out before the stop
            await asyncio.wait_for(self.sa_store.flush(), 2.0)
        if self._watcher is not None:
            self._watcher.cancel()
        await self.shard_watch.release_all()  # adopted shards' records are written above
        for claim in (self.shard_claim, self.lease):
            if claim is not None:
                if self._renewer is not None:
                    self._renewer.cancel()
                await claim.release()

    async def teardown(self) -> None:
        self._stopping = True
        self._timer.cancel()
        self._reporter.cancel()
        self._id_keeper.cancel()
        if self._vip_keeper is not None:
            self._vip_keeper.cancel()
        if getattr(self, "_accounting_task", None) is not None:
            self._accounting_task.cancel()  # type: ignore[union-attr]
        self._persister.cancel()
        if self._renewer is not None:
            self._renewer.cancel()
        if getattr(self, "_watcher", None) is not None:
            self._watcher.cancel()
        for task in list(self._tasks):
            task.cancel()
        for future in self._waiting.values():
            future.cancel()

    def gauges(self) -> dict[str, Any]:
        return {
            "shard": self.shard,
            "unique_ids_overrun": self.unique_ids.overrun,
            "ike_sas": len(self.engine.sas),
            "half_open": self.engine.half_open_count,
            "half_open_peak": self.half_open_peak,
            "established": self.engine.established_count,
            "initiations_waiting": len(self.watches.active),
            "dos": {
                "farm_half_open": local_load(self.engine).half_open
                + self.admission.load.half_open(time.monotonic(), exclude_shard=self.shard),
                "backoff_peers": len(self.admission.backoff),
            },
            "engine": dict(self.engine.counters),
            "sa_states": self.state_counts.counts(self.engine.sas.values(), time.monotonic()),
            # shard ownership for `ikefarm status` (docs/failover.md)
            "lease_age": next(
                (c.lease_age(time.monotonic()) for c in (self.lease, self.shard_claim) if c),
                None,
            ),
            "adopted_shards": self.shard_watch.ownership(time.monotonic()),
            "snapshots": {
                "stored": len(self.sa_store.stored),
                **self.sa_store.counters,
                "recent_refusals": [list(r) for r in self.sa_store.recent_refusals],
            },
        }

    # -- inputs -----------------------------------------------------------------------------

    async def on_datagram(self, datagram: Datagram, msg: Msg) -> None:
        header = carried_header(datagram)  # read once, by ingress
        if header is None and datagram.spi_i:
            self.runtime.counters["datagram_header_refused"] += 1
        traced = header or parse_header(datagram.data)
        if traced is None:  # the engine counts and drops it
            await self._receive(datagram, msg, header)
            return
        key = exchange_key(traced, received=True)
        known = self.traces.exchange(key)
        here = trace.get_current_span().get_span_context()
        # a datagram of a known exchange joins its trace, linked to the one ingress began
        parent = trace.set_span_in_context(NonRecordingSpan(known)) if known else None
        with tracer().start_as_current_span(
            f"ike.exchange {exchange_name(traced)}",
            context=parent,
            links=[Link(here)] if known and here.is_valid else None,
            attributes=self._exchange_attributes(traced, datagram.remote_address, known),
        ) as span:
            if known is None:
                self.traces.remember(key, span.get_span_context())
            await self._receive(datagram, msg, header)

    @staticmethod
    def _exchange_attributes(
        header: IkeHeader, peer: str, known: SpanContext | None
    ) -> dict[str, Any]:
        return {
            "ikefarm.ike.spi_i": header.spi_i.hex(),
            "ikefarm.ike.spi_r": header.spi_r.hex(),
            "ikefarm.ike.exchange": exchange_name(header),
            "ikefarm.ike.message_id": header.message_id,
            "ikefarm.ike.response": bool(header.flags & HeaderFlag.RESPONSE),
            "ikefarm.ike.joined_exchange": known is not None,
            "net.peer.ip": peer,
        }

    async def _receive(self, datagram: Datagram, msg: Msg, header: IkeHeader | None) -> None:
        try:
            effects = self.engine.receive(
                datagram.data,
                Endpoint(datagram.local_address, datagram.local_port),
                Endpoint(datagram.remote_address, datagram.remote_port),
                time.monotonic(),
                header,
            )
            if header is not None:
                self.sa_store.mark(header.spi_i, header.spi_r)
            elif datagram.spi_i:
                self.sa_store.mark(datagram.spi_i, datagram.spi_r)
        finally:
            # counted before anything is sent: the snapshot that shows the new half-open SA
            # also shows this init answered, so no ingress counts it twice
            if msg.subject == subjects.IKE_INIT and datagram.via:
                self._init_answered(datagram.via)
        if msg.subject == subjects.IKE_INIT and datagram.via and datagram.answer_direct:
            effects = await self._answer_with_route(effects, datagram.via)
        await self.apply(effects)

    async def _answer_with_route(self, effects: list[Effect], via: str) -> list[Effect]:
        """An IKE_SA_INIT answer and its init route in one message, to the ingress instance
        that forwarded the request (the one its retransmissions reach); the other effects
        are left to `apply`. Without both, or for an odd instance name: as they were."""
        subject = subjects.ingress_instance_send(via)
        route = next((e for e in effects if isinstance(e, HalfOpen)), None)
        if subject is None or route is None:
            return effects
        answer = next(
            (e for e in effects if isinstance(e, SendDatagram) and e.remote == route.remote), None
        )
        if answer is None:
            return effects
        await self.runtime.publish(
            subject,
            OutboundDatagram(
                answer.local.address,
                answer.local.port,
                answer.remote.address,
                answer.remote.port,
                answer.data,
                init_route=InitRoute(
                    route.spi_i, route.remote.address, route.remote.port, self.shard, route.lifetime
                ),
            ),
        )
        return [e for e in effects if e is not route and e is not answer]

    def _init_answered(self, via: str) -> None:
        if via not in self.inits_answered and len(self.inits_answered) >= MAX_INGRESS_TRACKED:
            self.runtime.counters["inits_via_untracked"] += 1
            return
        self.inits_answered[via] = self.inits_answered.get(via, 0) + 1
        self._load_dirty.set()

    # -- farm-wide load (issue 5) ------------------------------------------------------------

    async def on_load(self, message: IkeLoad, _msg: Msg) -> None:
        if message.shard == self.shard or message.instance == self.runtime.instance:
            return
        refused = self.admission.load.update_shard(message, time.monotonic())
        if refused is not None:
            self.runtime.counters[f"load_refused.{refused}"] += 1

    def load_snapshot(self) -> IkeLoad:
        mine = local_load(self.engine)
        self._load_seq += 1
        peers, full = self.peer_reports.report(mine.peers, self._peer_changes, time.monotonic())
        return IkeLoad(
            instance=self.runtime.instance,
            shard=self.shard,
            seq=self._load_seq,
            half_open=mine.half_open,
            established=mine.established,
            interval=LOAD_INTERVAL,
            half_open_peers=peers,
            inits=dict(self.inits_answered),
            peers_full=full,
        )

    async def report_load(self) -> None:
        """IkeLoad on every change (coalesced) and every LOAD_INTERVAL, for ingress and peers."""
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(LOAD_INTERVAL):
                    await self._load_dirty.wait()
            self._load_dirty.clear()
            await self.publish_load()
            await asyncio.sleep(LOAD_MIN_SPACING)

    async def publish_load(self) -> None:
        try:
            await self.runtime.publish(subjects.IKE_LOAD, self.load_snapshot())
            for shard in self.shard_watch.adopted if hasattr(self, "shard_watch") else ():
                # an adopted shard: owned here (ingress forwards it); its SAs are counted
                # in this worker's own report
                self._load_seq += 1
                await self.runtime.publish(
                    subjects.IKE_LOAD,
                    IkeLoad(self.runtime.instance, shard, self._load_seq, 0, 0, LOAD_INTERVAL),
                )
        except Exception as exc:  # the next round tries again
            self.runtime.counters["load_publish_failed"] += 1
            self.log.debug("load_publish_failed", error=type(exc).__name__)

    async def on_show(self, request: IkeShowRequest, msg: Msg) -> None:
        now = time.monotonic()
        rows = [ike_sa_row(sa, now) for sa in self.engine.sas.values()]
        if msg.reply:
            await msg.respond(envelope.pack_reply(IkeShow(self.runtime.instance, self.shard, rows)))

    async def on_kernel_counters(self, batch: KernelCounters, _msg: Msg) -> None:
        kernel_events.apply_counters(self.engine, batch, time.monotonic(), self.runtime.counters)

    async def on_kernel_expire(self, expire: KernelExpire, _msg: Msg) -> None:
        now = time.monotonic()
        await self.apply(
            kernel_events.apply_expire(self.engine, expire, now, self.runtime.counters)
        )

    async def on_vip_pool_show(self, request: VipPoolShowRequest, msg: Msg) -> None:
        """`show vip-pool [NAME]`: size, used, free and the leases, read from the bucket."""
        pools: list[dict[str, Any]] = []
        leases = self.vip_leases
        for pool in self.engine.policy.pools.values():
            if request.name and pool.name != request.name:
                continue
            rows = await leases.leases(pool) if leases is not None else []
            size = pool.size(4) + pool.size(6)
            used = sum(1 for _address, _record, live in rows if live)
            pools.append(
                {
                    "name": pool.name,
                    "size": size,
                    "used": used,
                    "free": size - used,
                    "leases": [
                        {
                            "address": address,
                            "identity": record.identity if record else "",
                            "since": record.since if record else 0.0,
                            "owner": record.owner if record else 0,
                            "live": live,
                        }
                        for address, record, live in rows
                    ],
                }
            )
        if msg.reply:
            await msg.respond(envelope.pack_reply(VipPoolShow(pools)))

    async def install_start_traps(self) -> None:
        """The traps of `start-action = trap` policies; retried until the kernel service
        (which may start after this worker) has taken each."""
        waiting = start_traps(self.engine)
        delay = 0.5
        while waiting and not self._stopping:
            for trap in list(waiting):
                try:
                    ack = await self.runtime.request(
                        subjects.KERNEL_TRAP_INSTALL,
                        trap_message(trap),
                        KernelAck,
                        timeout=KERNEL_TIMEOUT,
                    )
                except Exception as exc:  # no kernel service (yet): try again later
                    self.runtime.counters["kernel_trap_errors"] += 1
                    self.log.control(
                        "trap_install_retry", reqid=trap.reqid, error=type(exc).__name__
                    )
                    continue
                waiting.remove(trap)  # taken, or refused for good (logged and counted)
                if not ack.ok:
                    self.runtime.counters["kernel_trap_refused"] += 1
                    self.log.control("trap_install_refused", reqid=trap.reqid, error=ack.error)
            if waiting:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def on_kernel_acquire(self, acquire: KernelAcquire, _msg: Msg) -> None:
        """Traffic hit a trap with no child: initiate the child of its reqid, once."""
        result = self.acquires.acquire(self.engine, acquire.reqid, time.monotonic())
        self.runtime.counters[f"acquire.{result.action}"] += 1
        self.log.control(
            "acquire",
            reqid=acquire.reqid,
            action=result.action,
            remote_ts=acquire.remote_ts,
            error=result.outcome.error if result.outcome else "",
        )
        if result.outcome is not None and result.outcome.effects:
            await self.apply(result.outcome.effects)

    async def on_initial_contact(self, notice: InitialContactNotice, _msg: Msg) -> None:
        effects = self.engine.initial_contact(
            notice.local_id, notice.remote_id, notice.keep_ike_unique_id, time.monotonic()
        )
        await self.apply(effects)

    async def on_command(self, command: IkeCommand, msg: Msg) -> None:
        """A manual SA command; initiations (one worker) answer when they are decided."""
        now = time.monotonic()
        parsed = management.Command(
            command.verb, command.target, command.selector, command.value, command.phase
        )
        broadcast = msg.subject == subjects.IKE_COMMAND
        if broadcast and command.verb == "initiate":
            outcome = management.Outcome.failed(
                "initiate goes to one worker (ikefarm.ike.initiate), not to all"
            )
        else:
            outcome = management.execute(self.engine, parsed, now)
        if not outcome.ok:
            self.runtime.counters["command_refused"] += 1
            self.log.control("command_refused", command=parsed.words(), error=outcome.error)
            await self._answer(msg, outcome)
            return
        self.runtime.counters[f"command.{command.verb}"] += 1
        self.log.control("command", command=parsed.words(), count=outcome.count)
        watch = management.watch_for(outcome, parsed)
        future: asyncio.Future[management.Watch] | None = None
        if watch is not None:
            self.watches.add(watch)
            future = asyncio.get_running_loop().create_future()
            self._waiting[id(watch)] = future
        await self.apply(outcome.effects)
        if watch is None or future is None:
            await self._answer(msg, outcome)
            return
        timeout = command.timeout if math.isfinite(command.timeout) else MAX_INITIATE_WAIT
        timeout = min(max(timeout, 0.1), MAX_INITIATE_WAIT)
        self._spawn(self._answer_when_decided(msg, outcome, watch, future, timeout))

    async def _answer_when_decided(
        self,
        msg: Msg,
        outcome: management.Outcome,
        watch: management.Watch,
        future: asyncio.Future[management.Watch],
        timeout: float,
    ) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError:
            self.watches.cancel(watch)
            self._waiting.pop(id(watch), None)
            watch.lines.append(f"no outcome after {timeout:g}s; the negotiation goes on")
            watch.ok = False
        outcome.lines += watch.lines
        outcome.ok = watch.ok
        if not watch.ok:
            outcome.error = watch.lines[-1] if watch.lines else "failed"
        await self._answer(msg, outcome)

    async def _answer(self, msg: Msg, outcome: management.Outcome) -> None:
        if not msg.reply:
            return
        result = IkeCommandResult(
            instance=self.runtime.instance,
            shard=self.shard,
            ok=outcome.ok,
            count=outcome.count,
            lines=outcome.lines,
            error=outcome.error,
            ike_unique_id=outcome.ike_unique_id or 0,
            pending_ike=outcome.pending_ike,
            pending_child=[list(pair) for pair in outcome.pending_child],
        )
        await msg.respond(envelope.pack_reply(result))

    def _observe(self, effects: list[Effect]) -> None:
        """Advance the initiations the CLI waits for; wake the ones that are decided."""
        for watch in self.watches.observe(self.engine, effects, time.monotonic()):
            future = self._waiting.pop(id(watch), None)
            if future is not None and not future.done():
                future.set_result(watch)

    async def run_timers(self) -> None:
        while not self._stopping:
            deadline = self.engine.next_deadline()
            now = time.monotonic()
            delay = TIMER_IDLE if deadline is None else max(0.0, min(TIMER_IDLE, deadline - now))
            self._timer_at = now + delay
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow the cancellation
            # that stops this loop when the wake-up event fires at the same moment
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            self._wake.clear()
            self._timer_at = -math.inf  # the tick's own effects: the next turn looks again
            try:
                await self.apply(self.engine.on_timer(time.monotonic()))
            except Exception as exc:  # a timer failure must not stop the timers
                self.runtime.counters["timer_failed"] += 1
                self.log.control("timer_failed", error=type(exc).__name__)
            # apply() wakes this loop when others' effects bring a deadline before its own;
            # the tick's own are accounted for when the next deadline is computed above
            self._wake.clear()
            await asyncio.sleep(0)

    # -- effects ----------------------------------------------------------------------------

    async def apply(self, effects: list[Effect]) -> None:
        self._observe(effects)
        self._mark_changed(effects)
        counts = (len(self.engine.sas), self.engine.half_open_count, self.engine.established_count)
        if counts != self._last_load:
            self._last_load = counts
            self.half_open_peak = max(self.half_open_peak, counts[1])
            self._load_dirty.set()
        for effect in effects:
            if isinstance(effect, SaEvent) and effect.kind == "ike-established":
                self._handshake_done(effect)
        outcome = outcome_attributes(effects)
        span = trace.get_current_span()
        if outcome and span.is_recording():
            # the exchange span while it handles a datagram; the sends below carry it too
            span.set_attributes(outcome)
            if "ikefarm.drop_reason" in outcome:
                span.set_status(Status(StatusCode.ERROR, outcome["ikefarm.drop_reason"]))
        token = _OUTCOME.set(outcome)
        try:
            await self._apply(effects)
        finally:
            _OUTCOME.reset(token)

    def _mark_changed(self, effects: list[Effect]) -> None:
        """The SAs whose durable state these effects show changed, for the next snapshot."""
        for effect in effects:
            if isinstance(effect, SendDatagram):
                header = parse_header(effect.data)
                if header is not None:
                    self.sa_store.mark(header.spi_i, header.spi_r)
            elif isinstance(effect, SaEvent | InstallChildSa | DeleteChildSa):
                detail = getattr(effect, "detail", None) or {}
                for key in ("spi_i", "spi_r"):
                    with contextlib.suppress(ValueError, TypeError):
                        self.sa_store.mark(bytes.fromhex(str(detail.get(key, ""))))

    def _handshake_done(self, event: SaEvent) -> None:
        """Observe how long the IKE SA took to establish (IKE_SA_INIT to IKE_AUTH)."""
        for key in ("spi_r", "spi_i"):  # the table is by our SPI: SPIr as responder
            try:
                sa = self.engine.sas.get(bytes.fromhex(str(event.detail.get(key, ""))))
            except ValueError:
                continue
            if sa is not None and sa.established_at is not None:
                seconds = sa.established_at - sa.created_at
                self.runtime.latencies.observe(IKE_HANDSHAKE_DURATION, seconds)
                return

    async def _apply(self, effects: list[Effect]) -> None:
        # child SAs go into the kernel before the response that announces them leaves
        installs = [e for e in effects if isinstance(e, InstallChildSa)]
        for effect in installs:
            await self.install_child(effect)
        for effect in effects:
            if isinstance(effect, InstallChildSa):
                continue
            await self.apply_one(effect)
        deadline = self.engine.next_deadline()
        if deadline is not None and deadline < self._timer_at:
            self._wake.set()

    @contextlib.contextmanager
    def _send_span(self, effect: SendDatagram) -> Iterator[None]:
        """A datagram out, in its exchange's trace: a response or a retransmission joins
        it; the first request of an exchange this worker starts (timers, commands) begins
        a trace of its own, linked to the IKE SA's latest exchange and to whatever was
        current (the command that asked for it)."""
        header = parse_header(effect.data)
        if header is None:
            yield
            return
        key = exchange_key(header, received=False)
        known = self.traces.exchange(key)
        links = []
        if known is not None:
            parent = trace.set_span_in_context(NonRecordingSpan(known))
        else:
            parent = otel_context.Context()  # a new trace
            for linked in (
                self.traces.sa(header.spi_i),
                trace.get_current_span().get_span_context(),
            ):
                if linked is not None and linked.is_valid:
                    links.append(Link(linked))
        with tracer().start_as_current_span(
            f"ike.send {exchange_name(header)}",
            context=parent,
            links=links or None,
            kind=SpanKind.PRODUCER,
            attributes=self._exchange_attributes(header, effect.remote.address, known)
            | (_OUTCOME.get() or {}),
        ) as span:
            if known is None:
                self.traces.remember(key, span.get_span_context())
            yield

    async def _send(
        self, effect: SendDatagram | SendKeepalive, data: bytes, nat_keepalive: bool = False
    ) -> None:
        outbound = OutboundDatagram(
            effect.local.address,
            effect.local.port,
            effect.remote.address,
            effect.remote.port,
            data,
            nat_keepalive=nat_keepalive,
        )
        await self.runtime.publish(subjects.INGRESS_SEND, outbound)

    async def apply_one(self, effect: Effect) -> None:
        runtime = self.runtime
        if isinstance(effect, SendDatagram):
            with self._send_span(effect):
                await self._send(effect, effect.data)
        elif isinstance(effect, SendKeepalive):
            # a NAT-keepalive (RFC 3948 2.3) belongs to no exchange: no span
            await self._send(effect, b"\xff", nat_keepalive=True)
        elif isinstance(effect, KeystoreRequest):
            self._spawn(self.ask_keystore(effect))
        elif isinstance(effect, InstallTrap):
            trap = trap_message(effect)
            self._spawn(self._kernel(subjects.KERNEL_TRAP_INSTALL, trap, "trap", effect.reqid))
        elif isinstance(effect, RemoveTrap):
            untrap = TrapRemove(vpn=effect.vpn, name=effect.name, reqid=effect.reqid)
            self._spawn(self._kernel(subjects.KERNEL_TRAP_REMOVE, untrap, "untrap", effect.reqid))
        elif isinstance(effect, DeleteChildSa):
            self._spawn(self.delete_child(effect))
        elif isinstance(effect, UpdateChildSa):
            moved = ChildUpdate(
                unique_id=effect.unique_id,
                ike_unique_id=effect.ike_unique_id,
                reqid=effect.reqid,
                spi_in=effect.spi_in,
                spi_out=effect.spi_out,
                local_address=effect.local.address,
                local_port=effect.local.port,
                remote_address=effect.remote.address,
                remote_port=effect.remote.port,
                udp_encap=effect.udp_encap,
            )
            self._spawn(
                self._kernel(subjects.KERNEL_CHILD_UPDATE, moved, "update", effect.unique_id)
            )
        elif isinstance(effect, LocalVip):
            vip = VipAddress(
                install=effect.install,
                address=effect.address,
                local_address=effect.local_address,
                interface=self.config.ike.global_options.install_vip_on or "",
                ike_unique_id=effect.ike_unique_id,
            )
            self._spawn(self._kernel(subjects.KERNEL_VIP, vip, "vip", effect.ike_unique_id))
        elif isinstance(effect, VipRelease):
            if self.vip_leases is not None:
                self._spawn(self.vip_leases.release(effect))
        elif isinstance(effect, SaEvent):
            if self.accounting is not None:
                self.accounting.observe(effect, self._sa_of_event)
            await runtime.publish(
                subjects.EVENT_IKE_SA if effect.kind.startswith("ike") else subjects.EVENT_CHILD_SA,
                SaEventNotice(
                    effect.kind, effect.ike_unique_id, effect.vpn, runtime.instance, effect.detail
                ),
            )
        elif isinstance(effect, InitialContact):
            await runtime.publish(
                subjects.IKE_INITIAL_CONTACT,
                InitialContactNotice(effect.local_id, effect.remote_id, effect.keep_ike_unique_id),
            )
        elif isinstance(effect, HalfOpen):
            await runtime.publish(
                subjects.INGRESS_INIT_ROUTE,
                InitRoute(
                    effect.spi_i,
                    effect.remote.address,
                    effect.remote.port,
                    self.shard,
                    effect.lifetime,
                ),
            )
        elif isinstance(effect, PeerFailed):
            await runtime.publish(
                subjects.INGRESS_BACKOFF,
                PeerBackoff(effect.address, effect.phase, effect.seconds),
            )
        elif isinstance(effect, Log):
            get_logger(effect.subsystem).at(effect.level, effect.event, **effect.fields)

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def ask_keystore(self, effect: KeystoreRequest) -> None:
        reply: KeystoreAnswer | None = None
        error: str | None = None
        call = effect.request
        try:
            if isinstance(call, PpkMix):  # RFC 8784: keys travel sealed, the PPK stays
                reply = await self.ppk_client.mix(call)
            elif isinstance(call, VipLease):  # not the keystore: the farm's lease bucket
                if self.vip_leases is None:
                    raise RuntimeError("no vip pools")
                leased = await asyncio.wait_for(self.vip_leases.lease(call), KEYSTORE_TIMEOUT * 5)
                if effect.request_id not in self.engine.keystore_waits:
                    # the SA went away meanwhile: nobody holds what was just leased
                    await self.vip_leases.release(VipRelease(call.ike_unique_id, leased.addresses))
                    return
                reply = leased
            elif isinstance(call, CertAuthRequest):
                reply = await self.runtime.request(
                    subjects.KEYSTORE_CERT_AUTH,
                    call,
                    CertAuthReply,
                    timeout=KEYSTORE_TIMEOUT,
                    retry_for=KEYSTORE_RETRY,
                    idempotent=True,
                )
            elif isinstance(call, EapRelayRequest):  # the keystore waits on RADIUS meanwhile
                reply = await self.runtime.request(
                    subjects.KEYSTORE_EAP_RELAY, call, EapRelayReply, timeout=self.radius_wait
                )
            elif isinstance(call, EapAuthRequest):
                reply = await self.runtime.request(
                    subjects.KEYSTORE_EAP_AUTH, call, PskAuthReply, timeout=KEYSTORE_TIMEOUT
                )
            else:
                reply = await self.runtime.request(
                    subjects.KEYSTORE_PSK_AUTH,
                    call,
                    PskAuthReply,
                    timeout=KEYSTORE_TIMEOUT,
                    retry_for=KEYSTORE_RETRY,
                    idempotent=True,
                )
        except Exception as exc:
            error = type(exc).__name__
            self.runtime.counters["keystore_errors"] += 1
        await self.apply(
            self.engine.keystore_reply(effect.request_id, reply, time.monotonic(), error=error)
        )

    def _sa_of_event(self, event: SaEvent) -> IkeSa | None:
        """The SA an established/rekeyed event names, by its SPIs (no walk over the SAs)."""
        for spi in ("spi_r", "spi_i"):
            text = event.detail.get(spi)
            if not isinstance(text, str):
                continue
            try:
                sa = self.engine.sas.get(bytes.fromhex(text))
            except ValueError:
                continue
            if sa is not None and sa.unique_id == event.ike_unique_id:
                return sa
        return None

    async def _send_accounting(self, message: RadiusAccounting) -> None:
        try:
            reply = await self.runtime.request(
                subjects.KEYSTORE_RADIUS_ACCOUNTING,
                message,
                RadiusAccountingReply,
                timeout=self.radius_wait,
            )
        except Exception as exc:
            self.runtime.counters["radius_accounting.errors"] += 1
            get_logger("ike").control(
                "radius_accounting_failed", status=message.status, error=type(exc).__name__
            )
            return
        if not reply.sent:
            self.runtime.counters["radius_accounting.unanswered"] += 1

    async def install_child(self, effect: InstallChildSa) -> None:
        child = effect.child
        message = ChildInstall(
            unique_id=child.unique_id,
            ike_unique_id=child.ike_unique_id,
            name=child.name,
            vpn=child.vpn,
            reqid=child.reqid,
            protocol=child.protocol,
            mode=child.mode,
            local_address=child.local.address,
            local_port=child.local.port,
            remote_address=child.remote.address,
            remote_port=child.remote.port,
            spi_in=child.spi_in,
            spi_out=child.spi_out,
            encr_id=child.encr_id,
            encr_key_bits=child.encr_key_bits,
            integ_id=child.integ_id,
            esn=child.esn,
            replay_window=child.replay_window,
            udp_encap=child.udp_encap,
            local_ts=list(child.local_ts),
            remote_ts=list(child.remote_ts),
        )
        keys = ChildKeys(
            child.encr_key_in, child.encr_key_out, child.integ_key_in, child.integ_key_out
        )
        # the keys go sealed to the kernel service's transport key (never in clear on the
        # bus); a kernel service restarted since has another key: fetch it, seal again, once
        for attempt in (1, 2):
            try:
                public = await self.kernel_key.get()
            except Exception as exc:
                self.runtime.counters["kernel_install_errors"] += 1
                get_logger("kernel").control(
                    "child_install_failed", unique_id=child.unique_id, error=type(exc).__name__
                )
                return
            ephemeral, sealed = self.child_sealer.seal(
                public, child.spi_in, child.spi_out, keys, time.monotonic()
            )
            sealed_message = replace(message, ephemeral=ephemeral, sealed_keys=sealed)
            error = await self._kernel(
                subjects.KERNEL_CHILD_INSTALL, sealed_message, "install", child.unique_id
            )
            if error != SEALED_KEYS_REFUSED or attempt == 2:
                return
            self.kernel_key.forget()
            self.child_sealer.forget()

    async def delete_child(self, effect: DeleteChildSa) -> None:
        message = ChildDelete(
            effect.unique_id,
            effect.reqid,
            effect.spi_in,
            effect.spi_out,
            effect.local.address,
            effect.remote.address,
        )
        await self._kernel(subjects.KERNEL_CHILD_DELETE, message, "delete", effect.unique_id)

    async def _kernel(self, subject: str, message: Any, what: str, unique_id: int) -> str | None:
        """None when the kernel service took it, else the error (logged and counted)."""
        try:
            ack = await self.runtime.request(subject, message, KernelAck, timeout=KERNEL_TIMEOUT)
        except Exception as exc:
            self.runtime.counters[f"kernel_{what}_errors"] += 1
            get_logger("kernel").control(
                f"child_{what}_failed", unique_id=unique_id, error=type(exc).__name__
            )
            return type(exc).__name__
        if not ack.ok:
            self.runtime.counters[f"kernel_{what}_refused"] += 1
            get_logger("kernel").control(
                f"child_{what}_refused", unique_id=unique_id, error=ack.error
            )
            return ack.error
        return None
