"""Save and restore on the core: a restored domain behaves as before under a new domid and token;
a bad image or a host too small is refused with nothing created; a restore pauses and can be cut."""

from __future__ import annotations

import hashlib
import struct

import pytest

from tests.bed import Bed
from xenemu.abi import pv_iommu as ops
from xenemu.abi.grant_table import MapGrant, pack_map, unpack_map
from xenemu.core.actions.migration import ImageRead, ImageWrite, RestoreBegin, RestoreDomain, SaveDomain
from xenemu.core.errors import HypercallError
from xenemu.core.iommu.entries import entry_kind, entry_perms
from xenemu.core.iommu.preempt import PREEMPT
from xenemu.core.memory.domain import Domain
from xenemu.core.migration.image import HEADER, decode, encode
from xenemu.core.migration.restore import restore
from xenemu.core.migration.save import snapshot
from xenemu.core.migration.store import CHUNK

BDF = "0000:00:03.0"


def save(bed: Bed, domid: int, keep: bool = False) -> bytes:
    reply = bed.act(0, SaveDomain(domid, keep))
    data = b"".join(bed.act(0, ImageRead(reply["image"], at, CHUNK))["data"] for at in range(0, reply["size"], CHUNK))
    assert len(data) == reply["size"] and hashlib.sha256(data[:-32]).hexdigest() == reply["digest"]
    return data


def load(bed: Bed, data: bytes) -> dict[str, int]:
    image = bed.act(0, RestoreBegin(len(data)))["image"]
    for at in range(0, len(data), CHUNK):
        bed.act(0, ImageWrite(image, at, data[at : at + CHUNK]))
    reply: dict[str, int] = bed.act(0, RestoreDomain(image))
    return reply


def errno(fn: object, *args: object) -> int:
    with pytest.raises(HypercallError) as info:
        fn(*args)  # type: ignore[operator]
    return info.value.errno


def view(bed: Bed, dom: Domain) -> dict[int, tuple[int | None, str, int]]:
    """A context by BFN as GFN (or identity), kind and permissions: what survives a restore."""
    by_mfn = {m: g for g, m in dom.p2m.items()}
    return {
        bfn: (by_mfn.get(e >> 8), entry_kind(e).name, entry_perms(e)) for bfn, e in bed.host.iommu.context_entries(dom)
    }


def busy_guest(bed: Bed) -> Domain:
    """A guest with contents, maps of each kind, an unmapped default, a held frame, grants, an RMRR."""
    dom = bed.guest(memory=80, rmrr=[(3, 2)])
    host = bed.host
    host.memory.access(dom.domid, 5, 100, b"hello")
    host.memory.access(dom.domid, 9, 0, b"\x01" * 4096)
    got = bed.call(
        dom.domid,
        [
            ops.map_page(0x1000, 5),
            ops.map_page(0x1001, 6, perms=1),
            ops.map_page(0x3000, 9),
            ops.unmap_page(7),
            ops.map_page(0x1002, 70),
            ops.map_page((1 << 64) - 1, 11),  # the last BFN: its leaf index needs 55 bits
        ],
    )
    assert ops.statuses(got) == ["OK"] * 6
    res = host.balloon.populate_physmap(dom.domid, [])
    assert res["ret"] == 0
    gen = host.balloon.decrease_reservation(dom.domid, [70, 71])  # 70 stays held by its map_page
    with pytest.raises(StopIteration):
        next(gen)
    host.memory.access(dom.domid, 0, 0, b"x")
    host.grants.grant_access(dom.domid, 3, 0, 12, True)
    host.grants.grant_access(dom.domid, 4, 7, 13, False)
    host.set_max_pages(dom.domid, 100)
    bed.check()
    return dom


def test_a_restored_domain_behaves_as_before(bed: Bed) -> None:
    host = bed.host
    dom = busy_guest(bed)
    before = view(bed, dom)
    flushes = dict(host.iommu.contexts[dom.domid].flushes)
    old_id, old_token, pages = dom.domid, dom.token, dom.pages
    data = save(bed, dom.domid)
    assert old_id not in host.domains and BDF not in host.devices
    reply = load(bed, data)
    new = host.domain(reply["domid"])
    assert new.domid != old_id and new.token != old_token and reply["token"] == new.token
    assert (new.pages, new.max_pages, sorted(new.devices)) == (pages, 100, [BDF])
    assert view(bed, new) == before
    assert host.iommu.contexts[new.domid].flushes == flushes
    assert host.memory.access(new.domid, 5, 100, None, 5) == b"hello"
    assert host.device_dma(BDF, 0x1000 << 12, None, 4096).data[100:105] == b"hello"
    assert host.iommu.mappings_held[new.domid] == 5  # 0x1000, 0x1001, 0x3000, 0x1002, 2^64-1
    held = host.iommu.contexts[new.domid].table.get(0x1002) >> 8
    assert not host.frames.populated[held] and bed.refs(held) == (1, 1)
    table = host.grants.tables[new.domid]
    assert (table.entries[3].domid, table.entries[3].frame, table.entries[3].flags) == (0, 12, 1 | 4)
    got = bed.call(new.domid, [ops.unmap_page(0x1002)])
    assert ops.statuses(got) == ["OK"] and host.frames.is_free(held)  # the held frame goes with its last map
    bed.check()


