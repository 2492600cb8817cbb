"""The vITS across a save and restore on another host, after kvm-unit-tests' its-migration,
its-pending-migration and its-migrate-unmapped-collection: mappings, collections and the queue
carry on, a pending LPI is delivered exactly once, and a collection mapped only after the
migration routes what was mapped to it before."""

from __future__ import annotations

from typing import Any

import pytest

from tests.core.its.guest import BASER, CBASER, ITT_GFN, LPI, PROP_GFN, QUEUE_GFN, its_host, settle
from xenemu.abi import its_cmd as c
from xenemu.abi.its_cmd import ItsCommand
from xenemu.core.actions.dispatch import run
from xenemu.core.actions.iommu import DeviceDma
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
from xenemu.core.its import DOORBELL_OFFSET, Delivery
from xenemu.core.migration.store import CHUNK

BDF = "0000:00:05.0"
#: The device table at GFN 48 (64 KiB aligned), the collection table at GFN 0: tables a save
#: writes must not overlap (tests.core.its.guest puts both at 0, which only a save minds).
DEVICE_TABLE_GFN = 48
DEVICE_BASER = BASER | DEVICE_TABLE_GFN << 12


class ItsGuest:
    """A guest with one MSI device, programming its vITS through the host as Linux would."""

    def __init__(self, host: Host, domid: int | None = None) -> None:
        self.host, self.its = host, host.its
        if domid is None:
            domid = host.create_domain("hvm", 64, vcpus=2).domid
            host.assign_device(domid, BDF, its_devid=0x21, its_events=8, pits=0)
            for reg, value in ((0x80, CBASER), (0x100, DEVICE_BASER), (0x108, BASER)):
                self.its.mmio_write(domid, 0, reg, 8, value)
            for vcpu in range(2):
                self.its.redist_write(domid, vcpu, 0x70, 8, PROP_GFN << 12 | 15)
                self.its.redist_write(domid, vcpu, 0x0, 4, 1)
            self.its.mmio_write(domid, 0, 0x0, 4, 1)
        self.domid = domid
        self.offset = self.its.mmio_read(domid, 0, 0x88, 8)  # CWRITER: where the next command goes

    def queue(self, *commands: ItsCommand) -> list[Delivery]:
        first = len(self.its.deliveries)
        for command in commands:
            self.host.memory.access(self.domid, QUEUE_GFN, self.offset % 4096, command.encode())
            self.offset += 32
        self.its.mmio_write(self.domid, 0, 0x88, 8, self.offset % 4096)
        settle(self.its)
        return self.its.deliveries[first:]

    def enable(self, *vlpis: int) -> None:
        for vlpi in vlpis:
            self.host.memory.access(self.domid, PROP_GFN, vlpi - LPI, bytes([0xA0 | 3]))
            self.its.config_written(self.domid, vlpi, 0xA0 | 3)

    def msi(self, event: int) -> list[Delivery]:
        first = len(self.its.deliveries)
        doorbell = self.its.translation_gpa(self.domid, 0) + DOORBELL_OFFSET
        assert self.host.device_dma(BDF, doorbell, event.to_bytes(4, "little")).ok
        settle(self.its)
        return self.its.deliveries[first:]

    def end(self, vcpu: int, intid: int) -> Delivery | None:
        got = self.its.end(self.domid, vcpu, intid)
        settle(self.its)
        return got

    def creadr(self) -> int:
        return self.its.mmio_read(self.domid, 0, 0x90, 8)


def delivered(deliveries: list[Delivery]) -> list[tuple[int, int]]:
    return [(d.vcpu, d.intid) for d in deliveries]


def migrate(source: Host, domid: int, target: Host) -> ItsGuest:
    saved = run(source, 0, SaveDomain(domid))
    data = b"".join(
        run(source, 0, ImageRead(saved["image"], at, CHUNK))["data"] for at in range(0, saved["size"], CHUNK)
    )
    incoming = run(target, 0, RestoreBegin(len(data)))["image"]
    run(target, 0, ImageWrite(incoming, 0, data))
    restored = run(target, 0, RestoreDomain(incoming))
    settle(target.its)  # Xen's MAPD and MAPTIs for the restored device run on the pITS
    assert not audit(source) and not audit(target)
    return ItsGuest(target, restored["domid"])


def hosts() -> tuple[Host, Host]:
    (a, _), (b, _) = its_host(), its_host()
    b.create_domain("hvm", 200)  # the copy's frames and domid differ from the original's
    return a, b


def test_its_migration_mappings_and_the_queue_carry_on() -> None:
    a, b = hosts()
    g = ItsGuest(a)
    g.queue(c.mapc(0, 0), c.mapc(1, 1), c.mapd(0, 2, ITT_GFN << 12))
    g.queue(*[c.mapti(0, e, LPI + 32 + e, e % 2) for e in range(4)], c.sync(0))
    g.enable(*[LPI + 32 + e for e in range(4)])
    g.queue(c.invall(0), c.invall(1), c.sync(0))
    assert delivered(g.msi(0)) == [(0, LPI + 32)]
    assert g.end(0, LPI + 32) is None
    creadr = g.creadr()
    h = migrate(a, g.domid, b)
    assert h.domid != g.domid and h.creadr() == creadr and h.offset == creadr
    assert delivered(h.msi(1)) == [(1, LPI + 33)]
    assert delivered(h.msi(2)) == [(0, LPI + 34)]
    assert delivered(h.queue(c.event_cmd(c.INT, 0, 3), c.sync(1))) == [(1, LPI + 35)]  # the queue goes on where it was
    assert h.creadr() == creadr + 64
    assert delivered(h.queue(c.event_cmd(c.MOVI, 0, 1, 0), c.sync(0))) == [] and h.end(1, LPI + 33) is None
    assert delivered(h.msi(1)) == [(0, LPI + 33)]
    assert not audit(b)


