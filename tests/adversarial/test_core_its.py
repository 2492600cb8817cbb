"""A hostile guest cannot stall other domains through its vITS, nor make Xen queue without bound.

Both attacks ask Xen for work proportional to the guest's mappings, again and again: a ``MAPC``
that retargets a collection of thousands of mappings, and ``GICR_CTLR.EnableLPIs`` 0 -> 1, which
reads the pending table for every mapping of the vCPU. That work now runs in slices of about a
millisecond (another domain's call is answered while it is still going on, as the daemon's own
counters show), and what Xen keeps for the guest meanwhile is bounded by the guest's mappings.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tests.conformance.beds import DaemonProcess
from xenemu.abi import its_cmd as c
from xenemu.abi import pv_iommu as ops
from xenemu.bench.vits import ITT_GFN, LPI, VitsGuest
from xenemu.client import SyncControlClient, SyncHypercallClient

EVENTS = 8192  # every vLPI the guest's configuration table has (IDbits 13)
MAPCS = 32
RWP = 1 << 3
BATCH = 8


def _attacker(daemon: DaemonProcess, ctl: SyncControlClient) -> tuple[VitsGuest, int]:
    """A two-vCPU guest with one device of EVENTS events, every one mapped in collection 0."""
    r = ctl.create_domain("hvm", 512, vcpus=2)
    vdev = ctl.assign_device(r["domid"], "00:0a.0", its_devid=0x50, its_events=EVENTS)["vdevid"]
    guest = VitsGuest(daemon.hypercall_path, r["token"], r["domid"], vdev)
    size = EVENTS.bit_length() - 2  # EventID bits - 1
    guest.send([c.mapc(0, 0).encode(), c.mapc(1, 1).encode(), c.mapd(vdev, size, ITT_GFN << 12).encode()])
    guest.send([c.mapti(vdev, e, LPI + e, 0).encode() for e in range(EVENTS)])
    return guest, r["domid"]


def _victim(daemon: DaemonProcess, ctl: SyncControlClient) -> SyncHypercallClient:
    v = ctl.create_domain("hvm", 64)
    ctl.assign_device(v["domid"], "00:04.0")
    return SyncHypercallClient.connect(daemon.hypercall_path, v["token"])


def _answered(victim: SyncHypercallClient) -> None:
    (caps,) = victim.iommu_op([ops.query_caps()])
    assert caps.status == 0


def _wait(condition: Any, what: str) -> None:
    deadline = time.monotonic() + 120
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_a_mapc_flood_is_sliced_and_its_movis_are_bounded(tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path, "--frames", "65536", "--dom0-memory", "512")
    try:
        ctl = SyncControlClient.connect(daemon.control_path)
        guest, domid = _attacker(daemon, ctl)
        victim = _victim(daemon, ctl)
        # the collection's target alternates: every MAPC retargets all EVENTS mappings
        guest.send([c.mapc(0, 1 - i % 2).encode() for i in range(MAPCS)], wait=False)
        _answered(victim)
        vits = ctl.its_info(domid)["vits"]["0"]
        # the victim was answered while the first MAPCs' scans were still running: before the
        # fix, the request that moved CWRITER translated a whole batch of them (8 x 8,192
        # mappings, 65,536 MOVIs queued) before anyone else ran
        assert vits["received"]["MAPC"] < 2 + BATCH
        assert vits["scanning"]
        _wait(lambda: guest.xc.its_read("its", 0, 0x90, 8) == guest.cwriter, "the flood completes")
        vits = ctl.its_info(domid)["vits"]["0"]
        assert vits["received"]["MAPC"] == 2 + MAPCS and not vits["scanning"]
        # Xen never owed this guest more than one MOVI per mapping, however many MAPCs it sent
        assert vits["mappings"] == EVENTS
        assert 0 < vits["xen_owed_peak"] <= vits["mappings"]
        _wait(lambda: ctl.its_stats()["pits"][0]["xen_owed"] == 0, "the owed MOVIs are placed")
        stats = ctl.its_stats()
        assert stats["pits"][0]["xen_queue"] == 0 and stats["jobs"] == 0
        assert stats["pits"][0]["physical"]["MOVI"] <= MAPCS * EVENTS
        _answered(victim)
        assert ctl.audit() == []
    finally:
        daemon.stop()


def test_enable_lpis_reads_the_pending_table_in_slices_and_bounded(tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path, "--frames", "65536", "--dom0-memory", "512")
    try:
        ctl = SyncControlClient.connect(daemon.control_path)
        guest, domid = _attacker(daemon, ctl)
        victim = _victim(daemon, ctl)
        x = guest.xc

        def clears() -> int:
            physical: dict[str, int] = ctl.its_stats()["pits"][0]["physical"]
            return physical.get("CLEAR", 0)

        x.its_mmio("redist", 0, 0x0, 4, 0)
        before = clears()
        x.its_mmio("redist", 0, 0x0, 4, 1)  # the pending table (all clear) is read: one CLEAR per LPI
        _answered(victim)
        # answered while the load was still going on; before the fix the enable's own request
        # read the whole table and placed every CLEAR before anyone else ran
        assert clears() - before < EVENTS
        assert x.its_read("redist", 0, 0x0, 4) == 1 | RWP  # GICR_CTLR.RWP: the write's effect is pending
        assert ctl.its_info(domid)["loading"] == [0]
        _wait(lambda: x.its_read("redist", 0, 0x0, 4) == 1, "the load completes")
        _wait(lambda: clears() - before == EVENTS, "every CLEAR is placed")
        # toggling as fast as the guest can: one load per vCPU at a time, at most one owed
        # command per mapping, however many enables
        for _ in range(200):
            x.its_mmio("redist", 0, 0x0, 4, 0)
            x.its_mmio("redist", 0, 0x0, 4, 1)
            stats = ctl.its_stats()
            assert stats["jobs"] <= 2
            assert stats["pits"][0]["xen_owed"] <= EVENTS and stats["pits"][0]["xen_queue"] == 0
        vits = ctl.its_info(domid)["vits"]["0"]
        assert 0 < vits["xen_owed_peak"] <= vits["mappings"] == EVENTS
        _wait(lambda: x.its_read("redist", 0, 0x0, 4) == 1, "the last load completes")
        _wait(lambda: ctl.its_stats()["pits"][0]["xen_owed"] == 0, "the owed commands are placed")
        _answered(victim)
        assert ctl.audit() == []
    finally:
        daemon.stop()
