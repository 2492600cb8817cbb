"""The virtual GICv3 ITS of draft C, as a guest driver sees it (vits-semantics.md; PROTOCOL.md
7.4 and 12.7): registers by trapped MMIO, the command queue in guest RAM, LPIs as events."""

from __future__ import annotations

import time
from collections.abc import Callable

from xenemu.abi import its_cmd as c
from xenemu.abi import pv_iommu as ops
from xenemu.abi.its_cmd import ItsCommand
from xenemu.conformance.rules import rule
from xenemu.conformance.target import Target

S = "12.7"
LPI = 8192
QUEUE_GFN, PROP_GFN, ITT_GFN = 16, 20, 30  # the queue 64 KiB aligned: CBASER clears bits 15:12
GITS_CTLR, GITS_IIDR, GITS_CBASER, GITS_CWRITER, GITS_CREADR = 0x0, 0x4, 0x80, 0x88, 0x90
GITS_BASER0, GITS_BASER1 = 0x100, 0x108
GICR_CTLR, GICR_PROPBASER = 0x0, 0x70
KVM_IIDR = 0x5800043B
#: How long the queue may take to drain (at 2,000,000 commands/s it takes microseconds).
DRAIN_SECONDS = 5.0


class ItsGuest:
    """An HVM guest with two vCPUs and one MSI-capable device, its vITS enabled as Linux does."""

    def __init__(self, t: Target, events: int = 8, enable: bool = True) -> None:
        self.t = t
        reply = t.domain("hvm", 64, vcpus=2)
        self.domid = reply["domid"]
        self.bdf = f"{0x80 + self.domid % 0x80:02x}:1e.0"
        devid = 0x2000 + self.domid % 0x2000  # a destroyed guest's DeviceID stays busy a while
        self.vdev = t.control.assign_device(self.domid, self.bdf, its_devid=devid, its_events=events)["vdevid"]
        self.xc = t.client(self.domid)
        self.doorbell = t.control.its_info(self.domid)["its_frames"]["0"] + 0x10040
        self.offset = 0
        if enable:
            self.mmio(GITS_CBASER, 1 << 63 | QUEUE_GFN << 12)
            self.mmio(GITS_BASER0, 1 << 63)
            self.mmio(GITS_BASER1, 1 << 63)
            for vcpu in range(2):
                self.xc.its_mmio("redist", vcpu, GICR_PROPBASER, 8, PROP_GFN << 12 | 15)
                self.xc.its_mmio("redist", vcpu, GICR_CTLR, 4, 1)
            self.mmio(GITS_CTLR, 1, 4)

    def mmio(self, offset: int, value: int | None = None, size: int = 8) -> int:
        if value is not None:
            self.xc.its_mmio("its", 0, offset, size, value)
            return value
        return int(self.xc.its_read("its", 0, offset, size))

    def run(self, *commands: ItsCommand) -> None:
        """Queue the commands, write CWRITER, and poll CREADR until it reaches it."""
        for command in commands:
            self.xc.guest_write(QUEUE_GFN, command.encode(), self.offset)
            self.offset += 32
        self.mmio(GITS_CWRITER, self.offset, 4)
        deadline = time.monotonic() + DRAIN_SECONDS
        while (creadr := self.mmio(GITS_CREADR, size=4)) != self.offset:
            assert time.monotonic() < deadline, f"the queue stalled: CREADR {creadr:#x}, CWRITER {self.offset:#x}"

    def fire(self, event: int) -> None:
        dma = self.xc.device_dma(self.bdf, self.doorbell, event.to_bytes(4, "little"))
        assert dma["ok"], f"the doorbell write faulted: {dma}"

    def enable(self, intid: int) -> None:
        self.xc.guest_write(PROP_GFN, bytes([0xA1]), intid - LPI)  # priority 0xA0, enabled

    def next_lpi(self, timeout: float = 5.0) -> dict[str, object] | None:
        event = self.xc.next_event(timeout=timeout)
        return None if event is None else dict(event)


