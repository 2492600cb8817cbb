"""Ballooning and the IOREQ_TYPE_INVALIDATEs it owes emulators (pv-iommu-semantics.md
"Ballooning"; PROTOCOL.md 7.2 and 12.5)."""

from __future__ import annotations

import threading
from typing import Any

from xenemu.abi import pv_iommu as ops
from xenemu.client import XenError
from xenemu.conformance.rules import rule
from xenemu.conformance.target import Target

S = "12.5"
INVALIDATE = 8  # IOREQ_TYPE_INVALIDATE
SLOTS = 511  # a buffered ring's slots


class Scene:
    """A guest with a device, and emulators for it, each with a device and an IOREQ server."""

    def __init__(self, t: Target, memory: int = 64, emulators: int = 1) -> None:
        self.t = t
        self.guest = t.guest("hvm", memory, "00:03.0")
        self.dms = [t.guest("pv", 16, f"00:1{i}.0", target=self.guest) for i in range(emulators)]
        self.servers = [t.client(dm).create_ioreq_server(self.guest) for dm in self.dms]

    def map(self, which: int, bfn: int, gfn: int, **kw: Any) -> None:
        op = ops.map_foreign_page(bfn, gfn, self.guest, self.servers[which], **kw)
        assert self.t.call(self.dms[which], [op])[0].status_name == "OK"

    def unmap(self, which: int, bfn: int) -> None:
        op = ops.unmap_foreign_page(bfn, self.servers[which])
        assert self.t.call(self.dms[which], [op])[0].status_name == "OK"

    def fetch(self, which: int) -> tuple[list[Any], int, list[Any]]:
        got: tuple[list[Any], int, list[Any]] = self.t.client(self.dms[which]).ioreq_fetch(self.servers[which])
        return got

    def refs(self, mfn: int) -> tuple[int, int, Any]:
        info = self.t.control.frame_info(mfn=mfn)
        return info["count"], info["type_count"], info["owner"]

    def balloon_out(self, gfns: list[int]) -> dict[str, Any]:
        out: dict[str, Any] = self.t.client(self.guest).decrease_reservation(gfns)
        self.t.check()
        return out


@rule(
    "BALLOON-INVALIDATE",
    S,
    "balloon-out of a frame emulators map: one invalidate per mapping, frame held until unmapped",
)
def invalidate(t: Target) -> None:
    scene = Scene(t, emulators=2)
    mfn = t.mfn(scene.guest, 5)
    scene.map(0, 0x800, 5)
    scene.map(1, 0x900, 5, perms=ops.R)
    out = scene.balloon_out([5])
    assert (out["ret"], out["status"], out["waited"]) == (1, 0, 0), f"decrease_reservation: {out}"
    assert scene.refs(mfn) == (2, 1, scene.guest), "the two M2B entries should hold the frame"
    for which, bfn in ((0, 0x800), (1, 0x900)):
        client = t.client(scene.dms[which])
        event = client.next_event(timeout=5)
        assert event == {"event": "ioreq", "ioserver": scene.servers[which]}, f"event {event}"
        buffered, read_pointer, sync = scene.fetch(which)
        assert [(r.type, r.data) for r in buffered] == [(INVALIDATE, bfn)] and sync == [], f"ring {buffered}"
        client.ioreq_ack(scene.servers[which], read_pointer)
        assert client.device_dma(f"00:1{which}.0", bfn << 12, length=1)["ok"], "the emulator lost its DMA early"
        scene.unmap(which, bfn)
    assert scene.refs(mfn) == (0, 0, None), "the frame was not freed with its last reference"


@rule("BALLOON-ORDER", S, "invalidates go GFN by GFN in the call's order, within one frame by server then BFN")
def order(t: Target) -> None:
    scene = Scene(t, emulators=1)
    scene.map(0, 0x830, 3)
    scene.map(0, 0x810, 1)
    scene.map(0, 0x822, 2)
    scene.map(0, 0x820, 2, perms=ops.R)
    out = scene.balloon_out([2, 3, 1])
    assert out["ret"] == 3, f"decrease_reservation: {out}"
    buffered, read_pointer, _ = scene.fetch(0)
    assert [r.data for r in buffered] == [0x820, 0x822, 0x830, 0x810], f"order {[hex(r.data) for r in buffered]}"
    t.client(scene.dms[0]).ioreq_ack(scene.servers[0], read_pointer)
    for bfn in (0x820, 0x822, 0x830, 0x810):
        scene.unmap(0, bfn)


