"""The farm's JetStream buckets (shared/bus/kv.py) on a real nats-server: made with the
configured replicas, one made earlier with other settings used as it is, replicas a single
server cannot give and a server without JetStream each refused with one sentence."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

from ikefarm.shared.bus import kv
from ikefarm.shared.bus.embedded import EmbeddedNats, nats_server_binary
from ikefarm.shared.bus.runtime import Runtime, ServiceBase, ServiceUnavailable
from ikefarm.shared.config.loader import parse_config


@pytest.fixture(autouse=True)
def replicas_back() -> Iterator[None]:
    yield
    kv.use_replicas(1)


class Quiet(ServiceBase):
    name = "flow"


async def test_buckets_get_the_replicas_the_runtime_was_configured_with(
    nats_server: EmbeddedNats,
) -> None:
    kv.use_replicas(2)  # what another runtime of this process set: start() sets its own
    config = parse_config(f'[nats]\nurl = "{nats_server.url}"\nreplicas = 1\n')
    runtime = Runtime(Quiet, config, nats_server.url, instance="flow-kv")
    await runtime.start()
    try:
        assert kv.bucket_replicas() == 1
        bucket = await kv.open_bucket(runtime.nc, "ikefarm-test-r1", "a test", history=1)
        await bucket.put("k", b"v")
        info = await runtime.nc.jetstream().stream_info("KV_ikefarm-test-r1")
        assert info.config.num_replicas == 1
        # made before with other settings: used as it is (and logged), nothing lost
        again = await kv.open_bucket(runtime.nc, "ikefarm-test-r1", "a test", history=5)
        assert (await again.get("k")).value == b"v"
    finally:
        await runtime.stop()


async def test_replicas_a_single_server_cannot_give_are_refused(nats_server: EmbeddedNats) -> None:
    kv.use_replicas(3)
    nc = await nats.connect(nats_server.url)
    try:
        with pytest.raises(ServiceUnavailable, match=r"replicas = 3 needs a clustered JetStream"):
            await kv.open_bucket(nc, "ikefarm-test-r3", "a test", history=1)
    finally:
        await nc.close()


async def test_a_server_without_jetstream_is_refused_in_one_sentence(tmp_path: Path) -> None:
    process = subprocess.Popen(
        [nats_server_binary(), "--addr", "127.0.0.1", "--port", "-1",
         "--ports_file_dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        ports_file = tmp_path / f"{Path(nats_server_binary()).name}_{process.pid}.ports"
        for _ in range(200):
            if ports_file.exists() and ports_file.read_text().strip():
                break
            await asyncio.sleep(0.05)
        url = json.loads(ports_file.read_text())["nats"][0]
        nc = await nats.connect(url)
        try:
            with pytest.raises(ServiceUnavailable, match="enable JetStream"):
                await kv.open_bucket(nc, "ikefarm-test-none", "a test", history=1)
        finally:
            await nc.close()
    finally:
        process.terminate()
        process.wait(5)
