"""An LPI's pending state belongs to its mapping; the pending table sets or clears it (lpis.py).

Written as kvm-unit-tests' ITS tests are: what the guest writes, then what it must see. "In
service" is an LPI delivered and not yet ended; one that fires again meanwhile is pending.
"""

from __future__ import annotations

from tests.core.its.guest import ITT_GFN, LPI, Guest, settle
from xenemu.abi import its_cmd as c
from xenemu.abi.its_cmd import ItsCommand
from xenemu.core.host import Host
from xenemu.core.its import Delivery, ItsHost

PEND_GFN = 40


def guest(its: ItsHost, host: Host, events: int = 4) -> Guest:
    """Collections 0 and 1 on vCPUs 0 and 1; event e -> LPI 8224 + e in collection 0, enabled."""
    g = Guest(its, host)
    g.queue(c.mapc(0, 0), c.mapc(1, 1), c.mapd(0, 2, ITT_GFN << 12))
    for e in range(events):
        g.enable(LPI + 32 + e)
    g.queue(*[c.mapti(0, e, LPI + 32 + e, 0) for e in range(events)], c.sync(0))
    settle(its)
    return g


def run(g: Guest, *commands: ItsCommand) -> list[Delivery]:
    """The guest queues commands (its CWRITER write runs passes), then everything settles: what
    it was given meanwhile, including what Xen delivered while translating (a MOVI's)."""
    first = len(g.its.deliveries)
    g.queue(*commands)
    settle(g.its)
    return g.its.deliveries[first:]


def in_service_and_pending(g: Guest, event: int = 0) -> int:
    """Event fires, is delivered on vCPU 0, and fires again before the guest ends it."""
    hw = g.its.pits[0].hw
    vlpi = LPI + 32 + event
    hw.msi(0x10, event)
    assert settle(g.its) == [Delivery(g.domid, 0, vlpi)]
    hw.msi(0x10, event)
    assert settle(g.its) == []  # coalesced
    return vlpi


def test_movi_moves_a_pending_lpi_delivered_once_on_the_new_vcpu(setup: tuple[Host, ItsHost]) -> None:
    host, its = setup
    g = guest(its, host)
    vlpi = in_service_and_pending(g)
    # vCPU 1 does not have it in service: delivered there at once
    assert run(g, c.event_cmd(c.MOVI, 0, 0, 1), c.sync(1)) == [Delivery(g.domid, 1, vlpi)]
    assert its.end(g.domid, 0, vlpi) is None  # the old vCPU's end delivers nothing more
    assert its.end(g.domid, 1, vlpi) is None
    its.pits[0].hw.msi(0x10, 0)
    assert settle(its) == [Delivery(g.domid, 1, vlpi)]  # and it now fires on vCPU 1


def test_mapc_remap_moves_a_pending_lpi(setup: tuple[Host, ItsHost]) -> None:
    host, its = setup
    g = guest(its, host, events=2)
    vlpi = in_service_and_pending(g)
    # MAPC remaps collection 0 to vCPU 1: the pending state moves with its mappings
    assert run(g, c.mapc(0, 1), c.sync(1)) == [Delivery(g.domid, 1, vlpi)]
    its.pits[0].hw.msi(0x10, 0)
    assert settle(its) == []  # in service on vCPU 1 now: pending there
    assert its.end(g.domid, 0, vlpi) is None
    assert its.end(g.domid, 1, vlpi) == Delivery(g.domid, 1, vlpi)


def test_clear_clears_a_pending_lpi(setup: tuple[Host, ItsHost]) -> None:
    host, its = setup
    g = guest(its, host)
    vlpi = in_service_and_pending(g)
    assert run(g, c.event_cmd(c.CLEAR, 0, 0), c.sync(0)) == []
    assert its.end(g.domid, 0, vlpi) is None  # nothing was left pending
    assert settle(its) == []


def test_discard_removes_a_pending_lpi(setup: tuple[Host, ItsHost]) -> None:
    """The issue's case: after DISCARD and the guest's end, the LPI must not come again."""
    host, its = setup
    g = guest(its, host)
    vlpi = in_service_and_pending(g)
    assert run(g, c.event_cmd(c.DISCARD, 0, 0), c.sync(0)) == []
    assert its.end(g.domid, 0, vlpi) is None
    # the same event and vLPI mapped again: nothing of the old mapping comes back
    assert run(g, c.mapti(0, 0, vlpi, 1), c.sync(1)) == [] and its.end(g.domid, 1, vlpi) is None


def test_mapd_removes_pending_lpis_with_their_mappings(setup: tuple[Host, ItsHost]) -> None:
    host, its = setup
    g = guest(its, host)
    vlpi = in_service_and_pending(g)
    assert run(g, c.mapd(0, 2, ITT_GFN << 12), c.mapti(0, 0, vlpi, 0), c.sync(0)) == []  # remapped
    assert its.end(g.domid, 0, vlpi) is None


