"""The emulator's foreign subops and its IOREQ servers (pv-iommu-semantics.md; PROTOCOL.md
7.2, 9 and 12.3)."""

from __future__ import annotations

from xenemu.abi import pv_iommu as ops
from xenemu.abi.pv_iommu import RW, R
from xenemu.conformance.cases.common import hwdom_device, one, st
from xenemu.conformance.rules import rule
from xenemu.conformance.target import Bed

S = "12.3"
FI = ("fault_injection",)


@rule(
    "FOREIGN-MAP",
    S,
    "map_foreign_page takes a reference per BFN; an identical map is OK; swap_mfn maps again",
    core=True,
)
def map_foreign(bed: Bed) -> None:
    guest = bed.guest()
    dm, server = bed.emulator(guest)
    mfn = bed.mfn(guest, 4)
    got = one(bed, dm, ops.map_foreign_page(0x800, 4, guest, server))
    assert got.status_name == "OK" and got.bfn == 0x800
    assert bed.refs(mfn) == (2, 1)
    assert st(bed, dm, ops.map_foreign_page(0x800, 4, guest, server)) == "OK"  # identical
    assert bed.refs(mfn) == (2, 1)
    assert st(bed, dm, ops.map_foreign_page(0x800, 4, guest, server, R)) == "-EEXIST"
    assert st(bed, dm, ops.map_foreign_page(0x801, 4, guest, server, R, swap_mfn=True)) == "OK"
    assert bed.refs(mfn) == (3, 1)
    bed.guest_write(guest, 4, b"shared")
    assert bed.dma(dm, "0000:00:05.0", 0x801 << 12, length=6)["data"] == b"shared"
    assert st(bed, dm, ops.unmap_foreign_page(0x800, server)) == "OK"
    assert st(bed, dm, ops.unmap_foreign_page(0x801, server)) == "OK"
    assert bed.refs(mfn) == (1, 0)


@rule("FOREIGN-MAP-STATUS", S, "map_foreign_page's statuses, each in the specification's order of checks", core=True)
def map_foreign_status(bed: Bed) -> None:
    guest = bed.guest(memory=16)
    other = bed.guest(device=None)
    dm, server = bed.emulator(guest)
    for bit in range(3, 10):
        op = ops.Op(ops.MAP_FOREIGN_PAGE, RW | (1 << bit), 0x800, 4, guest, server)
        assert st(bed, dm, op) == "-EINVAL", f"bit {bit}"
    assert st(bed, dm, ops.map_foreign_page(0x800, 4, guest, server, perms=0)) == "-EINVAL"
    assert st(bed, dm, ops.map_foreign_page(0x801, 4, guest, server, order=1)) == "-ENOSPC"
    assert st(bed, dm, ops.map_foreign_page(0x800, 5, guest, server, order=1)) == "-ENOSPC"
    assert st(bed, dm, ops.map_foreign_page(0x800, 4, dm, server)) == "-EPERM"
    assert st(bed, dm, ops.map_foreign_page(0x800, 4, ops.DOMID_SELF, server)) == "-EPERM"
    for bad in (4000, 0x7FF2, 0x7FF4):
        assert st(bed, dm, ops.map_foreign_page(0x800, 4, bad, server)) == "-ENXIO", f"domid {bad:#x}"
    assert st(bed, dm, ops.map_foreign_page(0x800, 4, other, server)) == "-EPERM"
    assert st(bed, dm, ops.map_foreign_page(0x800, 4, guest, server + 1000)) == "-ENODEV"
    assert st(bed, dm, ops.map_foreign_page(0x800, 16, guest, server)) == "-ENXIO"


@rule(
    "FOREIGN-MAP-EIO",
    S,
    "an IOMMU fault on one page fails the whole foreign op with -EIO, no reference kept",
    needs=FI,
    core=True,
)
def map_foreign_eio(bed: Bed) -> None:
    guest = bed.guest(memory=16)
    dm, server = bed.emulator(guest)
    bed.inject_fault(dm, 0x803)
    assert st(bed, dm, ops.map_foreign_page(0x800, 8, guest, server, order=2)) == "-EIO"
    assert bed.refs(bed.mfn(guest, 8)) == (1, 0)
    bed.inject_fault(dm, 0x803, clear=True)


