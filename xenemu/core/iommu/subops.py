"""``do_iommu_op``: a batch of ``struct pv_iommu_op`` run in place, flushed once per segment.

Each subop handler validates every page before it changes anything, which is what makes a
multi-page op atomic; the check order follows pv-iommu-semantics.md step by step, so every
implementation of the ABI returns the same status for the same input.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any

from xenemu.abi import OP_SIZE, ffi
from xenemu.abi import pv_iommu as pv
from xenemu.core.errors import (
    E2BIG,
    EACCES,
    EBUSY,
    EDQUOT,
    EEXIST,
    EINVAL,
    EIO,
    ENOENT,
    ENOSPC,
    EOPNOTSUPP,
    EPERM,
    ESRCH,
)
from xenemu.core.iommu import foreign, preempt
from xenemu.core.iommu.checks import Op
from xenemu.core.iommu.entries import PERM_W, RW, FlushType, Kind
from xenemu.core.iommu.fastpath import FastIommu
from xenemu.core.iommu.pagetable import PageTable
from xenemu.core.iommu.state import Iommu
from xenemu.core.memory.domain import Domain
from xenemu.core.memory.leaves import LEAF_MASK, LEAF_SHIFT

IOMMUOP_query_caps = pv.QUERY_CAPS
IOMMUOP_map_page = pv.MAP_PAGE
IOMMUOP_unmap_page = pv.UNMAP_PAGE
IOMMUOP_map_foreign_page = pv.MAP_FOREIGN_PAGE
IOMMUOP_lookup_foreign_page = pv.LOOKUP_FOREIGN_PAGE
IOMMUOP_unmap_foreign_page = pv.UNMAP_FOREIGN_PAGE

#: Entry kinds as plain integers, for the hot paths (an IntEnum call per entry costs more
#: than the rest of the check).
KIND_MASK = 15
K_DEFAULT, K_MAP, K_MAP_NOREF = int(Kind.DEFAULT), int(Kind.MAP), int(Kind.MAP_NOREF)
UNMAPPABLE = frozenset((K_MAP, K_MAP_NOREF, K_DEFAULT))

#: After the compiled loop hands ops straight back again and again, up to this many ops go to
#: Python before it is tried again (a batch of ops it cannot take would otherwise pay the
#: loop's entry cost per op); one op it completes resets the backoff.
FAST_RETRY = 32

#: Subops whose order covers several pages (their work is counted in pages).
RANGED = frozenset((IOMMUOP_map_page, IOMMUOP_unmap_page, IOMMUOP_map_foreign_page, IOMMUOP_unmap_foreign_page))

#: Subops the compiled loop may run (by the low byte of a little-endian ``subop_id``).
FAST_SUBOPS = frozenset((IOMMUOP_map_page, IOMMUOP_unmap_page))

#: What a handler yields at a continuation point (pending flushes already applied).
CONTINUATION = "continuation"
#: What it yields when a slice of work is spent between continuation points (flushed too).
PREEMPT = preempt.PREEMPT

SubopHandler = Callable[[Iommu, Domain, Op], int | Generator[str, None, int]]


def do_iommu_op(iommu: Iommu, caller: int, buf: bytearray, count: int) -> Generator[str, None, int]:
    """Run the batch in ``buf`` for ``caller``; yields at each continuation point.

    Returns the call's value: 0, or ``-EINVAL``/``-E2BIG`` when no op ran.
    """
    if len(buf) != count * OP_SIZE:
        return -EINVAL
    if count > iommu.options.max_ops_per_call:
        return -E2BIG
    if count == 0:
        return 0
    caller_dom = iommu.memory.domains.get(caller)
    if caller_dom is not None and caller_dom.busy_ops:
        return -EBUSY  # one of its ops is mid-flight: a domain does not race its own IOMMU
    ops = ffi.from_buffer("struct pv_iommu_op[]", buf)
    fast = iommu.fast
    raw = fast.buffer(buf) if fast is not None else None
    every = iommu.options.continuation_every
    done = work = fast_after = misses = 0
    while done < count:
        # The batch belongs to the domain instance that made it: if that domain was destroyed
        # while it was preempted, the rest never runs, even if its id now names a new domain.
        dom = iommu.memory.domains.get(caller)
        if dom is None or dom is not caller_dom:
            return -ESRCH
        stop = min(count, done - done % every + every)
        if (
            fast is not None
            and done >= fast_after
            and buf[done * OP_SIZE] in FAST_SUBOPS
            and not buf[done * OP_SIZE + 1]
        ):
            start = done
            done, spent = _run_fast(iommu, fast, dom, raw, done, stop, preempt.SLICE - work)
            work += spent
            if done == start:  # handed straight back: Python takes the next ones, more each time
                misses = min(2 * misses + 1, FAST_RETRY)
                fast_after = done + misses
            else:
                misses = 0
        if done < stop and work < preempt.SLICE:  # what the compiled loop handed back
            op = ops[done]
            handler = SUBOPS.get(op.subop_id)
            spent = (
                preempt.cost(op.flags, iommu.options.largest_order) if op.subop_id in RANGED else preempt.OP_COST + 1
            )
            churn = PageTable.churn
            if handler is None:
                op.status = -EOPNOTSUPP
            else:
                outcome = handler(iommu, dom, op)
                if isinstance(outcome, int):
                    op.status = outcome
                else:  # a generator: an op of many pages, preempted page by page
                    status = yield from _drive(iommu, caller, caller_dom, outcome)
                    if status is None:
                        return -ESRCH
                    op.status = status
                    work = 0
            work += spent + preempt.LEAF_COST * (PageTable.churn - churn)
            done += 1
        if done < count and (done == stop or work >= preempt.SLICE):
            iommu.flush_touched()
            yield CONTINUATION if done == stop else PREEMPT
            work = 0
    iommu.flush_touched()
    return 0


def _drive(
    iommu: Iommu, caller: int, caller_dom: Domain, outcome: Generator[str, None, int]
) -> Generator[str, None, int | None]:
    """Run one op of many pages: at each slice it pauses, flushed, for others to run; None if
    its domain was destroyed meanwhile (the op is abandoned where it stood, as destruction
    released everything it had done)."""
    try:
        while True:
            try:
                next(outcome)
            except StopIteration as stop:
                status: int = stop.value
                return status
            iommu.flush_touched()
            yield PREEMPT
            if iommu.memory.domains.get(caller) is not caller_dom:
                return None
    finally:
        outcome.close()


def _run_fast(
    iommu: Iommu, fast: FastIommu, dom: Domain, raw: Any, start: int, stop: int, budget: int
) -> tuple[int, int]:
    """Let the compiled loop run what it can of ops ``start``..``stop`` within ``budget`` of
    work; account for it here.  Returns the next op's index and the work done."""
    ctx = iommu.contexts.get(dom.domid)
    if ctx is None or iommu.injected_faults:
        return start, 0
    can_map = iommu.map_cap(dom) and not iommu.is_non_strict_hwdom(dom)
    quota_left = dom.max_mappings - iommu.mappings_held[dom.domid]
    done, mapped, flush, work = fast.run(dom, ctx, can_map, quota_left, raw, start, stop, budget)
    if done != start:
        if mapped:
            iommu.count_mappings(dom.domid, mapped)
        if flush is FlushType.MODIFIED:  # it may have unmapped: a sweep may find empty leaves
            ctx.table.emptied = True
        iommu.note_flush(ctx, flush)
    return done, work


