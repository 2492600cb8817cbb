"""Every guest- or toolstack-driven allocation in the core is bounded, and input is checked
before anything is allocated: driven over the real daemon's sockets, as an attacker would."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conformance.beds import DaemonProcess
from xenemu.abi import pv_iommu as ops
from xenemu.client import SyncControlClient, SyncHypercallClient, XenError


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    proc = DaemonProcess(tmp_path, "--frames", "8192", "--dom0-memory", "512")
    yield proc
    proc.stop()


def refused(errno: int, fn: object, *args: object, **kw: object) -> None:
    with pytest.raises(XenError) as info:
        fn(*args, **kw)  # type: ignore[operator]
    assert info.value.errno == errno, info.value


def test_a_guest_cannot_take_every_free_frame(daemon: DaemonProcess) -> None:
    with SyncControlClient.connect(daemon.control_path) as ctl:
        guest = ctl.create_domain("hvm", 16)
        free = ctl.stats()["free_frames"]
        with SyncHypercallClient.connect(daemon.hypercall_path, guest["token"]) as xc:
            out = xc.populate_physmap(list(range(100, 100 + free)))
            assert (out["ret"], out["status"]) == (0, -12)  # max_pages = memory, as xl's maxmem
            ctl.set_max_pages(guest["domid"], 20)  # xl mem-set
            out = xc.populate_physmap(list(range(100, 100 + free)))
            assert (out["ret"], out["status"]) == (4, -12)
        assert ctl.stats()["free_frames"] == free - 4
        assert ctl.audit() == []


def test_an_emulator_cannot_use_up_ioreq_server_ids(daemon: DaemonProcess) -> None:
    with SyncControlClient.connect(daemon.control_path) as ctl:
        guest = ctl.create_domain("hvm", 16)
        dm = ctl.create_domain("pv", 16, target=guest["domid"])
        with SyncHypercallClient.connect(daemon.hypercall_path, dm["token"]) as xc:
            live = [xc.create_ioreq_server(guest["domid"]) for _ in range(8)]
            refused(28, xc.create_ioreq_server, guest["domid"])  # 8 live at most
            for server in live:
                xc.destroy_ioreq_server(server)
            for _ in range(256 - 8):  # churn: ids are never reused, so churn is bounded too
                xc.destroy_ioreq_server(xc.create_ioreq_server(guest["domid"]))
            refused(28, xc.create_ioreq_server, guest["domid"])
        # Another emulator still gets servers: the host's ids were not used up.
        other = ctl.create_domain("pv", 16, target=guest["domid"])
        with SyncHypercallClient.connect(daemon.hypercall_path, other["token"]) as xc:
            assert xc.create_ioreq_server(guest["domid"]) == 257
        assert ctl.audit() == []


def test_toolstack_numbers_are_checked_before_anything_is_allocated(daemon: DaemonProcess) -> None:
    with SyncControlClient.connect(daemon.control_path) as ctl:
        before = ctl.stats()
        refused(22, ctl.create_domain, "hvm", 16, max_mappings=(1 << 63) - 1)
        refused(22, ctl.create_domain, "hvm", 16, name="x" * 4096)
        refused(22, ctl.create_domain, "hvm", 16, max_pages=1 << 40)
        assert ctl.stats()["domains"] == before["domains"]
        assert ctl.stats()["free_frames"] == before["free_frames"]
        guest = ctl.create_domain("hvm", 16)["domid"]
        # An RMRR region the size of the address space is refused before a frame list is built.
        refused(22, ctl.assign_device, guest, "00:03.0", [(1 << 20, 1 << 40)])
        refused(22, ctl.assign_device, guest, "00:03.0", [(1 << 20, 4097)])
        # A bad ITS argument leaves no device, context or LPI behind: the BDF is still free.
        refused(22, ctl.assign_device, guest, "00:03.0", its_devid=5, its_events=4, pits=7)
        refused(22, ctl.assign_device, guest, "00:03.0", its_devid=5, its_events=0)
        (row,) = [d for d in ctl.list_domains() if d["domid"] == guest]
        assert row["devices"] == [] and not row["iommu_context"]
        ctl.assign_device(guest, "00:03.0", its_devid=5, its_events=4)
        assert ctl.audit() == []


def test_no_device_for_an_hvm_guest_without_an_iommu(tmp_path: Path) -> None:
    proc = DaemonProcess(tmp_path, "--frames", "8192", "--dom0-memory", "512", "--no-iommu")
    try:
        with SyncControlClient.connect(proc.control_path) as ctl:
            hvm = ctl.create_domain("hvm", 16)["domid"]
            refused(95, ctl.assign_device, hvm, "00:03.0")  # its DMA would reach any frame
            pv = ctl.create_domain("pv", 16)["domid"]
            ctl.assign_device(pv, "00:04.0")  # a PV guest sees machine addresses anyway
            assert ctl.audit() == []
    finally:
        proc.stop()


def test_sparse_mappings_cost_a_bounded_number_of_leaves_given_back_on_unmap(daemon: DaemonProcess) -> None:
    """Each map_page at a BFN 512 apart from the last needs a 4 KiB page-table leaf of its own."""
    from xenemu.abi import pv_iommu as ops

    with SyncControlClient.connect(daemon.control_path) as ctl:
        guest = ctl.create_domain("hvm", 16)
        ctl.assign_device(guest["domid"], "00:03.0")
        base = ctl.stats()["page_table_bytes"]
        with SyncHypercallClient.connect(daemon.hypercall_path, guest["token"]) as xc:
            sparse = [ops.map_page((1 << 30) + 512 * i, i % 16) for i in range(1100)]
            got = ops.statuses(xc.iommu_op(sparse))
            ok = got.count("OK")
            # 1,024 sparse leaves free, then one per 64 mappings held: 1,040 here, the rest refused
            assert ok == 1040 and got[:ok] == ["OK"] * ok and set(got[ok:]) == {"-EDQUOT"}
            grown = ctl.stats()["page_table_bytes"] - base
            assert grown <= (ok + 1) * 4096
            assert ctl.audit() == []
            done = xc.iommu_op([ops.unmap_page((1 << 30) + 512 * i) for i in range(ok)])
            assert set(ops.statuses(done)) == {"OK"}
        assert ctl.stats()["page_table_bytes"] - base <= 4096  # given back as they emptied
        ctl.destroy_domain(guest["domid"])
        assert ctl.audit() == []


def test_memory_cycled_through_sparse_gfns_leaves_no_leaves_behind(daemon: DaemonProcess) -> None:
    """A guest that populates a GFN 512 beyond the last, maps it, unmaps it and balloons it
    out again, over and over, used to leave a p2m leaf and a page-table leaf (8 KiB of the
    daemon's memory) behind each time: the daemon's own accounting stays flat instead."""
    with SyncControlClient.connect(daemon.control_path) as ctl:
        guest = ctl.create_domain("hvm", 64)
        ctl.assign_device(guest["domid"], "00:03.0")

        def held() -> int:
            me = next(d for d in ctl.list_domains() if d["domid"] == guest["domid"])
            return int(me["p2m_bytes"]) + int(me["page_table_bytes"])

        with SyncHypercallClient.connect(daemon.hypercall_path, guest["token"]) as xc:
            assert xc.decrease_reservation([63])["ret"] == 1  # room for one page under max_pages
            start = held()
            for k in range(1, 301):
                gfn = k << 9
                assert xc.populate_physmap([gfn])["ret"] == 1
                assert ops.statuses(xc.iommu_op([ops.map_page(gfn, gfn)])) == ["OK"]
                assert ops.statuses(xc.iommu_op([ops.unmap_page(gfn)])) == ["OK"]
                assert xc.decrease_reservation([gfn])["ret"] == 1
            assert held() <= start + 2 * 4096, (start, held())
        assert ctl.audit() == []
