"""The C ABI headers in ``abi/``, loaded into cffi so Python never restates a layout."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import cffi

HEADERS = ("xen_errno.h", "pv_iommu.h", "ioreq.h", "grant_table.h", "gic_its.h")

_CDEF_BLOCK = re.compile(r"/\* XENEMU_CDEF_BEGIN \*/(.*?)/\* XENEMU_CDEF_END \*/", re.S)


def abi_dir() -> Path:
    """The headers: shipped inside the wheel, or in the source tree for an editable install."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "_abi", here.parent / "abi"):
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
