"""Memory: machine frames, domains and what their CPUs see of RAM.

- ``frames``: every machine frame's owner, populated flag, general and writable-type
  reference counts and contents, in flat arrays (a few bytes per frame).
- ``leaves``: 512-entry leaves of machine words and the directory the compiled code walks,
  shared by the p2m and the IOMMU page tables.
- ``p2m``: an HVM domain's GFN -> MFN map.
- ``domain``: a domain's identity, kind, privilege and quotas (other subsystems keep their
  own per-domain state, keyed by domid).
- ``guest``: the live domains and guest-physical reads and writes; what other subsystems
  are handed when they read a guest's memory.
"""
