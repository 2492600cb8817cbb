"""The vITS's tables in guest RAM across a save (KVM's ITS table ABI, revision 0), what a save
carries instead of refusing (commands the guest queued, commands and scans Xen has in flight),
and the restore's checks of tables that lie.

The tables are decoded here with the documented bit positions, not with its_tables.py, so a
layout that drifted from KVM's would fail here even if the save and the restore agreed."""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import pytest

from tests.core.its.guest import BASER, CBASER, ITT_GFN, LPI, PROP_GFN, QUEUE_GFN, its_host, settle
from tests.core.migration.test_vits_migration import (
    BDF,
    DEVICE_BASER,
    DEVICE_TABLE_GFN,
    ItsGuest,
    delivered,
    hosts,
    migrate,
)
from xenemu.abi import its_cmd as c
from xenemu.abi.its_cmd import ItsCommand
from xenemu.core.actions.dispatch import run
from xenemu.core.actions.migration import (
    ImageRead,
    ImageWrite,
    MigrateBegin,
    MigrateCommit,
    MigrateFinish,
    MigrateReceive,
    MigrateResume,
    MigrateSend,
    MigrateSuspend,
    RestoreBegin,
    RestoreDomain,
    SaveDomain,
)
from xenemu.core.audit import audit
from xenemu.core.errors import HypercallError
from xenemu.core.host import Host
from xenemu.core.migration import vits
from xenemu.core.migration.image import Image, decode, encode
from xenemu.core.migration.store import CHUNK

BDF2 = "0000:00:06.0"
ITT2_GFN = 31


def entries(host: Host, domid: int, gfn: int, count: int, offset: int = 0) -> list[int]:
    """``count`` little-endian u64 entries of the guest's RAM, as its CPU reads them."""
    return list(struct.unpack(f"<{count}Q", host.memory.access(domid, gfn, offset, None, 8 * count)))


def two_devices() -> tuple[Host, Host, ItsGuest]:
    """Two hosts, and on the first a guest with two MSI devices (vDeviceIDs 0 and 1)."""
    a, b = hosts()
    domid = a.create_domain("hvm", 64, vcpus=2).domid
    a.assign_device(domid, BDF, its_devid=0x21, its_events=8, pits=0)
    a.assign_device(domid, BDF2, its_devid=0x22, its_events=4, pits=0)
    its = a.its
    for reg, value in ((0x80, CBASER), (0x100, DEVICE_BASER), (0x108, BASER)):
        its.mmio_write(domid, 0, reg, 8, value)
    for vcpu in range(2):
        its.redist_write(domid, vcpu, 0x70, 8, PROP_GFN << 12 | 15)
        its.redist_write(domid, vcpu, 0x0, 4, 1)
    its.mmio_write(domid, 0, 0x0, 4, 1)
    return a, b, ItsGuest(a, domid)


def save_bytes(host: Host, domid: int, keep: bool = False) -> bytes:
    saved = run(host, 0, SaveDomain(domid, keep=keep))
    return b"".join(run(host, 0, ImageRead(saved["image"], at, CHUNK))["data"] for at in range(0, saved["size"], CHUNK))


def restore_bytes(host: Host, data: bytes) -> int:
    incoming = run(host, 0, RestoreBegin(len(data)))["image"]
    run(host, 0, ImageWrite(incoming, 0, data))
    return int(run(host, 0, RestoreDomain(incoming))["domid"])