BATCH = [
    ops.map_page(0x1000, 5),
    ops.map_page(7, 7),
    ops.unmap_page(0x1002),
    ops.map_page(0x1003, 70),
    ops.map_page(0x1004, 71),
    ops.unmap_page(3),
    ops.map_page(0x1005, 99),
    ops.query_caps(),
]
DMA = [(0x1000, None), (0x1001, b"w"), (0x1002, None), (0x3000, b"z"), (7, None), (3, None), (5, b"q"), (90, None)]


def behaviour(bed: Bed, dom: Domain) -> tuple[object, ...]:
    """What a guest and its device see: DMA results, a batch's statuses, the context after it,
    and a populate's result."""
    results = [bed.host.device_dma(BDF, b << 12, data, 0 if data else 8) for b, data in DMA]
    statuses = ops.statuses(bed.call(dom.domid, BATCH))
    return results, statuses, view(bed, dom), bed.host.balloon.populate_physmap(dom.domid, [200, 201])


def test_the_copy_on_another_host_answers_every_call_as_the_original() -> None:
    """Save with keep on one host, restore on another whose frames are laid out differently:
    the same DMA and the same batch give the same results and statuses, and the same context."""
    here, there = Bed(), Bed()
    there.guest(memory=300, device="00:09.0")  # the copy's machine frames differ from the original's
    dom = busy_guest(here)
    copy = there.host.domain(load(there, save(here, dom.domid, keep=True))["domid"])
    assert behaviour(here, dom) == behaviour(there, copy)
    assert here.host.device_dma(BDF, 0x3000 << 12, None, 1).data == b"z"
    assert {e >> 8 for _, e in here.host.iommu.context_entries(dom)} != {
        e >> 8 for _, e in there.host.iommu.context_entries(copy)
    }
    here.check()
    there.check()


def test_save_keep_leaves_the_domain_running_and_a_second_copy_restores(bed: Bed) -> None:
    dom = bed.guest(memory=16, device=None)
    bed.host.memory.access(dom.domid, 1, 0, b"abc")
    data = save(bed, dom.domid, keep=True)
    assert dom.domid in bed.host.domains
    new = bed.host.domain(load(bed, data)["domid"])
    assert bed.host.memory.access(new.domid, 1, 0, None, 3) == b"abc"
    assert new.domid not in bed.host.iommu.contexts


def test_refusals_change_nothing(bed: Bed) -> None:
    host = bed.host
    pv = bed.guest("pv", 8, None)
    guest = bed.guest(device="00:04.0")
    dm = bed.guest("hvm", 8, None, target=guest.domid)
    assert errno(snapshot, host, 0) == -1
    assert errno(snapshot, host, pv.domid) == -95
    assert errno(snapshot, host, dm.domid) == -95
    assert errno(snapshot, host, 999) == -3
    server = host.emulators.create_server(0, guest.domid)
    other = bed.guest(device=None)
    host.grants.grant_access(other.domid, 1, guest.domid, 2)
    buf = bytearray(pack_map([MapGrant(other.domid, 1, 1, 0, 0)]))
    host.grants.map_grant_refs(guest.domid, buf, 1)
    assert unpack_map(bytes(buf))[0].status == 0
    assert errno(snapshot, host, guest.domid) == -16  # it holds a grant mapping
    assert errno(snapshot, host, other.domid) == -16  # its grant is mapped
    assert errno(bed.act, 0, SaveDomain(other.domid)) == -16 and other.domid in host.domains
    host.emulators.destroy_server(0, server.id)
    bed.check()


def corrupt_variants(data: bytes) -> list[tuple[bytes, int, str]]:
    flipped = bytearray(data)
    flipped[HEADER.size + 40] ^= 1
    version = bytearray(data)
    struct.pack_into("<I", version, 8, 2)
    return [
        (data[:-1], -74, "truncated"),
        (data + b"\0", -74, "trailing"),
        (bytes(flipped), -74, "checksum"),
        (bytes(version), -93, "version 2"),
        (b"NOTSAVED" + data[8:], -22, "bad magic"),
        (data[:10], -22, "bad magic"),
    ]


def test_a_bad_image_is_refused_with_nothing_created(bed: Bed) -> None:
    host = bed.host
    dom = bed.guest(memory=32)
    data = save(bed, dom.domid)
    free, domains = host.frames.nr_free, set(host.domains)
    for bad, want, words in corrupt_variants(data):
        with pytest.raises(HypercallError) as info:
            load(bed, bad)
        assert info.value.errno == want and words in str(info.value), (words, info.value)
        assert (host.frames.nr_free, set(host.domains)) == (free, domains)
    # A well-formed, correctly summed image that lies about its contents is refused too.
    image = decode(data)
    image.entries.append((0x5000, 999, 2, 3))
    image.meta["iommu"]["leaves"].append(0x5000 >> 9)
    with pytest.raises(HypercallError) as info:
        load(bed, encode(image))
    assert info.value.errno == -74 and "names no frame" in str(info.value)
    image = decode(data)
    image.meta["domain"]["pages"] += 1
    assert errno(load, bed, encode(image)) == -74
    assert (host.frames.nr_free, set(host.domains)) == (free, domains)
    assert load(bed, data)["pages"] == 32


