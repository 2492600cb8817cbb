"""A device-model domain saved and restored with its guest (``xl save`` of a guest with its stub
domain): its own state as any domain's image, and what names its guest.

The device model's image is a version-1 image (``image``) whose header carries the
``DEVICE_MODEL`` flag; its own four records hold its memory, quotas, devices and own IOMMU
entries as for any domain, and two more follow:

``DMSV`` (JSON)
    ``{"servers": [...]}``: each IOREQ server it runs, by its id on the saving host, with the
    state the ABI exposes of it: its ``buffered_iopage_t`` (``ring``, hex, unread slots and
    pointers as they were), the next synchronous request id and the counters of what was sent.
``FMAP`` (24 bytes an entry, ascending BFN)
    ``u64 BFN | u64 GFN | u32 server | u8 kind | u8 flags | u8[2] 0``: each foreign entry of its
    context (kind 4: the guest's GFN behind it, flags R/W/``swap_mfn`` as mapped) and each
    scratch entry a balloon-out left (kind 5: GFN 0, its R/W).

Nothing in it names a machine frame or a domid: the guest is the one it is restored with, the
frames are looked up by GFN in the restored guest, servers get ids on the restoring host
(returned old -> new) and new scratch frames, and the M2B is rebuilt as fresh foreign maps
would build it (a reference each, writable-type if W).

What cannot be carried is refused at save, changing nothing: a synchronous request waiting
for its emulator (``-EBUSY``, try again: the waiting call is the guest's, on the saving host,
and Xen's emulator answers every request before a suspend completes); a server being torn
down; a foreign mapping of a frame the guest gave back (``-EBUSY``: it has been told with
``IOREQ_TYPE_INVALIDATE`` and must unmap); a foreign frame held by machine address (a
``lookup_foreign_page`` without a context: ``-EBUSY``, the address names this host's frame);
a device model that has a device model of its own (``-EOPNOTSUPP``).
"""

from __future__ import annotations

import itertools
import json
import struct
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

from xenemu.abi import ffi
from xenemu.abi import pv_iommu as pv
from xenemu.core.errors import EBUSY, EINVAL, ENOMEM, ENOSPC, EOPNOTSUPP, ESRCH, HypercallError
from xenemu.core.host import Host
from xenemu.core.iommu import preempt, xen_changes
from xenemu.core.iommu.entries import RW, Kind, entry_perms, make_entry
from xenemu.core.iommu.m2b import M2BEntry
from xenemu.core.iommu.preempt import PREEMPT
from xenemu.core.ioreq.servers import (
    IOREQ_TYPE_INVALIDATE,
    IOREQ_WRITE,
    MAX_IOSERVID,
    MAX_SERVERS_PER_DOMAIN,
    PAGE_BYTES,
    SIZE_4,
    SIZE_8,
    SLOTS,
    U32,
    IoreqServer,
)
from xenemu.core.memory.domain import Domain
from xenemu.core.memory.leaves import LEAF_SHIFT
from xenemu.core.migration import restore, save
from xenemu.core.migration.image import DEVICE_MODEL, MAX_META, Image, check_references, refuse
from xenemu.core.migration.image import decode as decode_image

FMAP = struct.Struct("<QQIBBxx")
SERVER_KEYS = {"id", "ring", "next_sync_id", "buffered_sent", "sync_sent"}
#: Entries restored between two pauses (about a millisecond, as the M2B's slices elsewhere).
SLICE = preempt.M2B_PER_SLICE


@dataclass
class SavedServer:
    id: int
    ring: bytes
    next_sync_id: int
    buffered_sent: int
    sync_sent: int


@dataclass
class DmState:
    """A device model's image's ``DMSV`` and ``FMAP``, checked."""

    servers: list[SavedServer]
    #: (BFN, GFN, old server id, kind, flags), ascending BFN.
    entries: list[tuple[int, int, int, int, int]]


