"""Host options: what kind of machine xenemu pretends to be."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

DomainKind = Literal["pv", "hvm"]

#: The largest page order an IOMMU host offers (1 GiB pages).
IOMMU_MAX_ORDER = 18


@dataclass(frozen=True)
class HostOptions:
    iommu: bool = True
    dom0_strict: bool = False
    dom0_passthrough: bool = False
    #: Largest page order; forced to 0 without an IOMMU.
    max_order: int = IOMMU_MAX_ORDER
    #: Machine RAM in 4 KiB frames.
    nr_frames: int = 1 << 16
    #: Low frames that belong to Xen, all alike (each IOREQ server gets a scratch frame of its
    #: own from the free pool).
    xen_frames: int = 16
    dom0_memory: int = 4096
    dom0_kind: DomainKind = "pv"
    max_ops_per_call: int = 65536
    continuation_every: int = 1024
    #: Mappings one domain may hold at once (map_page, M2B and grant mappings), unless its
    #: toolstack gave it another quota.
    max_mappings: int = 1 << 22
    #: Page-table leaves (4 KiB each) a domain's context may hold beyond its own memory, where
    #: mapping sparse BFNs puts them: a map that needs more is -EDQUOT.
    max_sparse_leaves: int = 1024
    #: The GICv3 ITS: physical ITSs, physical CPUs, each pITS's queue slots and command rate,
    #: commands per vITS batch, and the elision policy (lazy, eager or off).
    its_pits: int = 1
    its_cpus: int = 4
    its_queue_slots: int = 32768
    its_rate: float = 2_000_000.0
    vits_batch_size: int = 8
    its_elision: str = "lazy"
    #: Allows ``inject_fault`` (tests only).
    fault_injection: bool = False
    #: Runs map_page/unmap_page's common case in compiled code (when it was built); the
    #: results are the same either way, which the test suite checks by running both.
    fast_path: bool = True

    def __post_init__(self) -> None:
        if self.dom0_strict and self.dom0_passthrough:
            raise ValueError("dom0-strict and dom0-passthrough are mutually exclusive")
        if not 0 <= self.max_order <= 63:
            raise ValueError("max_order must be within 0..63 (six bits)")
        if self.xen_frames < 1:
            raise ValueError("xen_frames must be at least 1")
        if self.nr_frames < self.xen_frames + self.dom0_memory:
            raise ValueError("nr_frames too small for Xen's frames and dom0's memory")
        if self.continuation_every < 1 or self.max_ops_per_call < 1:
            raise ValueError("max_ops_per_call and continuation_every must be positive")
        if self.its_elision not in ("lazy", "eager", "off"):
            raise ValueError("its_elision must be lazy, eager or off")
        if self.its_pits < 1 or self.its_cpus < 1 or self.its_queue_slots < 4 or self.vits_batch_size < 1:
            raise ValueError("bad ITS options")
        if self.dom0_kind not in ("pv", "hvm"):
            raise ValueError("dom0_kind must be 'pv' or 'hvm'")

    @property
    def largest_order(self) -> int:
        return self.max_order if self.iommu else 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> HostOptions:
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown host options: {', '.join(sorted(unknown))}")
        return cls(**values)
