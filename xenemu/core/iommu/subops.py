"""``do_iommu_op``: a batch of ``struct pv_iommu_op`` run in place, flushed once per segment.

Each subop handler validates every page before it changes anything, which is what makes a
multi-page op atomic; the check order follows pv-iommu-semantics.md step by step, so every
implementation of the ABI returns the same status for the same input.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any

from xenemu.abi import OP_SIZE, const, ffi
from xenemu.core.errors import (
    E2BIG,
    EACCES,
    EDQUOT,
    EEXIST,
    EINVAL,
    EIO,
    ENODEV,
    ENOENT,
    ENOSPC,
    ENXIO,
    EOPNOTSUPP,
    EPERM,
    ESRCH,
)
from xenemu.core.host import RW, Host
from xenemu.core.iommu.entries import PERM_W, FlushType, Kind, entry_kind, make_entry
from xenemu.core.iommu.m2b import M2BEntry
from xenemu.core.memory.domain import DOMID_SELF, Domain
from xenemu.core.memory.leaves import LEAF_MASK

IOMMUOP_query_caps = const("IOMMUOP_query_caps")
IOMMUOP_map_page = const("IOMMUOP_map_page")
IOMMUOP_unmap_page = const("IOMMUOP_unmap_page")
IOMMUOP_map_foreign_page = const("IOMMUOP_map_foreign_page")
IOMMUOP_lookup_foreign_page = const("IOMMUOP_lookup_foreign_page")
IOMMUOP_unmap_foreign_page = const("IOMMUOP_unmap_foreign_page")

MAP_RESERVED = const("IOMMU_OP_map_reserved_mask")
UNMAP_RESERVED = const("IOMMU_OP_unmap_reserved_mask")
NO_REF_CNT = const("IOMMU_MAP_OP_no_ref_cnt")
SWAP_MFN = const("IOMMUOP_swap_mfn")
ORDER_SHIFT = const("IOMMU_page_order_shift")
QUERY_MAP_CAP = const("IOMMU_QUERY_map_cap")
QUERY_MAP_ALL_GFNS = const("IOMMU_QUERY_map_all_gfns")

#: Entry kinds as plain integers, for the hot paths (an IntEnum call per entry costs more
#: than the rest of the check).
KIND_MASK = 15
K_DEFAULT, K_MAP, K_MAP_NOREF = int(Kind.DEFAULT), int(Kind.MAP), int(Kind.MAP_NOREF)
UNMAPPABLE = frozenset((K_MAP, K_MAP_NOREF, K_DEFAULT))

#: Subops the compiled loop may run (by the low byte of a little-endian ``subop_id``).
FAST_SUBOPS = frozenset((IOMMUOP_map_page, IOMMUOP_unmap_page))

#: What a handler yields at a continuation point (pending flushes already applied).
CONTINUATION = "continuation"

Op = Any  # a cffi `struct pv_iommu_op` view
SubopHandler = Callable[[Host, Domain, Op], int]


def do_iommu_op(host: Host, caller: int, buf: bytearray, count: int) -> Generator[str, None, int]:
    """Run the batch in ``buf`` for ``caller``; yields at each continuation point.

    Returns the call's value: 0, or ``-EINVAL``/``-E2BIG`` when no op ran.
    """
    if len(buf) != count * OP_SIZE:
        return -EINVAL
    if count > host.options.max_ops_per_call:
        return -E2BIG
    if count == 0:
        return 0
    ops = ffi.from_buffer("struct pv_iommu_op[]", buf)
    fast = host.fast
    raw = fast.buffer(buf) if fast is not None else None
    every = host.options.continuation_every
    done = 0
    while done < count:
        dom = host.domains.get(caller)
        if dom is None:  # destroyed while preempted: the rest of the batch never runs
            return -ESRCH
        stop = min(count, done - done % every + every)
        if fast is not None and buf[done * OP_SIZE] in FAST_SUBOPS and not buf[done * OP_SIZE + 1]:
            done = fast.run(dom, raw, done, stop)
        if done < stop:  # what the compiled loop handed back, or every op without it
            op = ops[done]
            handler = SUBOPS.get(op.subop_id)
            op.status = handler(host, dom, op) if handler else -EOPNOTSUPP
            done += 1
        if done == stop and done < count:
            host.flush_touched()
            yield CONTINUATION
    host.flush_touched()
    return 0


def run_iommu_op(host: Host, caller: int, buf: bytearray, count: int) -> int:
    """Run a whole batch without interleaving (tests and scripts)."""
    gen = do_iommu_op(host, caller, buf, count)
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            result: int = stop.value
            return result


# -- shared checks ----------------------------------------------------------------------------
def _order(host: Host, flags: int) -> int | None:
    order = flags >> ORDER_SHIFT
    return None if order > host.options.largest_order else order


def _foreign_target(host: Host, dom: Domain, domid: int, ioserver: int) -> Domain | int:
    """Step 5: the target domain, or the status that refuses it."""
    if domid in (dom.domid, DOMID_SELF):
        return -EPERM
    guest = host.resolve_foreign(domid)
    if guest is None:
        return -ENXIO
    if not dom.privileged_over(guest):
        return -EPERM
    if not host.ioreq.serves(ioserver, dom.domid, domid):
        return -ENODEV
    return guest


def _foreign_frame(host: Host, guest: Domain, gfn: int) -> int:
    """Step 6's GFN checks for a foreign GFN: its MFN, or ``-ENXIO``/``-EPERM``."""
    frames = host.frames
    if guest.is_hvm:
        mfn = guest.p2m.get(gfn)
        return -ENXIO if mfn is None else mfn
    if not frames.exists(gfn):
        return -ENXIO
    if frames.is_xen(gfn):
        return -EPERM
    return gfn if frames.belongs_to(gfn, guest.domid) else -ENXIO


