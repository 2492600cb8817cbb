"""The host: the composition root that builds every subsystem and runs what spans them.

Each subsystem owns its state and is handed only the pieces of others it reads (the guests'
memory, the IOMMU, the IOREQ registry); none imports this module.  What is left here is what
no single subsystem can do alone: creating and destroying a domain (every subsystem keeps
per-domain state), assigning a device (an IOMMU context, RMRRs, the ITS doorbell) and device
DMA (translation through the IOMMU, and an MSI when it hits the doorbell).

Pure and synchronous: methods change state and return results or raise ``HypercallError``;
they never block or do I/O, so the core can be driven directly by tests.
"""

from __future__ import annotations

from collections.abc import Generator

from xenemu.core.errors import EBUSY, EINVAL, ENOENT, ENOMEM, ENOSPC, EOPNOTSUPP, EPERM, ESRCH, HypercallError
from xenemu.core.grants.ops import Grants
from xenemu.core.iommu import preempt, xen_changes
from xenemu.core.iommu.context import DmaFault, IommuContext
from xenemu.core.iommu.device import DmaResult, PciDevice, normalise_bdf
from xenemu.core.iommu.entries import entry_mfn
from xenemu.core.iommu.state import Iommu
from xenemu.core.ioreq.balloon import Balloon
from xenemu.core.ioreq.emulators import Emulators
from xenemu.core.ioreq.servers import IoreqRegistry
from xenemu.core.its import DOORBELL_MFN, DOORBELL_OFFSET, ItsHost, ItsOptions
from xenemu.core.memory.domain import DOMID_FIRST_RESERVED, HWDOM_ID, Domain
from xenemu.core.memory.frames import PAGE_SHIFT, PAGE_SIZE, FrameTable
from xenemu.core.memory.guest import GuestMemory
from xenemu.core.options import DomainKind, HostOptions

#: Reserved frames one device may name (a real RMRR is a few pages to a few MiB), and the
#: bound on the bus frames they may name (2^40 frames: 52-bit bus addresses).
MAX_RMRR_FRAMES = 4096
#: The largest mapping quota the toolstack may give (the fast path counts it in 64 bits).
MAX_QUOTA = 1 << 32
#: Longest domain name (Xen's toolstack keeps names short; replies and logs carry it).
MAX_NAME = 64
MAX_BFN = 1 << 40