@rule("FOREIGN-NO-MAP-CAP", S, "map_foreign_page by an emulator without an IOMMU context is -EOPNOTSUPP", core=True)
def no_map_cap(bed: Bed) -> None:
    guest = bed.guest()
    dm, server = bed.emulator(guest, device=None)
    assert st(bed, dm, ops.map_foreign_page(0x800, 4, guest, server)) == "-EOPNOTSUPP"


@rule("FOREIGN-RMRR", S, "foreign map and unmap in one of the caller's RMRR regions are -EACCES", core=True)
def foreign_rmrr(bed: Bed) -> None:
    guest = bed.guest()
    dm, server = bed.emulator(guest, device=None)
    assert bed.assign(dm, "00:05.0", [(5, 1)]) == 0
    assert st(bed, dm, ops.map_foreign_page(5, 4, guest, server)) == "-EACCES"
    assert st(bed, dm, ops.unmap_foreign_page(5, server)) == "-EACCES"


@rule(
    "FOREIGN-NO-IOMMU",
    S,
    "without an IOMMU map_foreign_page returns the MFN as the BFN",
    host={"iommu": False},
    core=True,
)
def foreign_no_iommu(bed: Bed) -> None:
    guest = bed.guest(device=None)
    dm, server = bed.emulator(guest)
    mfn = bed.mfn(guest, 4)
    got = one(bed, dm, ops.map_foreign_page(0x12345, 4, guest, server))
    assert got.status_name == "OK" and got.bfn == mfn
    assert st(bed, dm, ops.map_foreign_page(0, 4, guest, server, R)) == "-EEXIST"
    looked = one(bed, dm, ops.lookup_foreign_page(4, guest, server))
    assert looked.bfn == mfn and looked.flags == RW
    assert bed.refs(mfn) == (2, 1)
    assert st(bed, dm, ops.unmap_foreign_page(mfn, server)) == "OK"
    assert bed.refs(mfn) == (1, 0)


@rule(
    "FOREIGN-LOOKUP",
    S,
    "lookup_foreign_page maps at the MFN once, writes bfn and R/W flags, and its statuses",
    core=True,
)
def lookup(bed: Bed) -> None:
    guest = bed.guest()
    dm, server = bed.emulator(guest, device=None)
    mfn = bed.mfn(guest, 6)
    got = one(bed, dm, ops.Op(ops.LOOKUP_FOREIGN_PAGE, flags=0xFFFF, bfn=7, gfn=6, domid=guest, ioserver=server))
    assert got.status_name == "OK" and got.bfn == mfn and got.flags == RW
    assert bed.refs(mfn) == (2, 1)
    assert one(bed, dm, ops.lookup_foreign_page(6, guest, server)).bfn == mfn
    assert bed.refs(mfn) == (2, 1)
    assert st(bed, dm, ops.lookup_foreign_page(6, dm, server)) == "-EPERM"
    assert st(bed, dm, ops.lookup_foreign_page(6, 4000, server)) == "-ENXIO"
    assert st(bed, dm, ops.lookup_foreign_page(6, guest, server + 1000)) == "-ENODEV"
    assert st(bed, dm, ops.lookup_foreign_page(1000, guest, server)) == "-ENXIO"
    assert st(bed, dm, ops.unmap_foreign_page(mfn, server)) == "OK"


@rule(
    "FOREIGN-LOOKUP-LOWEST",
    S,
    "with a context, lookup_foreign_page finds the lowest BFN the server mapped, or -ENOENT",
    core=True,
)
def lookup_lowest(bed: Bed) -> None:
    guest = bed.guest()
    dm, server = bed.emulator(guest)
    assert st(bed, dm, ops.lookup_foreign_page(4, guest, server)) == "-ENOENT"
    assert st(bed, dm, ops.map_foreign_page(0x900, 4, guest, server, R)) == "OK"
    assert st(bed, dm, ops.map_foreign_page(0x880, 4, guest, server, R)) == "OK"
    got = one(bed, dm, ops.lookup_foreign_page(4, guest, server))
    assert got.bfn == 0x880 and got.flags == R


