"""A guest saved with its device model (``with_dm``) and restored on another host: the emulator's
IOREQ servers serve the new guest under new ids, its foreign mappings reach the restored memory
by DMA, what the guest gives back is announced to it; what cannot be carried is refused, a
corrupt or lying device-model image is refused with nothing created, and a failed or cut restore
leaves nothing. The audit is clean on both hosts after every step."""

from __future__ import annotations

import json
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.bed import Bed
from xenemu.abi import pv_iommu as ops
from xenemu.abi.ioreq import read_ring
from xenemu.core.actions.migration import ImageRead, ImageWrite, RestoreBegin, RestoreDomain, SaveDomain
from xenemu.core.errors import HypercallError
from xenemu.core.iommu.entries import Kind, entry_kind
from xenemu.core.iommu.preempt import PREEMPT
from xenemu.core.memory.domain import Domain
from xenemu.core.migration import dm
from xenemu.core.migration.image import decode, encode
from xenemu.core.migration.store import CHUNK

GUEST_BDF, DM_BDF = "0000:00:03.0", "0000:00:05.0"
BASE = 0x80000  # where the emulator maps guest frame g: BASE + g (as clients/mediated_emulator.py)
RO_BFN = 0x90000
WIDE = 1 << 33  # a BFN whose invalidate takes two 64-bit slots of the ring


def page(gfn: int) -> bytes:
    return (gfn + 1).to_bytes(4, "little") * 1024


def balloon_out(bed: Bed, domid: int, gfns: list[int]) -> list[Any]:
    """A guest's decrease_reservation run until it returns or waits; what it yielded besides pauses."""
    steps = bed.host.balloon.decrease_reservation(domid, gfns)
    waits = []
    try:
        while True:
            got = next(steps)
            if got != PREEMPT:
                waits.append(got)
                break
    except StopIteration:
        pass
    bed.check()
    return waits


@dataclass
class Setup:
    guest: Domain
    dm: Domain
    servers: list[int]


def guest_with_emulator(bed: Bed, memory: int = 64) -> Setup:
    """A guest with contents and a mediated emulator in its own HVM domain: two servers, R/W
    mappings of frames 0-7, a read-only one, a swap_mfn mapping the guest ballooned out (a
    scratch entry), and an invalidate left unread on the ring (its BFN already unmapped)."""
    host = bed.host
    guest = bed.guest(memory=memory, device=GUEST_BDF)
    for g in range(16):
        host.memory.access(guest.domid, g, 0, page(g))
    emulator = host.create_domain("hvm", 16, target=guest.domid, name="qemu-dm")
    host.assign_device(emulator.domid, DM_BDF)
    first = host.emulators.create_server(emulator.domid, guest.domid).id
    second = host.emulators.create_server(emulator.domid, guest.domid).id
    got = bed.call(
        emulator.domid,
        [ops.map_foreign_page(BASE + g, g, guest.domid, first) for g in range(8)]
        + [ops.map_foreign_page(BASE + 9, 9, guest.domid, first, swap_mfn=True)]
        + [ops.map_foreign_page(BASE + 11, 11, guest.domid, first)]
        + [ops.map_foreign_page(WIDE, 13, guest.domid, first)]
        + [ops.map_foreign_page(BASE + 12, 12, guest.domid, first, swap_mfn=True)]
        + [ops.map_foreign_page(RO_BFN, 10, guest.domid, second, perms=ops.R)],
    )
    assert ops.statuses(got) == ["OK"] * 13
    assert balloon_out(bed, guest.domid, [9, 11, 13]) == []  # 9 swaps to scratch; 11 and 13 are announced
    got = bed.call(emulator.domid, [ops.unmap_foreign_page(b, first) for b in (BASE + 11, WIDE)])
    assert ops.statuses(got) == ["OK", "OK"]  # told, it unmapped them, but has not acknowledged the ring
    return Setup(guest, emulator, [first, second])


def save(bed: Bed, domid: int, keep: bool = False) -> tuple[bytes, list[bytes], dict[str, Any]]:
    reply = bed.act(0, SaveDomain(domid, keep, with_dm=True))

    def read(image: int, size: int) -> bytes:
        return b"".join(bed.act(0, ImageRead(image, at, CHUNK))["data"] for at in range(0, size, CHUNK))

    return read(reply["image"], reply["size"]), [read(d["image"], d["size"]) for d in reply["dm_images"]], reply


def put(bed: Bed, data: bytes) -> int:
    image: int = bed.act(0, RestoreBegin(len(data)))["image"]
    for at in range(0, len(data), CHUNK):
        bed.act(0, ImageWrite(image, at, data[at : at + CHUNK]))
    return image


