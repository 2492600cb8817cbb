"""The pure hypervisor core: every hypercall's effect on the host, with no I/O.

One package per subsystem, each owning its state and its rules, imported one way
(``errors``/``options`` < ``memory`` < ``iommu`` < ``ioreq`` | ``grants`` | ``its`` < ``host``
< ``audit`` < ``actions``):

- ``memory``: machine frames and their references, the p2m, domains, guests' RAM.
- ``iommu``: IOMMU contexts (page tables, IOTLB, deferred flushes), ``do_iommu_op`` and its
  subops (``map_page``'s rules are in ``iommu/subops.py``, the emulator's foreign subops in
  ``iommu/foreign.py``), the M2B (``iommu/m2b.py``) and the compiled fast path.
- ``ioreq``: IOREQ servers and their buffered ring, ballooning and the invalidates it owes.
- ``grants``: grant tables, maptrack and batched grant map/unmap at caller-chosen BFNs.
- ``its``: the virtual GICv3 ITS of draft C over an emulated physical ITS (registers,
  translation, scheduling, LPI pending state and delivery, teardown).
- ``host``: the composition root; builds the subsystems and runs what spans them (domain
  creation and destruction, device assignment, device DMA).
- ``audit``: every invariant, recomputed from scratch across the subsystems.
- ``actions``: one typed action per request and the one dispatch; one module per hypercall
  family.  Preemption is a generator yielding at continuation points: the core says where
  a request may pause (``iommu/subops.py``), the shell decides when it resumes.
"""
