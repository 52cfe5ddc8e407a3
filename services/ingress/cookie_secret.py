"""The farm's cookie secret in a JetStream KV bucket, so every ingress accepts every cookie.

One record (`CookieSecrets`: current and previous secret) under
`subjects.COOKIE_RECORD`. The first instance creates it (`create` fails
for the others, who read it); when the current secret is `lifetime` old any
instance rotates it with a compare-and-set on the revision it read, so exactly
one rotation wins and the others take the winner's record from the watch.
The secret exists only in the store and in each instance's memory: no log
line, span, exception or other subject carries it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
from typing import Any

from nats.aio.client import Client
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, ServiceUnavailableError

from ikefarm.proto import envelope, subjects
from ikefarm.proto.envelope import BusError
from ikefarm.proto.messages import CookieSecrets
from ikefarm.shared.bus.kv import bucket_replicas
from ikefarm.shared.bus.runtime import ServiceUnavailable
from ikefarm.shared.dos.cookies import CookieJar, first_record, jar_from_record, rotated
from ikefarm.shared.observability.logging import get_logger

log = get_logger("network")
CHECK_EVERY = 2.0  # s at most between two looks at the record's age


class CookieSecretStore:
    def __init__(
        self,
        nc: Client,
        lifetime: float,
        on_jar: Callable[[CookieJar], None],
        counters: Any,
        random: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.nc = nc
        self.lifetime = lifetime
        self.on_jar = on_jar
        self.counters = counters
        self.random = random
        self.version: int | None = None
        self._kv: Any = None
        self._tasks: list[asyncio.Task[None]] = []
        self._rewatch = asyncio.Event()

    async def start(self) -> None:
        js = self.nc.jetstream()
        try:
            self._kv = await js.create_key_value(
                bucket=subjects.COOKIE_SECRET_BUCKET, history=1, replicas=bucket_replicas()
            )
        except ServiceUnavailableError:
            raise ServiceUnavailable(
                "ingress keeps the farm's cookie secret in a JetStream KV bucket "
                f"({subjects.COOKIE_SECRET_BUCKET}): enable JetStream on the NATS server "
                "(nats-server -js)"
            ) from None
        await self.refresh(create=True)
        self._tasks.append(asyncio.create_task(self._rotate_loop(), name="cookie-rotate"))
        self._tasks.append(asyncio.create_task(self._watch_loop(), name="cookie-watch"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()

    def _take(self, raw: bytes) -> CookieSecrets | None:
        try:
            record = envelope.unpack(raw, CookieSecrets)
            jar = jar_from_record(record)
        except (BusError, ValueError) as exc:
            # the reason only: never the record, which holds the secret
            self.counters["cookie_secret_unusable"] += 1
            log.control("cookie_secret_unusable", reason=getattr(exc, "code", "bad_record"))
            return None
        if record.version != self.version:
            self.version = record.version
            self.on_jar(jar)
            log.control("cookie_secret_loaded", version=record.version)
        return record

    async def refresh(self, create: bool = False) -> None:
        """Read the record (creating it when absent), rotate it when it is due."""
        try:
            entry = await self._kv.get(subjects.COOKIE_RECORD)
        except KeyNotFoundError:
            if not create and self.version is None:
                return
            fresh = first_record(time.time(), self.random)
            try:
                await self._kv.create(subjects.COOKIE_RECORD, envelope.pack(fresh))
                self._take(envelope.pack(fresh))
                return
            except Exception:  # another instance created it first: read theirs
                entry = await self._kv.get(subjects.COOKIE_RECORD)
        record = self._take(entry.value or b"")
        if record is None:
            # unusable record: replace it, compare-and-set so only one instance does
            replacement = first_record(time.time(), self.random)
            with contextlib.suppress(KeyWrongLastSequenceError):
                await self._kv.update(
                    subjects.COOKIE_RECORD, envelope.pack(replacement), last=entry.revision
                )
                self._take(envelope.pack(replacement))
            return
        successor = rotated(record, time.time(), self.lifetime, self.random)
        if successor is None:
            return
        try:
            await self._kv.update(
                subjects.COOKIE_RECORD, envelope.pack(successor), last=entry.revision
            )
        except KeyWrongLastSequenceError:
            self.counters["cookie_secret_rotation_lost"] += 1
            return  # another instance rotated: its record comes through the watch
        self.counters["cookie_secret_rotated"] += 1
        self._take(envelope.pack(successor))

    async def _rotate_loop(self) -> None:
        while True:
            await asyncio.sleep(min(CHECK_EVERY, self.lifetime / 4))
            try:
                await self.refresh(create=True)
            except Exception as exc:  # broker away: keep the secrets we have, try again
                self.counters["cookie_secret_refresh_failed"] += 1
                log.debug("cookie_secret_refresh_failed", error=type(exc).__name__)

    def rewatch(self) -> None:
        """Start a new watch (after a reconnect: a watch does not survive a server restart,
        see Runtime.on_reconnect); the new one delivers the current record first."""
        self._rewatch.set()

    async def _follow(self, watcher: Any) -> None:
        async for entry in watcher:
            if entry is not None and entry.value:
                self._take(entry.value)

    async def _watch_loop(self) -> None:
        while True:
            try:
                self._rewatch.clear()
                watcher = await self._kv.watch(subjects.COOKIE_RECORD)
                follow = asyncio.create_task(self._follow(watcher))
                asked = asyncio.create_task(self._rewatch.wait())
                try:
                    done, _ = await asyncio.wait(
                        {follow, asked}, return_when=asyncio.FIRST_COMPLETED
                    )
                finally:
                    follow.cancel()
                    asked.cancel()
                    with contextlib.suppress(Exception):
                        await watcher.stop()
                if asked in done:
                    self.counters["cookie_secret_rewatched"] += 1
                    continue
                if not follow.cancelled() and follow.exception() is not None:
                    self.counters["cookie_secret_watch_failed"] += 1
                await asyncio.sleep(1.0)  # the watch ended: start another
            except Exception as exc:
                self.counters["cookie_secret_watch_failed"] += 1
                log.debug("cookie_secret_watch_failed", error=type(exc).__name__)
                await asyncio.sleep(1.0)
