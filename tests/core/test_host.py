"""IOREQ servers, device assignment, domain lifecycle, and the audit itself."""

from __future__ import annotations

import pytest

from tests.bed import Bed
from xenemu.abi import pv_iommu as ops
from xenemu.core.audit import audit
from xenemu.core.errors import HypercallError
from xenemu.core.iommu.entries import Kind, entry_kind, make_entry


def errno_of(fn: object, *args: object) -> int:
    with pytest.raises(HypercallError) as info:
        fn(*args)  # type: ignore[operator]
    return info.value.errno


# -- IOREQ servers -------------------------------------------------------------------------------------
def test_ioreq_server_privilege_and_ids(bed: Bed) -> None:
    guest = bed.guest()
    other = bed.guest(device=None)
    dm = bed.guest("pv", 8, None, target=guest.domid)
    assert errno_of(bed.host.emulators.create_server, dm.domid, other.domid) == -1
    assert errno_of(bed.host.emulators.create_server, dm.domid, dm.domid) == -1
    assert errno_of(bed.host.emulators.create_server, dm.domid, ops.DOMID_SELF) == -1
    assert errno_of(bed.host.emulators.create_server, dm.domid, 555) == -3
    assert errno_of(bed.host.emulators.create_server, guest.domid, 0) == -1
    first = bed.host.emulators.create_server(dm.domid, guest.domid).id
    second = bed.host.emulators.create_server(0, guest.domid).id
    assert (first, second) == (1, 2)
    assert errno_of(bed.host.emulators.destroy_server, 0, first) == -1
    assert errno_of(bed.host.emulators.destroy_server, dm.domid, 99) == -2
    bed.host.emulators.destroy_server(dm.domid, first)
    assert bed.host.emulators.create_server(dm.domid, guest.domid).id == 3  # never reused
    bed.check()


def test_ioreq_server_for_a_target_that_is_not_a_live_domain_is_esrch(bed: Bed) -> None:
    guest = bed.guest(device=None)
    dm = bed.guest("pv", 8, None, target=guest.domid)
    gone = bed.guest(device=None)
    bed.host.destroy_domain(gone.domid)
    for target in (555, gone.domid, 0x7FF1, 0x7FF2, 0x7FF4, 0xFFFF):  # unknown, destroyed, reserved
        assert errno_of(bed.host.emulators.create_server, dm.domid, target) == -3
        assert errno_of(bed.host.emulators.create_server, 0, target) == -3
    assert errno_of(bed.host.emulators.create_server, dm.domid, dm.domid) == -1  # itself
    assert errno_of(bed.host.emulators.create_server, dm.domid, ops.DOMID_SELF) == -1
    assert errno_of(bed.host.emulators.create_server, dm.domid, 0) == -1  # live, not privileged
    assert bed.host.ioreq.next_id == 1  # no failed creation consumed an id
    bed.check()


def test_ioreq_ids_run_out() -> None:
    bed = Bed()
    guest = bed.guest(device=None)
    bed.host.ioreq.next_id = 65535
    bed.host.emulators.create_server(0, guest.domid)
    assert errno_of(bed.host.emulators.create_server, 0, guest.domid) == -28
    # privilege is checked before capacity
    assert errno_of(bed.host.emulators.create_server, guest.domid, 0) == -1


def test_destroying_an_ioreq_server_releases_its_mappings(bed: Bed) -> None:
    guest = bed.guest()
    dm, server = bed.emulator(guest)
    bed.call(dm.domid, [ops.map_foreign_page(0x800 + i, i, guest.domid, server) for i in range(8)])
    assert bed.refs(bed.mfn(guest, 0)) == (2, 1)
    before = bed.flushes(dm)["modified"]
    bed.host.emulators.destroy_server(dm.domid, server)
    bed.check()
    assert bed.refs(bed.mfn(guest, 0)) == (1, 0)
    assert dm.domid in bed.host.iommu.contexts and not bed.ctx(dm).table.get(0x800)
    assert bed.flushes(dm)["modified"] == before + 1
    assert len(bed.host.iommu.m2b) == 0


# -- device assignment -----------------------------------------------------------------------------------
def test_rmrr_regions_are_identity_mapped(bed: Bed) -> None:
    beyond = bed.host.frames.nr_frames + 16
    g = bed.guest(rmrr=[(4, 2), (beyond, 1)])
    assert g.domid in bed.host.iommu.contexts
    for bfn in (4, 5, beyond):
        assert bed.ctx(g).table.get(bfn) == make_entry(bfn, Kind.RMRR, ops.RW)
    assert bed.host.device_dma("00:03.0", beyond << 12, b"mmio").ok


