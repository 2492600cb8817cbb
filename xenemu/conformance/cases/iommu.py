"""PV IOMMU subops of the caller's own context: query_caps, map_page, unmap_page
(pv-iommu-semantics.md; PROTOCOL.md 7.1 and 12.2)."""

from __future__ import annotations

from xenemu.abi import pv_iommu as ops
from xenemu.abi.pv_iommu import RW, R, W
from xenemu.conformance.cases.common import hwdom_device, one, st
from xenemu.conformance.rules import rule
from xenemu.conformance.target import Bed

S = "12.2"
FI = ("fault_injection",)
#: The cases that read the order back expect xenemu's default largest order (2^18 pages).
ORDER18 = {"max_order": 18}


@rule("IOMMU-CAPS", S, "query_caps: MAP_CAP with a device, the largest order in bits 10..15", host=ORDER18, core=True)
def caps(bed: Bed) -> None:
    with_dev = bed.guest()
    without = bed.guest(device=None)
    assert one(bed, with_dev, ops.query_caps()).flags == ops.MAP_CAP | (18 << 10)
    assert one(bed, without, ops.query_caps()).flags == 18 << 10


@rule(
    "IOMMU-CAPS-HWDOM",
    S,
    "the non-strict hardware domain also gets MAP_ALL_GFNS",
    host={**ORDER18, "dom0_strict": False, "dom0_passthrough": False},
    core=True,
)
def caps_hwdom(bed: Bed) -> None:
    hwdom_device(bed)
    assert one(bed, 0, ops.query_caps()).flags == ops.MAP_CAP | ops.MAP_ALL_GFNS | (18 << 10)


@rule(
    "IOMMU-CAPS-STRICT",
    S,
    "a strict hardware domain gets MAP_CAP only",
    host={**ORDER18, "dom0_strict": True},
    core=True,
)
def caps_strict(bed: Bed) -> None:
    hwdom_device(bed)
    assert one(bed, 0, ops.query_caps()).flags == ops.MAP_CAP | (18 << 10)


@rule(
    "IOMMU-CAPS-PASSTHROUGH",
    S,
    "a passthrough hardware domain has no map_cap; map_page is -EOPNOTSUPP",
    host={**ORDER18, "dom0_passthrough": True},
    core=True,
)
def caps_passthrough(bed: Bed) -> None:
    hwdom_device(bed)
    assert one(bed, 0, ops.query_caps()).flags == 18 << 10
    assert st(bed, 0, ops.map_page(0x100000, 600)) == "-EOPNOTSUPP"


@rule(
    "IOMMU-NO-IOMMU",
    S,
    "without an IOMMU query_caps reports nothing and map_page is -EOPNOTSUPP",
    host={"iommu": False},
    core=True,
)
def no_iommu(bed: Bed) -> None:
    g = bed.guest("pv")
    assert one(bed, g, ops.query_caps()).flags == 0
    assert st(bed, g, ops.map_page(0x1000, 1)) == "-EOPNOTSUPP"


@rule(
    "IOMMU-MAX-ORDER",
    S,
    "query_caps reports the host's largest order; beyond it is -ENOSPC",
    host={"max_order": 4},
    core=True,
)
def max_order(bed: Bed) -> None:
    g = bed.guest()
    assert one(bed, g, ops.query_caps()).order == 4
    assert st(bed, g, ops.map_page(0x1000, 16, order=5)) == "-ENOSPC"
    assert st(bed, g, ops.map_page(0x1000, 16, order=4)) == "OK"


@rule("IOMMU-MAP-REFS", S, "a mapping holds a general reference, and a writable-type one if writable", core=True)
def map_refs(bed: Bed) -> None:
    g = bed.guest()
    mfn = bed.mfn(g, 5)
    assert bed.refs(mfn) == (1, 0)
    assert st(bed, g, ops.map_page(0x1000, 5, RW)) == "OK"
    assert st(bed, g, ops.map_page(0x1001, 5, R)) == "OK"
    assert bed.refs(mfn) == (3, 1)
    assert st(bed, g, ops.unmap_page(0x1000)) == "OK"
    assert st(bed, g, ops.unmap_page(0x1001)) == "OK"
    assert bed.refs(mfn) == (1, 0)


