"""Per-domain IOMMU contexts: compact page tables, an emulated IOTLB and deferred flushes.

A page-table entry is one 64-bit integer, ``mfn << 8 | kind << 2 | perms``, held in
512-entry leaves as real hardware holds them.  Default entries (the ones Xen sets up so
that PV-IOMMU-unaware guests keep working) are *virtual* until a leaf is first written:
the leaf is then filled from the domain's default rule.  A 16 GiB guest's defaults thus
cost nothing until touched, and 1M explicit 4K mappings cost about 8 MiB.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import IntEnum

LEAF_SHIFT = 9
LEAF_SIZE = 1 << LEAF_SHIFT
LEAF_MASK = LEAF_SIZE - 1

PERM_R = 1
PERM_W = 2
PERM_MASK = 3


class Kind(IntEnum):
    """Who put an entry there, which decides who may remove it and what it holds."""

    DEFAULT = 1  # Xen's, for PV-IOMMU-unaware guests; no reference
    MAP = 2  # map_page; holds a general (+ writable-type if W) reference
    MAP_NOREF = 3  # map_page with no_ref_cnt; holds nothing
    FOREIGN = 4  # owned by an M2B entry, which holds the references
    SCRATCH = 5  # a swapped foreign mapping, pointing at the scratch frame
    RMRR = 6  # identity-mapped reserved region of an assigned device
    GRANT = 7  # grant map at a caller-chosen BFN; holds references
    DOORBELL = 8  # the ITS doorbell (GITS_TRANSLATER) at the guest's vITS translation frame


def make_entry(mfn: int, kind: Kind, perms: int) -> int:
    return (mfn << 8) | (kind << 2) | perms


def entry_mfn(entry: int) -> int:
    return entry >> 8


def entry_kind(entry: int) -> Kind:
    return Kind((entry >> 2) & 15)


def entry_perms(entry: int) -> int:
    return entry & PERM_MASK


class FlushType(IntEnum):
    """Seed 002's flush types, ordered so that the batch flushes at the highest."""

    NONE = 0
    ADDED = 1
    MODIFIED = 2


DefaultRule = Callable[[int], int]
#: Whether every default entry of a leaf (by leaf index) is absent, so it can start zeroed.
BlankLeaf = Callable[[int], bool]


class LeafDirectory:
    """The addresses of a table's leaves by leaf index, so compiled code can walk the table.

    Leaves are fixed-size arrays that live as long as their table, so their addresses hold;
    the directory itself may move when it grows, so readers take ``where()`` afresh.  Leaves
    past ``LIMIT`` (a 2 TiB address space) are left out: only Python reaches them.
    """

    LIMIT = 1 << 20
    __slots__ = ("addresses",)

    def __init__(self) -> None:
        self.addresses = array("Q")

    def note(self, index: int, leaf: array[int]) -> None:
        if index >= self.LIMIT:
            return
        have = len(self.addresses)
        if index >= have:
            grow = min(max(index + 1, 2 * have, 64), self.LIMIT) - have
            self.addresses.frombytes(bytes(8 * grow))
        self.addresses[index] = leaf.buffer_info()[0]

    def where(self) -> tuple[int, int]:
        """(address, length) of the directory."""
        return self.addresses.buffer_info()

    def clear(self) -> None:
        self.addresses = array("Q")

    def disagreements(self, leaves: dict[int, array[int]]) -> list[int]:
        """Leaf indexes whose directory slot does not hold that leaf's address (for the audit)."""
        wrong = [i for i, leaf in leaves.items() if i < self.LIMIT and self.addresses[i] != leaf.buffer_info()[0]]
        return wrong + [i for i, address in enumerate(self.addresses) if address and i not in leaves]


class PageTable:
    """BFN -> entry, with virtual default entries until a leaf is materialised."""

    __slots__ = ("blank", "default_rule", "directory", "leaves")

    def __init__(self, default_rule: DefaultRule, blank: BlankLeaf | None = None) -> None:
        self.leaves: dict[int, array[int]] = {}
        self.directory = LeafDirectory()
        self.default_rule = default_rule
        self.blank = blank

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
            else:
                base = index << LEAF_SHIFT
                rule = self.default_rule
                leaf = array("Q", [rule(base + i) for i in range(LEAF_SIZE)])
            self.leaves[index] = leaf
            self.directory.note(index, leaf)
        return leaf

    def set(self, bfn: int, entry: int) -> None:
        self.leaf(bfn)[bfn & LEAF_MASK] = entry

    def clear(self, bfn: int) -> None:
        self.leaf(bfn)[bfn & LEAF_MASK] = 0

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


@dataclass
class DmaFault:
    bdf: str
    bfn: int
    write: bool
    reason: str


@dataclass(eq=False)
class IommuContext:
    """One domain's IOMMU state: what its devices see."""

    domid: int
    table: PageTable
    iotlb: Iotlb = field(default_factory=Iotlb)
    #: RMRR BFNs -> how many assigned devices reserve them.
    rmrr: dict[int, int] = field(default_factory=dict)
    #: Doorbell BFNs -> the pITS behind them (also in ``rmrr``: no subop may touch them).
    doorbells: dict[int, int] = field(default_factory=dict)
    #: Scratch entries' BFN -> the IOREQ server they belong to.
    scratch: dict[int, int] = field(default_factory=dict)
    pending_flush: FlushType = FlushType.NONE
    flushes: dict[str, int] = field(default_factory=lambda: {"added": 0, "modified": 0})
    #: When False, flushes are counted but the IOTLB keeps its entries (tests only).
    flush_enabled: bool = True
    faults: list[DmaFault] = field(default_factory=list)
    fault_count: int = 0

    def note(self, flush: FlushType) -> None:
        if flush > self.pending_flush:
            self.pending_flush = flush

    def flush(self) -> FlushType:
        """Apply the pending flush once, at the highest type accumulated."""
        flush = self.pending_flush
        if flush is FlushType.NONE:
            return flush
        self.pending_flush = FlushType.NONE
        self.flushes[flush.name.lower()] += 1
        if flush is FlushType.MODIFIED and self.flush_enabled:
            self.iotlb.invalidate_all()
        return flush

    def record_fault(self, fault: DmaFault, keep: int = 256) -> None:
        self.fault_count += 1
        self.faults.append(fault)
        if len(self.faults) > keep:
            del self.faults[0]
