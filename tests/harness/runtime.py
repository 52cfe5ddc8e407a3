"""A service runtime started on a test broker and stopped after the test."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from ikefarm.shared.bus.runtime import Runtime, ServiceBase
from ikefarm.shared.config.loader import Config


@asynccontextmanager
async def running(
    service: type[ServiceBase], config: Config, url: str, instance: str
) -> AsyncIterator[Runtime]:
    runtime = Runtime(service, config, url, instance=instance)
    await runtime.start()
    try:
        yield runtime
    finally:
        await runtime.stop()
