"""The vITS's fidelity rules over the real daemon, written as a guest ITS driver's author would
(kvm-unit-tests' ``arm/gic.c`` style): what the guest writes, and what it must then see.

One daemon per module; each test makes its own domain and device and destroys it at the end.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conformance.beds import DaemonProcess
from xenemu.abi import its_cmd as c
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


def bring_up(d: Driver, events: int = 2, size: int = 2) -> list[int]:
    """Linux's order: a collection per vCPU, MAPD, then MAPTI of each event into collection 0
    (its LPI enabled in the configuration table first, so MAPTI takes it): the vLPIs."""
    vlpis = [LPI + 32 + e for e in range(events)]
    for vlpi in vlpis:
        d.enable(vlpi)
    d.run(c.mapc(0, 0), c.sync(0), c.mapc(1, 1), c.sync(1), c.mapd(d.vdev, size, ITT_GFN * PAGE))
    d.run(*[c.mapti(d.vdev, e, vlpi, 0) for e, vlpi in enumerate(vlpis)], c.sync(0))
    return vlpis


def in_service_and_pending(d: Driver, vlpi: int) -> None:
    d.msi(vlpi - LPI - 32)
    assert d.lpi() == (0, vlpi)
    d.msi(vlpi - LPI - 32)  # again, before the guest ends it: pending
    assert d.lpi(timeout=0.3) is None


# -- 1. a pending LPI's state lives with its mapping ---------------------------------------------
def test_movi_moves_a_pending_lpi_to_the_new_vcpu(driver: Driver) -> None:
    (vlpi, _) = bring_up(driver)
    in_service_and_pending(driver, vlpi)
    driver.run(c.event_cmd(c.MOVI, driver.vdev, 0, 1), c.sync(1))
    assert driver.lpi() == (1, vlpi)  # once, on the new vCPU
    driver.xc.its_end(0, vlpi)
    driver.xc.its_end(1, vlpi)
    assert driver.lpi(timeout=0.3) is None


@pytest.mark.parametrize("command", [c.CLEAR, c.DISCARD])
def test_clear_and_discard_end_a_pending_lpi(driver: Driver, command: int) -> None:
    (vlpi, _) = bring_up(driver)
    in_service_and_pending(driver, vlpi)
    driver.run(c.event_cmd(command, driver.vdev, 0), c.sync(0))
    driver.xc.its_end(0, vlpi)
    assert driver.lpi(timeout=0.3) is None  # not delivered again, on either vCPU
    assert driver.dropped() == {}


# -- 2. the pending table sets or clears pending state; it does not deliver -----------------------
def reenable(d: Driver, vcpu: int, bits: dict[int, bool]) -> None:
    d.redist(vcpu, 0x0, 4, 0)
    table = bytearray(PAGE)
    for vlpi, on in bits.items():
        table[vlpi // 8] |= on << vlpi % 8
    d.xc.guest_write(PEND_GFN + 4 * vcpu, bytes(table))
    d.redist(vcpu, 0x78, 8, (PEND_GFN + 4 * vcpu) * PAGE)  # PTZ = 0: the table is read
    d.redist(vcpu, 0x0, 4, 1)


def test_pending_table_set_bits_are_pending_and_delivered_once(driver: Driver) -> None:
    first, second = bring_up(driver)
    driver.enable(second, False)
    driver.run(c.event_cmd(c.INV, driver.vdev, 1), c.sync(0))
    reenable(driver, 0, {first: True, second: True})
    assert driver.lpi() == (0, first)
    assert driver.lpi(timeout=0.3) is None  # the disabled one stays pending
    driver.xc.its_end(0, first)
    driver.enable(second)
    assert driver.lpi(timeout=0.3) is None  # not seen until invalidated
    driver.run(c.event_cmd(c.INV, driver.vdev, 1), c.sync(0))
    assert driver.lpi() == (0, second)
    driver.xc.its_end(0, second)
    assert driver.lpi(timeout=0.3) is None  # once each


def test_pending_table_clear_bits_clear_pending_state(driver: Driver) -> None:
    (_, vlpi) = bring_up(driver)
    driver.enable(vlpi, False)
    driver.run(c.event_cmd(c.INV, driver.vdev, 1), c.event_cmd(c.INT, driver.vdev, 1), c.sync(0))
    reenable(driver, 0, {vlpi: False})
    driver.enable(vlpi)
    driver.run(c.event_cmd(c.INV, driver.vdev, 1), c.sync(0))
    assert driver.lpi(timeout=0.3) is None  # the table said: not pending


# -- 3. a dropped command has no effect -----------------------------------------------------------
def test_a_refused_mapd_leaves_the_device_mapped(driver: Driver) -> None:
    (vlpi, _) = bring_up(driver)
    driver.run(c.mapd(driver.vdev, 16, ITT_GFN * PAGE), c.sync(0))  # Size + 1 = 17 > 16: refused
    assert driver.dropped() == {"MAPD_ITTSIZE_OOR": 1}
    driver.msi(0)
    assert driver.lpi() == (0, vlpi)  # its mappings, Xen's and the pITS's, are as they were


# -- 4. Linux's first device gets its MSIs --------------------------------------------------------
def test_linux_sized_itt_for_a_4_event_device(daemon: tuple[DaemonProcess, SyncControlClient]) -> None:
    proc, ctl = daemon
    d = Driver(ctl, proc, next(DEVIDS), events=4)
    try:
        vlpis = bring_up(d, events=4, size=4)  # Linux: at least 32 events, Size = ilog2(32) - 1
        d.run(c.mapti(d.vdev, 4, LPI + 40, 0), c.sync(0))  # beyond the device's events
        assert d.dropped() == {"MAPTI_ID_OOR": 1}
        d.msi(3)
        assert d.lpi() == (0, vlpis[3])
    finally:
        d.close()


# -- 5. an LPI fired while its collection is unmapped is dropped -----------------------------------
def test_an_lpi_of_an_unmapped_collection_is_dropped(driver: Driver) -> None:
    driver.enable(LPI + 50)
    driver.run(c.mapd(driver.vdev, 2, ITT_GFN * PAGE), c.mapti(driver.vdev, 0, LPI + 50, 1), c.sync(0))
    driver.run(c.event_cmd(c.INT, driver.vdev, 0), c.sync(0))
    assert driver.dropped() == {"INT_UNMAPPED_INTERRUPT": 1}
    driver.msi(0)
    assert driver.lpi(timeout=0.3) is None
    driver.run(c.mapc(1, 1), c.sync(1))
    assert driver.lpi(timeout=0.3) is None  # not held: nothing comes when the collection is mapped
    driver.msi(0)
    assert driver.lpi() == (1, LPI + 50)


# -- 7. KVM's checks ----------------------------------------------------------------------------
def test_kvms_movi_and_mapti_checks(driver: Driver) -> None:
    for vcpu in range(2):
        driver.redist(vcpu, 0x0, 4, 0)
        driver.redist(vcpu, 0x70, 8, PROP_GFN * PAGE | 16)  # IDbits field 16: still 16 bits
        driver.redist(vcpu, 0x0, 4, 1)
    driver.run(c.mapc(0, 0), c.mapd(driver.vdev, 2, ITT_GFN * PAGE))
    driver.run(c.mapti(driver.vdev, 0, 70_000, 0), c.mapti(driver.vdev, 1, LPI + 60, 1), c.sync(0))
    driver.run(c.event_cmd(c.MOVI, driver.vdev, 1, 0), c.sync(0))  # its collection 1 is unmapped
    assert driver.dropped() == {"MAPTI_PHYSICALID_OOR": 1, "MOVI_UNMAPPED_COLLECTION": 1}


# -- 8. the reported address map has no overlaps --------------------------------------------------
def test_the_reported_map_has_no_overlaps_and_does_not_move(tmp_path: Path) -> None:
    proc = DaemonProcess(tmp_path, "--frames", "16384", "--dom0-memory", "512", "--its-pits", "3")
    try:
        with SyncControlClient.connect(proc.control_path) as ctl:
            reply = ctl.create_domain("hvm", 4096, vcpus=64)
            domid = reply["domid"]
            ctl.assign_device(domid, "00:01.0", its_devid=0x31, its_events=4, pits=2)
            with SyncHypercallClient.connect(proc.hypercall_path, reply["token"]) as xc:
                first = xc.domain_info()["its"]
                ctl.assign_device(domid, "00:02.0", its_devid=0x30, its_events=4, pits=0)
                info = xc.domain_info()
                its = info["its"]
                assert its["frames"]["2"] == first["frames"]["2"] and its["redist_base"] == first["redist_base"]
                spans = [(0, info["pages"] * PAGE, "RAM")]
                spans += [(gpa, gpa + 0x20000, f"vITS {p}") for p, gpa in its["frames"].items()]
                spans += [
                    (its["redist_base"] + v * 0x20000, its["redist_base"] + (v + 1) * 0x20000, f"GICR {v}")
                    for v in range(its["vcpus"])
                ]
                spans.sort()
                for (_, end, name), (start, _, other) in itertools.pairwise(spans):
                    assert end <= start, f"{name} overlaps {other}"
                assert ctl.its_info(domid)["its_frames"] == its["frames"]
                # the device behind pITS 2 reaches the guest through the frame reported for it
                its_frame = its["frames"]["2"]
                xc.its_mmio("its", 2, 0x80, 8, 1 << 63 | QUEUE_GFN * PAGE)
                for reg in (0x100, 0x108):
                    xc.its_mmio("its", 2, reg, 8, 1 << 63)
                xc.its_mmio("redist", 5, 0x70, 8, PROP_GFN * PAGE | 15)
                xc.its_mmio("redist", 5, 0x0, 4, 1)
                xc.its_mmio("its", 2, 0x0, 4, 1)
                xc.guest_write(PROP_GFN, bytes([0xA3]), 40)
                vdev = ctl.its_info(domid)["devices"][0]["vdevid"]
                commands = [c.mapc(0, 5), c.mapd(vdev, 1, ITT_GFN * PAGE), c.mapti(vdev, 3, LPI + 40, 0), c.sync(5)]
                for i, command in enumerate(commands):
                    xc.guest_write(QUEUE_GFN, command.encode(), i * 32)
                xc.its_mmio("its", 2, 0x88, 8, len(commands) * 32)
                deadline = time.monotonic() + 10
                while xc.its_mmio("its", 2, 0x90, 8) != len(commands) * 32:
                    assert time.monotonic() < deadline
                assert xc.device_dma("00:01.0", its_frame + 0x10040, (3).to_bytes(4, "little"))["ok"]
                assert xc.next_event(timeout=10) == {"event": "lpi", "vcpu": 5, "intid": LPI + 40}
            assert ctl.audit() == []
    finally:
        proc.stop()


# -- extras: what a reviewer found ---------------------------------------------------------------
def test_physical_lpis_come_back_when_a_domain_is_destroyed(daemon: tuple[DaemonProcess, SyncControlClient]) -> None:
    """Fifteen assign + destroy cycles of a 4,096-event device used to exhaust the LPIs."""
    _, ctl = daemon
    devid = next(DEVIDS)
    for cycle in range(20):
        domid = ctl.create_domain("hvm", 8)["domid"]
        deadline = time.monotonic() + 10
        while True:  # its DeviceID is assignable again once the last teardown has completed
            try:
                ctl.assign_device(domid, "00:1e.0", its_devid=devid, its_events=4096)
                break
            except Exception as exc:
                assert "torn down" in str(exc) and time.monotonic() < deadline, (cycle, exc)
                time.sleep(0.01)
        ctl.destroy_domain(domid)
    assert ctl.audit() == []
