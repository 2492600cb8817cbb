"""Every subop and status code of pv-iommu-semantics.md, on the core and over the wire."""

from __future__ import annotations

import pytest

from tests.conformance.beds import CoreBed, WireBed
from xenemu.abi import pv_iommu as ops
from xenemu.abi.pv_iommu import RW, R, W

Bed = CoreBed | WireBed
HW = pytest.mark.host(fresh=True)


def st(bed: Bed, domid: int, op: ops.Op) -> str:
    return bed.call(domid, [op])[0].status_name


def one(bed: Bed, domid: int, op: ops.Op) -> ops.Op:
    return bed.call(domid, [op])[0]


# -- query_caps -----------------------------------------------------------------------------------------
def test_query_caps(cbed: Bed) -> None:
    with_dev = cbed.guest()
    without = cbed.guest(device=None)
    assert one(cbed, with_dev, ops.query_caps()).flags == ops.MAP_CAP | (18 << 10)
    assert one(cbed, without, ops.query_caps()).flags == 18 << 10


@HW
def test_query_caps_non_strict_hwdom(cbed: Bed) -> None:
    assert cbed.assign(0, "00:02.0") == 0
    assert one(cbed, 0, ops.query_caps()).flags == ops.MAP_CAP | ops.MAP_ALL_GFNS | (18 << 10)


@pytest.mark.host(fresh=True, dom0_strict=True)
def test_query_caps_strict_hwdom(cbed: Bed) -> None:
    assert cbed.assign(0, "00:02.0") == 0
    assert one(cbed, 0, ops.query_caps()).flags == ops.MAP_CAP | (18 << 10)


@pytest.mark.host(fresh=True, dom0_passthrough=True)
def test_query_caps_passthrough_hwdom(cbed: Bed) -> None:
    assert cbed.assign(0, "00:02.0") == 0
    assert one(cbed, 0, ops.query_caps()).flags == 18 << 10
    assert st(cbed, 0, ops.map_page(0x100000, 600)) == "-EOPNOTSUPP"


@pytest.mark.host(iommu=False)
def test_query_caps_no_iommu(cbed: Bed) -> None:
    g = cbed.guest("pv")
    assert one(cbed, g, ops.query_caps()).flags == 0
    assert st(cbed, g, ops.map_page(0x1000, 1)) == "-EOPNOTSUPP"


@pytest.mark.host(max_order=4)
def test_largest_order_option(cbed: Bed) -> None:
    g = cbed.guest()
    assert one(cbed, g, ops.query_caps()).order == 4
    assert st(cbed, g, ops.map_page(0x1000, 16, order=5)) == "-ENOSPC"
    assert st(cbed, g, ops.map_page(0x1000, 16, order=4)) == "OK"


# -- map_page / unmap_page ----------------------------------------------------------------------------------
def test_map_and_unmap_references(cbed: Bed) -> None:
    g = cbed.guest()
    mfn = cbed.mfn(g, 5)
    assert cbed.refs(mfn) == (1, 0)
    assert st(cbed, g, ops.map_page(0x1000, 5, RW)) == "OK"
    assert st(cbed, g, ops.map_page(0x1001, 5, R)) == "OK"
    assert cbed.refs(mfn) == (3, 1)
    assert st(cbed, g, ops.unmap_page(0x1000)) == "OK"
    assert st(cbed, g, ops.unmap_page(0x1001)) == "OK"
    assert cbed.refs(mfn) == (1, 0)


def test_dma_through_mappings(cbed: Bed) -> None:
    g = cbed.guest()
    cbed.guest_write(g, 7, b"hello dma", 100)
    assert st(cbed, g, ops.map_page(0x2000, 7)) == "OK"
    got = cbed.dma(g, "0000:00:03.0", (0x2000 << 12) + 100, length=9)
    assert got["ok"] and got["data"] == b"hello dma"
    assert st(cbed, g, ops.map_page(0x2001, 8, R)) == "OK"
    assert not cbed.dma(g, "0000:00:03.0", 0x2001 << 12, b"no")["ok"]
    assert st(cbed, g, ops.map_page(0x2002, 8, W)) == "OK"
    assert not cbed.dma(g, "0000:00:03.0", 0x2002 << 12, length=1)["ok"]


