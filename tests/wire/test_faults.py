"""Faults over the real daemon: clients killed mid-batch, injected IOMMU errors."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

from tests.conformance.beds import DaemonProcess
from xenemu.abi import pv_iommu as ops
from xenemu.client import SyncControlClient, SyncHypercallClient

BIG = 65536

KILLED_EMULATOR = textwrap.dedent("""
    import sys
    from xenemu.abi import pv_iommu as ops
    from xenemu.client import SyncHypercallClient
    socket, token, guest = sys.argv[1], sys.argv[2], int(sys.argv[3])
    xc = SyncHypercallClient.connect(socket, token)
    server = xc.create_ioreq_server(guest)
    batch = [ops.map_foreign_page(0x100000 + i, i % 64, guest, server) for i in range({big})]
    print("sending", flush=True)
    xc.iommu_op(batch)
""")

KILLED_GUEST = textwrap.dedent("""
    import sys
    from xenemu.abi import pv_iommu as ops
    from xenemu.client import SyncHypercallClient
    xc = SyncHypercallClient.connect(sys.argv[1], sys.argv[2])
    print("sending", flush=True)
    xc.iommu_op([ops.map_page(0x100000 + i, i % 64) for i in range({big})])
""")


def wait_until(predicate, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def all_mappings(ctl: SyncControlClient, domid: int, start: int, limit: int) -> list[dict[str, Any]]:
    """Up to ``limit`` rows from ``start``, paging by each reply's ``next``."""
    rows: list[dict[str, Any]] = []
    resume: int | None = start
    while resume is not None and len(rows) < limit:
        reply = ctl.call("dump_mappings", {"domid": domid, "start": resume, "limit": limit - len(rows)})
        rows += reply["mappings"]
        resume = reply["next"]
    return rows


def domain(ctl: SyncControlClient, domid: int) -> dict[str, object]:
    found: dict[str, object] = next(d for d in ctl.list_domains() if d["domid"] == domid)
    return found


def test_emulator_killed_mid_batch_leaves_the_host_consistent(tmp_path: Path) -> None:
    """Also the regression test for what it caught: a peer gone before its reply was sent used
    to raise out of the connection's nursery as an exception group and stop the whole daemon."""
    daemon = DaemonProcess(tmp_path / "d", "--frames", "8192", "--dom0-memory", "512")
    try:
        with SyncControlClient.connect(daemon.control_path) as ctl:
            guest = ctl.create_domain("hvm", 64)
            dm = ctl.create_domain("pv", 16, target=guest["domid"])
            ctl.assign_device(dm["domid"], "00:05.0")
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    KILLED_EMULATOR.format(big=BIG),
                    str(daemon.hypercall_path),
                    dm["token"],
                    str(guest["domid"]),
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            assert proc.stdout is not None and proc.stdout.readline() == "sending\n"
            wait_until(lambda: domain(ctl, dm["domid"])["m2b_entries"])  # the batch is being applied
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            # its last connection is gone: the server and every mapping it made are released
            wait_until(lambda: ctl.stats()["ioreq_servers"] == 0)
            assert ctl.stats()["m2b_entries"] == 0
            assert all(ctl.frame_info(domid=guest["domid"], gfn=g)["count"] == 1 for g in range(64))
            assert ctl.audit() == []
            with SyncHypercallClient.connect(daemon.hypercall_path, guest["token"]) as xc:  # others are served
                assert xc.domain_info()["domid"] == guest["domid"]
    finally:
        daemon.stop()


def test_guest_killed_mid_batch_keeps_whole_ops(tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path / "d", "--frames", "8192", "--dom0-memory", "512")
    try:
        with SyncControlClient.connect(daemon.control_path) as ctl:
            guest = ctl.create_domain("hvm", 64)
            ctl.assign_device(guest["domid"], "00:03.0")
            proc = subprocess.Popen(
                [sys.executable, "-c", KILLED_GUEST.format(big=BIG), str(daemon.hypercall_path), guest["token"]],
                stdout=subprocess.PIPE,
                text=True,
            )
            assert proc.stdout is not None and proc.stdout.readline() == "sending\n"
            wait_until(lambda: domain(ctl, guest["domid"])["mappings"])
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            # between segments the state is a prefix of the batch, whole op by whole op
            while True:
                rows = all_mappings(ctl, guest["domid"], 0x100000, BIG)
                assert [r["bfn"] for r in rows] == list(range(0x100000, 0x100000 + len(rows)))
                assert all(r["kind"] == "map" for r in rows) and ctl.audit() == []
                if len(rows) == BIG:  # a batch the daemon received runs to its end, caller gone or not
                    break
            assert domain(ctl, guest["domid"])["mappings"] == BIG
    finally:
        daemon.stop()


def test_injected_faults_leave_each_op_atomic(tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path / "d", "--frames", "8192", "--dom0-memory", "512", "--fault-injection")
    try:
        with SyncControlClient.connect(daemon.control_path) as ctl:
            guest = ctl.create_domain("hvm", 256)
            ctl.assign_device(guest["domid"], "00:03.0")
            faulty = {0x1003, 0x1010, 0x1011, 0x1042}
            for bfn in faulty:
                ctl.inject_fault(guest["domid"], bfn)
            with SyncHypercallClient.connect(daemon.hypercall_path, guest["token"]) as xc:
                batch = [ops.map_page(0x1000 + 4 * i, 4 * i, order=2) for i in range(32)]
                got = xc.iommu_op(batch)
                for op, done in zip(batch, got, strict=True):
                    covered = set(range(op.bfn, op.bfn + 4))
                    assert done.status_name == ("-EIO" if covered & faulty else "OK")
                rows = {r["bfn"] for r in ctl.dump_mappings(guest["domid"], 0x1000, 1000)}
                for op, done in zip(batch, got, strict=True):
                    pages = set(range(op.bfn, op.bfn + 4))
                    assert pages <= rows if done.status == 0 else not pages & rows
                unmapped = xc.iommu_op([ops.unmap_page(0x1000 + 4 * i, order=2) for i in range(32)])
                assert sum(1 for u in unmapped if u.status_name == "-ENOENT") == 3  # the ones never mapped
            assert ctl.audit() == []
    finally:
        daemon.stop()
