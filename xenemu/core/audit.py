"""The audit: every invariant of pv-iommu-semantics.md, recomputed from scratch.

It trusts no counter it checks: reference counts are rebuilt from what holds them (Xen,
allocation, mappings, M2B entries), so any bookkeeping slip in the core shows up here
as a precise, named violation.
"""

from __future__ import annotations

from collections import Counter

from xenemu.core.host import Host
from xenemu.core.iommu.context import IommuContext
from xenemu.core.iommu.entries import PERM_W, RW, FlushType, Kind, entry_kind, entry_mfn, entry_perms, make_entry
from xenemu.core.iommu.m2b import M2BEntry
from xenemu.core.its import DOORBELL_MFN, audit_its
from xenemu.core.memory.frames import DOMID_XEN, OWNER_NONE


def audit(host: Host) -> list[str]:
    """All violations found, each a sentence naming the frame, domain or BFN at fault."""
    problems: list[str] = []
    general: Counter[int] = Counter()
    writable: Counter[int] = Counter()

    owning: dict[tuple[int, int], M2BEntry] = {}
    for entry in host.iommu.m2b:
        general[entry.mfn] += 1
        writable[entry.mfn] += entry.writable
        if entry.owns_iommu_entry:
            owning[(entry.mapper, entry.bfn)] = entry
    problems += _check_m2b(host)
    grant_bfns: dict[tuple[int, int], int] = {}
    pins: Counter[tuple[int, int, bool]] = Counter()
    for mapper, maptrack in host.grants.maptracks.items():
        for mapping in maptrack.mappings.values():
            general[mapping.mfn] += 1
            writable[mapping.mfn] += not mapping.readonly
            if host.grants.tables.get(mapping.granter) is mapping.granter_table:
                pins[(mapping.granter, mapping.ref, mapping.readonly)] += 1
            if mapping.bfn is not None:
                grant_bfns[(mapper, mapping.bfn)] = mapping.mfn
    problems += _check_grant_pins(host, pins)

    contexts = host.iommu.contexts
    limbo = host.memory.limbo
    if overlap := limbo.keys() & host.domains.keys():
        problems.append(f"domains {sorted(overlap)} are both live and being built or destroyed")
    for name, keyed in (("IOMMU context", contexts), ("grant table", host.grants.tables)):
        problems += [
            f"{name} of d{domid}, which does not exist"
            for domid in keyed
            if domid not in host.domains and (name != "IOMMU context" or domid not in limbo)
        ]
    for domid, retired in host.iommu.retired.items():
        if domid not in limbo or domid in contexts:
            problems.append(f"retired IOMMU context of d{domid}, which is not being destroyed")
        _count_references(retired, general, writable)
    for domid in limbo:
        if domid in contexts:  # its IOREQ servers are still being torn down
            _count_references(contexts[domid], general, writable)
    if host.grants.tables.keys() != host.domains.keys() or host.grants.maptracks.keys() != host.domains.keys():
        problems.append("grant tables and maptracks are not one per live domain")
    for dom in host.domains.values():
        ctx = contexts.get(dom.domid)
        if ctx is not None:
            problems += _check_context(host, ctx, owning, grant_bfns, general, writable)
        wants = host.iommu.map_cap(dom)
        if wants != (ctx is not None):
            problems.append(f"d{dom.domid}: context is {'missing' if wants else 'present'} but map_cap is {wants}")
        problems += _check_memory(host, dom.domid)
    for key, entry in owning.items():
        if (key[0] not in host.domains and key[0] not in limbo) or key[0] not in contexts:
            problems.append(f"M2B entry {entry} owns an IOMMU entry in a domain without a context")
    held: Counter[int] = Counter()
    for entry in host.iommu.m2b:
        held[entry.mapper] += 1
    for mapper, maptrack in host.grants.maptracks.items():
        held[mapper] += len(maptrack.mappings)
    for domid, ctx in [*contexts.items(), *host.iommu.retired.items()]:
        held[domid] += sum(1 for _, e in ctx.table.materialized() if entry_kind(e) in (Kind.MAP, Kind.MAP_NOREF))
        held[domid] += len(ctx.scratch)  # a swapped foreign mapping stays its emulator's
    if +held != +host.iommu.mappings_held:
        problems.append(f"mappings held per domain {dict(host.iommu.mappings_held)}, recounted {dict(held)}")
    for server in host.ioreq.servers.values():
        if server.free_slots() < 0:
            problems.append(f"IOREQ server {server.id}: buffered ring holds more than it has slots")
        if server.creator not in host.domains:
            problems.append(f"IOREQ server {server.id}: its emulator d{server.creator} is gone")
    for server in host.ioreq.ending.values():
        if server.id in host.ioreq.servers:
            problems.append(f"IOREQ server {server.id}: both live and being torn down")
    problems += audit_its(host.its)
    if host.iommu.touched:
        problems.append(f"{len(host.iommu.touched)} contexts left with a pending flush")

    frames = host.frames
    for mfn in range(frames.nr_frames):
        owner = frames.owner[mfn]
        base = (owner == DOMID_XEN) + frames.populated[mfn]
        want, want_w = base + general[mfn], writable[mfn]
        have, have_w = frames.count[mfn], frames.type_count[mfn]
        if have != want or have_w != want_w:
            problems.append(
                f"frame {mfn:#x} (owner {owner:#x}): references {have}/{have_w} (general/writable),"
                f" holders account for {want}/{want_w}"
            )
        if (owner == OWNER_NONE) != (have == 0):
            problems.append(f"frame {mfn:#x}: owner {owner:#x} with {have} references")
        if not frames.free_map_agrees(mfn):
            problems.append(f"frame {mfn:#x}: the free map disagrees with its owner {owner:#x}")
        if frames.populated[mfn] and owner not in host.domains and owner not in limbo:
            problems.append(f"frame {mfn:#x}: populated for d{owner}, which does not exist")

    for bdf, device in host.devices.items():
        holder = host.domains.get(device.domid)
        if holder is None or bdf not in holder.devices:
            problems.append(f"device {bdf}: assigned to d{device.domid}, which does not list it")
    return problems


