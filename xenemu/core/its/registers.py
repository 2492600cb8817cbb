"""What a guest sees: its vITSs' GITS_* registers, its redistributors' GICR_* registers, and
where those frames and its LPI tables are.

A guest reaches these as trapped MMIO. ``GITS_CTLR`` enables a vITS (refused unless ``CBASER``
and both ``BASER``s are valid), ``CBASER`` and ``BASER``s are fixed while enabled, a ``CWRITER``
write is masked, checked and handed to the scheduler, and a ``CREADR`` or ``CTLR`` read with
commands outstanding runs a pass first. Per vCPU, ``GICR_CTLR.EnableLPIs`` going from 0 to 1
loads that vCPU's pending table (unless PTZ said it is zero), and ``PROPBASER``/``PENDBASER``
are fixed while it is set. Any other offset, width or alignment reads as zero and writes are
ignored, as are a dying domain's writes and any access to a vITS the domain does not have.

This is the only room that decodes register layouts and access widths; the rooms below it see
a vITS's fields, never an offset.
"""

from __future__ import annotations

from collections import deque

from xenemu.abi import const
from xenemu.core.its.schedule import CommandScheduler
from xenemu.core.its.state import CBASER_ADDR, LPI_BASE, ItsState, lpi_limit
from xenemu.core.memory.frames import PAGE_SIZE

OFFSET_MASK = const("GITS_CMDQ_OFFSET_MASK")
CBASER_VALID = const("GITS_CBASER_VALID")
#: What a CBASER write keeps: Valid, the address with bits 15:12 cleared, Size.
CBASER_KEPT = CBASER_VALID | const("GITS_CBASER_ADDR_64K_MASK") | const("GITS_CBASER_SIZE_MASK")
BASER_VALID = const("GITS_BASER_VALID")
#: BASER fields a write cannot change (Type, Entry_Size, Page_Size) or set (Indirect).
BASER_FIXED = (
    const("GITS_BASER_TYPE_MASK")
    | const("GITS_BASER_ESZ_MASK")
    | const("GITS_BASER_PAGE_SIZE_MASK")
    | const("GITS_BASER_INDIRECT")
)
#: The fixed part of BASER0 (device table) and BASER1 (collection table): Type, 8-byte entries,
#: 64 KiB pages.
BASER_FIXED_VALUES = tuple(
    kind << const("GITS_BASER_TYPE_SHIFT")
    | const("GITS_BASER_ESZ_VALUE") << const("GITS_BASER_ESZ_SHIFT")
    | const("GITS_BASER_PAGE_SIZE_64K") << const("GITS_BASER_PAGE_SIZE_SHIFT")
    for kind in (const("GITS_BASER_TYPE_DEVICE"), const("GITS_BASER_TYPE_COLLECTION"))
)
#: The ID registers, 32-bit and read-only, with KVM's values.
ID_REGISTERS = {
    const(f"GITS_{name}"): const(f"GITS_{name}_VALUE")
    for name in ("PIDR4", "PIDR0", "PIDR1", "PIDR2", "PIDR3", "CIDR0", "CIDR1", "CIDR2", "CIDR3")
}
U64 = (1 << 64) - 1
#: GICR_CTLR.RWP: a register write's effect (here: reading the pending table) still in progress.
RWP = 1 << 3
#: Machine frame of each pITS's translation frame (beyond any RAM): the doorbell page.
DOORBELL_MFN = 1 << 36
DOORBELL_OFFSET = const("GITS_TRANSLATER") & 0xFFF
#: An ITS frame (control, then translation) and a redistributor frame (RD_base, SGI_base).
FRAME_SIZE = const("GITS_FRAME_SIZE")
#: The interrupt controller's window starts on the first 1 GiB boundary at or above the host's
#: RAM: no guest's RAM (GFNs below its memory, itself below the host's frames) can reach it.
GIC_WINDOW_ALIGN = 1 << 30


