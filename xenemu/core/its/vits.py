"""Virtual ITSs (draft C): guests' command queues, translated and scheduled onto shared pITSs.

Pure and synchronous. A guest programs its vITS through trapped MMIO (``mmio_read`` /
``mmio_write``) and a command queue in its own RAM; ``CWRITER`` writes raise scheduling passes,
which run at the end of the request (``run_passes``). A pass completes what the pITS finished,
then refills it round-robin from the ``vits_cq``s on its schedule list, one batch in flight per
queue, translating each guest command (validate, then translate or drop) at that moment. The
hardware runs on its own (``advance``); Xen's own completion ``INT`` and LPI delivery come out
of ``deliver``. The shell only supplies time.

This module is the core of the vITS; the wire requests, toolstack options, audit and domain
destruction are built on it separately.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Literal

from xenemu.abi import const
from xenemu.abi import its_cmd as cmds
from xenemu.abi.its_cmd import ItsCommand
from xenemu.core.errors import HypercallError
from xenemu.core.its.pits import PhysicalIts
from xenemu.core.memory.frames import PAGE_SIZE
from xenemu.core.memory.guest import GuestMemory

Elision = Literal["lazy", "eager", "off"]

LPI_BASE = const("LPI_INTID_BASE")
ENABLED = const("LPI_PROP_ENABLED")
XEN_PRIORITY = const("LPI_XEN_PRIORITY")
CMD_SIZE = const("ITS_CMD_SIZE")
OFFSET_MASK = const("GITS_CMDQ_OFFSET_MASK")
CBASER_VALID = const("GITS_CBASER_VALID")
CBASER_ADDR = const("GITS_CBASER_ADDR_MASK")
BASER_VALID = const("GITS_BASER_VALID")
XEN_DEVID = (1 << 16) - 1
#: Machine frame of each pITS's translation frame (beyond any RAM): the doorbell page.
DOORBELL_MFN = 1 << 36
DOORBELL_OFFSET = const("GITS_TRANSLATER") & 0xFFF
ITS_BASE_GPA = 0x08080000
GICR_BASE_GPA = 0x080A0000
U64 = (1 << 64) - 1

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


@dataclass(frozen=True)
class ItsOptions:
    pits: int = 1
    cpus: int = 4
    queue_slots: int = 32768
    rate: float = 2_000_000.0
    batch_size: int = 8
    elision: Elision = "lazy"
    lpis: int = 1 << 16


@dataclass
class ItsDeviceInfo:
    """A PCI device's ITS side: fixed at assignment."""

    pdevid: int
    pits: int
    events: int
    plpis: list[int]
    vdevid: int


@dataclass
class Ite:
    vlpi: int
    icid: int
    plpi: int
    #: MOVALL's retarget, until a MOVI or MAPC routes it again.
    vcpu_override: int | None = None


@dataclass
class VDevice:
    info: ItsDeviceInfo
    size: int | None = None  # None until the guest's MAPD maps it


@dataclass
class Taken:
    """A guest command taken from its queue: done when its slot on the pITS has executed."""

    end: int  # queue offset after it
    slot: int | None  # pITS slot, or None if nothing was placed (elided, recorded, dropped)
    done: bool = False


@dataclass(eq=False)
class Vits:
    domid: int
    pits: int
    enabled: bool = False
    cbaser: int = 0
    baser: list[int] = field(default_factory=lambda: [0] * 8)
    creadr: int = 0
    cwriter: int = 0
    progress: int = 0
    taken: deque[Taken] = field(default_factory=deque)
    devices: dict[int, VDevice] = field(default_factory=dict)
    ites: dict[tuple[int, int], Ite] = field(default_factory=dict)
    collections: dict[int, int] = field(default_factory=dict)
    received: Counter[str] = field(default_factory=Counter)
    forwarded: Counter[str] = field(default_factory=Counter)
    elided: Counter[str] = field(default_factory=Counter)
    dropped: Counter[str] = field(default_factory=Counter)
    longest_wait: int = 0
    waiting_since: int | None = None

    @property
    def queue_bytes(self) -> int:
        return ((self.cbaser & 0xFF) + 1) * PAGE_SIZE

    def outstanding(self) -> int:
        return (self.cwriter - self.progress) % self.queue_bytes // CMD_SIZE if self.queue_bytes else 0

    def batch_in_flight(self) -> bool:
        return any(t.slot is not None and not t.done for t in self.taken)


@dataclass
class Redistributor:
    enable_lpis: bool = False
    pendbaser: int = 0
    #: The last PENDBASER write said the pending table is zero (PTZ), so it is not read.
    ptz: bool = False


@dataclass
class DomainIts:
    vcpus: int
    pin: list[int]
    propbaser: int = 0
    redists: list[Redistributor] = field(default_factory=list)
    vits: dict[int, Vits] = field(default_factory=dict)
    #: vLPIs delivered and not yet ended, and those that became pending again meanwhile.
    in_service: set[tuple[int, int]] = field(default_factory=set)
    again: set[tuple[int, int]] = field(default_factory=set)
    #: LPIs that fired while their collection was unmapped: (pITS, (vDeviceID, EventID)).
    held: set[tuple[int, tuple[int, int]]] = field(default_factory=set)
    dying: bool = False


