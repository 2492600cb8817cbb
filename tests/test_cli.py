"""The command line, against a real daemon: xl-style verbs, JSON output, the demo."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.conformance.beds import DaemonProcess
from xenemu.cli import main
from xenemu.client import SyncControlClient


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    proc = DaemonProcess(tmp_path, "--frames", "16384", "--dom0-memory", "512", "--fault-injection")
    yield proc
    proc.stop()


def xl(daemon: DaemonProcess, *args: str) -> tuple[int, str]:
    result = CliRunner(env={"COLUMNS": "200"}).invoke(main, ["--dir", str(daemon.directory), *args])
    return result.exit_code, result.output


def test_toolstack_verbs(daemon: DaemonProcess) -> None:
    code, out = xl(daemon, "create", "--type", "hvm", "--memory", "64", "--name", "web", "--json")
    assert code == 0
    created = json.loads(out)
    domid = created["domid"]
    assert len(created["token"]) == 32
    assert xl(daemon, "token", str(domid)) == (0, created["token"] + "\n")
    assert xl(daemon, "pci-attach", str(domid), "00:03.0", "--rmrr", "0x10000:2")[0] == 0
    code, out = xl(daemon, "list", "--json")
    listed = {d["domid"]: d for d in json.loads(out)}
    assert listed[domid]["devices"] == ["0000:00:03.0"] and listed[domid]["map_cap"]
    code, out = xl(daemon, "list")
    assert code == 0 and "web" in out and "Domain-0" in out
    code, out = xl(daemon, "mappings", str(domid), "--start", "0x0", "--limit", "3", "--json")
    assert [row["kind"] for row in json.loads(out)] == ["default"] * 3
    code, out = xl(daemon, "mappings", str(domid), "--start", str(0x10000), "--limit", "2")
    assert code == 0 and "rmrr" in out
    assert xl(daemon, "audit") == (0, "audit clean\n")
    code, out = xl(daemon, "stats", "--json")
    assert json.loads(out)["domains"] == 2
    code, out = xl(daemon, "info", "--json")
    assert json.loads(out)["nr_frames"] == 16384
    assert xl(daemon, "inject-fault", str(domid), "0x20")[0] == 0
    assert xl(daemon, "destroy", str(domid))[0] == 0


def test_errors_are_reported_not_raised(daemon: DaemonProcess) -> None:
    code, out = xl(daemon, "destroy", "0")
    assert code == 1 and "EPERM" in out
    code, out = xl(daemon, "pci-attach", "77", "00:03.0")
    assert code == 1 and "ESRCH" in out
    code, out = xl(daemon, "pci-attach", "0", "00:03.0", "--rmrr", "zz")
    assert code == 2


def test_no_daemon(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["--dir", str(tmp_path), "list"])
    assert result.exit_code == 1 and "no xenemu daemon" in result.output


def test_guest_program_against_the_daemon(daemon: DaemonProcess) -> None:
    _code, out = xl(daemon, "create", "--type", "hvm", "--memory", "300", "--json")
    guest = json.loads(out)
    xl(daemon, "pci-attach", str(guest["domid"]), "00:04.0")
    program = Path(__file__).resolve().parent.parent / "clients" / "pv_iommu_guest.py"
    run = subprocess.run(
        [
            sys.executable,
            str(program),
            "--socket",
            str(daemon.hypercall_path),
            "--token",
            guest["token"],
            "--json",
            "--batch",
            "64",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    summary = json.loads(run.stdout)
    assert run.returncode == 0, run.stderr
    assert summary["ok"] and summary["pages"] == 300 and summary["dma_mismatches"] == 0
    assert summary["faults_after_unmap"]
    assert xl(daemon, "audit")[0] == 0


def test_guest_program_without_a_device_fails(daemon: DaemonProcess) -> None:
    _code, out = xl(daemon, "create", "--type", "hvm", "--memory", "8", "--json")
    program = Path(__file__).resolve().parent.parent / "clients" / "pv_iommu_guest.py"
    run = subprocess.run(
        [
            sys.executable,
            str(program),
            "--socket",
            str(daemon.hypercall_path),
            "--token",
            json.loads(out)["token"],
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 1 and not json.loads(run.stdout)["map_cap"]


def test_demo() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "xenemu", "demo", "--memory", "256"], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "guest: all checks passed" in run.stdout and "audit clean" in run.stdout


def test_its_verbs(tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path, "--its-cpus", "2", "--its-elision", "eager", "--its-pits", "2")
    try:
        code, out = xl(daemon, "create", "--json")
        domid = json.loads(out)["domid"]
        with SyncControlClient.connect(daemon.control_path) as ctl:
            ctl.assign_device(domid, "00:03.0", its_devid=7, its_events=4, pits=1)
        code, out = xl(daemon, "its", "--json")
        stats = json.loads(out)
        assert stats["options"]["elision"] == "eager" and len(stats["pits"]) == 2
        code, out = xl(daemon, "its")
        assert code == 0 and "MAPC=3" in out
        code, out = xl(daemon, "its", str(domid))
        assert code == 0 and "DeviceID 0x7 -> virtual 0" in out
    finally:
        daemon.stop()
