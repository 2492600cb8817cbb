"""``xenemu save`` on one daemon, ``xenemu restore`` on another, both over their sockets: the guest
and its device see the same memory, mappings and statuses under a new domid and token, the image
crosses in chunks (it is larger than a frame), both audits are clean, and a bad file is refused
with one line and nothing created."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.conformance.beds import DaemonProcess
from xenemu.abi import pv_iommu as ops
from xenemu.cli import main
from xenemu.client import SyncControlClient, SyncHypercallClient, XenError

BDF = "0000:00:03.0"
#: Pages written with distinct contents: the image (about 4.9 MiB) needs more than one frame.
WRITTEN = 1200


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[tuple[DaemonProcess, DaemonProcess]]:
    a = DaemonProcess(tmp_path / "a", "--frames", "16384", "--dom0-memory", "512")
    b = DaemonProcess(tmp_path / "b", "--frames", "16384", "--dom0-memory", "1024")  # frames laid out otherwise
    yield a, b
    a.stop()
    b.stop()


def xl(daemon: DaemonProcess, *args: str) -> tuple[int, str]:
    result = CliRunner(env={"COLUMNS": "200"}).invoke(main, ["--dir", str(daemon.directory), *args])
    return result.exit_code, result.output


def page(gfn: int) -> bytes:
    return gfn.to_bytes(4, "little") * 1024


BATCH = [ops.map_page(0x1000 + i, i * 3) for i in range(8)] + [ops.unmap_page(40), ops.map_page(0x1000, 1)]
PROBES = [(0x1000 + i, 8) for i in range(8)] + [(40, 4), (41, 4), (0x1001, 4)]


def behaviour(xc: SyncHypercallClient) -> tuple[object, ...]:
    """What the guest and its device see now: a few pages, DMA through the mappings, domain_info."""
    reads = [xc.guest_read(g, 16) for g in (0, 3, 21, WRITTEN - 1, WRITTEN + 5)]
    dma = [(r := xc.device_dma(BDF, bfn << 12, length=n))["ok"] and r["data"] for bfn, n in PROBES]
    info = xc.domain_info()
    return reads, dma, info["pages"], info["devices"], info["type"]


def test_save_on_one_daemon_restore_on_another(daemons: tuple[DaemonProcess, DaemonProcess], tmp_path: Path) -> None:
    a, b = daemons
    with SyncControlClient.connect(a.control_path) as ctl:
        guest = ctl.create_domain("hvm", 2048, name="web")
        ctl.assign_device(guest["domid"], BDF)
    with SyncHypercallClient.connect(a.hypercall_path, guest["token"]) as xc:
        for gfn in range(WRITTEN):
            xc.guest_write(gfn, page(gfn))
        first = ops.statuses(xc.iommu_op(BATCH))
        before = behaviour(xc)
    assert first == ["OK"] * 8 + ["OK", "-EEXIST"]
    file = tmp_path / "web.save"
    code, out = xl(a, "save", str(guest["domid"]), str(file), "--json")
    assert code == 0, out
    assert json.loads(out)["bytes"] == file.stat().st_size > 4 << 20
    assert xl(a, "audit") == (0, "audit clean\n")
    with SyncControlClient.connect(a.control_path) as ctl:
        assert [d["domid"] for d in ctl.list_domains()] == [0]
    code, out = xl(b, "restore", str(file), "--json")
    assert code == 0, out
    restored = json.loads(out)
    assert restored["token"] != guest["token"] and restored["pages"] == 2048
    with SyncHypercallClient.connect(b.hypercall_path, restored["token"]) as xc:
        assert behaviour(xc) == before
        assert ops.statuses(xc.iommu_op(BATCH)) == ["-EEXIST"] * 8 + ["-ENOENT", "-EEXIST"]
    with SyncControlClient.connect(b.control_path) as ctl:
        listed = {d["domid"]: d for d in ctl.list_domains()}
        assert listed[restored["domid"]]["name"] == "web" and listed[restored["domid"]]["mappings"] == 8
        assert ctl.audit() == []
        with pytest.raises(XenError) as info:  # the old token names nothing on either daemon
            SyncHypercallClient.connect(b.hypercall_path, guest["token"]).close()
        assert "EACCES" in str(info.value)
    code, out = xl(b, "restore", str(file))  # its device is taken now: refused, nothing made
    assert code == 1 and "EBUSY" in out and out.count("\n") == 1


def test_bad_files_are_refused_in_one_line_with_nothing_created(
    daemons: tuple[DaemonProcess, DaemonProcess], tmp_path: Path
) -> None:
    a, b = daemons
    with SyncControlClient.connect(a.control_path) as ctl:
        guest = ctl.create_domain("hvm", 64)
        data = ctl.save_image(guest["domid"], keep=True)
        assert [d["domid"] for d in ctl.list_domains()] == [0, guest["domid"]]
    cases = {
        "truncated": data[:-100],
        "corrupt": data[:200] + bytes([data[200] ^ 0x40]) + data[201:],
        "version": data[:8] + (7).to_bytes(4, "little") + data[12:],
        "magic": b"\x7fELF" + data[4:],
    }
    for name, bad in cases.items():
        (tmp_path / name).write_bytes(bad)
    with SyncControlClient.connect(b.control_path) as ctl:
        free = ctl.stats()["free_frames"]
        for name, want in (("truncated", "EBADMSG"), ("corrupt", "EBADMSG"), ("version", "EPROTONOSUPPORT")):
            code, out = xl(b, "restore", str(tmp_path / name))
            assert code == 1 and want in out and out.count("\n") == 1, (name, out)
        code, out = xl(b, "restore", str(tmp_path / "magic"))
        assert code == 1 and "EINVAL" in out and "bad magic" in out
        with pytest.raises(XenError) as info:
            ctl.restore_begin(1 << 40)  # more than this host could hold
        assert info.value.ret == -7
        assert ctl.stats()["free_frames"] == free and [d["domid"] for d in ctl.list_domains()] == [0]
        assert ctl.audit() == []
        copy = ctl.restore_image(data)
        assert copy["pages"] == 64 and ctl.audit() == []