@dataclass
class Delivery:
    domid: int
    vcpu: int
    intid: int


@dataclass
class PitsState:
    hw: PhysicalIts
    schedule: list[Vits] = field(default_factory=list)
    last_served: Vits | None = None
    last_creadr: int = 0
    #: Slot -> who placed the command there (a Vits, or None for Xen).
    owner: dict[int, Vits | None] = field(default_factory=dict)
    #: Xen's own commands, with the physical LPI each concerns (skipped if unbound meanwhile)
    #: and the dying domain whose teardown it is part of.
    xen_queue: deque[tuple[ItsCommand, int | None, int | None]] = field(default_factory=deque)
    #: Slots holding a teardown command -> the domain it tears down.
    teardown_slots: dict[int, int] = field(default_factory=dict)
    xen_int_outstanding: bool = False
    #: The last forwarded guest SYNC's physical target, for eliding SYNC; SYNC.
    last_forwarded_sync: int | None = None
    passes: int = 0
    batches: int = 0
    xen_ints: int = 0
    physical: Counter[str] = field(default_factory=Counter)


class ItsHost:
    """Every pITS and every domain's vITSs, redistributors and bindings."""

    def __init__(self, memory: GuestMemory, options: ItsOptions | None = None) -> None:
        self.memory = memory
        self.options = opts = options or ItsOptions()
        self.prop = bytearray(opts.lpis)  # physical LPI configuration table, LPI - 8192
        self.dirty: set[int] = set()
        self.pits = [PitsState(PhysicalIts(i, opts.queue_slots, opts.rate, self.prop)) for i in range(opts.pits)]
        self.next_lpi = LPI_BASE + opts.pits  # 8192 + index is each pITS's completion LPI
        self.domains: dict[int, DomainIts] = {}
        #: (domid, vLPI) -> the physical LPIs bound to it (two events may share a vLPI), so a
        #: trapped configuration write finds them without scanning every binding.
        self.by_vlpi: dict[tuple[int, int], set[int]] = {}
        #: physical LPI -> (domid, vITS pits index, (vdevid, event)) of its current binding.
        self.bindings: dict[int, tuple[int, int, tuple[int, int]]] = {}
        self.raised: set[int] = set()
        self.deliveries: list[Delivery] = []
        #: Dying domains: -1 while their commands drain, then how many teardown commands remain.
        self.tearing_down: dict[int, int] = {}
        #: Physical DeviceIDs of dying domains: not assignable until their teardown completes.
        self.retired: set[int] = set()
        #: Dropped guest commands not yet logged: (domid, pITS, queue offset, command, error).
        self.drops: list[tuple[int, int, int, str, str]] = []
        for state in self.pits:
            self._boot(state)

    # -- boot and devices -----------------------------------------------------------------------------
    def _boot(self, state: PitsState) -> None:
        hw, cpus = state.hw, self.options.cpus
        for cpu in range(cpus + 1):
            self._xen_place(state, cmds.mapc(cpu, cpu if cpu < cpus else 0))
        lpi = LPI_BASE + hw.index
        self.prop[lpi - LPI_BASE] = XEN_PRIORITY | ENABLED
        self._xen_place(state, cmds.mapd(XEN_DEVID, 0, 0))
        self._xen_place(state, cmds.mapti(XEN_DEVID, 0, lpi, cpus))
        hw.step(hw.queued())
        state.last_creadr = hw.creadr
        state.owner.clear()

    def _xen_place(self, state: PitsState, command: ItsCommand) -> None:
        slot = state.hw.place(command)
        state.owner[slot] = None
        state.physical[command.name] += 1

    def add_domain(self, domid: int, vcpus: int = 1, pin: list[int] | None = None) -> DomainIts:
        pins = pin or [v % self.options.cpus for v in range(vcpus)]
        if len(pins) != vcpus or any(not 0 <= p < self.options.cpus for p in pins):
            raise HypercallError(-22, "bad vCPU pinning")
        dom = DomainIts(vcpus, pins, redists=[Redistributor() for _ in range(vcpus)])
        self.domains[domid] = dom
        return dom

    def begin_teardown(self, domid: int) -> None:
        """Destruction: the domain's MMIO is ignored and its LPIs dropped from now on, nothing
        new of it is placed; once its commands on every pITS have completed, Xen disables its
        LPIs, unmaps its devices (MAPD V=0) and sends one INVALL on each pITS, and only when
        those have completed is everything freed (``teardown_done``)."""
        dom = self.domains.get(domid)
        if dom is None or dom.dying:
            return
        dom.dying = True
        if not dom.vits:
            del self.domains[domid]
            return
        self.tearing_down[domid] = -1  # draining: its own commands still on a pITS
        self.retired |= {d.info.pdevid for v in dom.vits.values() for d in v.devices.values()}
        for vits in dom.vits.values():
            state = self.pits[vits.pits]
            state.schedule = [v for v in state.schedule if v is not vits]
            if state.last_served is vits:
                state.last_served = None
            self.raised.add(vits.pits)

    def teardown_done(self, domid: int) -> bool:
        return domid not in self.domains

    def _progress_teardowns(self) -> None:
        for domid, left in list(self.tearing_down.items()):
            dom = self.domains[domid]
            if left == -1:
                owned = any(o is v for v in dom.vits.values() for s in self.pits for o in s.owner.values())
                if owned:
                    continue
                queued = 0
                for vits in dom.vits.values():
                    state = self.pits[vits.pits]
                    for ite in vits.ites.values():
                        self.prop[ite.plpi - LPI_BASE] = XEN_PRIORITY
                    for device in vits.devices.values():
                        state.xen_queue.append((cmds.mapd(device.info.pdevid, 0, 0, False), None, domid))
                        queued += 1
                    state.xen_queue.append((cmds.invall(self.options.cpus), None, domid))
                    queued += 1
                    self.raised.add(vits.pits)
                self.tearing_down[domid] = queued
            if self.tearing_down[domid] == 0:
                del self.tearing_down[domid]
                del self.domains[domid]
                for vits in dom.vits.values():
                    for ite in vits.ites.values():
                        self._forget_binding(domid, ite)
                    for device in vits.devices.values():
                        self.retired.discard(device.info.pdevid)

    def assign(self, domid: int, pdevid: int, pits: int, events: int, vdevid: int) -> ItsDeviceInfo:
        """At assignment Xen allocates the device's physical LPIs and maps it (nothing later)."""
        dom = self.domains[domid]
        if not 0 <= pits < len(self.pits) or not 0 < events <= 1 << 16 or pdevid == XEN_DEVID:
            raise HypercallError(-22, "bad ITS device")
        if pdevid in self.retired or any(
            d.info.pdevid == pdevid for o in self.domains.values() for v in o.vits.values() for d in v.devices.values()
        ):
            raise HypercallError(-16, f"DeviceID {pdevid:#x} is in use or still being torn down")
        plpis = list(range(self.next_lpi, self.next_lpi + events))
        if plpis[-1] - LPI_BASE >= len(self.prop):
            raise HypercallError(-28, "no physical LPIs left")
        self.next_lpi += events
        for lpi in plpis:
            self.prop[lpi - LPI_BASE] = XEN_PRIORITY
        info = ItsDeviceInfo(pdevid, pits, events, plpis, vdevid)
        vits = dom.vits.get(pits)
        if vits is None:
            vits = dom.vits[pits] = Vits(domid, pits)
        vits.devices[vdevid] = VDevice(info)
        state = self.pits[pits]
        size = max(0, math.ceil(math.log2(max(events, 2))) - 1)
        state.xen_queue.append((cmds.mapd(pdevid, size, 0x1000 * pdevid), None, None))
        self.raised.add(pits)
        return info

    # -- MMIO -----------------------------------------------------------------------------------------
    def translation_gpa(self, domid: int, pits: int) -> int:
        """Where the guest sees the translation frame of its vITS for ``pits`` (doorbell page)."""
        return self.frames(domid)[0][pits] + 0x10000

    def config_range(self, domid: int) -> tuple[int, int]:
        """The guest-physical range of its LPI configuration table (trapped)."""
        dom = self.domains[domid]
        idbits = (dom.propbaser & 0x1F) + 1
        base = dom.propbaser & CBASER_ADDR
        return base, base + max(0, (1 << idbits) - LPI_BASE)

    def frames(self, domid: int) -> tuple[dict[int, int], int]:
        """Guest-physical base of each vITS (by pITS), and of the first redistributor."""
        dom = self.domains[domid]
        return {p: ITS_BASE_GPA + i * 0x20000 for i, p in enumerate(sorted(dom.vits))}, GICR_BASE_GPA

    def mmio_write(self, domid: int, vits_pits: int, offset: int, size: int, value: int) -> None:
        dom = self.domains[domid]
        vits = dom.vits.get(vits_pits)
        if dom.dying or vits is None:
            return
        reg, part = _register(offset, size)
        if reg is None:
            return
        if reg == 0x0:  # GITS_CTLR
            want = bool(value & 1)
            if want and not vits.enabled:
                if not (vits.cbaser & CBASER_VALID and vits.baser[0] & BASER_VALID and vits.baser[1] & BASER_VALID):
                    return
                vits.enabled = True
                self._schedule(vits)
            elif not want:
                vits.enabled = False
        elif reg == 0x80 and not vits.enabled:
            new = _merge(vits.cbaser, part, value)
            vits.cbaser = new & (CBASER_VALID | CBASER_ADDR | 0xFF)
            vits.cwriter = vits.creadr = vits.progress = 0
            vits.taken = deque()  # a batch of the old queue still on the pITS completes unseen
        elif reg == 0x88:
            offset_value = _merge(vits.cwriter, part, value) & OFFSET_MASK
            if offset_value >= vits.queue_bytes:
                return
            behind = (offset_value - vits.progress) % vits.queue_bytes
            ahead = (vits.cwriter - vits.progress) % vits.queue_bytes
            if offset_value != vits.cwriter and behind < ahead:
                return  # would move back behind commands already taken
            vits.cwriter = offset_value
            if vits.enabled:
                self._schedule(vits)
        elif 0x100 <= reg <= 0x138 and not vits.enabled:
            index = (reg - 0x100) // 8
            if index < 2:
                vits.baser[index] = _merge(vits.baser[index], part, value) & ~(1 << 62) & U64

    def mmio_read(self, domid: int, vits_pits: int, offset: int, size: int) -> int:
        dom = self.domains[domid]
        vits = dom.vits.get(vits_pits)
        if vits is None:
            return 0
        reg, part = _register(offset, size)
        if reg is None:
            return 0
        if reg in (0x0, 0x90) and vits.creadr != vits.cwriter:
            self.run_pass(vits.pits)  # standing for any pass already raised on that pITS
            self.raised.discard(vits.pits)
        values = {
            0x0: (int(vits.enabled) | (0x80000000 if vits.creadr == vits.cwriter else 0)),
            0x4: const("GITS_IIDR_VALUE"),
            0x8: _typer(),
            0x80: vits.cbaser,
            0x88: vits.cwriter,
            0x90: vits.creadr,
            0x100: vits.baser[0] | 1 << 56 | 7 << 48 | 2 << 8,
            0x108: vits.baser[1] | 4 << 56 | 7 << 48 | 2 << 8,
            0xFFE8: const("GITS_PIDR2_VALUE"),
        }
        value = values.get(reg, 0)
        return (value >> 32) if part == "high" else (value & 0xFFFFFFFF if part == "low" else value)

    def redist_write(self, domid: int, vcpu: int, offset: int, size: int, value: int) -> None:
        """A vCPU's redistributor: EnableLPIs, and the LPI tables (fixed while LPIs are enabled)."""
        dom = self.domains[domid]
        if dom.dying or not 0 <= vcpu < dom.vcpus:
            return
        redist = dom.redists[vcpu]
        reg, part = _redist_register(offset, size)
        if reg == 0x0:
            enabling = bool(value & 1) and not redist.enable_lpis
            redist.enable_lpis = bool(value & 1)
            if enabling and not redist.ptz:
                self._load_pending_table(domid, vcpu)
        elif reg == 0x70 and not redist.enable_lpis:
            dom.propbaser = _merge(dom.propbaser, part, value)
        elif reg == 0x78 and not redist.enable_lpis:
            written = _merge(redist.pendbaser, part, value)
            redist.ptz = bool(written & const("GICR_PENDBASER_PTZ"))
            redist.pendbaser = written & ~const("GICR_PENDBASER_PTZ")

    def _load_pending_table(self, domid: int, vcpu: int) -> None:
        """EnableLPIs 0 -> 1 with PTZ = 0: the vCPU's pending table sets or clears its LPIs."""
        dom = self.domains[domid]
        base = dom.redists[vcpu].pendbaser & CBASER_ADDR
        for vits in dom.vits.values():
            for key, ite in vits.ites.items():
                if self._target_vcpu(vits, ite) != vcpu:
                    continue
                gpa = base + ite.vlpi // 8
                try:
                    byte = self.memory.read(domid, gpa, 1)[0]
                except HypercallError:
                    continue
                if byte >> (ite.vlpi % 8) & 1:
                    self._inject(vits, key, self.deliveries)
                else:
                    dom.again.discard((vcpu, ite.vlpi))

    def redist_read(self, domid: int, vcpu: int, offset: int, size: int) -> int:
        dom = self.domains[domid]
        if not 0 <= vcpu < dom.vcpus:
            return 0
        redist = dom.redists[vcpu]
        reg, part = _redist_register(offset, size)
        typer = const("GICR_TYPER_PLPIS") | (vcpu << 8) | (const("GICR_TYPER_LAST") if vcpu == dom.vcpus - 1 else 0)
        values = {
            0x0: int(redist.enable_lpis),
            0x8: typer | vcpu << 32,
            0x70: dom.propbaser,
            0x78: redist.pendbaser,
            0xFFE8: const("GITS_PIDR2_VALUE"),
        }
        value = values.get(reg, 0) if reg is not None else 0
        return (value >> 32) if part == "high" else (value & 0xFFFFFFFF if part == "low" else value)

    def _schedule(self, vits: Vits) -> None:
        if vits.outstanding() and vits not in self.pits[vits.pits].schedule:
            self.pits[vits.pits].schedule.append(vits)
        if vits.outstanding():
            self.raised.add(vits.pits)

    # -- passes ---------------------------------------------------------------------------------------
    def run_passes(self) -> None:
        """The softirq: every pass raised during the request, until none is raised again."""
        for _ in range(64):
            if not self.raised:
                return
            raised, self.raised = self.raised, set()
            for index in sorted(raised):
                self.run_pass(index)

    def run_pass(self, index: int) -> None:
        state = self.pits[index]
        hw = state.hw
        state.passes += 1
        self._complete(state)
        free = hw.free_slots() - (0 if state.xen_int_outstanding else 1)
        while state.xen_queue and free > 0:
            command, plpi, teardown = state.xen_queue.popleft()
            if plpi is not None and plpi not in self.bindings:
                continue
            if teardown is not None:
                state.teardown_slots[state.hw.cwriter] = teardown
            self._xen_place(state, command)
            free -= 1
        schedule = state.schedule
        if schedule:
            start = (schedule.index(state.last_served) + 1) if state.last_served in schedule else 0
            order = schedule[start:] + schedule[:start]
            for vits in order:
                if free <= 0:
                    break
                if vits.batch_in_flight() or not vits.enabled or self.domains[vits.domid].dying:
                    continue
                count = min(free, vits.outstanding(), self.options.batch_size)
                placed = self._take_batch(state, vits, count)
                free -= placed
                state.last_served = vits
                state.batches += 1
                if not placed:
                    self.raised.add(index)
            state.schedule = [v for v in schedule if v.outstanding() or v.batch_in_flight()]
            for vits in state.schedule:
                waited = state.passes - (vits.waiting_since or state.passes)
                vits.longest_wait = max(vits.longest_wait, waited)
        if hw.queued() and not state.xen_int_outstanding:
            self._xen_place(state, cmds.event_cmd(cmds.INT, XEN_DEVID, 0))
            state.xen_int_outstanding = True
            state.xen_ints += 1

    def _complete(self, state: PitsState) -> None:
        hw = state.hw
        slot = state.last_creadr
        while slot != hw.creadr:
            owner = state.owner.pop(slot, None)
            teardown = state.teardown_slots.pop(slot, None)
            if teardown is not None:
                self.tearing_down[teardown] -= 1
            if owner is not None:
                for taken in owner.taken:
                    if taken.slot == slot:
                        taken.done = True
            slot = (slot + 1) % hw.slots
        state.last_creadr = hw.creadr
        self._progress_teardowns()
        for dom in self.domains.values():
            for vits in dom.vits.values():
                if vits.pits == hw.index:
                    self._advance_creadr(vits)

    def _advance_creadr(self, vits: Vits) -> None:
        while vits.taken and (vits.taken[0].slot is None or vits.taken[0].done):
            vits.creadr = vits.taken.popleft().end

    def _take_batch(self, state: PitsState, vits: Vits, count: int) -> int:
        placed = 0
        for _ in range(count):
            offset = vits.progress
            vits.progress = (offset + CMD_SIZE) % vits.queue_bytes
            physical = self._translate(vits, offset)
            slot = None
            for command in physical:
                slot = state.hw.place(command)
                state.owner[slot] = vits
                state.physical[command.name] += 1
                if command.cmd == cmds.SYNC:
                    state.last_forwarded_sync = command.target
                else:
                    state.last_forwarded_sync = None
                placed += 1
            vits.taken.append(Taken(vits.progress, slot))
        self._advance_creadr(vits)
        if vits.outstanding():
            vits.waiting_since = vits.waiting_since or state.passes
        else:
            vits.waiting_since = None
        return placed

    # -- translation ----------------------------------------------------------------------------------
    def _translate(self, vits: Vits, offset: int) -> list[ItsCommand]:
        block = self._read_command(vits, offset)
        if block is None:
            vits.dropped["UNREADABLE"] += 1
            self.drops.append((vits.domid, vits.pits, offset, "?", "UNREADABLE"))
            return []
        command = ItsCommand.decode(block)
        vits.received[command.name] += 1
        try:
            handler = getattr(self, f"_v_{command.name.lower()}", None)
            if handler is None:
                raise Dropped("UNKNOWN_COMMAND")
            out: list[ItsCommand] = handler(vits, command)
        except Dropped as drop:
            vits.dropped[drop.name] += 1
            self.drops.append((vits.domid, vits.pits, offset, command.name, drop.name))
            return []
        if out:
            vits.forwarded[command.name] += 1
        elif command.cmd not in (cmds.MAPC, cmds.MOVALL):
            vits.elided[command.name] += 1
        return out

    def _read_command(self, vits: Vits, offset: int) -> bytes | None:
        gpa = (vits.cbaser & CBASER_ADDR) + offset
        try:
            return self.memory.read(vits.domid, gpa, CMD_SIZE)
        except HypercallError:
            return None

    def _dom(self, vits: Vits) -> DomainIts:
        return self.domains[vits.domid]

    def _pcoll(self, vits: Vits, icid: int) -> int:
        """A mapped virtual collection: the collection of its vCPU's physical CPU; else the spare."""
        dom = self._dom(vits)
        vcpu = vits.collections.get(icid)
        return self.options.cpus if vcpu is None else dom.pin[vcpu]

    def _ite(self, vits: Vits, c: ItsCommand, error: str) -> tuple[VDevice, Ite]:
        device = vits.devices.get(c.devid)
        ite = vits.ites.get((c.devid, c.eventid)) if device and device.size is not None else None
        if device is None or ite is None:
            raise Dropped(error)
        return device, ite

    def _v_mapd(self, vits: Vits, c: ItsCommand) -> list[ItsCommand]:
        device = vits.devices.get(c.devid)
        if device is None:
            raise Dropped("MAPD_DEVICE_OOR")
        for key in [k for k in vits.ites if k[0] == c.devid]:
            self._unbind(vits, key)
        if not c.valid:
            device.size = None
            return [cmds.mapd(device.info.pdevid, 0, 0, False)]
        limit = max(1, math.ceil(math.log2(device.info.events))) if device.info.events > 1 else 1
        itt_bytes = (1 << (c.size + 1)) * 8
        if c.size + 1 > limit or c.size > 15 or not self._in_ram(vits.domid, c.itt, itt_bytes):
            raise Dropped("MAPD_ITTSIZE_OOR")
        device.size = c.size
        return [cmds.mapd(device.info.pdevid, c.size, 0x1000 * device.info.pdevid)]

    def _in_ram(self, domid: int, gpa: int, length: int) -> bool:
        return self.memory.in_ram(domid, gpa, length)

    def _v_mapc(self, vits: Vits, c: ItsCommand) -> list[ItsCommand]:
        dom = self._dom(vits)
        if c.valid and c.target >= dom.vcpus:
            raise Dropped("MAPC_PROCNUM_OOR")
        if c.icid >= dom.vcpus + 1:
            raise Dropped("MAPC_COLLECTION_OOR")
        before = {key: self._physical_target(vits, ite) for key, ite in vits.ites.items() if ite.icid == c.icid}
        if c.valid:
            vits.collections[c.icid] = c.target
        else:
            vits.collections.pop(c.icid, None)
        dom = self._dom(vits)
        for pits, key in sorted(dom.held):
            if pits == vits.pits and key in vits.ites and vits.ites[key].icid == c.icid and c.valid:
                dom.held.discard((pits, key))
                self._inject(vits, key, self.deliveries)
        state = self.pits[vits.pits]
        for (vdevid, event), old in before.items():
            ite = vits.ites[(vdevid, event)]
            ite.vcpu_override = None
            new = self._pcoll(vits, c.icid)
            if new != old:
                pdevid = vits.devices[vdevid].info.pdevid
                state.xen_queue.append((cmds.event_cmd(cmds.MOVI, pdevid, event, new), ite.plpi, None))
        return []

    def _physical_target(self, vits: Vits, ite: Ite) -> int:
        if ite.vcpu_override is not None:
            return self._dom(vits).pin[ite.vcpu_override]
        return self._pcoll(vits, ite.icid)

    def _v_mapti(self, vits: Vits, c: ItsCommand, vlpi: int | None = None) -> list[ItsCommand]:
        device = vits.devices.get(c.devid)
        if device is None or device.size is None:
            raise Dropped("MAPTI_UNMAPPED_DEVICE")
        if c.eventid >= 1 << (device.size + 1) or c.eventid >= device.info.events:
            raise Dropped("MAPTI_ID_OOR")
        intid = c.pintid if vlpi is None else vlpi
        idbits = (self._dom(vits).propbaser & 0x1F) + 1
        if not LPI_BASE <= intid < 1 << idbits:
            raise Dropped("MAPTI_PHYSICALID_OOR")
        if (c.devid, c.eventid) in vits.ites:
            raise Dropped("MAPTI_ALREADY_MAPPED")
        if c.icid >= self._dom(vits).vcpus + 1:
            raise Dropped("MAPC_COLLECTION_OOR")
        plpi = device.info.plpis[c.eventid]
        vits.ites[(c.devid, c.eventid)] = Ite(intid, c.icid, plpi)
        self.bindings[plpi] = (vits.domid, vits.pits, (c.devid, c.eventid))
        self.by_vlpi.setdefault((vits.domid, intid), set()).add(plpi)
        self.prop[plpi - LPI_BASE] = XEN_PRIORITY | (self._guest_prop(vits.domid, intid) & ENABLED)
        self.dirty.discard(plpi)
        return [cmds.mapti(device.info.pdevid, c.eventid, plpi, self._pcoll(vits, c.icid))]

    def _v_mapi(self, vits: Vits, c: ItsCommand) -> list[ItsCommand]:
        return self._v_mapti(vits, c, vlpi=c.eventid)

    def _guest_prop(self, domid: int, vlpi: int) -> int:
        base = self.domains[domid].propbaser & CBASER_ADDR
        gpa = base + vlpi - LPI_BASE
        try:
            return self.memory.read(domid, gpa, 1)[0]
        except HypercallError:
            return 0

    def _v_int(self, vits: Vits, c: ItsCommand) -> list[ItsCommand]:
        device, _ite = self._ite(vits, c, "INT_UNMAPPED_INTERRUPT")
        return [cmds.event_cmd(cmds.INT, device.info.pdevid, c.eventid)]

    def _v_clear(self, vits: Vits, c: ItsCommand) -> list[ItsCommand]:
        device, _ite = self._ite(vits, c, "CLEAR_UNMAPPED_INTERRUPT")
        return [cmds.event_cmd(cmds.CLEAR, device.info.pdevid, c.eventid)]

    def _v_discard(self, vits: Vits, c: ItsCommand) -> list[ItsCommand]:
        device, ite = self._ite(vits, c, "DISCARD_UNMAPPED_INTERRUPT")
        if ite.icid not in vits.collections:
            raise Dropped("DISCARD_UNMAPPED_INTERRUPT")
        self._unbind(vits, (c.devid, c.eventid))
        return [cmds.event_cmd(cmds.DISCARD, device.info.pdevid, c.eventid)]

    def _v_movi(self, vits: Vits, c: ItsCommand) -> list[ItsCommand]:
        device, ite = self._ite(vits, c, "MOVI_UNMAPPED_INTERRUPT")
        if c.icid not in vits.collections:
            raise Dropped("MOVI_UNMAPPED_COLLECTION")
        ite.icid, ite.vcpu_override = c.icid, None
        return [cmds.event_cmd(cmds.MOVI, device.info.pdevid, c.eventid, self._pcoll(vits, c.icid))]

    def _v_inv(self, vits: Vits, c: ItsCommand) -> list[ItsCommand]:
        device, ite = self._ite(vits, c, "INV_UNMAPPED_INTERRUPT")
        policy = self.options.elision
        if policy == "eager" or (policy == "lazy" and ite.plpi not in self.dirty):
            return []
        self.dirty.discard(ite.plpi)
        return [cmds.event_cmd(cmds.INV, device.info.pdevid, c.eventid)]

    def _v_invall(self, vits: Vits, c: ItsCommand) -> list[ItsCommand]:
        if c.icid not in vits.collections:
            raise Dropped("INVALL_UNMAPPED_COLLECTION")
        policy = self.options.elision
        if policy == "eager":
            return []
        mine = [ite.plpi for ite in vits.ites.values() if ite.icid == c.icid]
        if policy == "lazy":
            dirty = [lpi for lpi in mine if lpi in self.dirty]
            if not dirty:
                return []
            self.dirty.difference_update(dirty)
        else:
            self.dirty.difference_update(mine)
        return [cmds.invall(self._pcoll(vits, c.icid))]

    def _v_sync(self, vits: Vits, c: ItsCommand) -> list[ItsCommand]:
        dom = self._dom(vits)
        if c.target >= dom.vcpus:
            raise Dropped("SYNC_TARGET_OOR")
        target = dom.pin[c.target]
        if self.options.elision != "off" and self.pits[vits.pits].last_forwarded_sync == target:
            return []
        return [cmds.sync(target)]

    def _v_movall(self, vits: Vits, c: ItsCommand) -> list[ItsCommand]:
        dom = self._dom(vits)
        if c.target >= dom.vcpus or c.target2 >= dom.vcpus:
            raise Dropped("MOVALL_PROCNUM_OOR")
        state = self.pits[vits.pits]
        for (vdevid, event), ite in vits.ites.items():
            if self._target_vcpu(vits, ite) == c.target:
                ite.vcpu_override = c.target2
                if dom.pin[c.target2] != dom.pin[c.target]:
                    pdevid = vits.devices[vdevid].info.pdevid
                    state.xen_queue.append(
                        (cmds.event_cmd(cmds.MOVI, pdevid, event, dom.pin[c.target2]), ite.plpi, None)
                    )
        return []

    def _target_vcpu(self, vits: Vits, ite: Ite) -> int | None:
        return ite.vcpu_override if ite.vcpu_override is not None else vits.collections.get(ite.icid)

    def _unbind(self, vits: Vits, key: tuple[int, int]) -> None:
        self._dom(vits).held.discard((vits.pits, key))
        self._forget_binding(vits.domid, vits.ites.pop(key))

    def _forget_binding(self, domid: int, ite: Ite) -> None:
        self.bindings.pop(ite.plpi, None)
        self.dirty.discard(ite.plpi)
        plpis = self.by_vlpi.get((domid, ite.vlpi))
        if plpis is not None:
            plpis.discard(ite.plpi)
            if not plpis:
                del self.by_vlpi[(domid, ite.vlpi)]

    # -- the guest's LPI configuration table ------------------------------------------------------------
    def config_written(self, domid: int, vlpi: int, value: int) -> None:
        """A trapped write to the guest's configuration table: copy the enable bit (eager: queue INVs)."""
        for plpi in sorted(self.by_vlpi.get((domid, vlpi), ())):
            _owner, pits, key = self.bindings[plpi]
            vits = self.domains[domid].vits[pits]
            self.prop[plpi - LPI_BASE] = XEN_PRIORITY | (value & ENABLED)
            self.dirty.add(plpi)
            if self.options.elision == "eager":
                state = self.pits[pits]
                pdevid = vits.devices[key[0]].info.pdevid
                inv = (cmds.event_cmd(cmds.INV, pdevid, key[1]), plpi, None)
                if inv not in state.xen_queue:
                    state.xen_queue.append(inv)
                self.dirty.discard(plpi)
                self.raised.add(pits)

    # -- time and delivery -----------------------------------------------------------------------------
    def advance(self, seconds: float) -> None:
        for state in self.pits:
            state.hw.advance(seconds)

    def deliver(self) -> list[Delivery]:
        """Take what the pITSs made deliverable: Xen's completion INTs raise passes; guests' LPIs
        are delivered once each (again only after the guest ends it)."""
        out: list[Delivery] = []
        for state in self.pits:
            for _cpu, plpi in state.hw.deliverable():
                state.hw.acknowledge(plpi)
                if plpi == LPI_BASE + state.hw.index:
                    state.xen_int_outstanding = False
                    self.raised.add(state.hw.index)
                    continue
                binding = self.bindings.get(plpi)
                if binding is not None:
                    domid, pits, key = binding
                    self._inject(self.domains[domid].vits[pits], key, out)
        self.deliveries += out
        return out

    def _inject(self, vits: Vits, key: tuple[int, int], out: list[Delivery]) -> None:
        """An LPI of this mapping fired: to its vCPU, or kept while its collection is unmapped."""
        dom = self.domains[vits.domid]
        ite = vits.ites[key]
        vcpu = self._target_vcpu(vits, ite)
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
        dom = self.domains[domid]
        token = (vcpu, intid)
        dom.in_service.discard(token)
        if token in dom.again:
            dom.again.discard(token)
            dom.in_service.add(token)
            delivery = Delivery(domid, vcpu, intid)
            self.deliveries.append(delivery)
            return delivery
        return None