def test_rmrr_must_not_be_ram_of_a_domain_nor_a_scratch_frame(bed: Bed) -> None:
    g = bed.guest(device=None)
    _dm, server = bed.emulator(g)
    scratch = bed.host.ioreq.servers[server].scratch_mfn
    assert errno_of(bed.host.assign_device, g.domid, "00:03.0", [(600, 1)]) == -22
    assert errno_of(bed.host.assign_device, g.domid, "00:03.0", [(scratch, 1)]) == -22
    # The low Xen frames are all alike: an RMRR region may name any of them, the last included.
    last_low = bed.host.options.xen_frames - 1
    bed.host.assign_device(g.domid, "00:03.0", [(0, 1), (last_low, 1)])
    assert bed.ctx(g).table.get(last_low) == make_entry(last_low, Kind.RMRR, ops.RW)
    bed.check()


def test_assignment_over_a_mapping_is_ebusy(bed: Bed) -> None:
    g = bed.guest()
    assert bed.status(g.domid, ops.map_page(4, 1)) == "OK"
    assert errno_of(bed.host.assign_device, g.domid, "00:04.0", [(4, 1)]) == -16
    # over a default entry or the same RMRR entry is fine
    bed.host.assign_device(g.domid, "00:04.0", [(5, 1)])
    bed.host.assign_device(g.domid, "00:06.0", [(5, 1)])
    bed.check()


def test_device_assigned_once(bed: Bed) -> None:
    g = bed.guest()
    other = bed.guest(device=None)
    assert errno_of(bed.host.assign_device, other.domid, "0000:00:03.0") == -16
    assert errno_of(bed.host.assign_device, other.domid, "bogus") == -22
    assert errno_of(bed.host.assign_device, 4242, "00:09.0") == -3
    assert g.devices == {"0000:00:03.0"}


def test_context_creation_refused_with_contextless_m2b_entries(bed: Bed) -> None:
    guest = bed.guest()
    dm, server = bed.emulator(guest, device=None)
    assert bed.status(dm.domid, ops.lookup_foreign_page(3, guest.domid, server)) == "OK"
    assert errno_of(bed.host.assign_device, dm.domid, "00:05.0") == -16
    assert dm.domid not in bed.host.iommu.contexts and not dm.devices


def test_first_assignment_writes_defaults_without_flush(bed: Bed) -> None:
    g = bed.guest(device=None)
    bed.host.assign_device(g.domid, "00:03.0")
    assert g.domid in bed.host.iommu.contexts
    assert entry_kind(bed.ctx(g).table.get(7)) == Kind.DEFAULT
    assert bed.flushes(g) == {"added": 0, "modified": 0}
    beyond = bed.guest(device="00:04.0", rmrr=[(bed.host.frames.nr_frames + 8, 1)])
    assert bed.flushes(beyond) == {"added": 1, "modified": 0}
    over_default = bed.guest(device="00:05.0", rmrr=[(4, 1)])
    assert bed.flushes(over_default) == {"added": 0, "modified": 1}


def test_passthrough_hwdom_sees_machine_addresses() -> None:
    bed = Bed(dom0_passthrough=True)
    bed.host.assign_device(0, "00:02.0")
    assert bed.host.hwdom.domid not in bed.host.iommu.contexts
    bed.host.frames.write(600, 0, b"raw")
    assert bed.host.device_dma("00:02.0", 600 << 12, length=3).data == b"raw"
    assert not bed.host.device_dma("00:02.0", bed.host.frames.nr_frames << 12, length=1).ok
    assert bed.host.iommu.machine_dma_faults == 1


def test_non_strict_hwdom_defaults_cover_all_ram_but_xens() -> None:
    bed = Bed()
    bed.host.assign_device(0, "00:02.0")
    g = bed.guest()
    bed.host.memory.access(g.domid, 0, 0, b"anyone's")
    mfn = bed.mfn(g, 0)
    assert bed.host.device_dma("00:02.0", mfn << 12, length=8).data == b"anyone's"
    assert not bed.host.device_dma("00:02.0", 2 << 12, length=1).ok


# -- domain lifecycle -------------------------------------------------------------------------------------
def test_hwdom_cannot_be_destroyed(bed: Bed) -> None:
    assert errno_of(bed.host.destroy_domain, 0) == -1
    assert errno_of(bed.host.destroy_domain, 77) == -3