def test_the_tables_in_guest_ram_are_kvms_layout() -> None:
    """After a save the device table holds a DTE per mapped device (Valid, next, ITT address
    bits 51:8, Size), each ITT an ITE per mapped event (next, pINTID = vLPI, ICID), and the
    collection table a CTE per collection one after another (Valid, RDBase = vCPU, ICID; an
    unmapped one that an ITE names with KVM's 0xFFFFFFFF), then a zero entry; META holds none
    of it."""
    a, _, g = two_devices()
    g.queue(c.mapc(0, 1), c.mapc(2, 0), c.mapd(0, 2, ITT_GFN << 12), c.mapd(1, 1, ITT2_GFN << 12 | 0x100))
    g.queue(c.mapti(0, 0, LPI + 40, 0), c.mapti(0, 1, LPI + 41, 2), c.mapti(0, 5, LPI + 45, 1))
    g.queue(c.mapti(1, 3, LPI + 60, 2), c.sync(0))
    data = save_bytes(a, g.domid, keep=True)
    dtes = entries(a, g.domid, DEVICE_TABLE_GFN, 2)
    for dte, (nxt, itt, size) in zip(dtes, ((1, ITT_GFN << 12, 2), (0, ITT2_GFN << 12 | 0x100, 1)), strict=True):
        assert dte >> 63 == 1 and (dte >> 49) & 0x3FFF == nxt
        assert ((dte >> 5) & ((1 << 44) - 1)) << 8 == itt and dte & 0x1F == size
    itt = entries(a, g.domid, ITT_GFN, 8)  # Size 2: 8 events, all of them the device's
    assert [(e >> 48, (e >> 16) & 0xFFFFFFFF, e & 0xFFFF) for e in itt] == [
        (1, LPI + 40, 0),
        (4, LPI + 41, 2),
        (0, 0, 0),
        (0, 0, 0),
        (0, 0, 0),
        (0, LPI + 45, 1),
        (0, 0, 0),
        (0, 0, 0),
    ]
    itt2 = entries(a, g.domid, ITT2_GFN, 4, 0x100)  # Size 1: 4 events
    assert itt2 == [0, 0, 0, (LPI + 60) << 16 | 2]
    ctes = entries(a, g.domid, 0, 4)
    decoded = [(e >> 63, (e >> 16) & ((1 << 36) - 1), e & 0xFFFF) for e in ctes[:3]]
    assert decoded == [(1, 1, 0), (1, 0xFFFFFFFF, 1), (1, 0, 2)] and ctes[3] == 0
    saved = decode(data).meta["its"]["vits"][0]
    assert set(saved) == {"pits", "enabled", "cbaser", "baser", "creadr", "cwriter", "lpis"}
    assert saved["lpis"] == []  # nothing pending, retargeted or fired
    assert not audit(a)


def test_a_restore_reads_the_tables_on_a_host_whose_frames_differ() -> None:
    """The restored vITS is what the tables in the restored RAM say: devices, ITT addresses,
    mappings and collections, on frames that are not the original's; and it works."""
    a, b, g = two_devices()
    g.queue(c.mapc(0, 1), c.mapd(0, 2, ITT_GFN << 12), c.mapd(1, 1, ITT2_GFN << 12))
    g.queue(c.mapti(0, 2, LPI + 50, 0), c.mapti(1, 0, LPI + 70, 1), c.sync(0))
    g.enable(LPI + 50, LPI + 70)
    old = a.its.domains[g.domid].vits[0]
    want = (
        {v: (d.size, d.itt) for v, d in old.devices.items()},
        {k: (i.vlpi, i.icid) for k, i in old.ites.items()},
        dict(old.collections),
    )
    old_mfn = a.domain(g.domid).p2m.get(DEVICE_TABLE_GFN)
    h = migrate(a, g.domid, b)
    new = b.its.domains[h.domid].vits[0]
    got = (
        {v: (d.size, d.itt) for v, d in new.devices.items()},
        {k: (i.vlpi, i.icid) for k, i in new.ites.items()},
        dict(new.collections),
    )
    assert got == want and b.domain(h.domid).p2m.get(DEVICE_TABLE_GFN) != old_mfn
    assert delivered(h.msi(2)) == [(1, LPI + 50)]  # collection 0 is on vCPU 1
    assert h.queue(c.mapc(1, 0), c.sync(0)) == []
    doorbell, first = b.its.translation_gpa(h.domid, 0) + 0x40, len(b.its.deliveries)
    assert b.device_dma(BDF2, doorbell, (0).to_bytes(4, "little")).ok
    settle(b.its)
    assert delivered(b.its.deliveries[first:]) == [(0, LPI + 70)]
    assert not audit(b)


