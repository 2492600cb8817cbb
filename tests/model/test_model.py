"""Model-based test: random call sequences on the core and on the reference model, step by step.

After every step the audit must be clean, and statuses, out fields, every frame's reference
counts, every IOMMU context, the M2B, IOREQ servers and the invalidates announced must equal
what the independent reference model (tests/model/reference.py) predicts.

The CI profile runs a couple of hundred sequences; for a long campaign:

    XENEMU_MODEL_EXAMPLES=20000 XENEMU_MODEL_STEPS=80 pytest tests/model -p no:cacheprovider
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from tests.model.reference import Reference
from xenemu.abi.grant_table import MapGrant, UnmapGrant, pack_map, pack_unmap, unpack_map, unpack_unmap
from xenemu.abi.ioreq import read_ring, read_sync
from xenemu.abi.pv_iommu import Op, pack, unpack
from xenemu.core.actions.dispatch import run
from xenemu.core.actions.migration import (
    ImageRead,
    ImageWrite,
    MigrateBegin,
    MigrateCommit,
    MigrateDrop,
    MigrateFinish,
    MigrateReceive,
    MigrateResume,
    MigrateSend,
    MigrateSuspend,
    RestoreBegin,
    RestoreDomain,
    SaveDomain,
)
from xenemu.core.audit import audit
from xenemu.core.errors import HypercallError
from xenemu.core.host import Host
from xenemu.core.iommu.entries import Kind, entry_kind, entry_mfn, entry_perms
from xenemu.core.iommu.subops import run_iommu_op
from xenemu.core.ioreq.balloon import WaitForIoreqs
from xenemu.core.migration.store import CHUNK
from xenemu.core.options import HostOptions

NR_FRAMES, XEN_FRAMES, DOM0_MEMORY = 160, 16, 24
KIND_NAMES = {
    Kind.GRANT: "grant",
    Kind.DEFAULT: "default",
    Kind.MAP: "map",
    Kind.MAP_NOREF: "noref",
    Kind.FOREIGN: "foreign",
    Kind.SCRATCH: "scratch",
    Kind.RMRR: "rmrr",
}

orders = st.sampled_from([0, 0, 0, 1, 2, 19])
perms = st.sampled_from([1, 2, 3, 3, 0, 7, 11])
flags = st.one_of(st.builds(lambda p, o: p | (o << 10), perms, orders), st.integers(0, 0xFFFF))
small = st.one_of(st.integers(0, 40), st.integers(0, NR_FRAMES + 8), st.sampled_from([0x1000, 0x1002, 0x1004]))
frame_numbers = st.one_of(small, st.just(2**64 - 1))
op_strategy = st.builds(
    Op,
    subop=st.sampled_from([1, 2, 2, 3, 3, 4, 4, 5, 6, 6, 0, 9]),
    flags=flags,
    bfn=frame_numbers,
    gfn=frame_numbers,
    domid=st.one_of(st.integers(0, 8), st.sampled_from([0x7FF0, 0x7FF2, 0x7FF4])),
    ioserver=st.integers(0, 6),
)


class PvIommuModel(RuleBasedStateMachine):
    host: Host
    ref: Reference
    #: Whether the host runs map/unmap through the compiled fast path.
    fast_path = True

    @initialize(
        iommu=st.sampled_from([True, True, False]),
        mode=st.sampled_from(["default", "default", "strict", "passthrough"]),
        dom0_kind=st.sampled_from(["pv", "hvm"]),
        max_order=st.sampled_from([0, 2, 18]),
    )
    def setup(self, iommu: bool, mode: str, dom0_kind: str, max_order: int) -> None:
        options = HostOptions(
            iommu=iommu,
            dom0_strict=mode == "strict",
            dom0_passthrough=mode == "passthrough",
            max_order=max_order,
            nr_frames=NR_FRAMES,
            xen_frames=XEN_FRAMES,
            dom0_memory=DOM0_MEMORY,
            dom0_kind=dom0_kind,  # type: ignore[arg-type]
            fault_injection=True,
            fast_path=self.fast_path,
        )
        self.host = Host(options)
        self.ref = Reference(
            iommu, mode == "strict", mode == "passthrough", max_order, NR_FRAMES, XEN_FRAMES, DOM0_MEMORY, dom0_kind
        )
        self.next_bus = 1
        #: Per IOREQ server, what its emulator saw in order: ("buffered" | "sync", bfn).
        self.announced: dict[int, list[tuple[str, int]]] = {}

    def pick(self, index: int) -> int:
        domids = sorted(self.host.domains)
        return domids[index % len(domids)]

    def errno(self, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except HypercallError as exc:
            return exc.errno

    # -- rules ------------------------------------------------------------------------------------
    @rule(
        kind=st.sampled_from(["pv", "hvm"]), memory=st.integers(0, 24), dm_of=st.integers(-1, 6), device=st.booleans()
    )
    def create_domain(self, kind: str, memory: int, dm_of: int, device: bool) -> None:
        target_id = None if dm_of < 0 else self.pick(dm_of)
        got = self.errno(self.host.create_domain, kind, memory, target_id)
        want = self.ref.create_domain(kind, memory, target_id)
        domid = got if isinstance(got, int) else got.domid
        assert domid == want
        if want >= 0 and device:
            self.assign(want)

    def assign(self, domid: int) -> None:
        bdf = f"00:{self.next_bus % 32:02x}.{self.next_bus // 32 % 8}"
        self.next_bus += 1
        got = self.errno(self.host.assign_device, domid, bdf)
        want = self.ref.assign(domid, "0000:" + bdf)
        assert (0 if not isinstance(got, int) else got) == want

    @rule(guest_kind=st.sampled_from(["pv", "hvm"]), dm_kind=st.sampled_from(["pv", "hvm"]), device=st.booleans())
    def emulator_for_a_new_guest(self, guest_kind: str, dm_kind: str, device: bool) -> None:
        """A guest, a device model domain for it and its IOREQ server: the foreign subops' stage."""
        before = set(self.host.domains)
        self.create_domain(guest_kind, 8, -1, True)
        guest = next(iter(set(self.host.domains) - before), None)
        if guest is None:
            return
        got = self.errno(self.host.create_domain, dm_kind, 4, guest)
        want = self.ref.create_domain(dm_kind, 4, guest)
        assert (got if isinstance(got, int) else got.domid) == want
        if want < 0:
            return
        if device:
            self.assign(want)
        server = self.errno(self.host.emulators.create_server, want, guest)
        assert (server if isinstance(server, int) else server.id) == self.ref.create_server(want, guest)

    @rule(index=st.integers(0, 8))
    def assign_device(self, index: int) -> None:
        if self.next_bus < 250:
            self.assign(self.pick(index))

    @rule(index=st.integers(0, 8))
    def destroy_domain(self, index: int) -> None:
        domid = self.pick(index)
        got = self.errno(self.host.destroy_domain, domid)
        assert (got or 0) == self.ref.destroy_domain(domid)
        self.collect_invalidates()

    @rule(caller=st.integers(0, 8), guest=st.integers(0, 8))
    def create_server(self, caller: int, guest: int) -> None:
        c, t = self.pick(caller), self.pick(guest)
        got = self.errno(self.host.emulators.create_server, c, t)
        assert (got if isinstance(got, int) else got.id) == self.ref.create_server(c, t)

    @rule(index=st.integers(0, 8))
    def save_restore(self, index: int) -> None:
        """``xl save`` then ``xl restore`` through the actions and the image bytes: from here on
        the model follows the domain under its new domid, and nothing else may differ."""
        domid = self.pick(index)
        try:
            saved = run(self.host, 0, SaveDomain(domid))
        except HypercallError as exc:
            event(f"save refused: {exc.errno}")
            assert exc.errno == self.ref.save_restore(domid)
            return
        data = b"".join(
            run(self.host, 0, ImageRead(saved["image"], at, CHUNK))["data"] for at in range(0, saved["size"], CHUNK)
        )
        incoming = run(self.host, 0, RestoreBegin(len(data)))["image"]
        run(self.host, 0, ImageWrite(incoming, 0, data))
        got = self.errno(lambda: run(self.host, 0, RestoreDomain(incoming))["domid"])
        want = self.ref.save_restore(domid)
        self.collect_invalidates()
        event(f"save/restore: {'restored' if want > 0 else want}")
        assert got == want

    @rule(index=st.integers(0, 8), section=st.integers(1, 40))
    def migrate(self, index: int, section: int) -> None:
        """``xl migrate`` to another host and back, through the actions and the sections' bytes:
        as a save and a restore here (the domain goes from here at the first hop's end and comes
        back under a new domid), so the reference predicts it as one; nothing else may differ."""
        domid = self.pick(index)
        there = Host(self.host.options)
        try:
            back = self._migrate(self.host, there, domid, section)
        except HypercallError as exc:
            event(f"migration refused: {exc.errno}")
            assert exc.errno == self.ref.save_restore(domid)
            assert domid in self.host.domains and not self.host.suspended and not audit(self.host)
            return
        self.collect_invalidates()
        assert not audit(there)
        home = self._migrate(there, self.host, back, section)
        want = self.ref.save_restore(domid)
        self.collect_invalidates()
        event("migrated there and back")
        assert home == want and not there.domains.keys() - {0}

    def _migrate(self, src: Host, dst: Host, domid: int, section: int) -> int:
        """A live migration run step by step: pre-copy sections, the stop, the last section."""
        mig = run(src, 0, MigrateBegin(domid))["migration"]
        incoming = 0

        def carry(reply: dict[str, Any]) -> dict[str, Any]:
            data = b"".join(
                run(src, 0, ImageRead(reply["image"], at, CHUNK))["data"] for at in range(0, reply["size"], CHUNK)
            )
            image = run(dst, 0, RestoreBegin(len(data)))["image"]
            run(dst, 0, ImageWrite(image, 0, data))
            got: dict[str, Any] = run(dst, 0, MigrateReceive(image, incoming))
            return got

        try:
            while True:
                reply = run(src, 0, MigrateSend(mig, section))
                incoming = carry(reply)["incoming"]
                if not reply["left"]:
                    break
            final = run(src, 0, MigrateSuspend(mig))
        except HypercallError:
            run(src, 0, MigrateFinish(mig, False))
            if incoming:
                run(dst, 0, MigrateDrop(incoming))
            raise
        got = carry(final)
        run(src, 0, MigrateCommit(mig))
        run(dst, 0, MigrateResume(incoming))
        run(src, 0, MigrateFinish(mig, True))
        new: int = got["domid"]
        return new

    @rule(caller=st.integers(0, 8), server=st.integers(0, 6))
    def destroy_server(self, caller: int, server: int) -> None:
        c = self.pick(caller)
        got = self.errno(self.host.emulators.destroy_server, c, server)
        assert (got or 0) == self.ref.destroy_server(c, server)

    @rule(caller=st.integers(0, 8), batch=st.lists(op_strategy, max_size=6))
    def iommu_op(self, caller: int, batch: list[Op]) -> None:
        self.run_batch(self.pick(caller), batch)

    def run_batch(self, c: int, batch: list[Op]) -> None:
        buf = pack(batch)
        assert run_iommu_op(self.host.iommu, c, buf, len(batch)) == 0
        got = unpack(buf)
        want = self.ref.iommu_op(
            c,
            [
                dict(subop=o.subop, flags=o.flags, bfn=o.bfn, gfn=o.gfn, domid=o.domid, ioserver=o.ioserver)
                for o in batch
            ],
        )
        for sent, g, w in zip(batch, got, want, strict=True):
            event(f"subop {sent.subop}: {g.status_name}")
            assert g.status == w["status"], (sent, g.status_name, w["status"])
            assert (g.flags, g.bfn) == (w["flags"], w["bfn"]), (sent, g, w)

    @rule(data=st.data())
    def iommu_op_likely_valid(self, data: st.DataObject) -> None:
        """Ops built from the state (own GFNs, own servers, mapped BFNs), so success paths run."""
        host = self.host
        capable = [d for d in sorted(host.domains) if host.domains[d].devices] or sorted(host.domains)
        emulators = sorted({s.creator for s in host.ioreq.servers.values() if s.target is not None})
        if emulators and data.draw(st.integers(0, 9)) < 7:
            capable = emulators
        caller = data.draw(st.sampled_from(capable))
        dom = host.domains[caller]
        own = list(dom.p2m.keys()) if dom.is_hvm else [m for m in range(NR_FRAMES) if host.frames.belongs_to(m, caller)]
        if host.iommu.is_non_strict_hwdom(dom) and not dom.is_hvm:
            own += list(range(XEN_FRAMES - 2, NR_FRAMES))
        servers = [s for s in host.ioreq.servers.values() if s.creator == caller and s.target is not None]
        mapped = sorted(
            {e.bfn for e in host.iommu.m2b.held_by(caller)}
            | set(ctx.scratch if (ctx := host.iommu.contexts.get(dom.domid)) else ())
        )
        ctx_bfns = [b for b, _ in host.iommu.context_entries(dom)][:64]
        bfns = st.one_of(st.integers(0, 48), st.sampled_from([0x1000, 0x1001, 0x1002, 0x1004]))
        perms = st.sampled_from([1, 2, 3, 3, 3 | 4])
        order = st.sampled_from([0, 0, 0, 0, 1])
        choices: list[st.SearchStrategy[Op]] = [st.just(Op(1))]
        if own:
            choices.append(
                st.builds(
                    lambda b, g, p, o: Op(
                        2, (p & 3) | (p & 4 if host.iommu.is_non_strict_hwdom(dom) else 0) | (o << 10), b, g
                    ),
                    bfns,
                    st.sampled_from(own),
                    perms,
                    order,
                )
            )
        if ctx_bfns:
            choices.append(st.builds(lambda b, o: Op(3, o << 10, b), st.sampled_from(ctx_bfns), order))
        for server in servers[:3]:
            guest = host.domains.get(server.target or -1)
            if guest is None:
                continue
            theirs = (
                list(guest.p2m.keys())
                if guest.is_hvm
                else [m for m in range(NR_FRAMES) if host.frames.belongs_to(m, guest.domid)]
            )
            if not guest.is_hvm:  # a PV GFN is an MFN: Xen's frames and free ones are "not populated"
                theirs += [0, XEN_FRAMES - 1, NR_FRAMES - 1]
            if theirs:
                gfn = st.sampled_from(theirs)
                choices.append(
                    st.builds(
                        lambda b, g, p, o, s=server: Op(4, p | (o << 10), b, g, s.target, s.id), bfns, gfn, perms, order
                    )
                )
                choices.append(st.builds(lambda g, s=server: Op(5, 0, 0, g, s.target, s.id), gfn))
            if mapped:
                choices.append(st.builds(lambda b, s=server: Op(6, 0, b, ioserver=s.id), st.sampled_from(mapped)))
        batch = data.draw(st.lists(st.one_of(choices), min_size=1, max_size=6))
        self.run_batch(caller, batch)

    @rule(
        granter=st.integers(0, 8),
        ref=st.integers(0, 5),
        mapper=st.integers(0, 8),
        gfn=st.integers(0, 30),
        readonly=st.booleans(),
        end=st.booleans(),
    )
    def grant_entry(self, granter: int, ref: int, mapper: int, gfn: int, readonly: bool, end: bool) -> None:
        g, m = self.pick(granter), self.pick(mapper)
        if end:
            got = self.errno(self.host.grants.end_access, g, ref)
            assert (got or 0) == self.ref.end_access(g, ref)
        else:
            got = self.errno(self.host.grants.grant_access, g, ref, m, gfn, readonly)
            assert (got or 0) == self.ref.grant_access(g, ref, m, gfn, readonly)

    @rule(
        caller=st.integers(0, 8),
        batch=st.lists(
            st.tuples(
                st.integers(0, 8),
                st.integers(0, 6),
                st.sampled_from([1, 2, 3, 1 | 0x40, 1 | 0x40 | 4, 1 | 4, 2 | 4, 0]),
                st.sampled_from([0, 0x1000, 0x1001]),
                st.sampled_from([0x2000 << 12, 0x2001 << 12, 5 << 12, 0x123]),
            ),
            max_size=4,
        ),
    )
    def grant_map(self, caller: int, batch: list[tuple[int, int, int, int, int]]) -> None:
        c = self.pick(caller)
        maps = [MapGrant(self.pick(d), ref, flags, host, dev) for d, ref, flags, host, dev in batch]
        buf = bytearray(pack_map(maps))
        self.host.grants.map_grant_refs(c, buf, len(maps))
        for sent, got in zip(maps, unpack_map(bytes(buf)), strict=True):
            want = self.ref.map_grant(
                c,
                {
                    "dom": sent.dom,
                    "ref": sent.ref,
                    "flags": sent.flags,
                    "host_addr": sent.host_addr,
                    "dev_bus_addr": sent.dev_bus_addr,
                },
            )
            event(f"grant map: {got.status_name}")
            assert (got.status, got.handle, got.dev_bus_addr) == (want["status"], want["handle"], want["dev_bus_addr"])

    @rule(data=st.data())
    def grant_likely_valid(self, data: st.DataObject) -> None:
        """A granter grants one of its frames to a mapper that then maps it (at a BFN it picks, or not)."""
        domids = sorted(self.host.domains)
        if len(domids) < 2:
            return
        mapper = data.draw(st.sampled_from([d for d in domids if self.host.domains[d].devices] or domids))
        granter = data.draw(st.sampled_from([d for d in domids if d != mapper]))
        dom = self.host.domains[granter]
        own = (
            list(dom.p2m.keys())
            if dom.is_hvm
            else [m for m in range(NR_FRAMES) if self.host.frames.belongs_to(m, granter)]
        )
        if not own:
            return
        ref, gfn, readonly = data.draw(st.integers(0, 5)), data.draw(st.sampled_from(own)), data.draw(st.booleans())
        self.grant_entry(domids.index(granter), ref, domids.index(mapper), gfn, readonly, False)
        flags = data.draw(st.sampled_from([1 | 0x40, 1 | 0x40 | 4, 1 | 2 | 4, 1 | 4]))
        bfn = data.draw(st.sampled_from([0x2000, 0x2001, 0x2002, 7]))
        self.grant_map(domids.index(mapper), [(domids.index(granter), ref, flags, 0x1000, bfn << 12)])

    @rule(caller=st.integers(0, 8), handles=st.lists(st.tuples(st.integers(0, 6), st.booleans()), max_size=4))
    def grant_unmap(self, caller: int, handles: list[tuple[int, bool]]) -> None:
        c = self.pick(caller)
        mapped = self.host.grants.maptracks[c].mappings
        ops = [UnmapGrant(h, mapped[h].host_addr if h in mapped and exact else 0) for h, exact in handles]
        buf = bytearray(pack_unmap(ops))
        self.host.grants.unmap_grant_refs(c, buf, len(ops))
        for sent, got in zip(ops, unpack_unmap(bytes(buf)), strict=True):
            want = self.ref.unmap_grant(
                c, {"handle": sent.handle, "host_addr": sent.host_addr, "dev_bus_addr": sent.dev_bus_addr}
            )
            assert got.status == want

    @rule(caller=st.integers(0, 8), gfns=st.lists(st.integers(0, NR_FRAMES), max_size=8))
    def balloon(self, caller: int, gfns: list[int]) -> None:
        c = self.pick(caller)
        gen = self.host.balloon.decrease_reservation(c, gfns)
        while True:
            try:
                effect = next(gen)
            except StopIteration as stop:
                result = stop.value
                break
            assert isinstance(effect, WaitForIoreqs)
            self.collect_invalidates()  # the emulators answer
            assert effect.done(self.host.ioreq)
        self.collect_invalidates()
        assert (result["ret"], result["status"]) == self.ref.decrease(c, gfns)

    @rule(data=st.data())
    def balloon_mapped_frames(self, data: st.DataObject) -> None:
        """A guest gives back frames that emulators hold, in an order of its choosing: the order
        of a call's invalidates (GFN by GFN, then server and BFN within a frame) shows."""
        held = {e.domid for e in self.host.iommu.m2b} & set(self.host.domains)
        if not held:
            return
        guest = self.host.domains[data.draw(st.sampled_from(sorted(held)))]
        frames = {e.mfn for e in self.host.iommu.m2b if e.domid == guest.domid}
        gfns = [g for g, m in guest.p2m.items() if m in frames] if guest.is_hvm else sorted(frames)
        if gfns:
            chosen = data.draw(st.permutations(gfns))[: data.draw(st.integers(1, len(gfns)))]
            self.balloon(sorted(self.host.domains).index(guest.domid), list(chosen))

    @rule(caller=st.integers(0, 8), gfns=st.lists(st.integers(0, NR_FRAMES), max_size=8))
    def populate(self, caller: int, gfns: list[int]) -> None:
        c = self.pick(caller)
        result = self.host.balloon.populate_physmap(c, gfns)
        assert (result["ret"], result["status"]) == self.ref.populate(c, gfns)

    @rule(index=st.integers(0, 8), bfn=small, write=st.booleans())
    def dma(self, index: int, bfn: int, write: bool) -> None:
        domid = self.pick(index)
        for bdf in sorted(self.host.domains[domid].devices):
            result = self.host.device_dma(bdf, bfn << 12, b"x" if write else None, 0 if write else 1)
            assert result.ok == (self.ref.translate(domid, bfn, write) is not None), (bdf, bfn, write)

    @rule(index=st.integers(0, 8), bfn=small, clear=st.booleans())
    def fault(self, index: int, bfn: int, clear: bool) -> None:
        domid = self.pick(index)
        if clear:
            self.host.iommu.clear_fault(domid, bfn)
            self.ref.faults.discard((domid, bfn))
        else:
            self.host.iommu.inject_fault(domid, bfn)
            self.ref.faults.add((domid, bfn))

    def collect_invalidates(self) -> None:
        """Play every emulator: read and acknowledge rings, complete synchronous requests."""
        for server in self.host.ioreq.servers.values():
            entries, read_pointer = read_ring(bytes(server.page))
            server.acknowledge(read_pointer)
            seen = self.announced.setdefault(server.id, [])
            seen += [("buffered", e.data) for e in entries]
            for req_id, raw in sorted(server.pending.items()):  # ids rise in the order sent
                seen.append(("sync", read_sync(req_id, bytes(raw)).data))
                server.complete(req_id)
        self.host.ioreq.notify.clear()

    # -- invariants ---------------------------------------------------------------------------------
    @invariant()
    def audit_is_clean(self) -> None:
        if hasattr(self, "host"):
            problems = audit(self.host)
            assert not problems, problems

    @invariant()
    def matches_the_reference(self) -> None:
        if not hasattr(self, "host"):
            return
        host, ref = self.host, self.ref
        frames = host.frames
        for mfn in range(NR_FRAMES):
            want = ref.frames[mfn]
            owner = None if frames.is_free(mfn) else frames.owner[mfn]
            got = (owner, bool(frames.populated[mfn]), frames.count[mfn], frames.type_count[mfn])
            assert got == (want.owner, want.populated, want.refs, want.wrefs), (mfn, got, want)
        assert sorted(host.domains) == sorted(ref.doms)
        for domid, dom in host.domains.items():
            rdom = ref.doms[domid]
            assert dom.devices == rdom.devices and dom.target == rdom.target
            if dom.is_hvm:
                assert dict(dom.p2m.items()) == rdom.p2m
            if rdom.ctx is None:
                assert dom.domid not in self.host.iommu.contexts
                continue
            got_ctx = {
                b: (entry_mfn(e), KIND_NAMES[entry_kind(e)], entry_perms(e)) for b, e in host.iommu.context_entries(dom)
            }
            want_ctx = {b: (e.mfn, e.kind, e.perms) for b, e in rdom.ctx.items()}
            assert got_ctx == want_ctx, (domid, set(got_ctx.items()) ^ set(want_ctx.items()))
        got_m2b = Counter(
            (e.mfn, e.bfn, e.mapper, e.domid, e.ioserver, e.flags, e.owns_iommu_entry) for e in host.iommu.m2b
        )
        want_m2b = Counter((e.mfn, e.bfn, e.mapper, e.domid, e.ioserver, e.flags, e.owns) for e in ref.m2b)
        assert got_m2b == want_m2b
        assert {s.id: (s.creator, s.target) for s in host.ioreq.servers.values()} == {
            k: (v["creator"], v["target"]) for k, v in ref.servers.items()
        }

        # Per server: the buffered ones in ring order, the synchronous ones in the order sent.
        def split(seen: dict[int, list[tuple[str, int]]]) -> dict[int, tuple[list[int], list[int]]]:
            return {
                sid: ([b for how, b in items if how == "buffered"], [b for how, b in items if how == "sync"])
                for sid, items in seen.items()
                if items
            }

        assert split(self.announced) == split(ref.invalidates)
        assert {s.id: s.scratch_mfn for s in host.ioreq.servers.values()} == {
            k: v["scratch"] for k, v in ref.servers.items()
        }


class PythonPathModel(PvIommuModel):
    """The same machine with the compiled fast path off: both must agree with the reference."""

    fast_path = False


MODEL_SETTINGS = settings(
    max_examples=int(os.environ.get("XENEMU_MODEL_EXAMPLES", "150")),
    stateful_step_count=int(os.environ.get("XENEMU_MODEL_STEPS", "30")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
PvIommuModel.TestCase.settings = MODEL_SETTINGS
PythonPathModel.TestCase.settings = MODEL_SETTINGS
TestPvIommuModel = PvIommuModel.TestCase
TestPvIommuModelPythonPath = PythonPathModel.TestCase