@pytest.mark.parametrize("bit", range(3, 10))
def test_map_reserved_bits(cbed: Bed, bit: int) -> None:
    g = cbed.guest()
    assert st(cbed, g, ops.Op(ops.MAP_PAGE, RW | (1 << bit), 0x1000, 1)) == "-EINVAL"
    assert st(cbed, g, ops.map_page(0x1000, 1, perms=0)) == "-EINVAL"


def test_map_statuses(cbed: Bed) -> None:
    g = cbed.guest(memory=16, rmrr=[(4, 1)])
    nodev = cbed.guest(device=None)
    assert st(cbed, nodev, ops.map_page(0x1000, 1)) == "-EOPNOTSUPP"
    assert st(cbed, g, ops.map_page(0x1000, 1, no_ref_cnt=True)) == "-EPERM"
    assert st(cbed, g, ops.map_page(0x1000, 1, order=19)) == "-ENOSPC"
    assert st(cbed, g, ops.map_page(0x1001, 2, order=1)) == "-ENOSPC"
    assert st(cbed, g, ops.map_page(0x1000, 3, order=1)) == "-ENOSPC"
    assert st(cbed, g, ops.map_page(0x1000, 16)) == "-EPERM"
    assert st(cbed, g, ops.map_page(4, 1)) == "-EACCES"
    assert st(cbed, g, ops.map_page(0x1000, 1)) == "OK"
    assert st(cbed, g, ops.map_page(0x1000, 2)) == "-EEXIST"
    cbed.inject_fault(g, 0x1001)
    assert st(cbed, g, ops.map_page(0x1001, 2)) == "-EIO"
    cbed.inject_fault(g, 0x1001, clear=True)
    assert st(cbed, g, ops.map_page(0x1001, 2)) == "OK"


def test_pv_guest_frames(cbed: Bed) -> None:
    g = cbed.guest("pv", 16)
    mine = cbed.owned_frame(g)
    assert st(cbed, g, ops.map_page(0x4000, mine)) == "OK"
    assert cbed.refs(mine) == (2, 1)
    assert st(cbed, g, ops.map_page(0x4001, 3)) == "-EPERM"
    assert st(cbed, g, ops.map_page(0x4001, cbed.owned_frame(0))) == "-EPERM"


def test_unmap_statuses(cbed: Bed) -> None:
    g = cbed.guest(rmrr=[(4, 1)])
    nodev = cbed.guest(device=None)
    assert st(cbed, nodev, ops.unmap_page(1)) == "-ENOENT"
    assert st(cbed, g, ops.unmap_page(0x5000)) == "-ENOENT"
    assert st(cbed, g, ops.unmap_page(4)) == "-EACCES"
    assert st(cbed, g, ops.unmap_page(1, order=1)) == "-ENOSPC"
    assert st(cbed, g, ops.unmap_page(0, order=19)) == "-ENOSPC"
    for bit in range(10):
        assert st(cbed, g, ops.Op(ops.UNMAP_PAGE, 1 << bit, 0x1000)) == "-EINVAL"
    assert st(cbed, g, ops.map_page(0x1000, 1)) == "OK"
    cbed.inject_fault(g, 0x1000)
    assert st(cbed, g, ops.unmap_page(0x1000)) == "-EIO"
    cbed.inject_fault(g, 0x1000, clear=True)
    assert st(cbed, g, ops.unmap_page(0x1000)) == "OK"


