"""The ike worker's load reports over a real nats-server: incremental per-peer counts.

With a per-peer limit on (block-threshold), a worker's IkeLoad carries its whole table of
half-open SAs per peer at most every interval and in between only the peers whose count
changed; merged by the receivers' own code (FarmLoad), they always give the worker's
table. With no per-peer limit, no per-peer counts travel at all.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import nats
import pytest
from nats.aio.msg import Msg

from ikefarm.proto import envelope, subjects
from ikefarm.proto.messages import Datagram, IkeLoad
from ikefarm.services.ike.service import IkeService
from ikefarm.shared.bus.embedded import EmbeddedNats
from ikefarm.shared.bus.runtime import Runtime, subscriptions_in_place
from ikefarm.shared.config.loader import parse_config
from ikefarm.shared.dos.load import FarmLoad
from tests.dos_helpers import init_requests
from tests.engine_helpers import RESPONDER_TOML
from tests.service.test_ingress_service import wait_until

pytestmark = pytest.mark.timeout(60)

PEERS = ["198.51.100.1", "198.51.100.2", "198.51.100.3"]


async def run_worker(nats_server: EmbeddedNats, dos: str, sends: list[str]) -> list[IkeLoad]:
    """A worker answering IKE_SA_INIT from `sends` (one peer address each); its reports."""
    config = parse_config(
        RESPONDER_TOML.format(extra="", extra_vpn="")
        + f"\n[ike.global-options.dos-protection]\ncookie-threshold = 0\n{dos}"
    )
    worker = Runtime(IkeService, config, nats_server.url, instance="ike-1", options={"shard": 1})
    client = await nats.connect(nats_server.url)
    reports: list[IkeLoad] = []

    async def on_load(msg: Msg) -> None:
        reports.append(envelope.unpack(msg.data, IkeLoad))

    await client.subscribe(subjects.IKE_LOAD, cb=on_load)
    await subscriptions_in_place(client)
    await worker.start()
    try:
        for n, (peer, data) in enumerate(zip(sends, init_requests(len(sends)), strict=True)):
            datagram = Datagram("192.0.2.1", 500, peer, 500 + n, data, via="ingress-0")
            await client.publish(subjects.IKE_INIT, envelope.pack(datagram))
            await client.flush()
            await asyncio.sleep(0.05)  # reports between the inits, not one for all
        service = worker.service
        assert isinstance(service, IkeService)
        await wait_until(lambda: service.engine.sas.responder_half_open == len(sends))
        # a full table comes at most an interval after the last change
        await wait_until(lambda: any(r.peers_full and r.half_open == len(sends) for r in reports))
    finally:
        await worker.stop()
        await client.close()
    return reports


async def test_reports_carry_changed_peers_and_merge_into_the_worker_table(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    sends = [PEERS[0], PEERS[1], PEERS[0], PEERS[2], PEERS[0]]
    reports = await run_worker(nats_server, "block-threshold = 5", sends)
    assert any(not r.peers_full for r in reports)  # deltas travelled
    # no delta repeats the whole table: each names only what changed since the one before
    assert all(len(r.half_open_peers) <= 2 for r in reports if not r.peers_full)
    farm = FarmLoad("ingress-0")
    now = time.monotonic()
    for report in reports:
        assert farm.update_shard(report, now) is None
    expected = {PEERS[0]: 3, PEERS[1]: 1, PEERS[2]: 1}
    assert {p: farm.peer_half_open(p, now, exclude_shard=9) for p in PEERS} == expected


async def test_without_a_per_peer_limit_no_peer_counts_travel(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    reports = await run_worker(nats_server, "block-threshold = 0", PEERS)
    assert reports and all(r.peers_full and r.half_open_peers == {} for r in reports)
    assert max(r.half_open for r in reports) == len(PEERS)