@rule(
    "BALLOON-SWAP", S, "a frame mapped only with swap_mfn is re-pointed at the server's scratch frame, with no message"
)
def swap(t: Target) -> None:
    scene = Scene(t)
    t.guest_write(scene.guest, 5, b"old guest data")
    mfn = t.mfn(scene.guest, 5)
    scene.map(0, 0x800, 5, swap_mfn=True)
    scene.map(0, 0x801, 5, swap_mfn=True)
    assert scene.balloon_out([5])["ret"] == 1
    buffered, _, sync = scene.fetch(0)
    assert buffered == [] and sync == [], f"invalidates were sent: {buffered} {sync}"
    assert scene.refs(mfn) == (0, 0, None), "the frame was not freed"
    dma = t.client(scene.dms[0]).device_dma("00:10.0", 0x800 << 12, length=14)
    assert dma["ok"] and dma["data"] != b"old guest data", "the device still reaches the old frame"
    scene.unmap(0, 0x800)
    scene.unmap(0, 0x801)


@rule("BALLOON-MIXED-SWAP", S, "a frame with any mapping made without swap_mfn is announced for every mapping")
def mixed_swap(t: Target) -> None:
    scene = Scene(t)
    mfn = t.mfn(scene.guest, 5)
    scene.map(0, 0x800, 5, swap_mfn=True)
    scene.map(0, 0x801, 5)
    assert scene.balloon_out([5])["ret"] == 1
    buffered, _, _ = scene.fetch(0)
    assert [r.data for r in buffered] == [0x800, 0x801] and scene.refs(mfn)[0] == 2
    scene.unmap(0, 0x800)
    scene.unmap(0, 0x801)
    assert scene.refs(mfn) == (0, 0, None)


@rule("BALLOON-SYNC", S, "when the ring is full the rest go synchronous and the call waits until each is completed")
def synchronous(t: Target) -> None:
    scene = Scene(t, memory=SLOTS + 20)
    gfns = list(range(SLOTS + 3))
    dm = scene.dms[0]
    server = scene.servers[0]
    got = t.call(dm, [ops.map_foreign_page(0x10000 + g, g, scene.guest, server) for g in gfns])
    assert set(ops.statuses(got)) == {"OK"}
    guest = t.client(scene.guest)
    result: dict[str, Any] = {}

    def balloon() -> None:
        try:
            result.update(guest.decrease_reservation(gfns))
        except Exception as exc:
            result["error"] = repr(exc)

    thread = threading.Thread(target=balloon, daemon=True)
    thread.start()
    client = t.client(dm)
    try:
        assert client.next_event(timeout=10) == {"event": "ioreq", "ioserver": server}, "no ioreq event"
        buffered, read_pointer, sync = client.ioreq_fetch(server)
        assert len(buffered) == SLOTS and len(sync) == 3, f"{len(buffered)} buffered, {len(sync)} synchronous"
        assert [r.data for r in sync] == [0x10000 + g for g in gfns[SLOTS:]]
        assert all(r.size == 8 and r.state == 1 for r in sync)
        client.ioreq_ack(server, read_pointer)
        client.domain_info()  # a round trip: the balloon call must still be waiting
        assert not result, f"the call returned before its synchronous invalidates were completed: {result}"
        t.call(dm, [ops.unmap_foreign_page(0x10000 + g, server) for g in gfns])
        for req in sync:
            client.ioreq_complete(server, req.id)
    finally:
        thread.join(15)
    assert not thread.is_alive(), "the balloon call never returned"
    assert (result.get("ret"), result.get("status"), result.get("waited")) == (len(gfns), 0, 3), f"{result}"


@rule("BALLOON-SELF", S, "a guest that balloons out a frame it mapped itself keeps it until it unmaps")
def self_balloon(t: Target) -> None:
    g = t.guest()
    mfn = t.mfn(g, 7)
    assert t.call(g, [ops.map_page(0x1000, 7)])[0].status_name == "OK"
    assert t.client(g).decrease_reservation([7])["ret"] == 1
    assert t.refs(mfn) == (1, 1)
    assert t.dma(g, "00:03.0", 0x1000 << 12, length=1)["ok"]
    assert t.call(g, [ops.unmap_page(0x1000)])[0].status_name == "OK"
    info = t.control.frame_info(mfn=mfn)
    assert (info["count"], info["owner"]) == (0, None), f"not freed: {info}"


@rule(
    "BALLOON-ERRORS",
    S,
    "memory ops stop at the first GFN that cannot go (-ENOENT), -EEXIST, -E2BIG; an unknown server -ENOENT",
)
def errors(t: Target) -> None:
    g = t.guest(memory=8)
    xc = t.client(g)
    out = xc.decrease_reservation([1, 99, 2])
    assert (out["ret"], out["status"], out["waited"]) == (1, -2, 0), f"{out}"
    assert xc.populate_physmap([0, 1])["status"] == -17
    try:
        xc.decrease_reservation(list(range(70000)))
    except XenError as exc:
        assert exc.errno == 7, f"{exc}"
    else:
        raise AssertionError("70,000 GFNs were accepted")
    try:
        xc.ioreq_fetch(12345)
    except XenError as exc:
        assert exc.errno == 2, f"{exc}"
    else:
        raise AssertionError("ioreq_fetch of an unknown server succeeded")
