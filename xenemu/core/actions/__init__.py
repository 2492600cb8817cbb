"""Actions: every request as one typed action, and the one dispatch that runs it.

- ``base``: the ``Action`` type, field-by-field validation of wire values, the registry.
- ``dispatch``: ``parse`` (wire request -> action, with the socket it may arrive on) and
  ``dispatch`` (action -> a generator the shell drives through continuation points).
- One module per hypercall family: ``iommu`` (``do_iommu_op``, IOREQ servers, guest memory,
  device DMA), ``memory`` (ballooning and IOREQ ring answers), ``grant``, ``its`` and
  ``control`` (the toolstack's requests).
"""
