"""Bounded interning of small immutable per-SA values (issue 9: memory per SA).

Every established SA holds its negotiated `Algorithms` and its children's traffic
selectors. They come from a handful of configured proposals and policies, so
thousands of SAs hold equal values; sharing one instance of each is invisible to
the code (they are frozen) and saves a few hundred octets per SA. The table is
bounded: values a peer can vary (its own addresses in narrowed selectors) stop
being interned once it is full, they are never refused or evicted.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import TypeVar

T = TypeVar("T", bound=Hashable)

INTERNED_MAX = 4096


class Interner:
    """`intern(value)` returns an equal instance seen before, or `value` itself."""

    __slots__ = ("_known", "limit")

    def __init__(self, limit: int = INTERNED_MAX) -> None:
        self._known: dict[Hashable, Hashable] = {}
        self.limit = limit

    def __len__(self) -> int:
        return len(self._known)

    def intern(self, value: T) -> T:
        known = self._known.get(value)
        if known is not None:
            return known  # type: ignore[return-value]
        if len(self._known) < self.limit:
            self._known[value] = value
        return value
