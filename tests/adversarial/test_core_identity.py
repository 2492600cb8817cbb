"""Identity is the domain, not its number: work in flight ends with its domain instance.

An attacker's batch is preempted at a continuation point; the toolstack destroys its domain and
the id comes round again to a new, innocent domain.  The rest of the batch must never run as
that new domain.  (Driven on the core: wrapping 32,000 domain ids over a socket takes minutes,
so the test moves the id allocator to the reused id, which is what the wrap does.)
"""

from __future__ import annotations

from xenemu.abi import pv_iommu as ops
from xenemu.core.audit import audit
from xenemu.core.host import Host
from xenemu.core.iommu.subops import CONTINUATION, do_iommu_op
from xenemu.core.options import HostOptions


def test_a_preempted_batch_does_not_resume_as_the_next_domain_with_its_id() -> None:
    host = Host(HostOptions(nr_frames=1 << 14, dom0_memory=512, continuation_every=16))
    attacker = host.create_domain("hvm", 64)
    host.assign_device(attacker.domid, "00:03.0")
    batch = ops.pack([ops.map_page(0x4000 + i, i % 64) for i in range(64)])
    run = do_iommu_op(host.iommu, attacker.domid, batch, 64)
    assert next(run) == CONTINUATION  # 16 ops done, preempted
    host.destroy_domain(attacker.domid)
    host.next_domid = attacker.domid  # the id allocator wrapped round
    victim = host.create_domain("hvm", 64)
    host.assign_device(victim.domid, "00:04.0")
    assert victim.domid == attacker.domid and victim is not attacker
    before = sorted(host.iommu.contexts[victim.domid].table.materialized())
    try:
        while True:
            next(run)
    except StopIteration as stop:
        assert stop.value == -3  # -ESRCH: the batch's domain is gone
    assert sorted(host.iommu.contexts[victim.domid].table.materialized()) == before
    assert not host.iommu.mappings_held.get(victim.domid)
    assert [op.status for op in ops.unpack(batch)][16:] == [0] * 48  # the rest never ran
    assert audit(host) == []
