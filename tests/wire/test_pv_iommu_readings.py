"""Issue 17's readings of the PV IOMMU page, end to end through the real daemon.

Each test is what a guest, emulator or balloon driver written against the page sends, and what
it must see: the order of a call's invalidates, a PV guest's populate, a PV GFN that is not its
own, an IOREQ server for a target that is not a live domain, and each server's scratch frame.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conformance.beds import DaemonProcess
from tests.wire.test_balloon_wire import Scene
from xenemu.abi import pv_iommu as ops
from xenemu.client import SyncControlClient, XenError

DOMID_XEN = 0x7FF2


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    proc = DaemonProcess(tmp_path, "--frames", "8192", "--dom0-memory", "512")
    yield proc
    proc.stop()


async def test_invalidates_go_out_gfn_by_gfn(daemon: DaemonProcess) -> None:
    scene = Scene(daemon)
    guest, dm = await scene.connect(scene.guest_token), await scene.connect(scene.dms[0][1])
    server = await dm.create_ioreq_server(scene.guest)
    batch = [
        ops.map_foreign_page(0x901, 5, scene.guest, server),
        ops.map_foreign_page(0x900, 5, scene.guest, server),
        ops.map_foreign_page(0x800, 6, scene.guest, server),
    ]
    assert set(ops.statuses(await dm.iommu_op(batch))) == {"OK"}
    assert (await guest.decrease_reservation([5, 6]))["ret"] == 2
    buffered, _, sync = await dm.ioreq_fetch(server)
    assert [r.data for r in buffered] == [0x900, 0x901, 0x800] and sync == []
    scene.audit()


async def test_a_pv_guests_populate_counts_only(daemon: DaemonProcess) -> None:
    ctl = SyncControlClient.connect(daemon.control_path)
    pv = ctl.create_domain("pv", 8, max_pages=16)
    scene = Scene(daemon)
    guest = await scene.connect(pv["token"])
    (mine,) = (await guest.populate_physmap([0]))["mfns"]  # a frame it now owns and populates
    result = await guest.populate_physmap([mine, mine, 2, 1 << 40])  # the values are ignored
    assert (result["ret"], result["status"]) == (4, 0) and len(set(result["mfns"]) | {mine}) == 5
    scene.audit()


async def test_a_pv_gfn_that_is_not_its_own_is_not_populated(daemon: DaemonProcess) -> None:
    ctl = SyncControlClient.connect(daemon.control_path)
    pv = ctl.create_domain("pv", 8)
    dm = ctl.create_domain("pv", 16, target=pv["domid"])
    ctl.assign_device(dm["domid"], "00:1f.0")
    scene = Scene(daemon)
    emulator, guest = await scene.connect(dm["token"]), await scene.connect(pv["token"])
    server = await emulator.create_ioreq_server(pv["domid"])
    got = await emulator.iommu_op(
        [ops.map_foreign_page(0x800, 2, pv["domid"], server), ops.lookup_foreign_page(2, pv["domid"], server)]
    )
    assert ops.statuses(got) == ["-ENXIO", "-ENXIO"]  # frame 2 is Xen's: not the guest's GFN
    out = await guest.decrease_reservation([2])
    assert (out["ret"], out["status"]) == (0, -2)
    scene.audit()


async def test_an_ioreq_server_for_a_target_that_is_not_live_is_esrch(daemon: DaemonProcess) -> None:
    scene = Scene(daemon)
    dm = await scene.connect(scene.dms[0][1])
    gone = scene.ctl.create_domain("hvm", 4)["domid"]
    scene.ctl.destroy_domain(gone)
    for target in (555, gone, DOMID_XEN, 0x7FF4):
        with pytest.raises(XenError) as info:
            await dm.create_ioreq_server(target)
        assert info.value.errno == 3
    for target in (scene.dms[0][0], ops.DOMID_SELF, 0):  # itself, or a live domain it has no say over
        with pytest.raises(XenError) as info:
            await dm.create_ioreq_server(target)
        assert info.value.errno == 1


async def test_each_server_has_its_own_scratch_frame(daemon: DaemonProcess) -> None:
    scene = Scene(daemon, emulators=2)
    guest = await scene.connect(scene.guest_token)
    dms = [await scene.connect(token) for _, token in scene.dms]
    servers = [await dm.create_ioreq_server(scene.guest) for dm in dms]
    for dm, server in zip(dms, servers, strict=True):
        got = await dm.iommu_op([ops.map_foreign_page(0x800, 5, scene.guest, server, swap_mfn=True)])
        assert ops.statuses(got) == ["OK"]
    assert (await guest.decrease_reservation([5]))["ret"] == 1
    scratch = []
    for domid, _ in scene.dms:
        (row,) = [r for r in scene.ctl.dump_mappings(domid) if r["bfn"] == 0x800]
        assert row["kind"] == "scratch"
        scratch.append(row["mfn"])
    assert scratch[0] != scratch[1]
    assert all(scene.ctl.frame_info(mfn=m)["owner"] == DOMID_XEN for m in scratch)
    # One emulator's device writes into its swapped page; the other's reads nothing of it.
    await dms[0].device_dma("00:10.0", 0x800 << 12, b"private")
    assert (await dms[1].device_dma("00:11.0", 0x800 << 12, length=7))["data"] == bytes(7)
    await dms[0].destroy_ioreq_server(servers[0])
    assert scene.ctl.frame_info(mfn=scratch[0])["owner"] is None  # freed with its server
    scene.audit()


async def test_no_frame_for_a_scratch_frame_is_enomem(tmp_path: Path) -> None:
    proc = DaemonProcess(tmp_path, "--frames", str(512 + 16 + 64 + 16), "--dom0-memory", "512")
    try:
        ctl = SyncControlClient.connect(proc.control_path)
        guest = ctl.create_domain("hvm", 64)
        dm = ctl.create_domain("pv", 16, target=guest["domid"])
        assert ctl.stats()["free_frames"] == 0
        scene = Scene.__new__(Scene)
        scene.daemon = proc
        client = await scene.connect(dm["token"])
        with pytest.raises(XenError) as info:
            await client.create_ioreq_server(guest["domid"])
        assert info.value.errno == 12
        assert ctl.audit() == []
    finally:
        proc.stop()
