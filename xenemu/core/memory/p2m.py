"""An HVM domain's physical-to-machine map, stored in 512-entry leaves like the page tables.

A dict of a million GFNs would cost ~100 MB of Python objects; leaves of machine words cost
4 KiB per 512 GFNs, so a guest's p2m stays a few bytes per page.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator

from xenemu.core.memory.leaves import LEAF_MASK, LEAF_SHIFT, LEAF_SIZE, LeafDirectory

ABSENT = -1


class P2M:
    __slots__ = ("_count", "_leaves", "directory", "log", "log_limit", "log_overflowed")

    def __init__(self) -> None:
        self._leaves: dict[int, array[int]] = {}
        self.directory = LeafDirectory()
        self._count = 0
        #: Log-dirty mode (a live migration): GFNs whose frame or contents changed since the
        #: migration last read the log; None when no migration tracks this domain. Every
        #: populate and depopulate passes through here, so the log cannot miss a p2m change.
        self.log: set[int] | None = None
        #: The most GFNs the log holds; past it the log empties and ``log_overflowed`` says
        #: "everything" (the next round sends every page), so churning GFNs costs no memory.
        self.log_limit = 0
        self.log_overflowed = False

    def note(self, gfn: int) -> None:
        """Log-dirty: ``gfn``'s frame or contents changed."""
        log = self.log
        if log is not None:
            log.add(gfn)
            if len(log) > self.log_limit:
                log.clear()
                self.log_overflowed = True

    def get(self, gfn: int) -> int | None:
        leaf = self._leaves.get(gfn >> LEAF_SHIFT)
        if leaf is None:
            return None
        mfn = leaf[gfn & LEAF_MASK]
        return None if mfn == ABSENT else mfn

    def directory_disagreements(self) -> list[int]:
        return self.directory.disagreements(self._leaves)

    def has_leaf(self, index: int) -> bool:
        """Whether any GFN of leaf ``index`` is populated (an emptied leaf goes)."""
        return index in self._leaves

    def add_leaf(self, index: int) -> None:
        """Grow leaf ``index`` with nothing populated in it (a restore rebuilding the leaves)."""
        if index not in self._leaves:
            leaf = self._leaves[index] = array("q", [ABSENT]) * LEAF_SIZE
            self.directory.note(index, leaf)

    def __contains__(self, gfn: int) -> bool:
        return self.get(gfn) is not None

    def __setitem__(self, gfn: int, mfn: int) -> None:
        if gfn < 0 or mfn < 0:
            raise ValueError("GFN and MFN must be non-negative")
        index = gfn >> LEAF_SHIFT
        leaf = self._leaves.get(index)
        if leaf is None:
            leaf = self._leaves[index] = array("q", [ABSENT]) * LEAF_SIZE
            self.directory.note(index, leaf)
        if leaf[gfn & LEAF_MASK] == ABSENT:
            self._count += 1
        leaf[gfn & LEAF_MASK] = mfn
        if self.log is not None:
            self.note(gfn)

    def pop(self, gfn: int) -> int | None:
        """Remove ``gfn``; its MFN, or None if it was not populated.  A leaf left empty goes
        back at once, so the p2m never holds more leaves than the domain has pages (a guest
        populating and giving back GFNs 512 apart used to leave 4 KiB behind each time)."""
        mfn = self.get(gfn)
        if mfn is not None:
            index = gfn >> LEAF_SHIFT
            leaf = self._leaves[index]
            leaf[gfn & LEAF_MASK] = ABSENT
            self._count -= 1
            if self.log is not None:
                self.note(gfn)
            if leaf.count(ABSENT) == LEAF_SIZE:
                del self._leaves[index]
                self.directory.forget(index)
        return mfn

    def leaf_indexes(self) -> list[int]:
        return list(self._leaves)

    @property
    def nr_leaves(self) -> int:
        return len(self._leaves)

    def __len__(self) -> int:
        return self._count

    def items(self) -> Iterator[tuple[int, int]]:
        for index in sorted(self._leaves):
            base = index << LEAF_SHIFT
            for i, mfn in enumerate(self._leaves[index]):
                if mfn != ABSENT:
                    yield base + i, mfn

    def keys(self) -> Iterator[int]:
        return iter(self.gfns())

    def gfns(self) -> list[int]:
        """Every populated GFN, ascending; a full leaf at C speed (a live migration's stop
        reads a large guest's whole p2m, and a Python step per GFN would be most of it)."""
        out: list[int] = []
        for index in sorted(self._leaves):
            leaf, base = self._leaves[index], index << LEAF_SHIFT
            if ABSENT not in leaf:
                out.extend(range(base, base + LEAF_SIZE))
            else:
                out.extend(base + i for i, mfn in enumerate(leaf) if mfn != ABSENT)
        return out

    def values(self) -> Iterator[int]:
        return (mfn for _, mfn in self.items())

    def take_leaf(self) -> list[int] | None:
        """Remove some leaf whole: the MFNs it held, None when no leaf is left (a dying
        domain's p2m goes a leaf at a time)."""
        if not self._leaves:
            return None
        index, leaf = self._leaves.popitem()
        self.directory.forget(index)
        mfns = [mfn for mfn in leaf if mfn != ABSENT]
        self._count -= len(mfns)
        return mfns

    def clear(self) -> None:
        self._leaves.clear()
        self.directory.clear()
        self._count = 0

    def bytes_used(self) -> int:
        return len(self._leaves) * LEAF_SIZE * 8
