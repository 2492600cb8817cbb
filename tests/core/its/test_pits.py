"""The physical ITS model and the command codec, stepped by hand."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from xenemu.abi import abi_dir, ffi, lib
from xenemu.abi import its_cmd as c
from xenemu.abi.its_cmd import ItsCommand
from xenemu.core.its.pits import PhysicalIts

LPI = 8192


def pits(slots: int = 16, rate: float = 1000.0) -> PhysicalIts:
    prop = bytearray([0xA0]) * 256
    its = PhysicalIts(0, slots, rate, prop)
    for cpu in range(4):
        its.place(c.mapc(cpu, cpu))
    its.step(4)
    return its


def enable(its: PhysicalIts, lpi: int, on: bool = True) -> None:
    its.prop[lpi - LPI] = 0xA0 | int(on)


def test_commands_round_trip_through_their_blocks() -> None:
    for command in [
        c.mapd(5, 4, 0x12340000),
        c.mapd(5, 0, 0, False),
        c.mapc(3, 2),
        c.mapti(7, 9, 8200, 3),
        c.event_cmd(c.MOVI, 1, 2, 3),
        c.event_cmd(c.INT, 3, 4),
        c.sync(2),
        c.invall(4),
        c.movall(1, 2),
        ItsCommand(c.MAPI, devid=1, eventid=2, icid=3),
    ]:
        assert ItsCommand.decode(command.encode()) == command


@given(block=st.binary(min_size=32, max_size=32))
def test_any_block_decodes(block: bytes) -> None:
    command = ItsCommand.decode(block)
    assert command.cmd == block[0]


def test_fields_sit_where_linux_puts_them() -> None:
    raw = ffi.new("struct its_cmd_block *")
    ffi.memmove(raw, c.mapti(0x1234, 0x56, 0x2001, 0x7).encode(), 32)
    assert raw.raw[0] == 0x0A | 0x1234 << 32 and raw.raw[1] == 0x56 | 0x2001 << 32 and raw.raw[2] == 0x7
    ffi.memmove(raw, c.mapd(9, 4, 0xABCDE00, True).encode(), 32)
    assert raw.raw[1] == 4 and raw.raw[2] == 0xABCDE00 | 1 << 63
    ffi.memmove(raw, c.mapc(2, 3).encode(), 32)
    assert raw.raw[2] == 2 | 3 << 16 | 1 << 63


def test_ring_runs_at_its_rate_and_wraps() -> None:
    its = pits(slots=8, rate=1000.0)
    assert its.free_slots() == 7
    for _ in range(7):
        its.place(c.sync(0))
    with pytest.raises(RuntimeError):
        its.place(c.sync(0))
    assert its.advance(0.0025) == 2  # 2.5 commands' worth of time: two run
    assert its.advance(0.0005) == 1  # the half carried over
    assert its.step(100) == 4 and its.queued() == 0
    its.place(c.sync(0))
    assert its.cwriter == (4 + 8) % 8 and its.step(1) == 1


def test_cache_is_refreshed_only_by_inv_and_invall() -> None:
    its = pits()
    enable(its, LPI + 1)
    its.place(c.mapd(1, 4, 0x10000))
    its.place(c.mapti(1, 0, LPI + 1, 2))
    its.place(c.mapti(1, 1, LPI + 2, 2))
    its.place(c.event_cmd(c.INT, 1, 0))
    its.place(c.event_cmd(c.INT, 1, 1))
    its.step(10)
    assert its.deliverable() == [(2, LPI + 1)]  # LPI+2 is disabled: it stays pending
    enable(its, LPI + 2)
    assert its.deliverable() == [(2, LPI + 1)]  # not seen until invalidated
    its.place(c.event_cmd(c.INV, 1, 1))
    its.step(1)
    assert its.deliverable() == [(2, LPI + 1), (2, LPI + 2)]
    enable(its, LPI + 1, False)
    its.place(c.invall(2))
    its.step(1)
    assert its.deliverable() == [(2, LPI + 2)]
    its.acknowledge(LPI + 2)
    assert its.deliverable() == []


def test_movi_moves_pending_and_discard_forgets() -> None:
    its = pits()
    enable(its, LPI)
    its.place(c.mapd(1, 4, 0x10000))
    its.place(c.mapti(1, 3, LPI, 0))
    its.place(c.event_cmd(c.INT, 1, 3))
    its.place(c.event_cmd(c.MOVI, 1, 3, 3))
    its.step(4)
    assert its.deliverable() == [(3, LPI)]
    its.place(c.event_cmd(c.CLEAR, 1, 3))
    its.step(1)
    assert its.deliverable() == []
    assert its.msi(1, 3) == LPI and its.deliverable() == [(3, LPI)]
    its.place(c.event_cmd(c.DISCARD, 1, 3))
    its.step(1)
    assert its.deliverable() == [] and LPI not in its.cache and its.msi(1, 3) is None
    assert its.dropped_msis == 1


def test_remapping_a_device_drops_its_old_state() -> None:
    its = pits()
    enable(its, LPI)
    its.place(c.mapd(1, 4, 0x10000))
    its.place(c.mapti(1, 0, LPI, 1))
    its.place(c.event_cmd(c.INT, 1, 0))
    its.place(c.mapd(1, 4, 0x20000))
    its.step(4)
    assert its.deliverable() == [] and its.msi(1, 0) is None


def test_hardware_errors_are_counted() -> None:
    its = pits()
    its.place(c.mapti(9, 0, LPI, 0))
    its.place(c.event_cmd(c.INT, 9, 0))
    its.place(c.invall(77))
    its.place(ItsCommand(0x33))
    its.step(4)
    assert dict(its.errors) == {
        "MAPTI_UNMAPPED_DEVICE": 1,
        "INT_UNMAPPED_INTERRUPT": 1,
        "INVALL_UNMAPPED_COLLECTION": 1,
        "UNKNOWN_COMMAND": 1,
    }


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed")
def test_gic_its_header_is_real_c(tmp_path: Path) -> None:
    source = tmp_path / "its.c"
    names = [
        "GITS_CTLR",
        "GITS_CBASER",
        "GITS_CWRITER",
        "GITS_CREADR",
        "GITS_TRANSLATER",
        "GITS_CMD_DISCARD",
        "ITS_CMD_SIZE",
        "E_ITS_MAPD_ITTSIZE_OOR",
        "E_ITS_UNREADABLE",
        "LPI_INTID_BASE",
        "GICR_PENDBASER",
    ]
    body = "".join(f'    printf("%llu\\n", (unsigned long long)({n}));\n' for n in names)
    source.write_text(
        '#include <stdio.h>\n#include "gic_its.h"\nint main(void) {\n'
        '    printf("%zu\\n", sizeof(struct its_cmd_block));\n' + body + "    return 0;\n}\n"
    )
    subprocess.run(
        ["gcc", "-Wall", "-Werror", "-std=c11", "-I", str(abi_dir()), "-o", str(tmp_path / "its"), str(source)],
        check=True,
    )
    printed = subprocess.run([str(tmp_path / "its")], check=True, capture_output=True, text=True).stdout.split()
    assert [int(v) for v in printed] == [ffi.sizeof("struct its_cmd_block")] + [getattr(lib, n) for n in names]
