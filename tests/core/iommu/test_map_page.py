"""query_caps, map_page and unmap_page: every status, page orders, references, flushes."""

from __future__ import annotations

import pytest

from tests.bed import Bed
from xenemu.abi import pv_iommu as ops
from xenemu.abi.pv_iommu import RW, R, W
from xenemu.core.iommu.entries import Kind, entry_kind


def caps(bed: Bed, domid: int) -> int:
    op = bed.one(domid, ops.query_caps())
    assert op.status == 0
    return op.flags


# -- query_caps ---------------------------------------------------------------------------------
def test_query_caps_guest_with_device(bed: Bed) -> None:
    g = bed.guest()
    assert caps(bed, g.domid) == ops.MAP_CAP | (18 << 10)


def test_query_caps_guest_without_device(bed: Bed) -> None:
    g = bed.guest(device=None)
    assert caps(bed, g.domid) == 18 << 10


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({}, ops.MAP_CAP | ops.MAP_ALL_GFNS),
        ({"dom0_strict": True}, ops.MAP_CAP),
        ({"dom0_passthrough": True}, 0),
    ],
)
def test_query_caps_hardware_domain_modes(options: dict[str, bool], expected: int) -> None:
    bed = Bed(**options)
    bed.host.assign_device(0, "00:02.0")
    assert caps(bed, 0) == expected | (18 << 10)


def test_query_caps_without_iommu() -> None:
    bed = Bed(iommu=False)
    g = bed.guest("pv")  # a PV guest may have a device without an IOMMU; an HVM one may not
    bed.host.assign_device(0, "00:02.0")
    assert caps(bed, g.domid) == 0
    assert caps(bed, 0) == 0


def test_query_caps_ignores_input_flags_and_bfn(bed: Bed) -> None:
    g = bed.guest()
    op = bed.one(g.domid, ops.Op(ops.QUERY_CAPS, flags=0xFFFF, bfn=7))
    assert op.status == 0 and op.flags == ops.MAP_CAP | (18 << 10)


def test_largest_order_is_a_host_option() -> None:
    bed = Bed(max_order=9)
    g = bed.guest()
    assert caps(bed, g.domid) >> 10 == 9
    assert bed.status(g.domid, ops.map_page(0, 0, order=10)) == "-ENOSPC"


# -- map_page success, references and data --------------------------------------------------------
def test_map_page_takes_general_and_writable_references(bed: Bed) -> None:
    g = bed.guest()
    mfn = bed.mfn(g, 5)
    assert bed.refs(mfn) == (1, 0)
    assert bed.status(g.domid, ops.map_page(0x1000, 5, RW)) == "OK"
    assert bed.refs(mfn) == (2, 1)
    assert bed.status(g.domid, ops.map_page(0x1001, 5, R)) == "OK"
    assert bed.refs(mfn) == (3, 1)
    assert bed.status(g.domid, ops.unmap_page(0x1000)) == "OK"
    assert bed.status(g.domid, ops.unmap_page(0x1001)) == "OK"
    assert bed.refs(mfn) == (1, 0)


def test_device_reads_what_the_guest_wrote(bed: Bed) -> None:
    g = bed.guest()
    bed.host.memory.access(g.domid, 7, 100, b"hello dma")
    assert bed.status(g.domid, ops.map_page(0x2000, 7)) == "OK"
    result = bed.host.device_dma("00:03.0", (0x2000 << 12) + 100, length=9)
    assert result.ok and result.data == b"hello dma"
    bed.host.device_dma("00:03.0", 0x2000 << 12, b"from device")
    assert bed.host.memory.access(g.domid, 7, 0, None, 11) == b"from device"


def test_read_only_mapping_refuses_device_writes(bed: Bed) -> None:
    g = bed.guest()
    assert bed.status(g.domid, ops.map_page(0x3000, 1, R)) == "OK"
    assert bed.host.device_dma("00:03.0", 0x3000 << 12, length=4).ok
    result = bed.host.device_dma("00:03.0", 0x3000 << 12, b"x")
    assert not result.ok and result.reason == "write denied"
    assert g.domid in bed.host.iommu.contexts and bed.ctx(g).fault_count == 1


def test_write_only_mapping_refuses_device_reads(bed: Bed) -> None:
    g = bed.guest()
    assert bed.status(g.domid, ops.map_page(0x3000, 1, W)) == "OK"
    assert not bed.host.device_dma("00:03.0", 0x3000 << 12, length=4).ok


def test_pv_guest_maps_its_own_frames(bed: Bed) -> None:
    g = bed.guest("pv")
    mine = next(m for m in range(bed.host.frames.nr_frames) if bed.host.frames.belongs_to(m, g.domid))
    assert bed.status(g.domid, ops.map_page(0x4000, mine)) == "OK"
    assert bed.refs(mine) == (2, 1)


