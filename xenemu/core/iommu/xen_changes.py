"""The changes Xen itself makes to IOMMU contexts, on behalf of the other subsystems.

A subop is the guest's change; these are Xen's (the page's "Xen's own changes": ballooning,
populate, IOREQ server creation and destruction, device assignment, grant maps), which no
injected fault stops.  The other subsystems ask for them here instead of writing page tables,
RMRR or scratch records themselves, so every write to a context stays inside this package.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Literal

from xenemu.core.errors import EBUSY, HypercallError
from xenemu.core.iommu import preempt
from xenemu.core.iommu.context import IommuContext
from xenemu.core.iommu.entries import PERM_R, PERM_W, RW, FlushType, Kind, entry_kind, make_entry
from xenemu.core.iommu.m2b import M2BEntry
from xenemu.core.iommu.state import Iommu
from xenemu.core.memory.domain import Domain
from xenemu.core.memory.leaves import LEAF_SHIFT

# -- defaults that follow the p2m -------------------------------------------------------------


def drop_default(iommu: Iommu, dom: Domain, bfn: int, mfn: int) -> None:
    """Balloon-out removes the frame's default entry (not the non-strict hwdom's 1:1 ones).

    Called before the p2m forgets the GFN: a virtual default (an unwritten leaf) follows the
    p2m by itself, but the IOTLB may hold it, hence the flush either way."""
    ctx = iommu.contexts.get(dom.domid)
    if ctx is None or iommu.is_non_strict_hwdom(dom):
        return
    if ctx.table.get(bfn) != make_entry(mfn, Kind.DEFAULT, RW):
        return
    if ctx.table.is_materialized(bfn):
        ctx.table.clear(bfn)
    iommu.note_flush(ctx, FlushType.MODIFIED)


def memory_left(iommu: Iommu, dom: Domain, gfn: int) -> None:
    """After a GFN left the p2m: an emptied page-table leaf over memory that is now all gone
    goes back (else a guest cycling populate, map, unmap and balloon-out 512 GFNs apart left
    a 4 KiB leaf behind each time)."""
    ctx = iommu.contexts.get(dom.domid)
    if ctx is not None and dom.is_hvm:
        ctx.table.release_if_empty(gfn >> LEAF_SHIFT)


def add_default(iommu: Iommu, dom: Domain, bfn: int, mfn: int) -> None:
    """Populate adds a default entry wherever that BFN is unmapped, whatever its history."""
    ctx = iommu.contexts.get(dom.domid)
    if ctx is None or iommu.is_non_strict_hwdom(dom):
        return
    if ctx.table.is_materialized(bfn):
        if ctx.table.get(bfn):
            return
        ctx.table.set(bfn, make_entry(mfn, Kind.DEFAULT, RW))
    iommu.note_flush(ctx, FlushType.ADDED)


# -- scratch frames ---------------------------------------------------------------------------


def scratch_taken(iommu: Iommu, mfn: int) -> None:
    """A free frame became an IOREQ server's scratch frame (Xen's): the non-strict hardware
    domain's 1:1 default of it goes, owed back when the frame is freed unless a subop writes
    that BFN meanwhile.  Called once the frame is Xen's, so the default rule already says 0."""
    hwdom = iommu.memory.domains.get(0)
    if hwdom is None or not iommu.is_non_strict_hwdom(hwdom):
        return
    ctx = iommu.contexts.get(0)
    if ctx is None:
        iommu.defaults_owed.add(mfn)
        return
    if not ctx.table.is_materialized(mfn):
        iommu.defaults_owed.add(mfn)  # the virtual default followed the owner change
        iommu.note_flush(ctx, FlushType.MODIFIED)
    elif ctx.table.get(mfn) == make_entry(mfn, Kind.DEFAULT, RW):
        ctx.table.clear(mfn)
        iommu.defaults_owed.add(mfn)
        iommu.note_flush(ctx, FlushType.MODIFIED)


def scratch_freed(iommu: Iommu, mfn: int) -> None:
    """A scratch frame went back to the free pool: its 1:1 default comes back if still owed."""
    if mfn not in iommu.defaults_owed:
        return
    iommu.defaults_owed.discard(mfn)
    ctx = iommu.contexts.get(0)
    if ctx is None:
        return
    if ctx.table.is_materialized(mfn):
        if ctx.table.get(mfn):
            return
        ctx.table.set(mfn, make_entry(mfn, Kind.DEFAULT, RW))
    iommu.note_flush(ctx, FlushType.ADDED)


def swap_to_scratch(iommu: Iommu, entry: M2BEntry, scratch_mfn: int) -> None:
    """Re-point a ``swap_mfn`` foreign mapping at its server's scratch frame (no reference)."""
    ctx = iommu.contexts.get(entry.mapper)
    assert ctx is not None and entry.owns_iommu_entry
    iommu.m2b.remove(entry)  # the mapping stays the emulator's (and on its quota) as a scratch entry
    ctx.table.set(entry.bfn, make_entry(scratch_mfn, Kind.SCRATCH, entry.flags & RW))
    ctx.scratch[entry.bfn] = entry.ioserver
    iommu.note_flush(ctx, FlushType.MODIFIED)
    iommu.frames.put(entry.mfn, entry.writable)


def drop_scratch(iommu: Iommu, ctx: IommuContext, bfn: int) -> None:
    """Remove a scratch entry: its BFN is unmapped and the emulator's quota gets it back."""
    del ctx.scratch[bfn]
    ctx.table.clear(bfn)
    iommu.count_mappings(ctx.domid, -1)
    iommu.note_flush(ctx, FlushType.MODIFIED)


