"""Grant tables: a guest lends a frame to one other domain, which maps it, possibly for DMA.

Draft B's change is that a backend using the PV IOMMU picks the bus address itself
(``GNTMAP_request_bfn_map``): the grant is then mapped at that BFN of its IOMMU context exactly
as ``map_page`` would map its own frame. A mapping (a maptrack handle) holds the frame's
references, so a granted frame outlives a balloon-out or its granter until it is unmapped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from xenemu.abi import const, ffi
from xenemu.core.memory.frames import PAGE_SHIFT

#: Entries in each domain's grant table (v1: 512 per 4 KiB frame, two frames).
NR_GRANT_ENTRIES = 1024
#: Grant mappings one domain may hold at once.
MAX_MAPTRACK = 4096

GTF_permit_access = const("GTF_permit_access")
GTF_type_mask = const("GTF_type_mask")
GTF_readonly = const("GTF_readonly")
GTF_reading = const("GTF_reading")
GTF_writing = const("GTF_writing")
GNTMAP_device_map = const("GNTMAP_device_map")
GNTMAP_host_map = const("GNTMAP_host_map")
GNTMAP_readonly = const("GNTMAP_readonly")
GNTMAP_request_bfn_map = const("GNTMAP_request_bfn_map")

GNTST_okay = const("GNTST_okay")
GNTST_general_error = const("GNTST_general_error")
GNTST_bad_domain = const("GNTST_bad_domain")
GNTST_bad_gntref = const("GNTST_bad_gntref")
GNTST_bad_handle = const("GNTST_bad_handle")
GNTST_bad_virt_addr = const("GNTST_bad_virt_addr")
GNTST_bad_dev_addr = const("GNTST_bad_dev_addr")
GNTST_permission_denied = const("GNTST_permission_denied")
GNTST_bad_page = const("GNTST_bad_page")
GNTST_no_space = const("GNTST_no_space")

MAP_SIZE = ffi.sizeof("gnttab_map_grant_ref_t")
UNMAP_SIZE = ffi.sizeof("gnttab_unmap_grant_ref_t")
PAGE_MASK = (1 << PAGE_SHIFT) - 1


@dataclass(eq=False)
class GrantMapping:
    """One maptrack entry of the mapping domain."""

    handle: int
    granter: int
    #: The granter's table itself: a mapping outliving its granter must never unpin the table
    #: of a later domain that was given the same id.
    granter_table: GrantTable
    ref: int
    mfn: int
    readonly: bool
    host_addr: int
    #: BFN in the mapper's context when mapped with GNTMAP_request_bfn_map.
    bfn: int | None
    #: The bus address handed back (the machine address) without it.
    dev_bus_addr: int


class GrantTable:
    """A domain's own grant entries (the page Xen shares with it), and who has them pinned."""

    def __init__(self) -> None:
        self.raw = bytearray(NR_GRANT_ENTRIES * ffi.sizeof("grant_entry_v1_t"))
        self.entries: Any = ffi.from_buffer("grant_entry_v1_t[]", self.raw)
        #: ref -> (read-only pins, writable pins)
        self.pins: dict[int, list[int]] = {}

    def pin(self, ref: int, readonly: bool) -> None:
        pins = self.pins.setdefault(ref, [0, 0])
        pins[0 if readonly else 1] += 1
        self._sync_flags(ref)

    def unpin(self, ref: int, readonly: bool) -> None:
        pins = self.pins[ref]
        pins[0 if readonly else 1] -= 1
        if pins == [0, 0]:
            del self.pins[ref]
        self._sync_flags(ref)

    def _sync_flags(self, ref: int) -> None:
        """GTF_reading / GTF_writing say the entry is in use, as Xen sets them."""
        entry = self.entries[ref]
        readers, writers = self.pins.get(ref, (0, 0))
        flags = entry.flags & ~(GTF_reading | GTF_writing)
        if readers or writers:
            flags |= GTF_reading
        if writers:
            flags |= GTF_writing
        entry.flags = flags


@dataclass
class Maptrack:
    mappings: dict[int, GrantMapping] = field(default_factory=dict)
    next_handle: int = 0

    def allocate(self) -> int | None:
        if len(self.mappings) >= MAX_MAPTRACK:
            return None
        for _ in range(MAX_MAPTRACK):
            handle = self.next_handle
            self.next_handle = (self.next_handle + 1) % MAX_MAPTRACK
            if handle not in self.mappings:
                return handle
        return None