# -- save ----------------------------------------------------------------------------------------
def device_models(host: Host, guest_domid: int) -> list[int]:
    """The domains whose ``target`` is the guest, by domid."""
    return sorted(d.domid for d in host.domains.values() if d.target == guest_domid)


def refusal(host: Host, dm: Domain, guest: Domain) -> HypercallError | None:
    """Why the device model cannot be saved with its guest now (None: it can)."""
    domid = dm.domid
    if dm.target != guest.domid:
        return HypercallError(-EINVAL, f"d{domid} is not d{guest.domid}'s device model")
    refused = save.refusal(host, dm, device_model=True)
    if refused is not None:
        return refused
    if any(d.target == domid for d in host.domains.values()):
        return HypercallError(-EOPNOTSUPP, f"d{domid} has a device model of its own: it is not saved")
    if any(s.creator == domid for s in host.ioreq.ending.values()):
        return HypercallError(-EBUSY, f"an IOREQ server of d{domid} is being torn down: try again")
    servers = _servers_of(host, domid)
    for server in servers:
        if server.target != guest.domid:
            return HypercallError(-EBUSY, f"IOREQ server {server.id} of d{domid} serves nobody now")
        if server.pending:
            return HypercallError(
                -EBUSY,
                f"IOREQ server {server.id} of d{domid} has {len(server.pending)} synchronous requests"
                " waiting for its emulator: answer them (ioreq_complete), then try again",
            )
    gfn_of = _gfns_of(guest)
    for server in servers:
        for entry in host.iommu.m2b.for_server(server.id):
            if not entry.owns_iommu_entry:
                return HypercallError(
                    -EBUSY,
                    f"d{domid} holds d{guest.domid}'s frames by machine address (lookup_foreign_page"
                    " without a context): they name this host's frames, unmap them first",
                )
            if entry.mfn not in gfn_of:
                return HypercallError(
                    -EBUSY,
                    f"d{domid} still maps at BFN {entry.bfn:#x} a frame d{guest.domid} gave back: it was"
                    " told (IOREQ_TYPE_INVALIDATE) and must unmap it first",
                )
    return None


def _servers_of(host: Host, domid: int) -> list[IoreqServer]:
    return sorted((s for s in host.ioreq.servers.values() if s.creator == domid), key=lambda s: s.id)


def _gfns_of(guest: Domain) -> dict[int, int]:
    return {mfn: gfn for gfn, mfn in guest.p2m.items()}


def snapshot_dm(host: Host, dm_domid: int, guest_domid: int) -> Image:
    """The device model's image, with its servers and its foreign and scratch entries (it keeps
    running; the caller decides whether it goes, before its guest)."""
    dm, guest = host.domain(dm_domid), host.domain(guest_domid)
    refused = refusal(host, dm, guest)
    if refused is not None:
        raise refused
    image = save.snapshot(host, dm_domid, device_model=True)
    servers = _servers_of(host, dm_domid)
    gfn_of = _gfns_of(guest)
    entries = [
        (e.bfn, gfn_of[e.mfn], s.id, int(Kind.FOREIGN), e.flags)
        for s in servers
        for e in host.iommu.m2b.for_server(s.id)
    ]
    ctx = host.iommu.contexts.get(dm_domid)
    if ctx is not None:
        scratch = Kind.SCRATCH
        entries += [(bfn, 0, sid, int(scratch), entry_perms(ctx.table.get(bfn))) for bfn, sid in ctx.scratch.items()]
    entries.sort()
    saved = [
        {
            "id": s.id,
            "ring": bytes(s.page).hex(),
            "next_sync_id": s.next_sync_id,
            "buffered_sent": s.buffered_sent,
            "sync_sent": s.sync_sent,
        }
        for s in servers
    ]
    dmsv = json.dumps({"servers": saved}, sort_keys=True, separators=(",", ":")).encode()
    image.dm_records = [dmsv, b"".join(FMAP.pack(*e) for e in entries)]
    return image


