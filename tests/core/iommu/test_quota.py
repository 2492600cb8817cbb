"""Per-domain mapping quotas: -EDQUOT (GNTST_no_space for grants), atomic, freed by unmapping."""

from __future__ import annotations

from tests.bed import Bed
from xenemu.abi import grant_table as grants
from xenemu.abi import pv_iommu as ops


def test_map_page_quota_is_atomic_and_freed_by_unmap(bed: Bed) -> None:
    g = bed.host.create_domain("hvm", 32, max_mappings=4)
    bed.host.assign_device(g.domid, "00:03.0")
    assert bed.status(g.domid, ops.map_page(0x1000, 0, order=1)) == "OK"
    assert bed.status(g.domid, ops.map_page(0x1004, 4, order=2)) == "-EDQUOT"
    assert g.domid in bed.host.iommu.contexts and not bed.ctx(g).table.get(0x1004)
    assert bed.status(g.domid, ops.map_page(0x1002, 2, order=1)) == "OK"
    assert bed.status(g.domid, ops.map_page(0x1008, 8)) == "-EDQUOT"
    assert bed.status(g.domid, ops.map_page(4, 8)) == "-EDQUOT"  # replacing a default is a new mapping too
    assert bed.status(g.domid, ops.unmap_page(0x1000)) == "OK"
    assert bed.status(g.domid, ops.map_page(0x1008, 8)) == "OK"
    assert bed.status(g.domid, ops.unmap_page(5)) == "OK"  # removing a default frees nothing
    assert bed.host.iommu.mappings_held[g.domid] == 4


def test_check_order_quota_comes_last(bed: Bed) -> None:
    g = bed.host.create_domain("hvm", 32, max_mappings=0)
    bed.host.assign_device(g.domid, "00:03.0")
    bed.host.iommu.inject_fault(g.domid, 0x1000)
    assert bed.status(g.domid, ops.map_page(0x1000, 0)) == "-EIO"
    assert bed.status(g.domid, ops.map_page(0x1001, 100)) == "-EPERM"
    assert bed.status(g.domid, ops.map_page(0x1001, 1)) == "-EDQUOT"


def test_foreign_and_lookup_quota(bed: Bed) -> None:
    guest = bed.guest()
    dm = bed.host.create_domain("pv", 8, target=guest.domid, max_mappings=2)
    server = bed.host.emulators.create_server(dm.domid, guest.domid).id
    assert bed.status(dm.domid, ops.lookup_foreign_page(1, guest.domid, server)) == "OK"
    assert bed.status(dm.domid, ops.lookup_foreign_page(1, guest.domid, server)) == "OK"  # existing: free
    assert bed.status(dm.domid, ops.lookup_foreign_page(2, guest.domid, server)) == "OK"
    assert bed.status(dm.domid, ops.lookup_foreign_page(3, guest.domid, server)) == "-EDQUOT"
    bed.host.emulators.destroy_server(dm.domid, server)
    bed.check()
    assert bed.host.iommu.mappings_held[dm.domid] == 0
    dm2 = bed.host.create_domain("pv", 8, target=guest.domid, max_mappings=3)
    bed.host.assign_device(dm2.domid, "00:05.0")
    server = bed.host.emulators.create_server(dm2.domid, guest.domid).id
    assert bed.status(dm2.domid, ops.map_foreign_page(0x800, 0, guest.domid, server, order=2)) == "-EDQUOT"
    assert bed.status(dm2.domid, ops.map_foreign_page(0x800, 0, guest.domid, server, order=1)) == "OK"
    assert bed.status(dm2.domid, ops.map_foreign_page(0x800, 0, guest.domid, server, order=1)) == "OK"  # identical


def test_grant_quota(bed: Bed) -> None:
    front = bed.guest()
    back = bed.host.create_domain("pv", 8, max_mappings=1)
    bed.host.grants.grant_access(front.domid, 1, back.domid, 2)
    buf = bytearray(grants.pack_map([grants.MapGrant(front.domid, 1, grants.DEVICE_MAP)] * 2))
    bed.host.grants.map_grant_refs(back.domid, buf, 2)
    bed.check()
    assert [g.status_name for g in grants.unpack_map(bytes(buf))] == ["GNTST_okay", "GNTST_no_space"]


def test_audit_catches_a_miscount(bed: Bed) -> None:
    from xenemu.core.audit import audit

    g = bed.guest()
    bed.host.iommu.count_mappings(g.domid, 1)
    assert any("mappings held" in p for p in audit(bed.host))
