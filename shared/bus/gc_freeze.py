"""Keep a full garbage collection's pause from growing with what a process holds (issue 9).

CPython starts a full (generation 2) collection whenever the objects that survived
into the oldest generation since the last one grew by a quarter, and each walks
every tracked object not frozen. An ike worker holding 10,000-16,000 SAs paused
its event loop 1.1-1.7 s that way, every 5-9 s while its table grew, to free
nothing (ops/bench/RESULTS.md).

The policy here: after every full collection, `gc.freeze()` what survived it. The
next full collection then walks only what has become long-lived since, so its
pause follows the growth since the last one, not the table's size. Reference
counting still frees a frozen object (an SA deleted from its table); only a
reference cycle among frozen objects would stay: the engine's SAs, children and
tasks are freed by reference counting alone (tests/unit/test_gc_freeze.py). As a
safety valve for cycles elsewhere (a traceback held by a long-lived coroutine),
at most once per `UNFREEZE_INTERVAL` a full collection first unfreezes
everything, so it walks the whole heap and reclaims them: one long pause per
interval instead of one every few seconds.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

UNFREEZE_INTERVAL = 3600.0  # s between full collections that walk every object


class GcFreezePolicy:
    """Freeze the survivors of each full collection; unfreeze once per interval first.

    `clock` is injectable (tests); `install()`/`uninstall()` add and remove the
    `gc.callbacks` hook. `freezes` and `unfreezes` count what the policy did.
    """

    def __init__(
        self,
        interval: float = UNFREEZE_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval = interval
        self.clock = clock
        self.last_unfreeze = clock()
        self.freezes = 0
        self.unfreezes = 0

    def install(self) -> None:
        if self._hook not in gc.callbacks:
            gc.callbacks.append(self._hook)

    def uninstall(self) -> None:
        if self._hook in gc.callbacks:
            gc.callbacks.remove(self._hook)

    def _hook(self, phase: str, info: dict[str, Any]) -> None:
        if info.get("generation") != 2:
            return
        if phase == "start":
            now = self.clock()
            if now - self.last_unfreeze >= self.interval:
                # back into the oldest generation: this collection walks them all
                gc.unfreeze()
                self.last_unfreeze = now
                self.unfreezes += 1
        elif phase == "stop":
            gc.freeze()
            self.freezes += 1


def install() -> GcFreezePolicy:
    """Collect, freeze what exists (a service's imports), and keep freezing (module doc)."""
    gc.collect()
    gc.freeze()
    policy = GcFreezePolicy()
    policy.install()
    return policy