@rule("ITS-BRINGUP", S, "a guest brings up its vITS as Linux does; a device's MSI becomes one lpi event on its vCPU")
def bringup(t: Target) -> None:
    g = ItsGuest(t, events=4)
    assert g.mmio(GITS_IIDR, size=4) == KVM_IIDR
    commands = [c.mapc(0, 0), c.mapc(1, 1), c.invall(0), c.sync(0), c.mapd(g.vdev, 1, ITT_GFN << 12)]
    commands += [cmd for e in range(4) for cmd in (c.mapti(g.vdev, e, LPI + 64 + e, e % 2), c.sync(e % 2))]
    g.xc.guest_write(PROP_GFN, bytes([0xA3] * 4), 64)  # trapped: the enable bits reach the pITS
    g.run(*commands)
    g.fire(3)
    assert g.next_lpi() == {"event": "lpi", "vcpu": 1, "intid": LPI + 67}
    g.xc.its_end(1, LPI + 67)
    g.fire(0)
    assert g.next_lpi() == {"event": "lpi", "vcpu": 0, "intid": LPI + 64}
    g.xc.its_end(0, LPI + 64)
    counters = t.control.its_info(g.domid)["vits"]["0"]
    assert counters["received"]["MAPTI"] == 4 and not counters["dropped"], f"{counters}"


@rule("ITS-DOORBELL", S, "the doorbell page in the device's IOMMU context can be neither mapped over nor unmapped")
def doorbell(t: Target) -> None:
    g = ItsGuest(t, enable=False)
    got = g.xc.iommu_op([ops.map_page(g.doorbell >> 12, 1), ops.unmap_page(g.doorbell >> 12)])
    assert ops.statuses(got) == ["-EACCES", "-EACCES"]


ERRORS: list[tuple[Callable[[int], ItsCommand], str]] = [
    (lambda v: c.mapd(v + 9, 1, ITT_GFN << 12), "MAPD_DEVICE_OOR"),
    (lambda v: c.mapd(v, 16, ITT_GFN << 12), "MAPD_ITTSIZE_OOR"),  # Size + 1 > 16 EventID bits
    (lambda v: c.mapc(0, 2), "MAPC_PROCNUM_OOR"),
    (lambda v: c.mapc(3, 1), "MAPC_COLLECTION_OOR"),
    (lambda v: c.mapti(v, 0, LPI, 0), "MAPTI_UNMAPPED_DEVICE"),
    (lambda v: c.event_cmd(c.INT, v, 0), "INT_UNMAPPED_INTERRUPT"),
    (lambda v: c.event_cmd(c.CLEAR, v, 0), "CLEAR_UNMAPPED_INTERRUPT"),
    (lambda v: c.event_cmd(c.INV, v, 0), "INV_UNMAPPED_INTERRUPT"),
    (lambda v: c.event_cmd(c.DISCARD, v, 0), "DISCARD_UNMAPPED_INTERRUPT"),
    (lambda v: c.event_cmd(c.MOVI, v, 0, 0), "MOVI_UNMAPPED_INTERRUPT"),
    (lambda v: c.invall(1), "INVALL_UNMAPPED_COLLECTION"),
    (lambda v: c.sync(2), "SYNC_TARGET_OOR"),
    (lambda v: c.movall(0, 5), "MOVALL_PROCNUM_OOR"),
    (lambda v: ItsCommand(0x33), "UNKNOWN_COMMAND"),
]


@rule("ITS-ERRORS", S, "each command KVM refuses is dropped with its E_ITS error, and the queue moves on")
def errors(t: Target) -> None:
    g = ItsGuest(t)
    for make, _ in ERRORS:
        g.run(make(g.vdev), c.sync(0))
    dropped = t.control.its_info(g.domid)["vits"]["0"]["dropped"]
    assert dropped == {name: 1 for _, name in ERRORS}, f"dropped {dropped}"


