"""Spoofed IKE_SA_INIT floods against `ikefarm up` (issue 5), with a real strongSwan peer.

The flooder (tests/harness/flooder.py) writes IKE_SA_INIT from thousands of
addresses of 198.18.0.0/15 (RFC 2544's benchmark range) from the peer
namespace; the gateway namespace routes that range back to the peer, where
the answers die. strongSwan (192.0.2.2) connects meanwhile.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.harness.flooder import BENCHMARK_RANGE
from tests.harness.gateway import Gateway
from tests.harness.netns import Namespace, NetnsPair, wait_for
from tests.harness.strongswan import StrongSwan
from tests.interop.test_responder_strongswan import PSK, peer_connection, psk_for

pytestmark = [pytest.mark.interop, pytest.mark.timeout(240)]

REPO = Path(__file__).resolve().parents[2]
COOKIE_THRESHOLD = 5
HALF_OPEN_LIMIT = 20


def start_flood(
    ns: Namespace, target: str, count: int, rate: float, duration: float, *, on_go: bool = False
) -> Any:
    """The flooder; with `on_go` it prepares (`ready(process)`), then waits for `go(process)`."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    argv = [sys.executable, "-m", "tests.harness.flooder", "--target", target]
    argv += ["--count", str(count), "--rate", str(rate), "--duration", str(duration)]
    if on_go:
        argv.append("--on-go")
    return ns.popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.PIPE if on_go else subprocess.DEVNULL,
        env=env,
        text=True,
    )


def ready(process: Any) -> None:
    assert process.stdout.readline().strip() == "ready", process.stderr.read()


def go(process: Any) -> None:
    process.stdin.write("go\n")
    process.stdin.flush()


def flood_result(process: Any, timeout: float = 120) -> dict[str, Any]:
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, err
    return dict(json.loads(out.strip().splitlines()[-1]))


def route_back(pair: NetnsPair) -> None:
    pair.gw.run(["ip", "route", "add", BENCHMARK_RANGE, "via", pair.peer_v4])


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


class Watch(threading.Thread):
    """Polls `ikefarm status` while the flood runs: the largest half-open counts seen."""

    def __init__(self, gateway: Gateway) -> None:
        super().__init__(daemon=True)
        self.gateway = gateway
        self.stop = threading.Event()
        self.worker_half_open = 0
        self.ingress_half_open = 0
        self.samples = 0

    def run(self) -> None:
        while not self.stop.is_set():
            status = self.gateway.status()
            for row in status.get("ike", []):
                self.worker_half_open = max(self.worker_half_open, row["gauges"]["half_open"])
            for row in status.get("ingress", []):
                dos = row["gauges"]["dos"]
                self.ingress_half_open = max(self.ingress_half_open, dos["half_open"])
            self.samples += 1 if status else 0
            self.stop.wait(0.2)


def dos_gateway(pair: NetnsPair, factory: Callable[..., Gateway], settings: str) -> Gateway:
    """`ikefarm up` in the gw namespace with these dos-protection settings; the spoofed
    range routed back to the peer namespace."""
    route_back(pair)
    return factory(pair.gw, psk=PSK, extra=f"[ike.global-options.dos-protection]\n{settings}")


@pytest.fixture
def peer(netns_pair: NetnsPair, strongswan_factory: Callable[..., StrongSwan]) -> StrongSwan:
    netns_pair.peer.add_address("lo", "10.200.0.1/32")
    return strongswan_factory(netns_pair.peer)


