"""Xen's own work for a guest runs in slices (jobs.py), and what Xen owes a guest is bounded.

A MAPC of a collection with many mappings is a scan that outlasts one slice: CREADR stays before
it and the vITS takes nothing more until it is done; each mapping is owed one MOVI at most, placed
only if its physical collection still has to change. EnableLPIs 0 -> 1 reads the pending table in
slices too, with GICR_CTLR.RWP set meanwhile.
"""

from __future__ import annotations

from tests.core.its.guest import ITT_GFN, LPI, Guest, its_host, settle
from xenemu.abi import its_cmd as c
from xenemu.core.host import Host
from xenemu.core.its import ItsHost

EVENTS = 1024  # a scan of them costs more than a slice
PEND_GFN = 40


def guest() -> tuple[Host, ItsHost, Guest]:
    host, its = its_host(slots=4096, batch=8)
    g = Guest(its, host, events=EVENTS)
    g.queue(c.mapc(0, 0), c.mapc(1, 1), c.mapd(0, 9, ITT_GFN << 12))
    settle(its)
    for first in range(0, EVENTS, 64):
        g.queue(*[c.mapti(0, e, LPI + 32 + e, 0) for e in range(first, first + 64)])
        settle(its)
    assert len(g.vits().ites) == EVENTS
    return host, its, g


def test_a_mapc_scan_runs_in_slices_and_creadr_waits_for_it() -> None:
    _host, its, g = guest()
    before = g.creadr()
    movis = its.pits[0].physical["MOVI"]
    g.queue(c.mapc(0, 1), c.sync(1))
    vits = g.vits()
    assert vits.job is not None  # the scan outlasted its first slice
    assert g.creadr() == before  # the MAPC has not completed, and the SYNC waits behind it
    assert vits.received["SYNC"] == 0
    settle(its)
    assert vits.job is None and g.creadr() == g.offset % 4096
    assert its.pits[0].physical["MOVI"] - movis == EVENTS  # one per mapping, to vCPU 1's CPU
    assert {ite.pcoll for ite in vits.ites.values()} == {its.domains[g.domid].pin[1]}
    assert vits.owed_peak <= EVENTS and not vits.moves
    g.queue(c.mapc(0, 1))  # already there: the MOVIs owed are skipped when placed
    settle(its)
    assert its.pits[0].physical["MOVI"] - movis == EVENTS


def test_the_pending_table_is_read_in_slices_with_rwp_set() -> None:
    host, its, g = guest()
    host.memory.access(g.domid, PEND_GFN, (LPI + 32) // 8, b"\xff")  # LPIs 8224..8231 pending
    its.redist_write(g.domid, 0, 0x0, 4, 0)
    its.redist_write(g.domid, 0, 0x78, 8, PEND_GFN << 12)
    clears = its.pits[0].physical["CLEAR"]
    its.redist_write(g.domid, 0, 0x0, 4, 1)
    its.run_passes()
    assert its.redist_read(g.domid, 0, 0x0, 4) == 1 | 1 << 3  # RWP: the load goes on
    before = g.creadr()
    g.queue(c.sync(0))  # held until the load is done and its commands are placed
    assert g.creadr() == before and g.vits().received["SYNC"] == 0
    settle(its)
    assert its.redist_read(g.domid, 0, 0x0, 4) == 1
    assert its.pits[0].physical["CLEAR"] - clears == EVENTS - 8
    assert g.vits().received["SYNC"] == 1 and g.creadr() == g.offset % 4096
    assert g.vits().owed_peak <= EVENTS


def test_clearing_enable_lpis_ends_a_load_and_a_new_enable_starts_one() -> None:
    _host, its, g = guest()
    its.redist_write(g.domid, 0, 0x0, 4, 0)
    for _ in range(50):  # toggling: one load per vCPU at a time, one owed command per mapping
        its.redist_write(g.domid, 0, 0x0, 4, 1)
        its.redist_write(g.domid, 0, 0x0, 4, 0)
        assert len(its.state.jobs) <= 1
        assert len(g.vits().owed) <= EVENTS
    assert its.domains[g.domid].redists[0].load is None
    its.redist_write(g.domid, 0, 0x0, 4, 1)
    settle(its)
    assert its.redist_read(g.domid, 0, 0x0, 4) == 1 and not its.state.jobs and not g.vits().owed
