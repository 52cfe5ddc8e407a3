"""The named metrics after real traffic: strongSwan establishes with `ikefarm up` (userspace
dataplane) and pings through the tunnel; the ike worker's and the kernel service's
Prometheus endpoints show the exchanges, the SAs by state and the ESP packets and octets,
the same numbers `ikefarm status --json` shows."""

from __future__ import annotations

import sys
from collections.abc import Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.harness.gateway import Gateway
from tests.harness.netns import Namespace, NetnsPair, wait_for
from tests.harness.strongswan import StrongSwan
from tests.interop.test_userspace_strongswan import GW_INNER, PEER_INNER, establish

pytestmark = [pytest.mark.interop, pytest.mark.timeout(180)]

METRICS_BASE = 19464  # in the gateway namespace: ingress, ike, keystore, kernel, flow


def scrape(ns: Namespace, port: int) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    fetch = (
        "import sys, urllib.request; "
        "sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())"
    )
    result = ns.run([sys.executable, "-c", fetch, f"http://127.0.0.1:{port}/metrics"])
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(result.stdout):
        for sample in family.samples:
            labels = tuple(
                sorted(
                    (k, v)
                    for k, v in sample.labels.items()
                    if k not in ("service", "ikefarm_instance")
                )
            )
            samples.setdefault(sample.name, {})[labels] = sample.value
    return samples


def test_exchanges_sa_states_and_esp_packets_after_a_ping(
    netns_pair: NetnsPair,
    gateway_factory: Callable[..., Gateway],
    strongswan_factory: Callable[..., StrongSwan],
) -> None:
    tunnel = establish(
        netns_pair,
        gateway_factory,
        strongswan_factory,
        extra=(
            '\n[kernel]\nbackend = "userspace"\n'
            f'[telemetry]\nmetrics-listen = "127.0.0.1:{METRICS_BASE}"\n'
        ),
    )
    gateway, gw_ns, peer_ns = tunnel.gateway, tunnel.gw_ns, tunnel.peer_ns
    assert peer_ns.ping(GW_INNER, src=PEER_INNER, count=3, timeout=10)

    ike_port, kernel_port = METRICS_BASE + 1, METRICS_BASE + 3
    ike = scrape(gw_ns, ike_port)
    exchanges = ike["ikefarm_ike_exchanges_total"]
    for exchange in ("IKE_SA_INIT", "IKE_AUTH"):
        key = (("exchange", exchange), ("result", "ok"), ("role", "responder"))
        assert exchanges[key] == 1, exchanges
    # SA states are a walk at most every 5 s: wait for one after the SA was established
    states = wait_for(
        lambda: (
            (s := scrape(gw_ns, ike_port))["ikefarm_ike_sas"].get((("state", "established"),)) and s
        ),
        timeout=15,
        what="the established SA in ikefarm_ike_sas",
    )
    assert states["ikefarm_ike_sas"][(("state", "established"),)] == 1
    assert states["ikefarm_ike_child_sas"][(("state", "installed"),)] == 1

    kernel = scrape(gw_ns, kernel_port)
    packets = kernel["ikefarm_esp_packets_total"]
    octets = kernel["ikefarm_esp_io_bytes_total"]
    assert packets[(("network_io_direction", "receive"),)] >= 3  # the echo requests
    assert packets[(("network_io_direction", "transmit"),)] >= 3  # the replies
    assert octets[(("network_io_direction", "receive"),)] >= 3 * 84  # IPv4 + ICMP + 56 data
    # the same numbers `ikefarm status` reads
    counters = gateway.counters("kernel")
    assert counters["esp.in.packets"] >= packets[(("network_io_direction", "receive"),)]
