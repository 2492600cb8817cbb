"""map_foreign_page, lookup_foreign_page, unmap_foreign_page and the M2B."""

from __future__ import annotations

import pytest

from tests.bed import Bed
from xenemu.abi import pv_iommu as ops
from xenemu.abi.pv_iommu import RW, R
from xenemu.core.iommu.entries import Kind, entry_kind
from xenemu.core.memory.domain import Domain


@pytest.fixture
def scene(bed: Bed) -> tuple[Bed, Domain, Domain, int]:
    guest = bed.guest("hvm", 64, "00:03.0")
    dm, server = bed.emulator(guest)
    return bed, guest, dm, server


def test_map_foreign_takes_a_reference_per_new_entry(scene: tuple[Bed, Domain, Domain, int]) -> None:
    bed, guest, dm, server = scene
    mfn = bed.mfn(guest, 4)
    op = bed.one(dm.domid, ops.map_foreign_page(0x800, 4, guest.domid, server))
    assert op.status_name == "OK" and op.bfn == 0x800
    assert bed.refs(mfn) == (2, 1)
    assert len(bed.host.iommu.m2b.for_frame(mfn)) == 1
    # identical entry: succeeds, takes nothing
    assert bed.status(dm.domid, ops.map_foreign_page(0x800, 4, guest.domid, server)) == "OK"
    assert bed.refs(mfn) == (2, 1)
    # the same frame at another BFN: a second entry and reference
    assert bed.status(dm.domid, ops.map_foreign_page(0x801, 4, guest.domid, server, R)) == "OK"
    assert bed.refs(mfn) == (3, 1)
    assert bed.status(dm.domid, ops.unmap_foreign_page(0x800, server)) == "OK"
    assert bed.status(dm.domid, ops.unmap_foreign_page(0x801, server)) == "OK"
    assert bed.refs(mfn) == (1, 0)
    assert len(bed.host.iommu.m2b) == 0


def test_emulator_device_reads_guest_memory(scene: tuple[Bed, Domain, Domain, int]) -> None:
    bed, guest, dm, server = scene
    bed.host.memory.access(guest.domid, 9, 0, b"guest data")
    assert bed.status(dm.domid, ops.map_foreign_page(0x900, 9, guest.domid, server)) == "OK"
    assert bed.host.device_dma("00:05.0", 0x900 << 12, length=10).data == b"guest data"


def test_map_foreign_same_bfn_other_flags_conflicts(scene: tuple[Bed, Domain, Domain, int]) -> None:
    bed, guest, dm, server = scene
    assert bed.status(dm.domid, ops.map_foreign_page(0x800, 4, guest.domid, server)) == "OK"
    assert bed.status(dm.domid, ops.map_foreign_page(0x800, 4, guest.domid, server, R)) == "-EEXIST"
    assert bed.status(dm.domid, ops.map_foreign_page(0x800, 4, guest.domid, server, swap_mfn=True)) == "-EEXIST"
    assert bed.status(dm.domid, ops.map_foreign_page(0x800, 5, guest.domid, server)) == "-EEXIST"


def test_map_foreign_over_own_mapping_conflicts(scene: tuple[Bed, Domain, Domain, int]) -> None:
    bed, guest, dm, server = scene
    mine = next(m for m in range(bed.host.frames.nr_frames) if bed.host.frames.belongs_to(m, dm.domid))
    assert bed.status(dm.domid, ops.map_page(0x800, mine)) == "OK"
    assert bed.status(dm.domid, ops.map_foreign_page(0x800, 4, guest.domid, server)) == "-EEXIST"


@pytest.mark.parametrize("bit", range(3, 10))
def test_map_foreign_reserved_bits(scene: tuple[Bed, Domain, Domain, int], bit: int) -> None:
    bed, guest, dm, server = scene
    op = ops.Op(ops.MAP_FOREIGN_PAGE, RW | (1 << bit), 0x800, 4, guest.domid, server)
    assert bed.status(dm.domid, op) == "-EINVAL"