def load(bed: Bed, data: bytes, dm_data: list[bytes]) -> dict[str, Any]:
    guest = put(bed, data)
    reply: dict[str, Any] = bed.act(0, RestoreDomain(guest, [put(bed, d) for d in dm_data]))
    return reply


def errno(fn: Any, *args: Any) -> int:
    with pytest.raises(HypercallError) as info:
        fn(*args)
    return info.value.errno


def test_the_emulator_serves_the_restored_guest_through_its_old_mappings() -> None:
    here, there = Bed(), Bed()
    there.guest(memory=300, device="00:09.0")  # the restoring host's frames are laid out otherwise
    setup = guest_with_emulator(here)
    free_before = here.host.frames.nr_free
    data, dm_data, saved = save(here, setup.guest.domid)
    assert [d["domid"] for d in saved["dm_images"]] == [setup.dm.domid]
    assert setup.guest.domid not in here.host.domains and setup.dm.domid not in here.host.domains
    assert not here.host.ioreq.servers and not len(here.host.iommu.m2b)
    assert here.host.frames.nr_free > free_before  # everything went back
    here.check()

    there.host.emulators.create_server(0, 1)  # ids on this host are ahead: the servers get others
    reply = load(there, data, dm_data)
    host = there.host
    guest, (restored,) = host.domain(reply["domid"]), reply["device_models"]
    emulator = host.domain(restored["domid"])
    assert emulator.target == guest.domid and emulator.name == "qemu-dm" and restored["token"] == emulator.token
    ids = dict(restored["servers"])
    assert sorted(ids) == setup.servers and sorted(ids.values()) != setup.servers
    for new in ids.values():
        server = host.ioreq.servers[new]
        assert (server.creator, server.target) == (emulator.domid, guest.domid)
    first, second = ids[setup.servers[0]], ids[setup.servers[1]]
    # Its foreign mappings read and write the restored guest's memory by DMA.
    for g in range(8):
        assert host.device_dma(DM_BDF, (BASE + g) << 12, None, 4096).data == page(g)
    assert host.device_dma(DM_BDF, (BASE + 3) << 12, b"dma!").ok
    assert host.memory.access(guest.domid, 3, 0, None, 4) == b"dma!"
    assert host.device_dma(DM_BDF, RO_BFN << 12, None, 4).data == page(10)[:4]
    denied = host.device_dma(DM_BDF, RO_BFN << 12, b"no")
    assert not denied.ok and denied.reason == "write denied"
    ctx = host.iommu.contexts[emulator.domid]
    scratch = ctx.table.get(BASE + 9)
    assert entry_kind(scratch) == Kind.SCRATCH and scratch >> 8 == host.ioreq.servers[first].scratch_mfn
    assert ctx.scratch == {BASE + 9: first}
    swapping = host.iommu.m2b.get(emulator.domid, first, BASE + 12)
    assert swapping is not None and swapping.flags & ops.SWAP_MFN and swapping.swappable
    # References as fresh foreign maps take them: the allocation's, plus the M2B entry's (R/W).
    mfn = there.mfn(guest, 0)
    assert there.refs(mfn) == (2, 1) and there.refs(there.mfn(guest, 10)) == (2, 0)
    assert host.iommu.mappings_held[emulator.domid] == 11  # 8 + swap_mfn + read-only + scratch
    # The ring is as it was: the unread invalidates (one 32-bit, one 64-bit) are still there to read.
    assert [r.data for r in read_ring(bytes(host.ioreq.servers[first].page))[0]] == [BASE + 11, WIDE]
    # What the guest gives back now is announced to the restored server, or swapped to its scratch frame.
    assert balloon_out(there, guest.domid, [2, 12]) == []
    assert [r.data for r in read_ring(bytes(host.ioreq.servers[first].page))[0]] == [BASE + 11, WIDE, BASE + 2]
    assert ctx.table.get(BASE + 12) == ctx.table.get(BASE + 9) and ctx.scratch[BASE + 12] == first
    assert there.refs(mfn) == (2, 1)  # untouched: frame 0 is not the one that went
    got = there.call(emulator.domid, [ops.unmap_foreign_page(BASE + 2, first), ops.unmap_foreign_page(RO_BFN, second)])
    assert ops.statuses(got) == ["OK", "OK"]
    # Its old ids name nothing here (unless this host gave them out itself).
    missing = [old for old in setup.servers if old not in host.ioreq.servers]
    got = there.call(emulator.domid, [ops.unmap_foreign_page(BASE + 4, old) for old in missing])
    assert all(s != "OK" for s in ops.statuses(got))
    # A guest destroyed: the emulator is told of every frame it still maps, and its servers lose their target.
    host.destroy_domain(guest.domid)
    entries, _ = read_ring(bytes(host.ioreq.servers[first].page))
    assert [r.data for r in entries][3:] == [BASE + g for g in (0, 1, 3, 4, 5, 6, 7)]
    assert host.ioreq.servers[first].target is None and emulator.target is None
    there.check()
    host.destroy_domain(emulator.domid)
    there.check()


