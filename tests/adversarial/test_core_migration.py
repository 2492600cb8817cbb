"""A hostile guest, emulator or stream against live migration (PROTOCOL.md 14.1): what a migration
holds is bounded, every step of it pauses, a stopped domain cannot be changed by anyone, and a
lying section leaves nothing on the receiver."""

from __future__ import annotations

import json
from array import array
from collections.abc import Generator
from typing import Any

import pytest

from tests.bed import Bed
from xenemu.abi import pv_iommu as ops
from xenemu.core.actions.control import SetMaxPages
from xenemu.core.actions.dispatch import dispatch
from xenemu.core.actions.memory import GuestWrite
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
    migrations,
)
from xenemu.core.errors import HypercallError
from xenemu.core.iommu.preempt import PREEMPT, drain
from xenemu.core.migration import live
from xenemu.core.migration.store import CHUNK

BDF = "0000:00:03.0"


def errno(fn: Any, *args: Any) -> int:
    with pytest.raises(HypercallError) as info:
        fn(*args)
    return info.value.errno


def steps(bed: Bed, action: Any) -> tuple[Any, int]:
    """Run a request to its end; its result and how many pauses it made."""
    gen: Generator[Any, None, Any] = dispatch(bed.host, 0, action)
    pauses = 0
    while True:
        try:
            assert next(gen) == PREEMPT
        except StopIteration as stop:
            return stop.value, pauses
        pauses += 1


def read(bed: Bed, reply: dict[str, Any]) -> bytes:
    return b"".join(bed.act(0, ImageRead(reply["image"], at, CHUNK))["data"] for at in range(0, reply["size"], CHUNK))


def write(bed: Bed, data: bytes) -> int:
    image: int = bed.act(0, RestoreBegin(len(data)))["image"]
    for at in range(0, len(data), CHUNK):
        bed.act(0, ImageWrite(image, at, data[at : at + CHUNK]))
    return image


def test_a_guest_churning_gfns_cannot_grow_the_log(bed: Bed) -> None:
    """Populating and giving back ever new GFNs during a migration: the log stays within the
    domain's pages and a slack (without the bound, one entry per GFN it ever touched)."""
    host = bed.host
    dom = bed.guest(memory=4, device=None)
    host.set_max_pages(dom.domid, 5)
    bed.act(0, MigrateBegin(dom.domid))
    for gfn in range(10_000, 10_000 + 3 * live.LOG_SLACK):
        assert host.balloon.populate_physmap(dom.domid, [gfn])["ret"] == 1
        with pytest.raises(StopIteration):
            next(host.balloon.decrease_reservation(dom.domid, [gfn]))
        assert dom.p2m.log is not None and len(dom.p2m.log) <= 5 + live.LOG_SLACK
    assert dom.p2m.log_overflowed


def test_every_step_of_a_migration_pauses() -> None:
    """A large section, a stop with many dirty pages and the receiver's last step each pause
    every slice of pages: no step copies a guest's memory whole."""
    here, there = Bed(nr_frames=1 << 16), Bed(nr_frames=1 << 16)
    dom = here.guest(memory=16384, device=None)
    for gfn in range(0, 16384, 2):
        here.host.memory.access(dom.domid, gfn, 0, b"x")
    mig = here.act(0, MigrateBegin(dom.domid))["migration"]
    incoming = 0
    while True:
        reply, pauses = steps(here, MigrateSend(mig, live.SECTION_PAGES))
        assert pauses >= reply["pages"] // live.COPY_SLICE - 1
        got, _ = steps(there, MigrateReceive(write(there, read(here, reply)), incoming))
        incoming = got["incoming"]
        if not reply["left"]:
            break
    for gfn in range(16384):  # every page dirty at the stop
        here.host.memory.access(dom.domid, gfn, 8, b"y")
    final, pauses = steps(here, MigrateSuspend(mig))
    assert final["pages"] == 16384 and pauses >= 16384 // live.COPY_SLICE - 1
    got, pauses = steps(there, MigrateReceive(write(there, read(here, final)), incoming))
    assert pauses >= 16384 // live.COPY_SLICE - 1
    assert there.host.memory.access(got["domid"], 5, 0, None, 9) == b"\0" * 8 + b"y"
    here.act(0, MigrateCommit(mig))
    there.act(0, MigrateResume(incoming))
    here.act(0, MigrateFinish(mig, True))
    here.check()
    there.check()


def test_nobody_changes_a_stopped_domain(bed: Bed) -> None:
    """Stopped for its last section: its calls, its device's and an emulator's DMA writes to it
    and the toolstack changing it are all -EBUSY, and its memory stays as it was taken."""
    host = bed.host
    guest = bed.guest(memory=32)
    dm, server = bed.emulator(guest)
    assert ops.statuses(bed.call(dm.domid, [ops.map_foreign_page(0x900, 4, guest.domid, server)])) == ["OK"]
    mig = bed.act(0, MigrateBegin(guest.domid))["migration"]
    bed.act(0, MigrateSend(mig, 32))
    bed.act(0, MigrateSuspend(mig))
    before = {g: bytes(host.frames.data.get(m, b"")) for g, m in guest.p2m.items()}
    assert errno(bed.act, guest.domid, GuestWrite(1, 0, b"x")) == -16
    assert errno(host.device_dma, BDF, 1 << 12, b"x") == -16
    assert errno(host.device_dma, "00:05.0", 0x900 << 12, b"x") == -16
    assert errno(bed.act, 0, SetMaxPages(guest.domid, 64)) == -16
    assert {g: bytes(host.frames.data.get(m, b"")) for g, m in guest.p2m.items()} == before
    bed.act(0, MigrateFinish(mig, False))  # abandoned: it runs on
    bed.act(guest.domid, GuestWrite(1, 0, b"x"))
    bed.check()