class Host:
    """Machine frames and domains, the IOMMU, IOREQ servers, grants and the ITS, built together."""

    def __init__(self, options: HostOptions | None = None) -> None:
        self.options = opts = options or HostOptions()
        self.frames = FrameTable(opts.nr_frames)
        for mfn in range(opts.xen_frames):
            self.frames.reserve_for_xen(mfn)
        self.memory = GuestMemory(self.frames)
        self.domains = self.memory.domains
        self.ioreq = IoreqRegistry()
        self.iommu = Iommu(opts, self.memory, self.ioreq)
        self.emulators = Emulators(self.memory, self.iommu, self.ioreq)
        self.balloon = Balloon(self.memory, self.iommu, self.ioreq)
        self.grants = Grants(self.memory, self.iommu)
        self.its = ItsHost(
            self.memory,
            ItsOptions(
                pits=opts.its_pits,
                cpus=opts.its_cpus,
                queue_slots=opts.its_queue_slots,
                rate=opts.its_rate,
                batch_size=opts.vits_batch_size,
                elision=opts.its_elision,  # type: ignore[arg-type]
                ram_frames=opts.nr_frames,
            ),
        )
        #: Assigned PCI devices by BDF.
        self.devices: dict[str, PciDevice] = {}
        #: Domains stopped for a live migration's last section, or being received: their own
        #: calls, requests naming them and devices' writes to their frames are -EBUSY (what
        #: the image holds must not change after it was taken).
        self.suspended: set[int] = set()
        #: Received domains, still in ``suspended``, that run once their vITS is back on this
        #: host's pITS (``migration.vits.resume_received``).
        self.resuming: set[int] = set()
        self.next_domid = 1
        self.hwdom = self.memory.populate(HWDOM_ID, opts.dom0_kind, opts.dom0_memory, "Domain-0")
        self.hwdom.is_hwdom = True
        self.hwdom.max_mappings = opts.max_mappings
        self.hwdom.max_pages = opts.nr_frames  # the hardware domain is trusted with all of RAM
        self.grants.add_domain(HWDOM_ID)
        self.its.add_domain(HWDOM_ID)

    def domain(self, domid: int) -> Domain:
        """A live domain, or ``-ESRCH``."""
        return self.memory.domain(domid)

    # -- domains ------------------------------------------------------------------------------
    def _allocate_domid(self) -> int:
        for _ in range(DOMID_FIRST_RESERVED):
            domid = self.next_domid
            self.next_domid = domid + 1 if domid + 1 < DOMID_FIRST_RESERVED else 1
            if (
                domid not in self.domains
                and domid not in self.memory.limbo
                and domid not in self.frames.held
                and domid not in self.its.domains
            ):
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
        max_pages: int | None = None,
    ) -> Domain:
        """``creating`` run to its end (tests and scripts)."""
        return preempt.drain(self.creating(kind, memory, target, name, max_mappings, vcpus, pin, max_pages))

    def creating(
        self,
        kind: DomainKind,
        memory: int,
        target: int | None = None,
        name: str = "",
        max_mappings: int | None = None,
        vcpus: int = 1,
        pin: list[int] | None = None,
        max_pages: int | None = None,
    ) -> Generator[str, None, Domain]:
        """A new domain; every argument is checked before anything is allocated, and its
        memory is populated in slices (``GuestMemory.build``) before any request can find it."""
        if kind not in ("pv", "hvm"):
            raise HypercallError(-EINVAL, f"bad domain type {kind!r}")
        if not 0 <= memory <= self.frames.nr_frames or (
            max_mappings is not None and not 0 <= max_mappings <= MAX_QUOTA
        ):
            raise HypercallError(-EINVAL, f"memory or mapping quota out of range (0..{MAX_QUOTA})")
        if max_pages is not None and not 0 <= max_pages <= self.frames.nr_frames:
            raise HypercallError(-EINVAL, f"max_pages out of range (0..{self.frames.nr_frames})")
        if len(name) > MAX_NAME:
            raise HypercallError(-EINVAL, f"domain name longer than {MAX_NAME} characters")
        served = self.domain(target) if target is not None else None
        if not 1 <= vcpus <= 64 or (
            pin is not None and (len(pin) != vcpus or not all(0 <= p < self.options.its_cpus for p in pin))
        ):
            raise HypercallError(-EINVAL, "bad vCPUs or pinning")
        if memory > self.frames.nr_free:  # before an id is taken: a failed create consumes none
            raise HypercallError(-ENOMEM, f"{memory} frames wanted, {self.frames.nr_free} free")
        domid = self._allocate_domid()
        dom = yield from self.memory.build(domid, kind, memory, name)
        if target is not None and self.domains.get(target) is not served:  # destroyed meanwhile
            self.memory.unbuild(dom)
            raise HypercallError(-ESRCH, f"d{target} was destroyed while the domain was built")
        self.memory.go_live(dom)
        dom.target = target
        dom.max_mappings = self.options.max_mappings if max_mappings is None else max_mappings
        dom.max_pages = memory if max_pages is None else max(memory, max_pages)  # xl: maxmem >= memory
        self.grants.add_domain(domid)
        self.its.add_domain(domid, vcpus, pin)
        return dom

    def set_max_pages(self, domid: int, max_pages: int) -> None:
        """``xl mem-set``: the most the domain may populate from now on (it keeps what it has)."""
        dom = self.domain(domid)
        if not 0 <= max_pages <= self.frames.nr_frames:
            raise HypercallError(-EINVAL, f"max_pages out of range (0..{self.frames.nr_frames})")
        dom.max_pages = max_pages

    def destroy_domain(self, domid: int) -> None:
        """``destroying`` run to its end (tests and scripts)."""
        preempt.drain(self.destroying(domid))

    def destroying(self, domid: int) -> Generator[str, None, None]:
        """Destroy a domain as Xen's ``domain_kill`` does: out of service at once (no request
        finds it, its devices, grants and IOREQ servers go, work in flight for it ends), then
        what it holds is given back in slices, pausing between them (its IOREQ servers' M2B
        and scratch entries, its context's entries, its frames: a guest may hold millions).
        Meanwhile it is in ``limbo``: its id is not given to another domain.  Frames others
        still hold stay until let go."""
        dom = self.domain(domid)
        if dom.is_hwdom:
            raise HypercallError(-EPERM, "the hardware domain cannot be destroyed")
        del self.domains[domid]
        self.suspended.discard(domid)
        self.resuming.discard(domid)
        self.memory.limbo[domid] = dom
        for bdf in list(dom.devices):
            del self.devices[bdf]
        dom.devices.clear()
        servers = [s for s in self.ioreq.servers.values() if s.creator == domid]
        for server in servers:
            self.emulators.retire(server)
        self.grants.release_domain(dom)
        self.emulators.forget_domain(domid)
        for other in self.domains.values():
            if other.target == domid:
                other.target = None
        self.its.begin_teardown(domid)
        self.iommu.flush_touched()
        for server in servers:
            yield from self.emulators.end(server)
        self.iommu.retire_context(dom)
        self.iommu.flush_touched()
        yield from self.iommu.release_retired(domid)
        yield from self.balloon.relinquish(dom)
        del self.memory.limbo[domid]

    # -- devices ------------------------------------------------------------------------------
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
        iommu = self.iommu
        try:
            bdf = normalise_bdf(bdf)
        except ValueError as exc:
            raise HypercallError(-EINVAL, str(exc)) from None
        if bdf in self.devices:
            raise HypercallError(-EBUSY, f"{bdf} is already assigned to d{self.devices[bdf].domid}")
        if dom.busy_ops:  # an op of many pages is mid-flight in its context
            raise HypercallError(-EBUSY, f"d{domid} has an IOMMU op in flight")
        if dom.is_hvm and not self.options.iommu:
            # As Xen refuses: without an IOMMU an HVM guest's device would DMA to any frame.
            raise HypercallError(-EOPNOTSUPP, "no IOMMU: an HVM domain cannot be given a device")
        if its_devid is not None:
            self.its.check_assign(its_devid, pits, its_events)  # before anything changes
        regions = list(rmrr or [])
        if sum(max(count, 0) for _, count in regions) > MAX_RMRR_FRAMES or any(
            start < 0 or count <= 0 or start + count > MAX_BFN for start, count in regions
        ):  # checked before any list of frames is built from them
            raise HypercallError(-EINVAL, f"bad RMRR region (at most {MAX_RMRR_FRAMES} frames, below frame 2^40)")
        device = PciDevice(bdf, domid, regions)
        frames = device.rmrr_frames()
        scratch = {s.scratch_mfn for s in self.ioreq.servers.values()}
        for mfn in frames:  # Xen's frames (any of them alike), never a scratch frame, or beyond RAM
            if self.frames.exists(mfn) and (not self.frames.is_xen(mfn) or mfn in scratch):
                raise HypercallError(-EINVAL, f"RMRR frame {mfn:#x} is RAM that is not Xen's, or a scratch frame")
        # Everything that can refuse is asked before anything is allocated: a failed assignment
        # leaves no device, context, RMRR entry or physical LPI behind.
        xen_changes.check_attach(iommu, dom, frames)
        its_info = None
        if its_devid is not None:
            vdevid = sum(1 for d in self.devices.values() if d.domid == domid and d.its is not None)
            its_info = self.its.assign(domid, its_devid, pits, its_events, vdevid)
        ctx = xen_changes.attach_device(iommu, dom, frames)
        self.devices[bdf] = device
        dom.devices.add(bdf)
        if its_info is not None:
            device.its = its_info
            if ctx is not None:
                bfn = self.its.translation_gpa(domid, pits) >> PAGE_SHIFT
                xen_changes.map_doorbell(iommu, ctx, bfn, pits, DOORBELL_MFN + pits)
        iommu.flush_touched()
        return device

    def _refuse_suspended_dma(self, ctx: IommuContext | None, addr: int, size: int) -> None:
        """A DMA write reaching a suspended domain's frame is -EBUSY before any byte lands
        (its migration's last section is taken; a write now would be lost on the new host).
        The pages are looked up without touching the IOTLB or recording faults."""
        owner = self.frames.owner
        last = (addr + size - 1) >> PAGE_SHIFT if size else -1
        for bfn in range(addr >> PAGE_SHIFT, last + 1):
            if ctx is None:
                mfn = bfn
            else:
                entry = ctx.iotlb.entries.get(bfn) or ctx.table.get(bfn)
                mfn = entry_mfn(entry) if entry else -1
            if 0 <= mfn < self.frames.nr_frames and owner[mfn] in self.suspended:
                raise HypercallError(-EBUSY, f"d{owner[mfn]} is suspended for migration: DMA to it waits")

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
        iommu = self.iommu
        ctx = iommu.contexts.get(device.domid)
        if write and self.suspended:
            if device.domid in self.suspended:  # its MSIs too: the doorbell is no frame of its own
                raise HypercallError(-EBUSY, f"d{device.domid} is suspended for migration: its devices wait")
            self._refuse_suspended_dma(ctx, addr, size)
        out = bytearray()
        done = 0
        while done < size:
            bfn, offset = (addr + done) >> PAGE_SHIFT, (addr + done) & (PAGE_SIZE - 1)
            chunk = min(size - done, PAGE_SIZE - offset)
            mfn, reason = iommu.translate(ctx, bfn, write)
            if mfn is None:
                iommu.record_fault(ctx, DmaFault(device.bdf, bfn, write, reason))
                return DmaResult(False, bytes(out), bfn, reason)
            if mfn >= DOORBELL_MFN:  # the ITS doorbell: a 32-bit write of an EventID is an MSI
                if data is not None and offset == DOORBELL_OFFSET and chunk == 4 and device.its is not None:
                    self.its.msi(mfn - DOORBELL_MFN, device.its.pdevid, int.from_bytes(data[done : done + 4], "little"))
                elif data is None:
                    out += bytes(chunk)
            elif data is not None:
                self.frames.write(mfn, offset, data[done : done + chunk])
                if iommu.dirty_owners and ctx is not None and self.frames.owner[mfn] in iommu.dirty_owners:
                    ctx.dirty[bfn] = mfn  # the entry's dirty bit, as an IOMMU sets it on a write
            else:
                out += self.frames.read(mfn, offset, chunk)
            done += chunk
        return DmaResult(True, bytes(out))
