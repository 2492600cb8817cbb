"""Live migration on the core: pre-copy under log-dirty (CPU writes, p2m changes, DMA dirty bits
through the domain's own context and an emulator's foreign mappings), the stop-and-copy, and the
receiver building the domain section by section. Writes made while a section is being copied,
between sections, and through an entry unmapped before the round reads its dirty bit all arrive."""

from __future__ import annotations

import random
from collections.abc import Callable, Generator
from typing import Any

import pytest

from tests.bed import Bed
from tests.core.migration.test_save_restore import BDF, behaviour, busy_guest, errno, view
from xenemu.abi import pv_iommu as ops
from xenemu.core.actions.dispatch import dispatch
from xenemu.core.actions.memory import GuestWrite
from xenemu.core.actions.migration import (
    ImageRead,
    ImageWrite,
    MigrateBegin,
    MigrateCommit,
    MigrateDrop,
    MigrateFinish,
    MigrateReceive,
    MigrateResume,
    MigrateSend,
    MigrateSuspend,
    RestoreBegin,
    migrations,
)
from xenemu.core.errors import HypercallError
from xenemu.core.iommu.preempt import PREEMPT
from xenemu.core.memory.domain import Domain
from xenemu.core.migration import live, outgoing
from xenemu.core.migration.store import CHUNK

Hook = Callable[[], None]


def copy(src: Bed, dst: Bed, image: int, size: int) -> int:
    """A transfer from ``src`` written into ``dst``, in 1 MiB chunks: ``dst``'s transfer id."""
    data = b"".join(src.act(0, ImageRead(image, at, CHUNK))["data"] for at in range(0, size, CHUNK))
    target: int = dst.act(0, RestoreBegin(len(data)))["image"]
    for at in range(0, len(data), CHUNK):
        dst.act(0, ImageWrite(target, at, data[at : at + CHUNK]))
    return target


def carry(src: Bed, dst: Bed, reply: dict[str, Any], incoming: int) -> dict[str, Any]:
    """One section from ``src``'s transfer into ``dst``'s receiver (with its device models')."""
    models = [copy(src, dst, d["image"], d["size"]) for d in reply.get("dm_images", [])]
    image = copy(src, dst, reply["image"], reply["size"])
    got: dict[str, Any] = dst.act(0, MigrateReceive(image, incoming, models or None))
    return got


def land(src: Bed, dst: Bed, mig: int, incoming: int) -> dict[str, Any]:
    """The source commits, then the receiver's copy takes its token and runs."""
    src.act(0, MigrateCommit(mig))
    got: dict[str, Any] = dst.act(0, MigrateResume(incoming))
    return got


def stepped(bed: Bed, action: Any, during: Hook | None) -> Any:
    """Run a request, calling ``during`` at each of its pauses (what other domains do meanwhile)."""
    gen: Generator[Any, None, Any] = dispatch(bed.host, 0, action)
    while True:
        try:
            effect = next(gen)
        except StopIteration as stop:
            bed.check()
            return stop.value
        assert effect == PREEMPT
        bed.check()  # the audit holds at every pause
        if during is not None:
            during()


def migrate(
    src: Bed, dst: Bed, domid: int, between: Hook | None = None, during: Hook | None = None, section: int = 64
) -> tuple[Domain, dict[str, Any]]:
    """Pre-copy until a round finds at most 8 dirty pages (or 12 rounds), then stop and copy."""
    mig = src.act(0, MigrateBegin(domid))["migration"]
    incoming, stats = 0, {"sections": 0}
    while True:
        reply = stepped(src, MigrateSend(mig, section), during)
        incoming = carry(src, dst, reply, incoming)["incoming"]
        stats["sections"] += 1
        if between is not None:
            between()
        if reply["left"] == 0 and (reply["dirtied"] <= 8 or reply["round"] >= 12) and reply["round"] > 1:
            break
    final = src.act(0, MigrateSuspend(mig))
    got = carry(src, dst, final, incoming)
    got |= land(src, dst, mig, incoming)
    src.act(0, MigrateFinish(mig, True))
    stats |= {"rounds": final["round"], "sent": final["sent"], "final": final["pages"]}
    return dst.host.domain(got["domid"]), stats


