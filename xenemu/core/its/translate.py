"""Translation and validation: each guest command, read from its queue, into physical ones.

Per command: validate with KVM's checks in KVM's order, then translate or drop. A virtual
DeviceID becomes the physical one of a device assigned behind this vITS's pITS; an EventID stays;
a virtual collection becomes the collection of the CPU its vCPU is pinned to (the spare while it
is unmapped). ``MAPC`` and ``MOVALL`` are recorded and never forwarded (Xen queues ``MOVI``s of
its own instead); ``MAPTI``/``MAPI`` bind the device's event to the physical LPI allocated at
assignment. A command that fails raises ``Dropped`` with KVM's error name (or one of xenemu's:
``SYNC_TARGET_OOR``, ``MAPTI_ALREADY_MAPPED``, ``UNKNOWN_COMMAND``, ``UNREADABLE``); the
scheduler moves ``CREADR`` past it like any other.

This room knows nothing of batches or slots: the scheduler calls ``translate`` for one queue
offset at the moment it takes the command, and places what comes back. Whether an ``INV``,
``INVALL`` or ``SYNC`` is forwarded is elision's to say (elision.py).
"""

from __future__ import annotations

from collections.abc import Callable

from xenemu.abi import const
from xenemu.abi import its_cmd as cmds
from xenemu.abi.its_cmd import ItsCommand
from xenemu.core.errors import HypercallError
from xenemu.core.its.elision import ElisionPolicy
from xenemu.core.its.jobs import Retarget
from xenemu.core.its.lpis import Lpis
from xenemu.core.its.state import (
    CBASER_ADDR,
    CMD_SIZE,
    ENABLED,
    LPI_BASE,
    XEN_PRIORITY,
    DomainIts,
    Ite,
    ItsState,
    Taken,
    VDevice,
    Vits,
    lpi_limit,
)

#: GITS_TYPER's EventID bits (a MAPD's Size + 1 may not exceed them) and its ITT entry size.
EVENTID_BITS = 16
ITT_ENTRY = 8

#: Every error name a dropped command may carry, looked up in the ABI so that a name missing
#: there fails at import rather than in a guest's queue.
ERRORS = {
    name: const(f"E_ITS_{name}")
    for name in (
        "MOVI_UNMAPPED_INTERRUPT",
        "MOVI_UNMAPPED_COLLECTION",
        "INT_UNMAPPED_INTERRUPT",
        "CLEAR_UNMAPPED_INTERRUPT",
        "MAPD_DEVICE_OOR",
        "MAPD_ITTSIZE_OOR",
        "MAPC_PROCNUM_OOR",
        "MAPC_COLLECTION_OOR",
        "MAPTI_UNMAPPED_DEVICE",
        "MAPTI_ID_OOR",
        "MAPTI_PHYSICALID_OOR",
        "INV_UNMAPPED_INTERRUPT",
        "INVALL_UNMAPPED_COLLECTION",
        "MOVALL_PROCNUM_OOR",
        "DISCARD_UNMAPPED_INTERRUPT",
        "SYNC_TARGET_OOR",
        "MAPTI_ALREADY_MAPPED",
        "UNKNOWN_COMMAND",
        "UNREADABLE",
    )
}