def _own_frame(host: Host, dom: Domain, gfn: int, no_ref: bool) -> int:
    """Step 6's GFN checks for map_page: the MFN, or ``-EPERM``."""
    frames = host.frames
    if dom.is_hvm:
        mfn = dom.p2m.get(gfn)
        return -EPERM if mfn is None else mfn
    if host.is_non_strict_hwdom(dom):
        if not frames.exists(gfn) or frames.is_xen(gfn):
            return -EPERM
        if frames.is_free(gfn) and not no_ref:
            return -EPERM
        return gfn
    return gfn if frames.belongs_to(gfn, dom.domid) else -EPERM


# -- subops -----------------------------------------------------------------------------------
def query_caps(host: Host, dom: Domain, op: Op) -> int:
    map_cap = host.map_cap(dom)
    flags = host.options.largest_order << ORDER_SHIFT
    if map_cap:
        flags |= QUERY_MAP_CAP
        if host.is_non_strict_hwdom(dom):
            flags |= QUERY_MAP_ALL_GFNS
    op.flags = flags
    return 0


def map_page(host: Host, dom: Domain, op: Op) -> int:
    flags = op.flags
    if flags & MAP_RESERVED or not flags & RW:
        return -EINVAL
    if not host.map_cap(dom):
        return -EOPNOTSUPP
    no_ref = bool(flags & NO_REF_CNT)
    if no_ref and not host.is_non_strict_hwdom(dom):
        return -EPERM
    order = flags >> ORDER_SHIFT
    args = op.u.map_page
    bfn, gfn = args.bfn, args.gfn
    if order > host.options.largest_order or (bfn | gfn) & ((1 << order) - 1):
        return -ENOSPC
    ctx = dom.context
    assert ctx is not None
    table, rmrr, faults, domid = ctx.table, ctx.rmrr, host.injected_faults, dom.domid
    p2m = dom.p2m if dom.is_hvm else None
    mfns = []
    for i in range(1 << order):
        mfn = p2m.get(gfn + i) if p2m is not None else _own_frame(host, dom, gfn + i, no_ref)
        if mfn is None:
            return -EPERM
        if mfn < 0:
            return mfn
        b = bfn + i
        if b in rmrr:
            return -EACCES
        entry = table.get(b)
        if entry and (entry >> 2) & KIND_MASK != K_DEFAULT:
            return -EEXIST
        if faults and (domid, b) in faults:
            return -EIO
        mfns.append(mfn)
    if not host.quota_allows(dom, len(mfns)):
        return -EDQUOT
    perms = flags & RW
    writable = bool(perms & PERM_W)
    kind_bits = (K_MAP_NOREF if no_ref else K_MAP) << 2 | perms
    replaced = False
    frames = host.frames
    for i, mfn in enumerate(mfns):
        b = bfn + i
        leaf = table.leaf(b)
        replaced = replaced or bool(leaf[b & LEAF_MASK])
        if not no_ref:
            frames.get(mfn, writable)
        leaf[b & LEAF_MASK] = mfn << 8 | kind_bits
    host.count_mappings(domid, len(mfns))
    host.note_flush(ctx, FlushType.MODIFIED if replaced else FlushType.ADDED)
    return 0