def contents(bed: Bed, dom: Domain) -> dict[int, bytes]:
    frames = bed.host.frames
    return {gfn: bytes(frames.data.get(mfn, bytes(4096))) for gfn, mfn in dom.p2m.items()}


def test_memory_written_during_precopy_arrives_and_the_domain_behaves_as_before(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(outgoing, "COPY_SLICE", 8)  # sections pause every 8 pages: writes land mid-copy
    here, there = Bed(), Bed()
    there.guest(memory=300, device="00:09.0")  # the receiver's frames are laid out otherwise
    dom = busy_guest(here)
    rng = random.Random(5)
    writes: list[int] = []
    calls: list[int] = []

    def guest_and_device_write() -> None:  # the guest's CPU and its device, between and during sections
        calls.append(1)
        gfn = rng.randrange(0, 80)
        if gfn in dom.p2m:
            here.act(dom.domid, GuestWrite(gfn, rng.randrange(4000), rng.randbytes(16)))
            writes.append(gfn)
        assert here.host.device_dma(BDF, 0x1000 << 12 | rng.randrange(4000), rng.randbytes(8)).ok  # GFN 5 via map
        assert here.host.device_dma(BDF, 40 << 12, rng.randbytes(8)).ok  # a default entry, 1:1

    token, old = dom.token, dom.domid
    rounds = 0

    def between() -> None:
        nonlocal rounds
        rounds += 1
        if rounds < 6:
            guest_and_device_write()

    expect: dict[int, bytes] = {}
    original_suspend = live.suspend

    def suspend_and_look(host: Any, migs: Any, ident: int) -> Any:
        result = yield from original_suspend(host, migs, ident)
        expect.update(contents(here, dom))  # the memory at the stop: what must arrive
        expect_view.update(view(here, dom))
        return result

    expect_view: dict[int, Any] = {}
    monkeypatch.setattr(live, "suspend", suspend_and_look)
    new, stats = migrate(here, there, dom.domid, between, guest_and_device_write)
    assert len(calls) > 8  # most of them while a section was being copied
    assert old not in here.host.domains and BDF not in here.host.devices
    assert new.token == token and new.name == dom.name and new.max_pages == 100
    assert contents(there, new) == expect and view(there, new) == expect_view
    assert stats["rounds"] >= 3 and writes
    assert there.host.device_dma(BDF, 0x1000 << 12, None, 4096).data == expect[5]
    assert not there.host.suspended and new.busy_ops == 0
    here.check()
    there.check()


def test_the_migrated_copy_answers_as_the_original() -> None:
    """A migration with the source kept (abandoned after the copy): the copy answers every call
    as the original does (DMA, a batch's statuses, the context after it, a populate)."""
    here, there = Bed(), Bed()
    there.guest(memory=200, device="00:09.0")
    dom = busy_guest(here)
    mig = here.act(0, MigrateBegin(dom.domid))["migration"]
    incoming = 0
    while True:
        reply = here.act(0, MigrateSend(mig, 32))
        incoming = carry(here, there, reply, incoming)["incoming"]
        if reply["left"] == 0:
            break
    final = here.act(0, MigrateSuspend(mig))
    copy = there.host.domain(carry(here, there, final, incoming)["domid"])
    there.act(0, MigrateResume(incoming))  # (not committed: the original runs on too, on purpose)
    here.act(0, MigrateFinish(mig, False))  # abandoned: the original runs on
    assert dom.domid in here.host.domains and not here.host.suspended and dom.p2m.log is None
    copy.token = "0" * 32  # two domains may not share a token: irrelevant to behaviour
    assert behaviour(here, dom) == behaviour(there, copy)
    here.check()
    there.check()


def test_dma_through_an_entry_unmapped_before_the_round_is_not_lost() -> None:
    here, there = Bed(), Bed()
    dom = here.guest(memory=64)
    assert ops.statuses(here.call(dom.domid, [ops.map_page(0x2000, 9)])) == ["OK"]
    mig = here.act(0, MigrateBegin(dom.domid))["migration"]
    first = here.act(0, MigrateSend(mig, 64))  # round 1: every page, GFN 9 as zero
    incoming = carry(here, there, first, 0)["incoming"]
    assert here.host.device_dma(BDF, 0x2000 << 12, b"dma after its copy").ok
    assert ops.statuses(here.call(dom.domid, [ops.unmap_page(0x2000)])) == ["OK"]  # the entry goes first
    final = here.act(0, MigrateSuspend(mig))
    assert final["pages"] == 1  # GFN 9, from the dirty bit the unmap did not lose
    new = there.host.domain(carry(here, there, final, incoming)["domid"])
    land(here, there, mig, incoming)
    here.act(0, MigrateFinish(mig, True))
    assert there.host.memory.access(new.domid, 9, 0, None, 18) == b"dma after its copy"
    there.check()


def test_an_emulators_dma_into_the_guest_is_tracked_and_it_is_told_at_the_end() -> None:
    here, there = Bed(), Bed()
    guest = here.guest(memory=64, device=None)
    dm, server = here.emulator(guest)
    got = here.call(dm.domid, [ops.map_foreign_page(0x500, 12, guest.domid, server)])
    assert ops.statuses(got) == ["OK"]
    mig = here.act(0, MigrateBegin(guest.domid))["migration"]
    incoming = carry(here, there, here.act(0, MigrateSend(mig, 64)), 0)["incoming"]
    assert here.host.device_dma("00:05.0", 0x500 << 12, b"written by the emulator").ok
    final = here.act(0, MigrateSuspend(mig))
    assert errno(here.host.device_dma, "00:05.0", 0x500 << 12, b"late") == -16  # stopped: it waits
    new = there.host.domain(carry(here, there, final, incoming)["domid"])
    land(here, there, mig, incoming)
    here.act(0, MigrateFinish(mig, True))
    assert there.host.memory.access(new.domid, 12, 0, None, 23) == b"written by the emulator"
    invalidates = here.host.ioreq.get(server)
    assert invalidates is not None and invalidates.target is None  # its guest is gone from here
    here.check()
    there.check()


def test_ballooning_during_precopy_leaves_the_same_p2m() -> None:
    here, there = Bed(), Bed()
    dom = here.guest(memory=64, device=None)
    here.host.set_max_pages(dom.domid, 80)
    mig = here.act(0, MigrateBegin(dom.domid))["migration"]
    incoming = carry(here, there, here.act(0, MigrateSend(mig, 16)), 0)["incoming"]
    gen = here.host.balloon.decrease_reservation(dom.domid, [3, 40])
    with pytest.raises(StopIteration):
        next(gen)
    assert here.host.balloon.populate_physmap(dom.domid, [70, 71])["ret"] == 2
    here.host.memory.access(dom.domid, 70, 0, b"new page")
    while True:
        reply = here.act(0, MigrateSend(mig, 16))
        incoming = carry(here, there, reply, incoming)["incoming"]
        if reply["left"] == 0 and reply["round"] > 1:
            break
    final = here.act(0, MigrateSuspend(mig))
    new = there.host.domain(carry(here, there, final, incoming)["domid"])
    assert sorted(new.p2m.keys()) == sorted(dom.p2m.keys()) and new.pages == dom.pages == 64
    assert there.host.memory.access(new.domid, 70, 0, None, 8) == b"new page"
    land(here, there, mig, incoming)
    here.act(0, MigrateFinish(mig, True))
    there.check()


def test_a_stopped_domain_runs_nothing_and_nothing_changes_it(bed: Bed) -> None:
    host = bed.host
    dom = bed.guest(memory=32)
    mig = bed.act(0, MigrateBegin(dom.domid))["migration"]
    bed.act(0, MigrateSend(mig, 32))
    bed.act(0, MigrateSuspend(mig))
    assert errno(bed.act, dom.domid, GuestWrite(1, 0, b"x")) == -16  # its own calls
    assert errno(host.device_dma, BDF, 1 << 12, b"x") == -16  # its devices' writes
    assert host.device_dma(BDF, 1 << 12, None, 4).ok  # reads change nothing
    assert errno(bed.act, 0, MigrateSend(mig, 8)) == -16
    from xenemu.core.actions.control import DestroyDomain, SetMaxPages

    assert errno(bed.act, 0, SetMaxPages(dom.domid, 64)) == -16  # a request naming it
    bed.act(0, DestroyDomain(dom.domid))  # the toolstack may still destroy it
    assert errno(bed.act, 0, MigrateFinish(mig, True)) == -3
    assert not host.suspended and not host.iommu.dirty_owners
    bed.check()


def test_abandoning_before_the_stop_leaves_the_domain_as_it_was(bed: Bed) -> None:
    dom = bed.guest(memory=32)
    mig = bed.act(0, MigrateBegin(dom.domid))["migration"]
    bed.act(0, MigrateSend(mig, 8))
    assert errno(bed.act, 0, MigrateFinish(mig, True)) == -22  # no last section yet
    bed.act(0, MigrateFinish(mig, False))
    assert dom.p2m.log is None and not bed.host.iommu.dirty_owners and not migrations(bed.host).outgoing
    assert errno(bed.act, 0, MigrateSend(mig, 8)) == -2
    bed.act(dom.domid, GuestWrite(1, 0, b"runs on"))
    bed.check()


def test_a_bad_or_lying_section_leaves_nothing_on_the_receiver() -> None:
    here, there = Bed(), Bed()
    dom = here.guest(memory=32, device=None)
    free = there.host.frames.nr_free
    mig = here.act(0, MigrateBegin(dom.domid))["migration"]
    reply = here.act(0, MigrateSend(mig, 16))
    data = bytearray(here.act(0, ImageRead(reply["image"], 0, CHUNK))["data"])
    for bad, want in ((data[:-1], -74), (data[:40] + b"\1" + data[41:], -74), (b"junk" * 20, -22)):
        image = there.act(0, RestoreBegin(len(bad)))["image"]
        there.act(0, ImageWrite(image, 0, bytes(bad)))
        assert errno(there.act, 0, MigrateReceive(image, 0)) == want
    incoming = there.act(0, RestoreBegin(len(data)))["image"]
    there.act(0, ImageWrite(incoming, 0, bytes(data)))
    got = there.act(0, MigrateReceive(incoming, 0))
    assert there.host.frames.nr_free == free - 16 and got["domid"] in there.host.suspended
    assert errno(there.act, got["domid"], GuestWrite(1, 0, b"x")) == -16  # nothing runs in it yet
    there.act(0, MigrateDrop(got["incoming"]))
    assert there.host.frames.nr_free == free and got["domid"] not in there.host.domains
    there.check()


def test_the_log_is_bounded_when_a_guest_churns_gfns(bed: Bed) -> None:
    """Populating and giving back ever new GFNs cannot grow the log past the domain's pages and
    a slack: the next round sends every page instead."""
    host = bed.host
    dom = bed.guest(memory=8, device=None)
    host.set_max_pages(dom.domid, 9)
    mig = bed.act(0, MigrateBegin(dom.domid))["migration"]
    bed.act(0, MigrateSend(mig, 8))
    for gfn in range(1000, 1000 + live.LOG_SLACK + 100):
        assert host.balloon.populate_physmap(dom.domid, [gfn])["ret"] == 1
        gen = host.balloon.decrease_reservation(dom.domid, [gfn])
        with pytest.raises(StopIteration):
            next(gen)
    assert dom.p2m.log is not None and len(dom.p2m.log) <= dom.pages + live.LOG_SLACK + 1
    reply = bed.act(0, MigrateSend(mig, 8))
    assert dom.p2m.log == set() and not dom.p2m.log_overflowed
    assert reply["round"] == 2 and 8 <= reply["dirtied"] <= 8 + 200  # every page, and the GFNs since
    bed.act(0, MigrateFinish(mig, False))


def test_a_second_begin_supersedes_a_migration_left_stopped(bed: Bed) -> None:
    """A toolstack killed after the stop leaves its domain stopped: the next ``xenemu migrate``
    of it abandons that migration (the domain runs again) and starts afresh."""
    dom = bed.guest(memory=16, device=None)
    old = bed.act(0, MigrateBegin(dom.domid))["migration"]
    bed.act(0, MigrateSend(old, 16))
    bed.act(0, MigrateSuspend(old))
    assert errno(bed.act, dom.domid, GuestWrite(1, 0, b"x")) == -16
    new = bed.act(0, MigrateBegin(dom.domid))["migration"]
    assert new != old and errno(bed.act, 0, MigrateSend(old, 8)) == -2
    assert not bed.host.suspended and bed.host.iommu.dirty_owners == {dom.domid}
    bed.act(dom.domid, GuestWrite(1, 0, b"runs again"))
    bed.act(0, MigrateFinish(new, False))
    bed.check()


def test_a_migration_to_the_same_host_works_as_xl_migrate_to_localhost(bed: Bed) -> None:
    """Source and receiver are one host: the copy takes the token when it completes (the
    stopped source lets go of it) and the source goes at the finish. A domain with devices
    cannot: a device is assigned to one domain (``-EBUSY``, and it runs on)."""
    dom = bed.guest(memory=40, device=None)
    bed.host.memory.access(dom.domid, 7, 0, b"here")
    token = dom.token
    new, _ = migrate(bed, bed, dom.domid)
    assert new.domid != dom.domid and dom.domid not in bed.host.domains
    assert new.token == token and bed.host.memory.access(new.domid, 7, 0, None, 4) == b"here"
    assert [d for d in bed.host.domains.values() if d.token == token] == [new]
    with_device = busy_guest(bed)
    with pytest.raises(HypercallError) as info:
        migrate(bed, bed, with_device.domid)
    assert info.value.errno == -16 and "already assigned" in info.value.message
    assert with_device.domid in bed.host.domains and len(bed.host.domains) == 3
    bed.check()


def test_a_guest_migrates_live_with_its_device_model() -> None:
    """``--with-dm``: the emulator's domain is stopped with its guest and copied whole at the
    stop; on the receiver it serves the new guest (new server ids), its mappings reach the
    guest's memory as the pre-copy left it plus the last pages, and both keep their tokens.
    DMA the emulator made during pre-copy arrives (its dirty bits)."""
    from tests.core.migration.test_dm_migration import BASE, DM_BDF, guest_with_emulator, page

    here, there = Bed(), Bed()
    there.guest(memory=300, device="00:09.0")
    setup = guest_with_emulator(here)
    tokens = (setup.guest.token, setup.dm.token)
    mig = here.act(0, MigrateBegin(setup.guest.domid, with_dm=True))["migration"]
    incoming = carry(here, there, here.act(0, MigrateSend(mig, 8192)), 0)["incoming"]
    assert here.host.device_dma(DM_BDF, (BASE + 5) << 12, b"emulated dma").ok  # after its page was sent
    final = here.act(0, MigrateSuspend(mig))
    assert [d["domid"] for d in final["dm_images"]] == [setup.dm.domid]
    assert errno(here.host.device_dma, DM_BDF, (BASE + 6) << 12, b"late") == -16  # its device model is stopped
    got = carry(here, there, final, incoming)
    assert got["paused"] and got["domid"] in there.host.suspended  # until the source lets go
    land(here, there, mig, incoming)
    here.act(0, MigrateFinish(mig, True))
    assert setup.guest.domid not in here.host.domains and setup.dm.domid not in here.host.domains
    assert not here.host.ioreq.servers
    host = there.host
    guest = host.domain(got["domid"])
    (model,) = got["device_models"]
    emulator = host.domain(model["domid"])
    assert (guest.token, emulator.token) == tokens and emulator.target == guest.domid
    for old, new in model["servers"]:
        assert old in setup.servers and (host.ioreq.servers[new].creator, host.ioreq.servers[new].target) == (
            emulator.domid,
            guest.domid,
        )
    assert host.memory.access(guest.domid, 5, 0, None, 12) == b"emulated dma"
    assert host.device_dma(DM_BDF, (BASE + 4) << 12, None, 4096).data == page(4)
    here.check()
    there.check()


def test_with_dm_needs_a_device_model(bed: Bed) -> None:
    dom = bed.guest(memory=8, device=None)
    assert errno(bed.act, 0, MigrateBegin(dom.domid, with_dm=True)) == -22
    assert not migrations(bed.host).outgoing and dom.p2m.log is None