@rule("IOMMU-DMA-PERMS", S, "device DMA goes through the mapping and honours its R/W permissions", core=True)
def dma_perms(bed: Bed) -> None:
    g = bed.guest()
    bed.guest_write(g, 7, b"hello dma", 100)
    assert st(bed, g, ops.map_page(0x2000, 7)) == "OK"
    got = bed.dma(g, "0000:00:03.0", (0x2000 << 12) + 100, length=9)
    assert got["ok"] and got["data"] == b"hello dma"
    assert st(bed, g, ops.map_page(0x2001, 8, R)) == "OK"
    assert not bed.dma(g, "0000:00:03.0", 0x2001 << 12, b"no")["ok"]
    assert st(bed, g, ops.map_page(0x2002, 8, W)) == "OK"
    assert not bed.dma(g, "0000:00:03.0", 0x2002 << 12, length=1)["ok"]


@rule("IOMMU-MAP-RESERVED", S, "map_page with a reserved flag bit, or neither R nor W, is -EINVAL", core=True)
def map_reserved(bed: Bed) -> None:
    g = bed.guest()
    for bit in range(3, 10):
        assert st(bed, g, ops.Op(ops.MAP_PAGE, RW | (1 << bit), 0x1000, 1)) == "-EINVAL", f"bit {bit}"
    assert st(bed, g, ops.map_page(0x1000, 1, perms=0)) == "-EINVAL"


@rule("IOMMU-MAP-STATUS", S, "map_page's statuses, each in the specification's order of checks", core=True)
def map_status(bed: Bed) -> None:
    g = bed.guest(memory=16, rmrr=[(4, 1)])
    nodev = bed.guest(device=None)
    assert st(bed, nodev, ops.map_page(0x1000, 1)) == "-EOPNOTSUPP"
    assert st(bed, g, ops.map_page(0x1000, 1, no_ref_cnt=True)) == "-EPERM"
    assert st(bed, g, ops.map_page(0x1000, 1, order=19)) == "-ENOSPC"
    assert st(bed, g, ops.map_page(0x1001, 2, order=1)) == "-ENOSPC"
    assert st(bed, g, ops.map_page(0x1000, 3, order=1)) == "-ENOSPC"
    assert st(bed, g, ops.map_page(0x1000, 16)) == "-EPERM"
    assert st(bed, g, ops.map_page(4, 1)) == "-EACCES"
    assert st(bed, g, ops.map_page(0x1000, 1)) == "OK"
    assert st(bed, g, ops.map_page(0x1000, 2)) == "-EEXIST"


@rule("IOMMU-MAP-EIO", S, "an IOMMU fault at the BFN makes map_page -EIO, and it changes nothing", needs=FI, core=True)
def map_eio(bed: Bed) -> None:
    g = bed.guest(memory=16)
    bed.inject_fault(g, 0x1001)
    assert st(bed, g, ops.map_page(0x1000, 2, order=1)) == "-EIO"
    assert bed.refs(bed.mfn(g, 2)) == (1, 0)
    bed.inject_fault(g, 0x1001, clear=True)
    assert st(bed, g, ops.map_page(0x1001, 2)) == "OK"


@rule("IOMMU-PV-FRAMES", S, "a PV guest maps only frames it owns", core=True)
def pv_frames(bed: Bed) -> None:
    g = bed.guest("pv", 16)
    mine = bed.owned_frame(g)
    assert st(bed, g, ops.map_page(0x4000, mine)) == "OK"
    assert bed.refs(mine) == (2, 1)
    assert st(bed, g, ops.map_page(0x4001, 3)) == "-EPERM"
    assert st(bed, g, ops.map_page(0x4001, bed.owned_frame(0))) == "-EPERM"


@rule("IOMMU-UNMAP-STATUS", S, "unmap_page's statuses, each in the specification's order of checks", core=True)
def unmap_status(bed: Bed) -> None:
    g = bed.guest(rmrr=[(4, 1)])
    nodev = bed.guest(device=None)
    assert st(bed, nodev, ops.unmap_page(1)) == "-ENOENT"
    assert st(bed, g, ops.unmap_page(0x5000)) == "-ENOENT"
    assert st(bed, g, ops.unmap_page(4)) == "-EACCES"
    assert st(bed, g, ops.unmap_page(1, order=1)) == "-ENOSPC"
    assert st(bed, g, ops.unmap_page(0, order=19)) == "-ENOSPC"
    for bit in range(10):
        assert st(bed, g, ops.Op(ops.UNMAP_PAGE, 1 << bit, 0x1000)) == "-EINVAL", f"bit {bit}"


@rule(
    "IOMMU-UNMAP-EIO", S, "an IOMMU fault at the BFN makes unmap_page -EIO and keeps the mapping", needs=FI, core=True
)
def unmap_eio(bed: Bed) -> None:
    g = bed.guest()
    assert st(bed, g, ops.map_page(0x1000, 1)) == "OK"
    bed.inject_fault(g, 0x1000)
    assert st(bed, g, ops.unmap_page(0x1000)) == "-EIO"
    assert bed.refs(bed.mfn(g, 1)) == (2, 1)
    bed.inject_fault(g, 0x1000, clear=True)
    assert st(bed, g, ops.unmap_page(0x1000)) == "OK"


