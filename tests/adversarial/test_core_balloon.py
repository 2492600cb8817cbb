"""Ballooning out a frame costs slices, however many BFNs emulators hold it at, and what it
leaves for an emulator to read comes in bounded pieces.

An emulator may map one guest frame at a million BFNs; the guest ballooning that frame out
re-pointed every mapping to scratch (or announced every one) in one uninterruptible step:
4.9 s with a million ``swap_mfn`` mappings, during which no other domain ran.  And every
synchronous invalidate was handed to the emulator in one ``ioreq_fetch`` reply, which past
about 106K requests no longer fit in a frame and killed the emulator's connection.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from tests.bed import Bed
from tests.conformance.beds import DaemonProcess
from xenemu.abi import pv_iommu as ops
from xenemu.client import HypercallClient, SyncControlClient
from xenemu.core.actions.dispatch import dispatch
from xenemu.core.actions.memory import DecreaseReservation
from xenemu.core.audit import audit
from xenemu.core.iommu import preempt

BASE = 1 << 20


@pytest.mark.parametrize("swap", [True, False], ids=["swap_mfn", "invalidate"])
def test_one_frame_held_at_many_bfns_is_released_in_slices(swap: bool) -> None:
    """Counted, not timed: the balloon-out of that one GFN pauses every slice of mappings, and
    between two pauses the state is whole (the audit is clean at each)."""
    bed = Bed(nr_frames=1 << 14)
    guest = bed.guest("hvm", 64, None)
    dm = bed.host.create_domain("pv", 16, guest.domid)
    bed.host.assign_device(dm.domid, "00:05.0")
    server = bed.host.emulators.create_server(dm.domid, guest.domid).id
    n = 8 * preempt.M2B_PER_SLICE
    for start in range(0, n, 1024):
        batch = [
            ops.map_foreign_page(BASE + b, 7, guest.domid, server, swap_mfn=swap) for b in range(start, start + 1024)
        ]
        assert set(ops.statuses(bed.call(dm.domid, batch))) == {"OK"}
    steps = dispatch(bed.host, guest.domid, DecreaseReservation([7]))
    pauses = 0
    while True:
        try:
            effect = next(steps)
        except StopIteration as stop:
            result = stop.value
            break
        if effect == preempt.PREEMPT:
            pauses += 1
            assert audit(bed.host) == []
    assert result["ret"] == 1
    assert pauses >= 4  # at least one pause per two slices' worth of its mappings
    bed.check()


async def test_an_emulator_reads_its_synchronous_requests_in_bounded_pieces(tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path, "--frames", "16384", "--dom0-memory", "512")
    try:
        ctl = SyncControlClient.connect(daemon.control_path)
        guest = ctl.create_domain("hvm", 6144)
        dm = ctl.create_domain("pv", 16, target=guest["domid"])
        ctl.assign_device(dm["domid"], "00:05.0")
        g = await HypercallClient.connect(daemon.hypercall_path, guest["token"])
        e = await HypercallClient.connect(daemon.hypercall_path, dm["token"])
        server = await e.create_ioreq_server(guest["domid"])
        batch = [ops.map_foreign_page(BASE + gfn, gfn, guest["domid"], server, order=9) for gfn in range(0, 6144, 512)]
        assert set(ops.statuses(await e.iommu_op(batch))) == {"OK"}
        replies: list[dict[str, object]] = []

        async def balloon() -> None:  # 6,144 invalidates: 511 on the ring, the rest synchronous
            replies.append(await g.decrease_reservation(list(range(6144))))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(balloon)
            while not (raw := await e.call("ioreq_fetch", {"ioserver": server}))["more"]:
                await trio.sleep(0.01)  # until more than one reply's worth waits
            seen = 0
            while not replies:
                assert len(raw["sync"]) <= 4096
                for req_id, _ in raw["sync"]:
                    await e.ioreq_complete(server, req_id)
                seen += len(raw["sync"])
                await trio.sleep(0.01)
                raw = await e.call("ioreq_fetch", {"ioserver": server})
        assert replies[0]["ret"] == 6144 and seen == 6144 - 511
        assert ctl.audit() == []
    finally:
        daemon.stop()