def _count_references(ctx: IommuContext, general: Counter[int], writable: Counter[int]) -> None:
    """The references a context no device reaches still holds (a domain being destroyed)."""
    for _bfn, entry in ctx.table.materialized():
        if entry_kind(entry) == Kind.MAP:
            general[entry_mfn(entry)] += 1
            writable[entry_mfn(entry)] += bool(entry_perms(entry) & PERM_W)


def _check_memory(host: Host, domid: int) -> list[str]:
    dom = host.domains[domid]
    frames = host.frames
    problems = []
    if dom.is_hvm:
        mfns = list(dom.p2m.values())
        if len(set(mfns)) != len(mfns):
            problems.append(f"d{domid}: p2m maps one frame at two GFNs")
        for gfn, mfn in dom.p2m.items():
            if not frames.belongs_to(mfn, domid):
                problems.append(f"d{domid}: GFN {gfn:#x} -> frame {mfn:#x}, which is not its populated frame")
        if dom.pages != len(dom.p2m):
            problems.append(f"d{domid}: {dom.pages} pages counted, p2m has {len(dom.p2m)}")
        if wrong := dom.p2m.directory_disagreements():
            problems.append(f"d{domid}: p2m leaf directory disagrees with its leaves at {wrong[:8]}")
    return problems


def _check_context(
    host: Host,
    ctx: IommuContext,
    owning: dict[tuple[int, int], M2BEntry],
    grant_bfns: dict[tuple[int, int], int],
    general: Counter[int],
    writable: Counter[int],
) -> list[str]:
    problems: list[str] = []
    dom = host.domains[ctx.domid]
    where = f"d{ctx.domid} context"
    frames = host.frames
    identity_defaults = host.iommu.is_non_strict_hwdom(dom)
    rule = ctx.table.default_rule
    seen_rmrr, seen_scratch, seen_foreign = set(), set(), set()
    if not ctx.table.sparse <= ctx.table.leaves.keys():
        problems.append(
            f"{where}: sparse leaves {sorted(ctx.table.sparse - ctx.table.leaves.keys())[:8]} are not leaves"
        )
    if wrong := ctx.table.directory.disagreements(ctx.table.leaves):
        problems.append(f"{where}: leaf directory disagrees with the page table at {wrong[:8]}")
    for bfn, entry in ctx.table.materialized():
        kind, mfn, perms = entry_kind(entry), entry_mfn(entry), entry_perms(entry)
        if kind == Kind.MAP:
            general[mfn] += 1
            writable[mfn] += bool(perms & PERM_W)
        elif kind == Kind.GRANT and grant_bfns.get((ctx.domid, bfn)) != mfn:
            problems.append(f"{where}: grant entry at BFN {bfn:#x} has no grant mapping for frame {mfn:#x}")
        if kind == Kind.DEFAULT:
            if identity_defaults and mfn != bfn:
                problems.append(f"{where}: default entry at BFN {bfn:#x} is not 1:1 (-> {mfn:#x})")
            if not identity_defaults and entry != rule(bfn):
                problems.append(f"{where}: default entry at BFN {bfn:#x} -> {mfn:#x} does not follow the p2m")
        elif kind == Kind.MAP_NOREF and not identity_defaults:
            problems.append(f"{where}: no_ref_cnt mapping at BFN {bfn:#x} outside the non-strict hardware domain")
        elif kind in (Kind.RMRR, Kind.DOORBELL):
            seen_rmrr.add(bfn)
        elif kind == Kind.SCRATCH:
            seen_scratch.add(bfn)
            server = host.ioreq.known(ctx.scratch.get(bfn, -1))
            if server is None or mfn != server.scratch_mfn:
                problems.append(f"{where}: scratch entry at BFN {bfn:#x} -> {mfn:#x}, not its server's scratch frame")
        elif kind == Kind.FOREIGN:
            seen_foreign.add(bfn)
            owner = owning.get((ctx.domid, bfn))
            if owner is None:
                problems.append(f"{where}: foreign entry at BFN {bfn:#x} has no M2B entry")
            elif owner.mfn != mfn or owner.flags & RW != perms:
                problems.append(f"{where}: foreign entry at BFN {bfn:#x} disagrees with its M2B entry {owner}")
        trusted = identity_defaults and kind in (Kind.MAP_NOREF, Kind.DEFAULT)
        if frames.exists(mfn) and frames.is_free(mfn) and not trusted:
            problems.append(f"{where}: BFN {bfn:#x} ({kind.name}) points at free frame {mfn:#x}")
    for bfn in ctx.rmrr:
        if bfn in ctx.doorbells:
            if ctx.table.get(bfn) != make_entry(DOORBELL_MFN + ctx.doorbells[bfn], Kind.DOORBELL, PERM_W):
                problems.append(f"{where}: doorbell BFN {bfn:#x} does not map its pITS's doorbell")
        elif ctx.table.get(bfn) != make_entry(bfn, Kind.RMRR, RW):
            problems.append(f"{where}: RMRR BFN {bfn:#x} is not identity-mapped R/W")
    if seen_rmrr != set(ctx.rmrr):
        problems.append(f"{where}: RMRR entries {sorted(seen_rmrr ^ set(ctx.rmrr))} not matched by devices")
    if seen_scratch != set(ctx.scratch):
        problems.append(f"{where}: scratch entries disagree with their record")
    for mapper, bfn in grant_bfns:
        present = ctx.table.get(bfn) if mapper == ctx.domid else None
        if mapper == ctx.domid and (not present or entry_kind(present) != Kind.GRANT):
            problems.append(f"{where}: grant mapping at BFN {bfn:#x} lost its IOMMU entry")
    for mapper, bfn in owning:
        if mapper == ctx.domid and bfn not in seen_foreign:
            problems.append(f"{where}: M2B entry at BFN {bfn:#x} lost its IOMMU entry")
    if ctx.pending_flush is not FlushType.NONE:
        problems.append(f"{where}: flush {ctx.pending_flush.name} still pending")
    if ctx.flush_enabled:
        for bfn, cached in ctx.iotlb.entries.items():
            current = ctx.table.get(bfn)
            if not current or (cached >> 8, cached & 3) != (current >> 8, current & 3):
                problems.append(f"{where}: IOTLB holds a stale translation for BFN {bfn:#x}")
    return problems


