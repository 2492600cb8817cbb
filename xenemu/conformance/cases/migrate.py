"""Live migration (PROTOCOL.md 14.1 and 12.8), checked on one daemon migrating to itself, as
``xl migrate`` to localhost: what arrives, what the logs catch, what a stopped domain refuses."""

from __future__ import annotations

from typing import Any

from xenemu.abi import pv_iommu as ops
from xenemu.client import XenError
from xenemu.client.migration import carry, migrate
from xenemu.conformance.rules import rule
from xenemu.conformance.target import Target

S = "12.8"
INVALIDATE = 8  # IOREQ_TYPE_INVALIDATE
EBUSY, ESRCH = 16, 3


def errno(fn: Any, *args: Any) -> int:
    try:
        fn(*args)
    except XenError as exc:
        return exc.errno or 0
    return 0


def arrived(t: Target, old: int, new: int) -> None:
    """The case's domain is now ``new`` (destroyed with the others at the end)."""
    t.forget(old)
    t.created.append(new)


@rule("MIGRATE-LOCAL", S, "a guest live-migrated to the same daemon keeps its memory and token; its old domid goes")
def local(t: Target) -> None:
    guest = t.guest("hvm", 48, None)
    t.guest_write(guest, 5, b"before the move")
    token = t.control.domain_token(guest)
    report = migrate(t.control, t.control, guest)
    arrived(t, guest, report.new_domid)
    assert report.new_domid != guest and report.token == token, f"report {report}"
    assert report.pages_sent >= 48 and report.rounds >= 2, f"report {report}"
    names = [d["domid"] for d in t.control.list_domains()]
    assert guest not in names and report.new_domid in names, f"domains {names}"
    xc = t.connect(token)  # the same token speaks for the copy
    assert xc.domain_info()["domid"] == report.new_domid
    assert xc.guest_read(5, 15) == b"before the move", "its memory did not arrive"
    xc.close()


@rule(
    "MIGRATE-DIRTY",
    S,
    "a page written after its copy (CPU, or an emulator's DMA through a foreign mapping) is sent again; "
    "the emulator is told IOREQ_TYPE_INVALIDATE when the source goes",
)
def dirty(t: Target) -> None:
    guest = t.guest("hvm", 32, None)
    dm = t.guest("pv", 16, "00:10.0", target=guest)
    server = t.client(dm).create_ioreq_server(guest)
    got = t.call(dm, [ops.map_foreign_page(0x800, 4, guest, server)])
    assert got[0].status_name == "OK", f"map_foreign_page: {got[0].status_name}"
    ctl = t.control
    mig = ctl.migrate_begin(guest)["migration"]
    incoming = 0
    while True:
        reply = ctl.migrate_send(mig, 8)
        incoming = carry(ctl, ctl, reply, incoming)["incoming"]
        if not reply["left"]:
            break
    t.guest_write(guest, 3, b"cpu, after its copy")
    dma = t.client(dm).device_dma("00:10.0", 0x800 << 12, b"dma, after its copy")
    assert dma["ok"], f"the emulator's DMA faulted: {dma}"
    final = ctl.migrate_suspend(mig)
    assert final["pages"] >= 2, f"the last section carries {final['pages']} pages, not the two written"
    new = carry(ctl, ctl, final, incoming)["domid"]
    ctl.migrate_commit(mig)
    ctl.migrate_resume(incoming)
    ctl.migrate_finish(mig, True)
    arrived(t, guest, new)
    xc = t.client(new)
    assert xc.guest_read(3, 19) == b"cpu, after its copy", "a CPU write during pre-copy was lost"
    assert xc.guest_read(4, 19) == b"dma, after its copy", "a DMA write during pre-copy was lost"
    client = t.client(dm)
    buffered, read_pointer, _ = client.ioreq_fetch(server)
    assert [(r.type, r.data) for r in buffered] == [(INVALIDATE, 0x800)], f"ring {buffered}"
    client.ioreq_ack(server, read_pointer)
    assert t.call(dm, [ops.unmap_foreign_page(0x800, server)])[0].status_name == "OK"


@rule("MIGRATE-STOPPED", S, "a stopped domain's calls and DMA writes into it are -EBUSY; abandoned, it runs on")
def stopped(t: Target) -> None:
    guest = t.guest("hvm", 16, None)
    dm = t.guest("pv", 16, "00:11.0", target=guest)
    server = t.client(dm).create_ioreq_server(guest)
    assert t.call(dm, [ops.map_foreign_page(0x900, 2, guest, server)])[0].status_name == "OK"
    ctl = t.control
    mig = ctl.migrate_begin(guest)["migration"]
    ctl.image_close(ctl.migrate_send(mig)["image"])
    ctl.image_close(ctl.migrate_suspend(mig)["image"])
    xc = t.client(guest)
    assert errno(xc.guest_write, 1, b"x") == EBUSY, "a stopped guest's call ran"
    dma = t.client(dm)
    assert errno(dma.device_dma, "00:11.0", 0x900 << 12, b"late") == EBUSY, "DMA wrote a stopped guest"
    assert dma.device_dma("00:11.0", 0x900 << 12, length=4)["ok"], "a DMA read of a stopped guest failed"
    assert errno(ctl.migrate_send, mig) == EBUSY
    assert [d.get("paused") for d in ctl.list_domains() if d["domid"] == guest] == [True]
    ctl.migrate_finish(mig, False)
    xc.guest_write(1, b"runs on")
    assert xc.guest_read(1, 7) == b"runs on"
    assert t.call(dm, [ops.unmap_foreign_page(0x900, server)])[0].status_name == "OK"


@rule("MIGRATE-REFUSED", S, "what cannot migrate is refused with its errno; a corrupt section leaves nothing")
def refused(t: Target) -> None:
    ctl = t.control
    pv = t.guest("pv", 8, None)
    guest = t.guest("hvm", 16, None)
    dm = t.guest("hvm", 8, None, target=guest)
    assert errno(ctl.migrate_begin, 0) == 1, "the hardware domain: -EPERM"
    assert errno(ctl.migrate_begin, pv) == 95, "a PV domain: -EOPNOTSUPP"
    assert errno(ctl.migrate_begin, dm) == 95, "a device model: -EOPNOTSUPP"
    assert errno(ctl.migrate_send, 1 << 30) == 2, "an unknown migration: -ENOENT"
    mig = ctl.migrate_begin(guest)["migration"]
    assert errno(ctl.migrate_finish, mig, True) == 22, "finish before the stop: -EINVAL"
    reply = ctl.migrate_send(mig)
    data = bytearray(ctl.image_read(reply["image"], 0, reply["size"]))
    ctl.image_close(reply["image"])
    data[40] ^= 1
    before = sorted(d["domid"] for d in ctl.list_domains())
    image = ctl.restore_begin(len(data))
    ctl.image_write(image, 0, bytes(data))
    assert errno(ctl.migrate_receive, image, 0) == 74, "a corrupt section: -EBADMSG"
    assert sorted(d["domid"] for d in ctl.list_domains()) == before, "a refused section left a domain"
    ctl.migrate_finish(mig, False)
