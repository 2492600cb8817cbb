"""The vITS over the real daemon: a guest brings it up by trapped MMIO, a device raises MSIs."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conformance.beds import DaemonProcess
from xenemu.abi import its_cmd as c
from xenemu.abi import pv_iommu as ops
from xenemu.abi.its_cmd import ItsCommand
from xenemu.client import SyncControlClient, SyncHypercallClient
from xenemu.conformance.cases.its import ERRORS

LPI = 8192
QUEUE_GFN, PROP_GFN, ITT_GFN = 16, 20, 30  # the queue 64 KiB aligned: CBASER clears bits 15:12


def test_guest_brings_up_its_vits_and_takes_msis(tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path, "--frames", "8192", "--dom0-memory", "512")
    try:
        with SyncControlClient.connect(daemon.control_path) as ctl:
            guest = ctl.create_domain("hvm", 64, vcpus=2, pin=[1, 2])
            assigned = ctl.assign_device(guest["domid"], "00:03.0", its_devid=0x40, its_events=4)
            info = ctl.its_info(guest["domid"])
            assert info["devices"] == [
                {"bdf": "0000:00:03.0", "vdevid": assigned["vdevid"], "devid": 0x40, "events": 4, "pits": 0}
            ]
            vdev = assigned["vdevid"]
            doorbell = info["its_frames"]["0"] + 0x10040
            with SyncHypercallClient.connect(daemon.hypercall_path, guest["token"]) as xc:
                assert xc.its_mmio("its", 0, 0x4, 4) == 0x5800043B
                xc.its_mmio("its", 0, 0x80, 8, 1 << 63 | QUEUE_GFN << 12)
                xc.its_mmio("its", 0, 0x100, 8, 1 << 63)
                xc.its_mmio("its", 0, 0x108, 8, 1 << 63)
                for vcpu in range(2):
                    xc.its_mmio("redist", vcpu, 0x70, 8, PROP_GFN << 12 | 15)
                    xc.its_mmio("redist", vcpu, 0x0, 4, 1)
                xc.its_mmio("its", 0, 0x0, 4, 1)
                commands = [c.mapc(0, 0), c.mapc(1, 1), c.invall(0), c.sync(0), c.mapd(vdev, 1, ITT_GFN << 12)]
                commands += [cmd for e in range(4) for cmd in (c.mapti(vdev, e, LPI + 64 + e, e % 2), c.sync(e % 2))]
                for i, command in enumerate(commands):
                    xc.guest_write(QUEUE_GFN, command.encode(), i * 32)
                # the configuration table: writes trap, enable bits reach the physical table
                xc.guest_write(PROP_GFN, bytes([0xA3] * 4), 64)
                xc.its_mmio("its", 0, 0x88, 8, len(commands) * 32)
                deadline = time.monotonic() + 10
                while xc.its_mmio("its", 0, 0x90, 8) != len(commands) * 32:  # poll CREADR, as Linux does
                    assert time.monotonic() < deadline
                # the device raises event 3 by a DMA write to the doorbell through its IOMMU context
                assert xc.device_dma("00:03.0", doorbell, (3).to_bytes(4, "little"))["ok"]
                event = xc.next_event(timeout=10)
                assert event == {"event": "lpi", "vcpu": 1, "intid": LPI + 67}
                xc.its_end(1, LPI + 67)
                # like an RMRR entry, the doorbell can be neither mapped over nor unmapped
                got = xc.iommu_op([ops.map_page(doorbell >> 12, 1), ops.unmap_page(doorbell >> 12)])
                assert ops.statuses(got) == ["-EACCES", "-EACCES"]
                xc.device_dma("00:03.0", doorbell, (0).to_bytes(4, "little"))
                assert xc.next_event(timeout=10) == {"event": "lpi", "vcpu": 0, "intid": LPI + 64}
            stats = ctl.its_stats()
            assert stats["pits"][0]["physical"]["MAPTI"] == 5  # four of the guest's, one of Xen's
            counters = ctl.its_info(guest["domid"])["vits"]["0"]
            assert counters["received"]["MAPTI"] == 4 and not counters["dropped"]
            assert ctl.audit() == []
    finally:
        daemon.stop()


class WireGuest:
    """A guest with a vITS, over the daemon's sockets."""

    def __init__(self, ctl: SyncControlClient, daemon: DaemonProcess, devid: int) -> None:
        reply = ctl.create_domain("hvm", 64, vcpus=2)
        self.domid = reply["domid"]
        self.vdev = ctl.assign_device(self.domid, f"{devid % 256:02x}:03.0", its_devid=devid, its_events=8)["vdevid"]
        self.xc = SyncHypercallClient.connect(daemon.hypercall_path, reply["token"])
        self.offset = 0
        for reg in (0x80, 0x100, 0x108):
            self.xc.its_mmio("its", 0, reg, 8, 1 << 63 | (QUEUE_GFN << 12 if reg == 0x80 else 0))
        for vcpu in range(2):
            self.xc.its_mmio("redist", vcpu, 0x70, 8, PROP_GFN << 12 | 15)
            self.xc.its_mmio("redist", vcpu, 0x0, 4, 1)
        self.xc.its_mmio("its", 0, 0x0, 4, 1)

    def run(self, *blocks: bytes) -> None:
        for block in blocks:
            self.xc.guest_write(QUEUE_GFN, block, self.offset)
            self.offset += 32
        self.xc.its_mmio("its", 0, 0x88, 4, self.offset)  # a 32-bit CWRITER write
        deadline = time.monotonic() + 10
        while self.xc.its_mmio("its", 0, 0x90, 4) != self.offset:  # and 32-bit CREADR reads
            assert time.monotonic() < deadline, "the queue stalled"


@pytest.fixture(scope="module")
def its_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DaemonProcess, SyncControlClient]]:
    daemon = DaemonProcess(tmp_path_factory.mktemp("its"), "--frames", "16384", "--dom0-memory", "512")
    try:
        with SyncControlClient.connect(daemon.control_path) as ctl:
            yield daemon, ctl
    finally:
        daemon.stop()


#: The same table the conformance suite checks ITS-ERRORS with (one list of the command errors).
WIRE_ERRORS = ERRORS


@pytest.mark.parametrize(("make", "error"), WIRE_ERRORS, ids=[e for _, e in WIRE_ERRORS])
def test_each_error_is_dropped_and_the_queue_moves(
    its_daemon: tuple[DaemonProcess, SyncControlClient], make: Callable[[int], ItsCommand], error: str
) -> None:
    daemon, ctl = its_daemon
    devid = 0x100 + WIRE_ERRORS.index(next(w for w in WIRE_ERRORS if w[1] == error))
    guest = WireGuest(ctl, daemon, devid)
    try:
        guest.run(make(guest.vdev).encode(), c.sync(0).encode())
        assert ctl.its_info(guest.domid)["vits"]["0"]["dropped"] == {error: 1}
        assert ctl.audit() == []
        assert f"E_ITS_{error}" in daemon.log_text()  # logged at warning, with its name
    finally:
        guest.xc.close()
        ctl.destroy_domain(guest.domid)
