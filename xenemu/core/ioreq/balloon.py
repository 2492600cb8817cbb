"""Ballooning (``XENMEM_decrease_reservation`` / ``populate_physmap``) and what it owes emulators.

A guest may give a frame back at any time. Unmapping the emulators' BFNs behind their backs
would let a guest fault other domains' devices, so instead each emulator is told
(``IOREQ_TYPE_INVALIDATE``) and keeps its reference until it unmaps, unless every mapping of
the frame was made with ``swap_mfn``: then Xen re-points them at the scratch frame itself.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any

from xenemu.core.errors import EEXIST, ENOENT, ENOMEM, EPERM
from xenemu.core.host import RW, Host
from xenemu.core.iommu.entries import FlushType, Kind, make_entry
from xenemu.core.iommu.subops import SWAP_MFN
from xenemu.core.memory.domain import Domain


@dataclass(frozen=True)
class WaitForIoreqs:
    """An effect: the call waits until each synchronous request is answered or its server is gone."""

    requests: tuple[tuple[int, int], ...]

    def done(self, host: Host) -> bool:
        return not any(host.ioreq.is_pending(server, req) for server, req in self.requests)


@dataclass
class Invalidations:
    """The invalidates one operation owes, sent together, ordered by server then BFN."""

    targets: list[tuple[int, int]] = field(default_factory=list)

    def send(self, host: Host) -> list[tuple[int, int]]:
        """Put each on its server's ring (or make it synchronous); returns the synchronous ones."""
        waits = []
        for server_id, bfn in sorted(self.targets):
            server = host.ioreq.get(server_id)
            if server is None:
                continue
            req = server.send_invalidate(bfn)
            host.notify.add(server_id)
            if req is not None:
                waits.append((server_id, req))
        self.targets.clear()
        return waits


def release_frame(host: Host, mfn: int, owed: Invalidations) -> None:
    """The frame left its guest: swap its foreign mappings to scratch, or owe invalidates."""
    entries = host.m2b.for_frame(mfn)
    if not entries:
        return
    if host.options.iommu and all(e.flags & SWAP_MFN and e.owns_iommu_entry for e in entries):
        for entry in entries:
            mapper = host.domains[entry.mapper]
            ctx = mapper.context
            assert ctx is not None
            host.m2b.remove(entry)
            host.count_mappings(entry.mapper, -1)
            ctx.table.set(entry.bfn, make_entry(host.scratch_mfn, Kind.SCRATCH, entry.flags & RW))
            ctx.scratch[entry.bfn] = entry.ioserver
            host.note_flush(ctx, FlushType.MODIFIED)
            host.frames.put(mfn, entry.writable)
        return
    owed.targets.extend((entry.ioserver, entry.bfn) for entry in entries)


def _drop_default(host: Host, dom: Domain, bfn: int, mfn: int) -> None:
    """Balloon-out removes the frame's default entry (not the non-strict hwdom's 1:1 ones)."""
    ctx = dom.context
    if ctx is None or host.is_non_strict_hwdom(dom):
        return
    default = make_entry(mfn, Kind.DEFAULT, RW)
    if ctx.table.get(bfn) != default:
        return
    if ctx.table.is_materialized(bfn):
        ctx.table.clear(bfn)
    host.note_flush(ctx, FlushType.MODIFIED)


def _add_default(host: Host, dom: Domain, bfn: int, mfn: int) -> None:
    """Populate adds a default entry wherever that BFN is unmapped."""
    ctx = dom.context
    if ctx is None or host.is_non_strict_hwdom(dom):
        return
    if ctx.table.is_materialized(bfn):
        if ctx.table.get(bfn):
            return
        ctx.table.set(bfn, make_entry(mfn, Kind.DEFAULT, RW))
    host.note_flush(ctx, FlushType.ADDED)


def take_frame_away(host: Host, dom: Domain, gfn: int, mfn: int, owed: Invalidations) -> None:
    """Remove one GFN from its domain: p2m, default entry, allocation reference, emulators."""
    _drop_default(host, dom, gfn if dom.is_hvm else mfn, mfn)
    if dom.is_hvm:
        dom.p2m.pop(gfn)
    dom.pages -= 1
    release_frame(host, mfn, owed)
    host.frames.unpopulate(mfn)


def decrease_reservation(host: Host, domid: int, gfns: list[int]) -> Generator[Any, None, dict[str, Any]]:
    """Balloon out ``gfns`` in order, stopping at the first that cannot go; waits for the
    synchronous invalidates it had to send."""
    dom = host.domain(domid)
    owed = Invalidations()
    done, status = 0, 0
    for gfn in gfns:
        if not dom.is_hvm and host.frames.exists(gfn) and host.frames.is_xen(gfn):
            status = -EPERM
            break
        mfn = host.gfn_to_mfn(dom, gfn)
        if mfn is None:
            status = -ENOENT
            break
        take_frame_away(host, dom, gfn, mfn, owed)
        done += 1
    host.flush_touched()
    waits = owed.send(host)
    if waits:
        yield WaitForIoreqs(tuple(waits))
    return {"ret": done, "status": status, "waited": len(waits)}


def populate_physmap(host: Host, domid: int, gfns: list[int]) -> dict[str, Any]:
    """Back ``gfns`` with fresh frames (lowest free first); a PV guest learns their MFNs."""
    dom = host.domain(domid)
    done, status, mfns = 0, 0, []
    for gfn in gfns:
        if (dom.is_hvm and gfn in dom.p2m) or (not dom.is_hvm and host.frames.belongs_to(gfn, domid)):
            status = -EEXIST
            break
        mfn = host.frames.allocate(domid)
        if mfn is None:
            status = -ENOMEM
            break
        if dom.is_hvm:
            dom.p2m[gfn] = mfn
        dom.pages += 1
        _add_default(host, dom, gfn if dom.is_hvm else mfn, mfn)
        mfns.append(mfn)
        done += 1
    host.flush_touched()
    reply: dict[str, Any] = {"ret": done, "status": status}
    if not dom.is_hvm:
        reply["mfns"] = mfns
    return reply
