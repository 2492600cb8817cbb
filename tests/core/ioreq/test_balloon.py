"""Ballooning, populate, IOREQ invalidates (buffered and synchronous), swap_mfn and scratch entries."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import pytest

from tests.bed import Bed
from xenemu.abi import pv_iommu as ops
from xenemu.abi.ioreq import read_ring, read_sync
from xenemu.core.iommu.entries import Kind, entry_kind
from xenemu.core.iommu.preempt import PREEMPT
from xenemu.core.ioreq.balloon import WaitForIoreqs
from xenemu.core.ioreq.servers import SLOTS
from xenemu.core.memory.domain import Domain


def balloon(bed: Bed, domid: int, gfns: list[int]) -> dict[str, Any]:
    """Run decrease_reservation when no synchronous invalidate is needed."""
    gen = bed.host.balloon.decrease_reservation(domid, gfns)
    gen = waits(gen)
    with pytest.raises(StopIteration) as stop:
        next(gen)
    bed.check()
    result: dict[str, Any] = stop.value.value
    return result


def waits(gen: Generator[Any, None, dict[str, Any]]) -> Generator[Any, None, dict[str, Any]]:
    """The effects a test waits on: pauses by work are the scheduler's business."""
    while True:
        try:
            effect = next(gen)
        except StopIteration as stop:
            result: dict[str, Any] = stop.value
            return result
        if effect != PREEMPT:
            yield effect


def ring(bed: Bed, server: int) -> list[int]:
    entries, _ = read_ring(bytes(bed.host.ioreq.servers[server].page))
    assert all(e.type == 8 and e.dir == 0 and e.addr == 0 for e in entries)
    return [e.data for e in entries]


def test_balloon_out_frees_an_unmapped_frame(bed: Bed) -> None:
    g = bed.guest(memory=16)
    mfn = bed.mfn(g, 3)
    bed.host.memory.access(g.domid, 3, 0, b"secret")
    before = bed.flushes(g)
    assert balloon(bed, g.domid, [3]) == {"ret": 1, "status": 0, "waited": 0}
    assert bed.host.frames.is_free(mfn) and 3 not in g.p2m and g.pages == 15
    assert bed.flushes(g)["modified"] == before["modified"] + 1
    assert not bed.host.device_dma("00:03.0", 3 << 12, length=1).ok


def test_balloon_out_materialized_default(bed: Bed) -> None:
    g = bed.guest(memory=16)
    assert bed.status(g.domid, ops.map_page(4, 5)) == "OK"  # writes the leaf holding BFN 3
    assert g.domid in bed.host.iommu.contexts and bed.ctx(g).table.is_materialized(3)
    assert balloon(bed, g.domid, [3])["ret"] == 1
    assert not bed.ctx(g).table.get(3)


def test_balloon_stops_at_first_bad_gfn(bed: Bed) -> None:
    g = bed.guest(memory=8)
    assert balloon(bed, g.domid, [1, 2, 100, 3]) == {"ret": 2, "status": -2, "waited": 0}
    assert 3 in g.p2m
    pv = bed.guest("pv", 8, None)
    # A PV GFN is an MFN: Xen's frame is one the guest does not own and populate (-ENOENT).
    assert balloon(bed, pv.domid, [2])["status"] == -2
    assert balloon(bed, pv.domid, [bed.host.options.xen_frames - 1])["status"] == -2


def test_emulator_is_told_and_keeps_the_frame(bed: Bed) -> None:
    guest = bed.guest(memory=16)
    dm, server = bed.emulator(guest)
    mfn = bed.mfn(guest, 5)
    assert bed.status(dm.domid, ops.map_foreign_page(0x800, 5, guest.domid, server)) == "OK"
    assert balloon(bed, guest.domid, [5])["ret"] == 1
    assert ring(bed, server) == [0x800]
    assert server in bed.host.ioreq.notify
    assert bed.refs(mfn) == (1, 1) and bed.host.frames.owner[mfn] == guest.domid
    # the emulator's mapping still works (the guest cannot fault the emulator's device)
    assert bed.host.device_dma("00:05.0", 0x800 << 12, length=1).ok
    assert bed.status(dm.domid, ops.unmap_foreign_page(0x800, server)) == "OK"
    assert bed.host.frames.is_free(mfn)


