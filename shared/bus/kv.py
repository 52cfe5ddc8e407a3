"""JetStream KV buckets the services keep farm state in, opened (created) with one message
for a NATS server without JetStream."""

from __future__ import annotations

from typing import Any

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