def test_a_host_too_small_or_a_busy_device_refuses_before_allocating() -> None:
    big, small = Bed(nr_frames=1 << 13), Bed(nr_frames=1024)
    dom = big.guest(memory=1000)
    data = save(big, dom.domid, keep=True)
    free = small.host.frames.nr_free
    with pytest.raises(HypercallError) as info:
        load(small, data)
    assert info.value.errno == -12 and "host too small" in str(info.value)
    assert small.host.frames.nr_free == free and set(small.host.domains) == {0}
    assert errno(load, big, data) == -16  # its device is still assigned to the original
    big.check()


def test_a_restore_pauses_between_slices_and_a_cut_leaves_nothing() -> None:
    bed = Bed(nr_frames=1 << 14)
    host = bed.host
    dom = bed.guest(memory=5000)
    image = decode(save(bed, dom.domid))
    free, domains = host.frames.nr_free, set(host.domains)
    steps = restore(host, image)
    assert next(steps) == PREEMPT
    building = next(iter(set(host.domains) - domains))
    assert host.domains[building].busy_ops == 1
    bed.check()  # a domain under construction is consistent at every pause
    steps.close()
    assert (host.frames.nr_free, set(host.domains)) == (free, domains)
    bed.check()
    steps = restore(host, image)
    pauses = 0
    try:
        while True:
            assert next(steps) == PREEMPT
            pauses += 1
    except StopIteration as stop:
        assert stop.value.pages == 5000 and not stop.value.busy_ops
    assert pauses == 2
    bed.check()


def test_transfers_are_bounded_checked_and_the_oldest_evicted(bed: Bed) -> None:
    assert errno(bed.act, 0, RestoreBegin(0)) == -22
    assert errno(bed.act, 0, RestoreBegin(1 << 40)) == -7
    image = bed.act(0, RestoreBegin(100))["image"]
    assert errno(bed.act, 0, ImageWrite(image, 5, b"x")) == -22  # not where the last chunk ended
    assert errno(bed.act, 0, ImageWrite(image, 0, bytes(101))) == -22  # beyond the declared size
    assert errno(bed.act, 0, ImageRead(image, 0, 10)) == -2  # an incoming image is not read out
    assert bed.act(0, ImageWrite(image, 0, bytes(60)))["received"] == 60
    assert errno(bed.act, 0, RestoreDomain(image)) == -22  # 60 zero bytes: no magic; consumed
    assert errno(bed.act, 0, RestoreDomain(image)) == -2
    opened = [bed.act(0, RestoreBegin(10))["image"] for _ in range(9)]
    assert errno(bed.act, 0, ImageWrite(opened[0], 0, b"x")) == -2  # the ninth evicted the oldest
    assert bed.act(0, ImageWrite(opened[1], 0, b"x"))["received"] == 1
    dom = bed.guest(memory=8, device=None)
    saved = bed.act(0, SaveDomain(dom.domid, keep=True))
    assert errno(bed.act, 0, ImageRead(saved["image"], 0, CHUNK + 1)) == -22
    assert errno(bed.act, 0, ImageRead(saved["image"], saved["size"] + 1, 1)) == -22


def test_emulators_mapping_a_saved_guest_are_told_before_it_goes(bed: Bed) -> None:
    """xl save drops the domain: every foreign mapping of its frames gets IOREQ_TYPE_INVALIDATE;
    the emulator unmaps, and serves the restored domain afresh under its new domid."""
    from xenemu.abi.ioreq import read_ring

    host = bed.host
    guest = bed.guest(memory=16)
    host.assign_device(0, "00:06.0")  # the emulator runs in dom0, with a device of its own
    server = host.emulators.create_server(0, guest.domid)
    got = bed.call(0, [ops.map_foreign_page(0x4000 + g, g, guest.domid, server.id) for g in (2, 3)])
    assert ops.statuses(got) == ["OK", "OK"]
    data = save(bed, guest.domid)
    entries, _ = read_ring(bytes(server.page))
    assert [e.data for e in entries] == [0x4000 + 2, 0x4000 + 3] and server.target is None
    got = bed.call(0, [ops.unmap_foreign_page(0x4000 + g, server.id) for g in (2, 3)])
    assert ops.statuses(got) == ["OK", "OK"]
    copy = host.domain(load(bed, data)["domid"])
    again = host.emulators.create_server(0, copy.domid)
    got = bed.call(0, [ops.map_foreign_page(0x4000 + g, g, copy.domid, again.id) for g in (2, 3)])
    assert ops.statuses(got) == ["OK", "OK"]
    bed.check()
