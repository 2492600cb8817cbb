"""``xenemu save --with-dm`` on one daemon, ``xenemu restore`` on another, both over their sockets:
the guest arrives with its device-model domain, whose IOREQ servers serve the new guest under
the ids this daemon gave them; the mediated emulator (clients/mediated_emulator.py) reconnects
with the new token and ``--ioserver``, finds its mappings kept (its maps are answered as
identical), reads the guest's restored memory by DMA through them, and is told what the guest
balloons out. Both audits are clean, and nothing is left once the emulator goes."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.conformance.beds import DaemonProcess
from xenemu.abi import pv_iommu as ops
from xenemu.cli import main
from xenemu.client import SyncControlClient, SyncHypercallClient

GUEST_BDF, DM_BDF = "0000:00:03.0", "0000:00:05.0"
BASE = 0x80000  # the mediated emulator's default --bfn-base
PAGES = 64
CLIENTS = Path(__file__).resolve().parents[2] / "clients"


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[tuple[DaemonProcess, DaemonProcess]]:
    a = DaemonProcess(tmp_path / "a", "--frames", "8192", "--dom0-memory", "512")
    b = DaemonProcess(tmp_path / "b", "--frames", "8192", "--dom0-memory", "1024")  # frames laid out otherwise
    yield a, b
    a.stop()
    b.stop()


def xl(daemon: DaemonProcess, *args: str) -> tuple[int, str]:
    result = CliRunner(env={"COLUMNS": "200"}).invoke(main, ["--dir", str(daemon.directory), *args])
    return result.exit_code, result.output


def page(gfn: int) -> bytes:
    return (gfn + 7).to_bytes(4, "little") * 1024


def wait_for(what: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not what():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_guest_and_its_emulator_move_together(daemons: tuple[DaemonProcess, DaemonProcess], tmp_path: Path) -> None:
    a, b = daemons
    with SyncControlClient.connect(a.control_path) as ctl:
        guest = ctl.create_domain("hvm", 256, name="web")
        ctl.assign_device(guest["domid"], GUEST_BDF)
        model = ctl.create_domain("hvm", 16, target=guest["domid"], name="web-dm")
        ctl.assign_device(model["domid"], DM_BDF)
    with SyncHypercallClient.connect(a.hypercall_path, guest["token"]) as xg:
        for gfn in range(PAGES):
            xg.guest_write(gfn, page(gfn))
    file = tmp_path / "web.save"
    # The emulator stays connected through the save, as a device model is suspended, not closed.
    with SyncHypercallClient.connect(a.hypercall_path, model["token"]) as xe:
        old = xe.create_ioreq_server(guest["domid"])
        got = xe.iommu_op([ops.map_foreign_page(BASE + g, g, guest["domid"], old) for g in range(PAGES)])
        assert ops.statuses(got) == ["OK"] * PAGES
        code, out = xl(a, "save", str(guest["domid"]), str(file), "--with-dm", "--json")
        assert code == 0, out
        assert json.loads(out)["device_models"] == 1
    assert xl(a, "audit") == (0, "audit clean\n")
    with SyncControlClient.connect(a.control_path) as ctl:
        assert [d["domid"] for d in ctl.list_domains()] == [0]
        assert ctl.stats()["ioreq_servers"] == 0

    with SyncControlClient.connect(b.control_path) as ctl:
        other = ctl.create_domain("hvm", 8)  # this daemon has given out server ids already
        with SyncHypercallClient.connect(b.hypercall_path, ctl.domain_token(0)) as x0:
            x0.create_ioreq_server(other["domid"])  # (released when this connection closes)
    code, out = xl(b, "restore", str(file), "--json")
    assert code == 0, out
    restored = json.loads(out)
    (dm,) = restored["device_models"]
    ((was, new),) = dm["servers"]
    assert was == old and new != old and dm["token"] != model["token"]
    with SyncControlClient.connect(b.control_path) as ctl:
        listed = {d["domid"]: d for d in ctl.list_domains()}
        assert listed[dm["domid"]]["name"] == "web-dm" and listed[restored["domid"]]["name"] == "web"
        assert ctl.stats()["m2b_entries"] == PAGES and ctl.audit() == []
    sock = str(b.hypercall_path)
    with SyncHypercallClient.connect(sock, dm["token"]) as xe:  # held until the emulator is back
        assert xe.domain_info()["target"] == restored["domid"]
        for g in (0, 17, PAGES - 1):
            dma = xe.device_dma(DM_BDF, (BASE + g) << 12, length=4096)
            assert dma["ok"] and dma["data"] == page(g)
        emulator = subprocess.Popen(
            [
                sys.executable,
                str(CLIENTS / "mediated_emulator.py"),
                "--socket",
                sock,
                "--token",
                dm["token"],
                "--guest",
                str(restored["domid"]),
                "--gfns",
                f"0:{PAGES}",
                "--ioserver",
                str(new),
                "--until-stdin-closes",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert emulator.stdout is not None
        ready = json.loads(emulator.stdout.readline())
    assert ready == {"ready": True, "ioserver": new, "map_cap": True, "mapped": PAGES}
    with SyncControlClient.connect(b.control_path) as ctl:
        assert ctl.stats()["m2b_entries"] == PAGES  # its maps were answered by the kept mappings
        with SyncHypercallClient.connect(sock, restored["token"]) as xg:
            assert xg.guest_read(5, 8) == page(5)[:8]
            gone = xg.decrease_reservation([5, 6])
            assert (gone["ret"], gone["status"]) == (2, 0)
        wait_for(lambda: ctl.stats()["m2b_entries"] == PAGES - 2)  # told, it unmapped them
        time.sleep(0.3)  # its device reads a few pages meanwhile
        out, err = emulator.communicate(timeout=60)  # stdin closed: it unmaps, destroys its server
        assert emulator.returncode == 0, err
        summary = json.loads(out.strip().splitlines()[-1])
        assert summary["ok"] and summary["buffered_invalidates"] == 2 and summary["dma_ok"] > 0
        assert summary["dma_faults"] == 0 and summary["still_mapped"] == 0
        stats = ctl.stats()
        assert stats["m2b_entries"] == 0 and stats["ioreq_servers"] == 0
        assert ctl.audit() == []


def test_refusals_over_the_wire_are_one_line_and_leave_nothing(
    daemons: tuple[DaemonProcess, DaemonProcess], tmp_path: Path
) -> None:
    a, b = daemons
    with SyncControlClient.connect(a.control_path) as ctl:
        alone = ctl.create_domain("hvm", 16)
        guest = ctl.create_domain("hvm", 32)
        ctl.assign_device(guest["domid"], GUEST_BDF)
        model = ctl.create_domain("hvm", 16, target=guest["domid"])
        ctl.assign_device(model["domid"], DM_BDF)
    code, out = xl(a, "save", str(alone["domid"]), str(tmp_path / "x"), "--with-dm")
    assert code == 1 and "EINVAL" in out and "no device-model domain" in out and out.count("\n") == 1
    assert not (tmp_path / "x").exists()
    file = tmp_path / "pair.save"
    code, out = xl(a, "save", str(guest["domid"]), str(file), "--with-dm", "-c")
    assert code == 0 and "with 1 device model" in out, out
    data = file.read_bytes()
    corrupt = tmp_path / "corrupt.save"
    corrupt.write_bytes(data[:-40] + bytes([data[-40] ^ 1]) + data[-39:])  # in the device model's image
    with SyncControlClient.connect(b.control_path) as ctl:
        free = ctl.stats()["free_frames"]
        code, out = xl(b, "restore", str(corrupt))
        assert code == 1 and "EBADMSG" in out and out.count("\n") == 1, out
        assert ctl.stats()["free_frames"] == free and [d["domid"] for d in ctl.list_domains()] == [0]
        code, out = xl(b, "restore", str(file))
        assert code == 0 and out.count("\n") == 2 and "IOREQ servers none" in out.splitlines()[1], out
        assert ctl.audit() == []
    assert xl(a, "audit") == (0, "audit clean\n")
