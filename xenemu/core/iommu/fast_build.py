"""Builds ``xenemu.core.iommu._fast_iommu`` (cffi API mode) from ``fast_iommu.c`` and the ABI headers.

The package's build hook (``hatch_build.py``) runs this, so ``pip install`` compiles it; after
editing the C source of an editable install, ``python -m xenemu.core.iommu.fast_build`` rebuilds it
in place.  It imports nothing of xenemu, because the build runs before xenemu is installed.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import cffi

HERE = Path(__file__).resolve().parent
MODULE = "xenemu.core.iommu._fast_iommu"

CDEF = """
#define FAST_KIND_DEFAULT ...
#define FAST_KIND_MAP ...
#define FAST_KIND_MAP_NOREF ...
#define FAST_LEAF_SHIFT ...
#define FAST_OP_COST ...
#define FAST_LARGE_PAGES ...

struct fast_host {
    uintptr_t owner;
    uintptr_t populated;
    uintptr_t count;
    uintptr_t type_count;
    uint64_t nr_frames;
    uint32_t largest_order;
    int64_t mapped;
    uint32_t flush;
    int64_t work_budget;
    int64_t work;
};

size_t fast_iommu_run(struct fast_host *host, unsigned char *buf, size_t start, size_t stop, uintptr_t table_dir,
                      uint64_t table_dir_len, uintptr_t p2m_dir, uint64_t p2m_dir_len, uint32_t domid,
                      uint32_t is_hvm, uint32_t can_map, int64_t quota_left);
"""


def abi_dir() -> Path:
    for candidate in (HERE.parents[1] / "_abi", HERE.parents[2] / "abi"):
        if (candidate / "pv_iommu.h").is_file():
            return candidate
    raise FileNotFoundError("ABI headers not found")


def builder() -> cffi.FFI:
    ffi = cffi.FFI()
    ffi.cdef(CDEF)
    ffi.set_source(
        MODULE,
        (HERE / "fast_iommu.c").read_text(),
        include_dirs=[str(abi_dir())],
        extra_compile_args=["-O2", "-std=c99", "-Wall", "-Wextra"],
    )
    return ffi


def build(target: Path) -> Path:
    """Compile the module and copy it into ``target`` (the directory of ``xenemu/core/iommu``)."""
    with tempfile.TemporaryDirectory(prefix="xenemu-fast-") as tmp:
        built = Path(builder().compile(tmpdir=tmp, verbose=False))
        target.mkdir(parents=True, exist_ok=True)
        dest = target / built.name
        shutil.copy2(built, dest)
    return dest


if __name__ == "__main__":
    print(build(HERE if len(sys.argv) < 2 else Path(sys.argv[1])))
