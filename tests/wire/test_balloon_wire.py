"""Ballooning end to end over the real daemon: guests, emulators and their IOREQ servers."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.conformance.beds import DaemonProcess
from xenemu.abi import pv_iommu as ops
from xenemu.client import HypercallClient, SyncControlClient

SLOTS = 511
CLIENTS = Path(__file__).resolve().parents[2] / "clients"


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    proc = DaemonProcess(tmp_path, "--frames", "8192", "--dom0-memory", "512")
    yield proc
    proc.stop()


class Scene:
    """A guest and its emulators, created through the control socket."""

    def __init__(self, daemon: DaemonProcess, memory: int = 64, emulators: int = 1) -> None:
        self.daemon = daemon
        self.ctl = SyncControlClient.connect(daemon.control_path)
        guest = self.ctl.create_domain("hvm", memory)
        self.guest, self.guest_token = guest["domid"], guest["token"]
        self.ctl.assign_device(self.guest, "00:03.0")
        self.dms: list[tuple[int, str]] = []
        for i in range(emulators):
            dm = self.ctl.create_domain("pv", 16, target=self.guest)
            self.ctl.assign_device(dm["domid"], f"00:1{i}.0")
            self.dms.append((dm["domid"], dm["token"]))

    async def connect(self, token: str) -> HypercallClient:
        return await HypercallClient.connect(self.daemon.hypercall_path, token)

    def refs(self, mfn: int) -> tuple[int, int, Any]:
        info = self.ctl.frame_info(mfn=mfn)
        return info["count"], info["type_count"], info["owner"]

    def mfn(self, gfn: int) -> int:
        mfn: int = self.ctl.frame_info(domid=self.guest, gfn=gfn)["mfn"]
        return mfn

    def audit(self) -> None:
        assert self.ctl.audit() == []


async def test_balloon_out_of_frames_mapped_by_several_emulators(daemon: DaemonProcess) -> None:
    scene = Scene(daemon, emulators=2)
    guest = await scene.connect(scene.guest_token)
    dm1, dm2 = [await scene.connect(token) for _, token in scene.dms]
    s1, s2 = await dm1.create_ioreq_server(scene.guest), await dm2.create_ioreq_server(scene.guest)
    mfn = scene.mfn(5)
    assert ops.statuses(await dm1.iommu_op([ops.map_foreign_page(0x800, 5, scene.guest, s1)])) == ["OK"]
    assert ops.statuses(await dm2.iommu_op([ops.map_foreign_page(0x900, 5, scene.guest, s2, ops.R)])) == ["OK"]
    out = await guest.decrease_reservation([5])
    assert (out["ret"], out["status"], out["waited"]) == (1, 0, 0)
    assert scene.refs(mfn) == (2, 1, scene.guest)  # held by the two M2B entries only
    for client, server, bfn in ((dm1, s1, 0x800), (dm2, s2, 0x900)):
        assert await client.next_event() == {"event": "ioreq", "ioserver": server}
        buffered, read_pointer, sync = await client.ioreq_fetch(server)
        assert [(r.type, r.data) for r in buffered] == [(8, bfn)] and sync == []
        await client.ioreq_ack(server, read_pointer)
        # the emulator's device still reaches the frame until it unmaps: the guest cannot fault it
        assert (await client.device_dma(f"00:1{0 if client is dm1 else 1}.0", bfn << 12, length=1))["ok"]
        assert ops.statuses(await client.iommu_op([ops.unmap_foreign_page(bfn, server)])) == ["OK"]
    assert scene.refs(mfn) == (0, 0, None)  # freed exactly when the last reference went
    back = await guest.populate_physmap([5])
    assert back["ret"] == 1 and scene.mfn(5) == mfn  # and reused by populate_physmap
    scene.audit()


async def test_emulator_that_disconnects_releases_the_waiting_guest(daemon: DaemonProcess) -> None:
    scene = Scene(daemon, memory=SLOTS + 20)
    guest, dm = await scene.connect(scene.guest_token), await scene.connect(scene.dms[0][1])
    server = await dm.create_ioreq_server(scene.guest)
    gfns = list(range(SLOTS + 2))
    await dm.iommu_op([ops.map_foreign_page(0x10000 + g, g, scene.guest, server) for g in gfns])
    mfns = [scene.mfn(g) for g in gfns[:3]]
    result: dict[str, Any] = {}

    async def balloon() -> None:
        result.update(await guest.decrease_reservation(gfns))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(balloon)
        await dm.next_event()
        await dm.aclose()  # the emulator dies without answering
    assert result["ret"] == len(gfns) and result["waited"] == 2
    assert all(scene.refs(m) == (0, 0, None) for m in mfns)
    assert scene.ctl.stats()["ioreq_servers"] == 0
    scene.audit()


def run_client(name: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(CLIENTS / name), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize("mode", ["invalidate", "swap", "lookup"])
def test_emulator_and_balloon_guest_processes(daemon: DaemonProcess, mode: str) -> None:
    """The two programs run together; at the end nothing holds a reference it should not."""
    scene = Scene(daemon, memory=700)
    if mode == "lookup":  # an emulator without a device has no map_cap: it asks for BFNs
        dm = scene.ctl.create_domain("pv", 16, target=scene.guest)
        scene.dms[0] = (dm["domid"], dm["token"])
    sock = str(daemon.hypercall_path)
    emulator = run_client(
        "mediated_emulator.py",
        "--socket",
        sock,
        "--token",
        scene.dms[0][1],
        "--guest",
        str(scene.guest),
        "--gfns",
        "0:600",
        "--until-stdin-closes",
        *(["--swap"] if mode == "swap" else []),
    )
    assert emulator.stdout is not None and emulator.stdin is not None
    ready = json.loads(emulator.stdout.readline())
    assert ready["ready"] and ready["mapped"] == 600 and ready["map_cap"] == (mode != "lookup")
    balloon = run_client(
        "balloon_guest.py",
        "--socket",
        sock,
        "--token",
        scene.guest_token,
        "--gfns",
        "0:600",
        "--chunk",
        "600",
        "--rounds",
        "3",
        "--self-map",
    )
    out, err = balloon.communicate(timeout=240)
    assert balloon.returncode == 0, out + err
    summary = json.loads(out)
    assert summary["ballooned"] == summary["populated"] == 1800
    if mode == "swap":
        assert summary["waited"] == 0
    else:
        assert summary["waited"] > 0  # 600 invalidates at once overflow the 511-slot ring
    emu_out, emu_err = emulator.communicate(timeout=120)  # closes its stdin: the emulator shuts down
    assert emulator.returncode == 0, emu_err
    emu = json.loads(emu_out.strip().splitlines()[-1])
    assert emu["still_mapped"] == 0
    if mode != "swap":
        assert emu["unmapped_on_invalidate"] >= 600 and emu["sync_invalidates"] > 0
    stats = scene.ctl.stats()
    assert stats["m2b_entries"] == 0 and stats["ioreq_servers"] == 0
    for gfn in range(0, 700, 37):
        assert scene.refs(scene.mfn(gfn))[:2] == (1, 0)
    scene.audit()
