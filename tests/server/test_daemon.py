"""The daemon in the test's own trio loop: both sockets, both clients, end to end."""

from __future__ import annotations

from pathlib import Path

import trio

from xenemu.abi import pv_iommu as ops
from xenemu.client import ControlClient, HypercallClient
from xenemu.core.host import Host
from xenemu.core.options import HostOptions
from xenemu.server.daemon import Daemon


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