def test_default_entries(cbed: Bed) -> None:
    g = cbed.guest()
    cbed.guest_write(g, 9, b"default")
    assert cbed.dma(g, "0000:00:03.0", 9 << 12, length=7)["data"] == b"default"
    before = cbed.flushes(g)
    assert st(cbed, g, ops.map_page(9, 10, R)) == "OK"
    assert cbed.flushes(g)["modified"] == before["modified"] + 1
    assert st(cbed, g, ops.unmap_page(9)) == "OK"
    assert st(cbed, g, ops.unmap_page(9)) == "-ENOENT"
    assert not cbed.dma(g, "0000:00:03.0", 9 << 12, length=1)["ok"]


def test_page_orders(cbed: Bed) -> None:
    g = cbed.guest()
    assert st(cbed, g, ops.map_page(0x1000, 8, order=3)) == "OK"
    assert cbed.refs(cbed.mfn(g, 12)) == (2, 1)
    assert st(cbed, g, ops.unmap_page(0x1002, order=1)) == "OK"
    assert cbed.refs(cbed.mfn(g, 10)) == (1, 0)
    assert st(cbed, g, ops.unmap_page(0x1000, order=3)) == "-ENOENT"  # atomic: pages 2, 3 are gone
    assert cbed.refs(cbed.mfn(g, 8)) == (2, 1)
    assert st(cbed, g, ops.map_page(0x2002, 50)) == "OK"
    assert st(cbed, g, ops.map_page(0x2000, 16, order=2)) == "-EEXIST"
    assert cbed.refs(cbed.mfn(g, 16)) == (1, 0)


@HW
def test_non_strict_hwdom_maps(cbed: Bed) -> None:
    assert cbed.assign(0, "00:02.0") == 0
    g = cbed.guest()
    theirs = cbed.mfn(g, 0)
    free = cbed.nr_frames - 1
    assert st(cbed, 0, ops.map_page(0x100000, theirs)) == "OK"
    assert cbed.refs(theirs) == (2, 1)
    assert st(cbed, 0, ops.map_page(0x100001, 3)) == "-EPERM"
    assert st(cbed, 0, ops.map_page(0x100002, cbed.nr_frames)) == "-EPERM"
    assert st(cbed, 0, ops.map_page(0x100003, free)) == "-EPERM"
    assert st(cbed, 0, ops.map_page(0x100003, free, no_ref_cnt=True)) == "OK"
    assert cbed.refs(free) == (0, 0)
    assert st(cbed, 0, ops.unmap_page(0x100003)) == "OK"
    assert st(cbed, 0, ops.unmap_page(0x100000)) == "OK"


@pytest.mark.host(fresh=True, dom0_strict=True)
def test_strict_hwdom_maps_its_own(cbed: Bed) -> None:
    assert cbed.assign(0, "00:02.0") == 0
    g = cbed.guest()
    assert st(cbed, 0, ops.map_page(0x100000, cbed.mfn(g, 0))) == "-EPERM"
    assert st(cbed, 0, ops.map_page(0x100000, cbed.owned_frame(0), no_ref_cnt=True)) == "-EPERM"
    assert st(cbed, 0, ops.map_page(0x100000, cbed.owned_frame(0))) == "OK"


def test_unknown_subop_and_failed_ops_write_only_status(cbed: Bed) -> None:
    g = cbed.guest()
    batch = [ops.Op(9, flags=0xABCD, bfn=5), ops.map_page(0x1000, 999, RW | 32), ops.map_page(0x1000, 1)]
    got = cbed.call(g, batch)
    assert ops.statuses(got) == ["-EOPNOTSUPP", "-EINVAL", "OK"]
    assert [op.with_status(0) for op in got] == [op.with_status(0) for op in batch]


