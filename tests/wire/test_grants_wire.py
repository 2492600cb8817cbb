"""Grant maps over the real daemon: every GNTST outcome, read-only DMA, references, batches."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conformance.beds import DaemonProcess
from xenemu.abi import grant_table as grants
from xenemu.abi.grant_table import MapGrant, UnmapGrant
from xenemu.client import SyncControlClient, SyncHypercallClient, XenError


class Pair:
    def __init__(self, daemon: DaemonProcess) -> None:
        self.ctl = SyncControlClient.connect(daemon.control_path)
        front = self.ctl.create_domain("hvm", 32)
        back = self.ctl.create_domain("pv", 16)
        self.ctl.assign_device(front["domid"], "00:03.0")
        self.ctl.assign_device(back["domid"], "00:06.0")
        self.front_id, self.back_id = front["domid"], back["domid"]
        self.front = SyncHypercallClient.connect(daemon.hypercall_path, front["token"])
        self.back = SyncHypercallClient.connect(daemon.hypercall_path, back["token"])

    def refs(self, gfn: int) -> tuple[int, int, int]:
        info = self.ctl.frame_info(domid=self.front_id, gfn=gfn)
        return info["count"], info["type_count"], info["grant_maps"]

    def audit(self) -> None:
        assert self.ctl.audit() == []


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    daemon = DaemonProcess(tmp_path, "--frames", "8192", "--dom0-memory", "512", "--fault-injection")
    scene = Pair(daemon)
    yield scene
    scene.audit()
    daemon.stop()


def test_every_map_status_over_the_wire(pair: Pair) -> None:
    f, b, fid, bid = pair.front, pair.back, pair.front_id, pair.back_id
    f.grant_access(1, bid, 2)
    f.grant_access(2, 0, 3)
    f.grant_access(3, bid, 500)
    f.grant_access(4, bid, 4, readonly=True)
    pair.ctl.inject_fault(bid, 0x4000)
    cases = [
        (MapGrant(fid, 1, 0), "GNTST_bad_gntref"),
        (grants.map_at_bfn(4000, 1, 0x2000), "GNTST_bad_domain"),
        (grants.map_at_bfn(fid, 2000, 0x2000), "GNTST_bad_gntref"),
        (grants.map_at_bfn(fid, 2, 0x2000), "GNTST_bad_gntref"),
        (grants.map_at_bfn(fid, 3, 0x2000), "GNTST_bad_page"),
        (grants.map_at_bfn(fid, 4, 0x2000), "GNTST_permission_denied"),
        (MapGrant(fid, 1, grants.HOST_MAP), "GNTST_bad_virt_addr"),
        (MapGrant(fid, 1, grants.DEVICE_MAP | grants.REQUEST_BFN_MAP, dev_bus_addr=0x2000800), "GNTST_bad_dev_addr"),
        (grants.map_at_bfn(fid, 1, 0x4000), "GNTST_general_error"),
        (grants.map_at_bfn(fid, 1, 0x2000), "GNTST_okay"),
        (grants.map_at_bfn(fid, 1, 0x2000), "GNTST_bad_dev_addr"),  # that BFN is now taken
        (grants.map_at_bfn(fid, 4, 0x2001, readonly=True), "GNTST_okay"),
    ]
    got = b.map_grant_refs([op for op, _ in cases])
    assert [g.status_name for g in got] == [want for _, want in cases]
    assert pair.refs(2) == (2, 1, 1) and pair.refs(4) == (2, 0, 1)
    pair.audit()
    # read-only enforcement through device DMA
    f.guest_write(4, b"read me")
    assert b.device_dma("00:06.0", 0x2001 << 12, length=7)["data"] == b"read me"
    denied = b.device_dma("00:06.0", 0x2001 << 12, b"overwrite")
    assert not denied["ok"] and denied["reason"] == "write denied"
    assert f.guest_read(4, 7) == b"read me"
    # revoking a mapped grant fails; unmap releases the references
    with pytest.raises(XenError) as info:
        f.end_access(1)
    assert info.value.errno == 16
    handles = [g.handle for g in got if g.status == 0]
    unmapped = b.unmap_grant_refs([UnmapGrant(h) for h in handles] + [UnmapGrant(handles[0])])
    assert [u.status_name for u in unmapped] == ["GNTST_okay", "GNTST_okay", "GNTST_bad_handle"]
    assert pair.refs(2) == (1, 0, 0) and pair.refs(4) == (1, 0, 0)
    f.end_access(1)
    assert not b.device_dma("00:06.0", 0x2000 << 12, length=1)["ok"]


def test_unmap_statuses_and_fault(pair: Pair) -> None:
    f, b, fid, bid = pair.front, pair.back, pair.front_id, pair.back_id
    f.grant_access(1, bid, 2)
    (done,) = b.map_grant_refs(
        [
            MapGrant(
                fid,
                1,
                grants.DEVICE_MAP | grants.REQUEST_BFN_MAP | grants.HOST_MAP,
                host_addr=0x10000,
                dev_bus_addr=0x3000 << 12,
            )
        ]
    )
    assert done.status == 0
    pair.ctl.inject_fault(bid, 0x3000)
    got = b.unmap_grant_refs(
        [
            UnmapGrant(done.handle, host_addr=0x20000),
            UnmapGrant(done.handle, dev_bus_addr=0x3001 << 12),
            UnmapGrant(done.handle),
        ]
    )
    assert [g.status_name for g in got] == ["GNTST_bad_virt_addr", "GNTST_bad_dev_addr", "GNTST_general_error"]
    pair.ctl.inject_fault(bid, 0x3000, clear=True)
    assert b.unmap_grant_refs([UnmapGrant(done.handle, 0x10000, 0x3000 << 12)])[0].status_name == "GNTST_okay"


def test_call_level_errors(pair: Pair) -> None:
    reply = pair.back.call("grant_table_op", {"cmd": "map_grant_ref", "buf": b"\0" * 31, "count": 1})
    assert reply["ret"] == -22
    reply = pair.back.call("grant_table_op", {"cmd": "swap", "buf": b"", "count": 0})
    assert reply["ret"] == -22


def test_machine_address_without_request_bfn_map(pair: Pair) -> None:
    pair.front.grant_access(1, pair.back_id, 2)
    (done,) = pair.back.map_grant_refs([MapGrant(pair.front_id, 1, grants.DEVICE_MAP)])
    mfn = pair.ctl.frame_info(domid=pair.front_id, gfn=2)["mfn"]
    assert done.status == 0 and done.dev_bus_addr == mfn << 12
    assert all(row["kind"] != "grant" for row in pair.ctl.dump_mappings(pair.back_id, 0, 100000))
    pair.back.unmap_grant_refs([UnmapGrant(done.handle)])


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
