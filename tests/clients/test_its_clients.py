"""The guest ITS driver and the device program, run against the daemon."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conformance.beds import DaemonProcess
from xenemu.client import SyncControlClient

CLIENTS = Path(__file__).resolve().parents[2] / "clients"


def test_driver_and_device_count_every_interrupt(tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path / "d", "--frames", "16384", "--dom0-memory", "512")
    try:
        with SyncControlClient.connect(daemon.control_path) as ctl:
            guest = ctl.create_domain("hvm", 512, vcpus=2)
            ctl.assign_device(guest["domid"], "00:03.0", its_devid=0x50, its_events=8)
            common = ["--socket", str(daemon.hypercall_path), "--token", guest["token"]]
            ready, device_result = tmp_path / "ready.json", tmp_path / "device.json"
            driver = subprocess.Popen(
                [
                    sys.executable,
                    str(CLIENTS / "its_guest_driver.py"),
                    *common,
                    "--ready-file",
                    str(ready),
                    "--until-file",
                    str(device_result),
                    "--grace",
                    "1",
                    "--check-against",
                    str(device_result),
                    "--bringup-bound",
                    "10",
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            device = subprocess.run(
                [
                    sys.executable,
                    str(CLIENTS / "its_device.py"),
                    *common,
                    "--after",
                    str(ready),
                    "--count",
                    "200",
                    "--rate",
                    "400",
                    "--result",
                    str(device_result),
                ],
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert device.returncode == 0, device.stdout + device.stderr
            out, err = driver.communicate(timeout=120)
            assert driver.returncode == 0, out + err
            summary = json.loads(out)
            assert summary["msis_sent"] == 200
            assert 8 <= summary["lpis_delivered"] <= 200
            assert set(summary["interrupts_per_vcpu"]) == {"0", "1"}  # events spread over both vCPUs
            assert summary["commands"] > 8 * 2
            assert ctl.audit() == []
            counters = ctl.its_info(guest["domid"])["vits"]["0"]
            assert counters["received"]["MAPTI"] == 8 and not counters["dropped"]
    finally:
        daemon.stop()
