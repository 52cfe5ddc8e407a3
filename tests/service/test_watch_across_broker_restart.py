"""A JetStream watch does not survive a restart of the nats-server (nats-py's ordered consumer
just stops: nothing arrives, nothing ends it); the runtime tells its owners after a reconnect
(`Runtime.on_reconnect`) and the ingress cookie-secret store starts a new watch, which brings
the current record and every later one (docs/failover.md)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path
from typing import Any

import nats
import pytest

from ikefarm.proto import envelope, subjects
from ikefarm.services.ingress import cookie_secret
from ikefarm.services.ingress.cookie_secret import CookieSecretStore
from ikefarm.shared.bus.embedded import EmbeddedNats
from ikefarm.shared.bus.runtime import Runtime, ServiceBase
from ikefarm.shared.config.loader import parse_config
from ikefarm.shared.dos.cookies import CookieJar, first_record

pytestmark = pytest.mark.timeout(60)


async def until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


class Quiet(ServiceBase):
    name = "ingress"


async def test_the_cookie_secret_watch_is_started_again_after_a_broker_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # no periodic look at the record in this test: only the watch can bring a new one
    monkeypatch.setattr(cookie_secret, "CHECK_EVERY", 3600.0)
    broker = EmbeddedNats(tmp_path / "nats")
    broker.start()
    runtime = Runtime(Quiet, parse_config(""), broker.url, instance="ingress-w")
    writer: nats.NATS | None = None
    store: CookieSecretStore | None = None
    try:
        await runtime.start()
        assert runtime.nc is not None
        counters: Counter[str] = Counter()
        jars: list[CookieJar] = []
        store = CookieSecretStore(runtime.nc, 3600.0, jars.append, counters)
        await store.start()
        runtime.on_reconnect(store.rewatch)
        first_version = store.version
        assert first_version is not None and len(jars) == 1
        await asyncio.sleep(1.0)  # its watch is in place (one made during the outage waits
        # for its request to time out, fails and is made again: the same outcome, later)

        broker.process.kill()  # type: ignore[union-attr]
        broker.process.wait()  # type: ignore[union-attr]
        broker.process = None
        broker.start()  # same port, same store
        await until(lambda: runtime.counters["nats_reconnects"] >= 1, 15, "reconnected")

        # another ingress instance rotates the secret: it arrives through the new watch
        writer = await nats.connect(broker.url)
        kv = await writer.jetstream().key_value(subjects.COOKIE_SECRET_BUCKET)
        newer = first_record(time.time(), lambda n: b"\x07" * n)
        newer = type(newer)(version=first_version + 1, key=newer.key, created=newer.created)
        await kv.put(subjects.COOKIE_RECORD, envelope.pack(newer))
        await until(lambda: store is not None and store.version == first_version + 1, 20, "seen")
        assert len(jars) == 2
        assert counters["cookie_secret_rewatched"] + counters["cookie_secret_watch_failed"] >= 1
    finally:
        if store is not None:
            await store.stop()
        if writer is not None:
            await writer.close()
        await runtime.stop()
        broker.stop()