@rule(
    "FOREIGN-HWDOM-LOOKUP",
    S,
    "the non-strict hardware domain's lookup takes over its default entry without a flush",
    host={"dom0_strict": False, "dom0_passthrough": False},
    core=True,
)
def hwdom_lookup(bed: Bed) -> None:
    guest = bed.guest()
    hwdom_device(bed)
    server = bed.ioreq_server(0, guest)
    # a frame whose 1:1 default entry dom0 still has (an earlier run on this daemon may have
    # taken one over and unmapped it: defaults do not come back by themselves)
    gfn = next((g for g in range(4, 64) if bed.dma(0, "0000:00:02.0", bed.mfn(guest, g) << 12, length=1)["ok"]), None)
    assert gfn is not None, "dom0 has no default entry for any of the guest's frames"
    mfn = bed.mfn(guest, gfn)
    before = bed.flushes(0)
    got = one(bed, 0, ops.lookup_foreign_page(gfn, guest, server))
    assert got.bfn == mfn and got.flags == RW
    assert bed.flushes(0) == before
    assert bed.refs(mfn) == (2, 1)
    assert st(bed, 0, ops.unmap_foreign_page(mfn, server)) == "OK"
    assert not bed.dma(0, "0000:00:02.0", mfn << 12, length=1)["ok"]


@rule(
    "FOREIGN-UNMAP-STATUS",
    S,
    "unmap_foreign_page's statuses: reserved bits, order, the server's own BFNs only",
    core=True,
)
def unmap_foreign_status(bed: Bed) -> None:
    guest = bed.guest()
    dm, server = bed.emulator(guest)
    assert st(bed, dm, ops.map_foreign_page(0x800, 4, guest, server)) == "OK"
    for bit in range(10):
        op = ops.Op(ops.UNMAP_FOREIGN_PAGE, 1 << bit, 0x800, ioserver=server)
        assert st(bed, dm, op) == "-EINVAL", f"bit {bit}"
    assert st(bed, dm, ops.unmap_foreign_page(0x801, server, order=1)) == "-ENOSPC"
    assert st(bed, dm, ops.unmap_foreign_page(0x800, server + 1)) == "-ENOENT"
    assert st(bed, guest, ops.unmap_foreign_page(0x800, server)) == "-ENOENT"
    assert st(bed, dm, ops.unmap_page(0x800)) == "-ENOENT"
    assert st(bed, dm, ops.unmap_foreign_page(0x800, server)) == "OK"


@rule("FOREIGN-UNMAP-EIO", S, "an IOMMU fault makes unmap_foreign_page -EIO and keeps the mapping", needs=FI, core=True)
def unmap_foreign_eio(bed: Bed) -> None:
    guest = bed.guest()
    dm, server = bed.emulator(guest)
    assert st(bed, dm, ops.map_foreign_page(0x800, 4, guest, server)) == "OK"
    bed.inject_fault(dm, 0x800)
    assert st(bed, dm, ops.unmap_foreign_page(0x800, server)) == "-EIO"
    assert bed.refs(bed.mfn(guest, 4)) == (2, 1)
    bed.inject_fault(dm, 0x800, clear=True)
    assert st(bed, dm, ops.unmap_foreign_page(0x800, server)) == "OK"


@rule(
    "FOREIGN-IOREQ-SERVER",
    S,
    "create_ioreq_server: -EPERM unless privileged over the target, -ESRCH for no domain",
    core=True,
)
def ioreq_servers(bed: Bed) -> None:
    guest = bed.guest()
    other = bed.guest(device=None)
    dm = bed.guest("pv", 8, None, target=guest)
    assert bed.ioreq_server(dm, other) == -1
    assert bed.ioreq_server(dm, dm) == -1
    assert bed.ioreq_server(dm, 4000) == -3
    assert bed.ioreq_server(guest, other) == -1
    assert bed.ioreq_server(dm, guest) > 0


@rule("FOREIGN-DESTROY", S, "destroying a guest frees its frames except those an emulator still maps", core=True)
def destroy_releases(bed: Bed) -> None:
    guest = bed.guest(memory=16)
    dm, server = bed.emulator(guest)
    mfn = bed.mfn(guest, 2)
    assert st(bed, dm, ops.map_foreign_page(0x800, 2, guest, server)) == "OK"
    assert bed.destroy(guest) == 0
    assert bed.refs(mfn) == (1, 1)
    assert st(bed, dm, ops.unmap_foreign_page(0x800, server)) == "OK"
    assert bed.refs(mfn) == (0, 0)
    assert bed.destroy(0) == -1
    assert bed.destroy(4000) == -3
