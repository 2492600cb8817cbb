"""Build ``struct pv_iommu_op`` batches from Python values and read them back.

Shared by the client library, the guest programs and the tests, so that every one of
them packs the ABI the same way: through cffi, from the C header.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from xenemu.abi import OP_SIZE, const, ffi
from xenemu.abi.errno import errno_name

QUERY_CAPS = const("IOMMUOP_query_caps")
MAP_PAGE = const("IOMMUOP_map_page")
UNMAP_PAGE = const("IOMMUOP_unmap_page")
MAP_FOREIGN_PAGE = const("IOMMUOP_map_foreign_page")
LOOKUP_FOREIGN_PAGE = const("IOMMUOP_lookup_foreign_page")
UNMAP_FOREIGN_PAGE = const("IOMMUOP_unmap_foreign_page")

R = const("IOMMU_OP_readable")
W = const("IOMMU_OP_writeable")
RW = R | W
NO_REF_CNT = const("IOMMU_MAP_OP_no_ref_cnt")
#: Flag bits a map or unmap op must leave clear (-EINVAL otherwise).
MAP_RESERVED = const("IOMMU_OP_map_reserved_mask")
UNMAP_RESERVED = const("IOMMU_OP_unmap_reserved_mask")
SWAP_MFN = const("IOMMUOP_swap_mfn")
ORDER_SHIFT = const("IOMMU_page_order_shift")
MAP_CAP = const("IOMMU_QUERY_map_cap")
MAP_ALL_GFNS = const("IOMMU_QUERY_map_all_gfns")
DOMID_SELF = const("DOMID_SELF")

SUBOP_NAMES = {
    QUERY_CAPS: "query_caps",
    MAP_PAGE: "map_page",
    UNMAP_PAGE: "unmap_page",
    MAP_FOREIGN_PAGE: "map_foreign_page",
    LOOKUP_FOREIGN_PAGE: "lookup_foreign_page",
    UNMAP_FOREIGN_PAGE: "unmap_foreign_page",
}
_MEMBER = {
    MAP_PAGE: "map_page",
    UNMAP_PAGE: "unmap_page",
    MAP_FOREIGN_PAGE: "map_foreign_page",
    LOOKUP_FOREIGN_PAGE: "lookup_foreign_page",
    UNMAP_FOREIGN_PAGE: "unmap_foreign_page",
}


@dataclass(frozen=True, repr=False)
class Op:
    """One op as Python values; fields a subop does not use stay 0.

    It prints by its subop's name, with the fields that are set:
    ``Op(map_page, flags=0x3, bfn=0x1000, gfn=0x5, status=OK)``.
    """

    subop: int
    flags: int = 0
    bfn: int = 0
    gfn: int = 0
    domid: int = 0
    ioserver: int = 0
    status: int = 0

    @property
    def order(self) -> int:
        return self.flags >> ORDER_SHIFT

    @property
    def status_name(self) -> str:
        return errno_name(self.status)

    def with_status(self, status: int) -> Op:
        return replace(self, status=status)

    def __repr__(self) -> str:
        parts = [SUBOP_NAMES.get(self.subop, f"subop={self.subop}")]
        parts += [f"{name}={value:#x}" for name, value in self._set_fields()]
        parts.append(f"status={self.status_name}")
        return f"Op({', '.join(parts)})"

    def _set_fields(self) -> list[tuple[str, int]]:
        fields = [("flags", self.flags), ("bfn", self.bfn), ("gfn", self.gfn)]
        fields += [("domid", self.domid), ("ioserver", self.ioserver)]
        return [(name, value) for name, value in fields if value]


def _flags(perms: int, order: int, extra: int = 0) -> int:
    if not 0 <= order < 64:
        raise ValueError("page order must be within 0..63")
    return perms | extra | (order << ORDER_SHIFT)


def query_caps() -> Op:
    return Op(QUERY_CAPS)


def map_page(bfn: int, gfn: int, perms: int = RW, order: int = 0, no_ref_cnt: bool = False) -> Op:
    return Op(MAP_PAGE, _flags(perms, order, NO_REF_CNT if no_ref_cnt else 0), bfn, gfn)


def unmap_page(bfn: int, order: int = 0) -> Op:
    return Op(UNMAP_PAGE, _flags(0, order), bfn)


def map_foreign_page(
    bfn: int, gfn: int, domid: int, ioserver: int, perms: int = RW, order: int = 0, swap_mfn: bool = False
) -> Op:
    return Op(MAP_FOREIGN_PAGE, _flags(perms, order, SWAP_MFN if swap_mfn else 0), bfn, gfn, domid, ioserver)


def lookup_foreign_page(gfn: int, domid: int, ioserver: int) -> Op:
    return Op(LOOKUP_FOREIGN_PAGE, 0, 0, gfn, domid, ioserver)


def unmap_foreign_page(bfn: int, ioserver: int, order: int = 0) -> Op:
    return Op(UNMAP_FOREIGN_PAGE, _flags(0, order), bfn, ioserver=ioserver)


def pack(ops: Sequence[Op]) -> bytearray:
    """The batch as the bytes ``do_iommu_op`` takes."""
    buf = bytearray(len(ops) * OP_SIZE)
    if not ops:
        return buf
    view = ffi.from_buffer("struct pv_iommu_op[]", buf)
    for slot, op in zip(view, ops, strict=True):
        slot.subop_id = op.subop
        slot.flags = op.flags
        slot.status = op.status
        member = _MEMBER.get(op.subop)
        if member is None:
            # Unknown subop: fill the widest member so raw fields still round-trip.
            member = "map_foreign_page"
        u = getattr(slot.u, member)
        u.bfn = op.bfn
        if member in ("map_page", "map_foreign_page", "lookup_foreign_page"):
            u.gfn = op.gfn
        if member in ("map_foreign_page", "lookup_foreign_page"):
            u.domid = op.domid
        if member in ("map_foreign_page", "lookup_foreign_page", "unmap_foreign_page"):
            u.ioserver = op.ioserver
    return buf


def unpack(buf: bytes | bytearray) -> list[Op]:
    """The ops in a buffer (a multiple of 32 bytes), decoded by each one's subop."""
    if len(buf) % OP_SIZE:
        raise ValueError(f"buffer of {len(buf)} bytes is not a whole number of {OP_SIZE}-byte ops")
    if not buf:
        return []
    view = ffi.from_buffer("struct pv_iommu_op[]", bytearray(buf))
    out = []
    for slot in view:
        member = _MEMBER.get(slot.subop_id, "map_foreign_page")
        u = getattr(slot.u, member)
        out.append(
            Op(
                slot.subop_id,
                slot.flags,
                u.bfn,
                getattr(u, "gfn", 0),
                getattr(u, "domid", 0),
                getattr(u, "ioserver", 0),
                slot.status,
            )
        )
    return out


def statuses(ops: Iterable[Op]) -> list[str]:
    return [op.status_name for op in ops]
