"""Kernel: programs child SAs and policies (a userspace ESP dataplane, or in memory).

Endpoints (request/reply): `subjects.KERNEL_CHILD_INSTALL` (ChildInstall ->
KernelAck), `subjects.KERNEL_CHILD_DELETE` (ChildDelete -> KernelAck) and
`subjects.KERNEL_SHOW` (KernelShowRequest -> KernelState, never key material),
`subjects.KERNEL_TRAP_INSTALL` (TrapInstall -> KernelAck),
`subjects.KERNEL_TRAP_REMOVE` (TrapRemove -> KernelAck) and
`subjects.KERNEL_TRANSPORT_KEY` (TransportKeyRequest -> TransportKeyReply).

Install requests carry the child SA keys sealed to this service's transport key
(`shared/bus/child_keys.py`), an X25519 key made at start and kept in memory
only; a request with keys in clear is refused. Nothing here logs or returns a key.

Backends (`[kernel] backend`): `memory` (a test double: SAD/SPD in a dict, no
packet protected) and `userspace` (`userspace.py`, the ESP dataplane of
docs/esp-dataplane.md).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import replace
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from ikefarm.proto import subjects
from ikefarm.proto.envelope import BusError
from ikefarm.proto.messages import (
    ChildDelete,
    ChildInstall,
    KernelAck,
    KernelShowRequest,
    KernelState,
    SaEventNotice,
    TransportKeyReply,
    TransportKeyRequest,
    TrapInstall,
    TrapRemove,
)
from ikefarm.services.kernel.dataplane import Tunnel
from ikefarm.services.kernel.memory import (
    InvalidChild,
    KernelRefusal,
    MemoryKernel,
    check_install,
)
from ikefarm.services.kernel.userspace import UserspaceKernel
from ikefarm.shared.bus.child_keys import SEALED_KEYS_REFUSED, open_child_keys
from ikefarm.shared.bus.runtime import Runtime, ServiceBase, ServiceUnavailable
from ikefarm.shared.bus.sealed import SealError, public_bytes
from ikefarm.shared.config.loader import Config, userspace_backend_problems
from ikefarm.shared.esp import LifetimeEvent

NETLINK_NOT_IMPLEMENTED = (
    'netlink backend not implemented yet; use backend = "memory" '
    "([kernel] backend; XFRM programming through pyroute2 comes with a later issue)"
)


class BackendNotAvailable(ServiceUnavailable):
    """The configured kernel backend cannot run here; the process exits with this text."""


class KernelService(ServiceBase):
    name = "kernel"
    subsystem = "kernel"
    description = "ikefarm kernel: SAD/SPD, routes, VIPs"

    def __init__(self, runtime: Runtime) -> None:
        super().__init__(runtime)
        self.backend: MemoryKernel | None = None
        # child SA keys are sealed to this key; it lives in this process's memory only
        self._transport = X25519PrivateKey.generate()
        self._tasks: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return f"KernelService(backend={self.backend!r})"

    @classmethod
    def preflight(cls, config: Config) -> None:
        backend = config.kernel.backend
        if backend == "netlink":
            raise BackendNotAvailable(NETLINK_NOT_IMPLEMENTED)
        # the configuration check refuses these already; a Config built in code is checked here
        refused = userspace_backend_problems(config)
        if refused:
            raise BackendNotAvailable("; ".join(f"{p.path}: {p.message}" for p in refused))

    async def setup(self) -> None:
        self.preflight(self.config)
        if self.config.kernel.backend == "userspace":
            options = self.config.ike.global_options
            backend = UserspaceKernel(
                self.runtime.counters,
                natt_port=int(self.config.ingress.natt_port),
                routing_table=int(options.routing_table),
                routing_table_prio=int(options.routing_table_prio),
            )
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
            self.backend = backend
        else:
            self.backend = MemoryKernel()
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
            "show", KernelShowRequest, self.on_show, subject=subjects.KERNEL_SHOW
        )
        await self.runtime.add_endpoint(
            "trap-install", TrapInstall, self.on_trap_install, subject=subjects.KERNEL_TRAP_INSTALL
        )
        await self.runtime.add_endpoint(
            "trap-remove", TrapRemove, self.on_trap_remove, subject=subjects.KERNEL_TRAP_REMOVE
        )
        self.log.control("kernel_backend", backend=self.backend.name)

    async def teardown(self) -> None:
        if isinstance(self.backend, UserspaceKernel):
            await self.backend.stop()

    def gauges(self) -> dict[str, Any]:
        if self.backend is None:
            return {}
        return {
            "backend": self.backend.name,
            "children": self.backend.child_count,
            "sas": len(self.backend.sad),
            "policies": self.backend.policy_count,
            "traps": len(self.backend.traps),
            **(
                {"tunnels": len(self.backend.dataplane)}
                if isinstance(self.backend, UserspaceKernel)
                else {}
            ),
        }

    def _backend(self) -> MemoryKernel:
        assert self.backend is not None
        return self.backend

    async def _apply_routes(self) -> None:
        """The userspace backend's routes to its TUN device, after an install or delete."""
        if not isinstance(self.backend, UserspaceKernel):
            return
        try:
            await self.backend.apply_routes()
        except Exception as exc:  # the SAs stand; traffic finds no route until the next change
            self.runtime.counters["routes_failed"] += 1
            self.log.control("routes_failed", backend=self.backend.name, error=str(exc))

    async def on_transport_key(self, _request: TransportKeyRequest, _msg: Any) -> TransportKeyReply:
        return TransportKeyReply(public_key=public_bytes(self._transport))

    def _opened(self, request: ChildInstall) -> ChildInstall:
        """The request with its sealed keys opened into the key fields, for the backend."""
        if any(
            (request.encr_key_in, request.encr_key_out, request.integ_key_in, request.integ_key_out)
        ):
            self.runtime.counters["child_install.keys_in_clear"] += 1
            raise BusError("bad_field", "ChildInstall: keys must be sealed, not in clear")
        keys = open_child_keys(
            self._transport,
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
            sa_in, sa_out = backend.install(opened)
        except InvalidChild as exc:
            self.runtime.counters["child_install.invalid"] += 1
            raise BusError("bad_field", f"ChildInstall: {exc}") from None
        except KernelRefusal as exc:
            self.runtime.counters[f"child_install.{exc.code}"] += 1
            self.log.control(
                "child_install_refused",
                backend=backend.name,
                unique_id=request.unique_id,
                reqid=request.reqid,
                spi_in=request.spi_in.hex(),
                spi_out=request.spi_out.hex(),
                error=exc.text,
            )
            return KernelAck(ok=False, error=exc.text)
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
            child = backend.delete(request)
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
        )
        return KernelAck(ok=True)

    async def on_show(self, _request: KernelShowRequest, _msg: Any) -> KernelState:
        backend = self._backend()
        sas, policies = backend.show()
        return KernelState(
            backend=backend.name, sas=sas, policies=policies, traps=backend.show_traps()
        )

    async def on_trap_install(self, request: TrapInstall, _msg: Any) -> KernelAck:
        backend = self._backend()
        try:
            trap, replaced = backend.install_trap(request)
        except InvalidChild as exc:
            self.runtime.counters["trap_install.invalid"] += 1
            raise BusError("bad_field", f"TrapInstall: {exc}") from None
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

    async def on_trap_remove(self, request: TrapRemove, _msg: Any) -> KernelAck:
        backend = self._backend()
        try:
            trap = backend.remove_trap(request)
        except KernelRefusal as exc:
            self.runtime.counters[f"trap_remove.{exc.code}"] += 1
            return KernelAck(ok=False, error=exc.text)
        self.runtime.counters["trap_remove.ok"] += 1
        self.log.control("trap_removed", backend=backend.name, vpn=trap.vpn, reqid=trap.reqid)
        return KernelAck(ok=True)

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
        task = asyncio.get_running_loop().create_task(
            self.runtime.publish(subjects.EVENT_CHILD_SA, notice)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
