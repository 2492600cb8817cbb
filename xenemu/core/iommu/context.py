"""A domain's IOMMU context: its page table, IOTLB, reserved BFNs and the flush it owes.

Flushes are deferred: each change notes the type it needs, and the context applies the
highest one once per call or continuation segment (seed 002's flush elision).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from xenemu.core.iommu.entries import FlushType
from xenemu.core.iommu.iotlb import Iotlb
from xenemu.core.iommu.pagetable import PageTable


@dataclass
class DmaFault:
    bdf: str
    bfn: int
    write: bool
    reason: str


@dataclass(eq=False)
class IommuContext:
    """One domain's IOMMU state: what its devices see."""

    domid: int
    table: PageTable
    iotlb: Iotlb = field(default_factory=Iotlb)
    #: RMRR BFNs -> how many assigned devices reserve them.
    rmrr: dict[int, int] = field(default_factory=dict)
    #: Doorbell BFNs -> the pITS behind them (also in ``rmrr``: no subop may touch them).
    doorbells: dict[int, int] = field(default_factory=dict)
    #: Scratch entries' BFN -> the IOREQ server they belong to.
    scratch: dict[int, int] = field(default_factory=dict)
    pending_flush: FlushType = FlushType.NONE
    flushes: dict[str, int] = field(default_factory=lambda: {"added": 0, "modified": 0})
    #: When False, flushes are counted but the IOTLB keeps its entries (tests only).
    flush_enabled: bool = True
    faults: list[DmaFault] = field(default_factory=list)
    fault_count: int = 0
    #: The dirty bits of its entries (iommufd's dirty tracking): BFN -> the frame a device
    #: wrote through it, set by DMA writes while ``Iommu.dirty_tracking`` is on and read and
    #: cleared by a live migration's rounds. The frame is kept with the bit, so a write through
    #: an entry unmapped (or a stale IOTLB entry) before the round reads it is not lost. At
    #: most one per BFN the context can translate.
    dirty: dict[int, int] = field(default_factory=dict)

    def note(self, flush: FlushType) -> None:
        if flush > self.pending_flush:
            self.pending_flush = flush

    def flush(self) -> FlushType:
        """Apply the pending flush once, at the highest type accumulated."""
        flush = self.pending_flush
        if flush is FlushType.NONE:
            return flush
        self.pending_flush = FlushType.NONE
        self.flushes[flush.name.lower()] += 1
        if flush is FlushType.MODIFIED and self.flush_enabled:
            self.iotlb.invalidate_all()
        return flush

    def record_fault(self, fault: DmaFault, keep: int = 256) -> None:
        self.fault_count += 1
        self.faults.append(fault)
        if len(self.faults) > keep:
            del self.faults[0]
