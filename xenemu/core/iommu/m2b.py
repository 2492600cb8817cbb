"""The M2B: for each machine frame, the bus addresses emulators hold it at.

It is what lets ballooning find every emulator that must be told a frame went away, and
what keeps such frames alive (one reference per entry) until each emulator lets go.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

from xenemu.abi import pv_iommu as pv
from xenemu.core.iommu.entries import PERM_W

#: A frame held by one server at more BFNs than this keeps them in a heap too, so that
#: losing its lowest BFN costs a logarithm, not a scan (an emulator may map one frame at
#: millions of BFNs and unmap them lowest first: a scan per unmap made each cost milliseconds).
HEAP_AFTER = 64


@dataclass(frozen=True, slots=True)
class M2BEntry:
    mfn: int
    bfn: int
    #: The emulator's domain (whose bus address space ``bfn`` is in).
    mapper: int
    #: The guest the frame belongs to.
    domid: int
    ioserver: int
    #: IOMMU_OP_readable / writeable / swap_mfn bits as mapped.
    flags: int
    #: True when the entry owns an entry in the mapper's IOMMU context.
    owns_iommu_entry: bool

    @property
    def writable(self) -> bool:
        return bool(self.flags & PERM_W)

    @property
    def key(self) -> tuple[int, int, int]:
        return (self.mapper, self.ioserver, self.bfn)

    @property
    def swappable(self) -> bool:
        """Whether ballooning its frame out may re-point it at its server's scratch frame."""
        return bool(self.flags & pv.SWAP_MFN) and self.owns_iommu_entry


class M2B:
    """MFN -> entries, indexed so each lookup costs the same however many entries share a frame."""

    def __init__(self) -> None:
        self.by_mfn: dict[int, dict[tuple[int, int, int], M2BEntry]] = {}
        self.by_key: dict[tuple[int, int, int], M2BEntry] = {}
        #: (mfn, ioserver) -> BFNs, for lookup_foreign_page's "lowest such BFN", and that lowest
        #: BFN kept current so a lookup costs the same however many entries share the frame.
        self.by_frame_server: dict[tuple[int, int], set[int]] = {}
        self.lowest: dict[tuple[int, int], int] = {}
        #: For frame/server pairs of many BFNs: a min-heap of them (with stale ones that lazy
        #: deletion has not reached yet; rebuilt when those outnumber the live ones).
        self.heaps: dict[tuple[int, int], list[int]] = {}
        #: An IOREQ server's entries are all its creator's.
        self.mapper_of: dict[int, int] = {}
        #: Entries each mapper holds (so listing domains does not scan them all).
        self.per_mapper: Counter[int] = Counter()
        #: Entries of each frame that are not ``swappable``: whether a balloon-out swaps or
        #: announces is known without looking at every entry of the frame.
        self.unswappable: Counter[int] = Counter()
        self.by_server: dict[int, set[tuple[int, int, int]]] = {}

    def __len__(self) -> int:
        return len(self.by_key)

    def get(self, mapper: int, ioserver: int, bfn: int) -> M2BEntry | None:
        return self.by_key.get((mapper, ioserver, bfn))

    def add(self, entry: M2BEntry) -> None:
        key = entry.key
        assert key not in self.by_key
        self.by_key[key] = entry
        self.by_mfn.setdefault(entry.mfn, {})[key] = entry
        frame_server = (entry.mfn, entry.ioserver)
        bfns = self.by_frame_server.setdefault(frame_server, set())
        bfns.add(entry.bfn)
        heap = self.heaps.get(frame_server)
        if heap is not None:
            heapq.heappush(heap, entry.bfn)
        elif len(bfns) > HEAP_AFTER:
            self.heaps[frame_server] = heap = list(bfns)
            heapq.heapify(heap)
        if entry.bfn < self.lowest.get(frame_server, entry.bfn + 1):
            self.lowest[frame_server] = entry.bfn
        self.by_server.setdefault(entry.ioserver, set()).add(key)
        self.mapper_of[entry.ioserver] = entry.mapper
        self.per_mapper[entry.mapper] += 1
        if not entry.swappable:
            self.unswappable[entry.mfn] += 1

    def remove(self, entry: M2BEntry) -> None:
        key = entry.key
        del self.by_key[key]
        frame = self.by_mfn[entry.mfn]
        del frame[key]
        if not frame:
            del self.by_mfn[entry.mfn]
        frame_server = (entry.mfn, entry.ioserver)
        bfns = self.by_frame_server[frame_server]
        bfns.discard(entry.bfn)
        if not bfns:
            del self.by_frame_server[frame_server]
            del self.lowest[frame_server]
            self.heaps.pop(frame_server, None)
        elif self.lowest[frame_server] == entry.bfn:
            self.lowest[frame_server] = self._next_lowest(frame_server, bfns)
        self.per_mapper[entry.mapper] -= 1
        if not self.per_mapper[entry.mapper]:
            del self.per_mapper[entry.mapper]
        if not entry.swappable:
            self.unswappable[entry.mfn] -= 1
            if not self.unswappable[entry.mfn]:
                del self.unswappable[entry.mfn]
        keys = self.by_server[entry.ioserver]
        keys.discard(key)
        if not keys:
            del self.by_server[entry.ioserver]
            del self.mapper_of[entry.ioserver]

    def _next_lowest(self, frame_server: tuple[int, int], bfns: set[int]) -> int:
        heap = self.heaps.get(frame_server)
        if heap is None:
            return min(bfns)  # at most HEAP_AFTER of them
        if len(bfns) <= HEAP_AFTER // 2:
            del self.heaps[frame_server]
            return min(bfns)
        if len(heap) > 2 * len(bfns) + HEAP_AFTER:  # mostly stale: rebuild, amortised O(1)
            heap[:] = bfns
            heapq.heapify(heap)
        while heap[0] not in bfns:
            heapq.heappop(heap)
        return heap[0]

    def lowest_for(self, mfn: int, ioserver: int) -> M2BEntry | None:
        bfn = self.lowest.get((mfn, ioserver))
        if bfn is None:
            return None
        entry = self.by_key.get((self.mapper_of[ioserver], ioserver, bfn))
        if entry is None or entry.mfn != mfn:
            raise AssertionError("M2B indexes disagree")
        return entry

    def for_frame(self, mfn: int) -> list[M2BEntry]:
        return list(self.by_mfn.get(mfn, {}).values())

    def for_server(self, ioserver: int) -> list[M2BEntry]:
        return [self.by_key[key] for key in self.by_server.get(ioserver, ())]

    def held_by(self, mapper: int) -> Iterator[M2BEntry]:
        return (entry for entry in self.by_key.values() if entry.mapper == mapper)

    def __iter__(self) -> Iterator[M2BEntry]:
        return iter(list(self.by_key.values()))
