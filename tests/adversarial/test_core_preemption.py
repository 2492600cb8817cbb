"""Preemption is by work, not by op count: a batch of a few huge failing ops cannot hold the
daemon while another domain waits (the victim's call is answered first, not after it)."""

from __future__ import annotations

from pathlib import Path

import trio

from tests.conformance.beds import DaemonProcess
from xenemu.abi import pv_iommu as ops
from xenemu.client import HypercallClient, SyncControlClient

ORDER = 18  # 262,144 pages per op


async def test_huge_failing_ops_do_not_stall_another_domain(tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path, "--frames", str((1 << ORDER) + 8192), "--dom0-memory", "512")
    try:
        ctl = SyncControlClient.connect(daemon.control_path)
        attacker = ctl.create_domain("hvm", 1 << ORDER)
        ctl.assign_device(attacker["domid"], "00:03.0")
        victim = ctl.create_domain("hvm", 64)
        ctl.assign_device(victim["domid"], "00:04.0")
        a = await HypercallClient.connect(daemon.hypercall_path, attacker["token"])
        v = await HypercallClient.connect(daemon.hypercall_path, victim["token"])
        out = await a.decrease_reservation([(1 << ORDER) - 1])  # so each unmap fails on its last page
        assert out["ret"] == 1
        order: list[str] = []

        async def attack() -> None:
            got = await a.iommu_op([ops.unmap_page(0, ORDER)] * 4)
            assert ops.statuses(got) == ["-ENOENT"] * 4
            order.append("attacker")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(attack)
            await trio.sleep(0.05)  # the attacker's batch is running
            (caps,) = await v.iommu_op([ops.query_caps()])
            assert caps.status == 0
            order.append("victim")
        assert order == ["victim", "attacker"]  # answered between the attacker's slices
        assert ctl.audit() == []
    finally:
        daemon.stop()


async def test_huge_ballooning_calls_do_not_stall_another_domain(tmp_path: Path) -> None:
    pages = 1 << 16
    daemon = DaemonProcess(tmp_path, "--frames", str(pages + 8192), "--dom0-memory", "512")
    try:
        ctl = SyncControlClient.connect(daemon.control_path)
        attacker = ctl.create_domain("hvm", pages)
        victim = ctl.create_domain("hvm", 64)
        ctl.assign_device(victim["domid"], "00:04.0")
        a = await HypercallClient.connect(daemon.hypercall_path, attacker["token"])
        v = await HypercallClient.connect(daemon.hypercall_path, victim["token"])
        for call in ("decrease_reservation", "populate_physmap"):
            order: list[str] = []

            async def attack(call: str = call, order: list[str] = order) -> None:
                out = await getattr(a, call)(list(range(pages)))
                assert (out["ret"], out["status"]) == (pages, 0)
                order.append("attacker")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(attack)
                await trio.sleep(0.02)
                (caps,) = await v.iommu_op([ops.query_caps()])
                assert caps.status == 0
                order.append("victim")
            assert order == ["victim", "attacker"], call
        assert ctl.audit() == []
    finally:
        daemon.stop()
