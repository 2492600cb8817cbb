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

from xenemu.abi import pv_iommu as pv
from xenemu.core.errors import EBUSY, EEXIST, ENOENT, ENOMEM, EPERM, ESRCH
from xenemu.core.iommu import preempt, xen_changes
from xenemu.core.iommu.preempt import PREEMPT
from xenemu.core.iommu.state import Iommu
from xenemu.core.ioreq.servers import IoreqRegistry
from xenemu.core.memory.domain import Domain
from xenemu.core.memory.guest import GuestMemory

#: GFNs a ballooning call handles between two pauses (each is a few microseconds of work, and
#: its invalidates a little more): about a millisecond, as ``iommu_op``'s slices.
GFNS_PER_SLICE = 256


@dataclass(frozen=True)
class WaitForIoreqs:
    """An effect: the call waits until each synchronous request is answered or its server is gone."""

    requests: tuple[tuple[int, int], ...]

    def done(self, registry: IoreqRegistry) -> bool:
        return not any(registry.is_pending(server, req) for server, req in self.requests)


@dataclass
class Invalidations:
    """The invalidates one operation owes, sent together in the order they were owed: frame by
    frame as the call gave them up, and within one frame by server then BFN.  That order
    decides which ones find a ring full and go synchronous."""

    targets: list[tuple[int, int]] = field(default_factory=list)

    def send(self, registry: IoreqRegistry) -> list[tuple[int, int]]:
        """Put each on its server's ring (or make it synchronous); returns the synchronous ones."""
        waits = []
        for server_id, bfn in self.targets:
            server = registry.get(server_id)
            if server is None:
                continue
            req = server.send_invalidate(bfn)
            registry.notify.add(server_id)
            if req is not None:
                waits.append((server_id, req))
        self.targets.clear()
        return waits