def test_keep_leaves_both_running_and_the_copy_serves_its_own_guest(bed: Bed) -> None:
    setup = guest_with_emulator(bed)
    data, dm_data, _ = save(bed, setup.guest.domid, keep=True)
    assert setup.guest.domid in bed.host.domains and setup.dm.domid in bed.host.domains
    bed.host.destroy_domain(setup.dm.domid)  # its device must be free for the copy
    bed.host.destroy_domain(setup.guest.domid)  # and the guest's
    reply = load(bed, data, dm_data)
    copy = reply["device_models"][0]["domid"]
    assert bed.host.device_dma(DM_BDF, (BASE + 5) << 12, None, 8).data == page(5)[:8]
    assert bed.host.domain(copy).target == reply["domid"]


def test_refusals_change_nothing(bed: Bed) -> None:
    host = bed.host
    lonely = bed.guest(memory=8, device=None)
    assert errno(dm.snapshot_with_dms, host, lonely.domid) == -22  # with_dm, and no device model
    setup = guest_with_emulator(bed, memory=1200)
    guest, emulator, (first, _) = setup.guest, setup.dm, setup.servers
    assert errno(dm.snapshot_dm, host, emulator.domid, lonely.domid) == -22  # not its guest
    # A frame the guest gave back that the emulator still maps: it was told, it must unmap first.
    assert balloon_out(bed, guest.domid, [5]) == []
    with pytest.raises(HypercallError) as info:
        bed.act(0, SaveDomain(guest.domid, with_dm=True))
    assert info.value.errno == -16 and "gave back" in str(info.value)
    assert guest.domid in host.domains and emulator.domid in host.domains
    assert ops.statuses(bed.call(emulator.domid, [ops.unmap_foreign_page(BASE + 5, first)])) == ["OK"]
    # Synchronous invalidates waiting for the emulator: -EBUSY, try again once answered.
    gfns = list(range(100, 700))
    got = bed.call(emulator.domid, [ops.map_foreign_page(BASE + g, g, guest.domid, first) for g in gfns])
    assert set(ops.statuses(got)) == {"OK"}
    waits = balloon_out(bed, guest.domid, gfns)
    assert len(waits) == 1 and waits[0].requests
    server = host.ioreq.servers[first]
    with pytest.raises(HypercallError) as info:
        bed.act(0, SaveDomain(guest.domid, with_dm=True))
    assert info.value.errno == -16 and "synchronous" in str(info.value)
    for ioserver, req in waits[0].requests:
        assert host.ioreq.servers[ioserver].complete(req)
    assert ops.statuses(bed.call(emulator.domid, [ops.unmap_foreign_page(BASE + g, first) for g in gfns])) == [
        "OK"
    ] * len(gfns)
    _, read_pointer = read_ring(bytes(server.page))
    assert server.acknowledge(read_pointer)
    # A foreign frame held by machine address (a lookup without a context) cannot be carried.
    blind = host.create_domain("hvm", 8, target=lonely.domid)
    blind_server = host.emulators.create_server(blind.domid, lonely.domid).id
    host.memory.access(lonely.domid, 1, 0, b"x")
    assert bed.status(blind.domid, ops.lookup_foreign_page(1, lonely.domid, blind_server)) == "OK"
    with pytest.raises(HypercallError) as info:
        dm.snapshot_with_dms(host, lonely.domid)
    assert info.value.errno == -16 and "machine address" in str(info.value)
    # A PV device model is not saved (its GFNs are machine frames).
    pv = bed.guest(memory=8, device=None)
    host.create_domain("pv", 8, target=pv.domid)
    assert errno(dm.snapshot_with_dms, host, pv.domid) == -95
    bed.check()
    _, dm_data, _ = save(bed, guest.domid)  # now it goes
    assert len(dm_data) == 1
    bed.check()


