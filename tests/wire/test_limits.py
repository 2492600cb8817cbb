"""Isolation and limits over the real daemon: connections, hello time, quotas, identity."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conformance.beds import DaemonProcess
from xenemu.abi import pv_iommu as ops
from xenemu.client import SyncControlClient, SyncHypercallClient
from xenemu.conformance.target import Raw


def refusals(daemon: DaemonProcess) -> list[dict[str, object]]:
    lines = [json.loads(line) for line in daemon.log_text().splitlines() if line.startswith("{")]
    return [e for e in lines if e.get("event") == "refused" and e.get("level") == "warning"]


def test_connections_per_domain_and_in_all(tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path, "--max-connections-per-domain", "2", "--max-connections", "3", "--log-json")
    try:
        with SyncControlClient.connect(daemon.control_path) as ctl:
            guest = ctl.create_domain("hvm", 8)
            other = ctl.create_domain("hvm", 8)
            first = [SyncHypercallClient.connect(daemon.hypercall_path, guest["token"]) for _ in range(2)]
            third = Raw(daemon.hypercall_path)
            reply = third.hello(guest["token"])
            assert reply is not None and reply["ret"] == -24 and third.recv() is None
            # another domain is not affected by this one's connections
            with SyncHypercallClient.connect(daemon.hypercall_path, other["token"]) as xc:
                assert xc.domain_info()["domid"] == other["domid"]
                # the whole daemon: 3 hypercall connections past hello, so a 4th is refused at
                # its hello; connections that have not said hello (idle) do not count
                idle = [Raw(daemon.hypercall_path) for _ in range(3)]
                extra = Raw(daemon.hypercall_path)
                refused = extra.hello(other["token"])
                assert refused is not None and refused["ret"] == -24 and extra.recv() is None
                for raw in idle:
                    raw.close()
            for client in first:
                client.close()
            assert ctl.audit() == []
    finally:
        daemon.stop()
    reasons = [e["error"] for e in refusals(daemon)]
    assert reasons.count("-EMFILE") == 2


def test_silent_connection_is_dropped(tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path, "--hello-timeout", "0.3", "--log-json")
    try:
        raw = Raw(daemon.hypercall_path)
        reply = raw.recv()
        assert reply is not None and reply["ret"] == -110 and raw.recv() is None
        with SyncControlClient.connect(daemon.control_path) as ctl:  # saying hello in time works
            assert ctl.audit() == []
    finally:
        daemon.stop()
    assert any(e["error"] == "-ETIMEDOUT" for e in refusals(daemon))


def test_quota_over_the_wire(tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path, "--max-mappings", "8")
    try:
        with SyncControlClient.connect(daemon.control_path) as ctl:
            guest = ctl.create_domain("hvm", 32)
            ctl.assign_device(guest["domid"], "00:03.0")
            big = ctl.create_domain("hvm", 32, max_mappings=16)
            ctl.assign_device(big["domid"], "00:04.0")
            with SyncHypercallClient.connect(daemon.hypercall_path, guest["token"]) as xc:
                got = xc.iommu_op([ops.map_page(0x1000 + g, g) for g in range(9)])
                assert ops.statuses(got) == ["OK"] * 8 + ["-EDQUOT"]
            with SyncHypercallClient.connect(daemon.hypercall_path, big["token"]) as xc:
                assert set(ops.statuses(xc.iommu_op([ops.map_page(0x1000 + g, g) for g in range(16)]))) == {"OK"}
            listed = {d["domid"]: d for d in ctl.list_domains()}
            assert (listed[guest["domid"]]["mappings"], listed[guest["domid"]]["max_mappings"]) == (8, 8)
            assert listed[big["domid"]]["mappings"] == 16
            assert ctl.audit() == []
    finally:
        daemon.stop()


def test_a_token_speaks_only_for_its_domain(tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path)
    try:
        with SyncControlClient.connect(daemon.control_path) as ctl:
            a = ctl.create_domain("hvm", 16)
            b = ctl.create_domain("hvm", 16)
            ctl.assign_device(a["domid"], "00:03.0")
            ctl.assign_device(b["domid"], "00:04.0")
            with SyncHypercallClient.connect(daemon.hypercall_path, a["token"]) as xa:
                assert xa.domid == a["domid"]
                b_frame = ctl.frame_info(domid=b["domid"], gfn=0)["mfn"]
                # a cannot DMA with b's device, map b's frames, or unmap b's mappings
                assert xa.call("device_dma", {"bdf": "00:04.0", "addr": 0, "length": 1})["ret"] == -1
                assert ops.statuses(xa.iommu_op([ops.map_page(0x1000, b_frame)])) == ["-EPERM"]
                server = xa.call("create_ioreq_server", {"target": b["domid"]})
                assert server["ret"] == -1
                with SyncHypercallClient.connect(daemon.hypercall_path, b["token"]) as xb:
                    assert ops.statuses(xb.iommu_op([ops.map_page(0x2000, 1)])) == ["OK"]
                    assert ops.statuses(xa.iommu_op([ops.unmap_page(0x2000)])) == ["-ENOENT"]
                    assert not xa.device_dma("00:03.0", 0x2000 << 12, length=1)["ok"]
            assert ctl.audit() == []
    finally:
        daemon.stop()
