"""The emulator's subops: ``map_foreign_page``, ``lookup_foreign_page``, ``unmap_foreign_page``.

A device model maps a guest's frames into its own bus address space on behalf of one IOREQ
server; each such mapping is an M2B entry that holds the frame's references, so a guest that
balloons the frame out can find and tell every emulator that still holds it.  Check order is
pv-iommu-semantics.md's, step by step.
"""

from __future__ import annotations

from array import array
from collections.abc import Generator, Iterable, Sequence

from xenemu.abi import pv_iommu as pv
from xenemu.core.errors import EACCES, EDQUOT, EEXIST, EINVAL, EIO, ENODEV, ENOENT, ENOSPC, ENXIO, EOPNOTSUPP, EPERM
from xenemu.core.iommu import preempt, xen_changes
from xenemu.core.iommu.checks import Op, order_of
from xenemu.core.iommu.entries import RW, FlushType, Kind, entry_kind, make_entry
from xenemu.core.iommu.m2b import M2BEntry
from xenemu.core.iommu.state import Iommu
from xenemu.core.memory.domain import DOMID_SELF, Domain


def _foreign_target(iommu: Iommu, dom: Domain, domid: int, ioserver: int) -> Domain | int:
    """Step 5: the target domain, or the status that refuses it."""
    if domid in (dom.domid, DOMID_SELF):
        return -EPERM
    guest = iommu.memory.resolve_foreign(domid)
    if guest is None:
        return -ENXIO
    if not dom.privileged_over(guest):
        return -EPERM
    if not iommu.servers.serves(ioserver, dom.domid, domid):
        return -ENODEV
    return guest


def _foreign_frame(iommu: Iommu, guest: Domain, gfn: int) -> int:
    """Step 6's GFN checks for a foreign GFN: its MFN, or ``-ENXIO``/``-EPERM``."""
    # For a PV guest a GFN is an MFN: one it does not own and populate, Xen's included, is
    # "not populated".  "Xen's frame" is an HVM GFN backed by one of Xen's frames.
    mfn = iommu.memory.gfn_to_mfn(guest, gfn)
    if mfn is None:
        return -ENXIO
    return -EPERM if iommu.frames.is_xen(mfn) else mfn


def map_foreign_page(iommu: Iommu, dom: Domain, op: Op) -> int | Generator[str, None, int]:
    if preempt.is_large(op.flags, iommu.options.largest_order):
        return _map_foreign_page(iommu, dom, op)
    return preempt.finish(_map_foreign_page(iommu, dom, op))


def _map_foreign_page(iommu: Iommu, dom: Domain, op: Op) -> Generator[str, None, int]:
    flags = op.flags
    if flags & pv.MAP_RESERVED or not flags & RW:
        return -EINVAL
    has_iommu = iommu.options.iommu
    if has_iommu and not iommu.map_cap(dom):
        return -EOPNOTSUPP
    order = order_of(iommu, flags)
    args = op.u.map_foreign_page
    bfn, gfn, ioserver = args.bfn, args.gfn, args.ioserver
    mask = (1 << order) - 1 if order is not None else 0
    if order is None or gfn & mask or (has_iommu and bfn & mask):
        return -ENOSPC
    guest = _foreign_target(iommu, dom, args.domid, ioserver)
    if isinstance(guest, int):
        return guest
    entry_flags = flags & (RW | pv.SWAP_MFN)
    ctx = iommu.contexts.get(dom.domid)
    m2b, caller = iommu.m2b, dom.domid
    # (bfn, mfn) still to add, and below the entries it wrote over (for an undo): arrays, not
    # lists of ints or tuples, so the cyclic GC does not walk 2**order objects while it runs.
    new_bfns, new_mfns = array("Q"), array("Q")
    pause = preempt.first_pause(1 << order)
    for i in range(1 << order):
        if i == pause:
            yield from preempt.pause(dom, guest)  # its guest cannot balloon meanwhile
            pause += preempt.LARGE_SLICE
            if iommu.memory.domains.get(guest.domid) is not guest:  # destroyed meanwhile
                return -ENXIO
        mfn = _foreign_frame(iommu, guest, gfn + i)
        if mfn < 0:
            return mfn
        b = bfn + i if has_iommu else mfn
        existing = m2b.get(caller, ioserver, b)
        identical = (
            existing is not None
            and existing.mfn == mfn
            and existing.domid == guest.domid
            and existing.flags == entry_flags
        )
        if ctx is not None:
            if b in ctx.rmrr:
                return -EACCES
            if identical:
                continue
            entry = ctx.table.get(b)
            if entry and entry_kind(entry) != Kind.DEFAULT:
                return -EEXIST
            if (caller, b) in iommu.injected_faults:
                return -EIO
        else:
            if identical:
                continue
            if existing is not None:
                return -EEXIST
        new_bfns.append(b)
        new_mfns.append(mfn)
    if not iommu.quota_allows(dom, len(new_bfns)) or (
        ctx is not None and new_bfns and not iommu.leaves_allow(ctx, new_bfns[0], new_bfns[-1] - new_bfns[0] + 1)
    ):
        return -EDQUOT
    perms = flags & RW
    flush = FlushType.NONE
    pause = preempt.first_pause(len(new_bfns))
    replaced = array("Q")
    for i, (b, mfn) in enumerate(zip(new_bfns, new_mfns, strict=True)):
        if i == pause:
            if ctx is not None:
                iommu.note_flush(ctx, flush)
            yield from preempt.pause(dom, guest)
            pause += preempt.LARGE_SLICE
            if iommu.memory.domains.get(guest.domid) is not guest:  # destroyed meanwhile
                _undo_foreign(iommu, dom, ioserver, zip(new_bfns[:i], new_mfns[:i], strict=True), replaced)
                return -ENXIO
        _add_m2b(iommu, dom, guest, b, mfn, ioserver, entry_flags, owns=ctx is not None)
        if ctx is not None:
            before = ctx.table.get(b)
            replaced.append(before)
            if before:
                flush = FlushType.MODIFIED
            elif flush is FlushType.NONE:
                flush = FlushType.ADDED
            ctx.table.set(b, make_entry(mfn, Kind.FOREIGN, perms))
            iommu.note_written(dom, b, 1)
    if ctx is not None:
        iommu.note_flush(ctx, flush)
    else:
        args.bfn = _foreign_frame(iommu, guest, gfn)
    return 0


