"""Call-level errors, deferred flushing, continuations and IOTLB staleness."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.bed import Bed
from xenemu.abi import pv_iommu as ops
from xenemu.abi.pv_iommu import pack
from xenemu.core.iommu.subops import CONTINUATION, do_iommu_op


# -- call-level errors ---------------------------------------------------------------------------
def test_length_mismatch_is_einval_and_runs_nothing(bed: Bed) -> None:
    g = bed.guest()
    buf = pack([ops.map_page(0x1000, 1)])
    assert bed.raw(g.domid, buf + b"\0", 1) == -22
    assert bed.raw(g.domid, buf[:31], 1) == -22
    assert bed.raw(g.domid, buf, 2) == -22
    assert g.domid in bed.host.iommu.contexts and not bed.ctx(g).table.get(0x1000)
    assert ops.unpack(buf)[0].status == 0


def test_too_many_ops_is_e2big() -> None:
    bed = Bed(max_ops_per_call=4)
    g = bed.guest()
    buf = pack([ops.map_page(0x1000 + i, i) for i in range(5)])
    assert bed.raw(g.domid, buf, 5) == -7
    assert g.domid in bed.host.iommu.contexts and not bed.ctx(g).table.get(0x1000)


def test_length_checked_before_count_limit() -> None:
    bed = Bed(max_ops_per_call=4)
    g = bed.guest()
    assert bed.raw(g.domid, bytearray(32 * 5 + 1), 5) == -22


def test_empty_call(bed: Bed) -> None:
    g = bed.guest()
    assert bed.raw(g.domid, bytearray(), 0) == 0


# -- flushing -------------------------------------------------------------------------------------------
def test_batch_of_maps_flushes_once_added(bed: Bed) -> None:
    g = bed.guest()
    before = bed.flushes(g)
    bed.call(g.domid, [ops.map_page(0x1000 + i, i) for i in range(50)])
    after = bed.flushes(g)
    assert after["added"] == before["added"] + 1 and after["modified"] == before["modified"]


def test_batch_with_a_replacement_flushes_once_modified(bed: Bed) -> None:
    g = bed.guest()
    before = bed.flushes(g)
    bed.call(g.domid, [ops.map_page(0x1000, 1), ops.map_page(2, 3), ops.map_page(0x1001, 4)])
    after = bed.flushes(g)
    assert after["added"] == before["added"] and after["modified"] == before["modified"] + 1


def test_unchanged_or_failed_batch_flushes_nothing(bed: Bed) -> None:
    g = bed.guest()
    before = bed.flushes(g)
    bed.call(g.domid, [ops.query_caps(), ops.unmap_page(0x7777), ops.map_page(0x10, 1, perms=0)])
    assert bed.flushes(g) == before


def test_foreign_batch_flushes_only_the_callers_context(bed: Bed) -> None:
    guest = bed.guest()
    dm, server = bed.emulator(guest)
    g_before, d_before = bed.flushes(guest), bed.flushes(dm)
    bed.call(dm.domid, [ops.map_foreign_page(0x800 + i, i, guest.domid, server) for i in range(10)])
    assert bed.flushes(guest) == g_before
    assert bed.flushes(dm)["added"] == d_before["added"] + 1


def test_continuation_points_flush_each_segment() -> None:
    bed = Bed(continuation_every=100)
    g = bed.guest()
    before = bed.flushes(g)
    buf = pack([ops.map_page(0x1000 + i, i % 64, ops.R) for i in range(250)])
    gen = do_iommu_op(bed.host.iommu, g.domid, buf, 250)
    yields = 0
    while True:
        try:
            assert next(gen) == CONTINUATION
        except StopIteration as stop:
            assert stop.value == 0
            break
        yields += 1
        # at each continuation point nothing is left pending and no translation is stale
        bed.check()
    assert yields == 2
    assert bed.flushes(g)["added"] == before["added"] + 3
    assert set(ops.statuses(ops.unpack(buf))) == {"OK"}


def test_no_continuation_point_after_the_last_op() -> None:
    bed = Bed(continuation_every=10)
    g = bed.guest()
    buf = pack([ops.query_caps()] * 20)
    assert sum(1 for _ in do_iommu_op(bed.host.iommu, g.domid, buf, 20)) == 1


def test_preemption_changes_no_status() -> None:
    batch = [ops.map_page(0x1000 + i % 7, i % 5) for i in range(40)] + [ops.unmap_page(0x1000 + i) for i in range(9)]
    results = []
    for every in (1, 3, 1024):
        bed = Bed(continuation_every=every)
        g = bed.guest()
        results.append(bed.call(g.domid, batch))
    assert results[0] == results[1] == results[2]


def test_destroyed_caller_stops_the_batch() -> None:
    bed = Bed(continuation_every=2)
    g = bed.guest()
    buf = pack([ops.map_page(0x1000 + i, i) for i in range(6)])
    gen = do_iommu_op(bed.host.iommu, g.domid, buf, 6)
    next(gen)
    bed.host.destroy_domain(g.domid)
    bed.check()
    try:
        next(gen)
    except StopIteration as stop:
        assert stop.value == -3
    statuses = ops.statuses(ops.unpack(buf))
    assert statuses[:2] == ["OK", "OK"] and all(s == "OK" for s in statuses[2:])  # untouched ones read 0
    assert ops.unpack(buf)[2].status == 0
    bed.check()


# -- IOTLB -----------------------------------------------------------------------------------------------
def test_dma_never_uses_a_stale_translation(bed: Bed) -> None:
    g = bed.guest()
    bed.host.memory.access(g.domid, 1, 0, b"one")
    bed.host.memory.access(g.domid, 2, 0, b"two")
    bed.call(g.domid, [ops.map_page(0x1000, 1)])
    assert bed.host.device_dma("00:03.0", 0x1000 << 12, length=3).data == b"one"
    bed.call(g.domid, [ops.unmap_page(0x1000), ops.map_page(0x1000, 2)])
    assert bed.host.device_dma("00:03.0", 0x1000 << 12, length=3).data == b"two"
    bed.call(g.domid, [ops.unmap_page(0x1000)])
    assert not bed.host.device_dma("00:03.0", 0x1000 << 12, length=3).ok


def test_without_flushing_the_iotlb_goes_stale(bed: Bed) -> None:
    """The same sequence with flushes disabled: the device still reaches the old frame."""
    g = bed.guest()
    assert g.domid in bed.host.iommu.contexts
    bed.ctx(g).flush_enabled = False
    bed.host.memory.access(g.domid, 1, 0, b"one")
    bed.call(g.domid, [ops.map_page(0x1000, 1)])
    assert bed.host.device_dma("00:03.0", 0x1000 << 12, length=3).data == b"one"
    buf = pack([ops.unmap_page(0x1000)])
    from xenemu.core.audit import audit
    from xenemu.core.iommu.subops import run_iommu_op

    assert run_iommu_op(bed.host.iommu, g.domid, buf, 1) == 0
    stale = bed.host.device_dma("00:03.0", 0x1000 << 12, length=3)
    assert stale.ok and stale.data == b"one"
    assert any("stale" in p for p in audit(bed.host)) is False  # audit skips contexts with flushing off
    bed.ctx(g).flush_enabled = True
    assert any("stale translation" in p for p in audit(bed.host))
    bed.ctx(g).iotlb.invalidate_all()


def test_iotlb_is_bounded(bed: Bed) -> None:
    g = bed.guest(memory=64)
    assert g.domid in bed.host.iommu.contexts
    bed.ctx(g).iotlb.capacity = 8
    for gfn in range(40):
        assert bed.host.device_dma("00:03.0", gfn << 12, length=1).ok
    assert len(bed.ctx(g).iotlb.entries) == 8


# -- malformed input ----------------------------------------------------------------------------------------
@settings(max_examples=150, deadline=None)
@given(raw=st.binary(min_size=0, max_size=32 * 12), extra=st.integers(-2, 2))
def test_garbage_buffers_leave_the_host_consistent(raw: bytes, extra: int) -> None:
    bed = Bed(nr_frames=2048, dom0_memory=256)
    guest = bed.guest(memory=32)
    dm, _server = bed.emulator(guest)
    buf = bytearray(raw)
    count = max(len(buf) // 32 + extra, 0)
    for caller in (dm.domid, guest.domid, 0):
        ret = bed.raw(caller, bytearray(buf), count)
        assert ret in (0, -22)
        assert (ret == 0) == (len(buf) == count * 32)


@settings(max_examples=150, deadline=None)
@given(
    batch=st.lists(
        st.builds(
            ops.Op,
            subop=st.integers(0, 8),
            flags=st.integers(0, 0xFFFF),
            bfn=st.one_of(st.integers(0, 0x2000), st.integers(0, 2**64 - 1)),
            gfn=st.one_of(st.integers(0, 80), st.integers(0, 2**64 - 1)),
            domid=st.integers(0, 0xFFFF),
            ioserver=st.integers(0, 3),
        ),
        max_size=12,
    )
)
def test_structured_garbage_gets_statuses_and_a_clean_audit(batch: list[ops.Op]) -> None:
    bed = Bed(nr_frames=2048, dom0_memory=256, max_order=4)
    guest = bed.guest(memory=32)
    dm, _server = bed.emulator(guest)
    bed.host.assign_device(0, "00:02.0")
    bed.host.emulators.create_server(0, guest.domid)
    sent = pack(batch)
    for caller in (dm.domid, guest.domid, 0):
        buf = bytearray(sent)
        assert bed.raw(caller, buf, len(batch)) == 0
        for i, back in enumerate(ops.unpack(buf)):
            assert back.status <= 0
            before, after = sent[i * 32 : (i + 1) * 32], buf[i * 32 : (i + 1) * 32]
            assert before[:4] == after[:4] or back.status == 0  # only successful ops write flags
            if back.status < 0:
                assert before[:4] + before[8:] == after[:4] + after[8:]  # a failed op writes only status
