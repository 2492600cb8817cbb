"""Machine frames: owners, reference counts, the free pool and their bytes.

Kept in flat arrays rather than one object per frame, so a host with millions of frames
costs a few bytes per frame; frame contents are allocated only when first written.
"""

from __future__ import annotations

from array import array
from collections import Counter

from xenemu.abi import const

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT

DOMID_XEN = const("DOMID_XEN")
#: Owner of a free frame.
OWNER_NONE = 0xFFFF


class FrameTable:
    """Every machine frame's owner, populated flag, general and writable-type counts."""

    def __init__(self, nr_frames: int) -> None:
        self.nr_frames = nr_frames
        self.owner = array("H", [OWNER_NONE]) * nr_frames
        self.populated = bytearray(nr_frames)
        self.count = array("I", [0]) * nr_frames
        self.type_count = array("I", [0]) * nr_frames
        self.data: dict[int, bytearray] = {}
        #: One byte per frame, 1 while free: the lowest free frame is a C-speed ``find`` away,
        #: at a byte per frame instead of a Python int per free frame.
        self._free_map = bytearray(b"\x01") * nr_frames
        self._lowest_hint = 0
        self.nr_free = nr_frames
        #: Frames (free or not) currently owned by each domain id, for id reuse rules.
        self.held: Counter[int] = Counter()

    # -- queries ------------------------------------------------------------------------
    def exists(self, mfn: int) -> bool:
        return 0 <= mfn < self.nr_frames

    def is_free(self, mfn: int) -> bool:
        return self.owner[mfn] == OWNER_NONE

    def free_map_agrees(self, mfn: int) -> bool:
        return bool(self._free_map[mfn]) == (self.owner[mfn] == OWNER_NONE) and (
            not self._free_map[mfn] or mfn >= self._lowest_hint
        )

    def is_xen(self, mfn: int) -> bool:
        return self.owner[mfn] == DOMID_XEN

    def belongs_to(self, mfn: int, domid: int) -> bool:
        """Owned by ``domid`` and backing one of its GFNs."""
        return 0 <= mfn < self.nr_frames and self.owner[mfn] == domid and bool(self.populated[mfn])

    # -- allocation -----------------------------------------------------------------------
    def reserve_for_xen(self, mfn: int) -> None:
        """Make a free frame Xen's, with one permanent reference."""
        if not self.is_free(mfn):
            raise ValueError(f"frame {mfn:#x} is not free")
        self._take(mfn, DOMID_XEN)
        self.populated[mfn] = 0

    def allocate_for_xen(self) -> int | None:
        """The lowest free frame (as ``allocate`` picks), made Xen's with one permanent
        reference and never populated; its ``put`` of that reference frees it again."""
        mfn = self.allocate(DOMID_XEN)
        if mfn is not None:
            self.populated[mfn] = 0
        return mfn

    def allocate(self, domid: int) -> int | None:
        """The lowest free frame, now owned and populated by ``domid`` (one allocation ref)."""
        mfn = self._free_map.find(1, self._lowest_hint)
        if mfn < 0:
            self._lowest_hint = self.nr_frames
            return None
        self._take(mfn, domid)
        self._lowest_hint = mfn + 1  # every frame below it is taken
        return mfn

    def _take(self, mfn: int, domid: int) -> None:
        self._free_map[mfn] = 0
        self.owner[mfn] = domid
        self.populated[mfn] = 1
        self.count[mfn] = 1
        self.type_count[mfn] = 0
        self.data.pop(mfn, None)
        self.nr_free -= 1
        self.held[domid] += 1

    def unpopulate(self, mfn: int) -> None:
        """The owner gives the frame back: drop its allocation reference."""
        assert self.populated[mfn], f"frame {mfn:#x} is not populated"
        self.populated[mfn] = 0
        self.put(mfn, writable=False)

    # -- references -----------------------------------------------------------------------
    def get(self, mfn: int, writable: bool) -> None:
        assert self.count[mfn] > 0, f"reference taken on free frame {mfn:#x}"
        self.count[mfn] += 1
        if writable:
            self.type_count[mfn] += 1

    def put(self, mfn: int, writable: bool) -> None:
        """Drop one reference; the last one returns the frame to the free pool."""
        if writable:
            assert self.type_count[mfn] > 0, f"writable-type underflow on {mfn:#x}"
            self.type_count[mfn] -= 1
        assert self.count[mfn] > 0, f"reference underflow on {mfn:#x}"
        self.count[mfn] -= 1
        if self.count[mfn] == 0:
            self._free(mfn)

    def _free(self, mfn: int) -> None:
        owner = self.owner[mfn]
        self.held[owner] -= 1
        if self.held[owner] == 0:
            del self.held[owner]
        self.owner[mfn] = OWNER_NONE
        self.populated[mfn] = 0
        self.type_count[mfn] = 0
        self.data.pop(mfn, None)
        self.nr_free += 1
        self._free_map[mfn] = 1
        self._lowest_hint = min(self._lowest_hint, mfn)

    # -- contents -------------------------------------------------------------------------
    def read(self, mfn: int, offset: int, length: int) -> bytes:
        page = self.data.get(mfn)
        if page is None:
            return bytes(length)
        return bytes(page[offset : offset + length])

    def write(self, mfn: int, offset: int, data: bytes | memoryview) -> None:
        page = self.data.get(mfn)
        if page is None:
            page = self.data[mfn] = bytearray(PAGE_SIZE)
        page[offset : offset + len(data)] = data
