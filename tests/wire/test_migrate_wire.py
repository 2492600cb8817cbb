"""``xenemu migrate`` between two real daemons while the guest writes its memory and its device
writes by DMA, over their sockets: every acknowledged write is on the receiver, the guest
reconnects there with its own token, the stop is refused for nothing, and both audits are clean."""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.conformance.beds import DaemonProcess
from xenemu.abi import pv_iommu as ops
from xenemu.cli import main
from xenemu.client import ConnectionLost, SyncControlClient, SyncHypercallClient, XenError

BDF = "0000:00:03.0"
PAGES = 4096


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


class Guest(threading.Thread):
    """The guest's CPU and its device writing until its domain leaves the source: each write
    carries a sequence number; ``acked`` holds what the source said it did."""

    def __init__(self, path: Path, token: str) -> None:
        super().__init__(daemon=True)
        self.path, self.token = path, token
        self.acked: dict[int, int] = {}  # GFN -> the last sequence number written there
        self.busy = self.writes = 0
        self.gone = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        rng = random.Random(7)
        seq = 0
        try:
            with SyncHypercallClient.connect(self.path, self.token) as xc:
                while True:
                    seq += 1
                    gfn = rng.randrange(PAGES)
                    data = seq.to_bytes(8, "little")
                    try:
                        if seq % 2:
                            xc.guest_write(gfn, data)
                        else:  # through the device's map_page entry at BFN 0x10000 + GFN
                            assert xc.device_dma(BDF, (0x10000 + gfn) << 12, data)["ok"]
                    except XenError as exc:
                        if exc.errno == 16:  # stopped for the last section: not done, try again
                            self.busy += 1
                            time.sleep(0.001)
                            continue
                        if exc.errno == 3:  # the domain left: this write was not done
                            break
                        raise
                    self.acked[gfn] = seq
                    self.writes += 1
                    time.sleep(0.0005)
        except ConnectionLost:
            pass
        except BaseException as exc:
            self.error = exc
        self.gone.set()


def test_migrate_while_the_guest_and_its_device_write(daemons: tuple[DaemonProcess, DaemonProcess]) -> None:
    a, b = daemons
    with SyncControlClient.connect(a.control_path) as ctl:
        guest = ctl.create_domain("hvm", PAGES, name="web")
        ctl.assign_device(guest["domid"], BDF)
    with SyncHypercallClient.connect(a.hypercall_path, guest["token"]) as xc:
        for at in range(0, PAGES, 512):
            got = xc.iommu_op([ops.map_page(0x10000 + g, g) for g in range(at, at + 512)])
            assert ops.statuses(got) == ["OK"] * 512
        for gfn in range(0, PAGES, 3):
            xc.guest_write(gfn, b"\xee" * 4096)
    writer = Guest(a.hypercall_path, guest["token"])
    writer.start()
    time.sleep(0.2)
    code, out = xl(a, "migrate", str(guest["domid"]), "--to", str(b.directory), "--json")
    assert code == 0, out
    report = json.loads(out)
    assert writer.gone.wait(10) and writer.error is None, writer.error
    assert writer.writes > 50
    assert report["rounds"] >= 2 and report["pages"] == PAGES
    assert PAGES <= report["pages_sent"] <= 2 * PAGES and report["downtime_ms"] > 0
    with SyncControlClient.connect(a.control_path) as ctl:
        assert [d["domid"] for d in ctl.list_domains()] == [0]
    with SyncHypercallClient.connect(b.hypercall_path, guest["token"]) as xc:  # the same token works there
        info = xc.domain_info()
        assert info["domid"] == report["new_domid"] and info["pages"] == PAGES
        lost = [g for g, seq in writer.acked.items() if xc.guest_read(g, 8) != seq.to_bytes(8, "little")]
        assert not lost, f"{len(lost)} acknowledged writes lost, e.g. GFN {lost[0]}"
        assert xc.guest_read(3, 4) == b"\xee" * 4 or 3 in writer.acked
        assert xc.device_dma(BDF, (0x10000 + 6) << 12, length=4)["ok"]  # its mappings came along
        xc.guest_write(1, b"runs on")
    assert xl(a, "audit") == (0, "audit clean\n")
    assert xl(b, "audit") == (0, "audit clean\n")


def test_a_refused_migration_leaves_the_domain_running(daemons: tuple[DaemonProcess, DaemonProcess]) -> None:
    """A receiver too small refuses at the first section: nothing is left there, and the domain
    runs on at the source with its token."""
    a, b = daemons
    with SyncControlClient.connect(a.control_path) as ctl:
        guest = ctl.create_domain("hvm", 15800, name="big")
    code, out = xl(a, "migrate", str(guest["domid"]), "--to", str(b.directory))
    assert code == 1 and "host too small" in out and "runs on at the source" in out and len(out.splitlines()) == 1
    with SyncHypercallClient.connect(a.hypercall_path, guest["token"]) as xc:
        xc.guest_write(1, b"still here")
    with SyncControlClient.connect(b.control_path) as ctl:
        assert [d["domid"] for d in ctl.list_domains()] == [0]
    assert xl(a, "audit") == (0, "audit clean\n")
    assert xl(b, "audit") == (0, "audit clean\n")


def test_migrate_with_its_device_model(daemons: tuple[DaemonProcess, DaemonProcess]) -> None:
    """``xenemu migrate --with-dm``: the emulator's domain goes with its guest; on the receiver it
    speaks with its own token, its IOREQ server serves the new guest under the id reported, and
    its mappings read what the guest wrote during the pre-copy."""
    a, b = daemons
    dm_bdf, base = "0000:00:05.0", 0x80000
    with SyncControlClient.connect(a.control_path) as ctl:
        guest = ctl.create_domain("hvm", 512, name="web")
        model = ctl.create_domain("hvm", 16, target=guest["domid"], name="web-dm")
        ctl.assign_device(model["domid"], dm_bdf)
    with SyncHypercallClient.connect(a.hypercall_path, model["token"]) as xe:
        old = xe.create_ioreq_server(guest["domid"])
        got = xe.iommu_op([ops.map_foreign_page(base + g, g, guest["domid"], old) for g in range(32)])
        assert ops.statuses(got) == ["OK"] * 32
        with SyncHypercallClient.connect(a.hypercall_path, guest["token"]) as xg:
            for gfn in range(32):
                xg.guest_write(gfn, gfn.to_bytes(2, "little") * 2048)
        code, out = xl(a, "migrate", str(guest["domid"]), "--to", str(b.directory), "--with-dm", "--json")
    assert code == 0, out
    report = json.loads(out)
    (moved,) = report["device_models"]
    (ids,) = moved["servers"]
    assert ids[0] == old
    with SyncControlClient.connect(a.control_path) as ctl:
        assert [d["domid"] for d in ctl.list_domains()] == [0] and ctl.stats()["ioreq_servers"] == 0
    with SyncHypercallClient.connect(b.hypercall_path, model["token"]) as xe:
        assert xe.domain_info()["domid"] == moved["domid"]
        for gfn in (0, 7, 31):
            got = xe.device_dma(dm_bdf, (base + gfn) << 12, length=4)
            assert got["ok"] and got["data"] == gfn.to_bytes(2, "little") * 2
        assert xe.iommu_op([ops.unmap_foreign_page(base + 3, ids[1])])[0].status_name == "OK"
    assert xl(a, "audit") == (0, "audit clean\n")
    assert xl(b, "audit") == (0, "audit clean\n")
