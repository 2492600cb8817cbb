"""An independent reference model of pv-iommu-semantics.md, written for clarity, not speed.

Plain dicts and lists, every default entry stored explicitly, every rule spelled out in the
order the semantics page gives it. It shares no code with xenemu's core beyond the numbers of
the ABI, so the model-based test can hold the two against each other after every step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Numbers from the ABI (the spec's, not xenemu's code).
EPERM, ENOENT, ESRCH, EIO, ENXIO, E2BIG, ENOMEM, EACCES, EBUSY, EEXIST, ENODEV, EINVAL, ENOSPC, EOPNOTSUPP = (
    1,
    2,
    3,
    5,
    6,
    7,
    12,
    13,
    16,
    17,
    19,
    22,
    28,
    95,
)
DOMID_SELF, DOMID_XEN = 0x7FF0, 0x7FF2
#: Slots of an IOREQ server's buffered ring; a BFN at or above 2^32 takes two.
RING_SLOTS = 511
MAX_IOSERVID = 65535
R, W, NOREF, SWAP = 1, 2, 4, 4
QUERY_CAPS, MAP, UNMAP, MAP_FOREIGN, LOOKUP, UNMAP_FOREIGN = 1, 2, 3, 4, 5, 6


@dataclass
class Frame:
    owner: int | None = None
    populated: bool = False
    refs: int = 0
    wrefs: int = 0


@dataclass
class Entry:
    mfn: int
    kind: str  # default, map, noref, foreign, scratch, rmrr
    perms: int
    ioserver: int = 0  # scratch entries


@dataclass
class Dom:
    domid: int
    kind: str
    hwdom: bool = False
    target: int | None = None
    p2m: dict[int, int] = field(default_factory=dict)
    devices: set[str] = field(default_factory=set)
    ctx: dict[int, Entry] | None = None
    rmrr: set[int] = field(default_factory=set)
    #: Grant entries it wrote: ref -> (domid, gfn, readonly); and how often each is mapped.
    grants: dict[int, tuple[int, int, bool]] = field(default_factory=dict)
    pins: dict[int, int] = field(default_factory=dict)
    #: Grants of others it mapped: handle -> mapping.
    maptrack: dict[int, dict[str, Any]] = field(default_factory=dict)
    next_handle: int = 0
    #: The most frames it may populate (xl's maxmem: its memory at creation; dom0: all RAM).
    max_pages: int = 1 << 30


@dataclass
class M2BEntry:
    mfn: int
    bfn: int
    mapper: int
    domid: int
    ioserver: int
    flags: int
    owns: bool


class Reference:
    def __init__(
        self,
        iommu: bool,
        strict: bool,
        passthrough: bool,
        max_order: int,
        nr_frames: int,
        xen_frames: int,
        dom0_memory: int,
        dom0_kind: str,
    ) -> None:
        self.iommu, self.strict, self.passthrough = iommu, strict, passthrough
        self.max_order = max_order if iommu else 0
        self.nr_frames, self.xen_frames = nr_frames, xen_frames
        self.frames = [Frame() for _ in range(nr_frames)]
        for mfn in range(xen_frames):
            self.frames[mfn] = Frame(owner=DOMID_XEN, populated=False, refs=1)
        self.doms: dict[int, Dom] = {}
        self.m2b: list[M2BEntry] = []
        self.servers: dict[int, dict[str, Any]] = {}
        self.next_server = 1
        self.created_by: dict[int, int] = {}
        self.faults: set[tuple[int, int]] = set()
        #: Per IOREQ server, the invalidates announced in order: ("buffered" | "sync", bfn).
        self.invalidates: dict[int, list[tuple[str, int]]] = {}
        self.pending: list[tuple[int, int]] = []
        #: Scratch frames whose 1:1 default entry of the non-strict hardware domain went when
        #: they became scratch frames, and that no subop has written since: it comes back when
        #: the frame is freed.
        self.defaults_owed: set[int] = set()
        self.next_domid = 1
        dom0 = Dom(0, dom0_kind, hwdom=True)
        self.doms[0] = dom0
        self._give_memory(dom0, dom0_memory)

    # -- frames ---------------------------------------------------------------------------------
    def _lowest_free(self) -> int | None:
        for mfn, frame in enumerate(self.frames):
            if frame.owner is None:
                return mfn
        return None

    def _alloc(self, domid: int) -> int | None:
        mfn = self._lowest_free()
        if mfn is not None:
            self.frames[mfn] = Frame(owner=domid, populated=True, refs=1)
        return mfn

    def _get(self, mfn: int, writable: bool) -> None:
        self.frames[mfn].refs += 1
        self.frames[mfn].wrefs += writable

    def _put(self, mfn: int, writable: bool) -> None:
        frame = self.frames[mfn]
        frame.refs -= 1
        frame.wrefs -= writable
        if frame.refs == 0:
            self.frames[mfn] = Frame()

    def _give_memory(self, dom: Dom, pages: int) -> None:
        for gfn in range(pages):
            mfn = self._alloc(dom.domid)
            assert mfn is not None
            if dom.kind == "hvm":
                dom.p2m[gfn] = mfn

    def belongs(self, mfn: int, domid: int) -> bool:
        return 0 <= mfn < self.nr_frames and self.frames[mfn].owner == domid and self.frames[mfn].populated

    def own_frames(self, dom: Dom) -> list[int]:
        if dom.kind == "hvm":
            return [m for _, m in sorted(dom.p2m.items())]
        return [m for m in range(self.nr_frames) if self.belongs(m, dom.domid)]

    def gfn_to_mfn(self, dom: Dom, gfn: int) -> int | None:
        if dom.kind == "hvm":
            return dom.p2m.get(gfn)
        return gfn if self.belongs(gfn, dom.domid) else None

    # -- domains and devices ----------------------------------------------------------------------
    def non_strict_hwdom(self, dom: Dom) -> bool:
        return dom.hwdom and not self.strict

    def map_cap(self, dom: Dom) -> bool:
        return self.iommu and bool(dom.devices) and not (dom.hwdom and self.passthrough)

    def privileged(self, dom: Dom, other: Dom) -> bool:
        return other.domid != dom.domid and (dom.hwdom or dom.target == other.domid)

    def create_domain(self, kind: str, memory: int, target: int | None) -> int:
        free = sum(1 for f in self.frames if f.owner is None)
        if memory > free:
            return -ENOMEM
        held = {f.owner for f in self.frames}
        for _ in range(0x7FF0):
            domid = self.next_domid
            self.next_domid = domid + 1 if domid + 1 < 0x7FF0 else 1
            if domid not in self.doms and domid not in held:
                break
        dom = Dom(domid, kind, target=target, max_pages=memory)
        self.doms[domid] = dom
        self._give_memory(dom, memory)
        return domid

    def defaults(self, dom: Dom) -> dict[int, Entry]:
        if self.non_strict_hwdom(dom):
            return {
                m: Entry(m, "default", R | W)
                for m in range(self.xen_frames, self.nr_frames)
                if self.frames[m].owner != DOMID_XEN
            }
        if dom.kind == "hvm":
            return {g: Entry(m, "default", R | W) for g, m in dom.p2m.items()}
        return {m: Entry(m, "default", R | W) for m in self.own_frames(dom)}

    def assign(self, domid: int, bdf: str) -> int:
        """A device with no RMRR region (the model test's devices)."""
        dom = self.doms[domid]
        if dom.kind == "hvm" and not self.iommu:  # Xen refuses: its DMA would reach any frame
            return -EOPNOTSUPP
        if self.iommu and not (dom.hwdom and self.passthrough) and dom.ctx is None:
            if any(e.mapper == domid for e in self.m2b):
                return -EBUSY
            dom.ctx = self.defaults(dom)
        dom.devices.add(bdf)
        return 0

    def destroy_domain(self, domid: int) -> int:
        dom = self.doms.get(domid)
        if dom is None:
            return -ESRCH
        if dom.hwdom:
            return -EPERM
        self.pending = []
        for sid in [s for s, v in self.servers.items() if v["creator"] == domid]:
            self._destroy_server(sid)
        for handle in list(dom.maptrack):
            self._release_grant(dom, handle)
        if dom.ctx is not None:
            for entry in dom.ctx.values():
                if entry.kind == "map":
                    self._put(entry.mfn, bool(entry.perms & W))
        for server in self.servers.values():
            if server["target"] == domid:
                server["target"] = None
        for other in self.doms.values():
            if other.target == domid:
                other.target = None
        self.created_by.pop(domid, None)
        self.faults = {f for f in self.faults if f[0] != domid}
        del self.doms[domid]
        for mfn in self.own_frames(dom):
            self._release(mfn)
            self.frames[mfn].populated = False
            self._put(mfn, False)
        self._announce()
        return 0

    def save_restore(self, domid: int) -> int:
        """``xl save`` (the domain goes, as destroy) then ``xl restore`` of its image: the new
        domid, or the errno that refused the save (nothing changed) or the restore (it is gone)."""
        dom = self.doms.get(domid)
        if dom is None:
            return -ESRCH
        if dom.hwdom:
            return -EPERM
        if dom.kind != "hvm" or dom.target is not None:
            return -EOPNOTSUPP
        if any(v["creator"] == domid for v in self.servers.values()) or dom.maptrack or dom.pins:
            return -EBUSY
        if any(e.mapper == domid for e in self.m2b):
            return -EBUSY
        ctx = dom.ctx
        held = sorted(
            {
                e.mfn
                for e in (ctx or {}).values()
                if e.kind == "map" and self.frames[e.mfn].owner == domid and not self.frames[e.mfn].populated
            }
        )
        own: dict[int, tuple[str, int]] = {m: ("gfn", g) for g, m in dom.p2m.items()}
        own.update({m: ("held", i) for i, m in enumerate(held)})
        saved: dict[int, tuple[tuple[str, int] | None, str, int]] = {}
        for bfn, e in (ctx or {}).items():
            if e.kind not in ("default", "map", "noref", "rmrr") or (e.kind != "rmrr" and e.mfn not in own):
                return -EBUSY
            saved[bfn] = (None if e.kind == "rmrr" else own[e.mfn], e.kind, e.perms)
        gfns, devices = sorted(dom.p2m), set(dom.devices)
        grants, next_handle, max_pages = dict(dom.grants), dom.next_handle, dom.max_pages
        created = self.created_by.get(domid, 0)
        self.destroy_domain(domid)
        if len(gfns) + len(held) > sum(1 for f in self.frames if f.owner is None):
            return -ENOMEM
        new = self.create_domain("hvm", 0, None)
        restored = self.doms[new]
        restored.max_pages, restored.grants, restored.next_handle = max_pages, grants, next_handle
        if created:
            self.created_by[new] = created
        for gfn in gfns:
            mfn = self._alloc(new)
            assert mfn is not None
            restored.p2m[gfn] = mfn
        new_held = [self._alloc(new) for _ in held]
        restored.devices = devices
        if ctx is not None:
            restored.ctx = {}
            for bfn, (ref, kind, perms) in saved.items():
                if ref is None:
                    mfn = bfn
                else:
                    got = restored.p2m[ref[1]] if ref[0] == "gfn" else new_held[ref[1]]
                    assert got is not None
                    mfn = got
                restored.ctx[bfn] = Entry(mfn, kind, perms)
                if kind == "map":
                    self._get(mfn, bool(perms & W))
        for mfn in new_held:
            assert mfn is not None
            self.frames[mfn].populated = False
            self._put(mfn, False)
        return new

    def _announce(self) -> None:
        """Send the call's invalidates in the order they were owed; the test's emulators emptied
        every ring before the call, so each has all its slots."""
        free = {sid: RING_SLOTS for sid in self.servers}
        for sid, bfn in self.pending:
            if sid not in self.servers:
                continue
            need = 2 if bfn >= 1 << 32 else 1
            how = "buffered" if free[sid] >= need else "sync"
            if how == "buffered":
                free[sid] -= need
            self.invalidates.setdefault(sid, []).append((how, bfn))
        self.pending = []

    # -- IOREQ servers ----------------------------------------------------------------------------
    def create_server(self, caller: int, target: int) -> int:
        dom = self.doms[caller]
        if target == DOMID_SELF:
            target = caller
        guest = self.doms.get(target)
        if guest is None:
            return -ESRCH
        if not self.privileged(dom, guest):
            return -EPERM
        if self.next_server > MAX_IOSERVID:
            return -ENOSPC
        live = sum(1 for v in self.servers.values() if v["creator"] == caller)
        if live >= 8 or self.created_by.get(caller, 0) >= 256:
            return -ENOSPC
        scratch = self._lowest_free()
        if scratch is None:
            return -ENOMEM
        self.frames[scratch] = Frame(owner=DOMID_XEN, populated=False, refs=1)
        hwdom = self._hwdom_with_defaults()
        if hwdom is None or hwdom.ctx is None or (hwdom.ctx.get(scratch) or Entry(0, "", 0)).kind == "default":
            # The frame is Xen's now: the non-strict hardware domain's 1:1 default of it goes.
            if hwdom is not None and hwdom.ctx is not None:
                del hwdom.ctx[scratch]
            self.defaults_owed.add(scratch)
        sid = self.next_server
        self.next_server += 1
        self.created_by[caller] = self.created_by.get(caller, 0) + 1
        self.servers[sid] = {"creator": caller, "target": target, "scratch": scratch}
        return sid

    def _hwdom_with_defaults(self) -> Dom | None:
        """The hardware domain, if it is the non-strict one (its defaults are 1:1 of all RAM)."""
        dom0 = self.doms.get(0)
        return dom0 if dom0 is not None and self.non_strict_hwdom(dom0) else None

    def _written(self, dom: Dom, bfn: int) -> None:
        """A subop wrote ``bfn`` of ``dom``'s context: no default comes back there by itself."""
        if dom.hwdom:
            self.defaults_owed.discard(bfn)

    def destroy_server(self, caller: int, sid: int) -> int:
        server = self.servers.get(sid)
        if server is None:
            return -ENOENT
        if server["creator"] != caller:
            return -EPERM
        self._destroy_server(sid)
        return 0

    def _destroy_server(self, sid: int) -> None:
        for entry in [e for e in self.m2b if e.ioserver == sid]:
            self._drop(entry)
        creator = self.doms.get(self.servers[sid]["creator"])
        if creator is not None and creator.ctx is not None:
            for bfn in [b for b, e in creator.ctx.items() if e.kind == "scratch" and e.ioserver == sid]:
                del creator.ctx[bfn]
        scratch = self.servers.pop(sid)["scratch"]
        self.frames[scratch] = Frame()  # its permanent reference was its last
        if scratch in self.defaults_owed:
            self.defaults_owed.discard(scratch)
            hwdom = self._hwdom_with_defaults()
            if hwdom is not None and hwdom.ctx is not None and scratch not in hwdom.ctx:
                hwdom.ctx[scratch] = Entry(scratch, "default", R | W)

    def _drop(self, entry: M2BEntry) -> None:
        self.m2b.remove(entry)
        if entry.owns:
            mapper = self.doms.get(entry.mapper)
            if mapper is not None and mapper.ctx is not None:
                mapper.ctx.pop(entry.bfn, None)
        self._put(entry.mfn, bool(entry.flags & W))

    # -- ballooning -------------------------------------------------------------------------------
    def _release(self, mfn: int) -> None:
        """The frame left its guest: swap everything to scratch, or announce every entry."""
        entries = [e for e in self.m2b if e.mfn == mfn]
        if not entries:
            return
        if self.iommu and all(e.flags & SWAP and e.owns for e in entries):
            for e in entries:
                self.m2b.remove(e)
                mapper = self.doms[e.mapper]
                assert mapper.ctx is not None
                scratch = self.servers[e.ioserver]["scratch"]
                mapper.ctx[e.bfn] = Entry(scratch, "scratch", e.flags & (R | W), e.ioserver)
                self._put(mfn, bool(e.flags & W))
            return
        self.pending.extend(sorted((e.ioserver, e.bfn) for e in entries))  # within a frame: server, BFN

    def decrease(self, domid: int, gfns: list[int]) -> tuple[int, int]:
        dom = self.doms[domid]
        self.pending = []
        done, status = 0, 0
        for gfn in gfns:
            mfn = self.gfn_to_mfn(dom, gfn)  # a PV GFN it does not own and populate, Xen's too: none
            if mfn is None:
                status = -ENOENT
                break
            if self.frames[mfn].owner == DOMID_XEN:  # an HVM GFN backed by one of Xen's frames
                status = -EPERM
                break
            bfn = gfn if dom.kind == "hvm" else mfn
            if dom.ctx is not None and not self.non_strict_hwdom(dom):
                entry = dom.ctx.get(bfn)
                if entry is not None and entry.kind == "default" and entry.mfn == mfn:
                    del dom.ctx[bfn]
            if dom.kind == "hvm":
                del dom.p2m[gfn]
            self._release(mfn)
            self.frames[mfn].populated = False
            self._put(mfn, False)
            done += 1
        self._announce()
        return done, status

    def populate(self, domid: int, gfns: list[int]) -> tuple[int, int]:
        dom = self.doms[domid]
        done, status = 0, 0
        for gfn in gfns:  # a PV guest's list is output only: just its length counts
            if dom.kind == "hvm" and gfn in dom.p2m:
                status = -EEXIST
                break
            if len(self.own_frames(dom)) >= dom.max_pages:
                status = -ENOMEM
                break
            mfn = self._alloc(domid)
            if mfn is None:
                status = -ENOMEM
                break
            if dom.kind == "hvm":
                dom.p2m[gfn] = mfn
            bfn = gfn if dom.kind == "hvm" else mfn
            if dom.ctx is not None and not self.non_strict_hwdom(dom) and bfn not in dom.ctx:
                dom.ctx[bfn] = Entry(mfn, "default", R | W)
            done += 1
        return done, status

    # -- the hypercall ----------------------------------------------------------------------------
    def iommu_op(self, caller: int, ops: list[dict[str, int]]) -> list[dict[str, int]]:
        """Each op as {subop, flags, bfn, gfn, domid, ioserver}; returns status and out fields."""
        out = []
        for op in ops:
            dom = self.doms[caller]
            handler = {
                QUERY_CAPS: self._query,
                MAP: self._map,
                UNMAP: self._unmap,
                MAP_FOREIGN: self._map_foreign,
                LOOKUP: self._lookup,
                UNMAP_FOREIGN: self._unmap_foreign,
            }.get(op["subop"])
            result = dict(op)
            result["status"] = handler(dom, op, result) if handler else -EOPNOTSUPP
            out.append(result)
        return out

    def _order_ok(self, flags: int) -> int | None:
        order = flags >> 10
        return None if order > self.max_order else order

    def _query(self, dom: Dom, op: dict[str, int], result: dict[str, int]) -> int:
        flags = self.max_order << 10
        if self.map_cap(dom):
            flags |= 1 | (2 if self.non_strict_hwdom(dom) else 0)
        result["flags"] = flags
        return 0

    def _map(self, dom: Dom, op: dict[str, int], result: dict[str, int]) -> int:
        flags = op["flags"]
        if flags & 0x3F8 or not flags & (R | W):
            return -EINVAL
        if not self.map_cap(dom):
            return -EOPNOTSUPP
        noref = bool(flags & NOREF)
        if noref and not self.non_strict_hwdom(dom):
            return -EPERM
        order = self._order_ok(flags)
        if order is None or op["bfn"] % (1 << order) or op["gfn"] % (1 << order):
            return -ENOSPC
        assert dom.ctx is not None
        planned = []
        for i in range(1 << order):
            gfn, bfn = op["gfn"] + i, op["bfn"] + i
            if dom.kind == "hvm":
                mfn = dom.p2m.get(gfn)
                if mfn is None:
                    return -EPERM
            elif self.non_strict_hwdom(dom):
                mfn = gfn
                if not 0 <= mfn < self.nr_frames or self.frames[mfn].owner == DOMID_XEN:
                    return -EPERM
                if self.frames[mfn].owner is None and not noref:
                    return -EPERM
            else:
                mfn = gfn
                if not self.belongs(mfn, dom.domid):
                    return -EPERM
            if bfn in dom.rmrr:
                return -EACCES
            existing = dom.ctx.get(bfn)
            if existing is not None and existing.kind != "default":
                return -EEXIST
            if (dom.domid, bfn) in self.faults:
                return -EIO
            planned.append((bfn, mfn))
        for bfn, mfn in planned:
            if not noref:
                self._get(mfn, bool(flags & W))
            dom.ctx[bfn] = Entry(mfn, "noref" if noref else "map", flags & (R | W))
            self._written(dom, bfn)
        return 0

    def _unmap(self, dom: Dom, op: dict[str, int], result: dict[str, int]) -> int:
        flags = op["flags"]
        if flags & 0x3FF:
            return -EINVAL
        order = self._order_ok(flags)
        if order is None or op["bfn"] % (1 << order):
            return -ENOSPC
        if dom.ctx is None:
            return -ENOENT
        planned = []
        for i in range(1 << order):
            bfn = op["bfn"] + i
            if bfn in dom.rmrr:
                return -EACCES
            entry = dom.ctx.get(bfn)
            if entry is None or entry.kind not in ("map", "noref", "default"):
                return -ENOENT
            if (dom.domid, bfn) in self.faults:
                return -EIO
            planned.append((bfn, entry))
        for bfn, entry in planned:
            if entry.kind == "map":
                self._put(entry.mfn, bool(entry.perms & W))
            del dom.ctx[bfn]
        return 0

    def _target(self, dom: Dom, domid: int, ioserver: int) -> Dom | int:
        if domid in (dom.domid, DOMID_SELF):
            return -EPERM
        guest = self.doms.get(domid) if domid < 0x7FF0 else None
        if guest is None:
            return -ENXIO
        if not self.privileged(dom, guest):
            return -EPERM
        server = self.servers.get(ioserver)
        if server is None or server["creator"] != dom.domid or server["target"] != domid:
            return -ENODEV
        return guest

    def _foreign_mfn(self, guest: Dom, gfn: int) -> int:
        mfn = self.gfn_to_mfn(guest, gfn)  # a PV GFN it does not own and populate, Xen's too: none
        if mfn is None:
            return -ENXIO
        return -EPERM if self.frames[mfn].owner == DOMID_XEN else mfn

    def _find(self, mapper: int, ioserver: int, bfn: int) -> M2BEntry | None:
        for e in self.m2b:
            if (e.mapper, e.ioserver, e.bfn) == (mapper, ioserver, bfn):
                return e
        return None

    def _map_foreign(self, dom: Dom, op: dict[str, int], result: dict[str, int]) -> int:
        flags = op["flags"]
        if flags & 0x3F8 or not flags & (R | W):
            return -EINVAL
        if self.iommu and not self.map_cap(dom):
            return -EOPNOTSUPP
        order = self._order_ok(flags)
        if order is None or op["gfn"] % (1 << order) or (self.iommu and op["bfn"] % (1 << order)):
            return -ENOSPC
        guest = self._target(dom, op["domid"], op["ioserver"])
        if isinstance(guest, int):
            return guest
        eflags = flags & (R | W | SWAP)
        planned = []
        for i in range(1 << order):
            mfn = self._foreign_mfn(guest, op["gfn"] + i)
            if mfn < 0:
                return mfn
            bfn = op["bfn"] + i if self.iommu else mfn
            existing = self._find(dom.domid, op["ioserver"], bfn)
            identical = existing is not None and (existing.mfn, existing.domid, existing.flags) == (
                mfn,
                guest.domid,
                eflags,
            )
            if dom.ctx is not None:
                if bfn in dom.rmrr:
                    return -EACCES
                if identical:
                    continue
                entry = dom.ctx.get(bfn)
                if entry is not None and entry.kind != "default":
                    return -EEXIST
                if (dom.domid, bfn) in self.faults:
                    return -EIO
            else:
                if identical:
                    continue
                if existing is not None:
                    return -EEXIST
            planned.append((bfn, mfn))
        for bfn, mfn in planned:
            self.m2b.append(M2BEntry(mfn, bfn, dom.domid, guest.domid, op["ioserver"], eflags, dom.ctx is not None))
            self._get(mfn, bool(eflags & W))
            if dom.ctx is not None:
                dom.ctx[bfn] = Entry(mfn, "foreign", flags & (R | W))
                self._written(dom, bfn)
        if dom.ctx is None:
            result["bfn"] = self._foreign_mfn(guest, op["gfn"])
        return 0

    def _lookup(self, dom: Dom, op: dict[str, int], result: dict[str, int]) -> int:
        guest = self._target(dom, op["domid"], op["ioserver"])
        if isinstance(guest, int):
            return guest
        mfn = self._foreign_mfn(guest, op["gfn"])
        if mfn < 0:
            return mfn
        mine = [e for e in self.m2b if e.mfn == mfn and e.ioserver == op["ioserver"]]
        if mine:
            best = min(mine, key=lambda e: e.bfn)
        elif not self.iommu or dom.ctx is None:
            best = M2BEntry(mfn, mfn, dom.domid, guest.domid, op["ioserver"], R | W, False)
            self.m2b.append(best)
            self._get(mfn, True)
        else:
            entry = dom.ctx.get(mfn)
            if entry is None or entry.kind != "default" or entry.mfn != mfn:
                return -ENOENT
            entry.kind = "foreign"
            best = M2BEntry(mfn, mfn, dom.domid, guest.domid, op["ioserver"], R | W, True)
            self.m2b.append(best)
            self._get(mfn, True)
        result["bfn"] = best.bfn
        result["flags"] = best.flags & (R | W)
        return 0

    def _unmap_foreign(self, dom: Dom, op: dict[str, int], result: dict[str, int]) -> int:
        flags = op["flags"]
        if flags & 0x3FF:
            return -EINVAL
        order = self._order_ok(flags)
        if order is None or op["bfn"] % (1 << order):
            return -ENOSPC
        planned = []
        for i in range(1 << order):
            bfn = op["bfn"] + i
            if dom.ctx is not None and bfn in dom.rmrr:
                return -EACCES
            entry = self._find(dom.domid, op["ioserver"], bfn)
            scratch = (
                dom.ctx is not None
                and bfn in dom.ctx
                and dom.ctx[bfn].kind == "scratch"
                and (dom.ctx[bfn].ioserver == op["ioserver"])
            )
            if entry is None and not scratch:
                return -ENOENT
            if (scratch or (entry is not None and entry.owns)) and (dom.domid, bfn) in self.faults:
                return -EIO
            planned.append((bfn, entry))
        for bfn, entry in planned:
            if entry is not None:
                self._drop(entry)
            elif dom.ctx is not None:
                del dom.ctx[bfn]
        return 0

    # -- grants -----------------------------------------------------------------------------------
    def grant_access(self, caller: int, ref: int, domid: int, gfn: int, readonly: bool) -> int:
        dom = self.doms[caller]
        if not 0 <= ref < 1024:
            return -EINVAL
        if dom.pins.get(ref):
            return -EBUSY
        dom.grants[ref] = (domid, gfn, readonly)
        return 0

    def end_access(self, caller: int, ref: int) -> int:
        dom = self.doms[caller]
        if not 0 <= ref < 1024:
            return -EINVAL
        if dom.pins.get(ref):
            return -EBUSY
        dom.grants.pop(ref, None)
        return 0

    def map_grant(self, caller: int, op: dict[str, int]) -> dict[str, int]:
        """One gnttab_map_grant_ref: its status, handle and dev_bus_addr."""
        mapper = self.doms[caller]
        out = {"status": 0, "handle": op.get("handle", 0), "dev_bus_addr": op["dev_bus_addr"]}
        flags = op["flags"]
        readonly = bool(flags & 4)

        def fail(status: int) -> dict[str, int]:
            out["status"] = status
            return out

        if not flags & 3:
            return fail(-3)
        granter = self.doms.get(op["dom"]) if op["dom"] < 0x7FF0 else None
        if granter is None or granter is mapper:
            return fail(-2)
        grant = granter.grants.get(op["ref"]) if op["ref"] < 1024 else None
        if grant is None or grant[0] != caller:
            return fail(-3)
        if not readonly and grant[2]:
            return fail(-8)
        mfn = self.gfn_to_mfn(granter, grant[1])
        if mfn is None:
            return fail(-9)
        if flags & 2 and (not op["host_addr"] or op["host_addr"] & 0xFFF):
            return fail(-5)
        bfn = None
        if flags & 1 and flags & 0x40:
            if op["dev_bus_addr"] & 0xFFF:
                return fail(-6)
            if mapper.ctx is None or not self.map_cap(mapper):
                return fail(-1)
            bfn = op["dev_bus_addr"] >> 12
            present = mapper.ctx.get(bfn)
            if bfn in mapper.rmrr or (present is not None and present.kind != "default"):
                return fail(-6)
            if (caller, bfn) in self.faults:
                return fail(-1)
        handle = None
        for _ in range(4096):
            candidate = mapper.next_handle
            mapper.next_handle = (candidate + 1) % 4096
            if candidate not in mapper.maptrack:
                handle = candidate
                break
        if handle is None or len(mapper.maptrack) >= 4096:
            return fail(-13)
        dev = mfn << 12 if flags & 1 and bfn is None else 0
        mapper.maptrack[handle] = {
            "granter": granter.domid,
            "ref": op["ref"],
            "mfn": mfn,
            "readonly": readonly,
            "host_addr": op["host_addr"],
            "bfn": bfn,
            "dev": dev,
        }
        self._get(mfn, not readonly)
        granter.pins[op["ref"]] = granter.pins.get(op["ref"], 0) + 1
        if bfn is not None and mapper.ctx is not None:
            mapper.ctx[bfn] = Entry(mfn, "grant", R if readonly else R | W)
            self._written(mapper, bfn)
        elif dev:
            out["dev_bus_addr"] = dev
        out["handle"] = handle
        return out

    def unmap_grant(self, caller: int, op: dict[str, int]) -> int:
        mapper = self.doms[caller]
        mapping = mapper.maptrack.get(op["handle"])
        if mapping is None:
            return -4
        if op["host_addr"] and op["host_addr"] != mapping["host_addr"]:
            return -5
        bus = mapping["bfn"] << 12 if mapping["bfn"] is not None else mapping["dev"]
        if op["dev_bus_addr"] and op["dev_bus_addr"] != bus:
            return -6
        if mapping["bfn"] is not None and (caller, mapping["bfn"]) in self.faults:
            return -1
        self._release_grant(mapper, op["handle"])
        return 0

    def _release_grant(self, mapper: Dom, handle: int) -> None:
        mapping = mapper.maptrack.pop(handle)
        if mapping["bfn"] is not None and mapper.ctx is not None:
            mapper.ctx.pop(mapping["bfn"], None)
        self._put(mapping["mfn"], not mapping["readonly"])
        granter = self.doms.get(mapping["granter"])
        if granter is not None:
            granter.pins[mapping["ref"]] -= 1
            if not granter.pins[mapping["ref"]]:
                del granter.pins[mapping["ref"]]

    # -- devices ----------------------------------------------------------------------------------
    def translate(self, domid: int, bfn: int, write: bool) -> int | None:
        """What a device of ``domid`` reaches at ``bfn`` (None: a fault)."""
        dom = self.doms[domid]
        if dom.ctx is None:
            return bfn if 0 <= bfn < self.nr_frames else None
        entry = dom.ctx.get(bfn)
        if entry is None or not entry.perms & (W if write else R):
            return None
        return entry.mfn
