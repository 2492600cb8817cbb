"""Building a new domain from an ``Image``: checked against this host first, then built.

Every check that depends on the host (free frames, ``max_pages``, CPUs, the IOMMU, whether its
devices' BDFs are free and their RMRR frames are Xen's or beyond RAM here, a domain id) runs
before anything is allocated, so a refused restore leaves nothing. The build then creates the
domain (a new domid and token), busy (``Domain.busy_ops``: its own calls are ``-EBUSY``), and
populates its GFNs in slices of ``SLICE`` frames with a pause between them, as ballooning does;
its devices, IOMMU entries (machine frames looked up afresh by GFN), references, quotas, grant
entries and vITS registers are put back in the last step, which is bounded by the domain's own
page tables. A failure or a cut on the way destroys what was built.
"""

from __future__ import annotations

from array import array
from collections.abc import Generator

from xenemu.core.errors import EBUSY, EINVAL, ENOMEM, EOPNOTSUPP, ESRCH, HypercallError
from xenemu.core.grants.table import GTF_permit_access, GTF_readonly
from xenemu.core.host import Host
from xenemu.core.iommu.entries import PERM_W, Kind, make_entry
from xenemu.core.iommu.preempt import PREEMPT
from xenemu.core.memory.domain import Domain
from xenemu.core.memory.leaves import LEAF_SHIFT, LEAF_SIZE
from xenemu.core.migration import vits
from xenemu.core.migration.image import HELD, Image, rmrr_frames

#: Frames populated between two pauses of a restore (about a millisecond, as ballooning's slices).
SLICE = 2048
ZERO_LEAF = array("Q", bytes(8 * LEAF_SIZE))


def check(host: Host, image: Image) -> None:
    """What this host must offer the image's domain; raises before anything is allocated."""
    meta, dom = image.meta, image.meta["domain"]
    frames = host.frames
    need = dom["pages"] + meta["held"]
    if need > frames.nr_free or dom["max_pages"] > frames.nr_frames:
        raise HypercallError(
            -ENOMEM,
            f"host too small: the domain needs {need} frames ({frames.nr_free} free) and max_pages"
            f" {dom['max_pages']} ({frames.nr_frames} frames here)",
        )
    if any(p >= host.options.its_cpus for p in meta["its"]["pin"]):
        raise HypercallError(-EINVAL, f"a vCPU is pinned beyond this host's {host.options.its_cpus} CPUs")
    if meta["devices"] and not host.options.iommu:
        raise HypercallError(-EOPNOTSUPP, "no IOMMU on this host: an HVM domain cannot be given its devices")
    vits.check(image)
    vits.check_host(host, meta)
    check_devices(host, image)


def check_devices(host: Host, image: Image) -> None:
    """Its devices' BDFs free here, and their RMRR frames Xen's (never a scratch frame) or beyond RAM."""
    for device in image.meta["devices"]:
        if device["bdf"] in host.devices:
            raise HypercallError(-EBUSY, f"{device['bdf']} is already assigned here")
    scratch = {s.scratch_mfn for s in host.ioreq.servers.values()}
    frames = host.frames
    for mfn in rmrr_frames(image.meta):
        if frames.exists(mfn) and (not frames.is_xen(mfn) or mfn in scratch):
            raise HypercallError(-EINVAL, f"RMRR frame {mfn:#x} is RAM that is not Xen's here")


def restore(host: Host, image: Image, target: int | None = None) -> Generator[str, None, Domain]:
    """Build the image's domain; yields ``PREEMPT`` between slices of its memory.
    ``target``: a device model's guest, restored already (``dm.py`` adds the rest after this)."""
    check(host, image)
    meta, saved = image.meta, image.meta["domain"]
    its = meta["its"]
    dom = yield from host.creating(
        "hvm", 0, target, saved["name"], saved["max_mappings"], its["vcpus"], its["pin"], saved["max_pages"]
    )
    built = False
    try:
        dom.busy_ops += 1
        try:
            yield from _populate(host, dom, image)
        finally:
            dom.busy_ops -= 1
        check_devices(host, image)  # others may have changed meanwhile; nothing can fail after this
        vits.check_host(host, meta)
        _finish(host, dom, image)
        built = True
    finally:
        if not built and host.domains.get(dom.domid) is dom:
            host.destroy_domain(dom.domid)
    return dom


