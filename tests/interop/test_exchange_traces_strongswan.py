"""One trace per IKE exchange, seen by a real OTLP/HTTP receiver (tests/harness/otlp_receiver,
written for the tests: the collector's image cannot be had here) while a real strongSwan
establishes with `ikefarm up`: IKE_AUTH through ingress, ike, keystore and kernel is one
connected trace; DPD is a trace of its own linked to the SA's, and its retransmissions
(strongSwan paused) are spans of that same trace."""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.harness.gateway import Gateway
from tests.harness.netns import NetnsPair, wait_for
from tests.harness.strongswan import Psk, StrongSwan, net_to_net

pytestmark = [pytest.mark.interop, pytest.mark.timeout(180)]

PSK = "trace-psk-0c9b27e4f1a86d53"
RECEIVER_PORT = 4318  # inside the gateway's own namespace
ROOT = Path(__file__).resolve().parents[2]


def spans(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def by_trace(found: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    traces: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for span in found:
        traces[span["trace_id"]].append(span)
    return traces


def assert_connected(trace: list[dict[str, Any]]) -> dict[str, Any]:
    """Exactly one root, every other span's parent in the trace: returns the root."""
    ids = {s["span_id"] for s in trace}
    roots = [s for s in trace if not s["parent_span_id"]]
    assert len(roots) == 1, [s["name"] for s in roots]
    orphans = [s["name"] for s in trace if s["parent_span_id"] and s["parent_span_id"] not in ids]
    assert not orphans, orphans
    return roots[0]


def connected(trace: list[dict[str, Any]]) -> bool:
    ids = {s["span_id"] for s in trace}
    return all(not s["parent_span_id"] or s["parent_span_id"] in ids for s in trace)


def exchange_spans(found: list[dict[str, Any]], name: str, **attrs: Any) -> list[dict[str, Any]]:
    return [
        s
        for s in found
        if s["name"] == name
        and all(s["attributes"].get(f"ikefarm.ike.{k}") == v for k, v in attrs.items())
    ]


def test_each_exchange_is_one_connected_trace_and_dpd_retransmits_join_theirs(
    netns_pair: NetnsPair,
    gateway_factory: Callable[..., Gateway],
    strongswan_factory: Callable[..., StrongSwan],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "spans.jsonl"
    netns_pair.gw.popen(
        [sys.executable, "-m", "tests.harness.otlp_receiver", "127.0.0.1", str(RECEIVER_PORT),
         str(out)],
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    probe = f"import socket; socket.create_connection(('127.0.0.1', {RECEIVER_PORT}), 1)"
    wait_for(
        lambda: netns_pair.gw.run([sys.executable, "-c", probe], check=False).returncode == 0,
        timeout=15,
        what="the OTLP receiver listening",
    )
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "200")  # export spans within 0.2 s
    gateway = gateway_factory(
        netns_pair.gw,
        psk=PSK,
        ike_template_extra='dpd-delay = "1s"',
        extra=(
            "[ike.global-options]\nretransmit-tries = 3\nretransmit-timeout = 1.0\n"
            f'retransmit-base = 1.2\n[telemetry]\notlp-endpoint = "http://127.0.0.1:{RECEIVER_PORT}"\n'
        ),
    )
    netns_pair.peer.add_address("lo", "10.200.0.1/32")
    peer = strongswan_factory(netns_pair.peer)
    peer.load(
        [net_to_net()],
        psks=[Psk(PSK, ["a.peer.example", "gw.example"])],
    )
    peer.initiate(child="c-net", timeout=20)
    (sa,) = peer.list_sas()
    spi_i = sa["initiator-spi"]

    # IKE_AUTH: one trace from the datagram ingress received to the kernel's install
    def auth_trace() -> list[dict[str, Any]] | None:
        found = spans(out)
        starts = exchange_spans(found, "ike.exchange IKE_AUTH", spi_i=spi_i, response=False)
        if not starts:
            return None
        trace = by_trace(found)[starts[0]["trace_id"]]
        services = {s["service"] for s in trace}
        wanted = {"ikefarm-ingress", "ikefarm-ike", "ikefarm-keystore", "ikefarm-kernel"}
        # each process exports on its own schedule: wait for the response's spans too
        sent = {"ike.send IKE_AUTH", "ingress.datagram-out"} <= {s["name"] for s in trace}
        return trace if wanted <= services and sent and connected(trace) else None

    trace = wait_for(auth_trace, timeout=30, what=f"the IKE_AUTH trace: {gateway.log_tail()}")
    assert trace is not None
    root = assert_connected(trace)
    assert root["service"] == "ikefarm-ingress"
    names = [s["name"] for s in trace]
    assert "ike.send IKE_AUTH" in names  # the response left in the same trace
    (response,) = [s for s in trace if s["name"] == "ike.send IKE_AUTH"]
    # what came of the exchange, on the span of the response that announces it
    assert response["attributes"]["ikefarm.vpn"] == "rw"
    assert "ike-established" in response["attributes"]["ikefarm.outcome"]
    init = exchange_spans(spans(out), "ike.exchange IKE_SA_INIT", spi_i=spi_i)
    assert init and init[0]["trace_id"] != root["trace_id"]  # another exchange, another trace
    auth_span = exchange_spans(trace, "ike.exchange IKE_AUTH", spi_i=spi_i)[0]

    # DPD: the worker's own request opens a trace linked to the SA's latest exchange,
    # and strongSwan's response joins it
    def dpd_answered() -> list[dict[str, Any]] | None:
        found = spans(out)
        for send in exchange_spans(found, "ike.send INFORMATIONAL", spi_i=spi_i, response=False):
            if send["parent_span_id"]:
                continue
            trace = by_trace(found)[send["trace_id"]]
            answered = exchange_spans(trace, "ike.exchange INFORMATIONAL", response=True)
            if answered and connected(trace):
                return trace
        return None

    dpd = wait_for(dpd_answered, timeout=30, what="a DPD exchange answered")
    assert dpd is not None
    assert_connected(dpd)
    first_dpd = min(
        (
            s
            for s in spans(out)
            if s["name"] == "ike.send INFORMATIONAL" and not s["parent_span_id"]
        ),
        key=lambda s: s["attributes"]["ikefarm.ike.message_id"],
    )
    assert {"trace_id": auth_span["trace_id"], "span_id": auth_span["span_id"]} in first_dpd[
        "links"
    ]

    # strongSwan stops answering: the DPD request is retransmitted inside its trace
    peer.pause()
    try:

        def retransmitted() -> list[dict[str, Any]] | None:
            found = spans(out)
            for trace in by_trace(found).values():
                sends = exchange_spans(trace, "ike.send INFORMATIONAL", response=False)
                if len(sends) >= 2:
                    return sends
            return None

        sends = wait_for(retransmitted, timeout=30, what="a DPD retransmission")
        assert sends is not None
        (first,) = [s for s in sends if not s["parent_span_id"]]
        again = [s for s in sends if s["parent_span_id"]]
        assert again and all(s["parent_span_id"] == first["span_id"] for s in again)
        assert {s["attributes"]["ikefarm.ike.message_id"] for s in sends} == {
            first["attributes"]["ikefarm.ike.message_id"]
        }
        assert all(s["attributes"]["ikefarm.ike.joined_exchange"] for s in again)
        # SPIs travel as attributes, never keys: nothing else of the SA's secrets
        for span in spans(out):
            assert PSK not in json.dumps(span)
    finally:
        peer.resume()
