#!/usr/bin/env python3
"""A coverage-guided fuzz campaign over xenemu's request path (atheris, libFuzzer).

    pip install atheris
    python fuzz/atheris_wire.py -max_total_time=600 -print_final_stats=1 fuzz/corpus

Each input is a byte stream of frames, decoded and run as hypercalls against a fresh small
host; any exception but a protocol or hypercall error, and any audit violation, is a crash.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    import xenemu.fuzzing as fuzzing
    from xenemu.wire import encode


def seed_corpus() -> list[bytes]:
    from xenemu.abi import pv_iommu as ops

    buf = bytes(ops.pack([ops.query_caps(), ops.map_page(0x1000, 1), ops.unmap_page(0x1000)]))
    return [
        encode({"id": 1, "op": "iommu_op", "args": {"buf": buf, "count": 3}}),
        encode({"id": 2, "op": "decrease_reservation", "args": {"gfns": [1, 2]}}),
        encode({"id": 3, "op": "grant_access", "args": {"ref": 1, "domid": 2, "gfn": 3}}),
    ]


def test_one_input(data: bytes) -> None:
    fuzzing.feed(fuzzing.fuzz_host(), data)


if __name__ == "__main__":
    if len(sys.argv) > 1 and not sys.argv[-1].startswith("-"):
        import pathlib

        corpus = pathlib.Path(sys.argv[-1])
        corpus.mkdir(parents=True, exist_ok=True)
        for i, seed in enumerate(seed_corpus()):
            (corpus / f"seed-{i}").write_bytes(seed)
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
