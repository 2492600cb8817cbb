"""A dying domain: drained, torn down, freed; its devices assignable only then (teardown.py)."""

from __future__ import annotations

import pytest

from tests.core.its.guest import LPI, Guest, bring_up, its_host, settle
from xenemu.abi import its_cmd as c
from xenemu.core.host import Host
from xenemu.core.its import Delivery, ItsHost


def test_destruction_waits_for_commands_in_flight_then_tears_down(setup: tuple[Host, ItsHost]) -> None:
    host, its = setup
    g = Guest(its, host)
    other = Guest(its, host, devid=0x11)
    bring_up(g)
    settle(its)
    for e in range(8):
        g.enable(LPI + 32 + e)
    g.queue(c.invall(0), *[c.sync(i % 2) for i in range(6)])  # a batch goes onto the pITS
    state = its.pits[0]
    assert g.vits().batch_in_flight()
    plpis = [ite.plpi for ite in g.vits().ites.values()]
    host.destroy_domain(g.domid)
    its.run_passes()
    assert its.tearing_down[g.domid] == -1  # still draining its own commands
    assert not its.teardown_done(g.domid)
    # the dying domain's MMIO is ignored, and nothing of it is delivered
    its.mmio_write(g.domid, 0, 0x88, 8, 0)
    state.hw.msi(0x10, 0)
    before = dict(state.physical)
    deliveries = settle(its)
    assert all(d.domid != g.domid for d in deliveries)
    assert its.teardown_done(g.domid)
    assert (
        state.physical["MAPD"] == before.get("MAPD", 0) + 1 and state.physical["INVALL"] >= before.get("INVALL", 0) + 1
    )
    assert not any(p in its.bindings for p in plpis)
    assert all(its.prop[p - LPI] & 1 == 0 for p in plpis)
    assert not any(o is not None for o in state.owner.values())
    assert 0x10 not in state.hw.devices  # the pITS no longer maps the device
    # its DeviceID can be assigned again only now, and the other guest was never disturbed
    fresh = host.create_domain("hvm", 8)
    its.assign(fresh.domid, 0x10, 0, 4, 0)
    other.queue(c.mapc(0, 0), c.sync(0))
    settle(its)
    assert other.creadr() == other.offset


def test_a_device_being_torn_down_cannot_be_reassigned(setup: tuple[Host, ItsHost]) -> None:
    host, its = setup
    g = Guest(its, host)
    g.queue(*[c.sync(i % 2) for i in range(6)])
    host.destroy_domain(g.domid)
    fresh = host.create_domain("hvm", 8)
    with pytest.raises(Exception) as info:
        its.assign(fresh.domid, 0x10, 0, 4, 0)
    assert "torn down" in str(info.value)
    settle(its)
    its.assign(fresh.domid, 0x10, 0, 4, 0)


def test_physical_lpis_are_returned_at_teardown() -> None:
    """Repeated assign + destroy of a 4,096-event device: 15 cycles used to exhaust the LPIs."""
    host, its = its_host()
    for cycle in range(40):
        dom = host.create_domain("hvm", 8)
        info = its.assign(dom.domid, 0x40, 0, 4096, 0)
        assert len(set(info.plpis)) == 4096
        host.destroy_domain(dom.domid)
        settle(its)
        assert its.teardown_done(dom.domid), cycle
    assert its.state.free_lpis_count() == len(its.prop) - its.options.pits


def test_a_dying_domain_is_not_served(setup: tuple[Host, ItsHost]) -> None:
    """MMIO of a dying domain is ignored (reads too: no pass runs for it), its LPI's end
    delivers nothing, and its configuration writes do not reach the physical table."""
    host, its = setup
    g = Guest(its, host)
    bring_up(g, events=1)
    g.enable(LPI + 32)
    g.queue(c.invall(0), c.sync(0))
    settle(its)
    hw = its.pits[0].hw
    hw.msi(0x10, 0)
    assert settle(its) == [Delivery(g.domid, 0, LPI + 32)]
    hw.msi(0x10, 0)
    settle(its)  # pending again, while in service
    g.queue(*[c.sync(i % 2) for i in range(6)])  # a batch on the pITS: the domain stays, draining
    plpi = g.vits().ites[(0, 0)].plpi
    host.destroy_domain(g.domid)
    passes = its.pits[0].passes
    assert its.mmio_read(g.domid, 0, 0x90, 8) == 0 and its.mmio_read(g.domid, 0, 0x0, 4) == 0
    assert its.pits[0].passes == passes
    assert its.end(g.domid, 0, LPI + 32) is None
    its.config_written(g.domid, LPI + 32, 0xA2)
    assert its.prop[plpi - LPI] & 1 and plpi not in its.dirty
    settle(its)
    assert its.teardown_done(g.domid)


def test_a_refused_its_assignment_leaves_no_device_behind(setup: tuple[Host, ItsHost]) -> None:
    host, its = setup
    g = Guest(its, host)
    g.queue(*[c.sync(i % 2) for i in range(6)])
    host.destroy_domain(g.domid)  # DeviceID 0x10 is being torn down
    fresh = host.create_domain("hvm", 8)
    with pytest.raises(Exception, match="torn down"):
        host.assign_device(fresh.domid, "00:05.0", its_devid=0x10, its_events=4)
    assert "0000:00:05.0" not in host.devices and not fresh.devices
    settle(its)
    host.assign_device(fresh.domid, "00:05.0", its_devid=0x10, its_events=4)  # the same BDF, now
