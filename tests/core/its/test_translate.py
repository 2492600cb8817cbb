"""Validation and translation of guest commands: KVM's drops, in KVM's order (translate.py)."""

from __future__ import annotations

import pytest

from tests.core.its.guest import ITT_GFN, LPI, PROP_GFN, Guest, bring_up, settle
from xenemu.abi import its_cmd as c
from xenemu.abi.its_cmd import ItsCommand
from xenemu.core.host import Host
from xenemu.core.its import Delivery, ItsHost

ERROR_CASES = [
    (c.mapd(7, 1, ITT_GFN << 12), "MAPD_DEVICE_OOR"),
    (c.mapd(0, 16, ITT_GFN << 12), "MAPD_ITTSIZE_OOR"),  # Size + 1 > 16 EventID bits
    (c.mapd(0, 2, 500 << 12), "MAPD_ITTSIZE_OOR"),
    (c.mapc(0, 2), "MAPC_PROCNUM_OOR"),
    (c.mapc(3, 1), "MAPC_COLLECTION_OOR"),
    (c.mapti(0, 0, LPI, 0), "MAPTI_UNMAPPED_DEVICE"),
    (c.event_cmd(c.INT, 0, 0), "INT_UNMAPPED_INTERRUPT"),
    (c.event_cmd(c.CLEAR, 0, 0), "CLEAR_UNMAPPED_INTERRUPT"),
    (c.event_cmd(c.INV, 0, 0), "INV_UNMAPPED_INTERRUPT"),
    (c.event_cmd(c.DISCARD, 0, 0), "DISCARD_UNMAPPED_INTERRUPT"),
    (c.event_cmd(c.MOVI, 0, 0, 0), "MOVI_UNMAPPED_INTERRUPT"),
    (c.invall(1), "INVALL_UNMAPPED_COLLECTION"),
    (c.sync(2), "SYNC_TARGET_OOR"),
    (c.movall(0, 5), "MOVALL_PROCNUM_OOR"),
    (ItsCommand(0x33).encode(), "UNKNOWN_COMMAND"),
]


@pytest.mark.parametrize(("command", "error"), ERROR_CASES, ids=[e for _, e in ERROR_CASES])
def test_bad_commands_are_dropped_and_the_queue_moves(
    setup: tuple[Host, ItsHost], command: ItsCommand | bytes, error: str
) -> None:
    host, its = setup
    g = Guest(its, host)
    g.queue(command, c.sync(0))
    settle(its)
    assert dict(g.vits().dropped) == {error: 1}
    assert g.creadr() == g.offset


def test_mapti_errors_in_their_order(setup: tuple[Host, ItsHost]) -> None:
    host, its = setup
    g = Guest(its, host)
    g.queue(c.mapd(0, 2, ITT_GFN << 12))
    g.queue(
        c.mapti(0, 8, LPI, 0),
        c.mapti(0, 1, 100, 0),
        c.mapti(0, 1, LPI + 1, 0),
        c.mapti(0, 1, LPI + 2, 0),
        c.mapti(0, 2, LPI + 3, 3),
    )
    settle(its)
    assert dict(g.vits().dropped) == {
        "MAPTI_ID_OOR": 1,
        "MAPTI_PHYSICALID_OOR": 1,
        "MAPTI_ALREADY_MAPPED": 1,
        "MAPC_COLLECTION_OOR": 1,
    }
    assert g.vits().ites[(0, 1)].vlpi == LPI + 1  # the first mapping stays


def test_unreadable_queue(setup: tuple[Host, ItsHost]) -> None:
    host, its = setup
    g = Guest(its, host)
    its.mmio_write(g.domid, 0, 0x0, 4, 0)
    its.mmio_write(g.domid, 0, 0x80, 8, 1 << 63 | 1000 << 12)  # beyond the guest's RAM
    its.mmio_write(g.domid, 0, 0x0, 4, 1)
    its.mmio_write(g.domid, 0, 0x88, 8, 64)
    settle(its)
    assert dict(g.vits().dropped) == {"UNREADABLE": 2} and g.creadr() == 64


