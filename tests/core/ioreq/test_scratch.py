"""Each IOREQ server's own scratch frame: taken at creation, used by its swaps, freed with it."""

from __future__ import annotations

from typing import Any

import pytest

from tests.bed import Bed
from xenemu.abi import pv_iommu as ops
from xenemu.core.errors import HypercallError
from xenemu.core.iommu.entries import Kind, entry_kind, entry_mfn, make_entry
from xenemu.core.memory.frames import DOMID_XEN


def balloon(bed: Bed, domid: int, gfns: list[int]) -> dict[str, Any]:
    gen = bed.host.balloon.decrease_reservation(domid, gfns)
    with pytest.raises(StopIteration) as stop:
        next(gen)
    bed.check()
    result: dict[str, Any] = stop.value.value
    return result


def test_a_server_takes_the_lowest_free_frame_as_its_scratch_frame(bed: Bed) -> None:
    guest = bed.guest()
    frames = bed.host.frames
    lowest = frames._free_map.find(1)
    _dm, server = bed.emulator(guest)
    srv = bed.host.ioreq.servers[server]
    # The emulator's own 16 frames came first (lowest free), then its server's scratch frame.
    assert srv.scratch_mfn == lowest + 16
    assert frames.owner[srv.scratch_mfn] == DOMID_XEN and not frames.populated[srv.scratch_mfn]
    assert (frames.count[srv.scratch_mfn], frames.type_count[srv.scratch_mfn]) == (1, 0)
    other = bed.host.emulators.create_server(0, guest.domid)
    assert other.scratch_mfn != srv.scratch_mfn and frames.owner[other.scratch_mfn] == DOMID_XEN
    bed.check()


def test_its_scratch_frame_is_freed_with_the_server(bed: Bed) -> None:
    guest = bed.guest()
    dm, server = bed.emulator(guest)
    scratch = bed.host.ioreq.servers[server].scratch_mfn
    free = bed.host.frames.nr_free
    bed.host.emulators.destroy_server(dm.domid, server)
    assert bed.host.frames.is_free(scratch) and bed.host.frames.nr_free == free + 1
    bed.check()
    # ...and when the emulator's domain goes, with every server it made.
    server2 = bed.host.emulators.create_server(dm.domid, guest.domid)
    bed.host.destroy_domain(dm.domid)
    assert bed.host.frames.is_free(server2.scratch_mfn)
    bed.check()


def test_no_free_frame_for_a_scratch_frame_is_enomem_and_consumes_no_id() -> None:
    bed = Bed(nr_frames=512 + 16 + 64 + 16, dom0_memory=512)
    guest = bed.guest(memory=64, device=None)
    dm = bed.guest("pv", 16, None, target=guest.domid)
    assert bed.host.frames.nr_free == 0
    next_id = bed.host.ioreq.next_id
    with pytest.raises(HypercallError) as info:
        bed.host.emulators.create_server(dm.domid, guest.domid)
    assert info.value.errno == -12 and bed.host.ioreq.next_id == next_id
    # Privilege and liveness are checked first: they win over -ENOMEM.
    for target, errno in ((dm.domid, -1), (0x7FF2, -3)):
        with pytest.raises(HypercallError) as info:
            bed.host.emulators.create_server(dm.domid, target)
        assert info.value.errno == errno
    bed.check()


def test_each_server_swaps_to_its_own_scratch_frame_and_no_data_passes_between_emulators(bed: Bed) -> None:
    guest = bed.guest(memory=16)
    dm1, s1 = bed.emulator(guest, "00:05.0")
    dm2, s2 = bed.emulator(guest, "00:06.0")
    for dm, server in ((dm1, s1), (dm2, s2)):
        assert bed.status(dm.domid, ops.map_foreign_page(0x800, 5, guest.domid, server, swap_mfn=True)) == "OK"
    assert balloon(bed, guest.domid, [5])["ret"] == 1
    scratch = {s: bed.host.ioreq.servers[s].scratch_mfn for s in (s1, s2)}
    assert entry_mfn(bed.ctx(dm1).table.get(0x800)) == scratch[s1]
    assert entry_mfn(bed.ctx(dm2).table.get(0x800)) == scratch[s2]
    assert entry_kind(bed.ctx(dm1).table.get(0x800)) == Kind.SCRATCH
    # One emulator's device writes through its swapped entry; the other's sees none of it.
    assert bed.host.device_dma("00:05.0", 0x800 << 12, b"emulator one's data").ok
    seen = bed.host.device_dma("00:06.0", 0x800 << 12, None, 19)
    assert seen.ok and seen.data == bytes(19)
    bed.check()


def test_the_low_xen_frames_are_all_alike(bed: Bed) -> None:
    """No low frame is the scratch frame: an RMRR region may name any of them."""
    g = bed.guest(device=None)
    low = list(range(bed.host.options.xen_frames))
    bed.host.assign_device(g.domid, "00:03.0", [(0, len(low))])
    assert all(bed.ctx(g).table.get(m) == make_entry(m, Kind.RMRR, ops.RW) for m in low)
    bed.check()


def test_the_non_strict_hwdom_loses_its_default_of_a_scratch_frame_and_gets_it_back() -> None:
    bed = Bed()
    bed.host.assign_device(0, "00:02.0")  # the non-strict hardware domain: 1:1 defaults of all RAM
    guest = bed.guest()
    dm, server = bed.emulator(guest)
    scratch = bed.host.ioreq.servers[server].scratch_mfn
    ctx = bed.ctx(bed.dom0)
    assert not ctx.table.get(scratch)  # Xen's now: no default maps it
    assert not bed.host.device_dma("00:02.0", scratch << 12, None, 4).ok
    bed.host.emulators.destroy_server(dm.domid, server)
    assert ctx.table.get(scratch) == make_entry(scratch, Kind.DEFAULT, ops.RW)  # free again: back
    bed.check()


def test_a_subop_that_wrote_the_bfn_keeps_the_default_from_coming_back() -> None:
    bed = Bed()
    bed.host.assign_device(0, "00:02.0")
    guest = bed.guest()
    dm, server = bed.emulator(guest)
    scratch = bed.host.ioreq.servers[server].scratch_mfn
    own = next(m for m in range(bed.host.frames.nr_frames) if bed.host.frames.belongs_to(m, 0))
    assert bed.status(0, ops.map_page(scratch, own)) == "OK"  # dom0 maps its own frame there
    assert bed.status(0, ops.unmap_page(scratch)) == "OK"
    bed.host.emulators.destroy_server(dm.domid, server)
    assert not bed.ctx(bed.dom0).table.get(scratch)  # written since: it stays as the subop left it
    bed.check()
