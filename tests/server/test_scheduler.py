"""The scheduler, in the test's own trio loop: preemption observed, not timed."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from xenemu.abi import pv_iommu as ops
from xenemu.client import HypercallClient
from xenemu.core.audit import audit
from xenemu.core.host import Host
from xenemu.core.options import HostOptions
from xenemu.server.daemon import Daemon

BIG = 65536


def big_batch() -> bytes:
    half = [ops.map_page(0x100000 + i, i % 64, ops.R) for i in range(BIG // 2)]
    return bytes(ops.pack(half + [ops.unmap_page(0x100000 + i) for i in range(BIG // 2)]))


@pytest.mark.parametrize("every", [1024, BIG])
async def test_small_call_overtakes_a_huge_batch(tmp_path: Path, every: int) -> None:
    """Another domain's call runs while a 65,536-op batch is half done.

    With continuation points every 1,024 ops, and also without any (``every`` = the batch
    size): the batch pauses whenever it has spent a slice of work, so no setting of the
    continuation interval lets one domain hold the daemon.  (Before preemption by work, the
    second case never let the small call in: tests/adversarial/test_core_preemption.py is
    the check that fails on such a daemon.)
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
        assert overtook is True
        assert audit(host) == []
        await a.aclose()
        await b.aclose()
        daemon.shutdown()