def corrupt(data: bytes, gfn: int, offset: int, value: int) -> bytes:
    """The image with one u64 of a page of its RAM replaced (and summed again)."""
    image = decode(data)
    pages = [(ref, bytes(page)) for ref, page in image.pages]
    at = next(i for i, (ref, _) in enumerate(pages) if ref == gfn)
    page = bytearray(pages[at][1])
    page[offset : offset + 8] = struct.pack("<Q", value)
    pages[at] = (gfn, bytes(page))
    return encode(Image(image.meta, image.gfns, pages, image.entries))


DTE0 = 1 << 63 | (ITT_GFN << 12 >> 8) << 5 | 2
CTE0 = 1 << 63 | 0 << 16 | 0
ITE5 = (LPI + 100) << 16 | 1


@pytest.mark.parametrize(
    ("why", "gfn", "offset", "value"),
    [
        ("a DTE without Valid", DEVICE_TABLE_GFN, 0, DTE0 & ~(1 << 63)),
        ("a DTE whose next names no DTE", DEVICE_TABLE_GFN, 0, DTE0 | 1 << 49),
        ("a DTE Size beyond 16 EventID bits", DEVICE_TABLE_GFN, 0, DTE0 | 0x1F),
        ("an ITT that is not RAM", DEVICE_TABLE_GFN, 0, 1 << 63 | (1 << 30 >> 8) << 5 | 2),
        ("an ITE whose pINTID is below 8192", ITT_GFN, 5 * 8, 100 << 16 | 1),
        ("an ITE beyond PROPBASER's IDbits", ITT_GFN, 5 * 8, 0xFFFFFF << 16 | 1),
        ("an ITE naming a collection with no CTE", ITT_GFN, 5 * 8, (LPI + 100) << 16 | 2),
        ("an ITE whose next names no ITE", ITT_GFN, 5 * 8, 1 << 48 | ITE5),
        ("a CTE without Valid", 0, 0, 5 << 16),
        ("a CTE of a vCPU the domain has not", 0, 0, CTE0 | 7 << 16),
        ("a CTE of an ICID beyond vCPUs + 1", 0, 8, 1 << 63 | 9),
        ("an ICID twice", 0, 16, CTE0),
    ],
)
def test_lying_tables_are_refused_before_anything_is_built(why: str, gfn: int, offset: int, value: int) -> None:
    """Each lie a table can tell is ``-EBADMSG`` "corrupt save image", and the restoring host has
    not a frame or a domain more."""
    a, b = hosts()
    g = ItsGuest(a)
    g.queue(c.mapc(0, 0), c.mapc(1, 1), c.mapd(0, 2, ITT_GFN << 12), c.mapti(0, 5, LPI + 100, 1), c.sync(0))
    data = save_bytes(a, g.domid)
    restore_bytes(its_host()[0], data)  # the image as saved restores
    bad = corrupt(data, gfn, offset, value)
    free, domains = b.frames.nr_free, set(b.domains)
    with pytest.raises(HypercallError) as info:
        restore_bytes(b, bad)
    assert info.value.errno == -74 and "corrupt save image" in str(info.value), why
    assert (b.frames.nr_free, set(b.domains)) == (free, domains)
    assert not audit(b)


