"""JetStream KV buckets the services keep farm state in, opened (created) with one message
for a NATS server without JetStream.

Replicas: every bucket a process creates gets `[nats] replicas` copies (3 on a 3-node
cluster, JetStream R3, so a node that dies loses no SA snapshot and no shard lease); the
runtime sets it once per process (`use_replicas`) before its service creates any bucket.
A bucket that exists already with other settings (made before `replicas` changed) is used
as it is, and that is logged: `nats stream edit KV_<bucket> --replicas N` changes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import BadRequestError, ServerError, ServiceUnavailableError

from ikefarm.shared.bus.runtime import ServiceUnavailable
from ikefarm.shared.observability.logging import get_logger

# a clustered JetStream answers "temporarily unavailable" while it elects its leaders (a
# cluster starting, a node that died): asked again for this long before giving up
UNAVAILABLE_WAIT = 20.0
REPLICAS_NOT_CLUSTERED = 10074  # JetStream: "replicas > 1 not supported in non-clustered mode"
log = get_logger("daemon")
_replicas = 1


def use_replicas(count: int) -> None:
    """The replicas of every bucket this process creates from now on (`[nats] replicas`)."""
    global _replicas
    _replicas = max(1, int(count))


def bucket_replicas() -> int:
    return _replicas


async def open_bucket(nc: Any, bucket: str, purpose: str, **options: Any) -> Any:
    """The KV bucket `bucket` (created with `options` and the process's replicas if new);
    `purpose` says who needs it in the refusal when the server has no JetStream."""
    js = nc.jetstream()
    options.setdefault("replicas", bucket_replicas())
    deadline = time.monotonic() + UNAVAILABLE_WAIT
    while True:
        try:
            return await js.create_key_value(bucket=bucket, **options)
        except BadRequestError as exc:
            # it exists with other settings: use it as it is, say so
            log.audit("kv_bucket_settings_differ", bucket=bucket, error=exc.description or "")
            return await js.key_value(bucket)
        except ServerError as exc:
            if exc.err_code == REPLICAS_NOT_CLUSTERED:
                raise ServiceUnavailable(
                    f"[nats] replicas = {options['replicas']} needs a clustered JetStream "
                    f"(3 nodes for 3 replicas); this NATS is one node ({bucket})"
                ) from None
            raise
        except ServiceUnavailableError as exc:
            if exc.err_code is not None and time.monotonic() < deadline:
                await asyncio.sleep(0.5)  # JetStream is there, not ready yet
                continue
            raise ServiceUnavailable(
                f"{purpose} in a JetStream KV bucket ({bucket}): enable JetStream on the NATS "
                "server (nats-server -js)"
            ) from None


LIST_TIMEOUT = 5.0  # s: the longest wait for the first entry of a listing
LIST_GRACE = 0.3  # s: entries still coming after the watcher said it had none


async def list_entries(
    kv: Any, keys: str = ">", *, ignore_deletes: bool = False, timeout: float = LIST_TIMEOUT
) -> list[Any]:
    """The last entry of every key matching `keys` (delete markers too unless
    `ignore_deletes`), read with a KV watcher.

    The watcher's "nothing more" marker (None) is not to be trusted alone: when the
    server delivers every entry before the watcher has read its consumer's info, the
    marker comes first and the entries after it. So the listing ends at the entry
    the server says is the last (no message pending after it), or, once the marker was
    seen, when nothing more arrives for `LIST_GRACE` seconds."""
    watcher = await kv.watch(keys, ignore_deletes=ignore_deletes)
    entries: list[Any] = []
    marker = False
    try:
        while True:
            try:
                entry = await watcher.updates(timeout=LIST_GRACE if marker else timeout)
            except (TimeoutError, NatsTimeoutError):
                if marker:
                    break
                raise
            if entry is None:
                marker = True
                continue
            entries.append(entry)
            if entry.delta == 0:
                break  # the server had nothing pending after this one
    finally:
        # the listing is complete; a failed unsubscribe changes nothing
        with contextlib.suppress(Exception):
            await watcher.stop()
    return entries
