"""A dying domain: drained, torn down, freed; its devices assignable only then (teardown.py)."""

from __future__ import annotations

import pytest

from tests.core.its.guest import LPI, Guest, bring_up, settle
from xenemu.abi import its_cmd as c
from xenemu.core.host import Host
from xenemu.core.its import ItsHost


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