def test_map_foreign_needs_r_or_w(scene: tuple[Bed, Domain, Domain, int]) -> None:
    bed, guest, dm, server = scene
    assert bed.status(dm.domid, ops.map_foreign_page(0x800, 4, guest.domid, server, perms=0)) == "-EINVAL"


def test_map_foreign_target_checks(scene: tuple[Bed, Domain, Domain, int]) -> None:
    bed, guest, dm, server = scene
    other = bed.guest("hvm", 8, None)
    assert bed.status(dm.domid, ops.map_foreign_page(0x800, 4, dm.domid, server)) == "-EPERM"
    assert bed.status(dm.domid, ops.map_foreign_page(0x800, 4, ops.DOMID_SELF, server)) == "-EPERM"
    for bad in (999, 0x7FF1, 0x7FF2, 0x7FF4, 0xFFFF):
        assert bed.status(dm.domid, ops.map_foreign_page(0x800, 4, bad, server)) == "-ENXIO"
    assert bed.status(dm.domid, ops.map_foreign_page(0x800, 4, other.domid, server)) == "-EPERM"
    assert bed.status(dm.domid, ops.map_foreign_page(0x800, 4, guest.domid, server + 1)) == "-ENODEV"
    assert bed.status(dm.domid, ops.map_foreign_page(0x800, 4, guest.domid, 0)) == "-ENODEV"


def test_ioserver_must_be_the_callers_for_that_domain(bed: Bed) -> None:
    guest = bed.guest()
    other = bed.guest(device="00:04.0")
    bed.host.assign_device(0, "00:02.0")
    _dm, server = bed.emulator(guest)
    dom0_server = bed.host.emulators.create_server(0, other.domid).id
    # dom0 is privileged over the guest, but the server is dm's, or for another domain
    assert bed.status(0, ops.map_foreign_page(0x100000, 4, guest.domid, server)) == "-ENODEV"
    assert bed.status(0, ops.map_foreign_page(0x100000, 4, guest.domid, dom0_server)) == "-ENODEV"
    assert bed.status(0, ops.map_foreign_page(0x100000, 4, other.domid, dom0_server)) == "OK"


def test_map_foreign_gfn_checks(scene: tuple[Bed, Domain, Domain, int]) -> None:
    bed, guest, dm, server = scene
    assert bed.status(dm.domid, ops.map_foreign_page(0x800, 64, guest.domid, server)) == "-ENXIO"


def test_map_foreign_pv_target_frames(bed: Bed) -> None:
    guest = bed.guest("pv", 16, "00:03.0")
    dm, server = bed.emulator(guest)
    frames = bed.host.frames
    theirs = next(m for m in range(frames.nr_frames) if frames.belongs_to(m, guest.domid))
    dom0s = next(m for m in range(frames.nr_frames) if frames.belongs_to(m, 0))
    assert bed.status(dm.domid, ops.map_foreign_page(0x800, theirs, guest.domid, server)) == "OK"
    # For a PV guest a GFN is an MFN: one of Xen's frames is simply not its populated frame.
    assert bed.status(dm.domid, ops.map_foreign_page(0x801, 2, guest.domid, server)) == "-ENXIO"
    scratch = bed.host.ioreq.servers[server].scratch_mfn  # a scratch frame is Xen's too
    assert bed.status(dm.domid, ops.map_foreign_page(0x801, scratch, guest.domid, server)) == "-ENXIO"
    assert bed.status(dm.domid, ops.lookup_foreign_page(2, guest.domid, server)) == "-ENXIO"
    assert bed.status(dm.domid, ops.map_foreign_page(0x801, dom0s, guest.domid, server)) == "-ENXIO"
    assert bed.status(dm.domid, ops.map_foreign_page(0x801, frames.nr_frames + 5, guest.domid, server)) == "-ENXIO"


