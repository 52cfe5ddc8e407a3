"""Traps in the userspace dataplane (services/kernel/dataplane.py): ACQUIRE and the queue.

A packet with no tunnel but a trap raises one ACQUIRE per trap per
acquire-timeout and waits in the trap's bounded queue; installing the child
releases the queue through it; acquire-timeout drops the queue. Every drop is
counted by reason. The clock is injected (no sleeping, no timing asserted).
"""

from __future__ import annotations

import pytest
from scapy.compat import raw
from scapy.layers.inet import ICMP, IP

from ikefarm.proto.messages import TrapInstall, TrapRemove
from ikefarm.services.kernel.dataplane import Dataplane, Trap, packet_addresses, selector_networks
from ikefarm.services.kernel.memory import KernelRefusal
from ikefarm.services.kernel.userspace import UserspaceKernel
from tests.unit.test_userspace_dataplane import tunnel_pair


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def packet(seq: int, dst: str = "10.200.0.7") -> bytes:
    return raw(IP(src="10.100.0.1", dst=dst) / ICMP(id=3, seq=seq) / b"queued")


def trap(reqid: int = 7, remote: str = "10.200.0.0/24") -> Trap:
    return Trap(
        reqid=reqid,
        local_address="192.0.2.1",
        remote_address="192.0.2.2",
        local_nets=selector_networks("10.100.0.0/24"),
        remote_nets=selector_networks(remote),
    )


def dataplane(limit: int = 4) -> tuple[Dataplane, Clock, list[tuple[int, bytes]]]:
    clock = Clock()
    plane = Dataplane(acquire_timeout=30.0, queue_limit=limit, clock=clock)
    acquired: list[tuple[int, bytes]] = []
    plane.on_acquire = lambda t, p: acquired.append((t.reqid, p))
    return plane, clock, acquired


def test_first_packet_acquires_once_and_the_queue_goes_out_through_the_child() -> None:
    plane, _clock, acquired = dataplane()
    plane.add_trap(trap())
    for seq in range(3):
        assert plane.outbound(packet(seq)) is None
    assert acquired == [(7, packet(0))]  # one ACQUIRE for three packets
    assert plane.counters["esp.acquire"] == 1 and plane.counters["esp.out.queued"] == 3
    assert plane.counters["esp.out.drop.no_sa"] == 0
    ours, theirs = tunnel_pair(1, "10.100.0.0/24", "10.200.0.0/24")
    plane.add(ours)
    peer = Dataplane()
    peer.add(theirs)
    sends = plane.release(7)
    assert [peer.inbound(s.esp) for s in sends] == [packet(0), packet(1), packet(2)]
    assert plane.counters["esp.out.released"] == 3
    assert plane.release(7) == []  # nothing left, the trap is idle again


def test_the_queue_is_bounded_and_overflow_is_counted() -> None:
    plane, _clock, acquired = dataplane(limit=2)
    plane.add_trap(trap())
    for seq in range(5):
        plane.outbound(packet(seq))
    assert len(acquired) == 1
    assert list(plane.traps[7].queue) == [packet(0), packet(1)]
    assert plane.counters["esp.out.drop.acquire_queue_full"] == 3


def test_acquire_timeout_drops_the_queue_and_the_next_packet_acquires_again() -> None:
    plane, clock, acquired = dataplane()
    plane.add_trap(trap())
    plane.outbound(packet(1))
    plane.outbound(packet(2))
    clock.now += 29.0
    plane.expire_acquires()
    assert plane.counters["esp.out.drop.acquire_timeout"] == 0  # not yet
    clock.now += 1.0
    plane.expire_acquires()
    assert plane.counters["esp.out.drop.acquire_timeout"] == 2
    assert not plane.traps[7].queue
    plane.outbound(packet(3))
    assert len(acquired) == 2  # a new ACQUIRE after the timeout
    # a packet arriving after the timeout with no sweep in between also drops the old queue
    clock.now += 31.0
    plane.outbound(packet(4))
    assert plane.counters["esp.out.drop.acquire_timeout"] == 3
    assert len(acquired) == 3 and list(plane.traps[7].queue) == [packet(4)]


def test_no_trap_means_no_sa_and_a_removed_trap_drops_its_queue() -> None:
    plane, _clock, acquired = dataplane()
    plane.add_trap(trap())
    assert plane.outbound(packet(1, dst="10.201.0.1")) is None
    assert plane.counters["esp.out.drop.no_sa"] == 1 and not acquired
    plane.outbound(packet(2))
    assert plane.remove_trap(7) is not None
    assert plane.counters["esp.out.drop.trap_removed"] == 1
    plane.outbound(packet(3))
    assert plane.counters["esp.out.drop.no_sa"] == 2 and len(acquired) == 1
    assert plane.remove_trap(7) is None


def test_a_replaced_trap_keeps_its_queue_and_pending_acquire() -> None:
    plane, _clock, acquired = dataplane()
    plane.add_trap(trap())
    plane.outbound(packet(1))
    plane.add_trap(trap(remote="10.200.0.0/16"))
    plane.outbound(packet(2, dst="10.200.9.9"))
    assert len(acquired) == 1 and len(plane.traps[7].queue) == 2


def test_packet_addresses_are_host_selectors() -> None:
    assert packet_addresses(packet(1)) == ("10.100.0.1/32", "10.200.0.7/32")
    assert packet_addresses(b"\x45") == ("", "")


def trap_install(remote_ts: str = "10.200.0.0/24", mode: str = "tunnel") -> TrapInstall:
    return TrapInstall(
        vpn="hq",
        name="net",
        reqid=7,
        mode=mode,
        local_address="192.0.2.1",
        remote_address="192.0.2.2",
        local_ts=["10.100.0.0/24"],
        remote_ts=[remote_ts],
    )


def test_the_userspace_backend_puts_traps_in_its_dataplane_and_takes_them_back() -> None:
    backend = UserspaceKernel()  # not started: no TUN device, no routes, no sockets
    entry, replaced = backend.install_trap(trap_install())
    assert not replaced and entry.reqid == 7
    assert backend.dataplane.traps[7].remote_nets == selector_networks("10.200.0.0/24")
    (row,) = backend.show_traps()
    assert (row["queued"], row["acquiring"]) == (0, False)
    backend.dataplane.outbound(packet(1))
    (row,) = backend.show_traps()
    assert (row["queued"], row["acquiring"]) == (1, True)
    backend.remove_trap(TrapRemove("hq", "net", 7))
    assert backend.dataplane.traps == {} and backend.traps == {}


def test_the_userspace_backend_refuses_traps_it_cannot_honour() -> None:
    backend = UserspaceKernel()
    for request in (
        trap_install(remote_ts="0.0.0.0/0"),  # would route the peer's own IKE and ESP
        trap_install(remote_ts="10.200.0.0/24[tcp/80]"),
        trap_install(mode="transport"),
    ):
        with pytest.raises(KernelRefusal) as refused:
            backend.install_trap(request)
        assert refused.value.code == "not_implemented"
    assert backend.dataplane.traps == {} and backend.traps == {}