def test_several_emulators_ordered_by_server_then_bfn(bed: Bed) -> None:
    guest = bed.guest(memory=16)
    dm1, s1 = bed.emulator(guest, "00:05.0")
    dm2, s2 = bed.emulator(guest, "00:06.0")
    bed.call(dm2.domid, [ops.map_foreign_page(0x900, 5, guest.domid, s2)])
    bed.call(
        dm1.domid, [ops.map_foreign_page(0x850, 5, guest.domid, s1), ops.map_foreign_page(0x820, 6, guest.domid, s1)]
    )
    assert balloon(bed, guest.domid, [6, 5])["ret"] == 2
    assert ring(bed, s1) == [0x820, 0x850] and ring(bed, s2) == [0x900]


def test_swap_mfn_everywhere_swaps_to_scratch(bed: Bed) -> None:
    guest = bed.guest(memory=16)
    dm, server = bed.emulator(guest)
    mfn = bed.mfn(guest, 5)
    bed.host.memory.access(guest.domid, 5, 0, b"old guest data")
    bed.call(
        dm.domid,
        [
            ops.map_foreign_page(0x800, 5, guest.domid, server, swap_mfn=True),
            ops.map_foreign_page(0x801, 5, guest.domid, server, ops.R, swap_mfn=True),
        ],
    )
    assert bed.host.device_dma("00:05.0", 0x800 << 12, length=14).data == b"old guest data"
    before = bed.flushes(dm)
    assert balloon(bed, guest.domid, [5])["ret"] == 1
    assert ring(bed, server) == []
    assert bed.host.frames.is_free(mfn) and len(bed.host.iommu.m2b) == 0
    assert dm.domid in bed.host.iommu.contexts
    assert entry_kind(bed.ctx(dm).table.get(0x800)) == Kind.SCRATCH
    assert bed.flushes(dm)["modified"] == before["modified"] + 1
    assert bed.host.device_dma("00:05.0", 0x800 << 12, length=14).data != b"old guest data"
    assert not bed.host.device_dma("00:05.0", 0x801 << 12, b"x").ok  # keeps its R/W
    # the frame is reused by a new domain: the emulator still cannot reach it
    other = bed.guest(memory=1, device=None)
    assert bed.mfn(other, 0) == mfn
    bed.host.memory.access(other.domid, 0, 0, b"new owner")
    assert bed.host.device_dma("00:05.0", 0x800 << 12, length=9).data != b"new owner"
    assert bed.status(dm.domid, ops.unmap_foreign_page(0x800, server)) == "OK"
    assert not bed.ctx(dm).table.get(0x800)
    bed.host.emulators.destroy_server(dm.domid, server)
    assert not bed.ctx(dm).table.get(0x801)
    bed.check()


def test_mixed_swap_flags_invalidate_everyone(bed: Bed) -> None:
    guest = bed.guest(memory=16)
    dm, server = bed.emulator(guest)
    bed.call(
        dm.domid,
        [
            ops.map_foreign_page(0x800, 5, guest.domid, server, swap_mfn=True),
            ops.map_foreign_page(0x801, 5, guest.domid, server),
        ],
    )
    assert balloon(bed, guest.domid, [5])["ret"] == 1
    assert ring(bed, server) == [0x800, 0x801]
    assert len(bed.host.iommu.m2b) == 2


def fill_ring(bed: Bed, guest: Domain, dm: Domain, server: int, gfns: range) -> None:
    bed.call(dm.domid, [ops.map_foreign_page(0x1000 + g, g, guest.domid, server) for g in gfns])


