"""The compiled fast path against the Python handlers: same statuses, same state, op by op.

Two hosts are built alike but for ``fast_path``; every batch runs on both, and the buffers,
return values and every piece of state the ops can touch must agree afterwards.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xenemu.abi import pv_iommu as ops
from xenemu.core.audit import audit
from xenemu.core.host import Host
from xenemu.core.iommu import fastpath
from xenemu.core.iommu.subops import run_iommu_op
from xenemu.core.options import HostOptions

needs_fast_path = pytest.mark.skipif(not fastpath.available(), reason="the fast path was not built")


@pytest.mark.skipif(os.environ.get("XENEMU_NO_FAST_PATH") == "1", reason="built without the fast path on purpose")
def test_the_fast_path_is_built() -> None:
    """`pip install` compiles it; a build that silently lost it would only be slow."""
    assert fastpath.available()
    assert Host(HostOptions()).iommu.fast is not None
    assert Host(HostOptions(fast_path=False)).iommu.fast is None


def make_host(fast: bool, max_order: int) -> Host:
    host = Host(
        HostOptions(nr_frames=1 << 13, dom0_memory=256, max_order=max_order, fault_injection=True, fast_path=fast)
    )
    hvm = host.create_domain("hvm", 64)
    host.assign_device(hvm.domid, "00:03.0", [(4, 2)])
    pv = host.create_domain("pv", 32)
    host.assign_device(pv.domid, "00:04.0")
    quota = host.create_domain("hvm", 16, max_mappings=5)
    host.assign_device(quota.domid, "00:05.0")
    host.assign_device(0, "00:06.0")  # the non-strict hardware domain maps too
    host.create_domain("hvm", 8)  # no device: no map capability
    for ctx in host.iommu.contexts.values():  # materialise the leaves ops will use, as a running guest has
        for bfn in (0, 0x200, 0x400):
            ctx.table.leaf(bfn)
    return host


def state(host: Host) -> dict[str, Any]:
    frames = host.frames
    contexts = {
        domid: (
            sorted(ctx.table.materialized()),
            dict(ctx.flushes),
            sorted(ctx.iotlb.entries.items()),
        )
        for domid, ctx in host.iommu.contexts.items()
    }
    return {
        "count": frames.count.tobytes(),
        "type_count": frames.type_count.tobytes(),
        "owner": frames.owner.tobytes(),
        "held": dict(host.iommu.mappings_held),
        "contexts": contexts,
    }


#: Mostly the HVM and PV guests, whose maps can succeed; the others for their refusals.
DOMAINS = [1, 1, 1, 2, 2, 3, 0, 4, 0x7FF0]
#: Mostly a few BFNs, so that maps meet unmaps and each other; some anywhere, some special.
bfns = st.one_of(
    st.integers(0x200, 0x20F),
    st.integers(0x200, 0x20F),
    st.integers(0, 0x5FF),
    st.sampled_from([4, 5, 0x3FE, 0x1000000, 2**64 - 1]),
)
#: The HVM guest's GFNs, the PV guest's frames (just past dom0's and the HVM guest's), anything.
gfns = st.one_of(st.integers(0, 20), st.integers(0, 80), st.integers(336, 367), st.integers(0, 2**64 - 1))
flag_values = st.one_of(
    st.builds(lambda p, o: p | (o << 10), st.integers(0, 7), st.sampled_from([0, 0, 0, 1, 2, 9])),
    st.integers(0, 0xFFFF),
    st.sampled_from([1, 2, 3, 3, 3, 1 << 10 | 3]),
)
unmap_flags = st.one_of(st.sampled_from([0, 0, 0, 1 << 10, 2 << 10, 9 << 10]), st.integers(0, 0xFFFF))
hot_bfns = st.integers(0x200, 0x20F)
own_gfns = st.one_of(st.integers(0, 15), st.integers(336, 351))
op_strategy = st.one_of(
    # the common case, which the compiled loop is for ...
    st.builds(ops.map_page, hot_bfns, own_gfns, st.sampled_from([ops.R, ops.W, ops.RW])),
    st.builds(ops.map_page, hot_bfns, own_gfns),
    st.builds(ops.unmap_page, hot_bfns),
    st.builds(ops.unmap_page, hot_bfns),
    # ... and everything else, which it must hand back or get exactly right
    st.builds(ops.Op, st.just(2), flag_values, bfns, gfns),
    st.builds(ops.Op, st.just(3), unmap_flags, bfns),
    st.builds(ops.Op, st.sampled_from([1, 5, 6, 99]), flag_values, bfns, gfns),
)
calls = st.lists(st.tuples(st.sampled_from(DOMAINS), st.lists(op_strategy, max_size=24)), min_size=1, max_size=8)


@needs_fast_path
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(max_order=st.sampled_from([0, 2, 18]), calls=calls, dma=st.lists(st.integers(0, 0x5FF), max_size=4))
def test_fast_and_python_paths_agree(max_order: int, calls: list[tuple[int, list[ops.Op]]], dma: list[int]) -> None:
    fast, slow = make_host(True, max_order), make_host(False, max_order)
    for caller, batch in calls:
        results = []
        for host in (fast, slow):
            for bfn in dma:  # fill IOTLBs, so a missing or wrong flush would show
                host.device_dma("00:03.0", bfn << 12, length=8)
            buf = ops.pack(batch)
            results.append((run_iommu_op(host.iommu, caller, buf, len(batch)), bytes(buf)))
        assert results[0] == results[1], (caller, batch)
        assert state(fast) == state(slow)
    assert audit(fast) == [] and audit(slow) == []


@needs_fast_path
def test_the_fast_path_does_the_common_case() -> None:
    """Not vacuous: a guest's ordinary batch is run by the compiled loop, not handed back."""
    host = make_host(True, 0)
    ctx = host.iommu.contexts.get(1)
    assert host.iommu.fast is not None and ctx is not None
    before = dict(ctx.flushes)
    batch = [ops.map_page(0x200 + i, i, ops.RW) for i in range(64)] + [ops.unmap_page(0x200 + i) for i in range(64)]
    buf = ops.pack(batch)
    assert run_iommu_op(host.iommu, 1, buf, len(batch)) == 0
    assert all(op.status == 0 for op in ops.unpack(buf))
    assert host.iommu.fast.ops_done == 128 and host.iommu.fast.calls == 1
    assert ctx.flushes == {"added": before["added"], "modified": before["modified"] + 1}  # one flush, the highest


@needs_fast_path
def test_the_fast_path_hands_back_what_it_cannot_finish() -> None:
    """An RMRR BFN, a virtual leaf and a quota edge each go to Python, which gives the status."""
    host = make_host(True, 0)
    assert host.iommu.fast is not None
    batch = [
        ops.map_page(0x200, 1, ops.RW),
        ops.map_page(4, 2, ops.RW),  # RMRR
        ops.map_page(0x20000, 3, ops.RW),  # leaf not materialised yet
        ops.map_page(0x201, 4, ops.RW),
    ]
    buf = ops.pack(batch)
    assert run_iommu_op(host.iommu, 1, buf, len(batch)) == 0
    assert [op.status for op in ops.unpack(buf)] == [0, -13, 0, 0]
    assert host.iommu.fast.ops_done == 2
    assert audit(host) == []
