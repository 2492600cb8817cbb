"""What a guest sees in its ITS and redistributor registers (registers.py)."""

from __future__ import annotations

from tests.core.its.guest import CBASER, Guest
from xenemu.core.host import Host
from xenemu.core.its import ItsHost


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


# -- fixed fields, as kvm-unit-tests' its_baser_lookup and Linux's its_alloc_tables read them -------
def test_baser_type_entry_size_and_page_size_are_fixed(setup: tuple[Host, ItsHost]) -> None:
    host, its = setup
    g = Guest(its, host)
    its.mmio_write(g.domid, 0, 0x0, 4, 0)  # BASERs are writable while the vITS is disabled
    # Linux tries 64 KiB, then 16 KiB, then 4 KiB pages: whatever it writes, Page_Size reads 64 KiB
    for page_size in (0, 1, 2, 3):
        its.mmio_write(g.domid, 0, 0x100, 8, 1 << 63 | 0x50000 | page_size << 8)
        value = its.mmio_read(g.domid, 0, 0x100, 8)
        assert value >> 8 & 3 == 2, f"Page_Size {page_size} written"
        assert value >> 56 & 7 == 1 and value >> 48 & 0x1F == 7  # Type device, 8-byte entries
        assert value & 0x0000_FFFF_FFFF_F000 == 0x50000 and value >> 63  # address bits 47:12
    its.mmio_write(g.domid, 0, 0x108, 8, 1 << 63 | 1 << 62 | 7 << 56 | 0x1F << 48 | 0x60000)
    value = its.mmio_read(g.domid, 0, 0x108, 8)
    assert value == 1 << 63 | 4 << 56 | 7 << 48 | 0x60000 | 2 << 8  # Type collection; Indirect RAZ
    its.mmio_write(g.domid, 0, 0x10C, 4, 0)  # a 32-bit write of the high half: Type stays
    assert its.mmio_read(g.domid, 0, 0x10C, 4) == (4 << 56 | 7 << 48) >> 32
    # kvm-unit-tests reads BASER, ORs in its table and Valid, and writes it back: it reads the same
    read = its.mmio_read(g.domid, 0, 0x100, 8)
    its.mmio_write(g.domid, 0, 0x100, 8, read | 0x70000 | 1 << 63)
    assert its.mmio_read(g.domid, 0, 0x100, 8) == read | 0x70000 | 1 << 63


def test_cbaser_clears_address_bits_15_to_12(setup: tuple[Host, ItsHost]) -> None:
    host, its = setup
    g = Guest(its, host)
    its.mmio_write(g.domid, 0, 0x0, 4, 0)
    its.mmio_write(g.domid, 0, 0x80, 8, 1 << 63 | 0x1A000 | 3)
    assert its.mmio_read(g.domid, 0, 0x80, 8) == 1 << 63 | 0x10000 | 3
    its.mmio_write(g.domid, 0, 0x80, 4, 0x2F00F)  # the low half alone: still 64 KiB aligned
    assert its.mmio_read(g.domid, 0, 0x80, 8) == 1 << 63 | 0x20000 | 0xF


ID_REGISTERS = {0xFFD0: 0x40, 0xFFE0: 0x92, 0xFFE4: 0xB4, 0xFFE8: 0x3B, 0xFFEC: 0, 0xFFF0: 0x0D, 0xFFF4: 0xF0}
ID_REGISTERS |= {0xFFF8: 0x05, 0xFFFC: 0xB1}


def test_id_registers_read_kvms_values(setup: tuple[Host, ItsHost]) -> None:
    host, its = setup
    g = Guest(its, host)
    for offset, value in ID_REGISTERS.items():
        assert its.mmio_read(g.domid, 0, offset, 4) == value, hex(offset)
        its.mmio_write(g.domid, 0, offset, 4, 0xFF)  # read-only
        assert its.mmio_read(g.domid, 0, offset, 4) == value
    assert its.mmio_read(g.domid, 0, 0xFFE0, 8) == 0  # 32-bit registers: other widths read 0
    assert its.mmio_read(g.domid, 0, 0xFFD4, 4) == 0  # PIDR5..7 are reserved: RAZ