# -- the image's checks --------------------------------------------------------------------------
def decode(raw: bytes | bytearray, summed: bool = False) -> Image:
    """A device model's image, checked as strictly as any image (``-EBADMSG`` saying why)."""
    image = decode_image(raw, summed, DEVICE_MODEL)
    parse(image)
    return image


def _int(value: Any, what: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value < high:
        raise refuse(f"{what} is not an integer in [{low}, {high})")
    return value


def _check_ring(ring: bytes, sid: int) -> None:
    """Pointers within one ring's worth, and every unread slot an invalidate (wide ones whole)."""
    view = ffi.from_buffer("buffered_iopage_t *", bytearray(ring))
    at, write = view.read_pointer, view.write_pointer
    unread = (write - at) % U32
    if unread > SLOTS:
        raise refuse(f"IOREQ server {sid}'s ring holds {unread} slots of {SLOTS}")
    while (write - at) % U32:
        slot = view.buf_ioreq[at % SLOTS]
        kind, direction, size = slot.type, slot.dir, slot.size
        if kind != IOREQ_TYPE_INVALIDATE or direction != IOREQ_WRITE or slot.addr or size not in (SIZE_4, SIZE_8):
            raise refuse(f"IOREQ server {sid}'s ring holds an unread slot that is not an invalidate")
        at = (at + 1) % U32
        if size == SIZE_8:
            if not (write - at) % U32 or view.buf_ioreq[at % SLOTS].size != SIZE_8:
                raise refuse(f"IOREQ server {sid}'s ring holds half a 64-bit invalidate")
            at = (at + 1) % U32


def parse(image: Image) -> DmState:
    """``DMSV`` and ``FMAP`` of a device model's image, every field and cross-reference checked."""
    if image.dm_records is None or len(image.dm_records) != 2:
        raise HypercallError(-EINVAL, "not a device model's image (save its guest with with_dm)")
    dmsv_raw, fmap_raw = image.dm_records
    if len(dmsv_raw) > MAX_META:
        raise refuse("DMSV record too large")
    try:
        dmsv = json.loads(bytes(dmsv_raw))
    except ValueError:
        raise refuse("DMSV record is not JSON") from None
    if not isinstance(dmsv, dict) or set(dmsv) != {"servers"} or not isinstance(dmsv["servers"], list):
        raise refuse("DMSV must be a map of exactly ['servers'], a list")
    if len(dmsv["servers"]) > min(MAX_SERVERS_PER_DOMAIN, image.meta["domain"]["servers_created"]):
        raise refuse("more IOREQ servers than a domain may hold, or than it has created")
    servers = []
    for raw in dmsv["servers"]:
        if not isinstance(raw, dict) or set(raw) != SERVER_KEYS:
            raise refuse(f"an IOREQ server must be a map of exactly {sorted(SERVER_KEYS)}")
        sid = _int(raw["id"], "IOREQ server id", 1, MAX_IOSERVID + 1)
        ring = raw["ring"]
        if not isinstance(ring, str) or len(ring) != 2 * PAGE_BYTES:
            raise refuse(f"IOREQ server {sid}'s ring is not {PAGE_BYTES} bytes in hex")
        try:
            page = bytes.fromhex(ring)
        except ValueError:
            raise refuse(f"IOREQ server {sid}'s ring is not hex") from None
        _check_ring(page, sid)
        servers.append(
            SavedServer(
                sid,
                page,
                _int(raw["next_sync_id"], "next synchronous request id", 1, 1 << 62),
                _int(raw["buffered_sent"], "buffered requests sent", 0, 1 << 62),
                _int(raw["sync_sent"], "synchronous requests sent", 0, 1 << 62),
            )
        )
    ids = [s.id for s in servers]
    if any(b <= a for a, b in itertools.pairwise(ids)):
        raise refuse("IOREQ servers not in ascending id order")
    if len(fmap_raw) % FMAP.size:
        raise refuse("FMAP's length is not a whole number of entries")
    entries = [(int(b), int(g), int(s), int(k), int(f)) for b, g, s, k, f in FMAP.iter_unpack(fmap_raw)]
    iommu = image.meta["iommu"]
    if entries and iommu is None:
        raise refuse("foreign entries without an IOMMU context")
    leaves = set(iommu["leaves"]) if iommu is not None else set()
    own = {bfn for bfn, *_ in image.entries}
    known = set(ids)
    last = -1
    for bfn, gfn, sid, kind, flags in entries:
        if bfn <= last:
            raise refuse("FMAP entries not strictly ascending by BFN")
        last = bfn
        if bfn >> LEAF_SHIFT not in leaves or bfn in own:
            raise refuse(f"FMAP entry at BFN {bfn:#x}: not in a written leaf, or over one of its own entries")
        if sid not in known:
            raise refuse(f"FMAP entry at BFN {bfn:#x} names no IOREQ server of the image")
        if kind == Kind.FOREIGN:
            if flags & ~(RW | pv.SWAP_MFN) or not flags & RW or gfn >= 1 << 40:
                raise refuse(f"foreign entry at BFN {bfn:#x}: bad flags or GFN")
        elif kind == Kind.SCRATCH:
            if gfn or not 0 < flags <= RW:
                raise refuse(f"scratch entry at BFN {bfn:#x}: a GFN, or bad permissions")
        else:
            raise refuse(f"FMAP entry at BFN {bfn:#x}: kind {kind} is neither foreign nor scratch")
    check_references(image, foreign=len(entries))
    return DmState(servers, entries)


def check_guest(state: DmState, guest_image: Image) -> None:
    """The device model's foreign entries name GFNs its guest's image populates (``-EINVAL``:
    not this guest's device model), checked before either is built."""
    gfns = set(guest_image.gfns)
    for bfn, gfn, _sid, kind, _flags in state.entries:
        if kind == Kind.FOREIGN and gfn not in gfns:
            raise HypercallError(-EINVAL, f"the device model maps GFN {gfn:#x} at BFN {bfn:#x}, which its guest lacks")


# -- restore -------------------------------------------------------------------------------------
def check_frames(host: Host, state: DmState, guest: Domain) -> None:
    """Each foreign entry's GFN is a frame of the guest's, not Xen's (``-EINVAL`` otherwise)."""
    if not guest.is_hvm or guest.is_hwdom or guest.target is not None:
        raise HypercallError(-EINVAL, f"d{guest.domid} is not an HVM guest a device model may serve")
    p2m, frames = guest.p2m, host.frames
    for bfn, gfn, _sid, kind, _flags in state.entries:
        if kind != Kind.FOREIGN:
            continue
        mfn = p2m.get(gfn)
        if mfn is None or frames.is_xen(mfn):
            raise HypercallError(
                -EINVAL, f"the device model maps GFN {gfn:#x} at BFN {bfn:#x}: d{guest.domid} has no such frame"
            )


def check_host(host: Host, image: Image, state: DmState, guest: Domain) -> None:
    """What this host and the (restored) guest must offer; raises before anything is allocated."""
    check_frames(host, state, guest)
    frames = host.frames
    need = image.meta["domain"]["pages"] + image.meta["held"] + len(state.servers)
    if need > frames.nr_free:
        raise HypercallError(-ENOMEM, f"host too small: the device model needs {need} frames ({frames.nr_free} free)")
    if host.ioreq.next_id + len(state.servers) - 1 > MAX_IOSERVID:
        raise HypercallError(-ENOSPC, "IOREQ server ids are exhausted on this host")


def restore_dm(
    host: Host,
    image: Image,
    guest_domid: int,
    renumbered: dict[int, int] | None = None,
    state: DmState | None = None,
) -> Generator[str, None, Domain]:
    """Build the device model of the (restored) guest ``guest_domid``: its own domain as any
    restore builds one (with ``target`` = the guest), then its servers (new ids, written into
    ``renumbered`` old -> new) and its foreign and scratch entries, a slice at a time with the
    device model busy and the guest's p2m held (it cannot balloon meanwhile). Rolled back (the
    device model destroyed) on any failure or cut; the guest is the caller's. ``state``: its
    records as ``parse`` read them already."""
    return (yield from _restore_dm(host, image, state or parse(image), guest_domid, renumbered))


def _restore_dm(
    host: Host, image: Image, state: DmState, guest_domid: int, renumbered: dict[int, int] | None
) -> Generator[str, None, Domain]:
    guest = host.domain(guest_domid)
    check_host(host, image, state, guest)
    dm = yield from restore.restore(host, image, target=guest_domid)
    built = False
    reading = False
    try:
        if host.domains.get(guest_domid) is not guest or dm.target != guest_domid:
            raise HypercallError(-ESRCH, f"d{guest_domid} was destroyed while its device model was restored")
        check_frames(host, state, guest)  # its p2m may have changed meanwhile
        dm.busy_ops += 1
        guest.p2m_readers += 1
        reading = True
        ids = _make_servers(host, dm, guest, image, state)
        if renumbered is not None:
            renumbered.update(ids)
        yield from _make_entries(host, dm, guest, state, ids)
        built = True
    finally:
        if reading:
            dm.busy_ops -= 1
            guest.p2m_readers -= 1
        if not built and host.domains.get(dm.domid) is dm:
            host.destroy_domain(dm.domid)
    return dm


def _make_servers(host: Host, dm: Domain, guest: Domain, image: Image, state: DmState) -> dict[int, int]:
    """Each saved server, created anew for the guest with its ring and counters; old -> new ids."""
    registry, iommu = host.ioreq, host.iommu
    ids = {}
    for saved in state.servers:
        if registry.exhausted():
            raise HypercallError(-ENOSPC, "IOREQ server ids are exhausted on this host")
        scratch = host.frames.allocate_for_xen()
        if scratch is None:
            raise HypercallError(-ENOMEM, "no free frame for an IOREQ server's scratch frame")
        xen_changes.scratch_taken(iommu, scratch)
        server = registry.create(dm.domid, guest.domid, scratch)
        server.page[:] = saved.ring
        server.next_sync_id, server.buffered_sent, server.sync_sent = (
            saved.next_sync_id,
            saved.buffered_sent,
            saved.sync_sent,
        )
        ids[saved.id] = server.id
    iommu.flush_touched()
    registry.created_by[dm.domid] = image.meta["domain"]["servers_created"]  # the live ones included
    return ids


def _make_entries(
    host: Host, dm: Domain, guest: Domain, state: DmState, ids: dict[int, int]
) -> Generator[str, None, None]:
    """Foreign entries as a fresh ``map_foreign_page`` makes them (M2B entry, references, IOMMU
    entry), scratch entries at the new servers' scratch frames; ``SLICE`` at a time."""
    iommu, frames = host.iommu, host.frames
    ctx = iommu.contexts.get(dm.domid)
    servers = {new: host.ioreq.servers[new] for new in ids.values()}
    for done, (bfn, gfn, sid, kind, flags) in enumerate(state.entries):
        if done and not done % SLICE:
            yield PREEMPT
            if host.domains.get(guest.domid) is not guest or host.domains.get(dm.domid) is not dm:
                raise HypercallError(-ESRCH, "the guest or its device model was destroyed while it was restored")
        assert ctx is not None  # parse: entries go with a context
        if bfn in ctx.rmrr or ctx.table.get(bfn):
            raise refuse(f"FMAP entry at BFN {bfn:#x} falls on an entry of the device model's own")
        new = ids[sid]
        if kind == Kind.FOREIGN:
            mfn = guest.p2m.get(gfn)
            assert mfn is not None  # checked, and the guest cannot balloon meanwhile
            entry = M2BEntry(mfn, bfn, dm.domid, guest.domid, new, flags, True)
            iommu.m2b.add(entry)
            frames.get(mfn, entry.writable)
            ctx.table.set(bfn, make_entry(mfn, Kind.FOREIGN, flags & RW))
        else:
            ctx.table.set(bfn, make_entry(servers[new].scratch_mfn, Kind.SCRATCH, flags))
            ctx.scratch[bfn] = new
        iommu.count_mappings(dm.domid, 1)
    if ctx is not None:
        ctx.iotlb.invalidate_all()  # nothing could have cached them; a cache starts empty


# -- a guest with its device models, as the toolstack (and a live migration's last step) asks ---
#: Device models one guest may take with it: each image is a transfer, and a host keeps 8 open.
MAX_DEVICE_MODELS = 7


@dataclass
class RestoredDm:
    dom: Domain
    #: The old server id -> the id it has on this host.
    servers: dict[int, int]


def snapshot_with_dms(host: Host, guest_domid: int) -> tuple[Image, list[tuple[int, Image]]]:
    """The guest's image and each of its device models' (by domid), read at one point (one step);
    reading changes nothing, so a refusal of any of them leaves all as they were (the caller
    destroys the device models, then the guest, unless they keep running)."""
    image = save.snapshot(host, guest_domid)  # the guest's own refusals first
    dms = device_models(host, guest_domid)
    if not dms:
        raise HypercallError(-EINVAL, f"with_dm: no device-model domain has d{guest_domid} as its target")
    if len(dms) > MAX_DEVICE_MODELS:
        raise HypercallError(-EINVAL, f"d{guest_domid} has more than {MAX_DEVICE_MODELS} device models")
    return image, [(domid, snapshot_dm(host, domid, guest_domid)) for domid in dms]


def check_restore(host: Host, image: Image, dm_images: list[Image]) -> list[DmState]:
    """Before anything is built: the device models name frames of this guest, and the host has
    room for all of them together (frames, IOREQ server ids). Their checked records."""
    if len(dm_images) > MAX_DEVICE_MODELS:
        raise HypercallError(-EINVAL, f"at most {MAX_DEVICE_MODELS} device models go with a guest")
    states = [parse(d) for d in dm_images]
    for state in states:
        check_guest(state, image)
    need = image.meta["domain"]["pages"] + image.meta["held"]
    for dm_image, state in zip(dm_images, states, strict=True):
        need += dm_image.meta["domain"]["pages"] + dm_image.meta["held"] + len(state.servers)
    if need > host.frames.nr_free:
        raise HypercallError(
            -ENOMEM, f"host too small: the guest and its device models need {need} frames ({host.frames.nr_free} free)"
        )
    if host.ioreq.next_id + sum(len(s.servers) for s in states) - 1 > MAX_IOSERVID:
        raise HypercallError(-ENOSPC, "IOREQ server ids are exhausted on this host")
    return states


def restore_with_dms(
    host: Host, image: Image, dm_images: list[Image]
) -> Generator[str, None, tuple[Domain, list[RestoredDm]]]:
    """The guest, then each device model against it; all checked first, and on any failure or
    cut everything built is destroyed (device models first)."""
    states = check_restore(host, image, dm_images)
    guest = yield from restore.restore(host, image)
    built: list[RestoredDm] = []
    done = False
    try:
        for dm_image, state in zip(dm_images, states, strict=True):
            ids: dict[int, int] = {}
            dom = yield from _restore_dm(host, dm_image, state, guest.domid, ids)
            built.append(RestoredDm(dom, ids))
        done = True
    finally:
        if not done:
            for restored in reversed(built):
                if host.domains.get(restored.dom.domid) is restored.dom:
                    host.destroy_domain(restored.dom.domid)
            if host.domains.get(guest.domid) is guest:
                host.destroy_domain(guest.domid)
    return guest, built