def _register(offset: int, size: int) -> tuple[int | None, str]:
    """The register an access names and which part of it: ``full``, ``low`` or ``high``."""
    wide = {0x8, 0x80, 0x88, 0x90} | set(range(0x100, 0x140, 8))
    narrow = {0x0, 0x4, 0xFFE8}
    if size == 4 and offset in narrow:
        return offset, "full"
    if size == 8 and offset in wide:
        return offset, "full"
    if size == 4 and offset in wide:
        return offset, "low"
    if size == 4 and offset - 4 in wide:
        return offset - 4, "high"
    return None, ""


def _redist_register(offset: int, size: int) -> tuple[int | None, str]:
    if size == 4 and offset in (0x0, 0xFFE8):
        return offset, "full"
    for reg in (0x8, 0x70, 0x78):
        if size == 8 and offset == reg:
            return reg, "full"
        if size == 4 and offset in (reg, reg + 4):
            return reg, "low" if offset == reg else "high"
    return None, ""


def _merge(old: int, part: str, value: int) -> int:
    if part == "low":
        return (old & ~0xFFFFFFFF) | (value & 0xFFFFFFFF)
    if part == "high":
        return (old & 0xFFFFFFFF) | ((value & 0xFFFFFFFF) << 32)
    return value & U64


def _typer() -> int:
    """Physical LPIs, 8-byte ITT entries, 16 EventID and 16 DeviceID bits, PTA = 0, CIL = 0."""
    return 1 | (7 << 4) | (15 << 8) | (15 << 13)