# -- foreign subops -----------------------------------------------------------------------------------------
def test_map_foreign(cbed: Bed) -> None:
    guest = cbed.guest()
    dm, server = cbed.emulator(guest)
    mfn = cbed.mfn(guest, 4)
    got = one(cbed, dm, ops.map_foreign_page(0x800, 4, guest, server))
    assert got.status_name == "OK" and got.bfn == 0x800
    assert cbed.refs(mfn) == (2, 1)
    assert st(cbed, dm, ops.map_foreign_page(0x800, 4, guest, server)) == "OK"  # identical
    assert cbed.refs(mfn) == (2, 1)
    assert st(cbed, dm, ops.map_foreign_page(0x800, 4, guest, server, R)) == "-EEXIST"
    assert st(cbed, dm, ops.map_foreign_page(0x801, 4, guest, server, R, swap_mfn=True)) == "OK"
    assert cbed.refs(mfn) == (3, 1)
    cbed.guest_write(guest, 4, b"shared")
    assert cbed.dma(dm, "0000:00:05.0", 0x801 << 12, length=6)["data"] == b"shared"
    assert st(cbed, dm, ops.unmap_foreign_page(0x800, server)) == "OK"
    assert st(cbed, dm, ops.unmap_foreign_page(0x801, server)) == "OK"
    assert cbed.refs(mfn) == (1, 0)


def test_map_foreign_statuses(cbed: Bed) -> None:
    guest = cbed.guest(memory=16)
    other = cbed.guest(device=None)
    dm, server = cbed.emulator(guest)
    for bit in range(3, 10):
        assert st(cbed, dm, ops.Op(ops.MAP_FOREIGN_PAGE, RW | (1 << bit), 0x800, 4, guest, server)) == "-EINVAL"
    assert st(cbed, dm, ops.map_foreign_page(0x800, 4, guest, server, perms=0)) == "-EINVAL"
    assert st(cbed, dm, ops.map_foreign_page(0x801, 4, guest, server, order=1)) == "-ENOSPC"
    assert st(cbed, dm, ops.map_foreign_page(0x800, 5, guest, server, order=1)) == "-ENOSPC"
    assert st(cbed, dm, ops.map_foreign_page(0x800, 4, dm, server)) == "-EPERM"
    assert st(cbed, dm, ops.map_foreign_page(0x800, 4, ops.DOMID_SELF, server)) == "-EPERM"
    for bad in (4000, 0x7FF2, 0x7FF4):
        assert st(cbed, dm, ops.map_foreign_page(0x800, 4, bad, server)) == "-ENXIO"
    assert st(cbed, dm, ops.map_foreign_page(0x800, 4, other, server)) == "-EPERM"
    assert st(cbed, dm, ops.map_foreign_page(0x800, 4, guest, server + 1000)) == "-ENODEV"
    assert st(cbed, dm, ops.map_foreign_page(0x800, 16, guest, server)) == "-ENXIO"
    cbed.inject_fault(dm, 0x803)
    assert st(cbed, dm, ops.map_foreign_page(0x800, 8, guest, server, order=2)) == "-EIO"
    assert cbed.refs(cbed.mfn(guest, 8)) == (1, 0)
    cbed.inject_fault(dm, 0x803, clear=True)


def test_map_foreign_without_map_cap(cbed: Bed) -> None:
    guest = cbed.guest()
    dm, server = cbed.emulator(guest, device=None)
    assert st(cbed, dm, ops.map_foreign_page(0x800, 4, guest, server)) == "-EOPNOTSUPP"


def test_map_foreign_rmrr(cbed: Bed) -> None:
    guest = cbed.guest()
    dm, server = cbed.emulator(guest, device=None)
    assert cbed.assign(dm, "00:05.0", [(5, 1)]) == 0
    assert st(cbed, dm, ops.map_foreign_page(5, 4, guest, server)) == "-EACCES"
    assert st(cbed, dm, ops.unmap_foreign_page(5, server)) == "-EACCES"


@pytest.mark.host(iommu=False)
def test_foreign_without_iommu(cbed: Bed) -> None:
    guest = cbed.guest(device=None)
    dm, server = cbed.emulator(guest)
    mfn = cbed.mfn(guest, 4)
    got = one(cbed, dm, ops.map_foreign_page(0x12345, 4, guest, server))
    assert got.status_name == "OK" and got.bfn == mfn
    assert st(cbed, dm, ops.map_foreign_page(0, 4, guest, server, R)) == "-EEXIST"
    looked = one(cbed, dm, ops.lookup_foreign_page(4, guest, server))
    assert looked.bfn == mfn and looked.flags == RW
    assert cbed.refs(mfn) == (2, 1)
    assert st(cbed, dm, ops.unmap_foreign_page(mfn, server)) == "OK"
    assert cbed.refs(mfn) == (1, 0)