def _check_m2b(host: Host) -> list[str]:
    problems = []
    m2b = host.iommu.m2b
    for key, entry in m2b.by_key.items():
        if m2b.by_mfn.get(entry.mfn, {}).get(key) is not entry:
            problems.append(f"M2B {entry}: missing from the per-frame index")
        if entry.bfn not in m2b.by_frame_server.get((entry.mfn, entry.ioserver), ()):
            problems.append(f"M2B {entry}: missing from the per-server-frame index")
        if m2b.mapper_of.get(entry.ioserver) != entry.mapper:
            problems.append(f"M2B {entry}: its server's mapper is recorded as {m2b.mapper_of.get(entry.ioserver)}")
        server = host.ioreq.known(entry.ioserver)
        if server is None or server.creator != entry.mapper:
            problems.append(f"M2B {entry}: its IOREQ server is gone or not the mapper's")
        if host.frames.is_free(entry.mfn):
            problems.append(f"M2B {entry}: frame is free")
    for frame_server, bfns in m2b.by_frame_server.items():
        if m2b.lowest.get(frame_server) != min(bfns):
            problems.append(f"M2B: lowest BFN of frame/server {frame_server} is stale")
    unswappable = Counter(entry.mfn for entry in m2b.by_key.values() if not entry.swappable)
    if unswappable != m2b.unswappable:
        problems.append("M2B: the count of entries that cannot be swapped disagrees with the entries")
    mappers = Counter(entry.mapper for entry in m2b.by_key.values())
    if mappers != m2b.per_mapper:
        problems.append(f"M2B: entries per mapper counted {dict(m2b.per_mapper)}, recounted {dict(mappers)}")
    if sum(len(v) for v in m2b.by_mfn.values()) != len(m2b.by_key):
        problems.append("M2B: per-frame index has entries the main index lacks")
    return problems


def _check_grant_pins(host: Host, pins: Counter[tuple[int, int, bool]]) -> list[str]:
    """Every granter's pin counts equal the mappings of its entries that exist."""
    problems = []
    for dom in host.domains.values():
        table = host.grants.tables[dom.domid]
        for ref, (readers, writers) in table.pins.items():
            if (readers, writers) != (pins[(dom.domid, ref, True)], pins[(dom.domid, ref, False)]):
                problems.append(f"d{dom.domid} grant {ref}: pinned {readers}/{writers}, mapped otherwise")
        for (granter, ref, _ro), count in pins.items():
            if granter == dom.domid and count and ref not in table.pins:
                problems.append(f"d{dom.domid} grant {ref}: mapped but not pinned")
    return problems
