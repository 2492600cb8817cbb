"""A Linux-like guest of the vITS core, and the helpers the ITS tests share."""

from __future__ import annotations

from xenemu.abi import its_cmd as c
from xenemu.abi.its_cmd import ItsCommand
from xenemu.core.host import Host
from xenemu.core.its import Delivery, ItsHost, audit_its
from xenemu.core.options import HostOptions

LPI = 8192
QUEUE_GFN, PROP_GFN, ITT_GFN = 16, 20, 30  # the queue 64 KiB aligned: CBASER clears bits 15:12
CBASER = 1 << 63 | QUEUE_GFN << 12 | 0  # one 4 KiB page: 128 commands
BASER = 1 << 63


class Guest:
    """A guest that programs its vITS like Linux's ITS driver."""

    def __init__(self, its: ItsHost, host: Host, vcpus: int = 2, devid: int = 0x10, events: int = 8) -> None:
        dom = host.create_domain("hvm", 64, vcpus=vcpus)
        self.domid, self.its, self.host = dom.domid, its, host
        its.assign(self.domid, devid, 0, events, vdevid=devid - 0x10)
        self.offset = 0
        for reg, value in ((0x80, CBASER), (0x100, BASER), (0x108, BASER)):
            its.mmio_write(self.domid, 0, reg, 8, value)
        for vcpu in range(vcpus):
            its.redist_write(self.domid, vcpu, 0x70, 8, PROP_GFN << 12 | 15)  # 16 ID bits
            its.redist_write(self.domid, vcpu, 0x0, 4, 1)
        its.mmio_write(self.domid, 0, 0x0, 4, 1)
        assert its.mmio_read(self.domid, 0, 0x0, 4) & 1

    def queue(self, *commands: ItsCommand | bytes) -> None:
        for command in commands:
            block = command if isinstance(command, bytes) else command.encode()
            self.host.memory.access(self.domid, QUEUE_GFN, self.offset % 4096, block)
            self.offset += 32
        self.its.mmio_write(self.domid, 0, 0x88, 8, self.offset % 4096)
        self.its.run_passes()

    def creadr(self) -> int:
        return self.its.mmio_read(self.domid, 0, 0x90, 8)

    def vits(self):  # type: ignore[no-untyped-def]
        return self.its.domains[self.domid].vits[0]

    def enable(self, vlpi: int, on: bool = True) -> None:
        value = 0xA0 | 2 | int(on)
        self.host.memory.access(self.domid, PROP_GFN, vlpi - LPI, bytes([value]))
        self.its.config_written(self.domid, vlpi, value)


def settle(its: ItsHost) -> list[Delivery]:
    """Run the hardware and Xen until nothing is left to do; the deliveries made meanwhile
    (from the pITSs, and those Xen makes itself, as a MOVI of a pending LPI does)."""
    first = len(its.deliveries)
    for _ in range(1000):
        its.run_passes()
        busy = False
        for state in its.pits:
            busy |= state.hw.step(10**6) > 0
        its.deliver()
        problems = audit_its(its)
        assert not problems, problems
        if not busy and not its.raised:
            return its.deliveries[first:]
    raise AssertionError("the vITS did not settle")


def its_host(elision: str = "lazy", slots: int = 64, batch: int = 4) -> tuple[Host, ItsHost]:
    host = Host(
        HostOptions(
            nr_frames=4096,
            dom0_memory=64,
            its_cpus=2,
            its_queue_slots=slots,
            vits_batch_size=batch,
            its_elision=elision,
        )
    )
    return host, host.its


def bring_up(g: Guest, events: int = 8, vcpu: int = 0) -> None:
    g.queue(c.mapc(0, vcpu), c.sync(vcpu), c.invall(0), c.sync(vcpu))
    g.queue(c.mapd(0, 2, ITT_GFN << 12))
    for e in range(events):
        g.queue(c.mapti(0, e, LPI + 32 + e, 0), c.sync(vcpu))