def test_map_foreign_enospc(scene: tuple[Bed, Domain, Domain, int]) -> None:
    bed, guest, dm, server = scene
    assert bed.status(dm.domid, ops.map_foreign_page(0x801, 4, guest.domid, server, order=1)) == "-ENOSPC"
    assert bed.status(dm.domid, ops.map_foreign_page(0x800, 5, guest.domid, server, order=1)) == "-ENOSPC"
    assert bed.status(dm.domid, ops.map_foreign_page(0, 0, guest.domid, server, order=19)) == "-ENOSPC"


def test_map_foreign_order_is_atomic(scene: tuple[Bed, Domain, Domain, int]) -> None:
    bed, guest, dm, server = scene
    bed.host.iommu.inject_fault(dm.domid, 0x803)
    assert bed.status(dm.domid, ops.map_foreign_page(0x800, 8, guest.domid, server, order=2)) == "-EIO"
    assert len(bed.host.iommu.m2b) == 0
    bed.host.iommu.clear_fault(dm.domid, 0x803)
    assert bed.status(dm.domid, ops.map_foreign_page(0x800, 8, guest.domid, server, order=2)) == "OK"
    assert len(bed.host.iommu.m2b) == 4
    assert bed.status(dm.domid, ops.unmap_foreign_page(0x800, server, order=2)) == "OK"


def test_map_foreign_rmrr(bed: Bed) -> None:
    guest = bed.guest()
    dm, server = bed.emulator(guest, device=None)
    bed.host.assign_device(dm.domid, "00:05.0", [(5, 1)])
    assert bed.status(dm.domid, ops.map_foreign_page(5, 4, guest.domid, server)) == "-EACCES"


def test_map_foreign_without_map_cap(bed: Bed) -> None:
    guest = bed.guest()
    dm, server = bed.emulator(guest, device=None)
    assert bed.status(dm.domid, ops.map_foreign_page(0x800, 4, guest.domid, server)) == "-EOPNOTSUPP"


def test_check_order_capability_before_target(bed: Bed) -> None:
    guest = bed.guest()
    dm, server = bed.emulator(guest, device=None)
    assert bed.status(dm.domid, ops.map_foreign_page(0x800, 4, 999, server)) == "-EOPNOTSUPP"


def test_map_foreign_without_iommu_returns_the_mfn() -> None:
    bed = Bed(iommu=False)
    guest = bed.guest(device=None)  # without an IOMMU an HVM guest gets no device
    dm, server = bed.emulator(guest)
    mfn = bed.mfn(guest, 4)
    op = bed.one(dm.domid, ops.map_foreign_page(0x12345, 4, guest.domid, server))
    assert op.status_name == "OK" and op.bfn == mfn
    assert bed.refs(mfn) == (2, 1)
    assert bed.one(dm.domid, ops.map_foreign_page(0x1, 4, guest.domid, server)).bfn == mfn  # identical
    assert bed.refs(mfn) == (2, 1)
    assert bed.status(dm.domid, ops.map_foreign_page(0, 4, guest.domid, server, R)) == "-EEXIST"
    # the emulator's device sees machine addresses
    bed.host.memory.access(guest.domid, 4, 0, b"mfn")
    assert bed.host.device_dma("00:05.0", mfn << 12, length=3).data == b"mfn"
    assert bed.status(dm.domid, ops.unmap_foreign_page(mfn, server)) == "OK"
    assert bed.refs(mfn) == (1, 0)


def test_no_iommu_other_server_same_frame_is_a_new_entry() -> None:
    bed = Bed(iommu=False)
    guest = bed.guest(device=None)  # without an IOMMU an HVM guest gets no device
    dm, server = bed.emulator(guest)
    second = bed.host.emulators.create_server(dm.domid, guest.domid).id
    assert bed.status(dm.domid, ops.map_foreign_page(0, 4, guest.domid, server)) == "OK"
    assert bed.status(dm.domid, ops.map_foreign_page(0, 4, guest.domid, second, R)) == "OK"
    assert bed.refs(bed.mfn(guest, 4)) == (3, 1)