def lying(data: bytes, change: Any) -> bytes:
    """The device model's image with its DMSV/FMAP changed by ``change``, re-encoded and re-summed."""
    image = dm.decode(data)
    assert image.dm_records is not None
    dmsv = json.loads(bytes(image.dm_records[0]))
    entries = [tuple(e) for e in dm.FMAP.iter_unpack(image.dm_records[1])]
    dmsv, entries = change(dmsv, entries)
    image.dm_records = [json.dumps(dmsv).encode(), b"".join(dm.FMAP.pack(*e) for e in entries)]
    return encode(image)


def set_ring(dmsv: Any, unread: int) -> Any:
    ring = bytearray.fromhex(dmsv["servers"][0]["ring"])
    ring[4:8] = (int.from_bytes(ring[0:4], "little") + unread).to_bytes(4, "little")
    dmsv["servers"][0]["ring"] = ring.hex()
    return dmsv


LIES: list[tuple[str, Any, int, str]] = [
    ("unknown server", lambda s, e: (s, [(*e[0][:2], 999, *e[0][3:]), *e[1:]]), -74, "names no IOREQ server"),
    ("unordered", lambda s, e: (s, [e[1], e[0], *e[2:]]), -74, "ascending"),
    ("bad kind", lambda s, e: (s, [(*e[0][:3], 2, e[0][4]), *e[1:]]), -74, "neither foreign nor scratch"),
    ("bad flags", lambda s, e: (s, [(*e[0][:4], 0x10), *e[1:]]), -74, "bad flags"),
    ("no leaf", lambda s, e: (s, [*e, (1 << 40, 0, e[0][2], 4, 3)]), -74, "not in a written leaf"),
    ("over its own", lambda s, e: (s, [(0, *e[0][1:]), *e]), -74, "over one of its own"),
    ("ring overfull", lambda s, e: (set_ring(s, 600), e), -74, "slots of 511"),
    ("ring garbage", lambda s, e: (set_ring(s, 4), e), -74, "not an invalidate"),
    ("ring half", lambda s, e: (set_ring(s, 2), e), -74, "half a 64-bit"),
    ("extra key", lambda s, e: ({**s, "target": 1}, e), -74, "exactly ['servers']"),
    ("too many", lambda s, e: ({"servers": s["servers"] * 5}, e), -74, "more IOREQ servers"),
    ("no such gfn", lambda s, e: (s, [(e[0][0], 5000, *e[0][2:]), *e[1:]]), -22, "which its guest lacks"),
]


@pytest.mark.parametrize(("name", "change", "want", "words"), LIES, ids=[lie[0] for lie in LIES])
def test_a_lying_device_model_image_is_refused_with_nothing_created(
    name: str, change: Any, want: int, words: str
) -> None:
    here, there = Bed(), Bed()
    data, dm_data, _ = save(here, guest_with_emulator(here).guest.domid)
    host = there.host
    free, domains = host.frames.nr_free, set(host.domains)
    with pytest.raises(HypercallError) as info:
        load(there, data, [lying(dm_data[0], change)])
    assert info.value.errno == want and words in str(info.value), info.value
    assert (host.frames.nr_free, set(host.domains), host.ioreq.next_id) == (free, domains, 1)
    there.check()


def test_corrupt_or_mismatched_images_are_refused(bed: Bed) -> None:
    data, dm_data, _ = save(bed, guest_with_emulator(bed).guest.domid)
    host = bed.host
    free = host.frames.nr_free
    flipped = bytearray(dm_data[0])
    flipped[100] ^= 1
    for guest_part, dm_part, want, words in (
        (data, [bytes(flipped)], -74, "checksum"),
        (data, [dm_data[0][:-1]], -74, "truncated"),
        (dm_data[0], [], -22, "device model's image"),  # a device model alone is not restored
        (data, [data], -22, "not a device model's image"),
    ):
        with pytest.raises(HypercallError) as info:
            load(bed, guest_part, dm_part)
        assert info.value.errno == want and words in str(info.value), info.value
        assert host.frames.nr_free == free and set(host.domains) == {0}
    image = decode(data)
    image.gfns = image.gfns[:-1]  # the guest's image lies: caught before the device model's is looked at
    with pytest.raises(HypercallError) as info:
        load(bed, encode(image), dm_data)
    assert info.value.errno == -74
    assert load(bed, data, dm_data)["device_models"][0]["servers"]
    bed.check()


