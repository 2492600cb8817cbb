"""Grant tables: entries, map/unmap with a caller-chosen BFN, every GNTST outcome, lifetimes."""

from __future__ import annotations

import pytest

from tests.bed import Bed
from xenemu.abi import grant_table as grants
from xenemu.abi import pv_iommu as ops
from xenemu.abi.grant_table import MapGrant, UnmapGrant
from xenemu.core.errors import HypercallError
from xenemu.core.grants import table as grant_table
from xenemu.core.iommu.entries import Kind, entry_kind
from xenemu.core.memory.domain import Domain


def gmap(bed: Bed, domid: int, batch: list[MapGrant]) -> list[MapGrant]:
    buf = bytearray(grants.pack_map(batch))
    assert bed.host.grants.map_grant_refs(domid, buf, len(batch)) == 0
    bed.check()
    return grants.unpack_map(bytes(buf))


def gunmap(bed: Bed, domid: int, batch: list[UnmapGrant]) -> list[UnmapGrant]:
    buf = bytearray(grants.pack_unmap(batch))
    assert bed.host.grants.unmap_grant_refs(domid, buf, len(batch)) == 0
    bed.check()
    return grants.unpack_unmap(bytes(buf))


@pytest.fixture
def pair(bed: Bed) -> tuple[Bed, Domain, Domain]:
    front = bed.guest("hvm", 32, "00:03.0")
    back = bed.guest("pv", 16, "00:06.0")
    return bed, front, back


def test_map_at_a_chosen_bfn_and_dma(pair: tuple[Bed, Domain, Domain]) -> None:
    bed, front, back = pair
    bed.host.memory.access(front.domid, 4, 0, b"block data")
    bed.host.grants.grant_access(front.domid, 7, back.domid, 4, readonly=False)
    mfn = bed.mfn(front, 4)
    before = bed.flushes(back)
    (done,) = gmap(bed, back.domid, [grants.map_at_bfn(front.domid, 7, 0x2000)])
    assert done.status_name == "GNTST_okay" and done.dev_bus_addr == 0x2000 << 12
    assert bed.refs(mfn) == (2, 1)
    assert back.domid in bed.host.iommu.contexts and entry_kind(bed.ctx(back).table.get(0x2000)) == Kind.GRANT
    assert bed.flushes(back)["added"] == before["added"] + 1
    assert bed.host.device_dma("00:06.0", 0x2000 << 12, length=10).data == b"block data"
    assert bed.host.device_dma("00:06.0", 0x2000 << 12, b"reply").ok
    assert bed.host.memory.access(front.domid, 4, 0, None, 5) == b"reply"
    entry = bed.host.grants.tables[front.domid].entries[7]
    assert entry.flags & grant_table.GTF_reading and entry.flags & grant_table.GTF_writing
    with pytest.raises(HypercallError) as info:
        bed.host.grants.end_access(front.domid, 7)
    assert info.value.errno == -16
    (undone,) = gunmap(bed, back.domid, [UnmapGrant(done.handle)])
    assert undone.status_name == "GNTST_okay"
    assert bed.refs(mfn) == (1, 0) and not bed.ctx(back).table.get(0x2000)
    assert bed.flushes(back)["modified"] == before["modified"] + 1
    assert bed.host.grants.tables[front.domid].entries[7].flags == grant_table.GTF_permit_access
    bed.host.grants.end_access(front.domid, 7)
    assert gmap(bed, back.domid, [grants.map_at_bfn(front.domid, 7, 0x2000)])[0].status_name == "GNTST_bad_gntref"


def test_read_only_grants(pair: tuple[Bed, Domain, Domain]) -> None:
    bed, front, back = pair
    bed.host.grants.grant_access(front.domid, 1, back.domid, 2, readonly=True)
    assert (
        gmap(bed, back.domid, [grants.map_at_bfn(front.domid, 1, 0x2000)])[0].status_name == "GNTST_permission_denied"
    )
    (done,) = gmap(bed, back.domid, [grants.map_at_bfn(front.domid, 1, 0x2000, readonly=True)])
    assert done.status == 0 and bed.refs(bed.mfn(front, 2)) == (2, 0)
    assert bed.host.device_dma("00:06.0", 0x2000 << 12, length=4).ok
    write = bed.host.device_dma("00:06.0", 0x2000 << 12, b"no")
    assert not write.ok and write.reason == "write denied"
    gunmap(bed, back.domid, [UnmapGrant(done.handle)])