def test_its_pending_migration_delivers_a_pending_lpi_exactly_once() -> None:
    a, b = hosts()
    g = ItsGuest(a)
    g.queue(c.mapc(0, 0), c.mapc(1, 1), c.mapd(0, 2, ITT_GFN << 12), c.mapti(0, 5, LPI + 100, 1), c.sync(1))
    g.enable(LPI + 100)
    g.queue(c.event_cmd(c.INV, 0, 5), c.sync(1))
    assert delivered(g.msi(5)) == [(1, LPI + 100)]
    assert g.msi(5) == [] and g.msi(5) == []  # in service: pending, coalesced into one
    h = migrate(a, g.domid, b)
    got = h.end(1, LPI + 100)
    assert got is not None and (got.domid, got.vcpu, got.intid) == (h.domid, 1, LPI + 100)
    assert h.end(1, LPI + 100) is None  # exactly once
    assert delivered(h.msi(5)) == [(1, LPI + 100)]


def test_its_migrate_unmapped_collection() -> None:
    a, b = hosts()
    g = ItsGuest(a)
    g.queue(c.mapc(0, 0), c.mapd(0, 2, ITT_GFN << 12), c.mapti(0, 6, LPI + 200, 1), c.sync(0))
    g.enable(LPI + 200)
    g.queue(c.invall(1), c.sync(0))
    assert g.msi(6) == []  # collection 1 is unmapped: dropped
    h = migrate(a, g.domid, b)
    assert h.msi(6) == []
    h.queue(c.mapc(1, 1), c.sync(1))
    assert delivered(h.msi(6)) == [(1, LPI + 200)]


def live_migrate(source: Host, domid: int, target: Host) -> int:
    """``xl migrate`` on the core: one pre-copy round, the stop, the last section; the new domid.
    The target's pITS is not run: what the guest sees in the first moments on the receiver."""
    mig = run(source, 0, MigrateBegin(domid))["migration"]
    incoming = 0

    def carry(reply: dict[str, Any]) -> dict[str, Any]:
        data = b"".join(
            run(source, 0, ImageRead(reply["image"], at, CHUNK))["data"] for at in range(0, reply["size"], CHUNK)
        )
        image = run(target, 0, RestoreBegin(len(data)))["image"]
        run(target, 0, ImageWrite(image, 0, data))
        got: dict[str, Any] = run(target, 0, MigrateReceive(image, incoming))
        return got

    while True:
        reply = run(source, 0, MigrateSend(mig, 8192))
        incoming = carry(reply)["incoming"]
        if not reply["left"]:
            break
    got = carry(run(source, 0, MigrateSuspend(mig)))
    run(source, 0, MigrateCommit(mig))
    run(target, 0, MigrateResume(incoming))
    run(source, 0, MigrateFinish(mig, True))
    return int(got["domid"])


def test_a_live_migrated_guest_runs_only_once_its_device_is_mapped_on_the_new_pits() -> None:
    """An MSI the guest's device raises at once on the receiver is not dropped: until Xen's MAPD
    and MAPTIs for the device have run on the receiver's pITS (whose ITT for it is empty until
    then), the domain stays suspended and the write is -EBUSY, "try again"; then the retried
    MSI is delivered exactly once. (Found by the compose migration scenario: MSIs acknowledged
    in the first milliseconds after the move were lost.)"""
    a, b = hosts()
    g = ItsGuest(a)
    g.queue(c.mapc(0, 0), c.mapc(1, 1), c.mapd(0, 2, ITT_GFN << 12), c.mapti(0, 3, LPI + 40, 1), c.sync(1))
    g.enable(LPI + 40)
    g.queue(c.invall(1), c.sync(1))
    assert delivered(g.msi(3)) == [(1, LPI + 40)] and g.end(1, LPI + 40) is None
    domid = live_migrate(a, g.domid, b)
    doorbell = b.its.translation_gpa(domid, 0) + DOORBELL_OFFSET
    msi = DeviceDma(BDF, doorbell, (3).to_bytes(4, "little"))
    with pytest.raises(HypercallError) as info:
        run(b, domid, msi)
    assert info.value.errno == -16 and "suspended for migration" in str(info.value)
    assert b.its.deliveries == []
    settle(b.its)  # the receiver's pITS runs what Xen owes the device
    assert run(b, domid, msi)["ok"]
    settle(b.its)
    assert delivered(b.its.deliveries) == [(1, LPI + 40)]
    assert b.its.end(domid, 1, LPI + 40) is None  # exactly once
    assert domid not in b.suspended and not b.resuming
    assert not audit(a) and not audit(b)
