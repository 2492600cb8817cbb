"""The host's IOMMU: every domain's context, the M2B, the flushes owed, quotas and faults.

``do_iommu_op``, ballooning, grant maps and device assignment all change IOMMU state; they
do it through this object, which they are handed, so none of them needs the whole host.
It is given the guests' memory (frames and domains) and a way to ask whether an IOREQ
server serves a guest, the only two things of other subsystems the IOMMU's rules read.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Generator, Iterable
from typing import Protocol

from xenemu.core.errors import EPERM, HypercallError
from xenemu.core.iommu import preempt
from xenemu.core.iommu.context import DmaFault, IommuContext
from xenemu.core.iommu.entries import PERM_MASK, PERM_R, PERM_W, RW, FlushType, Kind, entry_mfn, make_entry
from xenemu.core.iommu.fastpath import FastIommu, available
from xenemu.core.iommu.m2b import M2B, M2BEntry
from xenemu.core.iommu.pagetable import BlankLeaf, DefaultRule, PageTable
from xenemu.core.memory.domain import Domain
from xenemu.core.memory.frames import DOMID_XEN
from xenemu.core.memory.guest import GuestMemory
from xenemu.core.memory.leaves import LEAF_SHIFT, LEAF_SIZE
from xenemu.core.options import HostOptions

#: Leaves one ``entries_from`` looks at (a few milliseconds of work at most).
DUMP_LEAVES = 16
#: Mappings that pay for one sparse page-table leaf beyond the free ``max_sparse_leaves``.
MAPPINGS_PER_LEAF = 64


class ServerCheck(Protocol):
    """What the foreign subops ask of the IOREQ servers (the registry satisfies it)."""

    def serves(self, ioserver: int, creator: int, target: int) -> bool: ...


class Iommu:
    """IOMMU state of the whole host; contexts exist for domains with an assigned device."""

    def __init__(self, options: HostOptions, memory: GuestMemory, servers: ServerCheck) -> None:
        self.options = options
        self.memory = memory
        self.frames = memory.frames
        self.servers = servers
        #: domid -> its context; a domain gets one with its first device.
        self.contexts: dict[int, IommuContext] = {}
        #: Contexts of domains being destroyed: no device reaches them any more, and their
        #: entries are given back a slice at a time (``release_retired``).
        self.retired: dict[int, IommuContext] = {}
        self.m2b = M2B()
        #: (domid, bfn) at which subops' IOMMU writes fail with -EIO.
        self.injected_faults: set[tuple[int, int]] = set()
        #: Contexts with a flush pending; emptied before any operation returns or yields.
        self.touched: set[IommuContext] = set()
        #: Mappings each domain holds (map_page entries, M2B entries it made, grant mappings).
        self.mappings_held: Counter[int] = Counter()
        #: DMA faults of devices that see machine addresses (no context).
        self.machine_dma_faults = 0
        #: Live migrations under way: while non-zero, DMA writes set their entry's dirty bit.
        self.dirty_tracking = 0
        #: Scratch frames whose 1:1 default entry of the non-strict hardware domain went when
        #: they became scratch frames; it comes back when they are freed, unless a subop has
        #: written that BFN meanwhile (``note_written``).
        self.defaults_owed: set[int] = set()
        #: The compiled shortcut for map_page/unmap_page, when enabled and built.
        self.fast = FastIommu(self.frames, options.largest_order) if options.fast_path and available() else None

    # -- capabilities ---------------------------------------------------------------------------
    def is_non_strict_hwdom(self, dom: Domain) -> bool:
        return dom.is_hwdom and not self.options.dom0_strict

    def map_cap(self, dom: Domain) -> bool:
        """Whether the caller may program its own IOMMU context (query_caps bit 0)."""
        if not self.options.iommu or not dom.devices:
            return False
        return not (dom.is_hwdom and self.options.dom0_passthrough)

    def wants_context(self, dom: Domain) -> bool:
        """Whether assigning a device gives the domain a context (not without an IOMMU, nor for
        a passthrough hardware domain, whose devices see machine addresses)."""
        return self.options.iommu and not (dom.is_hwdom and self.options.dom0_passthrough)

    # -- quota ----------------------------------------------------------------------------------
    def quota_allows(self, dom: Domain, new: int) -> bool:
        return self.mappings_held[dom.domid] + new <= dom.max_mappings

    def leaves_allow(self, ctx: IommuContext, bfn: int, count: int) -> bool:
        """Whether writing ``count`` BFNs from ``bfn`` stays within the domain's quota of
        sparse page-table leaves; empty ones are given back first.

        The quota is ``max_sparse_leaves`` plus one leaf per ``MAPPINGS_PER_LEAF`` mappings the
        domain holds: mapping densely (512 to a leaf) is never refused, and mapping sparsely
        costs at most 4 KiB per ``MAPPINGS_PER_LEAF`` mappings beyond the first 4 MiB."""
        table = ctx.table
        blank = table.blank
        limit = self.options.max_sparse_leaves + self.mappings_held[ctx.domid] // MAPPINGS_PER_LEAF
        first, last = bfn >> LEAF_SHIFT, (bfn + count - 1) >> LEAF_SHIFT
        if last - first > limit:
            return False
        new = sum(1 for i in range(first, last + 1) if i not in table.leaves and (blank is None or blank(i)))
        if not new:
            return True
        if len(table.sparse) + new > limit and table.emptied:
            table.sweep()  # only when unmaps may have emptied some since the last sweep
        return len(table.sparse) + new <= limit

    def count_mappings(self, domid: int, delta: int) -> None:
        self.mappings_held[domid] += delta
        if not self.mappings_held[domid]:
            del self.mappings_held[domid]

    # -- flushes --------------------------------------------------------------------------------
    def note_flush(self, ctx: IommuContext, flush: FlushType) -> None:
        ctx.note(flush)
        self.touched.add(ctx)

    def flush_touched(self) -> None:
        for ctx in self.touched:
            ctx.flush()
        self.touched.clear()

    def note_written(self, dom: Domain, bfn: int, count: int) -> None:
        """A subop (or a grant map) wrote ``count`` BFNs of ``dom``'s context from ``bfn``: a
        default owed there by a scratch frame no longer comes back by itself."""
        if self.defaults_owed and dom.is_hwdom:
            self.defaults_owed.difference_update(range(bfn, bfn + count))

    # -- fault injection ------------------------------------------------------------------------
    def inject_fault(self, domid: int, bfn: int) -> None:
        if not self.options.fault_injection:
            raise HypercallError(-EPERM, "fault injection is not enabled on this host")
        self.memory.domain(domid)
        self.injected_faults.add((domid, bfn))

    def clear_fault(self, domid: int, bfn: int) -> None:
        self.injected_faults.discard((domid, bfn))

    # -- contexts -------------------------------------------------------------------------------
    def default_blank(self, dom: Domain) -> BlankLeaf:
        """Leaves with no default entry (beyond RAM, or where an HVM p2m never reached) start
        zeroed, without 512 calls of the rule and their garbage."""
        if dom.is_hvm and not self.is_non_strict_hwdom(dom):
            p2m = dom.p2m
            return lambda index: not p2m.has_leaf(index)
        nr_frames = self.frames.nr_frames
        return lambda index: index << LEAF_SHIFT >= nr_frames

    def default_rule(self, dom: Domain) -> DefaultRule:
        """What Xen maps for a PV-IOMMU-unaware domain, BFN by BFN."""
        frames = self.frames
        domid = dom.domid
        if self.is_non_strict_hwdom(dom):
            last, owner, xen = frames.nr_frames, frames.owner, DOMID_XEN

            def identity(bfn: int) -> int:  # every RAM frame that is not Xen's, 1:1
                return make_entry(bfn, Kind.DEFAULT, RW) if 0 <= bfn < last and owner[bfn] != xen else 0

            return identity
        if dom.is_hvm:
            p2m = dom.p2m

            def hvm(bfn: int) -> int:
                mfn = p2m.get(bfn)
                return 0 if mfn is None else make_entry(mfn, Kind.DEFAULT, RW)

            return hvm

        def pv(bfn: int) -> int:
            return make_entry(bfn, Kind.DEFAULT, RW) if frames.belongs_to(bfn, domid) else 0

        return pv

    def new_table(self, dom: Domain) -> PageTable:
        """An empty page table whose entries are the domain's defaults until written."""
        return PageTable(self.default_rule(dom), self.default_blank(dom))

    def context_entries(self, dom: Domain) -> list[tuple[int, int]]:
        """Every present entry of the domain's context, virtual defaults included, by BFN."""
        ctx = self.contexts.get(dom.domid)
        if ctx is None:
            return []
        table = ctx.table
        present = dict(table.materialized())
        if self.is_non_strict_hwdom(dom):
            candidates: Iterable[int] = range(self.frames.nr_frames)
        elif dom.is_hvm:
            candidates = dom.p2m.keys()
        else:
            candidates = self.memory.own_frames(dom)
        for bfn in candidates:
            if not table.is_materialized(bfn):
                entry = table.default_rule(bfn)
                if entry:
                    present[bfn] = entry
        return sorted(present.items())

    def entries_from(self, dom: Domain, start: int, limit: int) -> tuple[list[tuple[int, int]], int | None]:
        """Present entries from BFN ``start`` in BFN order, virtual defaults included: at most
        ``limit``, looking at no more than ``DUMP_LEAVES`` leaves; and the BFN to go on from
        (None when there is nothing beyond).  The toolstack pages through a context this way
        however many entries it holds."""
        ctx = self.contexts.get(dom.domid)
        if ctx is None:
            return [], None
        table = ctx.table
        first = start >> LEAF_SHIFT
        indexes = {i for i in table.leaves if i >= first}
        if self.is_non_strict_hwdom(dom) or not dom.is_hvm:  # defaults over RAM, BFN = MFN
            indexes.update(range(first, ((self.frames.nr_frames - 1) >> LEAF_SHIFT) + 1))
        else:
            indexes.update(i for i in dom.p2m.leaf_indexes() if i >= first)
        out: list[tuple[int, int]] = []
        for n, index in enumerate(sorted(indexes)):
            base = index << LEAF_SHIFT
            if n == DUMP_LEAVES:
                return out, max(start, base)
            leaf = table.leaves.get(index)
            for bfn in range(max(base, start), base + LEAF_SIZE):
                entry = leaf[bfn - base] if leaf is not None else table.default_rule(bfn)
                if entry:
                    if len(out) == limit:
                        return out, bfn
                    out.append((bfn, entry))
        return out, None

    def drop_m2b_entry(self, entry: M2BEntry) -> None:
        """Remove an M2B entry, the IOMMU entry it owns, and its references (no flush)."""
        self.m2b.remove(entry)
        self.count_mappings(entry.mapper, -1)
        if entry.owns_iommu_entry:
            ctx = self.contexts.get(entry.mapper)
            if ctx is not None:
                ctx.table.clear(entry.bfn)
                self.note_flush(ctx, FlushType.MODIFIED)
        self.frames.put(entry.mfn, entry.writable)

    def retire_context(self, dom: Domain) -> None:
        """A dying domain's context leaves service at once (its devices are gone, nothing
        flushes it again); what its entries hold is given back by ``release_retired``."""
        ctx = self.contexts.pop(dom.domid, None)
        if ctx is not None:
            self.touched.discard(ctx)
            self.retired[dom.domid] = ctx
        self.injected_faults = {f for f in self.injected_faults if f[0] != dom.domid}

    def release_retired(self, domid: int) -> Generator[str, None, None]:
        """Give back a retired context leaf by leaf: each ``map_page`` entry's references, and
        the leaf's memory, pausing every slice of work (a guest may hold millions)."""
        ctx = self.retired.get(domid)
        budget = preempt.Budget()
        table = ctx.table if ctx is not None else None
        while table is not None and table.leaves:
            index, leaf = table.leaves.popitem()
            table.directory.forget(index)
            table.sparse.discard(index)
            held = 0
            for entry in leaf:
                if entry:
                    kind = (entry >> 2) & 15
                    if kind == Kind.MAP:
                        self.frames.put(entry_mfn(entry), bool(entry & PERM_W))
                        held += 1
                    elif kind == Kind.MAP_NOREF:
                        held += 1
            if held:
                self.count_mappings(domid, -held)
            if table.leaves and budget.spend(preempt.LEAF_COST + preempt.RELEASE_COST * held):
                yield preempt.PREEMPT
        self.retired.pop(domid, None)
        self.mappings_held.pop(domid, None)

    # -- device DMA -----------------------------------------------------------------------------
    def translate(self, ctx: IommuContext | None, bfn: int, write: bool) -> tuple[int | None, str]:
        """A device's access to ``bfn``: the machine frame, or None and why it faults.

        Through the IOTLB first, as hardware would: a stale entry there still translates."""
        if ctx is None:
            return (bfn, "") if self.frames.exists(bfn) else (None, "beyond RAM")
        entry = ctx.iotlb.lookup(bfn)
        if entry is None:
            entry = ctx.table.get(bfn)
            if not entry:
                return None, "not present"
            ctx.iotlb.fill(bfn, entry)
        need = PERM_W if write else PERM_R
        if not entry & need & PERM_MASK:
            return None, "write denied" if write else "read denied"
        return entry_mfn(entry), ""

    def dirty_tracking_on(self) -> None:
        self.dirty_tracking += 1

    def dirty_tracking_off(self) -> None:
        """One migration fewer; with none left, every dirty bit is cleared (none is read)."""
        self.dirty_tracking -= 1
        if not self.dirty_tracking:
            for ctx in self.contexts.values():
                ctx.dirty.clear()

    def read_dirty(self, owner: int) -> list[tuple[IommuContext, int, int]]:
        """Read and clear every dirty bit whose frame ``owner`` owns: (context, BFN, MFN).
        Bits of other domains' frames stay for their own migrations."""
        owners, found = self.frames.owner, []
        for ctx in self.contexts.values():
            mine = [(bfn, mfn) for bfn, mfn in ctx.dirty.items() if mfn < len(owners) and owners[mfn] == owner]
            for bfn, mfn in mine:
                del ctx.dirty[bfn]
                found.append((ctx, bfn, mfn))
        return found

    def record_fault(self, ctx: IommuContext | None, fault: DmaFault) -> None:
        if ctx is None:
            self.machine_dma_faults += 1
        else:
            ctx.record_fault(fault)