class Balloon:
    """A guest's ballooning calls, and the frames that leave it by any way (destruction too)."""

    def __init__(self, memory: GuestMemory, iommu: Iommu, registry: IoreqRegistry) -> None:
        self.memory = memory
        self.iommu = iommu
        self.registry = registry

    def release_frame(self, mfn: int, owed: Invalidations) -> None:
        """The frame left its guest: swap its foreign mappings to scratch, or owe invalidates."""
        entries = self.iommu.m2b.for_frame(mfn)
        if not entries:
            return
        if self.iommu.options.iommu and all(e.flags & pv.SWAP_MFN and e.owns_iommu_entry for e in entries):
            for entry in entries:
                xen_changes.swap_to_scratch(self.iommu, entry, self._scratch_of(entry.ioserver))
            return
        # One frame's invalidates go out by server then BFN; frames go in the call's order.
        owed.targets.extend(sorted((entry.ioserver, entry.bfn) for entry in entries))

    def _scratch_of(self, ioserver: int) -> int:
        server = self.registry.known(ioserver)
        assert server is not None, f"M2B entry of unknown IOREQ server {ioserver}"
        return server.scratch_mfn

    def relinquish(self, dom: Domain) -> Generator[str, None, None]:
        """A dying domain's frames leave it a slice at a time (Xen's relinquish_memory): each
        one's foreign mappings are swapped to scratch or owed invalidates, sent before every
        pause (nobody waits for them), and its allocation reference goes.  A PV domain's frames
        are found by scanning the frame table, a slice of frames at a time."""
        owed = Invalidations()
        budget = preempt.Budget()
        frames = self.iommu.frames

        def release(mfns: list[int]) -> int:
            entries = 0
            for mfn in mfns:
                entries += len(self.iommu.m2b.by_mfn.get(mfn, ()))
                self.release_frame(mfn, owed)
                frames.unpopulate(mfn)
            dom.pages -= len(mfns)
            return preempt.RELEASE_COST * len(mfns) + preempt.M2B_COST * entries

        def paused() -> Generator[str, None, None]:
            self.iommu.flush_touched()
            owed.send(self.registry)
            yield PREEMPT

        if dom.is_hvm:
            while (mfns := dom.p2m.take_leaf()) is not None:
                if budget.spend(preempt.LEAF_COST + release(mfns)) and dom.p2m.nr_leaves:
                    yield from paused()
        else:
            step = preempt.SLICE // 4  # frames scanned per slice (each a table read or two)
            for start in range(0, frames.nr_frames, step):
                spent = step + release(self.memory.pv_frames_in(dom, start, start + step))
                if budget.spend(spent) and start + step < frames.nr_frames:
                    yield from paused()
        dom.p2m.clear()
        self.iommu.flush_touched()
        owed.send(self.registry)

    def take_frame_away(self, dom: Domain, gfn: int, mfn: int, owed: Invalidations) -> None:
        """Remove one GFN from its domain: p2m, default entry, allocation reference, emulators."""
        xen_changes.drop_default(self.iommu, dom, gfn if dom.is_hvm else mfn, mfn)
        if dom.is_hvm:
            dom.p2m.pop(gfn)
            xen_changes.memory_left(self.iommu, dom, gfn)
        dom.pages -= 1
        self.release_frame(mfn, owed)
        self.iommu.frames.unpopulate(mfn)

    def decrease_reservation(self, domid: int, gfns: list[int]) -> Generator[Any, None, dict[str, Any]]:
        """Balloon out ``gfns`` in order, stopping at the first that cannot go; waits for the
        synchronous invalidates it had to send."""
        dom = self.memory.domain(domid)
        if dom.busy_ops or dom.p2m_readers:  # an op of many pages relies on its memory
            return {"ret": 0, "status": -EBUSY, "waited": 0}
        owed = Invalidations()
        done, status = 0, 0
        for gfn in gfns:
            if done and not done % GFNS_PER_SLICE:  # preemptible by work, like iommu_op
                self.iommu.flush_touched()
                yield PREEMPT
                if self.memory.domains.get(domid) is not dom:
                    status = -ESRCH
                    break
                if dom.p2m_readers:  # an emulator's op of many pages began on its frames
                    status = -EBUSY
                    break
            mfn = self.memory.gfn_to_mfn(dom, gfn)  # a PV GFN it does not own and populate: none
            if mfn is None:
                status = -ENOENT
                break
            if self.iommu.frames.is_xen(mfn):  # an HVM GFN backed by one of Xen's frames
                status = -EPERM
                break
            self.take_frame_away(dom, gfn, mfn, owed)
            done += 1
        self.iommu.flush_touched()
        waits = owed.send(self.registry)
        if waits:
            yield WaitForIoreqs(tuple(waits))
        return {"ret": done, "status": status, "waited": len(waits)}

    def populate_physmap(self, domid: int, gfns: list[int]) -> dict[str, Any]:
        """``populate_steps`` run to its end (tests and scripts)."""
        steps = self.populate_steps(domid, gfns)
        while True:
            try:
                next(steps)
            except StopIteration as stop:
                reply: dict[str, Any] = stop.value
                return reply

    def populate_steps(self, domid: int, gfns: list[int]) -> Generator[str, None, dict[str, Any]]:
        """Back ``gfns`` with fresh frames (lowest free first); a PV guest learns their MFNs.
        Pauses every ``GFNS_PER_SLICE`` GFNs so no other domain waits long.

        A PV guest has no p2m: as in Xen its list is output only, so only its length counts
        (no ``-EEXIST``); Xen writes the chosen frames' numbers back."""
        dom = self.memory.domain(domid)
        if dom.busy_ops or dom.p2m_readers:  # an op of many pages relies on its memory
            return {"ret": 0, "status": -EBUSY} | ({} if dom.is_hvm else {"mfns": []})
        done, status, mfns = 0, 0, []
        for gfn in gfns:
            if done and not done % GFNS_PER_SLICE:
                self.iommu.flush_touched()
                yield PREEMPT
                if self.memory.domains.get(domid) is not dom:
                    status = -ESRCH
                    break
                if dom.p2m_readers:
                    status = -EBUSY
                    break
            if dom.is_hvm and gfn in dom.p2m:
                status = -EEXIST
                break
            if dom.pages >= dom.max_pages:  # every allocation a guest drives is bounded
                status = -ENOMEM
                break
            mfn = self.iommu.frames.allocate(domid)
            if mfn is None:
                status = -ENOMEM
                break
            if dom.is_hvm:
                dom.p2m[gfn] = mfn
            dom.pages += 1
            xen_changes.add_default(self.iommu, dom, gfn if dom.is_hvm else mfn, mfn)
            mfns.append(mfn)
            done += 1
        self.iommu.flush_touched()
        reply: dict[str, Any] = {"ret": done, "status": status}
        if not dom.is_hvm:
            reply["mfns"] = mfns
        return reply