# -- lookup_foreign_page --------------------------------------------------------------------------------
def test_lookup_without_context_returns_mfn_and_adds_entry(bed: Bed) -> None:
    guest = bed.guest()
    dm, server = bed.emulator(guest, device=None)
    mfn = bed.mfn(guest, 6)
    op = bed.one(
        dm.domid, ops.Op(ops.LOOKUP_FOREIGN_PAGE, flags=0xFFFF, bfn=77, gfn=6, domid=guest.domid, ioserver=server)
    )
    assert op.status_name == "OK" and op.bfn == mfn and op.flags == RW
    assert bed.refs(mfn) == (2, 1)
    again = bed.one(dm.domid, ops.lookup_foreign_page(6, guest.domid, server))
    assert again.bfn == mfn and bed.refs(mfn) == (2, 1)
    assert bed.status(dm.domid, ops.unmap_foreign_page(mfn, server)) == "OK"
    assert bed.refs(mfn) == (1, 0)


def test_lookup_finds_lowest_existing_bfn(scene: tuple[Bed, Domain, Domain, int]) -> None:
    bed, guest, dm, server = scene
    assert bed.status(dm.domid, ops.map_foreign_page(0x900, 4, guest.domid, server, R)) == "OK"
    assert bed.status(dm.domid, ops.map_foreign_page(0x880, 4, guest.domid, server, R)) == "OK"
    op = bed.one(dm.domid, ops.lookup_foreign_page(4, guest.domid, server))
    assert op.status_name == "OK" and op.bfn == 0x880 and op.flags == R
    assert len(bed.host.iommu.m2b) == 2


def test_lookup_with_context_and_no_default_is_enoent(scene: tuple[Bed, Domain, Domain, int]) -> None:
    bed, guest, dm, server = scene
    assert bed.status(dm.domid, ops.lookup_foreign_page(4, guest.domid, server)) == "-ENOENT"


def test_hwdom_lookup_takes_over_its_default_entry(bed: Bed) -> None:
    guest = bed.guest()
    bed.host.assign_device(0, "00:02.0")
    server = bed.host.emulators.create_server(0, guest.domid).id
    mfn = bed.mfn(guest, 4)
    ctx = bed.ctx(bed.dom0)
    assert ctx is not None
    flushes = dict(ctx.flushes)
    op = bed.one(0, ops.lookup_foreign_page(4, guest.domid, server))
    assert op.status_name == "OK" and op.bfn == mfn and op.flags == RW
    assert entry_kind(ctx.table.get(mfn)) == Kind.FOREIGN
    assert ctx.flushes == flushes
    assert bed.refs(mfn) == (2, 1)
    # an identical map_foreign_page is the same entry
    assert bed.status(0, ops.map_foreign_page(mfn, 4, guest.domid, server)) == "OK"
    assert bed.refs(mfn) == (2, 1)
    assert bed.status(0, ops.unmap_foreign_page(mfn, server)) == "OK"
    assert not ctx.table.get(mfn)  # stays unmapped
    assert bed.refs(mfn) == (1, 0)


def test_lookup_takeover_ignores_injected_faults(bed: Bed) -> None:
    guest = bed.guest()
    bed.host.assign_device(0, "00:02.0")
    server = bed.host.emulators.create_server(0, guest.domid).id
    mfn = bed.mfn(guest, 4)
    bed.host.iommu.inject_fault(0, mfn)
    assert bed.status(0, ops.lookup_foreign_page(4, guest.domid, server)) == "OK"


def test_lookup_target_and_gfn_checks(scene: tuple[Bed, Domain, Domain, int]) -> None:
    bed, guest, dm, server = scene
    assert bed.status(dm.domid, ops.lookup_foreign_page(4, dm.domid, server)) == "-EPERM"
    assert bed.status(dm.domid, ops.lookup_foreign_page(4, 4242, server)) == "-ENXIO"
    assert bed.status(dm.domid, ops.lookup_foreign_page(4, guest.domid, 99)) == "-ENODEV"
    assert bed.status(dm.domid, ops.lookup_foreign_page(1000, guest.domid, server)) == "-ENXIO"


