"""The C headers are real C, and cffi reads the same layout gcc compiles."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from xenemu.abi import HEADERS, OP_SIZE, abi_dir, ffi, lib

FIELDS = {
    "struct pv_iommu_op": ["subop_id", "flags", "status", "u"],
}
UNION_MEMBERS = {
    "map_page": ["bfn", "gfn"],
    "unmap_page": ["bfn"],
    "map_foreign_page": ["bfn", "gfn", "domid", "ioserver"],
    "lookup_foreign_page": ["bfn", "gfn", "domid", "ioserver"],
    "unmap_foreign_page": ["bfn", "ioserver"],
}
CONSTANTS = [
    "DOMID_SELF",
    "DOMID_XEN",
    "DOMID_INVALID",
    "IOMMUOP_query_caps",
    "IOMMUOP_map_page",
    "IOMMUOP_unmap_page",
    "IOMMUOP_map_foreign_page",
    "IOMMUOP_lookup_foreign_page",
    "IOMMUOP_unmap_foreign_page",
    "IOMMU_QUERY_map_cap",
    "IOMMU_QUERY_map_all_gfns",
    "IOMMU_OP_readable",
    "IOMMU_OP_writeable",
    "IOMMU_MAP_OP_no_ref_cnt",
    "IOMMUOP_swap_mfn",
    "IOMMU_page_order_shift",
    "XEN_EOPNOTSUPP",
]


def c_layout_program() -> str:
    lines = [
        "#include <stdio.h>",
        "#include <stddef.h>",
        '#include "xen_errno.h"',
        '#include "pv_iommu.h"',
        "int main(void) {",
        '  printf("sizeof %zu\\n", sizeof(struct pv_iommu_op));',
    ]
    for field in FIELDS["struct pv_iommu_op"]:
        lines.append(f'  printf("{field} %zu\\n", offsetof(struct pv_iommu_op, {field}));')
    for member, fields in UNION_MEMBERS.items():
        for field in fields:
            lines.append(f'  printf("u.{member}.{field} %zu\\n", offsetof(struct pv_iommu_op, u.{member}.{field}));')
    for name in CONSTANTS:
        lines.append(f'  printf("{name} %lld\\n", (long long)({name}));')
    lines += ["  return 0;", "}"]
    return "\n".join(lines) + "\n"


def python_layout() -> dict[str, int]:
    out = {"sizeof": ffi.sizeof("struct pv_iommu_op")}
    for field in FIELDS["struct pv_iommu_op"]:
        out[field] = ffi.offsetof("struct pv_iommu_op", field)
    union = ffi.offsetof("struct pv_iommu_op", "u")
    for member, fields in UNION_MEMBERS.items():
        inner = ffi.typeof("struct pv_iommu_op").fields[3][1].type.fields
        member_type = dict(inner)[member].type
        for field in fields:
            out[f"u.{member}.{field}"] = union + ffi.offsetof(member_type, field)
    for name in CONSTANTS:
        out[name] = getattr(lib, name)
    return out


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed")
def test_gcc_and_cffi_agree_on_layout(tmp_path: Path) -> None:
    source = tmp_path / "layout.c"
    source.write_text(c_layout_program())
    binary = tmp_path / "layout"
    subprocess.run(
        ["gcc", "-Wall", "-Werror", "-std=c11", "-I", str(abi_dir()), "-o", str(binary), str(source)], check=True
    )
    printed = subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout
    c_side = {name: int(value) for name, value in (line.split() for line in printed.splitlines())}
    assert c_side == python_layout()


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed")
@pytest.mark.parametrize("header", HEADERS)
def test_each_header_compiles_alone(tmp_path: Path, header: str) -> None:
    source = tmp_path / "alone.c"
    source.write_text(f'#include "{header}"\n#include "{header}"\nint main(void) {{ return 0; }}\n')
    subprocess.run(
        ["gcc", "-Wall", "-Werror", "-std=c11", "-I", str(abi_dir()), "-o", str(tmp_path / "a"), str(source)],
        check=True,
    )


def test_op_is_32_bytes_with_union_at_8() -> None:
    assert OP_SIZE == 32
    assert ffi.offsetof("struct pv_iommu_op", "u") == 8
    assert ffi.sizeof("ioservid_t") == 2


IOREQ_PROGRAM = r"""
#include <stdio.h>
#include <stddef.h>
#include <string.h>
#include "ioreq.h"
static void dump(const void *p, size_t n) {
    for (size_t i = 0; i < n; i++) printf("%02x", ((const unsigned char *)p)[i]);
    printf("\n");
}
int main(void) {
    printf("%zu %zu %zu\n", sizeof(ioreq_t), sizeof(buf_ioreq_t), sizeof(buffered_iopage_t));
    printf("%zu %zu %zu %zu %zu %zu\n", offsetof(ioreq_t, addr), offsetof(ioreq_t, data), offsetof(ioreq_t, count),
           offsetof(ioreq_t, size), offsetof(ioreq_t, vp_eport), offsetof(ioreq_t, type));
    printf("%zu %zu\n", offsetof(buf_ioreq_t, data), offsetof(buffered_iopage_t, buf_ioreq));
    ioreq_t r; memset(&r, 0, sizeof r);
    r.state = 3; r.data_is_ptr = 1; r.dir = 1; r.df = 1; r.type = 8; r.data = 0x1122334455667788ULL;
    dump(&r, sizeof r);
    buf_ioreq_t b; memset(&b, 0, sizeof b);
    b.type = 8; b.pad = 1; b.dir = 1; b.size = 2; b.addr = 0xABCDE; b.data = 0xDEADBEEF;
    dump(&b, sizeof b);
    return 0;
}
"""


def python_ioreq_lines() -> list[str]:
    sizes = f"{ffi.sizeof('ioreq_t')} {ffi.sizeof('buf_ioreq_t')} {ffi.sizeof('buffered_iopage_t')}"
    offsets = " ".join(str(ffi.offsetof("ioreq_t", f)) for f in ("addr", "data", "count", "size", "vp_eport", "type"))
    more = f"{ffi.offsetof('buf_ioreq_t', 'data')} {ffi.offsetof('buffered_iopage_t', 'buf_ioreq')}"
    r = bytearray(ffi.sizeof("ioreq_t"))
    view = ffi.from_buffer("ioreq_t *", r)
    view.state, view.data_is_ptr, view.dir, view.df, view.type, view.data = 3, 1, 1, 1, 8, 0x1122334455667788
    b = bytearray(ffi.sizeof("buf_ioreq_t"))
    slot = ffi.from_buffer("buf_ioreq_t *", b)
    slot.type, slot.pad, slot.dir, slot.size, slot.addr, slot.data = 8, 1, 1, 2, 0xABCDE, 0xDEADBEEF
    return [sizes, offsets, more, r.hex(), b.hex()]


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed")
def test_ioreq_layouts_and_bitfields_agree(tmp_path: Path) -> None:
    source = tmp_path / "ioreq.c"
    source.write_text(IOREQ_PROGRAM)
    binary = tmp_path / "ioreq"
    subprocess.run(
        ["gcc", "-Wall", "-Werror", "-std=c11", "-I", str(abi_dir()), "-o", str(binary), str(source)], check=True
    )
    printed = subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout.splitlines()
    assert printed == python_ioreq_lines()
    assert printed[0] == "32 8 4096"
