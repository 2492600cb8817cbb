"""The vITS over the real daemon: a guest brings it up by trapped MMIO, a device raises MSIs."""

from __future__ import annotations

import time
from pathlib import Path

from tests.conformance.beds import DaemonProcess
from xenemu import ops
from xenemu.client import SyncControlClient, SyncHypercallClient
from xenemu.core import its_cmd as c

LPI = 8192
QUEUE_GFN, PROP_GFN, ITT_GFN = 10, 20, 30


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