def _undo_foreign(
    iommu: Iommu, dom: Domain, ioserver: int, applied: Iterable[tuple[int, int]], replaced: Sequence[int]
) -> None:
    """Take back what a large map did before its guest was destroyed under it: the op fails
    whole.  Destruction may already have swapped some of these entries to scratch."""
    ctx = iommu.contexts.get(dom.domid)
    for i, (b, mfn) in enumerate(applied):
        entry = iommu.m2b.get(dom.domid, ioserver, b)
        if entry is not None and entry.mfn == mfn:
            iommu.drop_m2b_entry(entry)
        elif ctx is not None and ctx.scratch.get(b) == ioserver:
            xen_changes.drop_scratch(iommu, ctx, b)
        if ctx is not None and i < len(replaced) and replaced[i]:
            ctx.table.set(b, replaced[i])  # a default entry it replaced comes back
        if ctx is not None:
            iommu.note_flush(ctx, FlushType.MODIFIED)


def _add_m2b(
    iommu: Iommu, dom: Domain, guest: Domain, bfn: int, mfn: int, ioserver: int, flags: int, owns: bool
) -> M2BEntry:
    entry = M2BEntry(mfn, bfn, dom.domid, guest.domid, ioserver, flags, owns)
    iommu.m2b.add(entry)
    iommu.count_mappings(dom.domid, 1)
    iommu.frames.get(mfn, entry.writable)
    return entry


def lookup_foreign_page(iommu: Iommu, dom: Domain, op: Op) -> int:
    args = op.u.lookup_foreign_page
    ioserver = args.ioserver
    guest = _foreign_target(iommu, dom, args.domid, ioserver)
    if isinstance(guest, int):
        return guest
    mfn = _foreign_frame(iommu, guest, args.gfn)
    if mfn < 0:
        return mfn
    existing = iommu.m2b.lowest_for(mfn, ioserver)
    if existing is None and not iommu.quota_allows(dom, 1):
        return -EDQUOT
    if existing is None:
        ctx = iommu.contexts.get(dom.domid)
        if not iommu.options.iommu or ctx is None:
            existing = _add_m2b(iommu, dom, guest, mfn, mfn, ioserver, RW, owns=False)
        elif ctx.table.get(mfn) == make_entry(mfn, Kind.DEFAULT, RW):
            # The default entry becomes the M2B entry's own: same translation, now counted.
            ctx.table.set(mfn, make_entry(mfn, Kind.FOREIGN, RW))
            existing = _add_m2b(iommu, dom, guest, mfn, mfn, ioserver, RW, owns=True)
        else:
            return -ENOENT
    args.bfn = existing.bfn
    op.flags = existing.flags & RW
    return 0


def unmap_foreign_page(iommu: Iommu, dom: Domain, op: Op) -> int | Generator[str, None, int]:
    if preempt.is_large(op.flags, iommu.options.largest_order):
        return _unmap_foreign_page(iommu, dom, op)
    return preempt.finish(_unmap_foreign_page(iommu, dom, op))


def _unmap_foreign_page(iommu: Iommu, dom: Domain, op: Op) -> Generator[str, None, int]:
    flags = op.flags
    if flags & pv.UNMAP_RESERVED:
        return -EINVAL
    order = order_of(iommu, flags)
    args = op.u.unmap_foreign_page
    bfn, ioserver = args.bfn, args.ioserver
    if order is None or bfn & ((1 << order) - 1):
        return -ENOSPC
    ctx = iommu.contexts.get(dom.domid)
    m2b, caller = iommu.m2b, dom.domid
    found = array("Q")  # the BFNs, validated (an array: nothing for the cyclic GC to walk)
    pause = preempt.first_pause(1 << order)
    for i in range(1 << order):
        if i == pause:
            yield from preempt.pause(dom)
            pause += preempt.LARGE_SLICE
        b = bfn + i
        if ctx is not None and b in ctx.rmrr:
            return -EACCES
        entry = m2b.get(caller, ioserver, b)
        scratch = ctx is not None and ctx.scratch.get(b) == ioserver
        if entry is None and not scratch:
            return -ENOENT
        touches_iommu = scratch or (entry is not None and entry.owns_iommu_entry)
        if touches_iommu and (caller, b) in iommu.injected_faults:
            return -EIO
        found.append(b)
    pause = preempt.first_pause(len(found))
    for i, b in enumerate(found):
        if i == pause:
            yield from preempt.pause(dom)
            pause += preempt.LARGE_SLICE
            # A guest's balloon-out may have swapped an entry to scratch meanwhile: take what is there.
        current = iommu.m2b.get(caller, ioserver, b)
        if current is not None:
            iommu.drop_m2b_entry(current)
        elif ctx is not None and ctx.scratch.get(b) == ioserver:
            xen_changes.drop_scratch(iommu, ctx, b)
    return 0