def run_iommu_op(iommu: Iommu, caller: int, buf: bytearray, count: int) -> int:
    """Run a whole batch without interleaving (tests and scripts)."""
    gen = do_iommu_op(iommu, caller, buf, count)
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            result: int = stop.value
            return result


# -- shared checks ----------------------------------------------------------------------------
def _own_frame(iommu: Iommu, dom: Domain, gfn: int, no_ref: bool) -> int:
    """Step 6's GFN checks for map_page: the MFN, or ``-EPERM``."""
    frames = iommu.frames
    if dom.is_hvm:
        mfn = dom.p2m.get(gfn)
        return -EPERM if mfn is None else mfn
    if iommu.is_non_strict_hwdom(dom):
        if not frames.exists(gfn) or frames.is_xen(gfn):
            return -EPERM
        if frames.is_free(gfn) and not no_ref:
            return -EPERM
        return gfn
    return gfn if frames.belongs_to(gfn, dom.domid) else -EPERM


# -- subops -----------------------------------------------------------------------------------
def query_caps(iommu: Iommu, dom: Domain, op: Op) -> int:
    map_cap = iommu.map_cap(dom)
    flags = iommu.options.largest_order << pv.ORDER_SHIFT
    if map_cap:
        flags |= pv.MAP_CAP
        if iommu.is_non_strict_hwdom(dom):
            flags |= pv.MAP_ALL_GFNS
    op.flags = flags
    return 0


def map_page(iommu: Iommu, dom: Domain, op: Op) -> int | Generator[str, None, int]:
    if preempt.is_large(op.flags, iommu.options.largest_order) and not iommu.is_non_strict_hwdom(dom):
        return _map_page(iommu, dom, op)  # the trusted hardware domain's run unpreempted
    return preempt.finish(_map_page(iommu, dom, op))