class Registers:
    """Trapped accesses to a domain's ITS and redistributor frames."""

    def __init__(self, state: ItsState, scheduler: CommandScheduler) -> None:
        self.state = state
        self.scheduler = scheduler

    # -- where the frames and tables are --------------------------------------------------------
    def translation_gpa(self, domid: int, pits: int) -> int:
        """Where the guest sees the translation frame of its vITS for ``pits`` (doorbell page)."""
        return self.frames(domid)[0][pits] + FRAME_SIZE // 2

    def config_range(self, domid: int) -> tuple[int, int]:
        """The guest-physical range of its LPI configuration table (trapped)."""
        dom = self.state.domains[domid]
        base = dom.propbaser & CBASER_ADDR
        return base, base + max(0, lpi_limit(dom.propbaser) - LPI_BASE)

    def window(self) -> int:
        """The guest-physical base of every domain's interrupt controller frames."""
        ram = self.state.options.ram_frames * PAGE_SIZE
        return max(GIC_WINDOW_ALIGN, -(-ram // GIC_WINDOW_ALIGN) * GIC_WINDOW_ALIGN)

    def frames(self, domid: int) -> tuple[dict[int, int], int]:
        """Guest-physical base of each vITS the domain has (by pITS), and of its first
        redistributor. One slot per pITS of the host, by index, then one per vCPU: the same for
        the domain's whole life whatever order its devices come in, and no two overlap."""
        dom = self.state.domains[domid]
        base = self.window()
        gicr = base + len(self.state.pits) * FRAME_SIZE
        return {p: base + p * FRAME_SIZE for p in sorted(dom.vits)}, gicr

    # -- GITS_* ---------------------------------------------------------------------------------
    def mmio_write(self, domid: int, vits_pits: int, offset: int, size: int, value: int) -> None:
        dom = self.state.domains[domid]
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
                self.scheduler.schedule(vits)
            elif not want:
                vits.enabled = False
        elif reg == 0x80 and not vits.enabled:
            vits.cbaser = _merge(vits.cbaser, part, value) & CBASER_KEPT
            vits.cwriter = vits.creadr = vits.progress = 0
            # a batch of the old queue still on the pITS completes without moving CREADR, and
            # is this queue's one batch in flight until it has
            vits.orphans = vits.in_flight()
            vits.taken = deque()
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
                self.scheduler.schedule(vits)
        elif 0x100 <= reg <= 0x138 and not vits.enabled:
            index = (reg - 0x100) // 8
            if index < 2:  # the others are RAZ/WI
                written = _merge(vits.baser[index], part, value) & ~BASER_FIXED
                vits.baser[index] = written | BASER_FIXED_VALUES[index]

    def mmio_read(self, domid: int, vits_pits: int, offset: int, size: int) -> int:
        dom = self.state.domains[domid]
        vits = dom.vits.get(vits_pits)
        if vits is None or dom.dying:  # a dying domain's MMIO is ignored: no pass runs for it
            return 0
        reg, part = _register(offset, size)
        if reg is None:
            return 0
        if reg in (0x0, 0x90) and vits.creadr != vits.cwriter:
            self.scheduler.run_pass_now(vits.pits)
        values = {
            0x0: (int(vits.enabled) | (0x80000000 if vits.creadr == vits.cwriter else 0)),
            0x4: const("GITS_IIDR_VALUE"),
            0x8: _typer(),
            0x80: vits.cbaser,
            0x88: vits.cwriter,
            0x90: vits.creadr,
            0x100: vits.baser[0] | BASER_FIXED_VALUES[0],
            0x108: vits.baser[1] | BASER_FIXED_VALUES[1],
        }
        value = values.get(reg, ID_REGISTERS.get(reg, 0))
        return (value >> 32) if part == "high" else (value & 0xFFFFFFFF if part == "low" else value)

    # -- GICR_* ---------------------------------------------------------------------------------
    def redist_write(self, domid: int, vcpu: int, offset: int, size: int, value: int) -> None:
        """A vCPU's redistributor: EnableLPIs, and the LPI tables (fixed while LPIs are enabled)."""
        dom = self.state.domains[domid]
        if dom.dying or not 0 <= vcpu < dom.vcpus:
            return
        redist = dom.redists[vcpu]
        reg, part = _redist_register(offset, size)
        if reg == 0x0:
            enabling = bool(value & 1) and not redist.enable_lpis
            if not value & 1:
                self.scheduler.jobs.cancel_load(domid, vcpu)
            redist.enable_lpis = bool(value & 1)
            if enabling and not redist.ptz:
                # the pending table sets or clears the pending state of the vCPU's mapped LPIs
                # (without delivering, as KVM's pending_latch): read in slices (jobs.py); RWP
                # reads 1 until it has been, and the domain's vITSs take no commands meanwhile
                self.scheduler.jobs.start_load(domid, vcpu)
        elif reg == 0x70 and not redist.enable_lpis:
            dom.propbaser = _merge(dom.propbaser, part, value)
        elif reg == 0x78 and not redist.enable_lpis:
            written = _merge(redist.pendbaser, part, value)
            redist.ptz = bool(written & const("GICR_PENDBASER_PTZ"))
            redist.pendbaser = written & ~const("GICR_PENDBASER_PTZ")

    def redist_read(self, domid: int, vcpu: int, offset: int, size: int) -> int:
        dom = self.state.domains[domid]
        if dom.dying or not 0 <= vcpu < dom.vcpus:
            return 0
        redist = dom.redists[vcpu]
        reg, part = _redist_register(offset, size)
        typer = const("GICR_TYPER_PLPIS") | (vcpu << 8) | (const("GICR_TYPER_LAST") if vcpu == dom.vcpus - 1 else 0)
        values = {
            0x0: int(redist.enable_lpis) | (RWP if redist.load is not None else 0),
            0x8: typer | vcpu << 32,
            0x70: dom.propbaser,
            0x78: redist.pendbaser,
            0xFFE8: const("GITS_PIDR2_VALUE"),
        }
        value = values.get(reg, 0) if reg is not None else 0
        return (value >> 32) if part == "high" else (value & 0xFFFFFFFF if part == "low" else value)


def _register(offset: int, size: int) -> tuple[int | None, str]:
    """The register an access names and which part of it: ``full``, ``low`` or ``high``."""
    wide = {0x8, 0x80, 0x88, 0x90} | set(range(0x100, 0x140, 8))
    narrow = {0x0, 0x4} | set(ID_REGISTERS)
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
