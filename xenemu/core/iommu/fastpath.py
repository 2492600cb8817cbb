"""The compiled shortcut through map_page/unmap_page's success path (see ``fast_iommu.c``).

It is optional by design: the Python handlers in ``iommu_op`` are the semantics, and the
compiled loop only runs the ops it can finish exactly as they would, handing every other op
back.  ``HostOptions.fast_path`` turns it off, and the test suite runs both ways.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from xenemu.core.iommu.entries import FlushType, Kind
from xenemu.core.memory.domain import Domain
from xenemu.core.memory.leaves import LEAF_SHIFT

if TYPE_CHECKING:
    from xenemu.core.host import Host

try:
    from xenemu.core.iommu import _fast_iommu  # type: ignore[attr-defined]
except ImportError:  # built with XENEMU_NO_FAST_PATH=1, or a source tree not built yet
    _fast_iommu = None

_FLUSHES = (FlushType.NONE, FlushType.ADDED, FlushType.MODIFIED)


def available() -> bool:
    """Built, and on a little-endian host (``do_iommu_op`` peeks at the low byte of subop_id)."""
    return _fast_iommu is not None and sys.byteorder == "little"


class FastIommu:
    """One host's view for the compiled loop: where its frame counts live, and per call the
    caller's tables, capability and quota."""

    def __init__(self, host: Host) -> None:
        assert _fast_iommu is not None
        ffi, lib = _fast_iommu.ffi, _fast_iommu.lib
        if (lib.FAST_KIND_DEFAULT, lib.FAST_KIND_MAP, lib.FAST_KIND_MAP_NOREF, lib.FAST_LEAF_SHIFT) != (
            Kind.DEFAULT,
            Kind.MAP,
            Kind.MAP_NOREF,
            LEAF_SHIFT,
        ):
            raise RuntimeError("fast_iommu.c disagrees with xenemu.core.iommu.context; rebuild it")
        frames = host.frames
        if (frames.owner.itemsize, frames.count.itemsize, frames.type_count.itemsize) != (2, 4, 4):
            raise RuntimeError("frame table arrays are not uint16/uint32 on this platform")
        self.host = host
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
        state.largest_order = host.options.largest_order
        #: Ops the compiled loop completed, and calls into it (tests check it was used).
        self.ops_done = 0
        self.calls = 0

    def buffer(self, buf: bytearray) -> Any:
        return self.ffi.from_buffer(buf)

    def run(self, dom: Domain, buf: Any, start: int, stop: int) -> int:
        """Run ops ``start`` up to ``stop`` until one needs Python; the index of that op."""
        host = self.host
        ctx = dom.context
        if ctx is None or host.injected_faults:
            return start
        table, table_len = ctx.table.directory.where()
        p2m, p2m_len = dom.p2m.directory.where() if dom.is_hvm else (0, 0)
        domid = dom.domid
        done: int = self._run(
            self.state,
            buf,
            start,
            stop,
            table,
            table_len,
            p2m,
            p2m_len,
            domid,
            dom.is_hvm,
            host.map_cap(dom) and not host.is_non_strict_hwdom(dom),
            dom.max_mappings - host.mappings_held[domid],
        )
        self.calls += 1
        if done != start:
            self.ops_done += done - start
            state = self.state
            if state.mapped:
                host.count_mappings(domid, state.mapped)
            host.note_flush(ctx, _FLUSHES[state.flush])
        return done
