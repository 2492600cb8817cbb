"""The guest-physical map a toolstack reports: vITS and redistributor frames (registers.py).

No two frames overlap, none overlaps guest RAM, and a frame never moves once reported, whatever
the order devices are assigned in, for any number of pITSs and vCPUs the host allows.
"""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from xenemu.core.host import Host
from xenemu.core.options import HostOptions

FRAME = 0x20000  # 128 KiB: an ITS (control + translation) or a redistributor (RD + SGI)


def frames_of(host: Host, domid: int) -> list[tuple[int, int, str]]:
    its_frames, redist = host.its.frames(domid)
    vcpus = host.its.domains[domid].vcpus
    out = [(gpa, gpa + FRAME, f"vITS {p}") for p, gpa in its_frames.items()]
    return out + [(redist + v * FRAME, redist + (v + 1) * FRAME, f"GICR {v}") for v in range(vcpus)]


def assert_disjoint(host: Host, domid: int, memory: int) -> None:
    spans = sorted([*frames_of(host, domid), (0, memory << 12, "RAM")])
    for (_, end, name), (start, _, other) in itertools.pairwise(spans):
        assert end <= start, f"{name} overlaps {other}"


def test_a_second_pits_does_not_put_its_vits_on_redistributor_0() -> None:
    host = Host(HostOptions(nr_frames=8192, dom0_memory=64, its_pits=2))
    dom = host.create_domain("hvm", 64, vcpus=2)
    host.assign_device(dom.domid, "00:01.0", its_devid=0x10, its_events=4, pits=0)
    host.assign_device(dom.domid, "00:02.0", its_devid=0x11, its_events=4, pits=1)
    assert_disjoint(host, dom.domid, 64)


def test_frames_do_not_move_when_a_lower_pits_is_assigned_later() -> None:
    host = Host(HostOptions(nr_frames=8192, dom0_memory=64, its_pits=3))
    dom = host.create_domain("hvm", 64, vcpus=2)
    host.assign_device(dom.domid, "00:01.0", its_devid=0x10, its_events=4, pits=2)
    before = host.its.frames(dom.domid)
    doorbell = host.its.translation_gpa(dom.domid, 2)
    host.assign_device(dom.domid, "00:02.0", its_devid=0x11, its_events=4, pits=0)
    after = host.its.frames(dom.domid)
    assert after[0][2] == before[0][2] and after[1] == before[1]
    assert host.its.translation_gpa(dom.domid, 2) == doorbell  # where the IOMMU maps its doorbell
    assert doorbell >> 12 in host.iommu.contexts[dom.domid].doorbells
    assert_disjoint(host, dom.domid, 64)


def test_frames_sit_above_the_largest_ram_the_host_can_give() -> None:
    host = Host(HostOptions(nr_frames=1 << 16, dom0_memory=64))
    memory = (1 << 16) - 64 - 16 - 8  # nearly all of the host's RAM, for one guest
    dom = host.create_domain("hvm", memory, vcpus=4)
    host.assign_device(dom.domid, "00:01.0", its_devid=0x10, its_events=4)
    assert_disjoint(host, dom.domid, memory)


@settings(max_examples=40, deadline=None)
@given(
    pits=st.integers(1, 6),
    vcpus=st.integers(1, 64),
    nr_frames=st.sampled_from([4096, 1 << 16, (1 << 18) + 5]),
    order=st.permutations(range(6)),
)
def test_no_frame_overlaps_another_or_ram(pits: int, vcpus: int, nr_frames: int, order: list[int]) -> None:
    host = Host(HostOptions(nr_frames=nr_frames, dom0_memory=64, its_pits=pits, its_cpus=4))
    memory = 512
    dom = host.create_domain("hvm", memory, vcpus=vcpus)
    seen: dict[int, int] = {}
    for n, p in enumerate(p for p in order if p < pits):
        host.assign_device(dom.domid, f"00:{n + 1:02x}.0", its_devid=0x10 + n, its_events=2, pits=p)
        seen[p] = host.its.frames(dom.domid)[0][p]
        assert {q: host.its.frames(dom.domid)[0][q] for q in seen} == seen  # nothing moved
    assert_disjoint(host, dom.domid, memory)
    assert_disjoint(host, dom.domid, nr_frames)  # not even the host's largest RAM