def end_server(iommu: Iommu, creator: int, ioserver: int) -> Generator[str, None, None]:
    """An IOREQ server goes: its M2B entries, their references and IOMMU entries, and its
    scratch entries, in slices (an emulator may hold millions): flushed before each pause and
    left for the caller to flush at the end."""
    while keys := iommu.m2b.by_server.get(ioserver):
        for _ in range(min(len(keys), preempt.M2B_PER_SLICE)):
            iommu.drop_m2b_entry(iommu.m2b.by_key[keys.pop()])  # pop: no rescan of emptied slots
        if ioserver in iommu.m2b.by_server:
            iommu.flush_touched()
            yield preempt.PREEMPT
    ctx = iommu.contexts.get(creator)
    if ctx is None:
        return
    bfns = list(ctx.scratch)  # a copy of keys; each is looked at once, a slice at a time
    for start in range(0, len(bfns), preempt.M2B_PER_SLICE):
        if start:
            iommu.flush_touched()
            yield preempt.PREEMPT
        for bfn in bfns[start : start + preempt.M2B_PER_SLICE]:
            if ctx.scratch.get(bfn) == ioserver:
                drop_scratch(iommu, ctx, bfn)


# -- devices ----------------------------------------------------------------------------------


def check_attach(iommu: Iommu, dom: Domain, rmrr_frames: list[int]) -> None:
    """Whether ``attach_device`` would succeed (``-EBUSY`` otherwise); it changes nothing, so
    the host can check every subsystem before any of them allocates."""
    if not iommu.wants_context(dom):
        return
    ctx = iommu.contexts.get(dom.domid)
    if ctx is None and any(True for _ in iommu.m2b.held_by(dom.domid)):
        raise HypercallError(-EBUSY, "the domain holds M2B entries made without a context")
    table = ctx.table if ctx is not None else iommu.new_table(dom)
    for mfn in rmrr_frames:
        entry = table.get(mfn)
        if entry and entry_kind(entry) != Kind.DEFAULT and entry != make_entry(mfn, Kind.RMRR, RW):
            raise HypercallError(-EBUSY, f"BFN {mfn:#x} is already mapped")


def attach_device(iommu: Iommu, dom: Domain, rmrr_frames: list[int]) -> IommuContext | None:
    """A device is assigned: the domain's context (created with its defaults at the first
    device) gets the device's RMRR entries.  None when the domain gets no context."""
    check_attach(iommu, dom, rmrr_frames)
    domid = dom.domid
    ctx = iommu.contexts.get(domid)
    if not iommu.wants_context(dom):
        return ctx
    if ctx is None:
        ctx = iommu.contexts[domid] = IommuContext(domid, iommu.new_table(dom))
    for mfn in rmrr_frames:
        before = ctx.table.get(mfn)
        ctx.rmrr[mfn] = ctx.rmrr.get(mfn, 0) + 1
        entry = make_entry(mfn, Kind.RMRR, RW)
        if before != entry:
            ctx.table.set(mfn, entry)
            iommu.note_flush(ctx, FlushType.MODIFIED if before else FlushType.ADDED)
    return ctx


def map_doorbell(iommu: Iommu, ctx: IommuContext, bfn: int, pits: int, doorbell_mfn: int) -> None:
    """A pITS's GITS_TRANSLATER at ``bfn``, write-only, reserved like an RMRR entry."""
    if bfn in ctx.doorbells:
        return
    before = ctx.table.get(bfn)
    ctx.doorbells[bfn] = pits
    ctx.rmrr[bfn] = ctx.rmrr.get(bfn, 0) + 1
    ctx.table.set(bfn, make_entry(doorbell_mfn, Kind.DOORBELL, PERM_W))
    iommu.note_flush(ctx, FlushType.MODIFIED if before else FlushType.ADDED)


# -- grant maps at a caller-chosen BFN --------------------------------------------------------

BfnCheck = Literal["ok", "no_context", "reserved", "mapped", "fault", "quota"]


def check_grant_bfn(iommu: Iommu, mapper: Domain, bfn: int) -> BfnCheck:
    """Whether a grant may be mapped at ``bfn`` of the mapper's context, as ``map_page`` would."""
    ctx = iommu.contexts.get(mapper.domid)
    if ctx is None or not iommu.map_cap(mapper):
        return "no_context"
    present = ctx.table.get(bfn)
    if bfn in ctx.rmrr or (present and entry_kind(present) != Kind.DEFAULT):
        return "reserved" if bfn in ctx.rmrr else "mapped"
    if (mapper.domid, bfn) in iommu.injected_faults:
        return "fault"
    if not iommu.leaves_allow(ctx, bfn, 1):
        return "quota"
    return "ok"


def map_grant(iommu: Iommu, mapper: Domain, bfn: int, mfn: int, readonly: bool) -> None:
    ctx = iommu.contexts[mapper.domid]
    iommu.note_flush(ctx, FlushType.MODIFIED if ctx.table.get(bfn) else FlushType.ADDED)
    ctx.table.set(bfn, make_entry(mfn, Kind.GRANT, PERM_R if readonly else RW))
    iommu.note_written(mapper, bfn, 1)


def unmap_grant(iommu: Iommu, mapper_domid: int, bfn: int) -> None:
    ctx = iommu.contexts.get(mapper_domid)
    if ctx is not None:
        ctx.table.clear(bfn)
        iommu.note_flush(ctx, FlushType.MODIFIED)
