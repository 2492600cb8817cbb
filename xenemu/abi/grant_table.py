"""Build ``gnttab_map_grant_ref`` / ``gnttab_unmap_grant_ref`` batches and read them back."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from xenemu.abi import const, ffi

DEVICE_MAP = const("GNTMAP_device_map")
HOST_MAP = const("GNTMAP_host_map")
READONLY = const("GNTMAP_readonly")
REQUEST_BFN_MAP = const("GNTMAP_request_bfn_map")

STATUS_NAMES = {
    const(name): name
    for name in (
        "GNTST_okay",
        "GNTST_general_error",
        "GNTST_bad_domain",
        "GNTST_bad_gntref",
        "GNTST_bad_handle",
        "GNTST_bad_virt_addr",
        "GNTST_bad_dev_addr",
        "GNTST_no_device_space",
        "GNTST_permission_denied",
        "GNTST_bad_page",
        "GNTST_bad_copy_arg",
        "GNTST_address_too_big",
        "GNTST_eagain",
        "GNTST_no_space",
    )
}


@dataclass(frozen=True)
class MapGrant:
    dom: int
    ref: int
    flags: int
    host_addr: int = 0
    dev_bus_addr: int = 0
    status: int = 0
    handle: int = 0

    @property
    def status_name(self) -> str:
        return STATUS_NAMES.get(self.status, str(self.status))


@dataclass(frozen=True)
class UnmapGrant:
    handle: int
    host_addr: int = 0
    dev_bus_addr: int = 0
    status: int = 0

    @property
    def status_name(self) -> str:
        return STATUS_NAMES.get(self.status, str(self.status))


def map_at_bfn(dom: int, ref: int, bfn: int, readonly: bool = False) -> MapGrant:
    """A device map at a bus address the caller picks (draft B)."""
    flags = DEVICE_MAP | REQUEST_BFN_MAP | (READONLY if readonly else 0)
    return MapGrant(dom, ref, flags, dev_bus_addr=bfn << 12)


def pack_map(ops: Sequence[MapGrant]) -> bytes:
    buf = bytearray(len(ops) * ffi.sizeof("gnttab_map_grant_ref_t"))
    if ops:
        for slot, op in zip(ffi.from_buffer("gnttab_map_grant_ref_t[]", buf), ops, strict=True):
            slot.host_addr, slot.flags, slot.ref, slot.dom = op.host_addr, op.flags, op.ref, op.dom
            slot.status, slot.handle, slot.dev_bus_addr = op.status, op.handle, op.dev_bus_addr
    return bytes(buf)


def unpack_map(buf: bytes) -> list[MapGrant]:
    if not buf:
        return []
    view = ffi.from_buffer("gnttab_map_grant_ref_t[]", bytearray(buf))
    return [MapGrant(s.dom, s.ref, s.flags, s.host_addr, s.dev_bus_addr, s.status, s.handle) for s in view]


def pack_unmap(ops: Sequence[UnmapGrant]) -> bytes:
    buf = bytearray(len(ops) * ffi.sizeof("gnttab_unmap_grant_ref_t"))
    if ops:
        for slot, op in zip(ffi.from_buffer("gnttab_unmap_grant_ref_t[]", buf), ops, strict=True):
            slot.handle, slot.host_addr, slot.dev_bus_addr, slot.status = (
                op.handle,
                op.host_addr,
                op.dev_bus_addr,
                op.status,
            )
    return bytes(buf)


def unpack_unmap(buf: bytes) -> list[UnmapGrant]:
    if not buf:
        return []
    view = ffi.from_buffer("gnttab_unmap_grant_ref_t[]", bytearray(buf))
    return [UnmapGrant(s.handle, s.host_addr, s.dev_bus_addr, s.status) for s in view]