def unmap_page(host: Host, dom: Domain, op: Op) -> int:
    flags = op.flags
    if flags & UNMAP_RESERVED:
        return -EINVAL
    order = flags >> ORDER_SHIFT
    bfn = op.u.unmap_page.bfn
    if order > host.options.largest_order or bfn & ((1 << order) - 1):
        return -ENOSPC
    ctx = dom.context
    if ctx is None:
        return -ENOENT
    table, rmrr, faults, domid = ctx.table, ctx.rmrr, host.injected_faults, dom.domid
    entries = []
    for i in range(1 << order):
        b = bfn + i
        if b in rmrr:
            return -EACCES
        entry = table.get(b)
        if not entry or (entry >> 2) & KIND_MASK not in UNMAPPABLE:
            return -ENOENT
        if faults and (domid, b) in faults:
            return -EIO
        entries.append(entry)
    frames = host.frames
    removed = 0
    for i, entry in enumerate(entries):
        kind = (entry >> 2) & KIND_MASK
        if kind == K_MAP:
            frames.put(entry >> 8, bool(entry & PERM_W))
        if kind != K_DEFAULT:
            removed += 1
        b = bfn + i
        table.leaf(b)[b & LEAF_MASK] = 0
    if removed:
        host.count_mappings(domid, -removed)
    host.note_flush(ctx, FlushType.MODIFIED)
    return 0


def map_foreign_page(host: Host, dom: Domain, op: Op) -> int:
    flags = op.flags
    if flags & MAP_RESERVED or not flags & RW:
        return -EINVAL
    iommu = host.options.iommu
    if iommu and not host.map_cap(dom):
        return -EOPNOTSUPP
    order = _order(host, flags)
    args = op.u.map_foreign_page
    bfn, gfn, ioserver = args.bfn, args.gfn, args.ioserver
    mask = (1 << order) - 1 if order is not None else 0
    if order is None or gfn & mask or (iommu and bfn & mask):
        return -ENOSPC
    guest = _foreign_target(host, dom, args.domid, ioserver)
    if isinstance(guest, int):
        return guest
    entry_flags = flags & (RW | SWAP_MFN)
    ctx = dom.context
    m2b, caller = host.m2b, dom.domid
    new: list[tuple[int, int]] = []  # (bfn, mfn) still to add
    for i in range(1 << order):
        mfn = _foreign_frame(host, guest, gfn + i)
        if mfn < 0:
            return mfn
        b = bfn + i if iommu else mfn
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
            if (caller, b) in host.injected_faults:
                return -EIO
        else:
            if identical:
                continue
            if existing is not None:
                return -EEXIST
        new.append((b, mfn))
    if not host.quota_allows(dom, len(new)):
        return -EDQUOT
    perms = flags & RW
    flush = FlushType.NONE
    for b, mfn in new:
        _add_m2b(host, dom, guest, b, mfn, ioserver, entry_flags, owns=ctx is not None)
        if ctx is not None:
            if ctx.table.get(b):
                flush = FlushType.MODIFIED
            elif flush is FlushType.NONE:
                flush = FlushType.ADDED
            ctx.table.set(b, make_entry(mfn, Kind.FOREIGN, perms))
    if ctx is not None:
        host.note_flush(ctx, flush)
    else:
        args.bfn = _foreign_frame(host, guest, gfn)
    return 0