class Dropped(Exception):
    """A guest command that fails validation: dropped, counted, and the queue moves on."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


Handler = Callable[[Vits, ItsCommand], list[ItsCommand]]


class Translator:
    """Validates and translates one guest command at a time, recording what it maps."""

    def __init__(self, state: ItsState, lpis: Lpis, elision: ElisionPolicy) -> None:
        self.state = state
        self.lpis = lpis
        self.elision = elision
        self.started: Retarget | None = None
        self._handlers: dict[int, Handler] = {
            cmds.MAPD: self._v_mapd,
            cmds.MAPC: self._v_mapc,
            cmds.MAPTI: self._v_mapti,
            cmds.MAPI: self._v_mapi,
            cmds.INT: self._v_int,
            cmds.CLEAR: self._v_clear,
            cmds.DISCARD: self._v_discard,
            cmds.MOVI: self._v_movi,
            cmds.INV: self._v_inv,
            cmds.INVALL: self._v_invall,
            cmds.SYNC: self._v_sync,
            cmds.MOVALL: self._v_movall,
        }

    def translate(self, vits: Vits, offset: int) -> list[ItsCommand]:
        """The physical commands for the guest command at ``offset`` of its queue (none if it is
        dropped, recorded or elided), with the vITS's counters and the drop log updated."""
        block = self._read_command(vits, offset)
        if block is None:
            vits.dropped["UNREADABLE"] += 1
            self.state.drops.append((vits.domid, vits.pits, offset, "?", "UNREADABLE"))
            return []
        command = ItsCommand.decode(block)
        vits.received[command.name] += 1
        try:
            handler = self._handlers.get(command.cmd)
            if handler is None:
                raise Dropped("UNKNOWN_COMMAND")
            out = handler(vits, command)
        except Dropped as drop:
            vits.dropped[drop.name] += 1
            self.state.drops.append((vits.domid, vits.pits, offset, command.name, drop.name))
            return []
        if out:
            vits.forwarded[command.name] += 1
        elif command.cmd not in (cmds.MAPC, cmds.MOVALL):
            vits.elided[command.name] += 1
        return out

    def _read_command(self, vits: Vits, offset: int) -> bytes | None:
        gpa = (vits.cbaser & CBASER_ADDR) + offset
        try:
            return self.state.memory.read(vits.domid, gpa, CMD_SIZE)
        except HypercallError:
            return None

    # -- what a virtual name stands for ----------------------------------------------------------
    def _dom(self, vits: Vits) -> DomainIts:
        return self.state.domains[vits.domid]

    def _pcoll(self, vits: Vits, icid: int) -> int:
        """A mapped virtual collection: the collection of its vCPU's physical CPU; else the spare."""
        dom = self._dom(vits)
        vcpu = vits.collections.get(icid)
        return self.state.options.cpus if vcpu is None else dom.pin[vcpu]

    def _ite(self, vits: Vits, c: ItsCommand, error: str) -> tuple[VDevice, Ite]:
        device = vits.devices.get(c.devid)
        ite = vits.ites.get((c.devid, c.eventid)) if device and device.size is not None else None
        if device is None or ite is None:
            raise Dropped(error)
        return device, ite

    def _guest_prop(self, domid: int, vlpi: int) -> int:
        base = self.state.domains[domid].propbaser & CBASER_ADDR
        gpa = base + vlpi - LPI_BASE
        try:
            return self.state.memory.read(domid, gpa, 1)[0]
        except HypercallError:
            return 0

    def _unbind(self, vits: Vits, key: tuple[int, int]) -> None:
        """The mapping is gone, and its pending state with it (it lives on the ITE)."""
        self.state.forget_binding(vits.domid, vits.ites.pop(key))

    # -- one handler per command -----------------------------------------------------------------
    def _v_mapd(self, vits: Vits, c: ItsCommand) -> list[ItsCommand]:
        """Validated in full before anything is unmapped (as KVM does), so a dropped MAPD has no
        effect. Size is checked against GITS_TYPER's 16 EventID bits only: a guest may size its
        ITT for more events than its device has (Linux: at least 32); MAPTI checks the events."""
        device = vits.devices.get(c.devid)
        if device is None:
            raise Dropped("MAPD_DEVICE_OOR")
        if c.valid and (
            c.size + 1 > EVENTID_BITS
            or not self.state.memory.in_ram(vits.domid, c.itt, (1 << (c.size + 1)) * ITT_ENTRY)
        ):
            raise Dropped("MAPD_ITTSIZE_OOR")
        for key in [k for k in vits.ites if k[0] == c.devid]:
            self._unbind(vits, key)
        if not c.valid:
            device.size = None
            return [cmds.mapd(device.info.pdevid, 0, 0, False)]
        device.size, device.itt = c.size, c.itt
        return [device.info.xen_mapd()]

    def _v_mapc(self, vits: Vits, c: ItsCommand) -> list[ItsCommand]:
        """Recorded at once; its mappings are retargeted by a scan (jobs.py) that the scheduler
        starts for this command, and each is owed a MOVI of Xen's if its physical collection
        changes (placed only if it still does then)."""
        dom = self._dom(vits)
        if c.valid and c.target >= dom.vcpus:
            raise Dropped("MAPC_PROCNUM_OOR")
        if c.icid >= dom.vcpus + 1:
            raise Dropped("MAPC_COLLECTION_OOR")
        if c.valid:
            vits.collections[c.icid] = c.target
        else:
            vits.collections.pop(c.icid, None)
        self.started = Retarget(vits, Taken(0, None), icid=c.icid)
        return []

    def _v_mapti(self, vits: Vits, c: ItsCommand, vlpi: int | None = None) -> list[ItsCommand]:
        device = vits.devices.get(c.devid)
        if device is None or device.size is None:
            raise Dropped("MAPTI_UNMAPPED_DEVICE")
        if c.eventid >= 1 << (device.size + 1) or c.eventid >= device.info.events:
            raise Dropped("MAPTI_ID_OOR")
        intid = c.pintid if vlpi is None else vlpi
        if not LPI_BASE <= intid < lpi_limit(self._dom(vits).propbaser):
            raise Dropped("MAPTI_PHYSICALID_OOR")
        if (c.devid, c.eventid) in vits.ites:
            raise Dropped("MAPTI_ALREADY_MAPPED")
        if c.icid >= self._dom(vits).vcpus + 1:
            raise Dropped("MAPC_COLLECTION_OOR")
        plpi = device.info.plpis[c.eventid]
        pcoll = self._pcoll(vits, c.icid)
        vits.ites[(c.devid, c.eventid)] = Ite(intid, c.icid, plpi, pcoll=pcoll)
        self.state.bind(vits, (c.devid, c.eventid), intid, plpi)
        self.state.prop[plpi - LPI_BASE] = XEN_PRIORITY | (self._guest_prop(vits.domid, intid) & ENABLED)
        self.state.dirty.discard(plpi)
        return [cmds.mapti(device.info.pdevid, c.eventid, plpi, pcoll)]

    def _v_mapi(self, vits: Vits, c: ItsCommand) -> list[ItsCommand]:
        return self._v_mapti(vits, c, vlpi=c.eventid)

    def _v_int(self, vits: Vits, c: ItsCommand) -> list[ItsCommand]:
        """An LPI whose collection is unmapped cannot fire (KVM, the architecture): dropped."""
        device, ite = self._ite(vits, c, "INT_UNMAPPED_INTERRUPT")
        if vits.target_vcpu(ite) is None:
            raise Dropped("INT_UNMAPPED_INTERRUPT")
        return [cmds.event_cmd(cmds.INT, device.info.pdevid, c.eventid)]

    def _v_clear(self, vits: Vits, c: ItsCommand) -> list[ItsCommand]:
        """Clears the pending state Xen holds for the mapping now, and the pITS's when the
        forwarded CLEAR executes."""
        device, ite = self._ite(vits, c, "CLEAR_UNMAPPED_INTERRUPT")
        ite.pending = None
        return [cmds.event_cmd(cmds.CLEAR, device.info.pdevid, c.eventid)]

    def _v_discard(self, vits: Vits, c: ItsCommand) -> list[ItsCommand]:
        device, ite = self._ite(vits, c, "DISCARD_UNMAPPED_INTERRUPT")
        if ite.icid not in vits.collections:
            raise Dropped("DISCARD_UNMAPPED_INTERRUPT")
        self._unbind(vits, (c.devid, c.eventid))
        return [cmds.event_cmd(cmds.DISCARD, device.info.pdevid, c.eventid)]

    def _v_movi(self, vits: Vits, c: ItsCommand) -> list[ItsCommand]:
        device, ite = self._ite(vits, c, "MOVI_UNMAPPED_INTERRUPT")
        if ite.icid not in vits.collections or c.icid not in vits.collections:  # KVM checks both
            raise Dropped("MOVI_UNMAPPED_COLLECTION")
        ite.icid, ite.vcpu_override = c.icid, None
        self.lpis.retarget(vits, ite)  # a pending LPI moves with it
        ite.pcoll = self._pcoll(vits, c.icid)
        return [cmds.event_cmd(cmds.MOVI, device.info.pdevid, c.eventid, ite.pcoll)]

    def _v_inv(self, vits: Vits, c: ItsCommand) -> list[ItsCommand]:
        device, ite = self._ite(vits, c, "INV_UNMAPPED_INTERRUPT")
        if not self.elision.forward_inv(ite.plpi):
            return []
        return [cmds.event_cmd(cmds.INV, device.info.pdevid, c.eventid)]

    def _v_invall(self, vits: Vits, c: ItsCommand) -> list[ItsCommand]:
        if c.icid not in vits.collections:
            raise Dropped("INVALL_UNMAPPED_COLLECTION")
        mine = [ite.plpi for ite in vits.ites.values() if ite.icid == c.icid]
        if not self.elision.forward_invall(mine):
            return []
        return [cmds.invall(self._pcoll(vits, c.icid))]

    def _v_sync(self, vits: Vits, c: ItsCommand) -> list[ItsCommand]:
        dom = self._dom(vits)
        if c.target >= dom.vcpus:
            raise Dropped("SYNC_TARGET_OOR")
        target = dom.pin[c.target]
        if not self.elision.forward_sync(vits.pits, target):
            return []
        return [cmds.sync(target)]

    def _v_movall(self, vits: Vits, c: ItsCommand) -> list[ItsCommand]:
        dom = self._dom(vits)
        if c.target >= dom.vcpus or c.target2 >= dom.vcpus:
            raise Dropped("MOVALL_PROCNUM_OOR")
        self.started = Retarget(vits, Taken(0, None), vcpu=c.target, to=c.target2)
        return []

    def take_started(self) -> Retarget | None:
        """The scan the last translated command starts (MAPC, MOVALL), handed over once."""
        job, self.started = self.started, None
        return job
