"""xenemu: an emulated Xen-style hypervisor serving the PV IOMMU hypercall ABI over Unix sockets.

The package, from the floor up (each layer imports only those below it; pyproject.toml's
import-linter contracts enforce it):

- ``abi``: ABI facts only (C layouts through cffi, errno names, op and command encodings).
- ``core``: the hypervisor's semantics as a pure, synchronous core with no I/O.
- ``wire``: the framing and message codec, apart from both the core and the sockets.
- ``server`` (the trio shell around the core), ``client`` (the Python library guests and
  emulators use), ``fuzzing`` (harnesses over the core and the codec).
- ``bench`` and ``cli`` (the ``xl``-like toolstack), at the top.
"""

__version__ = "0.1.0"
