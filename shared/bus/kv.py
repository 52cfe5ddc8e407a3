"""JetStream KV buckets the services keep farm state in, opened (created) with one message
for a NATS server without JetStream."""

from __future__ import annotations

import contextlib
from typing import Any

from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import ServiceUnavailableError

from ikefarm.shared.bus.runtime import ServiceUnavailable


async def open_bucket(nc: Any, bucket: str, purpose: str, **options: Any) -> Any:
    """The KV bucket `bucket` (created with `options` if new); `purpose` says who needs it
    in the refusal when the server has no JetStream."""
    try:
        return await nc.jetstream().create_key_value(bucket=bucket, **options)
    except ServiceUnavailableError:
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