def _populate(host: Host, dom: Domain, image: Image) -> Generator[str, None, None]:
    frames = host.frames
    contents = {ref: page for ref, page in image.pages if not ref & HELD}
    for index in image.meta["p2m_leaves"]:
        dom.p2m.add_leaf(index)
    for done, gfn in enumerate(image.gfns):
        if done and not done % SLICE:
            yield PREEMPT
            if host.domains.get(dom.domid) is not dom:
                raise HypercallError(-ESRCH, "the domain being restored was destroyed")
        mfn = frames.allocate(dom.domid)
        if mfn is None:
            raise HypercallError(-ENOMEM, "frames ran out while the domain was restored")
        dom.p2m[gfn] = mfn
        dom.pages += 1
        page = contents.get(gfn)
        if page is not None:
            frames.write(mfn, 0, page)


def _finish(host: Host, dom: Domain, image: Image) -> None:
    """Held frames, contents, grants, vITS registers, devices and IOMMU entries: one step."""
    meta, domid, frames = image.meta, dom.domid, host.frames
    if meta["held"] > frames.nr_free:
        raise HypercallError(-ENOMEM, "frames ran out while the domain was restored")
    held: list[int] = []
    for _ in range(meta["held"]):
        mfn = frames.allocate(domid)
        assert mfn is not None  # counted free just above
        held.append(mfn)

    def mfn_of(ref: int) -> int:
        if ref & HELD:
            return held[ref - HELD]
        got = dom.p2m.get(ref)
        assert got is not None
        return got

    for ref, page in image.pages:
        if ref & HELD:  # the populated frames got theirs as they were populated
            frames.write(mfn_of(ref), 0, page)
    table = host.grants.tables[domid]
    for ref, granted, gfn, readonly in meta["grants"]["entries"]:
        entry = table.entries[ref]
        entry.domid, entry.frame = granted, gfn
        entry.flags = GTF_permit_access | (GTF_readonly if readonly else 0)
    host.grants.maptracks[domid].next_handle = meta["grants"]["next_handle"]
    if meta["domain"]["servers_created"]:
        host.ioreq.created_by[domid] = meta["domain"]["servers_created"]
    its_dom = host.its.domains[domid]
    its_dom.propbaser = meta["its"]["propbaser"]
    for redist, saved in zip(its_dom.redists, meta["its"]["redists"], strict=True):
        redist.enable_lpis, redist.pendbaser, redist.ptz = saved["enable_lpis"], saved["pendbaser"], saved["ptz"]
    # Devices without MSIs first, then MSI devices in the order that gives each its vdevid again.
    for device in sorted(meta["devices"], key=lambda d: (d["its"] is not None, d["its"] and d["its"]["vdevid"])):
        its = device["its"] or {"devid": None, "events": 0, "pits": 0}
        rmrr = [(s, c) for s, c in device["rmrr"]]
        host.assign_device(domid, device["bdf"], rmrr, its["devid"], its["events"], its["pits"])
    vits.restore(host, domid, meta)
    iommu = host.iommu
    ctx = iommu.contexts.get(domid)
    if ctx is not None and meta["iommu"] is not None:
        saved_ctx = meta["iommu"]
        doorbells = {bfn: ctx.table.get(bfn) for bfn in ctx.doorbells}  # assignment's, not the image's
        leaves = {index: ctx.table.leaf(index << LEAF_SHIFT) for index in saved_ctx["leaves"]}
        for leaf in leaves.values():
            leaf[0:LEAF_SIZE] = ZERO_LEAF  # in place: the compiled path holds the leaf's address
        mappings = 0
        for bfn, ref, kind, perms in image.entries:
            mfn = bfn if kind == Kind.RMRR else mfn_of(ref)
            leaves[bfn >> LEAF_SHIFT][bfn & (LEAF_SIZE - 1)] = make_entry(mfn, Kind(kind), perms)
            if kind == Kind.MAP:
                frames.get(mfn, bool(perms & PERM_W))
            mappings += kind in (Kind.MAP, Kind.MAP_NOREF)
        for bfn, entry in doorbells.items():
            ctx.table.set(bfn, entry)
        iommu.count_mappings(domid, mappings)
        ctx.table.sparse = set(saved_ctx["sparse"])
        ctx.table.emptied = saved_ctx["emptied"]
        iommu.flush_touched()
        ctx.iotlb.invalidate_all()
        ctx.flushes = dict(saved_ctx["flushes"])
        ctx.fault_count = saved_ctx["fault_count"]
    for mfn in held:  # now held by its map_page entries alone, as before the save
        frames.unpopulate(mfn)


def finish(host: Host, dom: Domain, image: Image) -> None:
    """What a restore does once the domain's memory is in place (a live migration's receiver
    populates the memory section by section, then calls this with the last one)."""
    _finish(host, dom, image)
