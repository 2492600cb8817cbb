"""Xen's physical resources, set up off every guest's command path: boot, domains, devices.

At boot Xen maps its collections on each pITS (one per physical CPU and a spare) and its own
device, whose event 0 is the pITS's completion LPI. A domain gets its vITS state (vCPUs, their
pinning, redistributors) when it is created. At assignment Xen allocates the device's physical
LPIs and queues its own ``MAPD``. The draft's rule is that nothing is allocated while a guest
command is translated; keeping every allocation in this room makes that rule visible.
"""

from __future__ import annotations

from xenemu.abi import its_cmd as cmds
from xenemu.core.errors import HypercallError
from xenemu.core.its.state import (
    ENABLED,
    LPI_BASE,
    XEN_DEVID,
    XEN_PRIORITY,
    DomainIts,
    ItsDeviceInfo,
    ItsState,
    PitsState,
    Redistributor,
    VDevice,
    Vits,
)


class Assignment:
    """Boots the pITSs, creates a domain's vITS state and assigns devices to it."""

    def __init__(self, state: ItsState) -> None:
        self.state = state

    def boot(self) -> None:
        for pits in self.state.pits:
            self._boot(pits)

    def _boot(self, state: PitsState) -> None:
        hw, cpus = state.hw, self.state.options.cpus
        for cpu in range(cpus + 1):
            state.place_xen(cmds.mapc(cpu, cpu if cpu < cpus else 0))
        lpi = LPI_BASE + hw.index
        self.state.prop[lpi - LPI_BASE] = XEN_PRIORITY | ENABLED
        state.place_xen(cmds.mapd(XEN_DEVID, 0, 0))
        state.place_xen(cmds.mapti(XEN_DEVID, 0, lpi, cpus))
        hw.step(hw.queued())
        state.last_creadr = hw.creadr
        state.owner.clear()

    def add_domain(self, domid: int, vcpus: int = 1, pin: list[int] | None = None) -> DomainIts:
        cpus = self.state.options.cpus
        pins = pin or [v % cpus for v in range(vcpus)]
        if len(pins) != vcpus or any(not 0 <= p < cpus for p in pins):
            raise HypercallError(-22, "bad vCPU pinning")
        dom = DomainIts(vcpus, pins, redists=[Redistributor() for _ in range(vcpus)])
        self.state.domains[domid] = dom
        return dom

    def check(self, pdevid: int, pits: int, events: int) -> None:
        """Whether ``assign`` would succeed: the toolstack asks before it changes anything else,
        so a refused assignment leaves no trace (a failing call changes nothing)."""
        s = self.state
        if not 0 <= pits < len(s.pits) or not 0 < events <= 1 << 16 or pdevid == XEN_DEVID:
            raise HypercallError(-22, "bad ITS device")
        if pdevid in s.retired or any(
            d.info.pdevid == pdevid for o in s.domains.values() for v in o.vits.values() for d in v.devices.values()
        ):
            raise HypercallError(-16, f"DeviceID {pdevid:#x} is in use or still being torn down")
        if all(count < events for _, count in s.free_lpis):
            raise HypercallError(-28, "no physical LPIs left")

    def assign(self, domid: int, pdevid: int, pits: int, events: int, vdevid: int) -> ItsDeviceInfo:
        """At assignment Xen allocates the device's physical LPIs and maps it (nothing later)."""
        s = self.state
        dom = s.domains[domid]
        self.check(pdevid, pits, events)
        plpis = s.allocate_lpis(events)  # returned by teardown once the domain is freed
        assert plpis is not None  # check() found a run that fits
        for lpi in plpis:
            s.prop[lpi - LPI_BASE] = XEN_PRIORITY
        info = ItsDeviceInfo(pdevid, pits, events, plpis, vdevid)
        vits = dom.vits.get(pits)
        if vits is None:
            vits = dom.vits[pits] = Vits(domid, pits)
        vits.devices[vdevid] = VDevice(info)
        s.pits[pits].xen_queue.append((info.xen_mapd(), None, None))
        s.raised.add(pits)
        return info