# -- map_page errors --------------------------------------------------------------------------------
@pytest.mark.parametrize("bit", range(3, 10))
def test_map_page_reserved_flag_bits(bed: Bed, bit: int) -> None:
    g = bed.guest()
    assert bed.status(g.domid, ops.Op(ops.MAP_PAGE, RW | (1 << bit), 0x10, 1)) == "-EINVAL"


def test_map_page_needs_r_or_w(bed: Bed) -> None:
    g = bed.guest()
    assert bed.status(g.domid, ops.map_page(0x10, 1, perms=0)) == "-EINVAL"


def test_map_page_without_map_cap(bed: Bed) -> None:
    g = bed.guest(device=None)
    assert bed.status(g.domid, ops.map_page(0x10, 1)) == "-EOPNOTSUPP"


def test_map_page_without_iommu() -> None:
    bed = Bed(iommu=False)
    g = bed.guest("pv")
    assert bed.status(g.domid, ops.map_page(0x10, 1)) == "-EOPNOTSUPP"


def test_map_page_hwdom_passthrough() -> None:
    bed = Bed(dom0_passthrough=True)
    bed.host.assign_device(0, "00:02.0")
    assert bed.status(0, ops.map_page(0x10, 600)) == "-EOPNOTSUPP"


def test_no_ref_cnt_only_for_non_strict_hwdom(bed: Bed) -> None:
    g = bed.guest()
    assert bed.status(g.domid, ops.map_page(0x10, 1, no_ref_cnt=True)) == "-EPERM"
    strict = Bed(dom0_strict=True)
    strict.host.assign_device(0, "00:02.0")
    mine = next(m for m in range(20, 2000) if strict.host.frames.belongs_to(m, 0))
    assert strict.status(0, ops.map_page(0x100000, mine, no_ref_cnt=True)) == "-EPERM"


@pytest.mark.parametrize(
    ("op", "why"),
    [
        (ops.map_page(0x10, 1, order=19), "order too large"),
        (ops.map_page(0x11, 2, order=1), "bfn misaligned"),
        (ops.map_page(0x10, 3, order=1), "gfn misaligned"),
    ],
)
def test_map_page_enospc(bed: Bed, op: ops.Op, why: str) -> None:
    g = bed.guest()
    assert bed.status(g.domid, op) == "-ENOSPC", why


def test_map_page_unpopulated_gfn(bed: Bed) -> None:
    g = bed.guest(memory=8)
    assert bed.status(g.domid, ops.map_page(0x10, 8)) == "-EPERM"


def test_pv_guest_cannot_map_other_frames(bed: Bed) -> None:
    g = bed.guest("pv")
    dom0_frame = next(m for m in range(20, 2000) if bed.host.frames.belongs_to(m, 0))
    assert bed.status(g.domid, ops.map_page(0x10, dom0_frame)) == "-EPERM"
    assert bed.status(g.domid, ops.map_page(0x10, 0)) == "-EPERM"  # Xen's


def test_hwdom_maps_any_ram_frame_but_xens() -> None:
    bed = Bed()
    bed.host.assign_device(0, "00:02.0")
    g = bed.guest()
    theirs = bed.mfn(g, 0)
    free = bed.host.frames.nr_frames - 1
    assert bed.host.frames.is_free(free)
    assert bed.status(0, ops.map_page(0x100000, theirs)) == "OK"
    assert bed.refs(theirs) == (2, 1)
    assert bed.status(0, ops.map_page(0x100001, 3)) == "-EPERM"  # Xen's frame
    assert bed.status(0, ops.map_page(0x100002, bed.host.frames.nr_frames)) == "-EPERM"  # beyond RAM
    assert bed.status(0, ops.map_page(0x100003, free)) == "-EPERM"  # free needs no_ref_cnt
    assert bed.status(0, ops.map_page(0x100003, free, no_ref_cnt=True)) == "OK"
    assert bed.refs(free) == (0, 0)
    assert bed.host.frames.is_free(free)
    assert bed.status(0, ops.unmap_page(0x100003)) == "OK"


def test_strict_hwdom_maps_only_its_own() -> None:
    bed = Bed(dom0_strict=True)
    bed.host.assign_device(0, "00:02.0")
    g = bed.guest()
    assert bed.status(0, ops.map_page(0x100000, bed.mfn(g, 0))) == "-EPERM"
    mine = next(m for m in range(20, 2000) if bed.host.frames.belongs_to(m, 0))
    assert bed.status(0, ops.map_page(0x100000, mine)) == "OK"


