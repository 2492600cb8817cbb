"""Tearing down what a guest built is preemptible too: destroying a domain that holds a
million pages and mappings, or an IOREQ server holding many foreign mappings, lets every other
domain run between slices (as Xen's ``domain_relinquish_resources`` returns ``-ERESTART``),
and the state between two slices is whole: the audit, asked meanwhile, finds nothing wrong.

Without it one ``destroy_domain`` was a single uninterruptible step of half a second for a
1 GiB guest with 256K mappings, and ending an emulator's server dropped all its mappings at once.
"""

from __future__ import annotations

from pathlib import Path

import trio

from tests.conformance.beds import DaemonProcess
from xenemu.abi import pv_iommu as ops
from xenemu.client import ControlClient, HypercallClient, SyncControlClient

ORDER = 18
PAGES = 1 << ORDER
BASE = 1 << 24  # beyond the guest's memory: every leaf is written, none default


async def victim_first(daemon: DaemonProcess, victim: HypercallClient, slow: object, label: str) -> None:
    """Start ``slow`` (an awaitable factory); while it runs, the victim's call and an audit are
    answered before it is (the audit from a second toolstack connection, mid-teardown)."""
    order: list[str] = []
    audits: list[list[str]] = []
    ctl2 = await ControlClient.connect(daemon.control_path)

    async def run_slow() -> None:
        await slow()  # type: ignore[operator]
        order.append(label)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_slow)
        await trio.sleep(0.2)  # the teardown is under way (it takes seconds)
        (caps,) = await victim.iommu_op([ops.query_caps()])
        assert caps.status == 0
        order.append("victim")
        audits.append(await ctl2.audit())
    await ctl2.aclose()
    assert order == ["victim", label]
    assert audits == [[]]


async def test_destroying_a_huge_domain_lets_others_run_and_stays_consistent(tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path, "--frames", str(PAGES + 8192), "--dom0-memory", "512")
    try:
        ctl = SyncControlClient.connect(daemon.control_path)
        big = ctl.create_domain("hvm", PAGES)
        ctl.assign_device(big["domid"], "00:03.0")
        victim = ctl.create_domain("hvm", 64)
        ctl.assign_device(victim["domid"], "00:04.0")
        b = await HypercallClient.connect(daemon.hypercall_path, big["token"])
        v = await HypercallClient.connect(daemon.hypercall_path, victim["token"])
        batch = [ops.map_page(BASE + gfn, gfn, order=9) for gfn in range(0, PAGES, 512)]
        assert set(ops.statuses(await b.iommu_op(batch))) == {"OK"}
        before = ctl.stats()["free_frames"]
        actl = await ControlClient.connect(daemon.control_path)
        await victim_first(daemon, v, lambda: actl.destroy_domain(big["domid"]), "destroy")
        assert ctl.stats()["free_frames"] == before + PAGES  # every frame came back
        assert big["domid"] not in [d["domid"] for d in ctl.list_domains()]
        assert ctl.audit() == []
    finally:
        daemon.stop()


async def test_ending_a_server_of_many_foreign_mappings_lets_others_run(tmp_path: Path) -> None:
    pages = 1 << 16
    daemon = DaemonProcess(tmp_path, "--frames", str(pages + 8192), "--dom0-memory", "512")
    try:
        ctl = SyncControlClient.connect(daemon.control_path)
        guest = ctl.create_domain("hvm", pages)
        dm = ctl.create_domain("pv", 16, target=guest["domid"])
        ctl.assign_device(dm["domid"], "00:05.0")
        victim = ctl.create_domain("hvm", 64)
        ctl.assign_device(victim["domid"], "00:04.0")
        e = await HypercallClient.connect(daemon.hypercall_path, dm["token"])
        v = await HypercallClient.connect(daemon.hypercall_path, victim["token"])
        server = await e.create_ioreq_server(guest["domid"])
        batch = [ops.map_foreign_page(BASE + gfn, gfn, guest["domid"], server, order=9) for gfn in range(0, pages, 512)]
        assert set(ops.statuses(await e.iommu_op(batch))) == {"OK"}
        assert ctl.audit() == []
        await victim_first(daemon, v, lambda: e.destroy_ioreq_server(server), "destroy_ioreq_server")
        domains = {d["domid"]: d for d in ctl.list_domains()}
        assert domains[dm["domid"]]["mappings"] == 0
        assert ctl.audit() == []
    finally:
        daemon.stop()


async def test_building_a_huge_domain_lets_others_run(tmp_path: Path) -> None:
    """Creation is the mirror image: its memory is populated in slices, the domain in limbo
    (no request finds it, its id taken) until it is whole."""
    daemon = DaemonProcess(tmp_path, "--frames", str(2 * PAGES + 8192), "--dom0-memory", "512")
    try:
        ctl = SyncControlClient.connect(daemon.control_path)
        victim = ctl.create_domain("hvm", 64)
        ctl.assign_device(victim["domid"], "00:04.0")
        v = await HypercallClient.connect(daemon.hypercall_path, victim["token"])
        actl = await ControlClient.connect(daemon.control_path)
        made: list[dict[str, object]] = []

        async def build() -> None:
            made.append(await actl.create_domain("pv", 2 * PAGES))

        await victim_first(daemon, v, build, "create")
        assert ctl.stats()["domains_in_limbo"] == 0
        assert {d["domid"]: d for d in ctl.list_domains()}[made[0]["domid"]]["pages"] == 2 * PAGES
    finally:
        daemon.stop()
