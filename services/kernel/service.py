"""Kernel: programs child SAs, policies, traps and routes through the chosen backend.

Backends (`[kernel] backend`, backends.py): `netlink` (Linux XFRM and routes
through pyroute2, netlink.py), `userspace` (userspace.py, the ESP dataplane of
docs/esp-dataplane.md, for kernels without ESP), `auto` (netlink when the kernel
takes an ESP state, else userspace: probed once at start and logged at level 1
with the reason) and `memory` (a test double: SAD/SPD in a dict, no packet
protected).

Endpoints (request/reply): `subjects.KERNEL_CHILD_INSTALL` (ChildInstall ->
KernelAck), `subjects.KERNEL_CHILD_DELETE` (ChildDelete -> KernelAck),
`subjects.KERNEL_CHILD_UPDATE` (ChildUpdate -> KernelAck: MOBIKE moved the child) and
`subjects.KERNEL_SHOW` (KernelShowRequest -> KernelState, never key material),
`subjects.KERNEL_TRAP_INSTALL` (TrapInstall -> KernelAck),
`subjects.KERNEL_TRAP_REMOVE` (TrapRemove -> KernelAck) and
`subjects.KERNEL_TRANSPORT_KEY` (TransportKeyRequest -> TransportKeyReply).

Install requests carry the child SA keys sealed to this service's transport key
(`shared/bus/child_keys.py`), an X25519 key made at start and kept in memory
only; a request with keys in clear is refused. Nothing here logs or returns a key.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import ipaddress
import time
from dataclasses import replace
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from ikefarm.proto import subjects
from ikefarm.proto.envelope import BusError
from ikefarm.proto.messages import (
    ChildDelete,
    ChildInstall,
    ChildUpdate,
    FlowVerdicts,
    KernelAck,
    KernelAcquire,
    KernelBackend,
    KernelBackendRequest,
    KernelCounters,
    KernelExpire,
    KernelFlush,
    KernelFlushResult,
    KernelShowRequest,
    KernelState,
    LocalAddresses,
    RouteSourceReply,
    RouteSourceRequest,
    SaEventNotice,
    TransportKeyReply,
    TransportKeyRequest,
    TrapInstall,
    TrapRemove,
    VipAddress,
)
from ikefarm.services.kernel import backends, counters
from ikefarm.services.kernel.addresses import AddressWatch
from ikefarm.services.kernel.dataplane import Trap, Tunnel, packet_addresses
from ikefarm.services.kernel.flows import PROMPT, FlowCache
from ikefarm.services.kernel.memory import (
    InvalidChild,
    KernelRefusal,
    MemoryKernel,
    check_flush,
    check_install,
    check_update,
)
from ikefarm.services.kernel.userspace import UserspaceKernel
from ikefarm.services.kernel.vips import VipAddresses
from ikefarm.shared.bus.child_keys import SEALED_KEYS_REFUSED, ChildKeyOpener
from ikefarm.shared.bus.runtime import Runtime, ServiceBase, ServiceUnavailable
from ikefarm.shared.bus.sealed import SealError, public_bytes
from ikefarm.shared.config.loader import Config, userspace_backend_problems
from ikefarm.shared.esp import LifetimeEvent
from ikefarm.shared.flow.settings import FlowSettings
from ikefarm.shared.ikev2.policy import engine_policy


def flows_clock() -> float:
    return time.monotonic()


ACQUIRE_SWEEP = 1.0  # s between looks for ACQUIREs past acquire-timeout


async def _settle(result: Any) -> Any:
    """A backend answers directly (memory) or with an awaitable (netlink, userspace)."""
    return await result if inspect.isawaitable(result) else result


class BackendNotAvailable(ServiceUnavailable):
    """The configured kernel backend cannot run here; the process exits with this text."""


class KernelService(ServiceBase):
    name = "kernel"
    subsystem = "kernel"
    description = "ikefarm kernel: SAD/SPD, routes, VIPs"

    def __init__(self, runtime: Runtime) -> None:
        super().__init__(runtime)
        self.backend: Any = None
        self.choice: backends.Choice | None = None
        self.events: Any = None  # the backend's ACQUIRE/EXPIRE source, if it has one
        self._publishing: set[asyncio.Task[None]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._counters_task: asyncio.Task[None] | None = None
        self.counters_interval = counters.MAX_INTERVAL
        self._acquire_sweeper: asyncio.Task[None] | None = None  # userspace backend only
        self.flows: FlowCache | None = None  # the dataplane's flow cache ([flow] source)
        self._flow_task: asyncio.Task[None] | None = None
        # child SA keys are sealed to this key; it lives in this process's memory only
        self._transport = X25519PrivateKey.generate()
        self._opener = ChildKeyOpener(self._transport)

    def __repr__(self) -> str:
        return f"KernelService(backend={self.backend!r})"

    @classmethod
    def preflight(cls, config: Config) -> backends.Choice:
        try:
            choice = backends.choose(config.kernel.backend)
        except backends.BackendUnavailable as exc:
            raise BackendNotAvailable(str(exc)) from None
        # the configuration check refuses these for an explicit "userspace" already; `auto`
        # learns only here that it runs the userspace dataplane
        refused = userspace_backend_problems(config, choice.backend)
        if refused:
            raise BackendNotAvailable("; ".join(f"{p.path}: {p.message}" for p in refused))
        return choice

    def _make_backend(self, choice: backends.Choice) -> Any:
        if choice.backend == "memory":
            return MemoryKernel()
        if choice.backend == "netlink":
            from ikefarm.services.kernel.netlink import NetlinkKernel

            try:
                return NetlinkKernel.from_config(self.config)
            except (KernelRefusal, OSError) as exc:
                raise BackendNotAvailable(f"netlink backend: {exc}") from None
        options = self.config.ike.global_options
        if self.config.flow.source == "dataplane":
            # docs/flow-sessions.md: this dataplane feeds the flow service's table
            self.flows = FlowCache(
                FlowSettings.from_config(self.config.flow),
                self.runtime.instance,
                self.runtime.counters,
            )
        return UserspaceKernel(
            self.runtime.counters,
            natt_port=int(self.config.ingress.natt_port),
            routing_table=int(options.routing_table),
            routing_table_prio=int(options.routing_table_prio),
            acquire_timeout=float(options.acquire_timeout),
            flows=self.flows,
        )

    async def _start_userspace(self, backend: UserspaceKernel) -> None:
        try:
            await backend.start()
        except Exception as exc:  # OSError, or pyroute2's NetlinkError
            with contextlib.suppress(Exception):
                await backend.stop()
            raise BackendNotAvailable(
                f"userspace backend cannot set up its TUN device and routes: {exc}"
                " (needs CAP_NET_ADMIN and /dev/net/tun)"
            ) from None
        backend.dataplane.on_lifetime = self.on_lifetime
        backend.dataplane.on_acquire = self.on_dataplane_acquire
        self._acquire_sweeper = asyncio.create_task(self._sweep_acquires(backend))

    async def _sweep_acquires(self, backend: UserspaceKernel) -> None:
        """Queued packets of an ACQUIRE that got no child within acquire-timeout are dropped
        (counted `esp.out.drop.acquire_timeout`), also when no further packet comes."""
        while True:
            await asyncio.sleep(ACQUIRE_SWEEP)
            backend.dataplane.expire_acquires()

    async def setup(self) -> None:
        self.choice = self.preflight(self.config)
        self.backend = self._make_backend(self.choice)
        if isinstance(self.backend, UserspaceKernel):
            await self._start_userspace(self.backend)
        await self.runtime.add_endpoint(
            "transport-key",
            TransportKeyRequest,
            self.on_transport_key,
            subject=subjects.KERNEL_TRANSPORT_KEY,
        )
        await self.runtime.add_endpoint(
            "child-install", ChildInstall, self.on_install, subject=subjects.KERNEL_CHILD_INSTALL
        )
        await self.runtime.add_endpoint(
            "child-delete", ChildDelete, self.on_delete, subject=subjects.KERNEL_CHILD_DELETE
        )
        await self.runtime.add_endpoint(
            "child-update", ChildUpdate, self.on_update, subject=subjects.KERNEL_CHILD_UPDATE
        )
        await self.runtime.add_endpoint(
            "show", KernelShowRequest, self.on_show, subject=subjects.KERNEL_SHOW
        )
        await self.runtime.add_endpoint(
            "flush", KernelFlush, self.on_flush, subject=subjects.KERNEL_FLUSH
        )
        await self.runtime.add_endpoint(
            "trap-install", TrapInstall, self.on_trap_install, subject=subjects.KERNEL_TRAP_INSTALL
        )
        await self.runtime.add_endpoint(
            "trap-remove", TrapRemove, self.on_trap_remove, subject=subjects.KERNEL_TRAP_REMOVE
        )
        # VIPs we were assigned: on a host interface, except with the memory test double
        self.vips = VipAddresses(touch_kernel=self.choice.backend != "memory")
        await self.runtime.add_endpoint("vip", VipAddress, self.on_vip, subject=subjects.KERNEL_VIP)
        # MOBIKE as initiator: our addresses, watched while some VPN has mobike on
        self.addresses: AddressWatch | None = None
        if any(vpn.mobike for vpn in engine_policy(self.config).vpns):
            self.addresses = AddressWatch(self._addresses_changed)
            self.addresses.start()
        await self.runtime.add_endpoint(
            "route-source",
            RouteSourceRequest,
            self.on_route_source,
            subject=subjects.KERNEL_ROUTE_SOURCE,
        )
        if self.flows is not None:
            await self.runtime.subscribe(
                subjects.KERNEL_FLOW_VERDICTS, FlowVerdicts, self.on_flow_verdicts
            )
            self._flow_task = asyncio.create_task(self._flow_batches(), name="flow-batches")
        self.log.control("kernel_backend", backend=self.backend.name, reason=self.choice.reason)
        for warning in getattr(self.backend, "warnings", ()):
            self.log.control("kernel_backend_warning", backend=self.backend.name, warning=warning)
        if hasattr(self.backend, "open_events"):
            self.events = self.backend.open_events()
            asyncio.get_running_loop().add_reader(self.events.fileno(), self._on_events)
        self.counters_interval = counters.batch_interval(self.config)
        self._counters_task = asyncio.get_running_loop().create_task(self._publish_counters())
        # ingress sets UDP_ENCAP on its NAT-T sockets only when the kernel decapsulates
        # (netlink): an ingress that runs already hears this event, a later one asks
        await self.runtime.add_endpoint(
            "backend", KernelBackendRequest, self.on_backend, subject=subjects.KERNEL_BACKEND
        )
        await self.runtime.publish(
            subjects.EVENT_KERNEL_BACKEND, KernelBackend(self.choice.backend)
        )

    async def _publish_counters(self) -> None:
        """Every `counters_interval`: the children whose counters moved, batched, to the ike
        workers (docs/kernel-counters.md)."""
        while True:
            await asyncio.sleep(self.counters_interval)
            try:
                await self.publish_counters()
            except Exception as exc:  # a failed batch must not stop the next ones
                self.runtime.counters["counters.failed"] += 1
                self.log.control("counters_failed", error=type(exc).__name__)

    async def publish_counters(self) -> int:
        """Publish one round of batches now; the number of children reported."""
        moved = self.backend.moved_counters()
        for batch in counters.batches(moved):
            message = KernelCounters(
                self.backend.name, self.runtime.instance, self.counters_interval, batch
            )
            await self.runtime.publish(subjects.IKE_KERNEL_COUNTERS, message)
            self.runtime.counters["counters.batches"] += 1
        self.runtime.counters["counters.children"] += len(moved)
        return len(moved)

    def _on_events(self) -> None:
        """Kernel ACQUIRE/EXPIRE notifications -> bus events (one publish per event)."""
        for event in self.events.read():
            message = self.backend.event_message(event)
            if isinstance(message, KernelAcquire):
                subject = subjects.EVENT_KERNEL_ACQUIRE
                self.runtime.counters["event.acquire"] += 1
                self.log.control("kernel_acquire", reqid=message.reqid, remote_ts=message.remote_ts)
            else:
                subject = subjects.EVENT_KERNEL_EXPIRE
                kind = "hard" if message.hard else "soft"
                self.runtime.counters[f"event.expire_{kind}"] += 1
                self.log.control(
                    "kernel_expire", kind=kind, spi=message.spi.hex(), unique_id=message.unique_id
                )
            self._publish_event(subject, message)

    def _publish_event(self, subject: str, message: Any) -> None:
        task = asyncio.ensure_future(self.runtime.publish(subject, message))
        self._publishing.add(task)
        task.add_done_callback(self._publishing.discard)

    def on_dataplane_acquire(self, trap: Trap, packet: bytes) -> None:
        """The userspace dataplane queued a packet for a trap with no child: ACQUIRE (once per
        trap per acquire-timeout, the dataplane's own rule)."""
        source, destination = packet_addresses(packet)
        message = KernelAcquire(
            backend=self._backend().name,
            reqid=trap.reqid,
            local_address=trap.local_address,
            remote_address=trap.remote_address,
            local_ts=source,
            remote_ts=destination,
        )
        self.runtime.counters["event.acquire"] += 1
        self.log.control("kernel_acquire", reqid=trap.reqid, remote_ts=destination)
        self._publish_event(subjects.EVENT_KERNEL_ACQUIRE, message)

    async def _addresses_changed(
        self, present: list[str], added: list[str], gone: list[str]
    ) -> None:
        self.runtime.counters["addresses.changed"] += 1
        self.log.control("local_addresses_changed", added=added, gone=gone)
        await self.runtime.publish(
            subjects.EVENT_KERNEL_ADDRESSES, LocalAddresses(present, added, gone)
        )

    async def on_route_source(self, request: RouteSourceRequest, _msg: Any) -> RouteSourceReply:
        """The source address the routing table picks toward a peer ("" without a watch)."""
        try:
            ipaddress.ip_address(request.remote)
        except ValueError:
            self.runtime.counters["route_source.invalid"] += 1
            raise BusError("bad_field", "RouteSourceRequest: remote is not an address") from None
        if self.addresses is None:
            return RouteSourceReply("")
        return RouteSourceReply(await self.addresses.source_toward(request.remote))

    async def teardown(self) -> None:
        addresses = getattr(self, "addresses", None)
        if addresses is not None:
            await addresses.stop()
        if self._counters_task is not None:
            self._counters_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._counters_task
            self._counters_task = None
        vips = getattr(self, "vips", None)
        if vips is not None:
            vips.close()
        if self._flow_task is not None:
            self._flow_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flow_task
            self._flow_task = None
        if self.events is not None:
            asyncio.get_running_loop().remove_reader(self.events.fileno())
            self.events.close()
            self.events = None
        if isinstance(self.backend, UserspaceKernel):
            if self._acquire_sweeper is not None:
                self._acquire_sweeper.cancel()
            await self.backend.stop()
            return
        close = getattr(self.backend, "close", None)
        if close is not None:
            await _settle(close())

    def gauges(self) -> dict[str, Any]:
        if self.backend is None:
            return {}
        return {
            "backend": self.backend.name,
            "children": self.backend.child_count,
            "sas": len(self.backend.sad),
            "policies": self.backend.policy_count,
            "traps": len(self.backend.traps),
            "events_malformed": self.events.malformed if self.events is not None else 0,
            "events_overruns": self.events.overruns if self.events is not None else 0,
            **(
                {"tunnels": len(self.backend.dataplane)}
                if isinstance(self.backend, UserspaceKernel)
                else {}
            ),
        }

    def _backend(self) -> Any:
        assert self.backend is not None
        return self.backend

    def _refused(self, action: str, exc: KernelRefusal, **fields: Any) -> KernelAck:
        """Count a refusal by its code, log it (no key material in `fields`), answer it."""
        self.runtime.counters[f"{action}.{exc.code}"] += 1
        self.log.control(f"{action}_refused", backend=self.backend.name, error=exc.text, **fields)
        return KernelAck(ok=False, error=exc.text)

    async def _apply_routes(self) -> None:
        """The userspace backend's routes to its TUN device, after an install or delete."""
        if not isinstance(self.backend, UserspaceKernel):
            return
        try:
            await self.backend.apply_routes()
        except Exception as exc:  # the SAs stand; traffic finds no route until the next change
            self.runtime.counters["routes_failed"] += 1
            self.log.control("routes_failed", backend=self.backend.name, error=str(exc))

    async def on_backend(self, _request: KernelBackendRequest, _msg: Any) -> KernelBackend:
        assert self.choice is not None
        return KernelBackend(self.choice.backend)

    async def on_transport_key(self, _request: TransportKeyRequest, _msg: Any) -> TransportKeyReply:
        return TransportKeyReply(public_key=public_bytes(self._transport))

    def _opened(self, request: ChildInstall) -> ChildInstall:
        """The request with its sealed keys opened into the key fields, for the backend."""
        if any(
            (request.encr_key_in, request.encr_key_out, request.integ_key_in, request.integ_key_out)
        ):
            self.runtime.counters["child_install.keys_in_clear"] += 1
            raise BusError("bad_field", "ChildInstall: keys must be sealed, not in clear")
        keys = self._opener.open(
            request.ephemeral,
            request.sealed_keys,
            request.spi_in,
            request.spi_out,
        )
        return replace(
            request,
            ephemeral=b"",
            sealed_keys=b"",
            encr_key_in=keys.encr_key_in,
            encr_key_out=keys.encr_key_out,
            integ_key_in=keys.integ_key_in,
            integ_key_out=keys.integ_key_out,
        )

    async def on_install(self, request: ChildInstall, _msg: Any) -> KernelAck:
        backend = self._backend()
        try:
            check_install(request)  # the fields first: a bad message is a bad message
            opened = self._opened(request)
        except InvalidChild as exc:
            self.runtime.counters["child_install.invalid"] += 1
            raise BusError("bad_field", f"ChildInstall: {exc}") from None
        except SealError:
            self.runtime.counters["child_install.sealed_keys"] += 1
            self.log.control(
                "child_install_refused",
                backend=backend.name,
                unique_id=request.unique_id,
                spi_in=request.spi_in.hex(),
                error=SEALED_KEYS_REFUSED,
            )
            return KernelAck(ok=False, error=SEALED_KEYS_REFUSED)
        try:
            sa_in, sa_out = await _settle(backend.install(opened))
        except InvalidChild as exc:
            self.runtime.counters["child_install.invalid"] += 1
            raise BusError("bad_field", f"ChildInstall: {exc}") from None
        except KernelRefusal as exc:
            return self._refused(
                "child_install",
                exc,
                unique_id=request.unique_id,
                reqid=request.reqid,
                spi_in=request.spi_in.hex(),
                spi_out=request.spi_out.hex(),
            )
        await self._apply_routes()
        self.runtime.counters["child_install.ok"] += 1
        self.log.control(
            "child_installed",
            backend=backend.name,
            unique_id=request.unique_id,
            ike_unique_id=request.ike_unique_id,
            child=request.name,
            vpn=request.vpn,
            reqid=request.reqid,
            mode=request.mode,
            spi_in=sa_in.spi.hex(),
            spi_out=sa_out.spi.hex(),
            local=f"{sa_out.src}[{sa_out.src_port}]",
            remote=f"{sa_out.dst}[{sa_out.dst_port}]",
            encap=request.udp_encap,
            local_ts=list(request.local_ts),
            remote_ts=list(request.remote_ts),
        )
        return KernelAck(ok=True)

    async def on_delete(self, request: ChildDelete, _msg: Any) -> KernelAck:
        backend = self._backend()
        try:
            child = await _settle(backend.delete(request))
        except KernelRefusal as exc:
            self.runtime.counters[f"child_delete.{exc.code}"] += 1
            self.log.control(
                "child_delete_refused",
                backend=backend.name,
                unique_id=request.unique_id,
                reqid=request.reqid,
                spi_in=request.spi_in.hex(),
                error=exc.text,
            )
            return KernelAck(ok=False, error=exc.text)
        await self._apply_routes()
        self.runtime.counters["child_delete.ok"] += 1
        self.log.control(
            "child_deleted",
            backend=backend.name,
            unique_id=child.unique_id,
            child=child.name,
            vpn=child.vpn,
            reqid=child.reqid,
            spi_in=request.spi_in.hex(),
            spi_out=request.spi_out.hex(),
            reason=request.reason[:64] or "ike",
        )
        return KernelAck(ok=True)

    async def on_update(self, request: ChildUpdate, _msg: Any) -> KernelAck:
        """MOBIKE moved the child's IKE SA: its SAs follow to the new endpoints (RFC 4555)."""
        backend = self._backend()
        try:
            check_update(request)
            sa_in, sa_out = await _settle(backend.update(request))
        except InvalidChild as exc:
            self.runtime.counters["child_update.invalid"] += 1
            raise BusError("bad_field", f"ChildUpdate: {exc}") from None
        except KernelRefusal as exc:
            return self._refused(
                "child_update",
                exc,
                unique_id=request.unique_id,
                spi_in=request.spi_in.hex(),
                spi_out=request.spi_out.hex(),
            )
        self.runtime.counters["child_update.ok"] += 1
        self.log.control(
            "child_moved",
            backend=backend.name,
            unique_id=request.unique_id,
            ike_unique_id=request.ike_unique_id,
            spi_in=sa_in.spi.hex(),
            spi_out=sa_out.spi.hex(),
            local=f"{sa_out.src}[{sa_out.src_port}]",
            remote=f"{sa_out.dst}[{sa_out.dst_port}]",
            encap=request.udp_encap,
        )
        return KernelAck(ok=True)

    async def on_show(self, _request: KernelShowRequest, _msg: Any) -> KernelState:
        backend = self._backend()
        sas, policies = backend.show()
        return KernelState(
            backend=backend.name,
            sas=sas,
            policies=policies,
            traps=backend.show_traps(),
            vips=self.vips.show(),
        )

    async def on_flush(self, request: KernelFlush, _msg: Any) -> KernelFlushResult:
        """Remove the installed children `request` names; each owner hears a hard EXPIRE and
        deletes its child with the peer (docs/kernel-counters.md)."""
        try:
            check_flush(request)
        except InvalidChild as exc:
            self.runtime.counters["flush.invalid"] += 1
            raise BusError("bad_field", f"KernelFlush: {exc}") from None
        backend = self._backend()
        removed: list[int] = []
        for delete in backend.children_matching(request.selector, request.value):
            try:
                await _settle(backend.delete(delete))
            except KernelRefusal as exc:
                self.runtime.counters[f"flush.{exc.code}"] += 1
                continue
            removed.append(delete.unique_id)
            self.log.control(
                "child_flushed",
                backend=backend.name,
                unique_id=delete.unique_id,
                reqid=delete.reqid,
                spi_in=delete.spi_in.hex(),
                spi_out=delete.spi_out.hex(),
            )
            expire = KernelExpire(
                backend=backend.name,
                hard=True,
                unique_id=delete.unique_id,
                reqid=delete.reqid,
                direction="in",
                spi=delete.spi_in,
                src=delete.remote_address,
                dst=delete.local_address,
                bytes=0,
                packets=0,
            )
            await self.runtime.publish(subjects.EVENT_KERNEL_EXPIRE, expire)
        await self._apply_routes()
        self.runtime.counters["flush.children"] += len(removed)
        return KernelFlushResult(removed=removed)

    async def on_trap_install(self, request: TrapInstall, _msg: Any) -> KernelAck:
        backend = self._backend()
        try:
            trap, replaced = await _settle(backend.install_trap(request))
        except InvalidChild as exc:
            self.runtime.counters["trap_install.invalid"] += 1
            raise BusError("bad_field", f"TrapInstall: {exc}") from None
        except KernelRefusal as exc:
            return self._refused("trap_install", exc, vpn=request.vpn, reqid=request.reqid)
        await self._apply_routes()
        self.runtime.counters["trap_install.ok"] += 1
        self.log.control(
            "trap_installed",
            backend=backend.name,
            vpn=trap.vpn,
            child=trap.name,
            reqid=trap.reqid,
            replaced=replaced,
            local_ts=list(trap.local_ts),
            remote_ts=list(trap.remote_ts),
        )
        return KernelAck(ok=True)

    async def on_vip(self, request: VipAddress, _msg: Any) -> KernelAck:
        """Install or remove a VIP the peer assigned us (install-vip-on, seed 004)."""
        try:
            await self.vips.apply(request)
        except KernelRefusal as exc:
            return self._refused("vip", exc, address=request.address, install=request.install)
        action = "installed" if request.install else "removed"
        self.runtime.counters[f"vip.{action}"] += 1
        self.log.control(
            f"vip_{action}",
            address=request.address,
            interface=request.interface or f"of {request.local_address}",
            ike_unique_id=request.ike_unique_id,
        )
        return KernelAck(ok=True)

    async def on_trap_remove(self, request: TrapRemove, _msg: Any) -> KernelAck:
        backend = self._backend()
        try:
            trap = await _settle(backend.remove_trap(request))
        except KernelRefusal as exc:
            self.runtime.counters[f"trap_remove.{exc.code}"] += 1
            return KernelAck(ok=False, error=exc.text)
        await self._apply_routes()
        self.runtime.counters["trap_remove.ok"] += 1
        self.log.control("trap_removed", backend=backend.name, vpn=trap.vpn, reqid=trap.reqid)
        return KernelAck(ok=True)

    # -- flow sessions (docs/flow-sessions.md) -----------------------------------------------

    async def _flow_batches(self) -> None:
        """The flow cache's batches to the flow service, and its bounded sweep: a few small
        messages per second at most, whatever the packet rate."""
        flows = self.flows
        assert flows is not None
        while True:
            try:
                now = flows_clock()
                for batch in flows.batches(now):
                    await self.runtime.publish(subjects.FLOW_EVENTS, batch)
                    self.runtime.counters["flow.batches"] += 1
                flows.sweep(now)
            except Exception as exc:  # a failed publish must not end the batching for good
                self.runtime.counters["flow.batch_failed"] += 1
                self.log.control("flow_batch_failed", error=type(exc).__name__)
            await asyncio.sleep(PROMPT)

    async def on_flow_verdicts(self, message: FlowVerdicts, _msg: Any) -> None:
        """Flows the flow service closed or refused, and whether its table is full."""
        assert self.flows is not None
        try:
            self.flows.verdicts(message, flows_clock())
        except ValueError as exc:
            self.runtime.counters["flow.verdicts_dropped"] += 1
            self.log.control("flow_verdicts_dropped", reason=str(exc))

    def on_lifetime(self, tunnel: Tunnel, event: LifetimeEvent) -> None:
        """A byte/packet lifetime of a dataplane SA reached: logged and published, once."""
        self.log.control(
            "child_sa_lifetime",
            unique_id=tunnel.unique_id,
            spi=f"{event.spi:08x}",
            direction=event.direction,
            kind=event.kind,
            limit=event.limit,
        )
        notice = SaEventNotice(
            f"child_sa_lifetime_{event.kind}",
            0,
            None,
            self.runtime.instance,
            {
                "unique_id": tunnel.unique_id,
                "spi": f"{event.spi:08x}",
                "direction": event.direction,
                "limit": event.limit,
            },
        )
        # the same contract as the netlink backend's EXPIRE: the owning ike worker rekeys
        # (soft) or deletes (hard) the child
        expire = KernelExpire(
            backend=self.backend.name,
            hard=event.kind == "hard",
            unique_id=tunnel.unique_id,
            reqid=0,
            direction=event.direction,
            spi=event.spi.to_bytes(4, "big"),
            src=tunnel.remote_address if event.direction == "in" else tunnel.local_address,
            dst=tunnel.local_address if event.direction == "in" else tunnel.remote_address,
            bytes=_sa(tunnel, event.direction).counters.bytes,
            packets=_sa(tunnel, event.direction).counters.packets,
        )
        self.runtime.counters[f"event.expire_{event.kind}"] += 1
        loop = asyncio.get_running_loop()
        for subject, message in (
            (subjects.EVENT_CHILD_SA, notice),
            (subjects.EVENT_KERNEL_EXPIRE, expire),
        ):
            task = loop.create_task(self.runtime.publish(subject, message))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)


def _sa(tunnel: Tunnel, direction: str) -> Any:
    return tunnel.inbound if direction == "in" else tunnel.outbound
