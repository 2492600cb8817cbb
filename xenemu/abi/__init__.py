"""ABI facts: what Xen's public headers and the GICv3 architecture define, and nothing else.

The C headers in ``abi/`` are loaded into cffi here, so Python never restates a layout; the
modules beside this one pack and unpack those layouts (``pv_iommu``: ``struct pv_iommu_op``;
``grant_table``: the gnttab ops; ``ioreq``: the buffered ring and ``ioreq_t``; ``its_cmd``:
the 32-byte ITS commands) and name the errno values (``errno``).  This package is the floor
of the import graph: the core, the wire codec, the client, the CLI and the guest programs in
``clients/`` all stand on it, and it imports none of them.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import cffi

HEADERS = ("xen_errno.h", "pv_iommu.h", "ioreq.h", "grant_table.h", "gic_its.h")

_CDEF_BLOCK = re.compile(r"/\* XENEMU_CDEF_BEGIN \*/(.*?)/\* XENEMU_CDEF_END \*/", re.S)


def abi_dir() -> Path:
    """The headers: shipped inside the wheel, or in the source tree for an editable install."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "_abi", package.parent / "abi"):
        if (candidate / "pv_iommu.h").is_file():
            return candidate
    raise FileNotFoundError("xenemu ABI headers not found (expected abi/ beside the package)")


def cdef_text(name: str) -> str:
    """The declarations between a header's CDEF markers, as cffi's parser accepts them."""
    text = (abi_dir() / name).read_text()
    blocks = _CDEF_BLOCK.findall(text)
    if not blocks:
        raise ValueError(f"{name}: no XENEMU_CDEF block")
    return "\n".join(blocks)


@cache
def load() -> cffi.FFI:
    ffi = cffi.FFI()
    for name in HEADERS:
        ffi.cdef(cdef_text(name))
    return ffi


ffi = load()
lib = ffi.dlopen(None)


def const(name: str) -> int:
    """An integer constant of the ABI by its C name."""
    value = getattr(lib, name)
    assert isinstance(value, int)
    return value


OP_SIZE: int = ffi.sizeof("struct pv_iommu_op")
assert const("PV_IOMMU_OP_SIZE") == OP_SIZE, "pv_iommu.h layout disagrees with PV_IOMMU_OP_SIZE"
