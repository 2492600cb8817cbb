"""Reading a live domain into an ``Image``, or refusing with the reason it cannot be saved yet.

What is saved is everything a restored domain needs to behave as before: its p2m (GFNs, and
the leaves it has grown, which decide how later IOMMU leaves are filled), its frames' contents,
every present entry of its IOMMU context's written leaves by BFN with the GFN behind it, the
frames it still holds through its own ``map_page`` entries after ballooning them out, its
quotas, devices, grant entries and handle counter, and its vITS registers. What names another
domain's state (IOREQ servers, foreign and grant mappings, a device model's target) or an
in-flight operation is refused: such a domain is saved once it has let go, as Xen asks a
backend to disconnect before a suspend. A device model saved with its guest (``dm.py``) is
read here with ``device_model``: its target, servers and foreign entries are dm.py's to save.
"""

from __future__ import annotations

from typing import Any

from xenemu.core.errors import EBUSY, EOPNOTSUPP, EPERM, HypercallError
from xenemu.core.grants.table import GTF_readonly, GTF_type_mask
from xenemu.core.host import Host
from xenemu.core.iommu.entries import Kind, entry_kind, entry_mfn, entry_perms
from xenemu.core.memory.domain import Domain
from xenemu.core.migration import vits
from xenemu.core.migration.image import HELD, Image

ZERO_PAGE = bytes(4096)
#: Entries of a device model's context that ``dm.py`` saves (by the guest's GFN, or its server).
DM_KINDS = (Kind.FOREIGN, Kind.SCRATCH)


def refusal(host: Host, dom: Domain, device_model: bool = False, live: bool = False) -> HypercallError | None:
    """Why ``dom`` cannot be saved now (None: it can), in a fixed order of checks.
    ``device_model``: it is saved with its guest, so its target, its own IOREQ servers and its
    foreign and scratch entries are allowed (``dm.refusal`` checks those). ``live``: a live
    migration's stop, after which the domain still exists here until the receiver has it."""
    domid = dom.domid
    if dom.is_hwdom:
        return HypercallError(-EPERM, "the hardware domain cannot be saved")
    if not dom.is_hvm:
        return HypercallError(-EOPNOTSUPP, "a PV domain's GFNs are machine frames: only HVM domains are saved")
    if dom.target is not None and not device_model:
        return HypercallError(-EOPNOTSUPP, f"d{domid} is a device model: it is not saved apart from its guest")
    if dom.busy_ops or dom.p2m_readers:
        return HypercallError(-EBUSY, f"d{domid} has an operation of many pages in flight")
    if not device_model and any(s.creator == domid for s in host.ioreq.servers.values()):
        return HypercallError(-EBUSY, f"d{domid} runs IOREQ servers: destroy them first")
    if host.grants.maptracks[domid].mappings:
        return HypercallError(-EBUSY, f"d{domid} holds grant mappings: unmap them first (a backend disconnects)")
    if host.grants.tables[domid].pins:
        return HypercallError(-EBUSY, f"d{domid}'s grants are mapped by others: they must unmap them first")
    if not device_model and any(True for _ in host.iommu.m2b.held_by(domid)):
        return HypercallError(-EBUSY, f"d{domid} holds foreign mappings")
    its_busy = vits.refusal(host, domid, live)
    if its_busy is not None:
        return its_busy
    ctx = host.iommu.contexts.get(domid)
    if ctx is not None:
        own = Refs(host, dom)
        for bfn, entry in ctx.table.materialized():
            kind = entry_kind(entry)
            if device_model and kind in DM_KINDS:
                continue
            if kind not in (Kind.DEFAULT, Kind.MAP, Kind.MAP_NOREF, Kind.RMRR, Kind.DOORBELL):
                return HypercallError(-EBUSY, f"d{domid} has a {kind.name.lower()} entry at BFN {bfn:#x}")
            if kind not in (Kind.RMRR, Kind.DOORBELL) and own.of(entry_mfn(entry), bfn) is None:
                return HypercallError(-EBUSY, f"BFN {bfn:#x} of d{domid} maps a frame it no longer owns")
    return None


def _held_frames(host: Host, dom: Domain) -> list[int]:
    """Frames the domain ballooned out but still holds through its own map_page entries."""
    ctx = host.iommu.contexts.get(dom.domid)
    if ctx is None:
        return []
    frames = host.frames
    return sorted(
        {
            entry_mfn(e)
            for _, e in ctx.table.materialized()
            if entry_kind(e) == Kind.MAP
            and frames.owner[entry_mfn(e)] == dom.domid
            and not frames.populated[entry_mfn(e)]
        }
    )


