"""The `userspace` kernel backend: the SAD/SPD of the memory backend plus a live ESP dataplane.

Bookkeeping (validation, SA and policy rows, traps, `show`) is the memory
backend's (`memory.py`); on top, each child SA becomes a `Tunnel` of the
userspace dataplane (`dataplane.py`), its remote selectors are routed to the
TUN device and the ESP socket of its local address is opened (`tun.py`).
The I/O runs in the kernel service's asyncio loop: `add_reader` on the TUN
device and on each ESP socket, a bounded batch of packets per wake-up.

Not implemented (refused per child with "not implemented", and by the
configuration check for the options that would ask for them,
`shared/config/loader.py`): transport mode, protocol/port traffic selectors, a
remote selector covering the peer's own address, and the ESP algorithms the
codec lacks (`shared/esp/`).

Trap policies become dataplane traps: their remote selectors are routed to the
TUN device too, a packet with no child raises an ACQUIRE (`Dataplane.on_acquire`)
and waits; the child's installation sends what waited (docs/esp-dataplane.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import socket
from collections import Counter
from typing import Any

from ikefarm.proto.messages import (
    ChildCounters,
    ChildDelete,
    ChildInstall,
    ChildUpdate,
    TrapInstall,
    TrapRemove,
)
from ikefarm.services.kernel import tun
from ikefarm.services.kernel.dataplane import (
    Dataplane,
    Network,
    Send,
    Trap,
    Tunnel,
    selector_networks,
)
from ikefarm.services.kernel.flows import FlowCache
from ikefarm.services.kernel.memory import (
    InvalidChild,
    KernelRefusal,
    MemoryKernel,
    SaEntry,
    TrapEntry,
    _Child,
    check_install,
    delete_request_of,
)
from ikefarm.shared.esp import Lifetime, UnsupportedEspTransform, sa_pair

BACKEND_NAME = "userspace"
BATCH = 64  # packets handled per wake-up of one fd, so one busy fd cannot starve the loop
MAX_PACKET = 65535


def not_implemented(text: str) -> KernelRefusal:
    return KernelRefusal("not_implemented", f"not implemented: {text}")


class _Socket:
    __slots__ = ("sock", "users")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.users = 0


class UserspaceKernel(MemoryKernel):
    """Child SAs protected by the userspace dataplane; `start()` opens the TUN device."""

    name = BACKEND_NAME

    def __init__(
        self,
        counters: Counter[str] | None = None,
        *,
        natt_port: int = 4500,
        tun_name: str = tun.TUN_NAME,
        routing_table: int = 220,
        routing_table_prio: int = 220,
        lifetime: Lifetime | None = None,
        acquire_timeout: float = 30.0,
        flows: FlowCache | None = None,
    ) -> None:
        super().__init__()
        self.dataplane = Dataplane(
            counters, acquire_timeout=acquire_timeout, flows=flows, host=tun_name
        )
        self.counters = self.dataplane.counters
        self.natt_port = natt_port
        self.tun_name = tun_name
        self.routing = (routing_table, routing_table_prio)
        self.lifetime = lifetime or Lifetime()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tun_fd: int | None = None
        self._routes: tun.Routes | None = None
        self._esp: dict[str, _Socket] = {}  # raw IP-protocol-50 sockets by local address
        self._udp: dict[str, _Socket] = {}  # raw ESP-in-UDP sockets by local address

    def __repr__(self) -> str:
        return f"UserspaceKernel(children={self.child_count}, sas={len(self.sad)})"

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        self._tun_fd, index = await tun.open_tun(self.tun_name)
        self._routes = tun.Routes(index, *self.routing)
        await self._routes.start()
        loop.add_reader(self._tun_fd, self._read_tun)

    async def apply_routes(self) -> None:
        """Program the routes the installs and deletes since the last call changed."""
        if self._routes is not None:
            await self._routes.apply()

    async def stop(self) -> None:
        if self._routes is not None:
            with contextlib.suppress(Exception):
                await self._routes.apply(everything=True)
            self._routes = None
        loop = self._loop
        for table in (self._esp, self._udp):
            for entry in table.values():
                if loop is not None:
                    loop.remove_reader(entry.sock.fileno())
                entry.sock.close()
            table.clear()
        if self._tun_fd is not None:
            if loop is not None:
                loop.remove_reader(self._tun_fd)
            os.close(self._tun_fd)  # the TUN device goes with its last fd
            self._tun_fd = None

    # -- the backend interface ------------------------------------------------------------

    def _tunnel(self, request: ChildInstall) -> Tunnel:
        """The dataplane tunnel of a request, or KernelRefusal for what is not implemented."""
        local_nets, remote_nets = _networks(request)
        try:
            inbound, outbound = sa_pair(
                request, lifetime_in=self.lifetime, lifetime_out=self.lifetime
            )
        except UnsupportedEspTransform as exc:
            raise not_implemented(f"ESP transform: {exc}") from None
        except ValueError as exc:  # key lengths that do not fit the transform
            raise InvalidChild(str(exc)) from None
        return Tunnel(
            unique_id=request.unique_id,
            outbound=outbound,
            inbound=inbound,
            local_address=str(ipaddress.ip_address(request.local_address)),
            remote_address=str(ipaddress.ip_address(request.remote_address)),
            local_port=request.local_port,
            remote_port=request.remote_port,
            udp_encap=request.udp_encap,
            local_nets=local_nets,
            remote_nets=remote_nets,
            label=(request.vpn or f"child-{request.unique_id}")[:64],
            policy=request.name[:64],
        )

    def install(self, request: ChildInstall) -> tuple[SaEntry, SaEntry]:
        check_install(request)
        tunnel = self._tunnel(request)
        entries = super().install(request)
        try:
            self._acquire_socket(tunnel)
        except Exception as exc:
            super().delete(delete_request_of(request))
            raise KernelRefusal("dataplane", f"dataplane refused the child: {exc}") from None
        try:
            self.dataplane.add(tunnel)
        except Exception as exc:
            self._release_socket(tunnel)
            super().delete(delete_request_of(request))
            raise KernelRefusal("dataplane", f"dataplane refused the child: {exc}") from None
        if self._routes is not None:
            for network in tunnel.remote_nets:
                self._routes.add(str(network), tunnel.local_nets)
        # the packets that waited behind this policy's trap go out through the new child
        for send in self.dataplane.release(request.reqid):
            self._transmit(send)
        return entries

    def install_trap(self, request: TrapInstall) -> tuple[TrapEntry, bool]:
        local_nets, remote_nets = _networks(request)
        entry, replaced = super().install_trap(request)
        old = self.dataplane.traps.get(request.reqid)
        trap = Trap(
            reqid=request.reqid,
            local_address=entry.local,
            remote_address=entry.remote,
            local_nets=local_nets,
            remote_nets=remote_nets,
        )
        self.dataplane.add_trap(trap)
        if self._routes is not None:
            if old is not None:
                for network in old.remote_nets:
                    self._routes.remove(str(network))
            for network in remote_nets:
                self._routes.add(str(network), local_nets)
        return entry, replaced

    def remove_trap(self, request: TrapRemove) -> TrapEntry:
        entry = super().remove_trap(request)
        trap = self.dataplane.remove_trap(request.reqid)
        if trap is not None and self._routes is not None:
            for network in trap.remote_nets:
                self._routes.remove(str(network))
        return entry

    def delete(self, request: ChildDelete) -> _Child:
        child = super().delete(request)
        tunnel = self.dataplane.tunnels.get(child.unique_id)
        if tunnel is not None:
            self._forget(tunnel)
        return child

    def update(self, request: ChildUpdate) -> tuple[SaEntry, SaEntry]:
        """Move a tunnel to new outer endpoints (MOBIKE, RFC 4555 3.5): its ESP SAs (keys,
        sequence numbers, replay window) stay, the socket follows the local address and the
        encapsulation; the routes to its selectors do not change."""
        child = self._children.get(request.unique_id)
        saved = (child, {k: self.sad[k] for k in child.sa_keys}) if child is not None else None
        entries = super().update(request)
        tunnel = self.dataplane.tunnels.get(request.unique_id)
        if tunnel is None:
            return entries
        local = str(ipaddress.ip_address(request.local_address))
        try:
            self._acquire(local, request.udp_encap)
        except Exception as exc:
            assert saved is not None and saved[0] is not None
            self._children[request.unique_id] = saved[0]
            self.sad.update(saved[1])
            raise KernelRefusal("dataplane", f"dataplane refused the move: {exc}") from None
        self.dataplane.remove(tunnel.unique_id)  # re-added below under its new outer key
        self._release(tunnel.local_address, tunnel.udp_encap)
        tunnel.local_address = local
        tunnel.remote_address = str(ipaddress.ip_address(request.remote_address))
        tunnel.local_port = request.local_port
        tunnel.remote_port = request.remote_port
        tunnel.udp_encap = request.udp_encap
        self.dataplane.add(tunnel)
        return entries

    def _forget(self, tunnel: Tunnel) -> None:
        if self.dataplane.remove(tunnel.unique_id) is not None and self._routes is not None:
            for network in tunnel.remote_nets:
                self._routes.remove(str(network))
        self._release_socket(tunnel)

    def moved_counters(self) -> list[ChildCounters]:
        """The counters of the tunnels that carried packets since the previous call."""
        return [
            ChildCounters(
                t.unique_id,
                t.inbound.counters.bytes,
                t.inbound.counters.packets,
                t.outbound.counters.bytes,
                t.outbound.counters.packets,
            )
            for t in self.dataplane.take_moved()
        ]

    def show_traps(self) -> list[dict[str, Any]]:
        """The memory backend's rows, with the packets waiting and whether an ACQUIRE is out."""
        rows = super().show_traps()
        for row in rows:
            trap = self.dataplane.traps.get(row["reqid"])
            row["queued"] = len(trap.queue) if trap is not None else 0
            row["acquiring"] = trap is not None and trap.acquired_at is not None
        return rows

    def show(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        sas, policies = super().show()
        for row in sas:
            counters = self.dataplane.show(row["unique_id"]).get(row["direction"], {})
            row.update(counters)
        return sas, policies

    # -- sockets ----------------------------------------------------------------------------

    def _acquire_socket(self, tunnel: Tunnel) -> None:
        self._acquire(tunnel.local_address, tunnel.udp_encap)

    def _release_socket(self, tunnel: Tunnel) -> None:
        self._release(tunnel.local_address, tunnel.udp_encap)

    def _acquire(self, address: str, udp_encap: bool) -> None:
        """One more user of the ESP (or ESP-in-UDP) socket of a local address; opened once."""
        table = self._udp if udp_encap else self._esp
        entry = table.get(address)
        if entry is None:
            ipv4 = ipaddress.ip_address(address).version == 4
            if udp_encap:
                sock = tun.open_udp_encap_socket(address, self.natt_port)
                offset_of = _udp_payload_offset if ipv4 else _udp_header_only
            else:
                sock = tun.open_esp_socket(address)
                offset_of = _ipv4_payload_offset if ipv4 else _no_offset
            entry = table[address] = _Socket(sock)
            if self._loop is not None:
                self._loop.add_reader(sock.fileno(), self._read_esp, sock, offset_of)
        entry.users += 1

    def _release(self, address: str, udp_encap: bool) -> None:
        table = self._udp if udp_encap else self._esp
        entry = table.get(address)
        if entry is None:
            return
        entry.users -= 1
        if entry.users <= 0:
            del table[address]
            if self._loop is not None:
                self._loop.remove_reader(entry.sock.fileno())
            entry.sock.close()

    # -- per packet -----------------------------------------------------------------------

    def _read_tun(self) -> None:
        fd = self._tun_fd
        if fd is None:
            return
        outbound = self.dataplane.outbound
        for _ in range(BATCH):
            try:
                packet = os.read(fd, MAX_PACKET)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.counters["esp.out.drop.tun_read"] += 1
                return
            send = outbound(packet)
            if send is not None:
                self._transmit(send)

    def _transmit(self, send: Send) -> None:
        tunnel = send.tunnel
        try:
            if tunnel.udp_encap:
                sock = self._udp[tunnel.local_address].sock
                header = tun.udp_header(tunnel.local_port, tunnel.remote_port, len(send.esp))
                sock.sendto(header + send.esp, (tunnel.remote_address, 0))
            else:
                self._esp[tunnel.local_address].sock.sendto(send.esp, (tunnel.remote_address, 0))
        except (KeyError, OSError):
            self.counters["esp.out.drop.send_error"] += 1

    def _read_esp(self, sock: socket.socket, offset_of: Any) -> None:
        inbound = self.dataplane.inbound
        fd = self._tun_fd
        for _ in range(BATCH):
            try:
                data = sock.recv(MAX_PACKET)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.counters["esp.in.drop.socket_error"] += 1
                return
            offset = offset_of(data)
            if offset is None:
                self.counters["esp.in.drop.too_short"] += 1
                continue
            inner = inbound(data[offset:])
            if inner is None or fd is None:
                continue
            try:
                os.write(fd, inner)
            except OSError:
                self.counters["esp.in.drop.tun_write"] += 1


def _networks(request: ChildInstall | TrapInstall) -> tuple[list[Network], list[Network]]:
    """(local, remote) networks of a child's or trap's selectors; KernelRefusal for what the
    dataplane does not implement, InvalidChild for what is not an address range."""
    if request.mode != "tunnel":
        raise not_implemented(f"{request.mode} mode in the userspace dataplane")
    try:
        local_nets = [n for s in request.local_ts for n in selector_networks(s)]
        remote_nets = [n for s in request.remote_ts for n in selector_networks(s)]
        remote = ipaddress.ip_address(request.remote_address)
    except NotImplementedError as exc:
        raise not_implemented(str(exc)) from None
    except ValueError:
        raise InvalidChild("a traffic selector is not an address range") from None
    if any(remote in network for network in remote_nets):
        # its ESP (and IKE) would be routed into the tunnel itself; telling outer from
        # inner packets to the same address needs marks on every socket: not done
        raise not_implemented(
            f"a remote traffic selector that covers the peer's own address ({remote})"
        )
    return local_nets, remote_nets


def _ipv4_payload_offset(data: bytes) -> int | None:
    """Raw IPv4 sockets read the IP header too."""
    if not data:
        return None
    offset = (data[0] & 0x0F) * 4
    return offset if 20 <= offset <= len(data) else None


def _udp_payload_offset(data: bytes) -> int | None:
    offset = _ipv4_payload_offset(data)
    return offset + 8 if offset is not None and offset + 8 <= len(data) else None


def _udp_header_only(data: bytes) -> int | None:
    """Raw IPv6 sockets read from the UDP header on."""
    return 8 if len(data) >= 8 else None


def _no_offset(_data: bytes) -> int:
    """Raw IPv6 sockets read from the payload on."""
    return 0


__all__ = ["BACKEND_NAME", "Network", "UserspaceKernel", "not_implemented"]
