"""LPIs reaching the guest: delivery, coalescing until the end, held and dropped LPIs (lpis.py)."""

from __future__ import annotations

from tests.core.its.guest import ITT_GFN, LPI, Guest, bring_up, settle
from xenemu.abi import its_cmd as c
from xenemu.core.host import Host
from xenemu.core.its import Delivery, ItsHost


def test_linux_bring_up_and_msi_delivery(setup: tuple[Host, ItsHost]) -> None:
    host, its = setup
    g = Guest(its, host)
    bring_up(g)
    settle(its)
    assert g.creadr() == g.offset and its.mmio_read(g.domid, 0, 0x0, 4) & 0x80000000
    vits = g.vits()
    assert not vits.dropped and vits.received["MAPTI"] == 8
    for e in range(8):
        g.enable(LPI + 32 + e)
    g.queue(c.invall(0), c.sync(0))
    settle(its)
    pits = its.pits[0].hw
    assert pits.msi(0x10, 3) == its.domains[g.domid].vits[0].ites[(0, 3)].plpi
    assert settle(its) == [Delivery(g.domid, 0, LPI + 35)]
    # pending again before the guest ends it: coalesced, then delivered once at the end
    pits.msi(0x10, 3)
    pits.msi(0x10, 3)
    assert settle(its) == []
    assert its.end(g.domid, 0, LPI + 35) == Delivery(g.domid, 0, LPI + 35)
    assert its.end(g.domid, 0, LPI + 35) is None


def test_int_while_disabled_is_delivered_once_after_enable_and_invall(setup: tuple[Host, ItsHost]) -> None:
    host, its = setup
    g = Guest(its, host)
    bring_up(g, events=1)
    g.queue(c.event_cmd(c.INT, 0, 0), c.sync(0))
    assert settle(its) == []
    g.enable(LPI + 32)
    assert settle(its) == []  # the pITS's cache still says disabled
    g.queue(c.invall(0), c.sync(0))
    assert settle(its) == [Delivery(g.domid, 0, LPI + 32)]
    assert settle(its) == []


def test_an_lpi_fired_while_its_collection_is_unmapped_is_dropped(setup: tuple[Host, ItsHost]) -> None:
    """KVM and the architecture: the LPI is dropped, not held; INT counts INT_UNMAPPED_INTERRUPT.
    A MAPTI into a collection not mapped yet is accepted, and routes once MAPC maps it."""
    host, its = setup
    g = Guest(its, host)
    g.queue(c.mapd(0, 2, ITT_GFN << 12), c.mapti(0, 1, LPI + 40, 1))  # collection 1: not mapped yet
    g.enable(LPI + 40)
    g.queue(c.event_cmd(c.INT, 0, 1), c.sync(0))
    assert settle(its) == []
    assert dict(g.vits().dropped) == {"INT_UNMAPPED_INTERRUPT": 1}
    its.pits[0].hw.msi(0x10, 1)  # the device fires it: dropped too
    assert settle(its) == []
    g.queue(c.mapc(1, 1), c.sync(1))
    assert settle(its) == []  # nothing was kept for it
    g.queue(c.event_cmd(c.INT, 0, 1), c.sync(1))
    assert settle(its) == [Delivery(g.domid, 1, LPI + 40)]


def test_lpi_for_a_vcpu_without_enable_lpis_is_dropped(setup: tuple[Host, ItsHost]) -> None:
    host, its = setup
    g = Guest(its, host)
    bring_up(g, events=1)
    g.enable(LPI + 32)
    g.queue(c.invall(0), c.sync(0))
    settle(its)
    its.redist_write(g.domid, 0, 0x0, 4, 0)
    its.pits[0].hw.msi(0x10, 0)
    assert settle(its) == []
    its.redist_write(g.domid, 0, 0x0, 4, 1)
    assert settle(its) == []  # not kept pending
