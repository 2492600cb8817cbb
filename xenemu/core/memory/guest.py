"""Guests' RAM as their CPUs see it: the domains, GFN -> MFN, and reads and writes of a page.

The ITS and the grant code are handed this (not the host) when they read a guest's tables,
queues or frames, so they depend on memory alone.
"""

from __future__ import annotations

from collections.abc import Generator

from xenemu.core.errors import EINVAL, ENOMEM, ESRCH, HypercallError
from xenemu.core.memory.domain import DOMID_FIRST_RESERVED, Domain
from xenemu.core.memory.frames import PAGE_SHIFT, PAGE_SIZE, FrameTable
from xenemu.core.options import DomainKind

#: Frames a domain being built gets between two pauses (each an allocation: about 2 us).
FRAMES_PER_SLICE = 512
#: What building yields at a pause (the same effect as a preempted batch's).
PAUSE = "preempt"


class GuestMemory:
    """The frame table and the live domains, by domid."""

    def __init__(self, frames: FrameTable) -> None:
        self.frames = frames
        self.domains: dict[int, Domain] = {}
        #: Domains being built or destroyed, a slice at a time: they own frames (their ids are
        #: taken) but no request finds them (every lookup here is of ``domains``).
        self.limbo: dict[int, Domain] = {}

    def domain(self, domid: int) -> Domain:
        dom = self.domains.get(domid)
        if dom is None:
            raise HypercallError(-ESRCH, f"no domain {domid}")
        return dom

    def resolve_foreign(self, domid: int) -> Domain | None:
        """A live domain by a guest-supplied id (reserved ids name none)."""
        if domid >= DOMID_FIRST_RESERVED:
            return None
        return self.domains.get(domid)

    def gfn_to_mfn(self, dom: Domain, gfn: int) -> int | None:
        """The frame backing ``gfn`` of ``dom``, if it is populated and the domain's."""
        if dom.is_hvm:
            return dom.p2m.get(gfn)
        return gfn if self.frames.belongs_to(gfn, dom.domid) else None

    def populate(self, domid: int, kind: DomainKind, memory: int, name: str) -> Domain:
        """A new live domain with ``memory`` frames, built at once (the hardware domain, tests)."""
        build = self.build(domid, kind, memory, name)
        while True:
            try:
                next(build)
            except StopIteration as stop:
                dom: Domain = stop.value
                self.go_live(dom)
                return dom

    def build(self, domid: int, kind: DomainKind, memory: int, name: str) -> Generator[str, None, Domain]:
        """A new domain with ``memory`` frames, GFN 0 upwards (HVM) or wherever free (PV),
        built in ``limbo`` and pausing every ``FRAMES_PER_SLICE`` frames (a guest of many GiB
        is many slices); ``go_live`` makes it one that requests find.  If other domains took
        the frames meanwhile, what it got goes back and the creation fails ``-ENOMEM``."""
        if memory > self.frames.nr_free:
            raise HypercallError(-ENOMEM, f"{memory} frames wanted, {self.frames.nr_free} free")
        dom = Domain(domid=domid, kind=kind, name=name or f"domain-{domid}")
        self.limbo[domid] = dom
        for gfn in range(memory):
            if gfn and not gfn % FRAMES_PER_SLICE:
                yield PAUSE
            mfn = self.frames.allocate(domid)
            if mfn is None:
                self.unbuild(dom)
                raise HypercallError(-ENOMEM, f"{memory} frames wanted, others took them meanwhile")
            if dom.is_hvm:
                dom.p2m[gfn] = mfn
            dom.pages += 1
        return dom

    def unbuild(self, dom: Domain) -> None:
        """A domain that never went live gives back its frames (nothing else holds them)."""
        for mfn in self.own_frames(dom):
            self.frames.unpopulate(mfn)
        dom.p2m.clear()
        dom.pages = 0
        del self.limbo[dom.domid]

    def go_live(self, dom: Domain) -> None:
        del self.limbo[dom.domid]
        self.domains[dom.domid] = dom

    def own_frames(self, dom: Domain) -> list[int]:
        """Every frame the domain owns and has populated."""
        if dom.is_hvm:
            return list(dom.p2m.values())
        return self.pv_frames_in(dom, 0, self.frames.nr_frames)

    def pv_frames_in(self, dom: Domain, start: int, stop: int) -> list[int]:
        """The frames a PV domain owns and has populated among machine frames ``[start, stop)``."""
        owner, populated = self.frames.owner, self.frames.populated
        return [m for m in range(start, min(stop, self.frames.nr_frames)) if owner[m] == dom.domid and populated[m]]

    def access(self, domid: int, gfn: int, offset: int, data: bytes | None, length: int = 0) -> bytes:
        """A guest's CPU reading (``data`` None) or writing its own memory, within one page."""
        dom = self.domain(domid)
        size = len(data) if data is not None else length
        if offset < 0 or size < 0 or offset + size > PAGE_SIZE:
            raise HypercallError(-EINVAL, "access must stay within one page")
        mfn = self.gfn_to_mfn(dom, gfn)
        if mfn is None:
            raise HypercallError(-EINVAL, f"GFN {gfn:#x} is not populated in d{domid}")
        if data is not None:
            self.frames.write(mfn, offset, data)
            if dom.p2m.log is not None:  # log-dirty: a live migration sends it again
                dom.p2m.note(gfn)
            return b""
        return self.frames.read(mfn, offset, size)

    def read(self, domid: int, gpa: int, length: int) -> bytes:
        """``length`` bytes at guest physical address ``gpa`` (within one page)."""
        return self.access(domid, gpa >> PAGE_SHIFT, gpa & (PAGE_SIZE - 1), None, length)

    def in_ram(self, domid: int, gpa: int, length: int) -> bool:
        """Whether every page of ``[gpa, gpa + length)`` is populated RAM of the domain."""
        dom = self.domain(domid)
        first, last = gpa >> PAGE_SHIFT, (gpa + length - 1) >> PAGE_SHIFT
        return all(self.gfn_to_mfn(dom, g) is not None for g in range(first, last + 1))
