"""The emulated IOTLB: translations a device used, kept until a flush drops them.

It is what makes a missed flush observable: with a stale entry cached, a device still
reaches the old frame after the page table changed.
"""

from __future__ import annotations


class Iotlb:
    """A bounded cache of translations that a device used; only flushes make it current."""

    __slots__ = ("capacity", "entries", "hits", "misses")

    def __init__(self, capacity: int = 1024) -> None:
        self.entries: dict[int, int] = {}
        self.capacity = capacity
        self.hits = 0
        self.misses = 0

    def lookup(self, bfn: int) -> int | None:
        entry = self.entries.get(bfn)
        if entry is None:
            self.misses += 1
        else:
            self.hits += 1
        return entry

    def fill(self, bfn: int, entry: int) -> None:
        if len(self.entries) >= self.capacity:
            del self.entries[next(iter(self.entries))]
        self.entries[bfn] = entry

    def invalidate_all(self) -> None:
        self.entries.clear()