def test_full_ring_falls_back_to_a_synchronous_request(bed: Bed) -> None:
    guest = bed.guest(memory=SLOTS + 8)
    dm, server = bed.emulator(guest)
    fill_ring(bed, guest, dm, server, range(SLOTS + 2))
    gen: Generator[Any, None, dict[str, Any]] = bed.host.balloon.decrease_reservation(
        guest.domid, list(range(SLOTS + 2))
    )
    gen = waits(gen)
    effect = next(gen)
    assert isinstance(effect, WaitForIoreqs) and len(effect.requests) == 2
    bed.check()
    srv = bed.host.ioreq.servers[server]
    assert len(ring(bed, server)) == SLOTS
    reqs = [read_sync(i, bytes(r)) for i, r in srv.pending.items()]
    assert [(r.type, r.data, r.size, r.state, r.dir) for r in reqs] == [
        (8, 0x1000 + SLOTS, 8, 1, 0),
        (8, 0x1000 + SLOTS + 1, 8, 1, 0),
    ]
    assert not effect.done(bed.host.ioreq)
    srv.complete(reqs[0].id)
    assert not effect.done(bed.host.ioreq)
    srv.complete(reqs[1].id)
    assert effect.done(bed.host.ioreq)
    with pytest.raises(StopIteration) as stop:
        next(gen)
    assert stop.value.value == {"ret": SLOTS + 2, "status": 0, "waited": 2}
    # acknowledging the ring frees its slots
    _, rp = read_ring(bytes(srv.page))
    assert srv.acknowledge(rp) and srv.free_slots() == SLOTS
    assert not srv.acknowledge(rp + 1)


def test_waiting_call_is_released_when_the_server_goes(bed: Bed) -> None:
    guest = bed.guest(memory=SLOTS + 4)
    dm, server = bed.emulator(guest)
    fill_ring(bed, guest, dm, server, range(SLOTS + 1))
    mfns = [bed.mfn(guest, g) for g in range(SLOTS + 1)]
    gen = bed.host.balloon.decrease_reservation(guest.domid, list(range(SLOTS + 1)))
    gen = waits(gen)
    effect = next(gen)
    assert not effect.done(bed.host.ioreq)
    assert not any(bed.host.frames.is_free(m) for m in mfns)  # the emulator's entries hold them
    bed.host.emulators.release_servers(dm.domid)
    assert effect.done(bed.host.ioreq)
    bed.check()
    assert len(bed.host.iommu.m2b) == 0
    assert all(bed.host.frames.is_free(m) for m in mfns)


def test_wide_bfn_takes_two_slots(bed: Bed) -> None:
    guest = bed.guest(memory=16)
    dm, server = bed.emulator(guest)
    wide = (1 << 40) + 0x123
    bed.call(dm.domid, [ops.map_foreign_page(wide, 5, guest.domid, server)])
    assert balloon(bed, guest.domid, [5])["ret"] == 1
    assert ring(bed, server) == [wide]
    page = bed.host.ioreq.servers[server].ring
    assert page.write_pointer == 2 and page.buf_ioreq[0].size == 3 and page.buf_ioreq[1].data == 1 << 8


def test_wide_bfn_with_one_free_slot_goes_synchronous(bed: Bed) -> None:
    guest = bed.guest(memory=SLOTS + 4)
    dm, server = bed.emulator(guest)
    fill_ring(bed, guest, dm, server, range(SLOTS - 1))
    wide = 1 << 33
    bed.call(dm.domid, [ops.map_foreign_page(wide, SLOTS, guest.domid, server)])
    assert balloon(bed, guest.domid, list(range(SLOTS - 1)))["ret"] == SLOTS - 1
    srv = bed.host.ioreq.servers[server]
    assert srv.free_slots() == 1
    gen = bed.host.balloon.decrease_reservation(guest.domid, [SLOTS])
    gen = waits(gen)
    effect = next(gen)
    assert len(effect.requests) == 1 and srv.free_slots() == 1
    (req_id,) = srv.pending
    assert read_sync(req_id, bytes(srv.pending[req_id])).data == wide


