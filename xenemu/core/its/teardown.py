"""Destruction of a domain's vITSs: drain, then tear down, then free, never blocking.

``begin`` marks the domain dying: from then on its MMIO is ignored, its deliveries are dropped
(registers and lpis check ``DomainIts.dying``) and the scheduler places nothing more of it.
``progress``, run by the scheduler after each pass has completed what the pITS finished, waits
until none of the domain's commands occupies a slot on any pITS, then disables its LPIs in the
physical table and queues Xen's ``MAPD V=0`` for each of its devices and one ``INVALL`` on each
pITS it had devices on. Only once those have completed (``slot_completed`` counts them down) are
its bindings forgotten, its physical LPIs returned and its DeviceIDs assignable again, so a
reassigned device can never fire into the old owner's bindings.

Kept apart from the scheduler because it is a lifecycle of its own (draining, tearing down,
freed) with its own counter per domain; the scheduler only reports completions to it.
"""

from __future__ import annotations

from xenemu.abi import its_cmd as cmds
from xenemu.core.its.state import LPI_BASE, XEN_PRIORITY, ItsState


class Teardown:
    """Dying domains: their drain, Xen's teardown commands, and the final free."""

    def __init__(self, state: ItsState) -> None:
        self.state = state

    def begin(self, domid: int) -> None:
        """Destruction: the domain's MMIO is ignored and its LPIs dropped from now on, nothing
        new of it is placed; once its commands on every pITS have completed, Xen disables its
        LPIs, unmaps its devices (MAPD V=0) and sends one INVALL on each pITS, and only when
        those have completed is everything freed (``done``)."""
        s = self.state
        dom = s.domains.get(domid)
        if dom is None or dom.dying:
            return
        dom.dying = True
        if not dom.vits:
            del s.domains[domid]
            return
        s.tearing_down[domid] = -1  # draining: its own commands still on a pITS
        s.retired |= {d.info.pdevid for v in dom.vits.values() for d in v.devices.values()}
        for vits in dom.vits.values():
            state = s.pits[vits.pits]
            state.schedule = [v for v in state.schedule if v is not vits]
            if state.last_served is vits:
                state.last_served = None
            s.raised.add(vits.pits)

    def done(self, domid: int) -> bool:
        return domid not in self.state.domains

    def slot_completed(self, domid: int) -> None:
        """One of Xen's teardown commands for ``domid`` has executed on its pITS."""
        self.state.tearing_down[domid] -= 1

    def progress(self) -> None:
        """Move each dying domain on: from draining to tearing down, and from there to freed."""
        s = self.state
        for domid, left in list(s.tearing_down.items()):
            dom = s.domains[domid]
            if left == -1:
                owned = any(o is v for v in dom.vits.values() for p in s.pits for o in p.owner.values())
                if owned:
                    continue
                queued = 0
                for vits in dom.vits.values():
                    state = s.pits[vits.pits]
                    for ite in vits.ites.values():
                        s.prop[ite.plpi - LPI_BASE] = XEN_PRIORITY
                    for device in vits.devices.values():
                        state.xen_queue.append((cmds.mapd(device.info.pdevid, 0, 0, False), None, domid))
                        queued += 1
                    state.xen_queue.append((cmds.invall(s.options.cpus), None, domid))
                    queued += 1
                    s.raised.add(vits.pits)
                s.tearing_down[domid] = queued
            if s.tearing_down[domid] == 0:
                del s.tearing_down[domid]
                del s.domains[domid]
                for vits in dom.vits.values():
                    for ite in vits.ites.values():
                        s.forget_binding(domid, ite)
                    for device in vits.devices.values():
                        s.retired.discard(device.info.pdevid)
                        s.release_lpis(device.info.plpis)  # disabled, and unmapped on the pITS
