"""start-action = trap end to end: ikefarm (userspace dataplane) initiates on the first packet.

ikefarm runs in "gw" (192.0.2.1, inner 10.100.0.1 on lo) with `[kernel] backend =
"userspace"` and a VPN toward strongSwan 5.9.8 with kernel-libipsec in "peer"
(192.0.2.2, inner 10.200.0.1 on lo), `start-action = "trap"` (the default). No
one runs `ikefarm initiate`: the shard-0 ike worker installs the trap at start,
the first datagrams toward 10.200.0.0/24 hit it in the dataplane, which raises
one ACQUIRE and queues them; the worker initiates; once the child is installed
the queued datagrams go out through it. A UDP sink in "peer" checks that every
one of them arrived, in order. Without a responder, the queued datagrams are
dropped after `acquire-timeout` and counted (docs/esp-dataplane.md, "Traps and
ACQUIRE").
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import pytest

from tests.harness.gateway import Gateway, farm_config, vpn_config
from tests.harness.netns import NetnsPair, wait_for
from tests.harness.strongswan import Psk, StrongSwan
from tests.interop.test_initiator_strongswan import responder

pytestmark = [pytest.mark.interop, pytest.mark.timeout(180)]

PSK = "acquire-psk-8e02b6d1f4a3c759"
GW_INNER, PEER_INNER = "10.100.0.1", "10.200.0.1"
PORT = 5302
COUNT = 5

# A UDP sink: prints "ready", then the payloads it got (one per line) once it has `count`
# of them or `timeout` seconds passed.
SINK = r"""
import socket, sys
address, port, count, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind((address, port))
sock.settimeout(timeout)
print("ready", flush=True)
got = []
try:
    while len(got) < count:
        got.append(sock.recv(2048).decode())
except TimeoutError:
    pass
print("\n".join(got), flush=True)
"""

# Sends `count` numbered datagrams at once: all of them leave before any IKE exchange ends.
BURST = r"""
import socket, sys
src, dst, port, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind((src, 0))
for n in range(count):
    sock.sendto(f"queued-{n}".encode(), (dst, port))
"""


def trap_farm(
    netns_pair: NetnsPair, gateway_factory: Callable[..., Gateway], workdir: object, timeout: int
) -> Gateway:
    netns_pair.gw.add_address("lo", f"{GW_INNER}/32")
    vpn = vpn_config(
        "hq",
        local_id="gw.example",
        remote_id="peer.example",
        policies=[("net", "10.100.0.0/24", "10.200.0.0/24")],
        ipsec={"start-action": "trap"},
    )
    text = farm_config(
        workdir,  # type: ignore[arg-type]
        psks=[("gw.example", "peer.example", PSK)],
        vpns=[vpn],
        kernel_backend="userspace",
        global_options={"acquire-timeout": timeout},
    )
    gateway = gateway_factory(netns_pair.gw, config_text=text)
    wait_for(
        lambda: gateway.counters("kernel").get("trap_install.ok") == 1,
        timeout=15,
        what="the start-action trap installed",
    )
    return gateway


def burst(netns_pair: NetnsPair) -> None:
    netns_pair.gw.run(
        [sys.executable, "-c", BURST, GW_INNER, PEER_INNER, str(PORT), str(COUNT)], timeout=10
    )


def test_the_first_packets_start_the_child_and_arrive_through_it(
    netns_pair: NetnsPair,
    gateway_factory: Callable[..., Gateway],
    strongswan_factory: Callable[..., StrongSwan],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    netns_pair.peer.add_address("lo", f"{PEER_INNER}/32")
    peer = strongswan_factory(netns_pair.peer)
    peer.load([responder()], psks=[Psk(PSK, ["peer.example", "gw.example"])])
    gateway = trap_farm(netns_pair, gateway_factory, tmp_path_factory.mktemp("gw"), 30)
    assert gateway.show() == []  # nothing negotiated before traffic
    sink = netns_pair.peer.popen(
        [sys.executable, "-c", SINK, PEER_INNER, str(PORT), str(COUNT), "30"],
        stdout=-1,
        stderr=-1,
        text=True,
    )
    assert sink.stdout is not None and sink.stdout.readline().strip() == "ready"
    burst(netns_pair)
    out, err = sink.communicate(timeout=40)
    assert out.split() == [f"queued-{n}" for n in range(COUNT)], err + gateway.log_tail()

    (row,) = gateway.wait_sas(1)
    assert row["initiator"] and row["children"][0]["state"] == "installed"
    (sa,) = peer.list_sas()
    assert sa.get("initiator") != "yes"  # strongSwan answered: ikefarm initiated
    kernel = gateway.counters("kernel")
    assert kernel.get("esp.acquire") == 1 and kernel.get("event.acquire") == 1
    assert kernel.get("esp.out.queued") == COUNT and kernel.get("esp.out.released") == COUNT
    ike = gateway.counters("ike")
    assert ike.get("acquire.initiated") == 1
    # the tunnel goes on both ways
    assert netns_pair.gw.ping(PEER_INNER, src=GW_INNER, count=2, timeout=10)
    assert netns_pair.peer.ping(GW_INNER, src=PEER_INNER, count=2, timeout=10)
    assert gateway.counters("kernel").get("esp.acquire") == 1


def test_without_a_responder_queued_packets_are_dropped_after_acquire_timeout(
    netns_pair: NetnsPair,
    gateway_factory: Callable[..., Gateway],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    gateway = trap_farm(netns_pair, gateway_factory, tmp_path_factory.mktemp("gw"), 2)
    burst(netns_pair)
    wait_for(
        lambda: gateway.counters("kernel").get("esp.out.drop.acquire_timeout") == COUNT,
        timeout=20,
        what="the queued datagrams dropped after acquire-timeout",
    )
    kernel = gateway.counters("kernel")
    assert kernel.get("esp.out.queued") == COUNT and kernel.get("esp.out.released", 0) == 0
    assert kernel.get("esp.acquire") == 1
    assert gateway.counters("ike").get("acquire.initiated") == 1