def test_lookup_without_iommu() -> None:
    bed = Bed(iommu=False)
    guest = bed.guest(device=None)  # without an IOMMU an HVM guest gets no device
    dm, server = bed.emulator(guest)
    op = bed.one(dm.domid, ops.lookup_foreign_page(3, guest.domid, server))
    assert op.bfn == bed.mfn(guest, 3) and op.flags == RW


# -- unmap_foreign_page -----------------------------------------------------------------------------------
def test_unmap_foreign_wrong_server_or_bfn(scene: tuple[Bed, Domain, Domain, int]) -> None:
    bed, guest, dm, server = scene
    assert bed.status(dm.domid, ops.map_foreign_page(0x800, 4, guest.domid, server)) == "OK"
    assert bed.status(dm.domid, ops.unmap_foreign_page(0x800, server + 1)) == "-ENOENT"
    assert bed.status(dm.domid, ops.unmap_foreign_page(0x801, server)) == "-ENOENT"
    assert bed.status(guest.domid, ops.unmap_foreign_page(0x800, server)) == "-ENOENT"
    assert bed.status(dm.domid, ops.unmap_page(0x800)) == "-ENOENT"


@pytest.mark.parametrize("bit", range(0, 10))
def test_unmap_foreign_reserved_bits(scene: tuple[Bed, Domain, Domain, int], bit: int) -> None:
    bed, _guest, dm, server = scene
    assert bed.status(dm.domid, ops.Op(ops.UNMAP_FOREIGN_PAGE, 1 << bit, 0x800, ioserver=server)) == "-EINVAL"


def test_unmap_foreign_enospc(scene: tuple[Bed, Domain, Domain, int]) -> None:
    bed, _guest, dm, server = scene
    assert bed.status(dm.domid, ops.unmap_foreign_page(0x801, server, order=1)) == "-ENOSPC"


def test_unmap_foreign_rmrr(bed: Bed) -> None:
    guest = bed.guest()
    dm, server = bed.emulator(guest, device=None)
    bed.host.assign_device(dm.domid, "00:05.0", [(5, 1)])
    assert bed.status(dm.domid, ops.unmap_foreign_page(5, server)) == "-EACCES"


def test_unmap_foreign_injected_fault(scene: tuple[Bed, Domain, Domain, int]) -> None:
    bed, guest, dm, server = scene
    assert bed.status(dm.domid, ops.map_foreign_page(0x800, 4, guest.domid, server)) == "OK"
    bed.host.iommu.inject_fault(dm.domid, 0x800)
    assert bed.status(dm.domid, ops.unmap_foreign_page(0x800, server)) == "-EIO"
    assert len(bed.host.iommu.m2b) == 1


def test_unmap_of_contextless_lookup_ignores_faults(bed: Bed) -> None:
    guest = bed.guest()
    dm, server = bed.emulator(guest, device=None)
    mfn = bed.one(dm.domid, ops.lookup_foreign_page(3, guest.domid, server)).bfn
    bed.host.iommu.inject_fault(dm.domid, mfn)
    assert bed.status(dm.domid, ops.unmap_foreign_page(mfn, server)) == "OK"


def test_many_entries_on_one_frame(scene: tuple[Bed, Domain, Domain, int]) -> None:
    bed, guest, dm, server = scene
    mfn = bed.mfn(guest, 4)
    got = bed.call(dm.domid, [ops.map_foreign_page(0x1000 + i, 4, guest.domid, server, R) for i in range(300)])
    assert set(ops.statuses(got)) == {"OK"}
    assert bed.refs(mfn) == (301, 0)
    assert bed.one(dm.domid, ops.lookup_foreign_page(4, guest.domid, server)).bfn == 0x1000
    got = bed.call(dm.domid, [ops.unmap_foreign_page(0x1000 + i, server) for i in range(300)])
    assert set(ops.statuses(got)) == {"OK"}
    assert bed.refs(mfn) == (1, 0)
