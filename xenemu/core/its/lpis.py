"""LPIs reaching a guest: pending state, coalescing, delivery and the end of an LPI.

What the pITSs make deliverable is taken here (``deliver``): Xen's own completion LPI raises a
scheduling pass; a guest's LPI goes through its current binding to ``inject``, which routes it to
the target vCPU, holds it while its collection is unmapped, drops it if the domain is dying or the
vCPU's ``EnableLPIs`` is clear, and coalesces it while the vCPU still has it in service. ``end``
is the guest's end of an LPI, which delivers one that became pending meanwhile.

The per-domain pending state itself (``in_service``, ``again``, ``held``) lives in
``DomainIts`` (state.py). It is set only here; the other rooms that touch it only take LPIs
out of it or hand them back to ``inject``: the pending-table load (registers.py: a clear bit
clears ``again``, a set bit is injected), ``MAPC`` (translate.py: held LPIs of the collection
are injected) and unmapping (translate.py: a held LPI of the mapping is forgotten). It is a
room of its own because it is the one place that decides whether a guest sees an interrupt,
which is what the last invariant of the spec is about.
"""

from __future__ import annotations

from xenemu.core.its.state import LPI_BASE, Delivery, ItsState, Vits


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
                binding = s.bindings.get(plpi)
                if binding is not None:
                    domid, pits, key = binding
                    self.inject(s.domains[domid].vits[pits], key, out)
        s.deliveries += out
        return out

    def inject(self, vits: Vits, key: tuple[int, int], out: list[Delivery]) -> None:
        """An LPI of this mapping fired: to its vCPU, or kept while its collection is unmapped."""
        dom = self.state.domains[vits.domid]
        ite = vits.ites[key]
        vcpu = vits.target_vcpu(ite)
        if dom.dying:
            return
        if vcpu is None:
            dom.held.add((vits.pits, key))  # routes once MAPC maps the collection
            return
        if not dom.redists[vcpu].enable_lpis:
            return  # dropped, not kept pending
        token = (vcpu, ite.vlpi)
        if token in dom.in_service:
            dom.again.add(token)
            return
        dom.in_service.add(token)
        out.append(Delivery(vits.domid, vcpu, ite.vlpi))

    def end(self, domid: int, vcpu: int, intid: int) -> Delivery | None:
        """The guest ended an LPI: one that became pending meanwhile is delivered now."""
        dom = self.state.domains[domid]
        token = (vcpu, intid)
        dom.in_service.discard(token)
        if token in dom.again:
            dom.again.discard(token)
            dom.in_service.add(token)
            delivery = Delivery(domid, vcpu, intid)
            self.state.deliveries.append(delivery)
            return delivery
        return None
