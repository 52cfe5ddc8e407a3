"""IKE and child SAs by state, for the metrics endpoint and `ikefarm status`.

The SA table keeps only the counts admission needs (half-open, established) up
to date at every change; a count per state for IKE and child SAs is a walk over
the worker's SAs. `StateCounts` makes that walk at most once every `interval`
seconds and answers the last result in between, so a scrape or a `status` costs
a walk at most that often and no datagram ever pays for it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from ikefarm.shared.ikev2.sa import ChildSaState, IkeSa, IkeSaState

STATE_COUNT_INTERVAL = 5.0  # s between two walks


def count_states(sas: Iterable[IkeSa]) -> dict[str, dict[str, int]]:
    """{"ike": {state: n}, "child": {state: n}}, every state present (0 when none)."""
    ike: Counter[str] = Counter({str(s): 0 for s in IkeSaState})
    child: Counter[str] = Counter({str(s): 0 for s in ChildSaState})
    for sa in sas:
        ike[str(sa.state)] += 1
        for c in sa.children:
            child[str(c.state)] += 1
    return {"ike": dict(ike), "child": dict(child)}


class StateCounts:
    def __init__(self, interval: float = STATE_COUNT_INTERVAL) -> None:
        self.interval = interval
        self._at = -float("inf")
        self._last: dict[str, dict[str, int]] = count_states(())

    def counts(self, sas: Iterable[IkeSa], now: float) -> dict[str, dict[str, int]]:
        if now - self._at >= self.interval:
            self._last = count_states(sas)
            self._at = now
        return self._last