def test_self_ballooning_of_a_mapped_frame(bed: Bed) -> None:
    g = bed.guest(memory=16)
    mfn = bed.mfn(g, 7)
    assert bed.status(g.domid, ops.map_page(0x1000, 7)) == "OK"
    assert balloon(bed, g.domid, [7])["ret"] == 1
    assert bed.refs(mfn) == (1, 1) and not bed.host.frames.populated[mfn]
    assert bed.host.device_dma("00:03.0", 0x1000 << 12, length=1).ok
    assert bed.status(g.domid, ops.map_page(0x1001, 7)) == "-EPERM"
    assert bed.status(g.domid, ops.unmap_page(0x1000)) == "OK"
    assert bed.host.frames.is_free(mfn)


def test_populate_reuses_the_lowest_free_frame(bed: Bed) -> None:
    g = bed.guest(memory=16)
    mfn = bed.mfn(g, 2)
    balloon(bed, g.domid, [2])
    before = bed.flushes(g)
    assert bed.host.balloon.populate_physmap(g.domid, [2]) == {"ret": 1, "status": 0}
    bed.check()
    assert bed.mfn(g, 2) == mfn and g.pages == 16
    assert bed.flushes(g)["added"] == before["added"] + 1
    bed.host.memory.access(g.domid, 2, 0, b"back")
    assert bed.host.device_dma("00:03.0", 2 << 12, length=4).data == b"back"
    assert bed.host.balloon.populate_physmap(g.domid, [3, 40])["status"] == -17


def test_populate_adds_default_only_where_unmapped(bed: Bed) -> None:
    g = bed.guest(memory=16)
    balloon(bed, g.domid, [2])
    assert bed.status(g.domid, ops.map_page(2, 9)) == "OK"
    bed.host.balloon.populate_physmap(g.domid, [2])
    bed.check()
    assert g.domid in bed.host.iommu.contexts and entry_kind(bed.ctx(g).table.get(2)) == Kind.MAP
    assert bed.status(g.domid, ops.unmap_page(3)) == "OK"  # a removed default...
    balloon(bed, g.domid, [3])
    bed.host.balloon.populate_physmap(g.domid, [3])  # ...comes back with populate, whatever its history
    assert entry_kind(bed.ctx(g).table.get(3)) == Kind.DEFAULT


def test_populate_out_of_memory() -> None:
    bed = Bed(nr_frames=1024, dom0_memory=512)
    g = bed.guest(memory=8, device=None)
    bed.host.set_max_pages(g.domid, 1024)  # the host runs out first
    free = bed.host.frames.nr_free
    result = bed.host.balloon.populate_physmap(g.domid, list(range(100, 100 + free + 1)))
    assert result == {"ret": free, "status": -12}
    bed.check()


def test_populate_stops_at_max_pages(bed: Bed) -> None:
    """A guest cannot take every free frame: it populates up to its max_pages (xl's maxmem)."""
    g = bed.guest(memory=8, device=None)
    assert g.max_pages == 8
    assert bed.host.balloon.populate_physmap(g.domid, [100]) == {"ret": 0, "status": -12}
    assert balloon(bed, g.domid, [0, 1])["ret"] == 2  # what it gives back it may take again
    assert bed.host.balloon.populate_physmap(g.domid, [100, 101, 102]) == {"ret": 2, "status": -12}
    bed.host.set_max_pages(g.domid, 12)  # xl mem-set
    assert bed.host.balloon.populate_physmap(g.domid, [200, 201, 202, 203, 204]) == {"ret": 4, "status": -12}
    assert g.pages == 12
    bed.check()


def test_pv_balloon_and_populate(bed: Bed) -> None:
    g = bed.guest("pv", 8)
    mine = next(m for m in range(bed.host.frames.nr_frames) if bed.host.frames.belongs_to(m, g.domid))
    assert balloon(bed, g.domid, [mine])["ret"] == 1
    result = bed.host.balloon.populate_physmap(g.domid, [mine])
    bed.check()
    assert result["ret"] == 1 and result["mfns"] == [mine]
    assert bed.host.device_dma("00:03.0", mine << 12, length=1).ok


