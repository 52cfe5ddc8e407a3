"""Benchmark of SA snapshots (services/ike/sa_store.py; docs/failover.md).

In one process: an embedded nats-server with JetStream, a real keystore, and an
engine holding `--sas` established responder SAs (negotiated in memory by the
test engines of `tests/engine_helpers.py`). Measures:

- ``take``: CPU per SA of `engine.snapshot` + `to_json` + `SaSecrets.to_bytes`;
- ``single``: wall time of a flush with one dirty SA (one keystore seal request and
  one KV put, both waited for): the cost of an exchange on an otherwise idle worker;
- ``batched``: wall time of a flush with every SA dirty, per SA (what a busy worker pays:
  writes of one interval go out together);
- ``adopt``: wall time per SA of `SaStore.load` in a fresh engine (list, unseal, restore).

Run from the repository root: .venv/bin/python ops/bench/snapshot_cost.py [--sas N].
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ikefarm.proto import subjects
from ikefarm.services.ike import sa_store
from ikefarm.services.ike.sa_store import SaStore
from ikefarm.services.keystore.service import KeystoreService
from ikefarm.shared.bus.embedded import EmbeddedNats
from ikefarm.shared.bus.runtime import Runtime, ServiceBase
from ikefarm.shared.config.loader import parse_config
from ikefarm.shared.ikev2.engine import IkeEngine
from ikefarm.shared.ikev2.policy import engine_policy
from ikefarm.shared.ikev2.snapshot import SaSnapshot
from tests.engine_helpers import RESPONDER_TOML, config, pair

TEST_ONLY_MASTER_KEY = "0x" + "62656e63682d6d61737465722d6b65792d6f6e6c79"


class BenchClient(ServiceBase):
    """A bus client standing for the ike worker: only its connection and request() are used."""

    name = "ike"
    subsystem = "ike"
    description = "snapshot benchmark client"

    async def setup(self) -> None:
        pass


class Quiet:
    def control(self, *_args: object, **_fields: object) -> None:
        pass


def responder_engine() -> IkeEngine:
    return IkeEngine(engine_policy(config(RESPONDER_TOML)), shard=1)


def negotiated(count: int) -> IkeEngine:
    engine = responder_engine()
    for _ in range(count):
        wire = pair()
        wire.now = time.monotonic()
        wire.run(wire.initiator.engine.initiate("hq", "net", wire.now), wire.initiator)
        (sa,) = wire.responder.engine.sas.values()
        now = time.monotonic()
        state, secrets = wire.responder.engine.snapshot(sa, now)
        engine.restore(SaSnapshot.from_json(state.to_json()), secrets, now)
    return engine


async def run(count: int, workdir: Path) -> dict[str, Any]:
    os.environ["IKEFARM_MASTER_KEY"] = TEST_ONLY_MASTER_KEY
    engine = negotiated(count)
    sas = list(engine.sas.values())
    start = time.process_time()
    for sa in sas:
        state, secrets = engine.snapshot(sa, time.monotonic())
        state.to_json()
        secrets.to_bytes()
    take_us = (time.process_time() - start) / count * 1e6

    with EmbeddedNats(workdir / "nats") as broker:
        keystore_config = parse_config(f'[keystore]\nstore-file = "{workdir / "ks.bin"}"\n')
        keystore = Runtime(KeystoreService, keystore_config, broker.url, instance="ks")
        await keystore.start()
        worker = Runtime(BenchClient, parse_config(""), broker.url, instance="bench")
        await worker.start()
        try:
            assert worker.nc is not None
            kv = await sa_store.open_bucket(worker.nc)
            store = SaStore(worker, engine, 1, kv, Quiet())
            rounds = min(count, 200)
            start = time.perf_counter()
            for sa in sas[:rounds]:
                store.mark(sa.local_spi)
                await store.flush()
            single_ms = (time.perf_counter() - start) / rounds * 1e3
            for sa in sas:
                store.mark(sa.local_spi)
            start = time.perf_counter()
            written = await store.flush()
            batched_ms = (time.perf_counter() - start) / written * 1e3
            record = await kv.get(subjects.ike_sa_key(1, sas[0].local_spi))
            adopter = SaStore(worker, responder_engine(), 1, kv, Quiet())
            start = time.perf_counter()
            restored = await adopter.load()
            adopt_ms = (time.perf_counter() - start) / max(restored, 1) * 1e3
        finally:
            await worker.stop()
            await keystore.stop()
    return {
        "sas": count,
        "take_us_per_sa": round(take_us, 1),
        "single_flush_ms": round(single_ms, 2),
        "batched_flush_ms_per_sa": round(batched_ms, 3),
        "record_octets": len(record.value or b""),
        "adopt_ms_per_sa": round(adopt_ms, 3),
        "restored": restored,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sas", type=int, default=500)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(asyncio.run(run(args.sas, Path(tmp)))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
