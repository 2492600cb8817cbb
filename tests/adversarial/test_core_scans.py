"""The toolstack's questions cost what their answer costs, not what the host holds.

``dump_mappings`` used to sort every entry of a context to answer 64 rows; ``list_domains``
counted each domain's M2B entries by scanning them all (domains x entries); ``frame_info``
scanned every maptrack.  A guest or emulator decides those sizes, so the toolstack asking
about it stalled everyone.  Now a dump is gathered a few leaves at a time with pauses, and the
counts are kept as the entries come and go (the audit recounts them).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.adversarial.test_core_teardown import BASE
from tests.bed import Bed
from tests.conformance.beds import DaemonProcess
from xenemu.abi import pv_iommu as ops
from xenemu.client import HypercallClient, SyncControlClient
from xenemu.core.actions.control import DumpMappings, FrameInfo, ListDomains
from xenemu.core.actions.dispatch import dispatch, run
from xenemu.core.grants.table import Maptrack
from xenemu.core.iommu.m2b import M2B
from xenemu.core.iommu.state import DUMP_LEAVES

PAGES = 1 << 18


async def test_a_dump_of_a_huge_context_is_one_bounded_page_and_pages_by_next(tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path, "--frames", str(PAGES + 8192), "--dom0-memory", "512")
    try:
        ctl = SyncControlClient.connect(daemon.control_path)
        big = ctl.create_domain("hvm", PAGES)
        ctl.assign_device(big["domid"], "00:03.0")
        b = await HypercallClient.connect(daemon.hypercall_path, big["token"])
        batch = [ops.map_page(BASE + gfn, gfn, order=9) for gfn in range(0, PAGES, 512)]
        assert set(ops.statuses(await b.iommu_op(batch))) == {"OK"}
        reply = ctl.call("dump_mappings", {"domid": big["domid"], "start": BASE, "limit": 1 << 20})
        assert [r["bfn"] for r in reply["mappings"]] == list(range(BASE, BASE + 1024))  # one page at most
        assert reply["next"] == BASE + 1024
        reply = ctl.call("dump_mappings", {"domid": big["domid"], "start": BASE + PAGES - 8, "limit": 4})
        assert [r["bfn"] for r in reply["mappings"]] == [BASE + PAGES - 8 + i for i in range(4)]
        assert reply["next"] == BASE + PAGES - 4
        reply = ctl.call("dump_mappings", {"domid": big["domid"], "start": BASE + PAGES - 4, "limit": 8})
        assert len(reply["mappings"]) == 4 and reply["next"] is None
        assert ctl.audit() == []
    finally:
        daemon.stop()


def test_a_dump_through_sparse_leaves_pauses_every_few_leaves() -> None:
    """Counted, not timed: rows one per leaf make a page of rows cost a leaf each, and the
    dump pauses every ``DUMP_LEAVES`` leaves (it sorted the whole context before)."""
    bed = Bed(nr_frames=1 << 14)
    guest = bed.guest("hvm", 64, "00:03.0")
    for start in range(0, 1000, 250):
        got = bed.call(guest.domid, [ops.map_page(BASE + 512 * i, i % 64) for i in range(start, start + 250)])
        assert set(ops.statuses(got)) == {"OK"}
    steps = dispatch(bed.host, 0, DumpMappings(guest.domid, BASE, 1024))
    pauses = 0
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            reply = stop.value
            break
        pauses += 1
    assert [r["bfn"] for r in reply["mappings"]] == [BASE + 512 * i for i in range(1000)]
    assert pauses >= 1000 // DUMP_LEAVES - 1


def test_listing_domains_and_frame_info_count_without_scanning(monkeypatch: pytest.MonkeyPatch) -> None:
    """Counted, not timed: the answers must not come from walking every M2B entry (once per
    domain) or every domain's maptrack; the walks are made to fail, the answers stay right."""
    bed = Bed(nr_frames=1 << 14)
    guest = bed.guest("hvm", 64, "00:03.0")
    dm = bed.host.create_domain("pv", 16, guest.domid)
    bed.host.assign_device(dm.domid, "00:05.0")
    server = bed.host.emulators.create_server(dm.domid, guest.domid).id
    got = bed.call(dm.domid, [ops.map_foreign_page(BASE + g, g, guest.domid, server) for g in range(32)])
    assert set(ops.statuses(got)) == {"OK"}

    def no_walk(*_: object) -> None:
        raise AssertionError("walked every entry")

    monkeypatch.setattr(M2B, "held_by", no_walk)
    monkeypatch.setattr(M2B, "__iter__", no_walk)
    monkeypatch.setattr(Maptrack, "mappings", property(no_walk), raising=False)
    listed = {d["domid"]: d for d in run(bed.host, 0, ListDomains())["domains"]}
    assert listed[dm.domid]["m2b_entries"] == 32 and listed[guest.domid]["m2b_entries"] == 0
    info = run(bed.host, 0, FrameInfo(domid=guest.domid, gfn=5))
    assert (info["m2b_entries"], info["grant_maps"]) == (1, 0)
