"""The IOMMU: what devices see, and the PV IOMMU hypercall that programs it.

- ``entries``: one page-table entry as an integer (MFN, kind, permissions), flush types.
- ``pagetable``, ``iotlb``, ``context``: a domain's page table with virtual default entries,
  its emulated IOTLB, and the context that owes one flush per call or segment.
- ``m2b``: the machine-to-bus map: every bus address an emulator holds a frame at.
- ``state``: ``Iommu``, the host's IOMMU state (contexts by domid, the M2B, flushes owed,
  quotas, injected faults) that every other subsystem is handed instead of the host.
- ``subops``: ``do_iommu_op``, its continuation points, ``query_caps``, ``map_page`` and
  ``unmap_page`` with pv-iommu-semantics.md's order of checks.
- ``foreign``: the emulator's ``map_foreign_page``, ``lookup_foreign_page``,
  ``unmap_foreign_page``.
- ``fastpath``, ``fast_iommu.c``, ``fast_build``: the compiled loop for the common case of
  map/unmap, which hands every other op back to ``subops``.
- ``device``: PCI devices (BDFs, RMRR regions) and DMA results.
"""
