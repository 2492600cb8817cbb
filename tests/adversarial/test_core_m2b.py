"""An emulator holding one frame at very many BFNs cannot make each unmap cost a scan.

``lookup_foreign_page`` answers the lowest BFN a server holds a frame at, so the M2B keeps
that lowest one current.  Recomputing it by scanning every BFN of the frame when the lowest
goes let an emulator map one guest frame at 64K BFNs and unmap them lowest first: every
unmap scanned them all (1,024 such unmaps took 0.8 s of uninterruptible work).  Counted in
comparisons, not in seconds, so the test does not depend on the machine's speed.
"""

from __future__ import annotations

from tests.bed import Bed
from xenemu.abi import pv_iommu as pv
from xenemu.core.iommu.m2b import M2B, M2BEntry
from xenemu.core.iommu.subops import run_iommu_op


class Counted(int):
    """A BFN that counts how often it is compared."""

    comparisons = 0

    def __lt__(self, other: object) -> bool:
        Counted.comparisons += 1
        return int(self) < int(other)  # type: ignore[call-overload]

    def __gt__(self, other: object) -> bool:
        Counted.comparisons += 1
        return int(self) > int(other)  # type: ignore[call-overload]

    __hash__ = int.__hash__


def test_losing_the_lowest_bfn_of_a_much_shared_frame_costs_a_logarithm() -> None:
    m2b = M2B()
    n = 1 << 14
    entries = [M2BEntry(7, Counted(bfn), 1, 2, 3, 3, True) for bfn in range(n)]
    for entry in entries:
        m2b.add(entry)
    Counted.comparisons = 0
    for entry in entries[:1024]:  # lowest first, as the attack did
        m2b.remove(entry)
        lowest = m2b.lowest_for(7, 3)
        assert lowest is not None and lowest.bfn == entry.bfn + 1
    # A scan would compare n - k times per removal (about 16M in all); a heap about 2 log2 n.
    assert Counted.comparisons < 1024 * 64, Counted.comparisons


def test_the_attack_through_the_hypercall_keeps_lookups_right_and_the_audit_clean() -> None:
    bed = Bed(nr_frames=1 << 14)
    guest = bed.guest("hvm", 64, "00:03.0")
    dm = bed.host.create_domain("hvm", 16, guest.domid)
    bed.host.assign_device(dm.domid, "00:05.0")
    server = bed.host.emulators.create_server(dm.domid, guest.domid).id

    def call(batch: list[pv.Op]) -> list[pv.Op]:
        buf = pv.pack(batch)
        assert run_iommu_op(bed.host.iommu, dm.domid, buf, len(batch)) == 0
        return pv.unpack(buf)

    base = 1 << 20
    lookup = pv.lookup_foreign_page(0, guest.domid, server)
    for start in range(0, 4096, 1024):
        got = call([pv.map_foreign_page(base + b, 0, guest.domid, server) for b in range(start, start + 1024)])
        assert {op.status for op in got} == {0}
    for bfn in range(3000):  # lowest first; now and then one below comes back and goes again
        got = call([pv.unmap_foreign_page(base + bfn, server), lookup])
        assert (got[0].status, got[1].status, got[1].bfn) == (0, 0, base + bfn + 1)
        if bfn % 100 == 99:
            back = base + bfn // 2
            got = call([pv.map_foreign_page(back, 0, guest.domid, server), lookup])
            assert got[1].bfn == back
            got = call([pv.unmap_foreign_page(back, server), lookup])
            assert got[1].bfn == base + bfn + 1
    bed.check()
