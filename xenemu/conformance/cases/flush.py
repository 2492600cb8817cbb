"""The call level of ``iommu_op`` and its flushes (PROTOCOL.md 6, 7.1, 9 and 12.4)."""

from __future__ import annotations

from xenemu.abi import pv_iommu as ops
from xenemu.abi.pv_iommu import R
from xenemu.conformance.rules import rule
from xenemu.conformance.target import Bed

S = "12.4"


@rule("FLUSH-CALL-EINVAL", S, "a buffer that is not count ops is -EINVAL, no op run; count 0 is 0", core=True)
def call_errors(bed: Bed) -> None:
    g = bed.guest()
    buf = bytes(ops.pack([ops.map_page(0x1000, 1)]))
    assert bed.raw(g, buf + b"\0", 1)[0] == -22
    assert bed.raw(g, buf, 2)[0] == -22
    assert bed.raw(g, b"", 0)[0] == 0
    assert bed.refs(bed.mfn(g, 1)) == (1, 0)


@rule(
    "FLUSH-CALL-E2BIG",
    S,
    "more ops than max_ops_per_call is -E2BIG, no op run",
    host={"max_ops_per_call": 8},
    core=True,
)
def e2big(bed: Bed) -> None:
    g = bed.guest()
    assert bed.raw(g, bytes(ops.pack([ops.query_caps()] * 9)), 9)[0] == -7
    assert bed.raw(g, bytes(ops.pack([ops.query_caps()] * 8)), 8)[0] == 0


@rule(
    "FLUSH-ONE-PER-BATCH",
    S,
    "a batch flushes once: added if it only added, modified if it changed or removed",
    core=True,
)
def one_flush_per_batch(bed: Bed) -> None:
    g = bed.guest()
    before = bed.flushes(g)
    bed.call(g, [ops.map_page(0x1000 + i, i) for i in range(40)])
    after = bed.flushes(g)
    assert (after["added"], after["modified"]) == (before["added"] + 1, before["modified"])
    bed.call(g, [ops.unmap_page(0x1000 + i) for i in range(40)] + [ops.map_page(0x1000, 1)])
    final = bed.flushes(g)
    assert (final["added"], final["modified"]) == (after["added"], after["modified"] + 1)
    bed.call(g, [ops.query_caps(), ops.unmap_page(0x7777)])
    assert bed.flushes(g) == final


@rule(
    "FLUSH-PER-SEGMENT",
    S,
    "a batch flushes at each continuation point, and preemption changes no status",
    host={"continuation_every": 16},
    core=True,
)
def flush_per_segment(bed: Bed) -> None:
    g = bed.guest()
    before = bed.flushes(g)
    got = bed.call(g, [ops.map_page(0x1000 + i, i % 64, R) for i in range(40)])
    assert set(ops.statuses(got)) == {"OK"}
    assert bed.flushes(g)["added"] == before["added"] + 3


@rule("FLUSH-NO-STALE", S, "after a call returns, no device sees a translation it removed", core=True)
def no_stale_translation(bed: Bed) -> None:
    g = bed.guest()
    bed.guest_write(g, 1, b"one")
    bed.guest_write(g, 2, b"two")
    bed.call(g, [ops.map_page(0x1000, 1)])
    assert bed.dma(g, "0000:00:03.0", 0x1000 << 12, length=3)["data"] == b"one"
    bed.call(g, [ops.unmap_page(0x1000), ops.map_page(0x1000, 2)])
    assert bed.dma(g, "0000:00:03.0", 0x1000 << 12, length=3)["data"] == b"two"
    bed.call(g, [ops.unmap_page(0x1000)])
    assert not bed.dma(g, "0000:00:03.0", 0x1000 << 12, length=3)["ok"]