def test_hvm_hwdom_goes_through_its_p2m() -> None:
    bed = Bed(dom0_kind="hvm")
    bed.host.assign_device(0, "00:02.0")
    assert bed.status(0, ops.map_page(0x100000, 3)) == "OK"
    assert bed.host.hwdom.domid in bed.host.iommu.contexts
    entry = bed.ctx(bed.host.hwdom).table.get(0x100000)
    assert entry >> 8 == bed.mfn(bed.host.hwdom, 3)
    assert bed.status(0, ops.map_page(0x100001, 600)) == "-EPERM"  # not in its p2m


def test_map_page_rmrr_conflict(bed: Bed) -> None:
    g = bed.guest(rmrr=[(4, 2)])
    assert bed.status(g.domid, ops.map_page(5, 1)) == "-EACCES"
    assert bed.status(g.domid, ops.map_page(4, 2, order=1)) == "-EACCES"


def test_map_page_over_existing_mapping(bed: Bed) -> None:
    g = bed.guest()
    assert bed.status(g.domid, ops.map_page(0x1000, 1)) == "OK"
    assert bed.status(g.domid, ops.map_page(0x1000, 2)) == "-EEXIST"
    assert bed.status(g.domid, ops.map_page(0x1000, 1)) == "-EEXIST"


def test_map_page_injected_fault(bed: Bed) -> None:
    g = bed.guest()
    bed.host.iommu.inject_fault(g.domid, 0x1001)
    before = bed.flushes(g)
    assert bed.status(g.domid, ops.map_page(0x1000, 0, order=1)) == "-EIO"
    assert g.domid in bed.host.iommu.contexts and not bed.ctx(g).table.get(0x1000)
    assert bed.flushes(g) == before
    bed.host.iommu.clear_fault(g.domid, 0x1001)
    assert bed.status(g.domid, ops.map_page(0x1000, 0, order=1)) == "OK"


def test_fault_injection_is_off_by_default() -> None:
    from xenemu.core.errors import HypercallError

    bed = Bed(fault_injection=False)
    g = bed.guest()
    with pytest.raises(HypercallError):
        bed.host.iommu.inject_fault(g.domid, 1)


# -- page orders ----------------------------------------------------------------------------------
def test_order_map_covers_every_page_and_smaller_unmap_splits_it(bed: Bed) -> None:
    g = bed.guest()
    assert bed.status(g.domid, ops.map_page(0x1000, 8, order=3)) == "OK"
    ctx = bed.ctx(g)
    assert ctx is not None
    for i in range(8):
        assert ctx.table.get(0x1000 + i) >> 8 == bed.mfn(g, 8 + i)
    assert bed.status(g.domid, ops.unmap_page(0x1002, order=1)) == "OK"
    assert not ctx.table.get(0x1002) and not ctx.table.get(0x1003)
    assert ctx.table.get(0x1004)
    assert bed.refs(bed.mfn(g, 10)) == (1, 0)
    assert bed.refs(bed.mfn(g, 12)) == (2, 1)


def test_order_map_is_atomic(bed: Bed) -> None:
    g = bed.guest()
    assert bed.status(g.domid, ops.map_page(0x1002, 50)) == "OK"
    before = [bed.refs(bed.mfn(g, 8 + i)) for i in range(4)]
    assert bed.status(g.domid, ops.map_page(0x1000, 8, order=2)) == "-EEXIST"
    assert [bed.refs(bed.mfn(g, 8 + i)) for i in range(4)] == before
    assert g.domid in bed.host.iommu.contexts
    assert not bed.ctx(g).table.get(0x1000) and not bed.ctx(g).table.get(0x1001)


def test_order_map_fails_on_first_bad_page(bed: Bed) -> None:
    g = bed.guest(memory=10)
    bed.host.iommu.inject_fault(g.domid, 0x1003)
    # page 2 (gfn 10) is unpopulated, page 3 faults: the first failing page decides
    assert bed.status(g.domid, ops.map_page(0x1000, 8, order=2)) == "-EPERM"


def test_order_unmap_is_atomic(bed: Bed) -> None:
    g = bed.guest()
    assert bed.status(g.domid, ops.map_page(0x1000, 8, order=1)) == "OK"
    assert bed.status(g.domid, ops.unmap_page(0x1000, order=2)) == "-ENOENT"
    assert g.domid in bed.host.iommu.contexts and bed.ctx(g).table.get(0x1000)


# -- unmap_page -------------------------------------------------------------------------------------
def test_unmap_nothing(bed: Bed) -> None:
    g = bed.guest()
    assert bed.status(g.domid, ops.unmap_page(0x5000)) == "-ENOENT"