class Refs:
    """The frame ref of each frame the image can name, found without a pass over all memory
    where the entry says where to look (a default or map_page entry at its own GFN): a live
    migration's last section is taken with the domain stopped, and a reverse map of a large
    guest's p2m would be most of that pause. Other frames fall back to the reverse map, built
    once."""

    def __init__(self, host: Host, dom: Domain) -> None:
        self.p2m = dom.p2m
        self.held = _held_frames(host, dom)
        self._held_refs = {mfn: HELD | i for i, mfn in enumerate(self.held)}
        self._reverse: dict[int, int] | None = None

    def of(self, mfn: int, gfn: int) -> int | None:
        """``mfn``'s ref, trying GFN ``gfn`` first; None if the domain neither owns nor holds it."""
        if self.p2m.get(gfn) == mfn:
            return gfn
        held = self._held_refs.get(mfn)
        if held is not None:
            return held
        if self._reverse is None:
            self._reverse = {m: g for g, m in self.p2m.items()}
        return self._reverse.get(mfn)


def _device(host: Host, bdf: str) -> dict[str, Any]:
    device = host.devices[bdf]
    info = device.its
    its = (
        None
        if info is None
        else {"devid": info.pdevid, "events": info.events, "pits": info.pits, "vdevid": info.vdevid}
    )
    return {"bdf": bdf, "rmrr": [list(r) for r in device.rmrr], "its": its}


def snapshot(host: Host, domid: int, only: set[int] | None = None, device_model: bool = False) -> Image:
    """The domain's image (it keeps running; the caller decides whether it goes). ``only``: a
    live migration's last section, whose DATA holds just these GFNs' pages (zero pages too:
    the receiver has older contents for them) and every held frame's. ``device_model``: as
    ``refusal``'s; its foreign and scratch entries are left out (``dm.py`` saves them)."""
    dom = host.domain(domid)
    refused = refusal(host, dom, device_model, live=only is not None)
    if refused is not None:
        raise refused
    vits.write_tables(host, domid)  # into its RAM, before its pages are copied (and logged dirty)
    own = Refs(host, dom)
    frames = host.frames
    pages: list[tuple[int, bytes | memoryview]] = []
    if only is None:
        for gfn, mfn in dom.p2m.items():
            page = frames.data.get(mfn)
            if page is not None and page != ZERO_PAGE:
                pages.append((gfn, bytes(page)))
    else:
        for gfn in sorted(only):
            found = dom.p2m.get(gfn)
            if found is not None:
                page = frames.data.get(found)
                pages.append((gfn, ZERO_PAGE if page is None else bytes(page)))
    for i, mfn in enumerate(own.held):
        page = frames.data.get(mfn)
        if page is not None and page != ZERO_PAGE:
            pages.append((HELD | i, bytes(page)))
    ctx = host.iommu.contexts.get(domid)
    entries, iommu = [], None
    if ctx is not None:
        for bfn, entry in sorted(ctx.table.materialized()):
            kind = entry_kind(entry)
            if kind == Kind.DOORBELL or kind in DM_KINDS:
                continue  # the device's assignment maps it again; dm.py saves the others
            ref = bfn if kind == Kind.RMRR else own.of(entry_mfn(entry), bfn)
            assert ref is not None  # the refusal checked every entry
            entries.append((bfn, ref, int(kind), entry_perms(entry)))
        iommu = {
            "leaves": sorted(ctx.table.leaves),
            "sparse": sorted(ctx.table.sparse),
            "emptied": ctx.table.emptied,
            "flushes": dict(ctx.flushes),
            "fault_count": ctx.fault_count,
        }
    its = host.its.domains[domid]
    table = host.grants.tables[domid]
    grants = [
        [ref, int(e.domid), int(e.frame), bool(e.flags & GTF_readonly)]
        for ref in range(len(table.entries))
        if (e := table.entries[ref]).flags & GTF_type_mask
    ]
    meta: dict[str, Any] = {
        "domain": {
            "type": dom.kind,
            "name": dom.name,
            "pages": dom.pages,
            "max_pages": dom.max_pages,
            "max_mappings": dom.max_mappings,
            "servers_created": host.ioreq.created_by.get(domid, 0),
        },
        "its": {
            "vcpus": its.vcpus,
            "pin": list(its.pin),
            "propbaser": its.propbaser,
            "redists": [{"enable_lpis": r.enable_lpis, "pendbaser": r.pendbaser, "ptz": r.ptz} for r in its.redists],
        }
        | vits.save(host, domid),
        "gic": vits.gic(host),
        "devices": [_device(host, bdf) for bdf in sorted(dom.devices)],
        "iommu": iommu,
        "p2m_leaves": sorted(dom.p2m.leaf_indexes()),
        "held": len(own.held),
        "grants": {"entries": grants, "next_handle": host.grants.maptracks[domid].next_handle},
    }
    return Image(meta, dom.p2m.gfns(), pages, entries)
