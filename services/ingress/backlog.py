"""What ingress does first when datagrams come faster than it routes them.

Received datagrams wait here between the socket reads and the routing task. The
backlog is bounded and has three classes, served in this order:

1. `ESTABLISHED`: for an SA a worker holds (our SPI in the header, or an init
   route): an IKE_AUTH, a rekey, a DPD, a retransmitted IKE_SA_INIT. Losing one
   costs a peer a retransmission or its SA.
2. `RETURNS_COOKIE`: an IKE_SA_INIT that returns a cookie (N(COOKIE) first, RFC 7296
   2.6): the peer proved it receives at its address.
3. `NEW`: every other IKE_SA_INIT, and what will only be counted and dropped
   (malformed, wrong version): what a spoofed flood is made of.

The first two classes are served oldest first (an SA's exchanges keep their
order). New IKE_SA_INITs are served newest first: when they pile up under a
flood, the fresh ones are answered before their initiators retransmit, rather
than every one of them late; one that waited longer than `NEW_MAX_WAIT` is
dropped (its initiator has retransmitted or given up by then). When the backlog
is full a datagram of a better class takes the place of the oldest datagram of
the worst class waiting; otherwise the arriving one is dropped. Every drop is
counted by class (`dropped.backlog.<class>`, `dropped.backlog_stale.new`). Pure:
no clock, no I/O; the time is an argument.
"""

from __future__ import annotations

from collections import deque
from typing import Generic, TypeVar

from ikefarm.shared.ikev2.constants import IKE_HEADER_LENGTH, NotifyType, PayloadType

ESTABLISHED, RETURNS_COOKIE, NEW = 0, 1, 2
CLASS_NAMES = ("established", "cookie", "new")
NEW_MAX_WAIT = 1.0  # s: strongSwan retransmits after 1 s in the issue 9 benchmark
# an IKE_SA_INIT's first payload, when it is N(COOKIE): generic header (4 octets), then
# Protocol ID, SPI Size, Notify Message Type (RFC 7296 3.2, 3.10)
_NOTIFY_TYPE_AT = IKE_HEADER_LENGTH + 6

T = TypeVar("T")


def returns_cookie(message: bytes, next_payload: int) -> bool:
    """An IKE_SA_INIT (non-ESP marker stripped) whose first payload is N(COOKIE)."""
    if next_payload != PayloadType.NOTIFY or len(message) < _NOTIFY_TYPE_AT + 2:
        return False
    return int.from_bytes(message[_NOTIFY_TYPE_AT : _NOTIFY_TYPE_AT + 2], "big") == (
        NotifyType.COOKIE
    )


class Backlog(Generic[T]):
    """A bounded queue of three classes; the better class first (see the module)."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("backlog capacity must be at least 1")
        self.capacity = capacity
        self._classes: tuple[deque[tuple[float, T]], ...] = (deque(), deque(), deque())
        self._size = 0
        self.dropped = [0, 0, 0]  # by class: refused or evicted because the backlog was full
        self.stale = 0  # NEW items dropped at their turn for waiting too long
        self.peak = 0

    def __len__(self) -> int:
        return self._size

    def sizes(self) -> dict[str, int]:
        return {name: len(queue) for name, queue in zip(CLASS_NAMES, self._classes, strict=True)}

    def push(self, klass: int, item: T, now: float) -> int | None:
        """Queue `item`; returns the class of the datagram dropped to make room (maybe the
        arriving one), or None when nothing was dropped."""
        if self._size >= self.capacity:
            worst = next(
                (c for c in (NEW, RETURNS_COOKIE) if c > klass and self._classes[c]),
                None,
            )
            if worst is None:
                self.dropped[klass] += 1
                return klass
            self._classes[worst].popleft()
            self._size -= 1
            self.dropped[worst] += 1
            evicted: int | None = worst
        else:
            evicted = None
        self._classes[klass].append((now, item))
        self._size += 1
        self.peak = max(self.peak, self._size)
        return evicted

    def pop(self, now: float) -> T | None:
        """The next datagram to route, the best class first; None when empty."""
        for queue in self._classes[:NEW]:
            if queue:
                self._size -= 1
                return queue.popleft()[1]
        new = self._classes[NEW]
        while new and now - new[0][0] > NEW_MAX_WAIT:  # the oldest are at the left
            new.popleft()
            self._size -= 1
            self.stale += 1
        if new:
            self._size -= 1
            return new.pop()[1]
        return None
