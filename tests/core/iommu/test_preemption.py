"""Preemption by work: large ops pause every slice of pages, change no status, and their
domain's racing calls are refused while they are paused."""

from __future__ import annotations

from typing import Any

from tests.bed import Bed
from xenemu.abi import pv_iommu as ops
from xenemu.core.iommu import preempt
from xenemu.core.iommu.subops import do_iommu_op, run_iommu_op

ORDER = 13  # 8,192 pages: two slices


def drive(bed: Bed, domid: int, batch: list[ops.Op]) -> tuple[list[ops.Op], list[str], int]:
    buf = ops.pack(batch)
    gen = do_iommu_op(bed.host.iommu, domid, buf, len(batch))
    effects = []
    while True:
        try:
            effects.append(next(gen))
        except StopIteration as stop:
            ret: int = stop.value
            break
        bed.check()  # every pause leaves the invariants whole
    return ops.unpack(buf), effects, ret


def test_a_large_map_and_unmap_pause_and_end_as_unpreempted() -> None:
    bed = Bed(nr_frames=1 << 15)
    g = bed.guest(memory=1 << ORDER)
    got, effects, ret = drive(bed, g.domid, [ops.map_page(1 << 20, 0, order=ORDER), ops.unmap_page(1 << 20, ORDER)])
    assert ret == 0 and ops.statuses(got) == ["OK", "OK"]
    assert effects.count(preempt.PREEMPT) >= 2  # each op paused between its slices
    assert bed.refs(bed.mfn(g, 5)) == (1, 0)
    bed.check()


def test_a_large_op_failing_on_its_last_page_pauses_and_changes_nothing() -> None:
    bed = Bed(nr_frames=1 << 15)
    g = bed.guest(memory=1 << ORDER)
    gen = bed.host.balloon.decrease_reservation(g.domid, [(1 << ORDER) - 1])
    assert next(gen, None) is None or True
    before = sorted(bed.ctx(g).table.materialized())
    got, effects, ret = drive(bed, g.domid, [ops.unmap_page(0, ORDER)] * 3)
    assert ret == 0 and ops.statuses(got) == ["-ENOENT"] * 3
    assert effects.count(preempt.PREEMPT) >= 3
    assert sorted(bed.ctx(g).table.materialized()) == before
    bed.check()


def paused(bed: Bed, domid: int, batch: list[ops.Op]) -> Any:
    buf = ops.pack(batch)
    gen = do_iommu_op(bed.host.iommu, domid, buf, len(batch))
    assert next(gen) == preempt.PREEMPT
    return gen, buf


def test_a_domain_does_not_race_its_own_large_op() -> None:
    bed = Bed(nr_frames=1 << 15)
    g = bed.guest(memory=1 << ORDER)
    gen, _ = paused(bed, g.domid, [ops.map_page(1 << 20, 0, order=ORDER)])
    assert run_iommu_op(bed.host.iommu, g.domid, ops.pack([ops.unmap_page(1 << 20)]), 1) == -16
    out = bed.host.balloon.populate_physmap(g.domid, [1 << 20])
    assert out["status"] == -16
    assert bed.host.grants.map_grant_refs(g.domid, bytearray(), 0) == -16
    for _ in gen:
        pass
    assert run_iommu_op(bed.host.iommu, g.domid, ops.pack([ops.unmap_page(1 << 20)]), 1) == 0
    bed.check()


def test_a_guest_cannot_balloon_under_its_emulators_large_op() -> None:
    bed = Bed(nr_frames=1 << 15)
    guest = bed.guest(memory=1 << ORDER, device=None)
    dm, server = bed.emulator(guest)
    gen, buf = paused(bed, dm.domid, [ops.map_foreign_page(1 << 20, 0, guest.domid, server, order=ORDER)])
    out = bed.host.balloon.decrease_reservation(guest.domid, [5])
    try:
        next(out)
    except StopIteration as stop:
        assert stop.value["status"] == -16
    for _ in gen:
        pass
    assert ops.statuses(ops.unpack(buf)) == ["OK"]
    bed.check()


def test_a_large_foreign_map_whose_guest_is_destroyed_fails_whole() -> None:
    bed = Bed(nr_frames=1 << 15)
    guest = bed.guest(memory=1 << ORDER, device=None)
    dm, server = bed.emulator(guest)
    batch = [ops.map_foreign_page(1 << 20, 0, guest.domid, server, order=ORDER)]
    buf = ops.pack(batch)
    gen = do_iommu_op(bed.host.iommu, dm.domid, buf, 1)
    next(gen)
    next(gen)  # into the apply phase: some pages are mapped
    bed.host.destroy_domain(guest.domid)
    for _ in gen:
        pass
    assert ops.statuses(ops.unpack(buf)) == ["-ENXIO"]
    assert len(bed.host.iommu.m2b) == 0 and not bed.host.iommu.mappings_held.get(dm.domid)
    bed.check()


def test_a_large_op_whose_domain_is_destroyed_is_abandoned() -> None:
    bed = Bed(nr_frames=1 << 15)
    g = bed.guest(memory=1 << ORDER)
    gen, _ = paused(bed, g.domid, [ops.map_page(1 << 20, 0, order=ORDER)])
    bed.host.destroy_domain(g.domid)
    try:
        while True:
            next(gen)
    except StopIteration as stop:
        assert stop.value == -3
    bed.check()
