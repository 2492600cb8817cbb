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
    #: The synchronous requests sent so far, as (server, request id).
    waits: list[tuple[int, int]] = field(default_factory=list)
    #: Servers sent to since their emulators were last told.
    told: set[int] = field(default_factory=set)

    def send(self, registry: IoreqRegistry, notify: bool = True) -> list[tuple[int, int]]:
        """Put each on its server's ring (or make it synchronous); returns the synchronous ones
        (kept in ``waits`` too, with those of earlier sends).  With ``notify`` False (a pause
        mid-call) the emulators are told at the call's last send, as Xen kicks the event
        channel when the hypercall is done: what an emulator sees on its event is the call's
        whole effect."""
        waits = []
        for server_id, bfn in self.targets:
            server = registry.get(server_id)
            if server is None:
                continue
            req = server.send_invalidate(bfn)
            self.told.add(server_id)
            if req is not None:
                waits.append((server_id, req))
        self.targets.clear()
        self.waits += waits
        if notify:
            registry.notify.update(self.told)
            self.told.clear()
        return waits


class Balloon:
    """A guest's ballooning calls, and the frames that leave it by any way (destruction too)."""

    def __init__(self, memory: GuestMemory, iommu: Iommu, registry: IoreqRegistry) -> None:
        self.memory = memory
        self.iommu = iommu
        self.registry = registry

    def release_frame(self, mfn: int, owed: Invalidations, budget: preempt.Budget) -> Generator[str, None, None]:
        """The frame left its guest: swap its foreign mappings to scratch, or owe invalidates,
        a slice of entries at a time (an emulator may hold one frame at a million BFNs),
        pausing (``pause``) whenever ``budget`` is spent.  Whether it swaps is decided once, on
        the count of entries that cannot be swapped, which the M2B keeps; entries can only go
        meanwhile (the frame is out of the p2m, so no new one can name it)."""
        m2b = self.iommu.m2b
        entries = m2b.by_mfn.get(mfn)
        if not entries:
            return
        if self.iommu.options.iommu and not m2b.unswappable[mfn]:
            keys = list(entries)
            for i, key in enumerate(keys):
                entry = m2b.by_key.get(key)
                if entry is not None and entry.mfn == mfn:
                    xen_changes.swap_to_scratch(self.iommu, entry, self._scratch_of(entry.ioserver))
                if budget.spend(preempt.M2B_COST) and i + 1 < len(keys):
                    yield from self.pause(owed)
            return
        # One frame's invalidates go out by server then BFN; frames go in the call's order.
        known = [*self.registry.servers, *self.registry.ending]
        if len(entries) <= len(known):  # the frame's few entries name their servers
            servers = sorted({ioserver for _mapper, ioserver, _bfn in entries})
        else:  # held at more BFNs than there are servers: ask each server instead
            servers = sorted(s for s in known if (mfn, s) in m2b.by_frame_server)
        for server in servers:
            bfns = sorted(m2b.by_frame_server[(mfn, server)])
            for start in range(0, len(bfns), preempt.M2B_PER_SLICE):  # owing one is sending one
                chunk = bfns[start : start + preempt.M2B_PER_SLICE]
                owed.targets.extend((server, bfn) for bfn in chunk)
                if budget.spend(preempt.M2B_COST * len(chunk)):
                    yield from self.pause(owed)

    def pause(self, owed: Invalidations) -> Generator[str, None, None]:
        """A pause of a balloon-out or a teardown: flushed, and the invalidates owed so far sent
        (in order: sending them earlier changes nothing of their order)."""
        self.iommu.flush_touched()
        owed.send(self.registry, notify=False)
        yield PREEMPT

    def _scratch_of(self, ioserver: int) -> int:
        server = self.registry.known(ioserver)
        assert server is not None, f"M2B entry of unknown IOREQ server {ioserver}"
        return server.scratch_mfn

    def relinquish(self, dom: Domain) -> Generator[str, None, None]:
        """A dying domain's frames leave it a slice at a time (Xen's relinquish_memory): each
        one's allocation reference goes and its foreign mappings are swapped to scratch or owed
        invalidates, sent before every pause (nobody waits for them).  A PV domain's frames
        are found by scanning the frame table, a slice of frames at a time."""
        owed = Invalidations()
        budget = preempt.Budget()
        frames = self.iommu.frames

        def release(mfns: list[int]) -> Generator[str, None, None]:
            for mfn in mfns:
                frames.unpopulate(mfn)  # first: the frame is no longer the domain's to find
                dom.pages -= 1
                yield from self.release_frame(mfn, owed, budget)
                if budget.spend(preempt.RELEASE_COST):
                    yield from self.pause(owed)

        if dom.is_hvm:
            while (mfns := dom.p2m.take_leaf()) is not None:
                budget.spend(preempt.LEAF_COST)
                yield from release(mfns)
        else:
            step = preempt.SLICE // 4  # frames scanned per slice (each a table read or two)
            for start in range(0, frames.nr_frames, step):
                if budget.spend(step):
                    yield from self.pause(owed)
                yield from release(self.memory.pv_frames_in(dom, start, start + step))
        dom.p2m.clear()
        self.iommu.flush_touched()
        owed.send(self.registry)

    def take_frame_away(
        self, dom: Domain, gfn: int, mfn: int, owed: Invalidations, budget: preempt.Budget
    ) -> Generator[str, None, None]:
        """Remove one GFN from its domain: p2m, default entry, allocation reference, emulators."""
        xen_changes.drop_default(self.iommu, dom, gfn if dom.is_hvm else mfn, mfn)
        if dom.is_hvm:
            dom.p2m.pop(gfn)
            xen_changes.memory_left(self.iommu, dom, gfn)
        dom.pages -= 1
        self.iommu.frames.unpopulate(mfn)  # before its mappings go: it is no longer the guest's
        yield from self.release_frame(mfn, owed, budget)

    def decrease_reservation(self, domid: int, gfns: list[int]) -> Generator[Any, None, dict[str, Any]]:
        """Balloon out ``gfns`` in order, stopping at the first that cannot go; waits for the
        synchronous invalidates it had to send.  Pauses every ``GFNS_PER_SLICE`` GFNs, and
        within a frame's release whenever its foreign mappings have cost a slice."""
        dom = self.memory.domain(domid)
        if dom.busy_ops or dom.p2m_readers:  # an op of many pages relies on its memory
            return {"ret": 0, "status": -EBUSY, "waited": 0}
        owed = Invalidations()
        budget = preempt.Budget()
        done, status = 0, 0
        for gfn in gfns:
            if done and not done % GFNS_PER_SLICE:  # preemptible by work, like iommu_op
                budget.spent = 0
                yield from self.pause(owed)
            if done:  # after any pause, here or within the last frame's release
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
            yield from self.take_frame_away(dom, gfn, mfn, owed, budget)
            done += 1
        self.iommu.flush_touched()
        owed.send(self.registry)
        if owed.waits:
            yield WaitForIoreqs(tuple(owed.waits))
        return {"ret": done, "status": status, "waited": len(owed.waits)}

    def populate_physmap(self, domid: int, gfns: list[int]) -> dict[str, Any]:
        """``populate_steps`` run to its end (tests and scripts)."""
        return preempt.drain(self.populate_steps(domid, gfns))

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
