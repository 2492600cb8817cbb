"""kvm-unit-tests' its-migration, its-pending-migration and its-migrate-unmapped-collection,
replayed over the wire: a guest brings up its vITS on one daemon, is saved and restored on
another (or live-migrated there), where its mappings and queue carry on, a pending LPI arrives exactly once, and a
collection mapped only after the move routes what was mapped to it before."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conformance.beds import DaemonProcess
from xenemu.abi import its_cmd as c
from xenemu.abi.its_cmd import ItsCommand
from xenemu.client import SyncControlClient, SyncHypercallClient
from xenemu.client.migration import migrate as live_migrate

LPI = 8192
QUEUE_GFN, PROP_GFN, ITT_GFN = 16, 20, 30
#: The device table (GITS_BASER0) at GFN 48 and the collection table at GFN 0: a save writes
#: both into the guest's RAM, so they must not overlap.
DEVICE_TABLE_GFN = 48
BDF = "0000:00:07.0"


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[tuple[DaemonProcess, DaemonProcess]]:
    a = DaemonProcess(tmp_path / "a", "--frames", "8192", "--dom0-memory", "512")
    b = DaemonProcess(tmp_path / "b", "--frames", "8192", "--dom0-memory", "700")
    yield a, b
    a.stop()
    b.stop()


class Guest:
    """The guest's side over its hypercall connection: its queue, its doorbell, its LPIs."""

    def __init__(self, daemon: DaemonProcess, token: str, doorbell: int, offset: int = 0) -> None:
        self.xc = SyncHypercallClient.connect(daemon.hypercall_path, token)
        self.doorbell, self.offset = doorbell, offset

    def bring_up(self) -> None:
        xc = self.xc
        xc.its_mmio("its", 0, 0x80, 8, 1 << 63 | QUEUE_GFN << 12)
        xc.its_mmio("its", 0, 0x100, 8, 1 << 63 | DEVICE_TABLE_GFN << 12)
        xc.its_mmio("its", 0, 0x108, 8, 1 << 63)
        for vcpu in range(2):
            xc.its_mmio("redist", vcpu, 0x70, 8, PROP_GFN << 12 | 15)
            xc.its_mmio("redist", vcpu, 0x0, 4, 1)
        xc.its_mmio("its", 0, 0x0, 4, 1)
        xc.guest_write(PROP_GFN, bytes([0xA3] * 256), 0)  # LPIs 8192..8447 enabled

    def put(self, *commands: ItsCommand) -> None:
        """Write commands and CWRITER, and go on without waiting for them to run."""
        for command in commands:
            self.xc.guest_write(QUEUE_GFN, command.encode(), self.offset % 4096)
            self.offset += 32
        self.xc.its_mmio("its", 0, 0x88, 8, self.offset % 4096)

    def run(self, *commands: ItsCommand) -> None:
        self.put(*commands)
        deadline = time.monotonic() + 10
        while self.xc.its_mmio("its", 0, 0x90, 8) != self.offset % 4096:  # poll CREADR
            assert time.monotonic() < deadline, "the queue stalled"

    def msi(self, event: int) -> None:
        assert self.xc.device_dma(BDF, self.doorbell, event.to_bytes(4, "little"))["ok"]

    def lpi(self, timeout: float = 30.0) -> tuple[int, int] | None:  # generous: a loaded machine
        event = self.xc.next_event(timeout=timeout)
        return None if event is None else (event["vcpu"], event["intid"])


def guest_on(daemon: DaemonProcess) -> tuple[int, Guest]:
    with SyncControlClient.connect(daemon.control_path) as ctl:
        reply = ctl.create_domain("hvm", 64, vcpus=2)
        ctl.assign_device(reply["domid"], BDF, its_devid=0x33, its_events=8)
        doorbell = ctl.its_info(reply["domid"])["its_frames"]["0"] + 0x10040
    g = Guest(daemon, reply["token"], doorbell)
    g.bring_up()
    return reply["domid"], g