def _add_m2b(
    host: Host, dom: Domain, guest: Domain, bfn: int, mfn: int, ioserver: int, flags: int, owns: bool
) -> M2BEntry:
    entry = M2BEntry(mfn, bfn, dom.domid, guest.domid, ioserver, flags, owns)
    host.m2b.add(entry)
    host.count_mappings(dom.domid, 1)
    host.frames.get(mfn, entry.writable)
    return entry


def lookup_foreign_page(host: Host, dom: Domain, op: Op) -> int:
    args = op.u.lookup_foreign_page
    ioserver = args.ioserver
    guest = _foreign_target(host, dom, args.domid, ioserver)
    if isinstance(guest, int):
        return guest
    mfn = _foreign_frame(host, guest, args.gfn)
    if mfn < 0:
        return mfn
    existing = host.m2b.lowest_for(mfn, ioserver)
    if existing is None and not host.quota_allows(dom, 1):
        return -EDQUOT
    if existing is None:
        ctx = dom.context
        if not host.options.iommu or ctx is None:
            existing = _add_m2b(host, dom, guest, mfn, mfn, ioserver, RW, owns=False)
        elif ctx.table.get(mfn) == make_entry(mfn, Kind.DEFAULT, RW):
            # The default entry becomes the M2B entry's own: same translation, now counted.
            ctx.table.set(mfn, make_entry(mfn, Kind.FOREIGN, RW))
            existing = _add_m2b(host, dom, guest, mfn, mfn, ioserver, RW, owns=True)
        else:
            return -ENOENT
    args.bfn = existing.bfn
    op.flags = existing.flags & RW
    return 0


def unmap_foreign_page(host: Host, dom: Domain, op: Op) -> int:
    flags = op.flags
    if flags & UNMAP_RESERVED:
        return -EINVAL
    order = _order(host, flags)
    args = op.u.unmap_foreign_page
    bfn, ioserver = args.bfn, args.ioserver
    if order is None or bfn & ((1 << order) - 1):
        return -ENOSPC
    ctx = dom.context
    m2b, caller = host.m2b, dom.domid
    found: list[tuple[int, M2BEntry | None]] = []
    for i in range(1 << order):
        b = bfn + i
        if ctx is not None and b in ctx.rmrr:
            return -EACCES
        entry = m2b.get(caller, ioserver, b)
        scratch = ctx is not None and ctx.scratch.get(b) == ioserver
        if entry is None and not scratch:
            return -ENOENT
        touches_iommu = scratch or (entry is not None and entry.owns_iommu_entry)
        if touches_iommu and (caller, b) in host.injected_faults:
            return -EIO
        found.append((b, entry))
    for b, entry in found:
        if entry is not None:
            host.drop_m2b_entry(entry)
        elif ctx is not None:
            del ctx.scratch[b]
            ctx.table.clear(b)
            host.note_flush(ctx, FlushType.MODIFIED)
    return 0


SUBOPS: dict[int, SubopHandler] = {
    IOMMUOP_query_caps: query_caps,
    IOMMUOP_map_page: map_page,
    IOMMUOP_unmap_page: unmap_page,
    IOMMUOP_map_foreign_page: map_foreign_page,
    IOMMUOP_lookup_foreign_page: lookup_foreign_page,
    IOMMUOP_unmap_foreign_page: unmap_foreign_page,
}
