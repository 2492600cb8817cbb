"""The C client (clients/c), built with make against abi/*.h and run against the daemon."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conformance.beds import DaemonProcess
from xenemu.client import SyncControlClient, SyncHypercallClient

C_DIR = Path(__file__).resolve().parents[2] / "clients" / "c"
pytestmark = pytest.mark.skipif(shutil.which("make") is None or shutil.which("gcc") is None, reason="no C toolchain")


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory) -> Path:
    build = tmp_path_factory.mktemp("cbuild")
    subprocess.run(["make", "-C", str(C_DIR), f"BUILD={build}"], check=True, capture_output=True)
    return build / "xenemu-example"


def test_query_caps_and_batched_map_unmap(example: Path, tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path, "--frames", "8192", "--dom0-memory", "512")
    try:
        with SyncControlClient.connect(daemon.control_path) as ctl:
            guest = ctl.create_domain("hvm", 256)
            ctl.assign_device(guest["domid"], "00:03.0")
            run = subprocess.run(
                [str(example), str(daemon.hypercall_path), guest["token"], "map", "256"],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert run.returncode == 0, run.stdout + run.stderr
            assert f"connected as d{guest['domid']}" in run.stdout
            assert "map_cap=1 order=18" in run.stdout
            assert "map_page x256: rc=0 failed=0" in run.stdout and "unmap_page x256: rc=0 failed=0" in run.stdout
            flushes = next(d for d in ctl.list_domains() if d["domid"] == guest["domid"])["flushes"]
            assert flushes == {"added": 1, "modified": 1}
            assert ctl.audit() == []
            bad = subprocess.run(
                [str(example), str(daemon.hypercall_path), "f" * 32, "map"], capture_output=True, text=True, timeout=60
            )
            assert bad.returncode == 1 and "bad token" in bad.stderr
    finally:
        daemon.stop()


def test_emulator_reads_pushed_invalidates(example: Path, tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path, "--frames", "8192", "--dom0-memory", "512")
    pages = 520  # more than the 511-slot ring: the last ones arrive as synchronous requests
    try:
        with SyncControlClient.connect(daemon.control_path) as ctl:
            guest = ctl.create_domain("hvm", 600)
            dm = ctl.create_domain("pv", 16, target=guest["domid"])
            ctl.assign_device(dm["domid"], "00:05.0")
            proc = subprocess.Popen(
                [str(example), str(daemon.hypercall_path), dm["token"], "emulate", str(guest["domid"]), str(pages)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            assert proc.stdout is not None
            lines = [proc.stdout.readline(), proc.stdout.readline()]
            assert lines[1].startswith("READY"), lines
            with SyncHypercallClient.connect(daemon.hypercall_path, guest["token"]) as xc:
                done = xc.decrease_reservation(list(range(pages)))
            assert done["ret"] == pages and done["waited"] == pages - 511
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, out + err
            assert out.count("INVALIDATE") == pages and f"DONE invalidated={pages} failed=0 destroy=0" in out
            assert ctl.stats()["m2b_entries"] == 0
            assert ctl.audit() == []
    finally:
        daemon.stop()
