"""The daemon in the test's own trio loop, where scheduling can be observed, not timed."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from xenemu.abi import pv_iommu as ops
from xenemu.client import ControlClient, HypercallClient
from xenemu.core.audit import audit
from xenemu.core.host import Host
from xenemu.core.options import HostOptions
from xenemu.server import Daemon

BIG = 65536


def big_batch() -> bytes:
    half = [ops.map_page(0x100000 + i, i % 64, ops.R) for i in range(BIG // 2)]
    return bytes(ops.pack(half + [ops.unmap_page(0x100000 + i) for i in range(BIG // 2)]))


@pytest.mark.parametrize("every", [1024, BIG])
async def test_small_call_overtakes_a_huge_batch(tmp_path: Path, every: int) -> None:
    """Another domain's call runs while a 65,536-op batch is half done, thanks to continuations.

    Without continuation points (``every`` = the batch size) no other task can ever see the
    batch half applied, which shows the check would catch a daemon that stalls.
    """
    host = Host(HostOptions(nr_frames=8192, dom0_memory=512, continuation_every=every))
    big = host.create_domain("hvm", 64)
    host.assign_device(big.domid, "00:08.0")
    small = host.create_domain("hvm", 64)
    host.assign_device(small.domid, "00:09.0")
    daemon = Daemon(host, tmp_path / "control.sock", tmp_path / "hypercall.sock")
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: daemon.serve(handle_signals=False, task_status=task_status))
        a = await HypercallClient.connect(daemon.hypercall_path, big.token)
        b = await HypercallClient.connect(daemon.hypercall_path, small.token)
        done: dict[str, object] = {}

        async def run_big() -> None:
            done["big"] = await a.iommu_op_raw(big_batch(), BIG)

        nursery.start_soon(run_big)
        assert big.domid in host.iommu.contexts
        overtook = None
        while "big" not in done:
            if host.iommu.contexts[big.domid].table.get(0x100000):  # the batch is half applied right now
                (caps,) = await b.iommu_op([ops.query_caps()])
                assert caps.status == 0
                overtook = "big" not in done
                break
            await trio.sleep(0)
        while "big" not in done:
            await trio.sleep(0.01)
        ret, buf = done["big"]  # type: ignore[misc]
        assert ret == 0 and set(ops.statuses(ops.unpack(buf))) == {"OK"}
        if every < BIG:
            assert overtook is True
        else:
            assert overtook is None  # never observed half applied: the batch ran in one piece
        assert audit(host) == []
        await a.aclose()
        await b.aclose()
        daemon.shutdown()


async def test_async_clients_end_to_end(tmp_path: Path) -> None:
    host = Host(HostOptions(nr_frames=8192, dom0_memory=512))
    daemon = Daemon(host, tmp_path / "control.sock", tmp_path / "hypercall.sock")
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: daemon.serve(handle_signals=False, task_status=task_status))
        async with await ControlClient.connect(daemon.control_path) as ctl:
            guest = await ctl.create_domain("hvm", 32, name="web")
            await ctl.assign_device(guest["domid"], "00:03.0")
            async with await HypercallClient.connect(daemon.hypercall_path, guest["token"]) as xc:
                assert xc.domid == guest["domid"]
                got = await xc.iommu_op([ops.map_page(0x1000 + g, g) for g in range(32)])
                assert set(ops.statuses(got)) == {"OK"}
                await xc.guest_write(3, b"async")
                dma = await xc.device_dma("00:03.0", 0x1003 << 12, length=5)
                assert dma["ok"] and dma["data"] == b"async"
                assert await xc.echo(b"\x01" * 64) == b"\x01" * 64
            rows = await ctl.dump_mappings(guest["domid"], 0x1000, 4)
            assert [r["bfn"] for r in rows] == [0x1000, 0x1001, 0x1002, 0x1003]
            assert rows[0]["kind"] == "map" and rows[0]["perms"] == "rw"
            listed = {d["domid"]: d for d in await ctl.list_domains()}
            assert listed[guest["domid"]]["name"] == "web" and listed[guest["domid"]]["map_cap"]
            stats = await ctl.stats()
            assert stats["domains"] == 2 and stats["flushes_added"] >= 1
            assert await ctl.audit() == []
        daemon.shutdown()