@pytest.mark.parametrize(
    ("why", "setup", "message"),
    [
        ("a device table beyond RAM", lambda g: g.its.mmio_write(g.domid, 0, 0x100, 8, BASER | 1 << 30), "not in"),
        ("tables that overlap", lambda g: g.its.mmio_write(g.domid, 0, 0x100, 8, BASER), "overlap"),
        ("a table that is not Valid", lambda g: g.its.mmio_write(g.domid, 0, 0x108, 8, 0), "not Valid"),
    ],
)
def test_tables_a_save_cannot_write_refuse_it_and_change_nothing(
    why: str, setup: Callable[[ItsGuest], None], message: str
) -> None:
    """KVM refuses to save an ITS whose tables it cannot write; so does a save here, ``-EINVAL``
    with the reason, before anything is written (the guest's RAM is as it was)."""
    a, _ = hosts()
    g = ItsGuest(a)
    g.queue(c.mapc(0, 0), c.mapd(0, 2, ITT_GFN << 12), c.mapti(0, 1, LPI + 33, 0), c.sync(0))
    a.its.mmio_write(g.domid, 0, 0x0, 4, 0)  # disabled: its BASERs may be written
    setup(g)
    ram = [bytes(a.memory.access(g.domid, gfn, 0, None, 4096)) for gfn in range(64)]
    with pytest.raises(HypercallError) as info:
        run(a, 0, SaveDomain(g.domid))
    assert info.value.errno == -22 and message in str(info.value), why
    assert [bytes(a.memory.access(g.domid, gfn, 0, None, 4096)) for gfn in range(64)] == ram
    assert g.domid in a.domains and not audit(a)


def put(g: ItsGuest, *commands: ItsCommand) -> None:
    """The guest writes commands and CWRITER; nothing runs them yet (no pass, no pITS time)."""
    for command in commands:
        g.host.memory.access(g.domid, QUEUE_GFN, g.offset % 4096, command.encode())
        g.offset += 32
    g.its.mmio_write(g.domid, 0, 0x88, 8, g.offset % 4096)


def test_commands_the_guest_queued_are_carried_and_run_once_after_the_restore() -> None:
    """A save no longer waits for the queue: commands between CREADR and CWRITER that Xen has
    not taken are in the image (the queue is guest RAM) and run on the restored side, once."""
    a, b = hosts()
    g = ItsGuest(a)
    g.queue(c.mapc(0, 0), c.mapc(1, 1), c.mapd(0, 2, ITT_GFN << 12), c.sync(0))
    g.enable(LPI + 40, LPI + 41)
    creadr = g.creadr()
    put(g, c.mapti(0, 4, LPI + 40, 1), c.mapti(0, 6, LPI + 41, 0), c.event_cmd(c.INT, 0, 4), c.sync(1))
    assert not a.its.domains[g.domid].vits[0].ites  # nothing of them has run
    h = migrate(a, g.domid, b)  # settles: the carried commands run
    assert h.creadr() == creadr + 4 * 32 == h.offset % 4096
    got = b.its.deliveries  # the INT's LPI was delivered once on the restored side
    assert [(d.domid, d.vcpu, d.intid) for d in got] == [(h.domid, 1, LPI + 40)]
    assert h.end(1, LPI + 40) is None
    assert delivered(h.msi(6)) == [(0, LPI + 41)]
    assert delivered(h.msi(4)) == [(1, LPI + 40)]
    assert b.its.domains[h.domid].vits[0].dropped == {}  # nothing ran twice (MAPTI_ALREADY_MAPPED)


def in_queue(a: Host) -> None:
    """The INT is in the guest's queue, not taken."""


def placed(a: Host) -> None:
    """Xen took and translated the INT and placed it on the pITS, which has not run it."""
    a.its.run_passes()


def executed(a: Host) -> None:
    """The pITS ran it: the physical LPI is pending there, not yet taken by Xen."""
    a.its.run_passes()
    for state in a.its.pits:
        state.hw.step(10**6)


@pytest.mark.parametrize("stage", [in_queue, placed, executed])
def test_an_int_just_before_the_save_is_delivered_exactly_once(stage: Callable[[Host], None]) -> None:
    """Wherever the guest's last INT stood at the save (queued, on the pITS, pending on the
    pITS), the restored guest gets its LPI once, and the original (destroyed) never."""
    a, b = hosts()
    g = ItsGuest(a)
    g.queue(c.mapc(0, 0), c.mapc(1, 1), c.mapd(0, 2, ITT_GFN << 12), c.mapti(0, 3, LPI + 77, 1), c.sync(0))
    g.enable(LPI + 77)
    g.queue(c.event_cmd(c.INV, 0, 3), c.sync(1))
    put(g, c.event_cmd(c.INT, 0, 3))
    stage(a)
    before = len(a.its.deliveries)
    h = migrate(a, g.domid, b)
    assert a.its.deliveries[before:] == []
    assert [(d.domid, d.vcpu, d.intid) for d in b.its.deliveries] == [(h.domid, 1, LPI + 77)]
    assert h.end(1, LPI + 77) is None  # once: nothing was left pending
    assert h.creadr() == h.offset % 4096
    assert delivered(h.msi(3)) == [(1, LPI + 77)]


