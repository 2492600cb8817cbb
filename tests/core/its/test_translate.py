"""Validation and translation of guest commands: KVM's drops, in KVM's order (translate.py)."""

from __future__ import annotations

import pytest

from tests.core.its.guest import ITT_GFN, LPI, Guest, settle
from xenemu.abi import its_cmd as c
from xenemu.abi.its_cmd import ItsCommand
from xenemu.core.host import Host
from xenemu.core.its import ItsHost

ERROR_CASES = [
    (c.mapd(7, 1, ITT_GFN << 12), "MAPD_DEVICE_OOR"),
    (c.mapd(0, 5, ITT_GFN << 12), "MAPD_ITTSIZE_OOR"),
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
