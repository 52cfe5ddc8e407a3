"""Connect to a broker as one of the farm's bus users (shared/bus/auth.py), collecting the
broker's refusals (permission violations) that nats-py reports through its error callback."""

from __future__ import annotations

import nats
from nats.aio.client import Client

from ikefarm.proto import subjects
from ikefarm.shared.bus.auth import BusUser


async def connect_as(url: str, user: BusUser, refusals: list[str]) -> Client:
    async def on_error(exc: Exception) -> None:
        refusals.append(str(exc))

    return await nats.connect(
        url,
        user=user.user,
        password=user.password,
        inbox_prefix=subjects.inbox_prefix(user.user),
        error_cb=on_error,
    )
