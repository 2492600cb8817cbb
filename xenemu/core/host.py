"""The host: every piece of hypervisor state, and the operations the toolstack performs.

Pure and synchronous: methods change state and return results or raise ``HypercallError``;
they never block or do I/O, so the core can be driven directly by tests.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from xenemu.core.errors import EBUSY, EINVAL, ENOENT, ENOMEM, ENOSPC, EPERM, HypercallError
from xenemu.core.iommu import fastpath
from xenemu.core.iommu.context import DmaFault, IommuContext
from xenemu.core.iommu.device import DmaResult, PciDevice, normalise_bdf
from xenemu.core.iommu.entries import (
    PERM_MASK,
    PERM_R,
    PERM_W,
    FlushType,
    Kind,
    entry_kind,
    entry_mfn,
    entry_perms,
    make_entry,
)
from xenemu.core.iommu.m2b import M2B, M2BEntry
from xenemu.core.iommu.pagetable import BlankLeaf, DefaultRule, PageTable
from xenemu.core.ioreq.servers import IoreqRegistry, IoreqServer
from xenemu.core.its import DOORBELL_MFN, DOORBELL_OFFSET, ItsHost, ItsOptions
from xenemu.core.memory.domain import DOMID_FIRST_RESERVED, DOMID_SELF, HWDOM_ID, Domain
from xenemu.core.memory.frames import PAGE_SHIFT, PAGE_SIZE, FrameTable
from xenemu.core.memory.guest import GuestMemory
from xenemu.core.memory.leaves import LEAF_SHIFT
from xenemu.core.options import DomainKind, HostOptions

RW = PERM_R | PERM_W


class Host:
    """Machine frames, domains, devices, IOMMU contexts, the M2B and IOREQ servers."""

    def __init__(self, options: HostOptions | None = None) -> None:
        self.options = options or HostOptions()
        opts = self.options
        self.frames = FrameTable(opts.nr_frames)
        for mfn in range(opts.xen_frames):
            self.frames.reserve_for_xen(mfn)
        self.scratch_mfn = opts.scratch_mfn
        self.memory = GuestMemory(self.frames)
        self.domains = self.memory.domains
        self.devices: dict[str, PciDevice] = {}
        self.m2b = M2B()
        self.ioreq = IoreqRegistry()
        #: (domid, bfn) at which subops' IOMMU writes fail with -EIO.
        self.injected_faults: set[tuple[int, int]] = set()
        #: Contexts with a flush pending; emptied before any operation returns or yields.
        self.touched: set[IommuContext] = set()
        #: Mappings each domain holds (map_page entries, M2B entries it made, grant mappings).
        self.mappings_held: Counter[int] = Counter()
        #: IOREQ servers with new requests their emulator has not been told of yet.
        self.notify: set[int] = set()
        #: DMA faults of devices that see machine addresses (no context).
        self.machine_dma_faults = 0
        self.next_domid = 1
        self.its = ItsHost(
            self.memory,
            ItsOptions(
                pits=opts.its_pits,
                cpus=opts.its_cpus,
                queue_slots=opts.its_queue_slots,
                rate=opts.its_rate,
                batch_size=opts.vits_batch_size,
                elision=opts.its_elision,  # type: ignore[arg-type]
            ),
        )
        #: The compiled shortcut for map_page/unmap_page, when enabled and built.
        self.fast = fastpath.FastIommu(self) if opts.fast_path and fastpath.available() else None
        self.hwdom = self.memory.populate(HWDOM_ID, opts.dom0_kind, opts.dom0_memory, "Domain-0")
        self.its.add_domain(HWDOM_ID)
        self.hwdom.is_hwdom = True
        self.hwdom.max_mappings = opts.max_mappings

    # -- lookups ------------------------------------------------------------------------------
    def domain(self, domid: int) -> Domain:
        return self.memory.domain(domid)

    def is_non_strict_hwdom(self, dom: Domain) -> bool:
        return dom.is_hwdom and not self.options.dom0_strict

    def map_cap(self, dom: Domain) -> bool:
        """Whether the caller may program its own IOMMU context (query_caps bit 0)."""
        if not self.options.iommu or not dom.devices:
            return False
        return not (dom.is_hwdom and self.options.dom0_passthrough)

    def gfn_to_mfn(self, dom: Domain, gfn: int) -> int | None:
        return self.memory.gfn_to_mfn(dom, gfn)

    def resolve_foreign(self, domid: int) -> Domain | None:
        return self.memory.resolve_foreign(domid)

    # -- domains ------------------------------------------------------------------------------
    def _allocate_domid(self) -> int:
        for _ in range(DOMID_FIRST_RESERVED):
            domid = self.next_domid
            self.next_domid = domid + 1 if domid + 1 < DOMID_FIRST_RESERVED else 1
            if domid not in self.domains and domid not in self.frames.held and domid not in self.its.domains:
                return domid
        raise HypercallError(-ENOSPC, "no free domain id")

    def create_domain(
        self,
        kind: DomainKind,
        memory: int,
        target: int | None = None,
        name: str = "",
        max_mappings: int | None = None,
        vcpus: int = 1,
        pin: list[int] | None = None,
    ) -> Domain:
        if kind not in ("pv", "hvm"):
            raise HypercallError(-EINVAL, f"bad domain type {kind!r}")
        if memory < 0 or (max_mappings is not None and max_mappings < 0):
            raise HypercallError(-EINVAL, "negative memory or quota")
        if target is not None:
            self.domain(target)
        if not 1 <= vcpus <= 64 or (
            pin is not None and (len(pin) != vcpus or not all(0 <= p < self.options.its_cpus for p in pin))
        ):
            raise HypercallError(-EINVAL, "bad vCPUs or pinning")
        if memory > self.frames.nr_free:  # before an id is taken: a failed create consumes none
            raise HypercallError(-ENOMEM, f"{memory} frames wanted, {self.frames.nr_free} free")
        domid = self._allocate_domid()
        dom = self.memory.populate(domid, kind, memory, name)
        dom.target = target
        dom.max_mappings = self.options.max_mappings if max_mappings is None else max_mappings
        self.its.add_domain(domid, vcpus, pin)
        return dom

    def quota_allows(self, dom: Domain, new: int) -> bool:
        return self.mappings_held[dom.domid] + new <= dom.max_mappings

    def count_mappings(self, domid: int, delta: int) -> None:
        self.mappings_held[domid] += delta
        if not self.mappings_held[domid]:
            del self.mappings_held[domid]

    def destroy_domain(self, domid: int) -> None:
        """Release everything the domain holds; frames others still hold stay until let go."""
        dom = self.domain(domid)
        if dom.is_hwdom:
            raise HypercallError(-EPERM, "the hardware domain cannot be destroyed")
        for server in [s for s in self.ioreq.servers.values() if s.creator == domid]:
            self._destroy_ioreq_server(server)
        from xenemu.core.grants.ops import release_mapping

        for mapping in list(dom.maptrack.mappings.values()):
            release_mapping(self, dom, mapping)
        ctx = dom.context
        if ctx is not None:
            for _bfn, entry in ctx.table.materialized():
                if entry_kind(entry) == Kind.MAP:
                    self.frames.put(entry_mfn(entry), bool(entry_perms(entry) & PERM_W))
            self.touched.discard(ctx)
            dom.context = None
        for bdf in list(dom.devices):
            del self.devices[bdf]
        dom.devices.clear()
        for server in self.ioreq.servers.values():
            if server.target == domid:
                server.target = None
        for other in self.domains.values():
            if other.target == domid:
                other.target = None
        self.injected_faults = {f for f in self.injected_faults if f[0] != domid}
        del self.domains[domid]
        self.mappings_held.pop(domid, None)
        self.its.begin_teardown(domid)
        # Emulators still holding its frames are told (or swapped), but nobody waits for them.
        from xenemu.core.ioreq.balloon import Invalidations, release_frame

        owed = Invalidations()
        for mfn in self.memory.own_frames(dom):
            release_frame(self, mfn, owed)
            self.frames.unpopulate(mfn)
        dom.p2m.clear()
        dom.pages = 0
        self.flush_touched()
        owed.send(self)

    # -- IOMMU contexts -------------------------------------------------------------------------
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
            first, last = self.options.xen_frames, frames.nr_frames

            def identity(bfn: int) -> int:
                return make_entry(bfn, Kind.DEFAULT, RW) if first <= bfn < last else 0

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

    def assign_device(
        self,
        domid: int,
        bdf: str,
        rmrr: list[tuple[int, int]] | None = None,
        its_devid: int | None = None,
        its_events: int = 0,
        pits: int = 0,
    ) -> PciDevice:
        """Assign a device; its domain's first device creates the IOMMU context. A device with an
        ITS DeviceID gets its physical LPIs now, and its doorbell in the IOMMU context."""
        dom = self.domain(domid)
        try:
            bdf = normalise_bdf(bdf)
        except ValueError as exc:
            raise HypercallError(-EINVAL, str(exc)) from None
        if bdf in self.devices:
            raise HypercallError(-EBUSY, f"{bdf} is already assigned to d{self.devices[bdf].domid}")
        regions = list(rmrr or [])
        device = PciDevice(bdf, domid, regions)
        frames = device.rmrr_frames()
        for start, count in regions:
            if start < 0 or count <= 0:
                raise HypercallError(-EINVAL, "bad RMRR region")
        for mfn in frames:
            if self.frames.exists(mfn) and not (self.frames.is_xen(mfn) and mfn != self.scratch_mfn):
                raise HypercallError(-EINVAL, f"RMRR frame {mfn:#x} is RAM that is not Xen's")
        wants_context = self.options.iommu and not (dom.is_hwdom and self.options.dom0_passthrough)
        ctx = dom.context
        if wants_context:
            if ctx is None and any(True for _ in self.m2b.held_by(domid)):
                raise HypercallError(-EBUSY, "the domain holds M2B entries made without a context")
            table = ctx.table if ctx is not None else PageTable(self.default_rule(dom), self.default_blank(dom))
            for mfn in frames:
                entry = table.get(mfn)
                if entry and entry_kind(entry) != Kind.DEFAULT and entry != make_entry(mfn, Kind.RMRR, RW):
                    raise HypercallError(-EBUSY, f"BFN {mfn:#x} is already mapped")
            if ctx is None:
                ctx = dom.context = IommuContext(domid, table)
            for mfn in frames:
                before = ctx.table.get(mfn)
                ctx.rmrr[mfn] = ctx.rmrr.get(mfn, 0) + 1
                entry = make_entry(mfn, Kind.RMRR, RW)
                if before != entry:
                    ctx.table.set(mfn, entry)
                    self.note_flush(ctx, FlushType.MODIFIED if before else FlushType.ADDED)
        self.devices[bdf] = device
        dom.devices.add(bdf)
        if its_devid is not None:
            vdevid = sum(1 for d in self.devices.values() if d.domid == domid and d.its is not None)
            device.its = self.its.assign(domid, its_devid, pits, its_events, vdevid)
            ctx = dom.context
            if ctx is not None:
                bfn = self.its.translation_gpa(domid, pits) >> PAGE_SHIFT
                if bfn not in ctx.doorbells:
                    before = ctx.table.get(bfn)
                    ctx.doorbells[bfn] = pits
                    ctx.rmrr[bfn] = ctx.rmrr.get(bfn, 0) + 1
                    ctx.table.set(bfn, make_entry(DOORBELL_MFN + pits, Kind.DOORBELL, PERM_W))
                    self.note_flush(ctx, FlushType.MODIFIED if before else FlushType.ADDED)
        self.flush_touched()
        return device

    def context_entries(self, dom: Domain) -> list[tuple[int, int]]:
        """Every present entry of the domain's context, virtual defaults included, by BFN."""
        ctx = dom.context
        if ctx is None:
            return []
        table = ctx.table
        present = dict(table.materialized())
        if self.is_non_strict_hwdom(dom):
            candidates: Iterable[int] = range(self.options.xen_frames, self.frames.nr_frames)
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

    def note_flush(self, ctx: IommuContext, flush: FlushType) -> None:
        ctx.note(flush)
        self.touched.add(ctx)

    def flush_touched(self) -> None:
        for ctx in self.touched:
            ctx.flush()
        self.touched.clear()

    # -- fault injection ----------------------------------------------------------------------
    def inject_fault(self, domid: int, bfn: int) -> None:
        if not self.options.fault_injection:
            raise HypercallError(-EPERM, "fault injection is not enabled on this host")
        self.domain(domid)
        self.injected_faults.add((domid, bfn))

    def clear_fault(self, domid: int, bfn: int) -> None:
        self.injected_faults.discard((domid, bfn))

    # -- IOREQ servers ------------------------------------------------------------------------
    def create_ioreq_server(self, caller: int, target: int) -> IoreqServer:
        dom = self.domain(caller)
        if target == DOMID_SELF:
            target = caller
        guest = self.domain(target)
        if not dom.privileged_over(guest):
            raise HypercallError(-EPERM, f"d{caller} is not privileged over d{target}")
        if self.ioreq.exhausted():
            raise HypercallError(-ENOSPC, "IOREQ server ids are exhausted")
        return self.ioreq.create(caller, target)

    def own_ioreq_server(self, caller: int, ioserver: int) -> IoreqServer:
        """The caller's own server, or -ENOENT / -EPERM."""
        server = self.ioreq.get(ioserver)
        if server is None:
            raise HypercallError(-ENOENT, f"no IOREQ server {ioserver}")
        if server.creator != caller:
            raise HypercallError(-EPERM, f"IOREQ server {ioserver} is not d{caller}'s")
        return server

    def destroy_ioreq_server(self, caller: int, ioserver: int) -> None:
        self._destroy_ioreq_server(self.own_ioreq_server(caller, ioserver))
        self.flush_touched()

    def release_ioreq_servers(self, creator: int) -> int:
        """Destroy every server ``creator`` made (its emulator went away); how many there were."""
        servers = [s for s in self.ioreq.servers.values() if s.creator == creator]
        for server in servers:
            self._destroy_ioreq_server(server)
        self.flush_touched()
        return len(servers)

    def _destroy_ioreq_server(self, server: IoreqServer) -> None:
        mapper = self.domains.get(server.creator)
        ctx = mapper.context if mapper else None
        for entry in self.m2b.for_server(server.id):
            self.drop_m2b_entry(entry)
        if ctx is not None:
            for bfn in [b for b, s in ctx.scratch.items() if s == server.id]:
                del ctx.scratch[bfn]
                ctx.table.clear(bfn)
                self.note_flush(ctx, FlushType.MODIFIED)
        del self.ioreq.servers[server.id]
        self.notify.discard(server.id)

    def drop_m2b_entry(self, entry: M2BEntry) -> None:
        """Remove an M2B entry, the IOMMU entry it owns, and its references (no flush)."""
        self.m2b.remove(entry)
        self.count_mappings(entry.mapper, -1)
        if entry.owns_iommu_entry:
            mapper = self.domains.get(entry.mapper)
            ctx = mapper.context if mapper else None
            if ctx is not None:
                ctx.table.clear(entry.bfn)
                self.note_flush(ctx, FlushType.MODIFIED)
        self.frames.put(entry.mfn, entry.writable)

    # -- guest memory and devices -------------------------------------------------------------
    def guest_access(self, domid: int, gfn: int, offset: int, data: bytes | None, length: int = 0) -> bytes:
        """A guest's CPU reading or writing its own memory (what it later asks devices to DMA)."""
        return self.memory.access(domid, gfn, offset, data, length)

    def device_dma(self, bdf: str, addr: int, data: bytes | None = None, length: int = 0) -> DmaResult:
        """A device reads (``data`` None) or writes at bus address ``addr``, page by page."""
        try:
            device = self.devices[normalise_bdf(bdf)]
        except (KeyError, ValueError):
            raise HypercallError(-ENOENT, f"no device {bdf}") from None
        write = data is not None
        size = len(data) if data is not None else length
        if addr < 0 or size < 0:
            raise HypercallError(-EINVAL, "bad DMA range")
        ctx = self.domains[device.domid].context
        out = bytearray()
        done = 0
        while done < size:
            bfn, offset = (addr + done) >> PAGE_SHIFT, (addr + done) & (PAGE_SIZE - 1)
            chunk = min(size - done, PAGE_SIZE - offset)
            mfn, reason = self._translate(ctx, bfn, write)
            if mfn is None:
                if ctx is None:
                    self.machine_dma_faults += 1
                else:
                    ctx.record_fault(DmaFault(device.bdf, bfn, write, reason))
                return DmaResult(False, bytes(out), bfn, reason)
            if mfn >= DOORBELL_MFN:  # the ITS doorbell: a 32-bit write of an EventID is an MSI
                if data is not None and offset == DOORBELL_OFFSET and chunk == 4 and device.its is not None:
                    self.its.pits[mfn - DOORBELL_MFN].hw.msi(
                        device.its.pdevid, int.from_bytes(data[done : done + 4], "little")
                    )
                    self.its.deliver()  # translation is immediate: the LPI is pending now
                elif data is None:
                    out += bytes(chunk)
            elif data is not None:
                self.frames.write(mfn, offset, data[done : done + chunk])
            else:
                out += self.frames.read(mfn, offset, chunk)
            done += chunk
        return DmaResult(True, bytes(out))

    def _translate(self, ctx: IommuContext | None, bfn: int, write: bool) -> tuple[int | None, str]:
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
