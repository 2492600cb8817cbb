"""Load: dozens of concurrent guests and emulators on one daemon (loopback only, bounded).

Every client runs a fixed number of mixed rounds; the test fails on any protocol error, on an
unclean audit, or if the daemon's memory grew after the clients left, compared with the same
workload run once before (so that first-use allocations are not counted as growth).
"""

from __future__ import annotations

import random
from pathlib import Path

import trio

from tests.conformance.beds import DaemonProcess
from xenemu.abi import pv_iommu as ops
from xenemu.client import ControlClient, HypercallClient

GUESTS, EMULATORS, ROUNDS = 16, 8, 30


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def guest_worker(xc: HypercallClient, seed: int, bdf: str, errors: list[str]) -> None:
    rng = random.Random(seed)
    for r in range(ROUNDS):
        base = 0x100000 + 0x1000 * r
        gfns = rng.sample(range(64), 32)
        got = await xc.iommu_op([ops.map_page(base + i, g) for i, g in enumerate(gfns)])
        errors += [f"map {o.status_name}" for o in got if o.status]
        dma = await xc.device_dma(bdf, base << 12, length=64)
        if not dma["ok"]:
            errors.append(f"dma {dma['reason']}")
        got = await xc.iommu_op([ops.unmap_page(base + i) for i in range(32)])
        errors += [f"unmap {o.status_name}" for o in got if o.status]
        if r % 3 == 0:
            out = await xc.decrease_reservation(list(range(100, 108)))
            back = await xc.populate_physmap(list(range(100, 108)))
            if out["ret"] != 8 or back["ret"] != 8:
                errors.append(f"balloon {out} {back}")


async def emulator_worker(xc: HypercallClient, guest: int, errors: list[str]) -> None:
    server = await xc.create_ioreq_server(guest)
    for r in range(ROUNDS):
        batch = [
            ops.map_foreign_page(0x200000 + i, 64 + i, guest, server, ops.R, swap_mfn=r % 2 == 0) for i in range(16)
        ]
        got = await xc.iommu_op(batch)
        errors += [f"map_foreign {o.status_name}" for o in got if o.status]
        looked = await xc.iommu_op([ops.lookup_foreign_page(64 + i, guest, server) for i in range(16)])
        errors += [f"lookup {o.status_name}" for o in looked if o.status]
        got = await xc.iommu_op([ops.unmap_foreign_page(0x200000 + i, server) for i in range(16)])
        errors += [f"unmap_foreign {o.status_name}" for o in got if o.status]
    await xc.destroy_ioreq_server(server)


async def run_workload(daemon: DaemonProcess) -> list[str]:
    errors: list[str] = []
    async with await ControlClient.connect(daemon.control_path) as ctl:
        guests, emulators = [], []
        for i in range(GUESTS):
            guest = await ctl.create_domain("hvm", 128)
            await ctl.assign_device(guest["domid"], "00:03.0" if i == 0 else f"{i:02x}:03.0")
            guests.append(guest)
        for i in range(EMULATORS):
            dm = await ctl.create_domain("pv", 16, target=guests[i]["domid"])
            await ctl.assign_device(dm["domid"], f"{i:02x}:05.0")
            emulators.append((dm, guests[i]["domid"]))
        async with trio.open_nursery() as nursery:
            for i, guest in enumerate(guests):
                xc = await HypercallClient.connect(daemon.hypercall_path, guest["token"])
                bdf = "00:03.0" if i == 0 else f"{i:02x}:03.0"

                async def run_guest(xc: HypercallClient = xc, seed: int = i, bdf: str = bdf) -> None:
                    async with xc:
                        await guest_worker(xc, seed, bdf, errors)

                nursery.start_soon(run_guest)
            for dm, target in emulators:
                xe = await HypercallClient.connect(daemon.hypercall_path, dm["token"])

                async def run_emulator(xe: HypercallClient = xe, target: int = target) -> None:
                    async with xe:
                        await emulator_worker(xe, target, errors)

                nursery.start_soon(run_emulator)
        errors += await ctl.audit()
        for guest in guests:
            await ctl.destroy_domain(guest["domid"])
        for dm, _ in emulators:
            await ctl.destroy_domain(dm["domid"])
        errors += await ctl.audit()
        stats = await ctl.stats()
        if stats["m2b_entries"] or stats["ioreq_servers"] or stats["domains"] != 1:
            errors.append(f"left behind: {stats}")
    return errors


async def test_dozens_of_clients_with_no_errors_and_no_growth(tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path, "--frames", "16384", "--dom0-memory", "512")
    try:
        assert await run_workload(daemon) == []
        warm = rss_kib(daemon.proc.pid)
        assert await run_workload(daemon) == []
        after = rss_kib(daemon.proc.pid)
        assert after - warm < 4096, f"daemon RSS grew from {warm} KiB to {after} KiB after the clients left"
    finally:
        daemon.stop()
