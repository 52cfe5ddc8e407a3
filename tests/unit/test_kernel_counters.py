"""The kernel service's counter batches (docs/kernel-counters.md): what moved, nothing else;
the cost of a batch follows the tunnels that carried traffic, not the tunnels installed."""

from __future__ import annotations

import pytest

from ikefarm.proto.messages import MAX_COUNTERS_PER_BATCH, ChildCounters
from ikefarm.services.kernel import counters
from ikefarm.services.kernel.dataplane import Dataplane
from ikefarm.services.kernel.memory import KernelRefusal, MemoryKernel
from ikefarm.shared.config.loader import parse_config
from tests.service.test_kernel_memory import child
from tests.unit.test_userspace_dataplane import packet, tunnel_pair


def test_only_the_tunnels_that_carried_packets_are_taken() -> None:
    gw, peer = Dataplane(), Dataplane()
    pairs = [tunnel_pair(i, f"10.100.{i}.0/24", f"10.200.{i}.0/24") for i in range(1, 51)]
    for ours, theirs in pairs:
        gw.add(ours)
        peer.add(theirs)
    assert gw.take_moved() == []
    # traffic on tunnels 3 (both ways) and 7 (outbound only)
    for seq in range(1, 4):
        send = peer.outbound(packet("10.200.3.9", "10.100.3.1", seq))
        assert send is not None and gw.inbound(send.esp) is not None
    assert gw.outbound(packet("10.100.3.1", "10.200.3.9")) is not None
    assert gw.outbound(packet("10.100.7.1", "10.200.7.9")) is not None
    moved = gw.take_moved()
    assert sorted(t.unique_id for t in moved) == [3, 7]
    assert moved[0].inbound.counters.packets == 3
    # the flags were reset: the next batch is empty until a packet flows again
    assert gw.take_moved() == []
    assert gw.outbound(packet("10.100.7.1", "10.200.7.9", 2)) is not None
    gw.remove(7)
    assert gw.take_moved() == []  # a removed tunnel is not reported


def test_the_take_walks_only_the_moved_tunnels(monkeypatch: pytest.MonkeyPatch) -> None:
    gw = Dataplane()
    for i in range(1, 201):
        gw.add(tunnel_pair(i, f"10.{i}.0.0/24", f"10.{i}.1.0/24")[0])
    assert gw.outbound(packet("10.5.0.1", "10.5.1.1")) is not None

    class NoWalk(dict):  # type: ignore[type-arg]
        def values(self):  # type: ignore[no-untyped-def]
            raise AssertionError("all tunnels walked")

        __iter__ = items = keys = values  # type: ignore[assignment]

    monkeypatch.setattr(gw, "tunnels", NoWalk(gw.tunnels))
    assert [t.unique_id for t in gw.take_moved()] == [5]


def test_the_memory_double_reports_recorded_traffic_once() -> None:
    kernel = MemoryKernel()
    kernel.install(child(1))
    kernel.install(child(2, "c0000002", "c1000002"))
    assert kernel.moved_counters() == []
    kernel.record_traffic(1, bytes_in=84, packets_in=1)
    kernel.record_traffic(1, bytes_out=84, packets_out=1)
    assert kernel.moved_counters() == [ChildCounters(1, 84, 1, 84, 1)]
    assert kernel.moved_counters() == []
    sas, _policies = kernel.show()
    assert {(r["unique_id"], r["direction"], r["packets"]) for r in sas if "packets" in r} == {
        (1, "in", 1),
        (1, "out", 1),
    }
    with pytest.raises(KernelRefusal):
        kernel.record_traffic(9, packets_in=1)


@pytest.mark.parametrize(
    ("dpd", "interval"),
    [(None, counters.MAX_INTERVAL), ("30s", 10.0), ("9s", 3.0), ("2s", 1.0), ("0s", 10.0)],
)
def test_the_interval_is_a_third_of_the_smallest_dpd_delay(
    dpd: str | None, interval: float
) -> None:
    vpn = f'ike-policy = {{ dpd-delay = "{dpd}" }}\n' if dpd else ""
    config = parse_config(
        '[[ike.pre-shared-key]]\nsecret = "counters-test"\n'
        + '[[ike.vpn]]\nname = "a"\nlocal-address = "192.0.2.1"\n' + vpn
        + '[[ike.vpn]]\nname = "b"\nlocal-address = "192.0.2.1"\n'
        + 'ike-policy = { dpd-delay = "60s" }\n'
    )  # fmt: skip
    assert counters.batch_interval(config) == interval


def test_batches_are_cut_at_the_message_limit() -> None:
    moved = [ChildCounters(i, 1, 1, 1, 1) for i in range(2 * MAX_COUNTERS_PER_BATCH + 1)]
    sizes = [len(b) for b in counters.batches(moved)]
    assert sizes == [MAX_COUNTERS_PER_BATCH, MAX_COUNTERS_PER_BATCH, 1]
    assert list(counters.batches([])) == []