def test_lookup(cbed: Bed) -> None:
    guest = cbed.guest()
    dm, server = cbed.emulator(guest, device=None)
    mfn = cbed.mfn(guest, 6)
    got = one(cbed, dm, ops.Op(ops.LOOKUP_FOREIGN_PAGE, flags=0xFFFF, bfn=7, gfn=6, domid=guest, ioserver=server))
    assert got.status_name == "OK" and got.bfn == mfn and got.flags == RW
    assert cbed.refs(mfn) == (2, 1)
    assert one(cbed, dm, ops.lookup_foreign_page(6, guest, server)).bfn == mfn
    assert cbed.refs(mfn) == (2, 1)
    assert st(cbed, dm, ops.lookup_foreign_page(6, dm, server)) == "-EPERM"
    assert st(cbed, dm, ops.lookup_foreign_page(6, 4000, server)) == "-ENXIO"
    assert st(cbed, dm, ops.lookup_foreign_page(6, guest, server + 1000)) == "-ENODEV"
    assert st(cbed, dm, ops.lookup_foreign_page(1000, guest, server)) == "-ENXIO"
    assert st(cbed, dm, ops.unmap_foreign_page(mfn, server)) == "OK"


def test_lookup_lowest_bfn_and_enoent(cbed: Bed) -> None:
    guest = cbed.guest()
    dm, server = cbed.emulator(guest)
    assert st(cbed, dm, ops.lookup_foreign_page(4, guest, server)) == "-ENOENT"
    assert st(cbed, dm, ops.map_foreign_page(0x900, 4, guest, server, R)) == "OK"
    assert st(cbed, dm, ops.map_foreign_page(0x880, 4, guest, server, R)) == "OK"
    got = one(cbed, dm, ops.lookup_foreign_page(4, guest, server))
    assert got.bfn == 0x880 and got.flags == R


@HW
def test_hwdom_lookup_takes_over_default(cbed: Bed) -> None:
    guest = cbed.guest()
    assert cbed.assign(0, "00:02.0") == 0
    server = cbed.ioreq_server(0, guest)
    mfn = cbed.mfn(guest, 4)
    before = cbed.flushes(0)
    got = one(cbed, 0, ops.lookup_foreign_page(4, guest, server))
    assert got.bfn == mfn and got.flags == RW
    assert cbed.flushes(0) == before
    assert cbed.refs(mfn) == (2, 1)
    assert st(cbed, 0, ops.unmap_foreign_page(mfn, server)) == "OK"
    assert not cbed.dma(0, "0000:00:02.0", mfn << 12, length=1)["ok"]


def test_unmap_foreign_statuses(cbed: Bed) -> None:
    guest = cbed.guest()
    dm, server = cbed.emulator(guest)
    assert st(cbed, dm, ops.map_foreign_page(0x800, 4, guest, server)) == "OK"
    for bit in range(10):
        assert st(cbed, dm, ops.Op(ops.UNMAP_FOREIGN_PAGE, 1 << bit, 0x800, ioserver=server)) == "-EINVAL"
    assert st(cbed, dm, ops.unmap_foreign_page(0x801, server, order=1)) == "-ENOSPC"
    assert st(cbed, dm, ops.unmap_foreign_page(0x800, server + 1)) == "-ENOENT"
    assert st(cbed, guest, ops.unmap_foreign_page(0x800, server)) == "-ENOENT"
    assert st(cbed, dm, ops.unmap_page(0x800)) == "-ENOENT"
    cbed.inject_fault(dm, 0x800)
    assert st(cbed, dm, ops.unmap_foreign_page(0x800, server)) == "-EIO"
    cbed.inject_fault(dm, 0x800, clear=True)
    assert st(cbed, dm, ops.unmap_foreign_page(0x800, server)) == "OK"


