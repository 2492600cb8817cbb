"""What only xenemu's daemon can be asked (signals, its log), so not rules of the suite."""

from __future__ import annotations

import json
import signal
import socket
from pathlib import Path

from tests.conformance.beds import DaemonProcess
from tests.conformance.conftest import BASE, daemon_flags
from xenemu.abi import pv_iommu as ops
from xenemu.client import SyncControlClient
from xenemu.conformance.target import Raw

BIG = 65536


def big_batch() -> bytes:
    half = [ops.map_page(0x100000 + i, i % 64, ops.R) for i in range(BIG // 2)]
    return bytes(ops.pack(half + [ops.unmap_page(0x100000 + i) for i in range(BIG // 2)]))


def test_sigterm_finishes_in_flight_batches(tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path, *daemon_flags(dict(BASE)), "--log-json", "--log-level", "info")
    with SyncControlClient.connect(daemon.control_path) as ctl:
        reply = ctl.create_domain("hvm", 64)
        ctl.assign_device(reply["domid"], "00:08.0")
        raw = Raw(daemon.hypercall_path)
        assert (raw.hello(reply["token"]) or {})["ret"] == 0
        raw.send({"id": 2, "op": "iommu_op", "args": {"buf": big_batch(), "count": BIG}})
        raw.sock.shutdown(socket.SHUT_WR)
        # the batch is in flight once its first segment has flushed (continuations let us ask)
        while not next(d for d in ctl.list_domains() if d["domid"] == reply["domid"])["flushes"]["added"]:
            pass
        daemon.proc.send_signal(signal.SIGTERM)
    done = raw.recv()
    assert done is not None and done["ret"] == 0
    assert set(ops.statuses(ops.unpack(done["buf"]))) == {"OK"}
    assert daemon.proc.wait(60) == 0  # it exits by itself once the batch is answered
    assert daemon.stop() == 0
    assert not daemon.hypercall_path.exists() and not daemon.control_path.exists()
    events = [json.loads(line) for line in daemon.log_text().splitlines() if line.startswith("{")]
    assert any(e["event"] == "signal" and e["signal"] == "SIGTERM" for e in events)
    assert any(e["event"] == "stopped" for e in events)


def test_refusals_are_logged_at_warning_as_json(tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path, *daemon_flags(dict(BASE)), "--log-json")
    try:
        raw = Raw(daemon.hypercall_path)
        raw.hello("not-a-token")
        raw.recv()
    finally:
        daemon.stop()
    events = [json.loads(line) for line in daemon.log_text().splitlines() if line.startswith("{")]
    refused = [e for e in events if e["event"] == "refused"]
    assert refused and refused[0]["level"] == "warning" and refused[0]["error"] == "-EACCES"
    assert refused[0]["reason"] == "bad token"
