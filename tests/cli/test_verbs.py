"""Each toolstack verb against a real daemon: xl's columns and units, names for domids, config
files, vCPUs and pinning, MSI-capable devices, mem-set, info, dmesg, --json everywhere."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.cli.kit import daemon, xl
from tests.conformance.beds import DaemonProcess
from xenemu.client import SyncControlClient

__all__ = ["daemon"]

CLIENTS = Path(__file__).resolve().parents[2] / "clients"


def test_toolstack_verbs(daemon: DaemonProcess) -> None:
    run = xl(daemon, "create", "--type", "hvm", "--frames", "64", "--name", "web", "--json")
    assert run.code == 0, run.err
    created = json.loads(run.out)
    domid = created["domid"]
    assert len(created["token"]) == 32 and created["name"] == "web"
    assert xl(daemon, "token", str(domid)).out == created["token"] + "\n"
    assert xl(daemon, "token", "web").out == created["token"] + "\n"
    attach = xl(daemon, "pci-attach", "web", "00:03.0", "--rmrr", "0x10000:2", "--json")
    assert attach.code == 0 and json.loads(attach.out) == {"domid": domid, "bdf": "0000:00:03.0"}
    listed = {d["domid"]: d for d in json.loads(xl(daemon, "list", "--json").out)}
    assert listed[domid]["devices"] == ["0000:00:03.0"] and listed[domid]["map_cap"]
    rows = json.loads(xl(daemon, "mappings", "web", "--start", "0x0", "--limit", "3", "--json").out)
    assert [row["kind"] for row in rows] == ["default"] * 3
    run = xl(daemon, "mappings", str(domid), "--start", str(0x10000), "--limit", "2")
    assert run.code == 0 and "rmrr" in run.out
    assert xl(daemon, "audit").out == "audit clean\n"
    assert json.loads(xl(daemon, "stats", "--json").out)["domains"] == 2
    assert xl(daemon, "inject-fault", "web", "0x20").code == 0
    run = xl(daemon, "destroy", "web", "--json")
    assert run.code == 0 and json.loads(run.out) == {"domid": domid, "destroyed": True}
    assert [d["domid"] for d in json.loads(xl(daemon, "list", "--json").out)] == [0]


def test_list_has_xls_columns_first_and_xenemus_behind_long(daemon: DaemonProcess) -> None:
    xl(daemon, "create", "--memory", "8", "--vcpus", "3", "--name", "web", "--pci", "00:04.0")
    lines = xl(daemon, "list").out.splitlines()
    assert lines[0].split() == ["Name", "ID", "Mem", "VCPUs", "State", "Time(s)"]
    name, domid, mem, vcpus, state, seconds = lines[2].split()
    assert (name, domid, mem, vcpus, state) == ("web", "1", "8", "3", "-b----")
    assert float(seconds) >= 0
    assert lines[1].split()[:3] == ["Domain-0", "0", "2"]  # 512 frames are 2 MiB
    long_ = xl(daemon, "list", "--long", "web").out.splitlines()
    assert long_[0].split()[:8] == ["Name", "ID", "Mem", "VCPUs", "State", "Time(s)", "Type", "Target"]
    assert len(long_) == 2 and "0000:00:04.0" in long_[1].split()


def test_memory_is_mib_and_frames_stay_available(daemon: DaemonProcess) -> None:
    assert "MiB" in xl(daemon, "create", "--help").out
    a = json.loads(xl(daemon, "create", "--memory", "3", "--json").out)["domid"]
    b = json.loads(xl(daemon, "create", "--frames", "100", "--json").out)["domid"]
    c = json.loads(xl(daemon, "create", "--memory", "512k", "--maxmem", "2", "--json").out)["domid"]
    pages = {d["domid"]: (d["pages"], d["max_pages"]) for d in json.loads(xl(daemon, "list", "--json").out)}
    assert pages[a] == (768, 768) and pages[b] == (100, 100) and pages[c] == (128, 512)
    assert xl(daemon, "create", "--memory", "1", "--frames", "3").code == 2


def test_mem_set_sets_max_pages(daemon: DaemonProcess) -> None:
    xl(daemon, "create", "--memory", "1", "--name", "g")
    assert xl(daemon, "mem-set", "g", "6").code == 0
    (g,) = [d for d in json.loads(xl(daemon, "list", "--json").out) if d["name"] == "g"]
    assert g["max_pages"] == 6 * 256
    run = xl(daemon, "mem-set", "1", "16384k", "--json")
    assert json.loads(run.out) == {"domid": 1, "max_pages": 4096}
    run = xl(daemon, "mem-set", "g", "1g")  # more than the host has
    assert run.code == 1 and "EINVAL" in run.err and len(run.err.splitlines()) == 1
    assert xl(daemon, "mem-set", "g", "0").code == 2
    assert xl(daemon, "mem-set", "nobody", "4").code == 1


def test_create_from_an_xl_config_file(daemon: DaemonProcess, tmp_path: Path) -> None:
    config = tmp_path / "guest.cfg"
    config.write_text(
        "# as xl writes them\n"
        'name = "guest-a"\n'
        "type = 'hvm'\n"
        "memory = 8; maxmem = 16\n"
        "vcpus = 2\n"
        'cpus = ["3", "1"]\n'
        'pci = [ "00:03.0,its_devid=0x40,its_events=4,pits=0",\n'
        '        "0000:00:04.0,rmrr=0x10000:2,permissive=1", ]\n'
        "disk = ['phy:/dev/vg/guest,xvda,w']\n"
    )
    run = xl(daemon, "create", str(config), "--json")
    assert run.code == 0, run.err
    created = json.loads(run.out)
    assert created["devices"] == [{"bdf": "0000:00:03.0", "vdevid": 0}, {"bdf": "0000:00:04.0"}]
    assert "ignoring 'disk'" in run.err
    (dom,) = [d for d in json.loads(xl(daemon, "list", "--json").out) if d["name"] == "guest-a"]
    assert (dom["pages"], dom["max_pages"], dom["vcpus"], dom["pin"]) == (2048, 4096, 2, [3, 1])
    assert dom["devices"] == ["0000:00:03.0", "0000:00:04.0"]
    rows = json.loads(xl(daemon, "mappings", "guest-a", "--start", "0x10000", "--limit", "2", "--json").out)
    assert [r["kind"] for r in rows] == ["rmrr", "rmrr"]
    its = json.loads(xl(daemon, "its", "guest-a", "--json").out)
    assert [(d["devid"], d["events"]) for d in its["devices"]] == [(0x40, 4)]
    # options override the file; a device that cannot be assigned leaves no domain behind
    run = xl(daemon, "create", str(config), "--name", "other")
    assert run.code == 1 and "EBUSY" in run.err
    assert "other" not in xl(daemon, "list").out


def test_device_model_target_by_name(daemon: DaemonProcess, tmp_path: Path) -> None:
    xl(daemon, "create", "--name", "guest")
    config = tmp_path / "dm.cfg"
    config.write_text('name = "dm"\ntarget = "guest"\nmemory = 1\n')
    assert xl(daemon, "create", str(config)).code == 0
    by_name = {d["name"]: d for d in json.loads(xl(daemon, "list", "--json").out)}
    assert by_name["dm"]["target"] == by_name["guest"]["domid"]
    assert "dm" in xl(daemon, "list", "--long").out


def test_vcpus_pin_and_msi_devices_from_the_cli(daemon: DaemonProcess) -> None:
    run = xl(daemon, "create", "--vcpus", "4", "--pin", "3,2,1,0", "--json")
    domid = json.loads(run.out)["domid"]
    run = xl(daemon, "pci-attach", str(domid), "00:05.0", "--its-devid", "7", "--its-events", "8", "--json")
    assert run.code == 0 and json.loads(run.out) == {"domid": domid, "bdf": "0000:00:05.0", "vdevid": 0}
    (dom,) = [d for d in json.loads(xl(daemon, "list", "--json").out) if d["domid"] == domid]
    assert dom["vcpus"] == 4 and dom["pin"] == [3, 2, 1, 0]
    vcpus = json.loads(xl(daemon, "vcpu-list", str(domid), "--json").out)
    assert [(r["vcpu"], r["cpu"]) for r in vcpus] == [(0, 3), (1, 2), (2, 1), (3, 0)]
    lines = xl(daemon, "vcpu-list", str(domid)).out.splitlines()
    assert lines[0].split() == ["Name", "ID", "VCPU", "CPU"] and lines[1].split()[1:] == [str(domid), "0", "3"]
    assert "DeviceID 0x7 -> virtual 0, 8 events" in xl(daemon, "its", str(domid)).out
    assert xl(daemon, "create", "--vcpus", "2", "--pin", "9").code == 1  # no CPU 9: the daemon says EINVAL
    assert xl(daemon, "pci-attach", "0", "00:06.0", "--its-events", "4").code == 2


def test_info_reports_the_host_as_xl_info(daemon: DaemonProcess) -> None:
    info = json.loads(xl(daemon, "info", "--json").out)
    assert info["nr_frames"] == 16384 and info["total_memory"] == "64"
    assert info["iommu"] == "enabled" and info["nr_cpus"] == 4
    assert 0 < float(info["free_memory"]) < 64
    lines = {k.strip(): v for k, v in (line.split(" : ", 1) for line in xl(daemon, "info").out.splitlines())}
    assert lines["total_memory"] == "64" and lines["iommu"] == "enabled" and lines["nr_frames"] == "16384"


def test_dmesg_shows_the_daemons_recent_log(tmp_path: Path) -> None:
    proc = DaemonProcess(tmp_path / "d", "--log-level", "info")
    try:
        run = xl(proc, "dmesg", "--json")
        got = json.loads(run.out)
        assert any("listening" in line for line in got["lines"]) and got["dropped"] == 0
        assert "listening" in xl(proc, "dmesg", "-n", "1").out
        # a hostile name is logged clipped and escaped, never replayed raw to a terminal
        with SyncControlClient.connect(proc.control_path) as ctl:
            reply = ctl.call("no_such_op\x1b[31m" + "x" * 3000, {})
            assert reply["ret"] < 0
            reply = ctl.call("dmesg", {"lines": 5000})
            assert reply["ret"] == -22
        lines = json.loads(xl(proc, "dmesg", "--json").out)["lines"]
        (refused,) = [line for line in lines if "no_such_op" in line]
        assert "[warning] refused" in refused and "\\x1b[31m" in refused
        assert all(len(line) <= 400 and "\x1b" not in line for line in lines)
    finally:
        proc.stop()


def test_guest_program_against_the_daemon(daemon: DaemonProcess) -> None:
    guest = json.loads(xl(daemon, "create", "--type", "hvm", "--frames", "300", "--json").out)
    xl(daemon, "pci-attach", str(guest["domid"]), "00:04.0")
    argv = [sys.executable, str(CLIENTS / "pv_iommu_guest.py"), "--socket", str(daemon.hypercall_path)]
    run = subprocess.run(
        [*argv, "--token", guest["token"], "--json", "--batch", "64"], capture_output=True, text=True, timeout=120
    )
    summary = json.loads(run.stdout)
    assert run.returncode == 0, run.stderr
    assert summary["ok"] and summary["pages"] == 300 and summary["dma_mismatches"] == 0
    assert summary["faults_after_unmap"]
    assert xl(daemon, "audit").code == 0


def test_guest_program_without_a_device_fails(daemon: DaemonProcess) -> None:
    guest = json.loads(xl(daemon, "create", "--type", "hvm", "--frames", "8", "--json").out)
    argv = [sys.executable, str(CLIENTS / "pv_iommu_guest.py"), "--socket", str(daemon.hypercall_path)]
    run = subprocess.run([*argv, "--token", guest["token"], "--json"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and not json.loads(run.stdout)["map_cap"]


def test_demo() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "xenemu", "demo", "--memory", "1"], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "guest: all checks passed" in run.stdout and "audit clean" in run.stdout


def test_its_verbs(tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path, "--its-cpus", "2", "--its-elision", "eager", "--its-pits", "2")
    try:
        domid = json.loads(xl(daemon, "create", "--json").out)["domid"]
        attach = xl(daemon, "pci-attach", str(domid), "00:03.0", "--its-devid", "7", "--its-events", "4", "--pits", "1")
        assert attach.code == 0 and "virtual DeviceID 0" in attach.out
        stats = json.loads(xl(daemon, "its", "--json").out)
        assert stats["options"]["elision"] == "eager" and len(stats["pits"]) == 2
        run = xl(daemon, "its")
        assert run.code == 0 and "MAPC=3" in run.out
        run = xl(daemon, "its", str(domid))
        assert run.code == 0 and "DeviceID 0x7 -> virtual 0" in run.out
    finally:
        daemon.stop()