def test_a_failed_device_model_restore_takes_its_guest_with_it() -> None:
    here, there = Bed(), Bed()
    data, dm_data, _ = save(here, guest_with_emulator(here).guest.domid)
    there.guest(memory=8, device=DM_BDF)  # the device model's device is taken here
    host = there.host
    free, domains = host.frames.nr_free, set(host.domains)
    with pytest.raises(HypercallError) as info:
        load(there, data, dm_data)
    assert info.value.errno == -16
    assert (host.frames.nr_free, set(host.domains)) == (free, domains) and not host.ioreq.servers
    there.check()
    small = Bed(nr_frames=1 << 10, dom0_memory=938)  # 70 free: room for the guest alone, refused at once
    with pytest.raises(HypercallError) as info:
        load(small, data, dm_data)
    assert info.value.errno == -12 and "host too small" in str(info.value)
    assert set(small.host.domains) == {0}


def steps_of(gen: Generator[str, None, Any]) -> int:
    pauses = 0
    try:
        while True:
            assert next(gen) == PREEMPT
            pauses += 1
    except StopIteration:
        return pauses


def test_a_restore_pauses_in_slices_and_a_cut_anywhere_leaves_nothing() -> None:
    here, there = Bed(), Bed()
    host = here.host
    guest = here.guest(memory=600, device=GUEST_BDF)
    emulator = host.create_domain("hvm", 16, target=guest.domid)
    host.assign_device(emulator.domid, DM_BDF)
    server = host.emulators.create_server(emulator.domid, guest.domid).id
    got = here.call(emulator.domid, [ops.map_foreign_page(BASE + g, g, guest.domid, server) for g in range(600)])
    assert set(ops.statuses(got)) == {"OK"}
    image, dm_images = dm.snapshot_with_dms(host, guest.domid)
    dm_image = dm.decode(encode(dm_images[0][1]))
    target = there.host
    free, domains = target.frames.nr_free, set(target.domains)
    total = steps_of(dm.restore_with_dms(target, image, [dm_image]))
    assert total >= 600 // dm.SLICE
    built = set(target.domains) - domains
    for domid in built:
        target.destroy_domain(domid)
    assert target.frames.nr_free == free
    there.check()
    for cut in range(total):
        steps = dm.restore_with_dms(target, image, [dm_image])
        for _ in range(cut + 1):
            assert next(steps) == PREEMPT
        there.check()  # consistent at every pause, the half-built device model busy
        busy = [d for d in target.domains.values() if d.busy_ops]
        assert busy, cut
        steps.close()
        assert (target.frames.nr_free, set(target.domains), len(target.iommu.m2b)) == (free, domains, 0)
        assert not target.ioreq.servers
        there.check()


def test_two_device_models_move_with_their_guest_in_domid_order() -> None:
    """A guest with a device model per device (as QEMU beside a mediated GPU emulator): each is
    saved into its own image, and each restored one serves the one new guest."""
    here, there = Bed(), Bed()
    host = here.host
    guest = here.guest(memory=32, device=GUEST_BDF)
    host.memory.access(guest.domid, 4, 0, page(4))
    models = []
    for n, bdf in enumerate((DM_BDF, "0000:00:06.0")):
        model = host.create_domain("hvm", 8, target=guest.domid, name=f"dm{n}")
        host.assign_device(model.domid, bdf)
        server = host.emulators.create_server(model.domid, guest.domid).id
        assert here.status(model.domid, ops.map_foreign_page(BASE + n, 4, guest.domid, server)) == "OK"
        models.append(model.domid)
    assert errno(dm.snapshot_with_dms, host, 0) == -1  # the guest's own refusals come first
    data, dm_data, saved = save(here, guest.domid)
    assert [d["domid"] for d in saved["dm_images"]] == models and len(dm_data) == 2
    here.check()
    reply = load(there, data, dm_data)
    names = [there.host.domain(d["domid"]).name for d in reply["device_models"]]
    assert names == ["dm0", "dm1"]
    assert [d["servers"] for d in reply["device_models"]] == [[[1, 1]], [[2, 2]]]
    for n, bdf in enumerate((DM_BDF, "0000:00:06.0")):
        assert there.host.device_dma(bdf, (BASE + n) << 12, None, 8).data == page(4)[:8]
    assert there.refs(there.mfn(there.host.domain(reply["domid"]), 4)) == (3, 2)
    there.check()
    busy = Bed()
    busy.guest(memory=8, device="0000:00:06.0")  # the second device model's device is taken there
    free, domains = busy.host.frames.nr_free, set(busy.host.domains)
    with pytest.raises(HypercallError) as info:
        load(busy, data, dm_data)
    assert info.value.errno == -16  # the guest and the first device model were built: both are gone
    assert (busy.host.frames.nr_free, set(busy.host.domains), len(busy.host.iommu.m2b)) == (free, domains, 0)
    assert not busy.host.ioreq.servers
    busy.check()
