"""Grants: what a domain offers others, and what others map of it, at caller-chosen BFNs.

- ``table``: grant entries with Xen's GTF flags and pins, maptrack handles, the ABI's
  constants and struct sizes.
- ``ops``: ``Grants``, each domain's grant table and maptrack, and ``grant_table_op``'s
  batched map and unmap (one GNTST status per op, one flush per batch).
"""