def test_a_dropped_mapd_leaves_the_device_and_its_mappings(setup: tuple[Host, ItsHost]) -> None:
    """KVM validates MAPD before it unmaps anything: a refused MAPD V=1 has no effect at all."""
    host, its = setup
    g = Guest(its, host)
    bring_up(g, events=2)
    g.enable(LPI + 33)
    g.queue(c.invall(0), c.sync(0))
    settle(its)
    hw = its.pits[0].hw
    before = dict(hw.devices[0x10].events)
    g.queue(c.mapd(0, 16, ITT_GFN << 12), c.mapd(0, 2, 500 << 12), c.sync(0))  # too big; ITT not in RAM
    settle(its)
    assert dict(g.vits().dropped) == {"MAPD_ITTSIZE_OOR": 2}
    assert set(g.vits().ites) == {(0, 0), (0, 1)} and g.vits().devices[0].size == 2
    assert hw.devices[0x10].events == before  # the physical side untouched
    hw.msi(0x10, 1)
    assert settle(its) == [Delivery(g.domid, 0, LPI + 33)]


def test_linux_sizes_the_itt_for_32_events_of_a_4_event_device(setup: tuple[Host, ItsHost]) -> None:
    """Linux allocates at least 32 events (MAPD Size 4) for any PCI device: its MSIs must work."""
    host, its = setup
    g = Guest(its, host, events=4)
    g.queue(c.mapc(0, 0), c.sync(0), c.mapd(0, 4, ITT_GFN << 12))
    g.queue(*[c.mapti(0, e, LPI + 32 + e, 0) for e in range(5)], c.sync(0))
    settle(its)
    assert dict(g.vits().dropped) == {"MAPTI_ID_OOR": 1}  # event 4: beyond the device's events
    assert set(g.vits().ites) == {(0, e) for e in range(4)}
    device = its.pits[0].hw.devices[0x10]
    assert device.size == 1 and device.itt == 0x1000 * 0x10  # the ITT Xen allocated: 4 events
    assert sorted(device.events) == [0, 1, 2, 3]
    g.enable(LPI + 35)
    g.queue(c.event_cmd(c.INV, 0, 3), c.sync(0))
    settle(its)
    its.pits[0].hw.msi(0x10, 3)
    assert settle(its) == [Delivery(g.domid, 0, LPI + 35)]


def test_movi_of_an_lpi_whose_collection_is_unmapped(setup: tuple[Host, ItsHost]) -> None:
    host, its = setup
    g = Guest(its, host)
    g.queue(c.mapc(0, 0), c.mapd(0, 2, ITT_GFN << 12), c.mapti(0, 0, LPI + 40, 1))  # collection 1 unmapped
    g.queue(c.event_cmd(c.MOVI, 0, 0, 0), c.event_cmd(c.MOVI, 0, 0, 1), c.sync(0))
    settle(its)
    assert dict(g.vits().dropped) == {"MOVI_UNMAPPED_COLLECTION": 2}
    assert g.vits().ites[(0, 0)].icid == 1


def test_mapti_physical_id_is_bounded_by_16_id_bits(setup: tuple[Host, ItsHost]) -> None:
    """KVM: an LPI at or above 2^min(IDbits + 1, 16) is MAPTI_PHYSICALID_OOR."""
    host, its = setup
    g = Guest(its, host)
    for vcpu in range(2):
        its.redist_write(g.domid, vcpu, 0x0, 4, 0)
        its.redist_write(g.domid, vcpu, 0x70, 8, PROP_GFN << 12 | 16)  # IDbits field 16: 17 bits
    g.queue(c.mapc(0, 0), c.mapd(0, 2, ITT_GFN << 12))
    g.queue(c.mapti(0, 0, 70_000, 0), c.mapti(0, 1, 65_536, 0), c.mapti(0, 2, 65_535, 0), c.sync(0))
    settle(its)
    assert dict(g.vits().dropped) == {"MAPTI_PHYSICALID_OOR": 2}
    assert [ite.vlpi for ite in g.vits().ites.values()] == [65_535]
    assert its.config_range(g.domid)[1] - its.config_range(g.domid)[0] == 65_536 - LPI
