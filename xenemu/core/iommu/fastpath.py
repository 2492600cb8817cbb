"""The compiled shortcut through map_page/unmap_page's success path (see ``fast_iommu.c``).

It is optional by design: the Python handlers in ``subops`` are the semantics, and the
compiled loop only runs the ops it can finish exactly as they would, handing every other op
back.  ``HostOptions.fast_path`` turns it off, and the test suite runs both ways.
"""

from __future__ import annotations

import sys
from typing import Any

from xenemu.core.iommu import preempt
from xenemu.core.iommu.context import IommuContext
from xenemu.core.iommu.entries import FlushType, Kind
from xenemu.core.memory.domain import Domain
from xenemu.core.memory.frames import FrameTable
from xenemu.core.memory.leaves import LEAF_SHIFT

try:
    from xenemu.core.iommu import _fast_iommu  # type: ignore[attr-defined]
except ImportError:  # built with XENEMU_NO_FAST_PATH=1, or a source tree not built yet
    _fast_iommu = None

_FLUSHES = (FlushType.NONE, FlushType.ADDED, FlushType.MODIFIED)


def available() -> bool:
    """Built, and on a little-endian host (``do_iommu_op`` peeks at the low byte of subop_id)."""
    return _fast_iommu is not None and sys.byteorder == "little"


class FastIommu:
    """The compiled loop bound to one host's frame table; per call it is handed the caller's
    context, capability and quota, and reports what it did for the caller to account."""

    def __init__(self, frames: FrameTable, largest_order: int) -> None:
        assert _fast_iommu is not None
        ffi, lib = _fast_iommu.ffi, _fast_iommu.lib
        if (
            lib.FAST_KIND_DEFAULT,
            lib.FAST_KIND_MAP,
            lib.FAST_KIND_MAP_NOREF,
            lib.FAST_LEAF_SHIFT,
            lib.FAST_OP_COST,
            lib.FAST_LARGE_PAGES,
        ) != (Kind.DEFAULT, Kind.MAP, Kind.MAP_NOREF, LEAF_SHIFT, preempt.FAST_OP_COST, preempt.LARGE_PAGES):
            raise RuntimeError("fast_iommu.c disagrees with xenemu.core.iommu; rebuild it")
        if (frames.owner.itemsize, frames.count.itemsize, frames.type_count.itemsize) != (2, 4, 4):
            raise RuntimeError("frame table arrays are not uint16/uint32 on this platform")
        self.ffi = ffi
        self._run = lib.fast_iommu_run
        self.state = ffi.new("struct fast_host *")
        state = self.state
        # The frame table's arrays never grow, so their addresses hold for the host's life.
        self._populated = ffi.from_buffer(frames.populated)
        state.owner = frames.owner.buffer_info()[0]
        state.populated = int(ffi.cast("uintptr_t", self._populated))
        state.count = frames.count.buffer_info()[0]
        state.type_count = frames.type_count.buffer_info()[0]
        state.nr_frames = frames.nr_frames
        state.largest_order = largest_order
        #: Ops the compiled loop completed, and calls into it (tests check it was used).
        self.ops_done = 0
        self.calls = 0

    def buffer(self, buf: bytearray) -> Any:
        return self.ffi.from_buffer(buf)

    def run(
        self,
        dom: Domain,
        ctx: IommuContext,
        can_map: bool,
        quota_left: int,
        buf: Any,
        start: int,
        stop: int,
        budget: int,
    ) -> tuple[int, int, FlushType, int]:
        """Run ops ``start`` up to ``stop`` until one needs Python or ``budget`` of work is spent.

        Returns the index of the next op, the change in mappings held, the flush owed and the
        work done (counted as ``preempt.cost`` counts it)."""
        self.state.work_budget = budget
        table, table_len = ctx.table.directory.where()
        p2m, p2m_len = dom.p2m.directory.where() if dom.is_hvm else (0, 0)
        done: int = self._run(
            self.state, buf, start, stop, table, table_len, p2m, p2m_len, dom.domid, dom.is_hvm, can_map, quota_left
        )
        self.calls += 1
        if done == start:
            return done, 0, FlushType.NONE, 0
        self.ops_done += done - start
        state = self.state
        return done, int(state.mapped), _FLUSHES[state.flush], int(state.work)