def test_xens_commands_in_flight_are_carried() -> None:
    """A guest MAPD and MAPTI placed on the pITS but not run, and an INT after them: the save
    goes ahead (once it was -EBUSY), and the restored side has their effect once."""
    a, b = hosts()
    g = ItsGuest(a)
    g.queue(c.mapc(0, 0))
    g.enable(LPI + 90)
    put(g, c.mapd(0, 2, ITT_GFN << 12), c.mapti(0, 2, LPI + 90, 0), c.event_cmd(c.INT, 0, 2))
    a.its.run_passes()  # translated and placed, not yet executed by the pITS
    assert a.its.pits[0].hw.queued()
    h = migrate(a, g.domid, b)
    assert [(d.vcpu, d.intid) for d in b.its.deliveries] == [(0, LPI + 90)]
    assert h.end(0, LPI + 90) is None
    assert delivered(h.msi(2)) == [(0, LPI + 90)]


def many_mappings(enabled: int | None = None) -> tuple[Host, Host, ItsGuest]:
    """Two hosts whose pITSs take big batches, and on the first a guest whose device has 1,000
    events mapped in collection 0 (on vCPU 0): enough for a scan or a pending-table load to
    take several slices. ``enabled``: the one vLPI the guest enables."""
    host, _ = its_host(slots=4096, batch=64)
    target, _ = its_host(slots=4096, batch=64)
    domid = host.create_domain("hvm", 64, vcpus=2).domid
    host.assign_device(domid, BDF, its_devid=0x21, its_events=1024, pits=0)
    its = host.its
    for reg, value in ((0x80, CBASER), (0x100, DEVICE_BASER), (0x108, BASER)):
        its.mmio_write(domid, 0, reg, 8, value)
    for vcpu in range(2):
        its.redist_write(domid, vcpu, 0x70, 8, PROP_GFN << 12 | 15)
        its.redist_write(domid, vcpu, 0x0, 4, 1)
    its.mmio_write(domid, 0, 0x0, 4, 1)
    g = ItsGuest(host, domid)
    if enabled is not None:
        g.enable(enabled)
    g.queue(c.mapc(0, 0), c.mapd(0, 9, 40 << 12), c.sync(0))  # 1024 events: an 8 KiB ITT at GFN 40
    for first in range(0, 1000, 100):
        g.queue(*[c.mapti(0, e, LPI + 1000 + e, 0) for e in range(first, first + 100)])
    return host, target, g


def test_a_scan_still_running_is_finished_by_the_save() -> None:
    """A MAPC whose retarget scan spans slices (many mappings) is still running at the save: the
    save runs it to its end. Here MOVALL had sent every mapping to vCPU 1 and the MAPC routes
    collection 0 to vCPU 0 again, which the scan does mapping by mapping (clearing MOVALL's
    retarget): a save part-way would carry some mappings still on vCPU 1."""
    host, target, g = many_mappings()
    g.queue(c.movall(0, 1), c.sync(1))
    vits = host.its.domains[g.domid].vits[0]
    assert all(i.vcpu_override == 1 for i in vits.ites.values())
    put(g, c.mapc(0, 0))
    host.its.run_passes()
    assert vits.job is not None and any(i.vcpu_override == 1 for i in vits.ites.values())  # part-way
    h = migrate(host, g.domid, target)
    new = target.its.domains[h.domid].vits[0]
    assert new.collections == {0: 0} and len(new.ites) == 1000
    assert all(i.vcpu_override is None and i.pcoll == 0 for i in new.ites.values())
    assert h.creadr() == h.offset % 4096
    assert not audit(target)


