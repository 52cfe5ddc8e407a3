"""`ikefarm service ike --shard auto` (the compose stack's `--scale ike=N`): each worker
claims its own shard in a JetStream KV bucket, as the `ike` bus user, on a real nats-server
with the per-user authorization `ikefarm up` writes."""

from __future__ import annotations

import asyncio
from pathlib import Path

import nats
import pytest

from ikefarm.proto import subjects
from ikefarm.services.ike.service import IkeService
from ikefarm.services.ike.shard_claim import ShardClaim, ShardLost, claim_key
from ikefarm.shared.bus.auth import ensure_credentials, write_server_config
from ikefarm.shared.bus.embedded import EmbeddedNats
from ikefarm.shared.bus.runtime import Runtime
from ikefarm.shared.config.loader import load_config
from tests.harness.ports import udp_ports
from tests.service.test_ingress_dos import farm_config
from tests.service.test_ingress_service import wait_until

pytestmark = pytest.mark.timeout(90)


async def test_workers_started_together_claim_distinct_shards_and_free_them(
    tmp_path: Path,
) -> None:
    users = ensure_credentials(tmp_path / "auth")
    server_config = write_server_config(tmp_path / "auth", users)
    ike_port, natt_port = udp_ports(2)
    config = load_config(farm_config(tmp_path, ike_port, natt_port, ""))
    errors: list[str] = []
    with EmbeddedNats(tmp_path / "nats", config_file=server_config) as broker:

        def worker(name: str) -> Runtime:
            return Runtime(
                IkeService,
                config,
                broker.url,
                instance=name,
                options={"shard": "auto", "credentials": str(users["ike"].path)},
            )

        workers = [worker(f"ike-auto-{i}") for i in range(3)]
        # started at the same instant: the broker's atomic create decides, never both
        await asyncio.gather(*(w.start() for w in workers))
        try:
            shards = sorted(w.service.shard for w in workers)  # type: ignore[union-attr]
            assert shards == [0, 1, 2]
            # each learns the farm's size from the others' load reports
            await wait_until(
                lambda: all(w.service.admission.workers == 3 for w in workers),  # type: ignore[union-attr]
                timeout=15,
            )
            freed = next(w for w in workers if w.service.shard == 1)  # type: ignore[union-attr]
            await freed.stop()
            workers.remove(freed)
            # a stopped worker gives its shard back at once: the next one takes it
            late = worker("ike-auto-late")
            await late.start()
            workers.append(late)
            assert late.service.shard == 1  # type: ignore[union-attr]

            # the ike user may read the claims; nobody else may touch the bucket
            async def on_error(exc: Exception) -> None:
                errors.append(str(exc))

            ingress = users["ingress"]
            nc = await nats.connect(
                broker.url,
                user=ingress.user,
                password=ingress.password,
                inbox_prefix=subjects.inbox_prefix("ingress"),
                error_cb=on_error,
            )
            try:
                with pytest.raises(Exception):  # noqa: B017 - nats-py says timeout or no responders
                    kv = await nc.jetstream().key_value(subjects.IKE_SHARDS_BUCKET)
                    await kv.get(claim_key(0))
            finally:
                await nc.close()
            assert any("Permissions Violation" in e or "permissions" in e.lower() for e in errors)
        finally:
            for w in workers:
                await w.stop()


async def test_a_claim_taken_over_while_stopped_is_lost_not_shared(tmp_path: Path) -> None:
    with EmbeddedNats(tmp_path / "nats") as broker:
        first_nc = await nats.connect(broker.url)
        second_nc = await nats.connect(broker.url)
        try:
            first = ShardClaim(first_nc, "first")
            assert await first.claim() == 0
            second = ShardClaim(second_nc, "second")
            assert await second.claim() == 1
            # as if `first` had been stopped past the TTL and another took its key
            kv = await second_nc.jetstream().key_value(subjects.IKE_SHARDS_BUCKET)
            await kv.delete(claim_key(0))
            await kv.create(claim_key(0), b"usurper")
            with pytest.raises(ShardLost):
                await first.renew()
            await second.renew()  # an undisturbed claim renews
            entry = await kv.get(claim_key(1))
            assert entry.value == b"second"
        finally:
            await first_nc.close()
            await second_nc.close()
