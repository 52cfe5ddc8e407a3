"""The ingress user's cookie-secret KV traffic stays inside its allow-list (proto/subjects.py).

nats-py's KV watch is an ordered push consumer: it creates the consumer, asks for its
info (`$JS.API.CONSUMER.INFO...`), answers flow control and recreates the consumer
after a gap. Each of those publishes must be allowed, or the broker answers
`permissions violation` and the watch fails and restarts every second.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import nats

from ikefarm.proto import subjects
from ikefarm.services.ingress.cookie_secret import CookieSecretStore
from ikefarm.shared.bus.auth import ensure_credentials, write_server_config
from ikefarm.shared.bus.embedded import EmbeddedNats
from ikefarm.shared.dos.cookies import CookieJar

RUN_FOR = 6.0  # s: several watch restarts' worth, had any failed (each retries after 1 s)


async def _two_ingress_instances(
    url: str, user: str, password: str
) -> tuple[list[str], list[Counter[str]], list[list[CookieJar]]]:
    """Two ingress instances' cookie-secret stores, run for RUN_FOR s: the broker's errors,
    the stores' counters and the secrets each took."""
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    stores: list[CookieSecretStore] = []
    clients: list[nats.NATS] = []
    counters: list[Counter[str]] = []
    jars: list[list[CookieJar]] = []
    for _ in range(2):
        nc = await nats.connect(
            url,
            user=user,
            password=password,
            inbox_prefix=subjects.inbox_prefix(user),
            error_cb=on_error,
        )
        clients.append(nc)
        counter: Counter[str] = Counter()
        taken: list[CookieJar] = []
        store = CookieSecretStore(nc, lifetime=2.0, on_jar=taken.append, counters=counter)
        await store.start()
        stores.append(store)
        counters.append(counter)
        jars.append(taken)
    await asyncio.sleep(RUN_FOR)
    for store in stores:
        await store.stop()
    for nc in clients:
        await nc.close()
    return errors, counters, jars


async def test_ingress_cookie_secret_watch_runs_without_permissions_violations(
    tmp_path: Path,
) -> None:
    users = ensure_credentials(tmp_path / "auth")
    config = write_server_config(tmp_path / "auth", users)
    with EmbeddedNats(tmp_path / "nats", config_file=config) as broker:
        ingress = users["ingress"]
        errors, counters, jars = await _two_ingress_instances(
            broker.url, ingress.user, ingress.password
        )
    assert errors == []  # the broker refused nothing the ingress user sent
    for counter, taken in zip(counters, jars, strict=True):
        assert counter["cookie_secret_watch_failed"] == 0, dict(counter)
        assert counter["cookie_secret_refresh_failed"] == 0, dict(counter)
        assert len(taken) >= 2  # the first secret and at least one rotation