@rule(
    "IOMMU-DEFAULT-ENTRIES",
    S,
    "default entries map the guest 1:1; replacing one is a modified flush; unmapping removes it",
    core=True,
)
def default_entries(bed: Bed) -> None:
    g = bed.guest()
    bed.guest_write(g, 9, b"default")
    assert bed.dma(g, "0000:00:03.0", 9 << 12, length=7)["data"] == b"default"
    before = bed.flushes(g)
    assert st(bed, g, ops.map_page(9, 10, R)) == "OK"
    assert bed.flushes(g)["modified"] == before["modified"] + 1
    assert st(bed, g, ops.unmap_page(9)) == "OK"
    assert st(bed, g, ops.unmap_page(9)) == "-ENOENT"
    assert not bed.dma(g, "0000:00:03.0", 9 << 12, length=1)["ok"]


@rule("IOMMU-ORDERS", S, "an op of order N covers 2^N pages, atomically", core=True)
def orders(bed: Bed) -> None:
    g = bed.guest()
    assert st(bed, g, ops.map_page(0x1000, 8, order=3)) == "OK"
    assert bed.refs(bed.mfn(g, 12)) == (2, 1)
    assert st(bed, g, ops.unmap_page(0x1002, order=1)) == "OK"
    assert bed.refs(bed.mfn(g, 10)) == (1, 0)
    assert st(bed, g, ops.unmap_page(0x1000, order=3)) == "-ENOENT"  # atomic: pages 2, 3 are gone
    assert bed.refs(bed.mfn(g, 8)) == (2, 1)
    assert st(bed, g, ops.map_page(0x2002, 50)) == "OK"
    assert st(bed, g, ops.map_page(0x2000, 16, order=2)) == "-EEXIST"
    assert bed.refs(bed.mfn(g, 16)) == (1, 0)


@rule(
    "IOMMU-HWDOM-MAPS",
    S,
    "the non-strict hardware domain maps any guest's frame; no_ref_cnt only for free frames",
    host={"dom0_strict": False, "dom0_passthrough": False},
    core=True,
)
def hwdom_maps(bed: Bed) -> None:
    hwdom_device(bed)
    g = bed.guest()
    theirs = bed.mfn(g, 0)
    free = bed.nr_frames - 1
    assert st(bed, 0, ops.map_page(0x100000, theirs)) == "OK"
    assert bed.refs(theirs) == (2, 1)
    assert st(bed, 0, ops.map_page(0x100001, 3)) == "-EPERM"
    assert st(bed, 0, ops.map_page(0x100002, bed.nr_frames)) == "-EPERM"
    assert st(bed, 0, ops.map_page(0x100003, free)) == "-EPERM"
    assert st(bed, 0, ops.map_page(0x100003, free, no_ref_cnt=True)) == "OK"
    assert bed.refs(free) == (0, 0)
    assert st(bed, 0, ops.unmap_page(0x100003)) == "OK"
    assert st(bed, 0, ops.unmap_page(0x100000)) == "OK"


@rule(
    "IOMMU-STRICT-HWDOM-MAPS",
    S,
    "a strict hardware domain maps only its own frames, with references",
    host={"dom0_strict": True},
    core=True,
)
def strict_hwdom_maps(bed: Bed) -> None:
    hwdom_device(bed)
    g = bed.guest()
    assert st(bed, 0, ops.map_page(0x100000, bed.mfn(g, 0))) == "-EPERM"
    assert st(bed, 0, ops.map_page(0x100000, bed.owned_frame(0), no_ref_cnt=True)) == "-EPERM"
    assert st(bed, 0, ops.map_page(0x100000, bed.owned_frame(0))) == "OK"
    assert st(bed, 0, ops.unmap_page(0x100000)) == "OK"


@rule("IOMMU-STATUS-ONLY", S, "an unknown subop is -EOPNOTSUPP; a failed op writes only its status", core=True)
def status_only(bed: Bed) -> None:
    g = bed.guest()
    batch = [ops.Op(9, flags=0xABCD, bfn=5), ops.map_page(0x1000, 999, RW | 32), ops.map_page(0x1000, 1)]
    got = bed.call(g, batch)
    assert ops.statuses(got) == ["-EOPNOTSUPP", "-EINVAL", "OK"]
    assert [op.with_status(0) for op in got] == [op.with_status(0) for op in batch]
