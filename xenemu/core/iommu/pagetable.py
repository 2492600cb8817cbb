"""A domain's IOMMU page table: BFN -> entry, in 512-entry leaves as real hardware holds them.

Default entries (the ones Xen sets up so that PV-IOMMU-unaware guests keep working) are
*virtual* until a leaf is first written: the leaf is then filled from the domain's default
rule.  A 16 GiB guest's defaults thus cost nothing until touched, and 1M explicit 4K
mappings cost about 8 MiB.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Iterator

from xenemu.core.memory.leaves import LEAF_MASK, LEAF_SHIFT, LEAF_SIZE, LeafDirectory

DefaultRule = Callable[[int], int]
#: Whether every default entry of a leaf (by leaf index) is absent, so it can start zeroed.
BlankLeaf = Callable[[int], bool]


class PageTable:
    """BFN -> entry, with virtual default entries until a leaf is materialised."""

    #: Leaves written into being or given back by any table so far: the work they cost is
    #: charged to the batch that caused it (``preempt.LEAF_COST`` each).
    churn = 0

    __slots__ = ("blank", "default_rule", "directory", "emptied", "leaves", "sparse")

    def __init__(self, default_rule: DefaultRule, blank: BlankLeaf | None = None) -> None:
        self.leaves: dict[int, array[int]] = {}
        self.directory = LeafDirectory()
        self.default_rule = default_rule
        self.blank = blank
        #: Written leaves where no default entry can be (beyond the domain's memory): what a
        #: guest mapping sparse BFNs costs the daemon, charged against its leaf quota.
        self.sparse: set[int] = set()
        #: Whether entries were removed since the last ``sweep`` (so one may find empty leaves).
        self.emptied = False

    def get(self, bfn: int) -> int:
        leaf = self.leaves.get(bfn >> LEAF_SHIFT)
        if leaf is None:
            return self.default_rule(bfn)
        return leaf[bfn & LEAF_MASK]

    def leaf(self, bfn: int) -> array[int]:
        index = bfn >> LEAF_SHIFT
        leaf = self.leaves.get(index)
        if leaf is None:
            if self.blank is not None and self.blank(index):
                leaf = array("Q", bytes(LEAF_SIZE * 8))
                self.sparse.add(index)
            else:
                base = index << LEAF_SHIFT
                rule = self.default_rule
                leaf = array("Q", [rule(base + i) for i in range(LEAF_SIZE)])
            self.leaves[index] = leaf
            self.directory.note(index, leaf)
            PageTable.churn += 1
        return leaf

    def set(self, bfn: int, entry: int) -> None:
        self.leaf(bfn)[bfn & LEAF_MASK] = entry

    def clear(self, bfn: int) -> None:
        self.leaf(bfn)[bfn & LEAF_MASK] = 0
        self.emptied = True
        self.release_if_empty(bfn >> LEAF_SHIFT)

    def release_if_empty(self, index: int) -> None:
        """A leaf whose last entry went is given back at once if no default entry can be
        there (sparse, or its guest memory has gone since: its p2m leaf went)."""
        leaf = self.leaves.get(index)
        if leaf is None or any(leaf):
            return
        if index in self.sparse or (self.blank is not None and self.blank(index)):
            del self.leaves[index]
            self.directory.forget(index)
            self.sparse.discard(index)
            PageTable.churn += 1

    def sweep(self) -> int:
        """Release every sparse leaf that holds nothing (unmaps emptied it): its memory goes
        back.  Returns how many went."""
        self.emptied = False
        empty = [i for i in self.sparse if not any(self.leaves[i])]
        for index in empty:
            del self.leaves[index]
            self.directory.forget(index)
        self.sparse.difference_update(empty)
        return len(empty)

    def materialized(self) -> Iterator[tuple[int, int]]:
        """Present entries of written leaves, as (bfn, entry)."""
        for index, leaf in self.leaves.items():
            base = index << LEAF_SHIFT
            for i, entry in enumerate(leaf):
                if entry:
                    yield base + i, entry

    def is_materialized(self, bfn: int) -> bool:
        return (bfn >> LEAF_SHIFT) in self.leaves

    def bytes_used(self) -> int:
        return len(self.leaves) * LEAF_SIZE * 8