@rule(
    "ITS-REGISTERS", S, "register rules: enable needs CBASER and BASERs valid, read-only and RAZ/WI registers, widths"
)
def registers(t: Target) -> None:
    g = ItsGuest(t, enable=False)
    xc = g.xc
    g.mmio(GITS_CTLR, 1, 4)
    assert g.mmio(GITS_CTLR, size=4) & 1 == 0, "enabled without a valid CBASER and BASERs"
    g.mmio(GITS_CBASER, QUEUE_GFN << 12, 4)  # 32-bit halves of a 64-bit register
    g.mmio(GITS_CBASER + 4, 1 << 31, 4)
    assert g.mmio(GITS_CBASER) == 1 << 63 | QUEUE_GFN << 12
    g.mmio(GITS_BASER0, 1 << 63)
    g.mmio(GITS_BASER1, 1 << 63)
    g.mmio(0x110, 1 << 63)  # other BASERs: RAZ/WI
    assert g.mmio(0x110) == 0
    g.mmio(GITS_CTLR, 1, 4)
    assert g.mmio(GITS_CTLR, size=4) == 1 | 1 << 31, "not enabled and quiescent"
    g.mmio(GITS_CBASER, 0)  # ignored while enabled
    assert g.mmio(GITS_CBASER) == 1 << 63 | QUEUE_GFN << 12
    g.mmio(GITS_CWRITER, 4096)  # at the queue size: ignored
    g.mmio(GITS_CREADR, 64)  # CREADR, TYPER, IIDR: read-only
    g.mmio(GITS_IIDR, 0, 4)
    assert g.mmio(GITS_CWRITER) == 0 and g.mmio(GITS_CREADR) == 0
    assert g.mmio(GITS_IIDR, size=4) == KVM_IIDR and g.mmio(0xFFE8, size=4) == 0x3B
    assert g.mmio(0x8) & 1, "TYPER.Physical"
    assert g.mmio(GITS_CTLR) == 0 and xc.its_read("its", 0, 0x2, 2) == 0, "bad widths must read 0"
    assert xc.its_read("redist", 1, 0x8, 8) & 0x10, "GICR_TYPER.Last on the last vCPU"
    assert xc.its_read("redist", 0, 0x8, 8) & 0x10 == 0


@rule("ITS-INT-DISABLED", S, "an INT of a disabled LPI stays pending; enabled and invalidated, it is delivered once")
def int_disabled(t: Target) -> None:
    g = ItsGuest(t)
    v = g.vdev
    g.run(c.mapc(0, 0), c.mapd(v, 1, ITT_GFN << 12), c.mapti(v, 1, LPI + 90, 0), c.event_cmd(c.INT, v, 1), c.sync(0))
    assert g.next_lpi(0.3) is None, "a disabled LPI was delivered"
    g.enable(LPI + 90)
    assert g.next_lpi(0.3) is None, "delivered before the pITS saw the change (no INV yet)"
    g.run(c.invall(0), c.sync(0))
    assert g.next_lpi() == {"event": "lpi", "vcpu": 0, "intid": LPI + 90}
    g.xc.its_end(0, LPI + 90)
    assert g.next_lpi(0.3) is None, "delivered twice"


@rule("ITS-IN-SERVICE", S, "an LPI is not delivered again until its_end; firing meanwhile coalesces into one more")
def in_service(t: Target) -> None:
    g = ItsGuest(t)
    v = g.vdev
    g.enable(LPI + 70)
    g.run(c.mapc(0, 0), c.mapd(v, 1, ITT_GFN << 12), c.mapti(v, 0, LPI + 70, 0), c.sync(0))
    g.fire(0)
    assert g.next_lpi() == {"event": "lpi", "vcpu": 0, "intid": LPI + 70}
    g.fire(0)
    g.fire(0)
    assert g.next_lpi(0.3) is None, "delivered again while in service"
    g.xc.its_end(0, LPI + 70)
    assert g.next_lpi() == {"event": "lpi", "vcpu": 0, "intid": LPI + 70}, "the pending LPI was lost at its end"
    g.xc.its_end(0, LPI + 70)
    assert g.next_lpi(0.3) is None, "two firings while in service gave more than one delivery"