def audit_its(its: ItsHost) -> list[str]:
    """The invariants at the end of vits-semantics.md."""
    problems: list[str] = []
    for state in its.pits:
        hw = state.hw
        slot = state.last_creadr  # slots the hardware ran since the last pass are still owned
        owned = 0
        while slot != hw.cwriter:
            if slot not in state.owner:
                problems.append(f"pITS {hw.index}: slot {slot} between CREADR and CWRITER has no owner")
            owned += 1
            slot = (slot + 1) % hw.slots
        if len(state.owner) != owned:
            problems.append(f"pITS {hw.index}: {len(state.owner)} slots owned, {owned} in use")
        xen_ints = sum(
            1
            for s, o in state.owner.items()
            if o is None and (placed := hw.ring[s]) is not None and placed.cmd == cmds.INT
        )
        if xen_ints > 1:
            problems.append(f"pITS {hw.index}: {xen_ints} Xen completion INTs outstanding")
        if not hw.queued():
            for lpi, cached in hw.cache.items():
                if lpi not in its.dirty and cached != its.prop[lpi - LPI_BASE]:
                    problems.append(f"pITS {hw.index}: idle, yet LPI {lpi} cached {cached:#x} is not the table's")
    seen: dict[int, tuple[int, int, tuple[int, int]]] = {}
    for domid, dom in its.domains.items():
        for pits, vits in dom.vits.items():
            size = vits.queue_bytes
            if size:
                ring = ((vits.progress - vits.creadr) % size, (vits.cwriter - vits.creadr) % size)
                if ring[0] > ring[1]:
                    problems.append(f"d{domid} vITS {pits}: creadr <= progress <= cwriter broken")
            in_flight = {t.slot for t in vits.taken if t.slot is not None and not t.done}
            owners = {s for s, o in its.pits[pits].owner.items() if o is vits}
            if not in_flight <= owners:
                problems.append(f"d{domid} vITS {pits}: commands in flight on slots it does not own")
            for key, ite in vits.ites.items():
                if ite.plpi in seen:
                    problems.append(f"d{domid}: physical LPI {ite.plpi} bound twice")
                seen[ite.plpi] = (domid, pits, key)
                if its.bindings.get(ite.plpi) != (domid, pits, key):
                    problems.append(f"d{domid}: mapping {key} not bound to its physical LPI {ite.plpi}")
    for plpi in its.bindings:
        if plpi not in seen:
            problems.append(f"physical LPI {plpi} bound to no mapping")
    indexed = {(d, v): set(p) for (d, v), p in its.by_vlpi.items()}
    expected: dict[tuple[int, int], set[int]] = {}
    for plpi, (domid, pits, key) in seen.items():
        expected.setdefault((domid, its.domains[domid].vits[pits].ites[key].vlpi), set()).add(plpi)
    if indexed != expected:
        problems.append("the vLPI index disagrees with the bindings")
    return problems
