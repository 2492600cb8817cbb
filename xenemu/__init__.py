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

from pathlib import Path

__version__ = "0.1.0"


def programs_dir() -> Path:
    """Where the guest programs the demo runs are: inside an installed wheel
    (``xenemu/_clients``, copied from ``clients/`` at build time), else the source checkout's
    ``clients/``."""
    package = Path(__file__).resolve().parent
    shipped = package / "_clients"
    return shipped if shipped.is_dir() else package.parent / "clients"