def test_destroy_invalidates_without_waiting(bed: Bed) -> None:
    guest = bed.guest(memory=SLOTS + 4)
    dm, server = bed.emulator(guest)
    fill_ring(bed, guest, dm, server, range(SLOTS + 1))
    bed.call(dm.domid, [ops.map_foreign_page(0x100000, SLOTS + 2, guest.domid, server, swap_mfn=True)])
    bed.host.destroy_domain(guest.domid)
    bed.check()
    srv = bed.host.ioreq.servers[server]
    assert len(ring(bed, server)) == SLOTS and len(srv.pending) == 1
    assert dm.domid in bed.host.iommu.contexts and entry_kind(bed.ctx(dm).table.get(0x100000)) == Kind.SCRATCH
    assert len(bed.host.iommu.m2b) == SLOTS + 1
    bed.host.emulators.destroy_server(dm.domid, server)
    bed.check()
    assert len(bed.host.iommu.m2b) == 0


# -- issue 17: the page's readings ---------------------------------------------------------------
def test_a_calls_invalidates_go_out_gfn_by_gfn(bed: Bed) -> None:
    """In the call's order of GFNs; only within one frame by server then BFN."""
    guest = bed.guest(memory=16)
    dm, server = bed.emulator(guest)
    bed.call(
        dm.domid,
        [
            ops.map_foreign_page(0x901, 5, guest.domid, server),
            ops.map_foreign_page(0x900, 5, guest.domid, server),
            ops.map_foreign_page(0x800, 6, guest.domid, server),
        ],
    )
    assert balloon(bed, guest.domid, [5, 6])["ret"] == 2
    assert ring(bed, server) == [0x900, 0x901, 0x800]  # not sorted across frames


def test_the_order_decides_which_invalidates_find_the_ring_full(bed: Bed) -> None:
    guest = bed.guest(memory=SLOTS + 8)
    dm, server = bed.emulator(guest)
    fill_ring(bed, guest, dm, server, range(SLOTS - 1))  # GFNs 0..509 at BFN 0x1000 + gfn
    bed.call(
        dm.domid,
        [
            ops.map_foreign_page(0x900, SLOTS + 1, guest.domid, server),
            ops.map_foreign_page(0x800, SLOTS + 2, guest.domid, server),
        ],
    )
    gen = bed.host.balloon.decrease_reservation(guest.domid, [*range(SLOTS - 1), SLOTS + 1, SLOTS + 2])
    gen = waits(gen)
    effect = next(gen)
    assert isinstance(effect, WaitForIoreqs) and len(effect.requests) == 1
    srv = bed.host.ioreq.servers[server]
    # 510 slots went to the first GFNs; GFN SLOTS+1's BFN took the last one; SLOTS+2's waits.
    assert ring(bed, server)[-1] == 0x900
    (raw,) = srv.pending.values()
    assert read_sync(1, bytes(raw)).data == 0x800
    srv.complete(next(iter(srv.pending)))
    with pytest.raises(StopIteration):
        next(gen)
    bed.check()


def test_a_pv_guests_populate_ignores_the_values_it_names(bed: Bed) -> None:
    pv = bed.guest("pv", 8, None)
    bed.host.set_max_pages(pv.domid, 12)
    owned = [m for m in range(bed.host.frames.nr_frames) if bed.host.frames.belongs_to(m, pv.domid)]
    # Values it already owns, Xen's, repeated, beyond RAM: only their count matters.
    result = bed.host.balloon.populate_physmap(pv.domid, [owned[0], 2, 2, 1 << 40])
    assert (result["ret"], result["status"]) == (4, 0)
    assert len(set(result["mfns"])) == 4 and not set(result["mfns"]) & set(owned)
    assert all(bed.host.frames.belongs_to(m, pv.domid) for m in result["mfns"])
    assert pv.pages == 12
    bed.check()
    hvm = bed.guest(memory=8, device=None)  # an HVM guest's p2m still refuses a populated GFN
    assert bed.host.balloon.populate_physmap(hvm.domid, [3])["status"] == -17