def _map_page(iommu: Iommu, dom: Domain, op: Op) -> Generator[str, None, int]:
    flags = op.flags
    if flags & pv.MAP_RESERVED or not flags & RW:
        return -EINVAL
    if not iommu.map_cap(dom):
        return -EOPNOTSUPP
    no_ref = bool(flags & pv.NO_REF_CNT)
    if no_ref and not iommu.is_non_strict_hwdom(dom):
        return -EPERM
    order = flags >> pv.ORDER_SHIFT
    args = op.u.map_page
    bfn, gfn = args.bfn, args.gfn
    if order > iommu.options.largest_order or (bfn | gfn) & ((1 << order) - 1):
        return -ENOSPC
    ctx = iommu.contexts.get(dom.domid)
    assert ctx is not None
    table, rmrr, faults, domid = ctx.table, ctx.rmrr, iommu.injected_faults, dom.domid
    p2m = dom.p2m if dom.is_hvm else None
    mfns = []
    pause = preempt.first_pause(1 << order)
    for i in range(1 << order):
        if i == pause:
            yield from preempt.pause(dom)
            pause += preempt.LARGE_SLICE
        mfn = p2m.get(gfn + i) if p2m is not None else _own_frame(iommu, dom, gfn + i, no_ref)
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
    if not iommu.quota_allows(dom, len(mfns)) or not iommu.leaves_allow(ctx, bfn, len(mfns)):
        return -EDQUOT
    perms = flags & RW
    writable = bool(perms & PERM_W)
    kind_bits = (K_MAP_NOREF if no_ref else K_MAP) << 2 | perms
    replaced = False
    frames = iommu.frames
    pause, counted = preempt.first_pause(len(mfns)), 0
    for i, mfn in enumerate(mfns):
        if i == pause:  # what is applied so far is whole: each page holds its references
            iommu.count_mappings(domid, i - counted)
            counted = i
            iommu.note_flush(ctx, FlushType.MODIFIED if replaced else FlushType.ADDED)
            yield from preempt.pause(dom)
            pause += preempt.LARGE_SLICE
        b = bfn + i
        leaf = table.leaf(b)
        replaced = replaced or bool(leaf[b & LEAF_MASK])
        if not no_ref:
            frames.get(mfn, writable)
        leaf[b & LEAF_MASK] = mfn << 8 | kind_bits
    iommu.count_mappings(domid, len(mfns) - counted)
    iommu.note_written(dom, bfn, len(mfns))
    iommu.note_flush(ctx, FlushType.MODIFIED if replaced else FlushType.ADDED)
    return 0


def unmap_page(iommu: Iommu, dom: Domain, op: Op) -> int | Generator[str, None, int]:
    if preempt.is_large(op.flags, iommu.options.largest_order) and not iommu.is_non_strict_hwdom(dom):
        return _unmap_page(iommu, dom, op)
    return preempt.finish(_unmap_page(iommu, dom, op))


def _unmap_page(iommu: Iommu, dom: Domain, op: Op) -> Generator[str, None, int]:
    flags = op.flags
    if flags & pv.UNMAP_RESERVED:
        return -EINVAL
    order = flags >> pv.ORDER_SHIFT
    bfn = op.u.unmap_page.bfn
    if order > iommu.options.largest_order or bfn & ((1 << order) - 1):
        return -ENOSPC
    ctx = iommu.contexts.get(dom.domid)
    if ctx is None:
        return -ENOENT
    table, rmrr, faults, domid = ctx.table, ctx.rmrr, iommu.injected_faults, dom.domid
    entries = []
    pause = preempt.first_pause(1 << order)
    for i in range(1 << order):
        if i == pause:
            yield from preempt.pause(dom)
            pause += preempt.LARGE_SLICE
        b = bfn + i
        if b in rmrr:
            return -EACCES
        entry = table.get(b)
        if not entry or (entry >> 2) & KIND_MASK not in UNMAPPABLE:
            return -ENOENT
        if faults and (domid, b) in faults:
            return -EIO
        entries.append(entry)
    frames = iommu.frames
    removed = 0
    pause = preempt.first_pause(len(entries))
    for i, entry in enumerate(entries):
        if i == pause:  # the pages removed so far let go of their frames before anyone runs
            if removed:
                iommu.count_mappings(domid, -removed)
                removed = 0
            iommu.note_flush(ctx, FlushType.MODIFIED)
            yield from preempt.pause(dom)
            pause += preempt.LARGE_SLICE
        kind = (entry >> 2) & KIND_MASK
        if kind == K_MAP:
            frames.put(entry >> 8, bool(entry & PERM_W))
        if kind != K_DEFAULT:
            removed += 1
        b = bfn + i
        table.leaf(b)[b & LEAF_MASK] = 0
    if removed:
        iommu.count_mappings(domid, -removed)
    table.emptied = True
    if table.sparse:  # leaves beyond the domain's memory that this emptied go back
        for index in range(bfn >> LEAF_SHIFT, ((bfn + len(entries) - 1) >> LEAF_SHIFT) + 1):
            table.release_if_empty(index)
    iommu.note_flush(ctx, FlushType.MODIFIED)
    return 0


SUBOPS: dict[int, SubopHandler] = {
    # the foreign subops are an emulator's (foreign.py)
    IOMMUOP_query_caps: query_caps,
    IOMMUOP_map_page: map_page,
    IOMMUOP_unmap_page: unmap_page,
    IOMMUOP_map_foreign_page: foreign.map_foreign_page,
    IOMMUOP_lookup_foreign_page: foreign.lookup_foreign_page,
    IOMMUOP_unmap_foreign_page: foreign.unmap_foreign_page,
}