def test_map_statuses(pair: tuple[Bed, Domain, Domain]) -> None:
    bed, front, back = pair
    other = bed.guest("hvm", 8, None)
    bed.host.grants.grant_access(front.domid, 1, back.domid, 2)
    bed.host.grants.grant_access(front.domid, 2, other.domid, 3)
    bed.host.grants.grant_access(front.domid, 3, back.domid, 500)  # not populated
    back_rmrr = bed.host.frames.nr_frames + 4
    bed.host.assign_device(back.domid, "00:07.0", [(back_rmrr, 1)])
    mine = next(m for m in range(bed.host.frames.nr_frames) if bed.host.frames.belongs_to(m, back.domid))
    assert bed.status(back.domid, ops.map_page(0x3000, mine)) == "OK"
    bed.host.iommu.inject_fault(back.domid, 0x4000)
    cases = [
        (MapGrant(front.domid, 1, 0), "GNTST_bad_gntref"),
        (grants.map_at_bfn(4242, 1, 0x2000), "GNTST_bad_domain"),
        (grants.map_at_bfn(0x7FF2, 1, 0x2000), "GNTST_bad_domain"),
        (grants.map_at_bfn(back.domid, 1, 0x2000), "GNTST_bad_domain"),
        (grants.map_at_bfn(front.domid, 1024, 0x2000), "GNTST_bad_gntref"),
        (grants.map_at_bfn(front.domid, 9, 0x2000), "GNTST_bad_gntref"),
        (grants.map_at_bfn(front.domid, 2, 0x2000), "GNTST_bad_gntref"),
        (grants.map_at_bfn(front.domid, 3, 0x2000), "GNTST_bad_page"),
        (MapGrant(front.domid, 1, grants.HOST_MAP), "GNTST_bad_virt_addr"),
        (MapGrant(front.domid, 1, grants.HOST_MAP, host_addr=0x1001), "GNTST_bad_virt_addr"),
        (
            MapGrant(front.domid, 1, grants.DEVICE_MAP | grants.REQUEST_BFN_MAP, dev_bus_addr=0x2000123),
            "GNTST_bad_dev_addr",
        ),
        (grants.map_at_bfn(front.domid, 1, back_rmrr), "GNTST_bad_dev_addr"),
        (grants.map_at_bfn(front.domid, 1, 0x3000), "GNTST_bad_dev_addr"),
        (grants.map_at_bfn(front.domid, 1, 0x4000), "GNTST_general_error"),
    ]
    got = gmap(bed, back.domid, [op for op, _ in cases])
    assert [g.status_name for g in got] == [want for _, want in cases]
    assert bed.refs(bed.mfn(front, 2)) == (1, 0)
    # a mapper without an IOMMU context cannot ask for a BFN
    bed.host.grants.grant_access(front.domid, 4, other.domid, 2)
    assert gmap(bed, other.domid, [grants.map_at_bfn(front.domid, 4, 0x2000)])[0].status_name == "GNTST_general_error"


def test_map_over_a_default_entry(pair: tuple[Bed, Domain, Domain]) -> None:
    bed, front, back = pair
    mine = next(m for m in range(bed.host.frames.nr_frames) if bed.host.frames.belongs_to(m, back.domid))
    bed.host.grants.grant_access(front.domid, 1, back.domid, 2)
    before = bed.flushes(back)
    (done,) = gmap(bed, back.domid, [grants.map_at_bfn(front.domid, 1, mine)])
    assert done.status == 0 and bed.flushes(back)["modified"] == before["modified"] + 1
    assert bed.status(back.domid, ops.unmap_page(mine)) == "-ENOENT"
    assert bed.status(back.domid, ops.map_page(mine, mine)) == "-EEXIST"


def test_machine_address_without_request_bfn_map(pair: tuple[Bed, Domain, Domain]) -> None:
    bed, front, back = pair
    bed.host.grants.grant_access(front.domid, 1, back.domid, 2)
    (done,) = gmap(bed, back.domid, [MapGrant(front.domid, 1, grants.DEVICE_MAP | grants.HOST_MAP, 0x7000)])
    mfn = bed.mfn(front, 2)
    assert done.status == 0 and done.dev_bus_addr == mfn << 12 and bed.refs(mfn) == (2, 1)
    assert back.domid in bed.host.iommu.contexts
    assert all(entry_kind(e) != Kind.GRANT for _, e in bed.ctx(back).table.materialized())
    (bad_host, bad_dev, good) = gunmap(
        bed,
        back.domid,
        [
            UnmapGrant(done.handle, host_addr=0x8000),
            UnmapGrant(done.handle, dev_bus_addr=0x1000),
            UnmapGrant(done.handle, host_addr=0x7000, dev_bus_addr=mfn << 12),
        ],
    )
    assert (bad_host.status_name, bad_dev.status_name, good.status_name) == (
        "GNTST_bad_virt_addr",
        "GNTST_bad_dev_addr",
        "GNTST_okay",
    )
    assert gunmap(bed, back.domid, [UnmapGrant(done.handle)])[0].status_name == "GNTST_bad_handle"


