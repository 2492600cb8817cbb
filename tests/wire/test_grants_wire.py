"""Grant programs over the real daemon (every GNTST outcome, read-only DMA and references are
rules of the conformance suite: xenemu/conformance/cases/grants.py)."""

from __future__ import annotations

from pathlib import Path

from tests.conformance.beds import DaemonProcess
from xenemu.client import SyncControlClient


def test_frontend_and_backend_programs(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    daemon = DaemonProcess(tmp_path / "d", "--frames", "8192", "--dom0-memory", "512")
    try:
        with SyncControlClient.connect(daemon.control_path) as ctl:
            front = ctl.create_domain("hvm", 64)
            back = ctl.create_domain("pv", 16)
            ctl.assign_device(back["domid"], "00:06.0")
            clients = Path(__file__).resolve().parents[2] / "clients"
            common = ["--socket", str(daemon.hypercall_path), "--exchange", str(tmp_path / "xs")]
            fe = subprocess.Popen(
                [
                    sys.executable,
                    str(clients / "grant_frontend.py"),
                    *common,
                    "--token",
                    front["token"],
                    "--backend",
                    str(back["domid"]),
                    "--requests",
                    "24",
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            be = subprocess.run(
                [sys.executable, str(clients / "grant_backend.py"), *common, "--token", back["token"]],
                capture_output=True,
                text=True,
                timeout=120,
            )
            fe_out, fe_err = fe.communicate(timeout=120)
            assert be.returncode == 0, be.stdout + be.stderr
            assert fe.returncode == 0, fe_out + fe_err
            assert json.loads(be.stdout)["mapped"] == 24 and json.loads(be.stdout)["read_only_faults"] == 12
            assert json.loads(fe_out)["requests"] == 24
            assert ctl.audit() == []
            assert all(ctl.frame_info(domid=front["domid"], gfn=g)["count"] == 1 for g in range(8, 32))
    finally:
        daemon.stop()