def test_ioreq_servers(cbed: Bed) -> None:
    guest = cbed.guest()
    other = cbed.guest(device=None)
    dm = cbed.guest("pv", 8, None, target=guest)
    assert cbed.ioreq_server(dm, other) == -1
    assert cbed.ioreq_server(dm, dm) == -1
    assert cbed.ioreq_server(dm, 4000) == -3
    assert cbed.ioreq_server(guest, other) == -1
    assert cbed.ioreq_server(dm, guest) > 0


# -- call level and flushing ---------------------------------------------------------------------------------
def test_call_level_errors(cbed: Bed) -> None:
    g = cbed.guest()
    buf = bytes(ops.pack([ops.map_page(0x1000, 1)]))
    assert cbed.raw(g, buf + b"\0", 1)[0] == -22
    assert cbed.raw(g, buf, 2)[0] == -22
    assert cbed.raw(g, b"", 0)[0] == 0
    assert cbed.refs(cbed.mfn(g, 1)) == (1, 0)


@pytest.mark.host(max_ops_per_call=8)
def test_e2big(cbed: Bed) -> None:
    g = cbed.guest()
    assert cbed.raw(g, bytes(ops.pack([ops.query_caps()] * 9)), 9)[0] == -7
    assert cbed.raw(g, bytes(ops.pack([ops.query_caps()] * 8)), 8)[0] == 0


def test_one_flush_per_batch(cbed: Bed) -> None:
    g = cbed.guest()
    before = cbed.flushes(g)
    cbed.call(g, [ops.map_page(0x1000 + i, i) for i in range(40)])
    after = cbed.flushes(g)
    assert (after["added"], after["modified"]) == (before["added"] + 1, before["modified"])
    cbed.call(g, [ops.unmap_page(0x1000 + i) for i in range(40)] + [ops.map_page(0x1000, 1)])
    final = cbed.flushes(g)
    assert (final["added"], final["modified"]) == (after["added"], after["modified"] + 1)
    cbed.call(g, [ops.query_caps(), ops.unmap_page(0x7777)])
    assert cbed.flushes(g) == final


@pytest.mark.host(continuation_every=16)
def test_continuations_flush_per_segment(cbed: Bed) -> None:
    g = cbed.guest()
    before = cbed.flushes(g)
    got = cbed.call(g, [ops.map_page(0x1000 + i, i % 64, R) for i in range(40)])
    assert set(ops.statuses(got)) == {"OK"}
    assert cbed.flushes(g)["added"] == before["added"] + 3


def test_no_stale_translation_after_a_call(cbed: Bed) -> None:
    g = cbed.guest()
    cbed.guest_write(g, 1, b"one")
    cbed.guest_write(g, 2, b"two")
    cbed.call(g, [ops.map_page(0x1000, 1)])
    assert cbed.dma(g, "0000:00:03.0", 0x1000 << 12, length=3)["data"] == b"one"
    cbed.call(g, [ops.unmap_page(0x1000), ops.map_page(0x1000, 2)])
    assert cbed.dma(g, "0000:00:03.0", 0x1000 << 12, length=3)["data"] == b"two"


# -- domains -------------------------------------------------------------------------------------------------
def test_destroy_releases_and_emulator_holds(cbed: Bed) -> None:
    guest = cbed.guest(memory=16)
    dm, server = cbed.emulator(guest)
    mfn = cbed.mfn(guest, 2)
    assert st(cbed, dm, ops.map_foreign_page(0x800, 2, guest, server)) == "OK"
    assert cbed.destroy(guest) == 0
    assert cbed.refs(mfn) == (1, 1)
    assert st(cbed, dm, ops.unmap_foreign_page(0x800, server)) == "OK"
    assert cbed.refs(mfn) == (0, 0)
    assert cbed.destroy(0) == -1
    assert cbed.destroy(4000) == -3