def test_pending_left_by_an_old_mapping_is_not_delivered_as_the_new_vlpi(setup: tuple[Host, ItsHost]) -> None:
    """DISCARD and a new MAPTI are translated, not yet executed; the device fires meanwhile: the
    pITS still holds the old mapping, so what it makes pending is not the new vLPI's."""
    host, its = setup
    g = guest(its, host)
    new = LPI + 100
    g.enable(new)
    hw = its.pits[0].hw
    g.queue(c.event_cmd(c.DISCARD, 0, 0), c.mapti(0, 0, new, 0), c.sync(0))
    assert hw.queued()  # on the pITS, not executed yet
    hw.msi(0x10, 0)
    assert its.deliver() == []  # dropped: it became pending under the old mapping
    assert settle(its) == []
    hw.msi(0x10, 0)
    assert settle(its) == [Delivery(g.domid, 0, new)]  # under the new mapping it is the new vLPI


# -- the pending table, read when EnableLPIs goes from 0 to 1 with PTZ = 0 ---------------------------
def reenable(g: Guest, vcpu: int, bits: dict[int, bool]) -> None:
    """Clear EnableLPIs, write the pending table's bits, PENDBASER with PTZ = 0, set EnableLPIs."""
    its, host = g.its, g.host
    its.redist_write(g.domid, vcpu, 0x0, 4, 0)
    for vlpi, on in bits.items():
        byte = host.memory.access(g.domid, PEND_GFN, vlpi // 8, None, 1)[0]
        byte = byte | 1 << vlpi % 8 if on else byte & ~(1 << vlpi % 8)
        host.memory.access(g.domid, PEND_GFN, vlpi // 8, bytes([byte]))
    its.redist_write(g.domid, vcpu, 0x78, 8, PEND_GFN << 12)
    its.redist_write(g.domid, vcpu, 0x0, 4, 1)


def test_a_set_bit_makes_the_lpi_pending_and_it_is_delivered_once(setup: tuple[Host, ItsHost]) -> None:
    host, its = setup
    g = guest(its, host)
    reenable(g, 0, {LPI + 33: True})
    assert its.redist_read(g.domid, 0, 0x78, 8) == PEND_GFN << 12  # PTZ reads as 0
    assert settle(its) == [Delivery(g.domid, 0, LPI + 33)]
    assert its.end(g.domid, 0, LPI + 33) is None and settle(its) == []


def test_a_set_bit_of_a_disabled_lpi_is_delivered_after_enable_and_inv(setup: tuple[Host, ItsHost]) -> None:
    host, its = setup
    g = guest(its, host)
    g.enable(LPI + 34, False)
    g.queue(c.event_cmd(c.INV, 0, 2), c.sync(0))
    settle(its)
    reenable(g, 0, {LPI + 34: True})
    assert settle(its) == []  # pending, not delivered: it is disabled
    g.enable(LPI + 34)
    assert settle(its) == []  # not seen until invalidated
    assert run(g, c.event_cmd(c.INV, 0, 2), c.sync(0)) == [Delivery(g.domid, 0, LPI + 34)]
    assert its.end(g.domid, 0, LPI + 34) is None and settle(its) == []


def test_a_clear_bit_clears_the_pending_state(setup: tuple[Host, ItsHost]) -> None:
    host, its = setup
    g = guest(its, host)
    g.enable(LPI + 34, False)
    assert run(g, c.event_cmd(c.INV, 0, 2), c.event_cmd(c.INT, 0, 2), c.sync(0)) == []  # disabled: pending
    reenable(g, 0, {LPI + 34: False})
    settle(its)
    g.enable(LPI + 34)
    assert run(g, c.event_cmd(c.INV, 0, 2), c.sync(0)) == []  # the pending table said it is not pending


def test_a_clear_bit_clears_a_coalesced_lpi(setup: tuple[Host, ItsHost]) -> None:
    host, its = setup
    g = guest(its, host)
    vlpi = in_service_and_pending(g)
    reenable(g, 0, {vlpi: False})
    assert settle(its) == []
    assert its.end(g.domid, 0, vlpi) is None


def test_two_events_of_one_vlpi_are_one_pending_bit(setup: tuple[Host, ItsHost]) -> None:
    host, its = setup
    g = guest(its, host, events=1)
    g.queue(c.mapti(0, 1, LPI + 32, 0), c.sync(0))  # event 1 -> the same vLPI as event 0
    settle(its)
    reenable(g, 0, {LPI + 32: True})
    assert settle(its) == [Delivery(g.domid, 0, LPI + 32)]
    assert its.end(g.domid, 0, LPI + 32) is None  # once, not once per event
    hw = its.pits[0].hw
    hw.msi(0x10, 0)
    assert settle(its) == [Delivery(g.domid, 0, LPI + 32)]
    hw.msi(0x10, 1)
    hw.msi(0x10, 0)
    assert settle(its) == []
    assert its.end(g.domid, 0, LPI + 32) == Delivery(g.domid, 0, LPI + 32)  # one INTID, one bit
    assert its.end(g.domid, 0, LPI + 32) is None


def test_ptz_says_the_table_is_zero_so_it_is_not_read(setup: tuple[Host, ItsHost]) -> None:
    host, its = setup
    g = guest(its, host)
    host.memory.access(g.domid, PEND_GFN, (LPI + 33) // 8, bytes([0xFF]))
    its.redist_write(g.domid, 0, 0x0, 4, 0)
    its.redist_write(g.domid, 0, 0x78, 8, PEND_GFN << 12 | 1 << 62)
    its.redist_write(g.domid, 0, 0x0, 4, 1)
    assert settle(its) == []