def test_open_migrations_are_bounded(bed: Bed) -> None:
    """A toolstack that begins migrations and goes away: one past the limit abandons the oldest,
    whose domain runs on with its log off."""
    doms = [bed.guest(memory=4, device=None) for _ in range(live.MAX_MIGRATIONS + 1)]
    for dom in doms:
        bed.act(0, MigrateBegin(dom.domid))
    assert len(migrations(bed.host).outgoing) == live.MAX_MIGRATIONS
    assert doms[0].p2m.log is None and all(d.p2m.log is not None for d in doms[1:])
    assert bed.host.iommu.dirty_owners == {d.domid for d in doms[1:]}


def test_a_lying_stream_leaves_nothing_on_the_receiver() -> None:
    """Sections that name more pages than the domain may have, or lie in their META, are refused,
    and the domain half-received goes with them."""
    here, there = Bed(), Bed()
    dom = here.guest(memory=32, device=None)
    free = there.host.frames.nr_free
    mig = here.act(0, MigrateBegin(dom.domid))["migration"]
    first = read(here, here.act(0, MigrateSend(mig, 16)))
    got = there.act(0, MigrateReceive(write(there, first), 0))
    # A second "section" naming 64 GFNs the 32-page domain (max_pages 32) never had.
    sent = list(range(1000, 1064))
    forged = live.encode_precopy({"round": 1, "left": 0}, array("Q", sent), array("Q"), [])
    assert errno(there.act, 0, MigrateReceive(write(there, drain(forged)), got["incoming"])) == -12
    assert got["domid"] not in there.host.domains and there.host.frames.nr_free == free
    big = {"round": 1, "left": 0, "create": {"name": "x" * 10_000}}
    forged = live.encode_precopy(big, array("Q"), array("Q"), [])
    assert errno(there.act, 0, MigrateReceive(write(there, drain(forged)), 0)) == -74
    header_only = bytes(first[:32])
    assert errno(there.act, 0, MigrateReceive(write(there, header_only), 0)) == -74
    assert there.host.frames.nr_free == free and list(there.host.domains) == [0]
    json.dumps(there.host.options.__dict__, default=str)  # the receiver is still whole
    there.check()


def test_dma_of_domains_not_migrating_sets_no_dirty_bit(bed: Bed) -> None:
    """While one domain migrates, another guest's DMA to its own frames records nothing: dirty
    bits are kept only for frames of migrating domains (else any guest could grow them while
    some migration runs, up to every entry it can map)."""
    busy = bed.guest(memory=64)
    quiet = bed.guest(memory=8, device=None)
    bed.act(0, MigrateBegin(quiet.domid))
    for gfn in range(64):
        assert bed.host.device_dma(BDF, gfn << 12, b"x").ok
    assert not bed.ctx(busy).dirty


def test_a_dead_toolstack_never_leaves_two_running_copies() -> None:
    """The receiver has the last section, and the toolstack goes away: the received copy waits
    paused (no token, nothing runs) until the source commits and it is resumed; the source's
    stopped copy may be taken back (a new migration supersedes it) only until it is committed,
    and a stopped migration is never evicted by others."""
    here, there = Bed(), Bed()
    dom = here.guest(memory=16, device=None)
    token = dom.token
    mig = here.act(0, MigrateBegin(dom.domid))["migration"]
    incoming = 0
    while True:
        reply = here.act(0, MigrateSend(mig, 16))
        incoming = there.act(0, MigrateReceive(write(there, read(here, reply)), incoming))["incoming"]
        if not reply["left"]:
            break
    got = there.act(0, MigrateReceive(write(there, read(here, here.act(0, MigrateSuspend(mig)))), incoming))
    copy = there.host.domain(got["domid"])
    assert got["paused"] and copy.domid in there.host.suspended and copy.token != token  # waits, tokenless
    others = [here.guest(memory=4, device=None) for _ in range(live.MAX_MIGRATIONS)]
    for other in others:
        here.act(0, MigrateBegin(other.domid))
    # One too many: a migration still in pre-copy goes, never the stopped one.
    assert others[0].p2m.log is None and dom.domid in here.host.suspended
    assert len(migrations(here.host).outgoing) == live.MAX_MIGRATIONS
    here.act(0, MigrateCommit(mig))
    assert errno(here.act, 0, MigrateBegin(dom.domid)) == -16  # committed: it can only go
    assert errno(here.act, 0, MigrateFinish(mig, False)) == -22
    assert dom.domid in here.host.suspended
    resumed = there.act(0, MigrateResume(incoming))
    assert resumed["token"] == token == copy.token and copy.domid not in there.host.suspended
    here.act(0, MigrateFinish(mig, True))
    assert dom.domid not in here.host.domains
    here.check()
    there.check()
