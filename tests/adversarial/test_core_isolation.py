"""No data passes between domains through Xen's frames.

When a guest balloons out a frame that emulators mapped with ``swap_mfn``, Xen re-points their
BFNs at a scratch frame.  One scratch frame shared by every server let one emulator's device
write there and another emulator, serving a different guest, read it back: a channel between
domains that neither guest allowed.  Each IOREQ server now has its own scratch frame.
"""

from __future__ import annotations

from pathlib import Path

from tests.conformance.beds import DaemonProcess
from xenemu.abi import pv_iommu as ops
from xenemu.client import HypercallClient, SyncControlClient

DOMID_XEN = 0x7FF2


async def test_emulators_of_different_guests_do_not_share_a_scratch_frame(tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path, "--frames", "8192", "--dom0-memory", "512")
    try:
        ctl = SyncControlClient.connect(daemon.control_path)
        pairs = []
        for n in range(2):
            guest = ctl.create_domain("hvm", 64)
            dm = ctl.create_domain("pv", 16, target=guest["domid"])
            ctl.assign_device(dm["domid"], f"00:1{n}.0")
            g = await HypercallClient.connect(daemon.hypercall_path, guest["token"])
            e = await HypercallClient.connect(daemon.hypercall_path, dm["token"])
            server = await e.create_ioreq_server(guest["domid"])
            got = await e.iommu_op([ops.map_foreign_page(0x800, 5, guest["domid"], server, swap_mfn=True)])
            assert ops.statuses(got) == ["OK"]
            assert (await g.decrease_reservation([5]))["ret"] == 1  # the BFN now maps scratch
            pairs.append((dm["domid"], e))
        scratch = []
        for domid, _ in pairs:
            (row,) = [r for r in ctl.dump_mappings(domid, 0x800, 1) if r["bfn"] == 0x800]
            assert row["kind"] == "scratch"
            scratch.append(row["mfn"])
        assert scratch[0] != scratch[1]
        assert all(ctl.frame_info(mfn=m)["owner"] == DOMID_XEN for m in scratch)
        (_, first), (_, second) = pairs
        await first.device_dma("00:10.0", 0x800 << 12, b"a secret of guest one")
        seen = await second.device_dma("00:11.0", 0x800 << 12, length=21)
        assert seen["ok"] and seen["data"] == bytes(21)
        assert ctl.audit() == []
    finally:
        daemon.stop()
