"""LPIs reaching a guest: pending state, coalescing, delivery and the end of an LPI.

What the pITSs make deliverable is taken here (``deliver``): Xen's own completion LPI raises a
scheduling pass; a guest's LPI goes through its current binding to ``inject``, which routes it
to the target vCPU, drops it if the domain is dying, its collection is unmapped or the vCPU's
``EnableLPIs`` is clear, and coalesces it while that vCPU still has it in service. ``end`` is
the guest's end of an LPI, which delivers one that became pending meanwhile.

The pending state of an LPI belongs to its mapping (``Ite.pending``: the vCPU whose
redistributor holds it), as in KVM, where it lives in the interrupt the ITE points to. So the
commands that act on a mapping act on it: ``MOVI``, ``MAPC`` and ``MOVALL`` move it
(``retarget``: delivered on the new vCPU at once unless that vCPU has it in service), ``CLEAR``
clears it (translate.py), and ``DISCARD``/``MAPD`` remove it with the ITE, so nothing left by an
old mapping is ever delivered under a new one. What a vCPU has in service is the vCPU's own
state (``DomainIts.in_service``), kept until the guest ends it whatever happened to the mapping.

A physical LPI that became pending before the physical ``MAPTI`` of its current mapping executed
was left by an old mapping (the pITS executes in order, so the old mapping's removal has not run
either): it is dropped (``Ite.mapti_slot``, cleared by the scheduler when that slot completes).

It is a room of its own because it is the one place that decides whether a guest sees an
interrupt, which is what the last invariant of the spec is about.
"""

from __future__ import annotations

from xenemu.core.its.state import LPI_BASE, Delivery, DomainIts, Ite, ItsState, PitsState, Vits


class Lpis:
    """The delivery of guests' LPIs and Xen's completion LPI, and the end of an LPI."""

    def __init__(self, state: ItsState) -> None:
        self.state = state

    def deliver(self) -> list[Delivery]:
        """Take what the pITSs made deliverable: Xen's completion INTs raise passes; guests' LPIs
        are delivered once each (again only after the guest ends it)."""
        s = self.state
        out: list[Delivery] = []
        for state in s.pits:
            for _cpu, plpi in state.hw.deliverable():
                state.hw.acknowledge(plpi)
                if plpi == LPI_BASE + state.hw.index:
                    # Xen's completion INT: the scheduling pass it stands for runs at the end
                    # of the request, and a new one may be placed.
                    state.xen_int_outstanding = False
                    s.raised.add(state.hw.index)
                    continue
                found = s.mapping(plpi)
                if found is not None and not _before_its_mapti(state, found[2]):
                    self.inject(found[0], found[2], out)
        s.deliveries += out
        return out

    def inject(self, vits: Vits, ite: Ite, out: list[Delivery]) -> None:
        """An LPI of this mapping fired: to its vCPU, or dropped (dying domain, collection
        unmapped, ``EnableLPIs`` clear), or pending while that vCPU has it in service."""
        dom = self.state.domains[vits.domid]
        vcpu = vits.target_vcpu(ite)
        if dom.dying or vcpu is None or not dom.redists[vcpu].enable_lpis:
            return
        self._pend(vits.domid, dom, ite, vcpu, out)

    def retarget(self, vits: Vits, ite: Ite) -> None:
        """The mapping now routes elsewhere (MOVI, MAPC, MOVALL): its pending state moves with
        it, and is delivered on the new vCPU unless that vCPU has the LPI in service. An
        unmapped collection moves nothing: the state stays with the redistributor it is on."""
        vcpu = vits.target_vcpu(ite)
        if ite.pending is None or vcpu is None or vcpu == ite.pending:
            return
        ite.pending = None
        dom = self.state.domains[vits.domid]
        if not dom.dying and dom.redists[vcpu].enable_lpis:
            self._pend(vits.domid, dom, ite, vcpu, self.state.deliveries)

    def end(self, domid: int, vcpu: int, intid: int) -> Delivery | None:
        """The guest ended an LPI: one that became pending meanwhile on that vCPU (under any of
        the mappings of that vLPI: one INTID has one pending bit) is delivered now."""
        dom = self.state.domains[domid]
        if dom.dying:
            return None  # its deliveries are dropped, and its state is about to be freed
        dom.in_service.discard((vcpu, intid))
        pending = self._pending_on(domid, vcpu, intid)
        if not pending:
            return None
        for ite in pending:
            ite.pending = None
        if not dom.redists[vcpu].enable_lpis:
            return None  # dropped, not kept pending
        dom.in_service.add((vcpu, intid))
        delivery = Delivery(domid, vcpu, intid)
        self.state.deliveries.append(delivery)
        return delivery

    def _pend(self, domid: int, dom: DomainIts, ite: Ite, vcpu: int, out: list[Delivery]) -> None:
        if (vcpu, ite.vlpi) in dom.in_service:
            ite.pending = vcpu  # coalesced: delivered when the guest ends the one in service
            return
        for other in self._pending_on(domid, vcpu, ite.vlpi):
            other.pending = None  # the one delivery stands for every mapping's pending state
        dom.in_service.add((vcpu, ite.vlpi))
        out.append(Delivery(domid, vcpu, ite.vlpi))

    def _pending_on(self, domid: int, vcpu: int, vlpi: int) -> list[Ite]:
        s = self.state
        found = (s.mapping(plpi) for plpi in sorted(s.by_vlpi.get((domid, vlpi), ())))
        return [m[2] for m in found if m is not None and m[2].pending == vcpu]


def _before_its_mapti(state: PitsState, ite: Ite) -> bool:
    """Whether the pITS has not yet executed this mapping's physical MAPTI (it is still between
    the CREADR Xen last saw and the hardware's CREADR, or beyond)."""
    if ite.mapti_slot is None:
        return False
    hw = state.hw
    ran = (hw.creadr - state.last_creadr) % hw.slots
    return (ite.mapti_slot - state.last_creadr) % hw.slots >= ran