def test_unmap_injected_fault(pair: tuple[Bed, Domain, Domain]) -> None:
    bed, front, back = pair
    bed.host.grants.grant_access(front.domid, 1, back.domid, 2)
    (done,) = gmap(bed, back.domid, [grants.map_at_bfn(front.domid, 1, 0x2000)])
    bed.host.iommu.inject_fault(back.domid, 0x2000)
    assert gunmap(bed, back.domid, [UnmapGrant(done.handle)])[0].status_name == "GNTST_general_error"
    assert bed.refs(bed.mfn(front, 2)) == (2, 1)


def test_maptrack_runs_out(pair: tuple[Bed, Domain, Domain], monkeypatch: pytest.MonkeyPatch) -> None:
    bed, front, back = pair
    monkeypatch.setattr(grant_table, "MAX_MAPTRACK", 2)
    bed.host.grants.grant_access(front.domid, 1, back.domid, 2)
    got = gmap(bed, back.domid, [grants.map_at_bfn(front.domid, 1, 0x2000 + i, readonly=True) for i in range(3)])
    assert [g.status_name for g in got] == ["GNTST_okay", "GNTST_okay", "GNTST_no_space"]
    assert bed.refs(bed.mfn(front, 2)) == (3, 0)


def test_mixed_batch_flushes_once(pair: tuple[Bed, Domain, Domain]) -> None:
    bed, front, back = pair
    for ref in range(8):
        bed.host.grants.grant_access(front.domid, ref, back.domid, ref)
    before = bed.flushes(back)
    got = gmap(
        bed,
        back.domid,
        [grants.map_at_bfn(front.domid, r, 0x2000 + r) for r in range(8)]
        + [grants.map_at_bfn(front.domid, 99, 0x3000)],
    )
    assert [g.status for g in got] == [0] * 8 + [-3]
    assert bed.flushes(back)["added"] == before["added"] + 1
    gunmap(bed, back.domid, [UnmapGrant(g.handle) for g in got[:8]])
    assert bed.flushes(back)["modified"] == before["modified"] + 1


def test_call_level_errors(pair: tuple[Bed, Domain, Domain]) -> None:
    bed, _front, back = pair
    with pytest.raises(HypercallError) as info:
        bed.host.grants.map_grant_refs(back.domid, bytearray(31), 1)
    assert info.value.errno == -22
    with pytest.raises(HypercallError) as info:
        bed.host.grants.unmap_grant_refs(back.domid, bytearray(24 * 4097), 4097)
    assert info.value.errno == -7
    with pytest.raises(HypercallError):
        bed.host.grants.grant_access(back.domid, 1024, 0, 0, False)


def test_granted_frame_outlives_balloon_and_granter(pair: tuple[Bed, Domain, Domain]) -> None:
    bed, front, back = pair
    bed.host.grants.grant_access(front.domid, 1, back.domid, 2)
    mfn = bed.mfn(front, 2)
    (done,) = gmap(bed, back.domid, [grants.map_at_bfn(front.domid, 1, 0x2000)])
    gen = bed.host.balloon.decrease_reservation(front.domid, [2])
    with pytest.raises(StopIteration):
        next(gen)
    bed.check()
    assert bed.refs(mfn) == (1, 1) and not bed.host.frames.is_free(mfn)
    bed.host.destroy_domain(front.domid)
    bed.check()
    assert bed.host.device_dma("00:06.0", 0x2000 << 12, length=1).ok
    gunmap(bed, back.domid, [UnmapGrant(done.handle)])
    assert bed.host.frames.is_free(mfn)


def test_destroying_the_mapper_releases_its_grants(pair: tuple[Bed, Domain, Domain]) -> None:
    bed, front, back = pair
    bed.host.grants.grant_access(front.domid, 1, back.domid, 2)
    gmap(bed, back.domid, [grants.map_at_bfn(front.domid, 1, 0x2000)])
    bed.host.destroy_domain(back.domid)
    bed.check()
    assert bed.refs(bed.mfn(front, 2)) == (1, 0) and not bed.host.grants.tables[front.domid].pins
    bed.host.grants.end_access(front.domid, 1)
