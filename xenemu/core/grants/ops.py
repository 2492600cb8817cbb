"""``grant_table_op`` map and unmap, batched like Xen's, and the granting side's entries.

Each op of a batch gets its own ``GNTST_*`` status; IOMMU writes are flushed once per batch.
The grant subsystem keeps each domain's grant table (what it grants) and maptrack (what of
others' it has mapped); it writes IOMMU entries through the ``Iommu`` it is handed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Generator
from typing import Any

from xenemu.abi import ffi
from xenemu.core.errors import E2BIG, EBUSY, EINVAL, ESRCH, HypercallError
from xenemu.core.grants.table import (
    MAP_SIZE,
    NR_GRANT_ENTRIES,
    PAGE_MASK,
    UNMAP_SIZE,
    GNTMAP_device_map,
    GNTMAP_host_map,
    GNTMAP_readonly,
    GNTMAP_request_bfn_map,
    GNTST_bad_dev_addr,
    GNTST_bad_domain,
    GNTST_bad_gntref,
    GNTST_bad_handle,
    GNTST_bad_page,
    GNTST_bad_virt_addr,
    GNTST_general_error,
    GNTST_no_space,
    GNTST_okay,
    GNTST_permission_denied,
    GrantMapping,
    GrantTable,
    GTF_permit_access,
    GTF_readonly,
    GTF_type_mask,
    Maptrack,
)
from xenemu.core.iommu import preempt, xen_changes
from xenemu.core.iommu.state import Iommu
from xenemu.core.memory.domain import Domain
from xenemu.core.memory.frames import PAGE_SHIFT
from xenemu.core.memory.guest import GuestMemory

#: Most ops in one grant_table_op call.
MAX_GRANT_OPS = 4096
U32 = 1 << 32


def _batch(buf: bytearray, count: int, size: int, ctype: str) -> Any:
    if len(buf) != count * size:
        raise HypercallError(-EINVAL, f"buffer is not {count} x {size} bytes")
    if count > MAX_GRANT_OPS:
        raise HypercallError(-E2BIG, f"more than {MAX_GRANT_OPS} ops")
    return ffi.from_buffer(f"{ctype}[]", buf) if count else []


#: Grant ops between two pauses of a batch (each a few dict and table updates: ~10 us).
OPS_PER_SLICE = 128


class Grants:
    """Every domain's grant table and maptrack, and the batched map/unmap that use them."""

    def __init__(self, memory: GuestMemory, iommu: Iommu) -> None:
        self.memory = memory
        self.iommu = iommu
        self.tables: dict[int, GrantTable] = {}
        self.maptracks: dict[int, Maptrack] = {}
        #: Grant mappings of each frame, so a toolstack's question about one frame does not
        #: scan every domain's maptrack.
        self.maps_of_frame: Counter[int] = Counter()

    def add_domain(self, domid: int) -> None:
        self.tables[domid] = GrantTable()
        self.maptracks[domid] = Maptrack()

    def table(self, domid: int) -> GrantTable:
        """The caller's own grant table (-ESRCH if it is not a live domain)."""
        self.memory.domain(domid)
        return self.tables[domid]

    def release_domain(self, mapper: Domain) -> None:
        """A dying domain lets go of every grant of others it mapped (no flush; at most
        ``MAX_MAPTRACK``), and its own table goes: mappings of its grants stay until their
        mappers unmap them."""
        domid = mapper.domid
        for mapping in list(self.maptracks[domid].mappings.values()):
            self.release_mapping(mapper, mapping)
        del self.maptracks[domid]
        del self.tables[domid]

    def grant_access(self, caller: int, ref: int, domid: int, gfn: int, readonly: bool = False) -> None:
        """The granter writes entry ``ref``: ``domid`` may map its ``gfn``."""
        table = self.table(caller)
        if not 0 <= ref < NR_GRANT_ENTRIES or not 0 <= gfn < U32 or not 0 <= domid < 1 << 16:
            raise HypercallError(-EINVAL, "grant ref, domid or frame out of range")
        if ref in table.pins:
            raise HypercallError(-EBUSY, f"grant {ref} is mapped")
        entry = table.entries[ref]
        entry.domid = domid
        entry.frame = gfn
        entry.flags = GTF_permit_access | (GTF_readonly if readonly else 0)

    def end_access(self, caller: int, ref: int) -> None:
        """Revoke entry ``ref``; refused while it is mapped, as Xen's end_foreign_access is."""
        table = self.table(caller)
        if not 0 <= ref < NR_GRANT_ENTRIES:
            raise HypercallError(-EINVAL, "grant ref out of range")
        if ref in table.pins:
            raise HypercallError(-EBUSY, f"grant {ref} is still mapped")
        entry = table.entries[ref]
        entry.flags = 0
        entry.domid = 0
        entry.frame = 0

    def map_grant_refs(self, caller: int, buf: bytearray, count: int) -> int:
        """``mapping`` run to its end (tests and scripts)."""
        return preempt.drain(self.mapping(caller, buf, count))

    def unmap_grant_refs(self, caller: int, buf: bytearray, count: int) -> int:
        """``unmapping`` run to its end (tests and scripts)."""
        return preempt.drain(self.unmapping(caller, buf, count))

    def mapping(self, caller: int, buf: bytearray, count: int) -> Generator[str, None, int]:
        """``GNTTABOP_map_grant_ref``: each op on its own, pausing every ``OPS_PER_SLICE``."""
        return self._batched(caller, buf, count, MAP_SIZE, "gnttab_map_grant_ref_t", self._map_one)

    def unmapping(self, caller: int, buf: bytearray, count: int) -> Generator[str, None, int]:
        """``GNTTABOP_unmap_grant_ref``: each op on its own, pausing every ``OPS_PER_SLICE``."""
        return self._batched(caller, buf, count, UNMAP_SIZE, "gnttab_unmap_grant_ref_t", self._unmap_one)

    def _batched(
        self, caller: int, buf: bytearray, count: int, size: int, ctype: str, one: Callable[[Domain, Any], int]
    ) -> Generator[str, None, int]:
        """A batch of grant ops, a slice at a time (4,096 of them were one step of 50 ms):
        flushed before each pause; the rest never runs if the caller was destroyed meanwhile."""
        mapper = self.memory.domain(caller)
        if mapper.busy_ops:  # one of its IOMMU ops of many pages is mid-flight
            return -EBUSY
        for i, op in enumerate(_batch(buf, count, size, ctype)):
            if i and not i % OPS_PER_SLICE:
                self.iommu.flush_touched()
                yield preempt.PREEMPT
                if self.memory.domains.get(caller) is not mapper:
                    return -ESRCH
                if mapper.busy_ops:
                    return -EBUSY
            op.status = one(mapper, op)
        self.iommu.flush_touched()
        return 0

    def _map_one(self, mapper: Domain, op: Any) -> int:
        flags = op.flags
        if not flags & (GNTMAP_device_map | GNTMAP_host_map):
            return GNTST_bad_gntref
        granter = self.memory.resolve_foreign(op.dom)
        if granter is None or granter is mapper:
            return GNTST_bad_domain
        ref = op.ref
        if ref >= NR_GRANT_ENTRIES:
            return GNTST_bad_gntref
        entry = self.tables[granter.domid].entries[ref]
        if entry.flags & GTF_type_mask != GTF_permit_access or entry.domid != mapper.domid:
            return GNTST_bad_gntref
        readonly = bool(flags & GNTMAP_readonly)
        if not readonly and entry.flags & GTF_readonly:
            return GNTST_permission_denied
        mfn = self.memory.gfn_to_mfn(granter, entry.frame)
        if mfn is None:
            return GNTST_bad_page
        if flags & GNTMAP_host_map and (not op.host_addr or op.host_addr & PAGE_MASK):
            return GNTST_bad_virt_addr
        bfn = None
        if flags & GNTMAP_device_map and flags & GNTMAP_request_bfn_map:
            addr = op.dev_bus_addr
            if addr & PAGE_MASK:
                return GNTST_bad_dev_addr
            bfn = addr >> PAGE_SHIFT
            check = xen_changes.check_grant_bfn(self.iommu, mapper, bfn)
            if check == "quota":
                return GNTST_no_space
            if check != "ok":
                return GNTST_bad_dev_addr if check in ("reserved", "mapped") else GNTST_general_error
        handle = self.maptracks[mapper.domid].allocate()
        if handle is None or not self.iommu.quota_allows(mapper, 1):
            return GNTST_no_space
        dev_bus_addr = mfn << PAGE_SHIFT if flags & GNTMAP_device_map and bfn is None else 0
        self.maptracks[mapper.domid].mappings[handle] = GrantMapping(
            handle, granter.domid, self.tables[granter.domid], ref, mfn, readonly, op.host_addr, bfn, dev_bus_addr
        )
        self.iommu.frames.get(mfn, not readonly)
        self.maps_of_frame[mfn] += 1
        self.iommu.count_mappings(mapper.domid, 1)
        self.tables[granter.domid].pin(ref, readonly)
        if bfn is not None:
            xen_changes.map_grant(self.iommu, mapper, bfn, mfn, readonly)
        elif dev_bus_addr:
            op.dev_bus_addr = dev_bus_addr
        op.handle = handle
        return GNTST_okay

    def _unmap_one(self, mapper: Domain, op: Any) -> int:
        mapping = self.maptracks[mapper.domid].mappings.get(op.handle)
        if mapping is None:
            return GNTST_bad_handle
        if op.host_addr and op.host_addr != mapping.host_addr:
            return GNTST_bad_virt_addr
        bus = mapping.bfn << PAGE_SHIFT if mapping.bfn is not None else mapping.dev_bus_addr
        if op.dev_bus_addr and op.dev_bus_addr != bus:
            return GNTST_bad_dev_addr
        if mapping.bfn is not None and (mapper.domid, mapping.bfn) in self.iommu.injected_faults:
            return GNTST_general_error
        self.release_mapping(mapper, mapping)
        return GNTST_okay

    def release_mapping(self, mapper: Domain, mapping: GrantMapping) -> None:
        """Drop a grant mapping: its IOMMU entry, its references, the granter's pin (no flush)."""
        del self.maptracks[mapper.domid].mappings[mapping.handle]
        if mapping.bfn is not None:
            xen_changes.unmap_grant(self.iommu, mapper.domid, mapping.bfn)
        self.iommu.frames.put(mapping.mfn, not mapping.readonly)
        self.maps_of_frame[mapping.mfn] -= 1
        if not self.maps_of_frame[mapping.mfn]:
            del self.maps_of_frame[mapping.mfn]
        self.iommu.count_mappings(mapper.domid, -1)
        if self.tables.get(mapping.granter) is mapping.granter_table:  # the same granter, still alive
            mapping.granter_table.unpin(mapping.ref, mapping.readonly)