def settled(stats: dict[str, Any]) -> bool:
    """Nothing Xen owes a vITS is unplaced, nothing placed is unrun, no scan or load is going."""
    pits = stats["pits"][0]
    return not (pits["queued"] or pits["xen_queue"] or pits["xen_owed"] or stats["jobs"])


Mover = Callable[[DaemonProcess, int, "Guest", DaemonProcess], "Guest"]


@pytest.fixture(params=["save-restore", "live-migration"])
def move(request: pytest.FixtureRequest) -> Mover:
    """Each sequence runs across ``xenemu save``/``restore`` and across ``xenemu migrate``."""
    return save_and_restore if request.param == "save-restore" else migrate


def migrate(a: DaemonProcess, domid: int, g: Guest, b: DaemonProcess) -> Guest:
    """Live: the guest's connection stays open until its domain leaves, then it reconnects to
    the receiver with the same token (PROTOCOL.md 14.1)."""
    with SyncControlClient.connect(a.control_path) as src, SyncControlClient.connect(b.control_path) as dst:
        report = live_migrate(src, dst, domid)
        assert src.audit() == []
        doorbell = dst.its_info(report.new_domid)["its_frames"]["0"] + 0x10040
        token = report.token
        deadline = time.monotonic() + 20
        while not settled(dst.its_stats()):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert dst.audit() == []
    g.xc.close()
    return Guest(b, token, doorbell, g.offset)


def save_and_restore(a: DaemonProcess, domid: int, g: Guest, b: DaemonProcess) -> Guest:
    g.xc.close()
    deadline = time.monotonic() + 10
    with SyncControlClient.connect(a.control_path) as ctl:
        data = ctl.save_image(domid)  # whatever the vITS has queued or in flight is carried
        assert ctl.audit() == []
    with SyncControlClient.connect(b.control_path) as ctl:
        restored = ctl.restore_image(data)
        doorbell = ctl.its_info(restored["domid"])["its_frames"]["0"] + 0x10040
        h = Guest(b, restored["token"], doorbell, g.offset)
        while not settled(ctl.its_stats()):  # Xen places, and the pITS runs, its MAPD and MAPTIs
            assert time.monotonic() < deadline + 20
            time.sleep(0.01)
        assert ctl.audit() == []
    return h


def test_its_migration(daemons: tuple[DaemonProcess, DaemonProcess], move: Mover) -> None:
    a, b = daemons
    domid, g = guest_on(a)
    g.run(c.mapc(0, 0), c.mapc(1, 1), c.mapd(0, 2, ITT_GFN << 12))
    g.run(*[c.mapti(0, e, LPI + 32 + e, e % 2) for e in range(4)], c.invall(0), c.invall(1), c.sync(0))
    g.msi(2)
    assert g.lpi() == (0, LPI + 34)
    g.xc.its_end(0, LPI + 34)
    h = move(a, domid, g, b)
    for event, want in ((0, (0, LPI + 32)), (1, (1, LPI + 33)), (3, (1, LPI + 35))):
        h.msi(event)
        assert h.lpi() == want
        h.xc.its_end(*want)
    h.run(c.event_cmd(c.INT, 0, 2), c.sync(0))  # the queue goes on where it stood
    assert h.lpi() == (0, LPI + 34)
    h.xc.close()


def test_its_pending_migration(daemons: tuple[DaemonProcess, DaemonProcess], move: Mover) -> None:
    a, b = daemons
    domid, g = guest_on(a)
    g.run(c.mapc(0, 0), c.mapc(1, 1), c.mapd(0, 2, ITT_GFN << 12), c.mapti(0, 5, LPI + 100, 1))
    g.run(c.event_cmd(c.INV, 0, 5), c.sync(1))
    g.msi(5)
    assert g.lpi() == (1, LPI + 100)
    g.msi(5)  # in service: pending
    g.msi(5)  # coalesced
    assert g.lpi(timeout=0.2) is None
    h = move(a, domid, g, b)
    h.xc.its_end(1, LPI + 100)
    assert h.lpi() == (1, LPI + 100)  # the pending LPI, once
    h.xc.its_end(1, LPI + 100)
    assert h.lpi(timeout=0.3) is None  # and not twice
    h.xc.close()