def test_destroy_releases_everything_and_frees_frames(bed: Bed) -> None:
    free = bed.host.frames.nr_free
    g = bed.guest(memory=32)
    bed.call(g.domid, [ops.map_page(0x1000 + i, i) for i in range(8)])
    bed.host.destroy_domain(g.domid)
    bed.check()
    assert bed.host.frames.nr_free == free
    assert "0000:00:03.0" not in bed.host.devices


def test_emulator_keeps_frames_of_a_destroyed_guest(bed: Bed) -> None:
    guest = bed.guest(memory=16)
    dm, server = bed.emulator(guest)
    mfn = bed.mfn(guest, 2)
    assert bed.status(dm.domid, ops.map_foreign_page(0x800, 2, guest.domid, server)) == "OK"
    gid = guest.domid
    bed.host.destroy_domain(gid)
    bed.check()
    assert bed.refs(mfn) == (1, 1) and bed.host.frames.owner[mfn] == gid
    assert bed.host.ioreq.servers[server].target is None and dm.target is None
    # the domain id is not reused while its frame is held
    assert bed.guest(device=None).domid != gid
    assert bed.status(dm.domid, ops.unmap_foreign_page(0x800, server)) == "OK"
    assert bed.host.frames.is_free(mfn)


def test_destroying_the_emulator_releases_its_servers(bed: Bed) -> None:
    guest = bed.guest()
    dm, server = bed.emulator(guest)
    bed.call(dm.domid, [ops.map_foreign_page(0x800, 1, guest.domid, server)])
    bed.host.destroy_domain(dm.domid)
    bed.check()
    assert bed.refs(bed.mfn(guest, 1)) == (1, 0)
    assert server not in bed.host.ioreq.servers


def test_destroy_clears_injected_faults(bed: Bed) -> None:
    g = bed.guest()
    bed.host.iommu.inject_fault(g.domid, 5)
    bed.host.destroy_domain(g.domid)
    assert not bed.host.iommu.injected_faults


def test_out_of_memory(bed: Bed) -> None:
    assert errno_of(bed.host.create_domain, "hvm", bed.host.frames.nr_free + 1) == -12


# -- the audit catches corruption ---------------------------------------------------------------------------
def test_audit_reports_a_reference_leak(bed: Bed) -> None:
    g = bed.guest()
    bed.host.frames.count[bed.mfn(g, 1)] += 1
    assert any("references" in p for p in audit(bed.host))


def test_audit_reports_a_mapping_without_reference(bed: Bed) -> None:
    g = bed.guest()
    assert g.domid in bed.host.iommu.contexts
    bed.ctx(g).table.set(0x1000, make_entry(bed.mfn(g, 1), Kind.MAP, ops.RW))
    assert any("references" in p for p in audit(bed.host))


def test_audit_reports_mapping_of_a_free_frame(bed: Bed) -> None:
    g = bed.guest()
    assert g.domid in bed.host.iommu.contexts
    free = bed.host.frames.nr_frames - 1
    bed.ctx(g).table.set(0x1000, make_entry(free, Kind.MAP_NOREF, ops.RW))
    problems = audit(bed.host)
    assert any("free frame" in p for p in problems) and any("no_ref_cnt" in p for p in problems)


def test_audit_reports_broken_rmrr_and_foreign_entries(bed: Bed) -> None:
    guest = bed.guest(rmrr=[(4, 1)])
    dm, server = bed.emulator(guest)
    bed.call(dm.domid, [ops.map_foreign_page(0x800, 1, guest.domid, server)])
    assert guest.domid in bed.host.iommu.contexts and dm.domid in bed.host.iommu.contexts
    bed.ctx(guest).table.clear(4)
    bed.ctx(dm).table.clear(0x800)
    problems = audit(bed.host)
    assert any("RMRR" in p for p in problems)
    assert any("lost its IOMMU entry" in p for p in problems)


def test_audit_reports_pending_flush(bed: Bed) -> None:
    g = bed.guest()
    assert g.domid in bed.host.iommu.contexts
    bed.host.iommu.note_flush(bed.ctx(g), bed.ctx(g).pending_flush.__class__.ADDED)
    assert any("pending" in p for p in audit(bed.host))


def test_failed_create_does_not_consume_a_domid(bed: Bed) -> None:
    """Found by the model-based test: an -ENOMEM create used to burn a domain id."""
    first = bed.guest(device=None).domid
    assert errno_of(bed.host.create_domain, "hvm", bed.host.frames.nr_free + 1) == -12
    assert bed.guest(device=None).domid == first + 1
