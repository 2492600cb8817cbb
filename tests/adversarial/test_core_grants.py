"""A batch of grant ops pauses every slice: 4,096 maps or unmaps were one uninterruptible step
of about 50 ms, during which no other domain ran.  Counted, not timed: the batch yields at
least once per ``OPS_PER_SLICE`` ops, the state between two pauses is whole (the audit is clean
at each), and every op's status is what an unpreempted run gives."""

from __future__ import annotations

from tests.bed import Bed
from xenemu.abi import grant_table as grants
from xenemu.core.actions.dispatch import dispatch
from xenemu.core.actions.grant import GrantTableOp
from xenemu.core.audit import audit
from xenemu.core.grants.ops import OPS_PER_SLICE
from xenemu.core.grants.table import MAX_MAPTRACK
from xenemu.core.iommu import preempt


def run_counting(bed: Bed, caller: int, action: GrantTableOp) -> tuple[dict[str, object], int]:
    steps = dispatch(bed.host, caller, action)
    pauses = 0
    while True:
        try:
            effect = next(steps)
        except StopIteration as stop:
            return stop.value, pauses
        assert effect == preempt.PREEMPT
        pauses += 1
        assert audit(bed.host) == []


def test_a_full_batch_of_grant_maps_and_unmaps_pauses_every_slice() -> None:
    bed = Bed(nr_frames=1 << 14)
    front = bed.guest("hvm", 64, None)
    back = bed.guest("pv", 16, None)
    for ref in range(16):
        bed.host.grants.grant_access(front.domid, ref, back.domid, ref)
    maps = [grants.MapGrant(front.domid, i % 16, grants.DEVICE_MAP) for i in range(MAX_MAPTRACK)]
    reply, pauses = run_counting(
        bed, back.domid, GrantTableOp("map_grant_ref", bytes(grants.pack_map(maps)), len(maps))
    )
    assert reply["ret"] == 0 and pauses >= MAX_MAPTRACK // OPS_PER_SLICE - 1
    done = grants.unpack_map(reply["buf"])  # type: ignore[arg-type]
    assert {g.status_name for g in done} == {"GNTST_okay"}
    unmaps = [grants.UnmapGrant(g.handle) for g in done]
    buf = bytes(grants.pack_unmap(unmaps))
    reply, pauses = run_counting(bed, back.domid, GrantTableOp("unmap_grant_ref", buf, len(unmaps)))
    assert reply["ret"] == 0 and pauses >= MAX_MAPTRACK // OPS_PER_SLICE - 1
    assert {g.status_name for g in grants.unpack_unmap(reply["buf"])} == {"GNTST_okay"}  # type: ignore[arg-type]
    bed.check()
