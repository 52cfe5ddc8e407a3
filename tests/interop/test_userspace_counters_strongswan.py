"""Child counters through the whole farm: strongSwan (kernel-libipsec) pings through ikefarm's
userspace dataplane; `show ike-sa details` has the packets, and no DPD check is sent while
they flow (RFC 7296 2.4: inbound IPsec traffic proves the peer alive).

The same namespaces and strongSwan side as test_userspace_strongswan.py; the gateway
checks liveness after DPD_DELAY idle seconds, so the kernel service's counter batches
(docs/kernel-counters.md) come every second.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest

from tests.harness.gateway import Gateway
from tests.harness.netns import NetnsPair, wait_for
from tests.harness.strongswan import StrongSwan
from tests.interop.test_userspace_strongswan import GW_INNER, PEER_INNER, establish

pytestmark = [pytest.mark.interop, pytest.mark.timeout(180)]

DPD_DELAY = 3
PINGS = 20  # one every 0.5 s: 10 s, over two DPD delays after the first batch


def _child_counters(gateway: Gateway) -> tuple[int, int, int, int]:
    text = gateway.show_text("details")
    (inbound,) = re.findall(r"^\s+in  [0-9a-f]{8}, (\d+) bytes, (\d+) packets$", text, re.M)
    (outbound,) = re.findall(r"^\s+out [0-9a-f]{8}, (\d+) bytes, (\d+) packets$", text, re.M)
    return int(inbound[0]), int(inbound[1]), int(outbound[0]), int(outbound[1])


def test_pings_show_in_counters_and_hold_dpd_back(
    netns_pair: NetnsPair,
    gateway_factory: Callable[..., Gateway],
    strongswan_factory: Callable[..., StrongSwan],
) -> None:
    tunnel = establish(
        netns_pair,
        gateway_factory,
        strongswan_factory,
        ike_template_extra=f'dpd-delay = "{DPD_DELAY}s"\n',
    )
    gateway, peer_ns = tunnel.gateway, tunnel.peer_ns
    assert _child_counters(gateway) == (0, 0, 0, 0)

    ping = peer_ns.popen(
        ["ping", "-n", "-q", "-c", str(PINGS), "-i", "0.5", "-W", "2", "-I", PEER_INNER, GW_INNER],
        stdout=-1,
        stderr=-1,
        text=True,
    )
    try:
        # from the first batch that reached the engine on, no check may go out while the
        # pings last (more than two DPD delays after that batch)
        wait_for(lambda: gateway.counters("ike").get("dpd_traffic_seen", 0) >= 1, timeout=10)
        checks_before = gateway.counters("ike").get("dpd_checks", 0)
        out, err = ping.communicate(timeout=PINGS + 10)
    finally:
        if ping.poll() is None:
            ping.kill()
            ping.wait()
    assert ping.returncode == 0, out + err
    ike = gateway.counters("ike")
    assert ike.get("dpd_checks", 0) == checks_before
    assert ike.get("dpd_traffic_seen", 0) >= 3

    def counted() -> tuple[int, int, int, int] | None:
        counters = _child_counters(gateway)
        return counters if counters[1] >= PINGS and counters[3] >= PINGS else None

    bytes_in, packets_in, bytes_out, packets_out = wait_for(counted, timeout=15)
    assert bytes_in >= 84 * packets_in and bytes_out >= 84 * packets_out  # ICMP echo, IPv4

    # the pings stop: the liveness check comes, strongSwan answers it
    wait_for(lambda: gateway.counters("ike").get("dpd_checks", 0) > checks_before, timeout=20)
    wait_for(lambda: gateway.counters("ike").get("liveness_confirmed", 0) >= 1, timeout=20)
