"""The vITS's fidelity rules over the real daemon, written as a guest ITS driver's author would
(kvm-unit-tests' ``arm/gic.c`` style): what the guest writes, and what it must then see.

One daemon per module; each test makes its own domain and device and destroys it at the end.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conformance.beds import DaemonProcess
from xenemu.abi.its_cmd import ItsCommand
from xenemu.client import SyncControlClient, SyncHypercallClient

LPI = 8192
PAGE = 4096
QUEUE_GFN, PROP_GFN, PEND_GFN, ITT_GFN = 16, 20, 24, 30  # the queue 64 KiB aligned


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DaemonProcess, SyncControlClient]]:
    proc = DaemonProcess(tmp_path_factory.mktemp("fidelity"), "--frames", "16384", "--dom0-memory", "512")
    try:
        with SyncControlClient.connect(proc.control_path) as ctl:
            yield proc, ctl
    finally:
        proc.stop()


class Driver:
    """A guest's ITS driver over the wire: tables, a one-page queue, LPIs enabled per vCPU."""

    def __init__(self, ctl: SyncControlClient, daemon: DaemonProcess, devid: int, events: int = 8, vcpus: int = 2):
        reply = ctl.create_domain("hvm", 64, vcpus=vcpus)
        self.ctl, self.domid, self.vcpus = ctl, reply["domid"], vcpus
        self.bdf = f"{devid % 256:02x}:{devid // 256 % 32:02x}.0"
        self.vdev = ctl.assign_device(self.domid, self.bdf, its_devid=devid, its_events=events)["vdevid"]
        self.xc = SyncHypercallClient.connect(daemon.hypercall_path, reply["token"])
        self.offset = 0
        self.its(0x80, 8, 1 << 63 | QUEUE_GFN * PAGE)
        self.its(0x100, 8, 1 << 63)
        self.its(0x108, 8, 1 << 63)
        for vcpu in range(vcpus):
            self.xc.its_mmio("redist", vcpu, 0x70, 8, PROP_GFN * PAGE | 15)  # 16 ID bits
            self.xc.its_mmio("redist", vcpu, 0x0, 4, 1)
        self.its(0x0, 4, 1)

    def its(self, offset: int, size: int, value: int | None = None) -> Any:
        return self.xc.its_mmio("its", 0, offset, size, value)

    def redist(self, vcpu: int, offset: int, size: int, value: int | None = None) -> Any:
        return self.xc.its_mmio("redist", vcpu, offset, size, value)

    def run(self, *commands: ItsCommand) -> None:
        """Write the commands at CWRITER, move it, and poll CREADR until they are done."""
        for command in commands:
            self.xc.guest_write(QUEUE_GFN, command.encode(), self.offset % PAGE)
            self.offset += 32
        self.its(0x88, 8, self.offset % PAGE)
        deadline = time.monotonic() + 10
        while self.its(0x90, 8) != self.offset % PAGE:
            assert time.monotonic() < deadline, "the queue stalled"

    def enable(self, intid: int, on: bool = True) -> None:
        self.xc.guest_write(PROP_GFN, bytes([0xA2 | int(on)]), intid - LPI)

    def msi(self, event: int) -> None:
        doorbell = self.ctl.its_info(self.domid)["its_frames"]["0"] + 0x10040
        assert self.xc.device_dma(self.bdf, doorbell, event.to_bytes(4, "little"))["ok"]

    def lpi(self, timeout: float = 10) -> tuple[int, int] | None:
        """The next LPI the guest takes, as (vCPU, INTID), or None if none comes in ``timeout``."""
        event = self.xc.next_event(timeout=timeout)
        if event is None:
            return None
        assert event["event"] == "lpi", event
        return event["vcpu"], event["intid"]

    def dropped(self) -> dict[str, int]:
        counts: dict[str, int] = self.ctl.its_info(self.domid)["vits"]["0"]["dropped"]
        return counts

    def close(self) -> None:
        self.xc.close()
        self.ctl.destroy_domain(self.domid)
        assert self.ctl.audit() == []


DEVIDS = itertools.count(0x201)


@pytest.fixture
def driver(daemon: tuple[DaemonProcess, SyncControlClient]) -> Iterator[Driver]:
    proc, ctl = daemon
    guest = Driver(ctl, proc, next(DEVIDS))
    try:
        yield guest
    finally:
        guest.close()


# -- 6. registers keep their fixed fields ---------------------------------------------------------
def test_registers_keep_their_fixed_fields(driver: Driver) -> None:
    driver.its(0x0, 4, 0)  # disabled: BASERs and CBASER take writes
    driver.its(0x100, 8, 1 << 63 | 1 << 8 | 0x50000)  # a 16 KiB Page_Size, Type 0, Entry_Size 0
    assert driver.its(0x100, 8) == 1 << 63 | 1 << 56 | 7 << 48 | 2 << 8 | 0x50000
    driver.its(0x108, 8, 1 << 63 | 1 << 62 | 0x60000)  # Indirect: RAZ/WI
    assert driver.its(0x108, 8) == 1 << 63 | 4 << 56 | 7 << 48 | 2 << 8 | 0x60000
    driver.its(0x80, 8, 1 << 63 | 0x1A000 | 1)
    assert driver.its(0x80, 8) == 1 << 63 | 0x10000 | 1  # address bits 15:12 cleared
    ids = {0xFFD0: 0x40, 0xFFE0: 0x92, 0xFFE4: 0xB4, 0xFFE8: 0x3B, 0xFFF0: 0x0D, 0xFFF4: 0xF0, 0xFFF8: 0x05}
    for offset, value in (ids | {0xFFFC: 0xB1}).items():
        assert driver.its(offset, 4) == value, hex(offset)
    driver.its(0x80, 8, 1 << 63 | QUEUE_GFN * PAGE)
    driver.its(0x0, 4, 1)
    assert driver.its(0x0, 4) == 1 | 1 << 31
