"""A token bucket: at most `burst` events at once, refilled at `rate` per second.

One bucket per process and purpose (no state per source), so its memory cannot
grow with the number of senders; time is an argument (monotonic seconds).
"""

from __future__ import annotations

import math


class TokenBucket:
    def __init__(self, rate: float, burst: float) -> None:
        if not (math.isfinite(rate) and rate > 0 and math.isfinite(burst) and burst >= 1):
            raise ValueError("a token bucket needs rate > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._updated: float | None = None

    def allow(self, now: float) -> bool:
        """Take one token if there is one."""
        if self._updated is None:
            self._updated = now
        elif now > self._updated:
            self._tokens = min(self.burst, self._tokens + (now - self._updated) * self.rate)
            self._updated = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True
