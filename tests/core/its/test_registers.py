"""What a guest sees in its ITS and redistributor registers (registers.py)."""

from __future__ import annotations

from tests.core.its.guest import CBASER, LPI, Guest, bring_up, settle
from xenemu.core.host import Host
from xenemu.core.its import Delivery, ItsHost


def test_cwriter_rules(setup: tuple[Host, ItsHost]) -> None:
    host, its = setup
    g = Guest(its, host)
    its.mmio_write(g.domid, 0, 0x88, 8, 4096)  # at the queue size: ignored
    assert its.mmio_read(g.domid, 0, 0x88, 8) == 0
    its.mmio_write(g.domid, 0, 0x88, 4, 0x41)  # 32-bit access, masked to bits 19:5
    assert its.mmio_read(g.domid, 0, 0x88, 4) == 0x40
    assert its.mmio_read(g.domid, 0, 0x8C, 4) == 0
    its.mmio_write(g.domid, 0, 0x90, 8, 0x20)  # CREADR is read-only
    its.mmio_write(g.domid, 0, 0x80, 8, 0)  # CBASER is fixed while enabled
    assert its.mmio_read(g.domid, 0, 0x80, 8) == CBASER
    assert its.mmio_read(g.domid, 0, 0x4, 4) == 0x5800043B and its.mmio_read(g.domid, 0, 0xFFE8, 4) == 0x3B
    assert its.mmio_read(g.domid, 0, 0x3, 1) == 0 and its.mmio_read(g.domid, 0, 0x200, 8) == 0


PEND_GFN = 40


def test_pending_table_is_read_when_lpis_are_enabled(setup: tuple[Host, ItsHost]) -> None:
    host, its = setup
    g = Guest(its, host)
    bring_up(g, events=2)
    settle(its)
    its.redist_write(g.domid, 0, 0x0, 4, 0)
    vlpi = LPI + 33
    host.memory.access(g.domid, PEND_GFN, vlpi // 8, bytes([1 << (vlpi % 8)]))
    its.redist_write(g.domid, 0, 0x78, 8, PEND_GFN << 12)  # PTZ = 0: the table is read
    its.redist_write(g.domid, 0, 0x0, 4, 1)
    assert its.deliveries[-1] == Delivery(g.domid, 0, vlpi)
    assert its.redist_read(g.domid, 0, 0x78, 8) == PEND_GFN << 12  # PTZ reads as 0
    its.end(g.domid, 0, vlpi)
    its.redist_write(g.domid, 0, 0x0, 4, 0)
    its.redist_write(g.domid, 0, 0x78, 8, PEND_GFN << 12 | 1 << 62)  # PTZ = 1: not read
    count = len(its.deliveries)
    its.redist_write(g.domid, 0, 0x0, 4, 1)
    assert len(its.deliveries) == count