def test_its_migrate_unmapped_collection(daemons: tuple[DaemonProcess, DaemonProcess], move: Mover) -> None:
    a, b = daemons
    domid, g = guest_on(a)
    g.run(c.mapc(0, 0), c.mapd(0, 2, ITT_GFN << 12), c.mapti(0, 6, LPI + 200, 1), c.sync(0))
    h = move(a, domid, g, b)
    h.run(c.mapc(1, 1), c.invall(1), c.sync(1))
    h.msi(6)
    assert h.lpi() == (1, LPI + 200)
    h.xc.close()


def test_an_int_just_before_the_move_is_delivered_once(
    daemons: tuple[DaemonProcess, DaemonProcess], move: Mover
) -> None:
    """The guest's last MAPTI and an INT after it, written with CWRITER and moved at once
    (a save carries them wherever they stand: queued, on the pITS or run there; a live stop
    waits until they have run), take effect once on the other daemon. The LPI is one the guest
    has not enabled, so it waits pending until the moved guest (connected by then) enables it,
    as in its-pending-migration; it arrives once."""
    a, b = daemons
    domid, g = guest_on(a)
    g.run(c.mapc(0, 0), c.mapc(1, 1), c.mapd(0, 2, ITT_GFN << 12), c.sync(0))
    vlpi = LPI + 300  # beyond the 256 that bring_up enables
    g.put(c.mapti(0, 4, vlpi, 1), c.event_cmd(c.INT, 0, 4), c.sync(1))
    h = move(a, domid, g, b)
    assert h.xc.its_mmio("its", 0, 0x90, 8) == h.offset % 4096  # the queue ran to CWRITER
    assert h.lpi(timeout=0.2) is None  # disabled: pending
    h.xc.guest_write(PROP_GFN, bytes([0xA3]), vlpi - LPI)
    h.run(c.event_cmd(c.INV, 0, 4), c.sync(1))
    assert h.lpi() == (1, vlpi)
    h.xc.its_end(1, vlpi)
    assert h.lpi(timeout=0.3) is None  # once
    h.msi(4)
    assert h.lpi() == (1, vlpi)
    h.xc.close()


def test_an_lpi_given_before_the_guest_reconnects_waits_for_it(
    daemons: tuple[DaemonProcess, DaemonProcess], move: Mover
) -> None:
    """An LPI the pITS holds pending while disabled in its cache, enabled in the guest's table
    (no INV yet): the restore reads the table, so the moved vITS gives it at once, before the
    guest has reconnected. The daemon keeps it for the guest's next connection (the vITS has it
    in service, so it would never come again): it arrives there, once."""
    a, b = daemons
    domid, g = guest_on(a)
    vlpi = LPI + 40
    g.xc.guest_write(PROP_GFN, bytes([0xA2]), vlpi - LPI)  # disabled, as the pITS caches it
    g.run(c.mapc(0, 0), c.mapc(1, 1), c.mapd(0, 2, ITT_GFN << 12), c.mapti(0, 1, vlpi, 1), c.sync(1))
    g.run(c.event_cmd(c.INT, 0, 1), c.sync(1))
    assert g.lpi(timeout=0.2) is None  # pending on the pITS
    g.xc.guest_write(PROP_GFN, bytes([0xA3]), vlpi - LPI)  # enabled in RAM, not yet invalidated
    h = move(a, domid, g, b)
    assert h.lpi() == (1, vlpi)  # given while no program of the domain was connected
    h.xc.its_end(1, vlpi)
    assert h.lpi(timeout=0.3) is None  # once
    h.xc.close()