def test_strongswan_gets_a_cookie_and_establishes_during_a_spoofed_flood(
    netns_pair: NetnsPair, gateway_factory: Callable[..., Gateway], peer: StrongSwan
) -> None:
    gateway = dos_gateway(
        netns_pair,
        gateway_factory,
        f"cookie-threshold = {COOKIE_THRESHOLD}\ninit-limit-half-open = {HALF_OPEN_LIMIT}\n",
    )
    ingress_pid = next(pid for name, pid in gateway.service_pids().items() if "ingress" in name)
    rss_before = rss_kib(ingress_pid)
    watch = Watch(gateway)
    watch.start()
    flooder = start_flood(netns_pair.peer, netns_pair.gw_v4, count=6000, rate=1500, duration=20)
    wait_for(
        lambda: gateway.counters("ingress").get("gate.cookie_sent", 0) > 200,
        timeout=30,
        what="cookies answered to the flood",
    )
    peer.load([peer_connection()], psks=[psk_for("a.peer.example")])
    peer.initiate(child="c-net", timeout=40)
    flood = flood_result(flooder)
    watch.stop.set()
    watch.join()

    (sa,) = peer.list_sas()
    assert sa["state"] == "ESTABLISHED"
    assert "N(COOKIE)" in peer.log_text()  # strongSwan was asked for a cookie and retried
    assert flood["sources"] >= 2000 and flood["sent"] >= 2000

    ingress = gateway.counters("ingress")
    ike = gateway.counters("ike")
    assert ingress["gate.cookie_valid"] >= 1  # only strongSwan can bring one back
    # most of the flood got a cookie (loosely: a loaded CI machine loses some in the socket)
    assert ingress["gate.cookie_sent"] >= flood["sent"] // 4
    # no DH for anything the gate stopped: the workers only saw what it forwarded,
    # the spoofed inits before cookies turned on, and strongSwan's
    assert ike["dh_computed"] <= ingress["gate.forwarded"]
    assert ike["dh_computed"] <= COOKIE_THRESHOLD + 2
    assert watch.samples >= 1
    assert watch.worker_half_open <= HALF_OPEN_LIMIT
    assert watch.ingress_half_open <= HALF_OPEN_LIMIT
    # the peaks each process kept: never above the limits, whatever the polling missed
    status = gateway.status()
    (worker,) = status["ike"]
    (front,) = status["ingress"]
    assert 1 <= worker["gauges"]["half_open_peak"] <= COOKIE_THRESHOLD + 1
    assert front["gauges"]["dos"]["half_open_peak"] <= HALF_OPEN_LIMIT
    assert rss_kib(ingress_pid) - rss_before < 64 * 1024  # loosely: no per-packet state kept
    events = gateway.log_events()
    assert any(e.get("event") == "cookies_on" for e in events)


def test_a_stalled_worker_fills_init_limit_job_load_and_nothing_more(
    netns_pair: NetnsPair, gateway_factory: Callable[..., Gateway]
) -> None:
    gateway = dos_gateway(
        netns_pair,
        gateway_factory,
        "cookie-threshold = 0\nblock-threshold = 0\ninit-limit-job-load = 3\n",
    )
    worker_pid = next(pid for name, pid in gateway.service_pids().items() if name.startswith("ike"))
    # the flood starts at once after the stop: ingress stops forwarding to a worker that has
    # not reported for three seconds (no_worker); this test is about the seconds before
    flooder = start_flood(netns_pair.peer, netns_pair.gw_v4, 10, 20, 10, on_go=True)
    ready(flooder)
    try:
        os.kill(worker_pid, signal.SIGSTOP)
        go(flooder)
        flood = flood_result(flooder)
        assert flood["sent"] == 10
        counters = wait_for(
            lambda: (
                (c := gateway.counters("ingress")).get("gate.forwarded", 0)
                + c.get("gate.dropped.limit.init-limit-job-load", 0)
                == 10
                and c
            ),
            timeout=20,
            what="ingress decided every init",
        )
        assert counters["gate.forwarded"] == 3
        assert counters["gate.dropped.limit.init-limit-job-load"] == 7
    finally:
        os.kill(worker_pid, signal.SIGCONT)
    ike = wait_for(
        lambda: (c := gateway.counters("ike")).get("dh_computed", 0) == 3 and c,
        timeout=20,
        what="the resumed worker answered the three",
    )
    assert ike["dh_computed"] == 3
    time.sleep(1.5)  # its snapshot shows them answered: the job load is free again
    status = gateway.status()
    assert status["ingress"][0]["gauges"]["dos"]["pending"] == 0