def test_a_pending_table_load_still_running_is_finished_by_the_save() -> None:
    """vCPU 0 enables its LPIs again with a pending table that has its last mapping's LPI set;
    the load reads the table mapping by mapping and is part-way at the save. The save finishes
    it, so the LPI is carried pending and delivered once on the restored side."""
    vlpi = LPI + 1999
    host, target, g = many_mappings(enabled=vlpi)
    its = host.its
    its.redist_write(g.domid, 0, 0x0, 4, 0)
    its.redist_write(g.domid, 0, 0x78, 8, 50 << 12)  # the pending table at GFN 50, PTZ clear
    host.memory.access(g.domid, 50, vlpi // 8, bytes([1 << vlpi % 8]))
    its.redist_write(g.domid, 0, 0x0, 4, 1)
    assert its.domains[g.domid].loading()  # part-way
    h = migrate(host, g.domid, target)
    assert [(d.domid, d.vcpu, d.intid) for d in target.its.deliveries] == [(h.domid, 0, vlpi)]
    assert h.end(0, vlpi) is None
    assert not target.its.domains[h.domid].loading() and not audit(target)


def send(source: Host, target: Host, reply: dict[str, Any], incoming: int) -> dict[str, Any]:
    """One live-migration section from ``source``'s transfer into ``target``'s receiver."""
    data = b"".join(
        run(source, 0, ImageRead(reply["image"], at, CHUNK))["data"] for at in range(0, reply["size"], CHUNK)
    )
    image = run(target, 0, RestoreBegin(len(data)))["image"]
    run(target, 0, ImageWrite(image, 0, data))
    got: dict[str, Any] = run(target, 0, MigrateReceive(image, incoming))
    return got


def test_a_live_migration_carries_the_tables_written_at_its_stop() -> None:
    """The stop writes the vITS tables through the guest CPU's path, so the dirty log sends those
    pages in the last section and the receiver reads the tables from them over the pre-copied
    pages (which still hold whatever the guest had there). A stop while the vITS has commands in
    flight is -EBUSY (the stopped source would run them too); once they have run, it goes."""
    a, b = hosts()
    g = ItsGuest(a)
    g.queue(c.mapc(0, 0), c.mapc(1, 1), c.mapd(0, 2, ITT_GFN << 12), c.mapti(0, 5, LPI + 100, 1), c.sync(0))
    g.enable(LPI + 100)
    g.queue(c.event_cmd(c.INV, 0, 5), c.sync(1))
    mig = run(a, 0, MigrateBegin(g.domid))["migration"]
    reply = run(a, 0, MigrateSend(mig, 4096))
    incoming = send(a, b, reply, 0)["incoming"]
    assert entries(b, incoming_domid(b), DEVICE_TABLE_GFN, 1) == [0]  # not written yet: pre-copy
    put(g, c.event_cmd(c.INT, 0, 5))
    a.its.run_passes()  # on the pITS, not run
    with pytest.raises(HypercallError) as info:
        run(a, 0, MigrateSuspend(mig))
    assert info.value.errno == -16 and "in flight" in str(info.value)
    settle(a.its)  # runs, and is delivered here, before the stop
    assert delivered(a.its.deliveries[-1:]) == [(1, LPI + 100)]
    final = run(a, 0, MigrateSuspend(mig))
    got = send(a, b, final, incoming)
    run(a, 0, MigrateCommit(mig))
    run(b, 0, MigrateResume(incoming))
    run(a, 0, MigrateFinish(mig, True))
    settle(b.its)
    vits.resume_received(b)  # what the first request after the pITS ran does (dispatch)
    h = ItsGuest(b, got["domid"])
    assert {k: (i.vlpi, i.icid) for k, i in b.its.domains[h.domid].vits[0].ites.items()} == {(0, 5): (LPI + 100, 1)}
    assert h.end(1, LPI + 100) is None  # in service, delivered once, on the source
    assert delivered(h.msi(5)) == [(1, LPI + 100)]
    assert not audit(a) and not audit(b)


def incoming_domid(host: Host) -> int:
    """The domain a receiver is building (the newest one)."""
    return max(host.domains)