def test_unmap_without_context(bed: Bed) -> None:
    g = bed.guest(device=None)
    assert bed.status(g.domid, ops.unmap_page(1)) == "-ENOENT"


@pytest.mark.parametrize("bit", range(0, 10))
def test_unmap_reserved_bits(bed: Bed, bit: int) -> None:
    g = bed.guest()
    assert bed.status(g.domid, ops.Op(ops.UNMAP_PAGE, 1 << bit, 1)) == "-EINVAL"


def test_unmap_enospc(bed: Bed) -> None:
    g = bed.guest()
    assert bed.status(g.domid, ops.unmap_page(1, order=1)) == "-ENOSPC"
    assert bed.status(g.domid, ops.unmap_page(0, order=19)) == "-ENOSPC"


def test_unmap_rmrr(bed: Bed) -> None:
    g = bed.guest(rmrr=[(4, 1)])
    assert bed.status(g.domid, ops.unmap_page(4)) == "-EACCES"


def test_unmap_injected_fault(bed: Bed) -> None:
    g = bed.guest()
    assert bed.status(g.domid, ops.map_page(0x1000, 1)) == "OK"
    bed.host.iommu.inject_fault(g.domid, 0x1000)
    assert bed.status(g.domid, ops.unmap_page(0x1000)) == "-EIO"
    assert bed.refs(bed.mfn(g, 1)) == (2, 1)


def test_unmap_removes_a_default_entry_for_good(bed: Bed) -> None:
    g = bed.guest()
    ctx = bed.ctx(g)
    assert ctx is not None
    assert entry_kind(ctx.table.get(9)) == Kind.DEFAULT
    assert bed.status(g.domid, ops.unmap_page(9)) == "OK"
    assert not ctx.table.get(9)
    assert bed.status(g.domid, ops.unmap_page(9)) == "-ENOENT"
    assert not bed.host.device_dma("00:03.0", 9 << 12, length=1).ok


def test_map_replaces_a_default_entry(bed: Bed) -> None:
    g = bed.guest()
    assert bed.status(g.domid, ops.map_page(3, 7, R)) == "OK"
    assert g.domid in bed.host.iommu.contexts
    entry = bed.ctx(g).table.get(3)
    assert entry_kind(entry) == Kind.MAP and entry >> 8 == bed.mfn(g, 7)
    assert bed.flushes(g)["modified"] == 1


def test_unknown_subop_leaves_flags(bed: Bed) -> None:
    g = bed.guest()
    for subop in (0, 7, 0xFFFF):
        op = bed.one(g.domid, ops.Op(subop, flags=0xABCD, bfn=5))
        assert op.status_name == "-EOPNOTSUPP" and op.flags == 0xABCD and op.bfn == 5


def test_failed_op_writes_only_status(bed: Bed) -> None:
    g = bed.guest()
    sent = ops.map_page(0x1000, 999, RW | (1 << 5))
    got = bed.one(g.domid, sent)
    assert got == sent.with_status(got.status) and got.status_name == "-EINVAL"


def test_failures_do_not_stop_the_batch(bed: Bed) -> None:
    g = bed.guest()
    got = bed.call(g.domid, [ops.map_page(0x10, 1), ops.map_page(0x10, 2), ops.map_page(0x11, 2)])
    assert ops.statuses(got) == ["OK", "-EEXIST", "OK"]


# -- precedence of checks -----------------------------------------------------------------------------
def test_check_order_reserved_before_capability(bed: Bed) -> None:
    g = bed.guest(device=None)
    assert bed.status(g.domid, ops.Op(ops.MAP_PAGE, RW | 8, 1, 1)) == "-EINVAL"


def test_check_order_capability_before_no_ref_and_order(bed: Bed) -> None:
    g = bed.guest(device=None)
    assert bed.status(g.domid, ops.map_page(1, 1, no_ref_cnt=True, order=19)) == "-EOPNOTSUPP"


def test_check_order_no_ref_before_order(bed: Bed) -> None:
    g = bed.guest()
    assert bed.status(g.domid, ops.map_page(1, 1, no_ref_cnt=True, order=19)) == "-EPERM"


def test_check_order_rmrr_before_exists_before_fault(bed: Bed) -> None:
    g = bed.guest(rmrr=[(4, 1)])
    bed.host.iommu.inject_fault(g.domid, 4)
    assert bed.status(g.domid, ops.map_page(4, 1)) == "-EACCES"
    assert bed.status(g.domid, ops.map_page(0x100, 1)) == "OK"
    bed.host.iommu.inject_fault(g.domid, 0x100)
    assert bed.status(g.domid, ops.map_page(0x100, 2)) == "-EEXIST"
