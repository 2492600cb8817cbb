"""A domain's vITS in a save image: its tables written to guest RAM, its registers and the
state no table holds in META, checked, and rebuilt on a restore.

What is carried is what KVM saves of an ITS. Its device, collection and ITT tables go into the
guest's RAM in KVM's layout (its_tables.py), written through the guest CPU's write path at the
consistent point, before the pages are copied; META keeps the registers (``CTLR`` enable,
``CBASER``, ``BASER``s, ``CREADR``/``CWRITER``) and, for the mappings that have any, the state
that belongs to a mapping and is in no table: ``MOVALL``'s retarget, the vCPU holding it pending,
and whether its physical LPI is pending on the pITS (``fired``). A restore reads the tables back
from the restored RAM, as KVM does. Physical LPIs are not carried: the restored devices get new
ones at assignment, and each ITE's physical ``MAPTI`` is queued as one of Xen's own commands,
with the LPI's enable bit read from the guest's configuration table (as KVM reads it when it
restores an ITE); a mapping that ``fired`` is raised again on the new pITS by an ``INT``.

Nothing of a vITS refuses a save with ``-EBUSY`` (a live migration's stop is the exception:
``refusal``). The commands between ``CREADR`` and ``CWRITER`` that Xen has
not taken are in the guest's queue, so in the image, and run after the restore. What Xen holds
is completed or carried at the consistent point: a ``MAPC``/``MOVALL`` scan or a pending-table
load is run to its end (bounded by the domain's mappings); a command taken from the queue has
already done all it does to the vITS (translation records it), so ``CREADR`` is saved past it;
and what the pITS has still to run for the domain's devices (guest batches, a replaced queue's
orphans, Xen's own queued and owed commands) can change only whether a mapping's physical LPI
ends up pending, which is worked out here and carried as ``fired``. What the tables cannot
hold (a table with entries to hold that is not Valid, an ID beyond its table, a table or ITT that
is not RAM, tables that overlap) refuses the save with ``-EINVAL`` before anything is written.
"""

from __future__ import annotations

from typing import Any

from xenemu.abi import its_cmd as cmds
from xenemu.core.errors import EBUSY, EINVAL, ENOSPC, HypercallError
from xenemu.core.host import Host
from xenemu.core.its.state import CBASER_ADDR, ENABLED, LPI_BASE, XEN_PRIORITY, Ite, Vits, lpi_limit
from xenemu.core.memory.frames import PAGE_SIZE
from xenemu.core.migration import its_tables
from xenemu.core.migration.image import Image, refuse
from xenemu.core.migration.its_tables import Reader, Region, Tables

#: GITS_CBASER.Valid.
CBASER_VALID = 1 << 63
#: The physical commands that change whether one of a device's LPIs is pending on the pITS.
_EVENT_CMDS = (cmds.MAPD, cmds.MAPTI, cmds.MAPI, cmds.INT, cmds.CLEAR, cmds.DISCARD)


def _tables(vits: Vits) -> Tables:
    """What the vITS's tables are to hold now."""
    ites = {k: (i.vlpi, i.icid) for k, i in vits.ites.items()}
    collections: dict[int, int | None] = {icid: None for _, icid in ites.values()}
    collections.update(vits.collections)
    devices = {v: (d.size, d.itt) for v, d in vits.devices.items() if d.size is not None}
    return Tables(devices, ites, collections)


def plan(host: Host, domid: int) -> list[Region]:
    """Every table region a save of the domain writes; ``HypercallError`` if one cannot be."""
    its = host.its.domains.get(domid)
    if its is None:
        return []
    regions: list[Region] = []
    keep_out: list[Region] = []
    # the configuration bytes of the mapped vLPIs, which a restore reads back (in runs)
    base = its.propbaser & CBASER_ADDR
    vlpis = sorted({i.vlpi for v in its.vits.values() for i in v.ites.values()})
    for first, last in _runs(vlpis):
        keep_out.append(Region(base + first - LPI_BASE, bytes(last - first + 1), "the LPI configuration table"))
    for pits, vits in sorted(its.vits.items()):
        events = {v: d.info.events for v, d in vits.devices.items()}
        regions += its_tables.plan(pits, vits.baser, events, _tables(vits))
        if vits.cbaser & CBASER_VALID:
            keep_out.append(Region(vits.cbaser & CBASER_ADDR, bytes(vits.queue_bytes), f"vITS {pits}'s command queue"))
    its_tables.check_regions(regions, keep_out, lambda gpa, length: host.memory.in_ram(domid, gpa, length))
    return regions


def _runs(values: list[int]) -> list[tuple[int, int]]:
    """Ascending values as (first, last) runs of consecutive ones."""
    runs: list[tuple[int, int]] = []
    for value in values:
        if runs and runs[-1][1] + 1 == value:
            runs[-1] = (runs[-1][0], value)
        else:
            runs.append((value, value))
    return runs


def refusal(host: Host, domid: int, live: bool = False) -> HypercallError | None:
    """Why the domain's vITS tables cannot be written where its registers and MAPDs say; and,
    for a live migration's stop (``live``), why its vITS is not quiet yet: the stopped domain
    lives on here until the receiver has it, its pITS running what was placed and Xen's passes
    serving its queue, so what is in flight would act on both copies."""
    try:
        plan(host, domid)
    except HypercallError as exc:
        return HypercallError(exc.errno, f"d{domid}: {exc.message}")
    its = host.its.domains.get(domid)
    if not live or its is None:
        return None
    for vits in its.vits.values():
        state = host.its.pits[vits.pits]
        hw = state.hw
        pdevids = {d.info.pdevid for d in vits.devices.values()}
        ites = {id(i) for i in vits.ites.values()}
        ring = [hw.ring[(hw.creadr + i) % hw.slots] for i in range(hw.queued())]
        if (
            vits.outstanding()
            or vits.taken
            or vits.orphans
            or any((ite is not None and id(ite) in ites) or c.devid in pdevids for c, ite, _ in state.xen_queue)
            or any(c is not None and c.devid in pdevids for c in ring)
            or any(i.mapti_slot is not None for i in vits.ites.values())
            or vits.owed
            or vits.moves
            or vits.job is not None
            or its.loading()
        ):
            return HypercallError(
                -EBUSY, f"d{domid}'s vITS {vits.pits} has commands in flight: a migration stops it once they ran"
            )
    return None


def write_tables(host: Host, domid: int) -> None:
    """At the consistent point: Xen's scans and pending-table loads of the domain finished, then
    its vITSs' tables written into its RAM through the guest CPU's write path (so whatever tracks
    the guest's writes sees them), before its pages are copied."""
    if domid not in host.its.domains:
        return
    host.its.jobs.finish_domain(domid)
    for region in plan(host, domid):
        gpa, data = region.gpa, region.data
        while data:
            gfn, offset = divmod(gpa, PAGE_SIZE)
            n = min(len(data), PAGE_SIZE - offset)
            host.memory.access(domid, gfn, offset, data[:n])
            gpa, data = gpa + n, data[n:]


def _fired(host: Host, vits: Vits) -> set[tuple[int, int]]:
    """The mappings whose physical LPI will be pending on the pITS once everything placed,
    queued or owed for the vITS's devices has run: what the pITS holds pending now, then each of
    those commands in the order the pITS will run them (an ``INT`` makes pending, a ``CLEAR``
    clears, a ``MAPD`` or ``DISCARD`` drops, a ``MAPTI`` starts afresh: what was pending before
    a mapping's ``MAPTI`` ran is an old mapping's, which Xen drops). Bounded by the pITS's ring."""
    s = host.its.state
    state = s.pits[vits.pits]
    hw = state.hw
    by_pdevid = {d.info.pdevid: v for v, d in vits.devices.items()}
    devices = {p for p in by_pdevid if p in hw.devices}
    mapped: set[tuple[int, int]] = set()
    pending: set[tuple[int, int]] = set()
    for pdevid in devices:
        for event, (plpi, _) in hw.devices[pdevid].events.items():
            mapped.add((pdevid, event))
            if plpi in hw.pending:
                pending.add((pdevid, event))
    ring = [hw.ring[(hw.creadr + i) % hw.slots] for i in range(hw.queued())]
    queued = [c for c, ite, _ in state.xen_queue if ite is None or s.current(ite)]
    owed = [c for (ite, _), c in vits.owed.items() if s.current(ite)]
    for c in [*ring, *queued, *owed]:
        if c is None or c.cmd not in _EVENT_CMDS or c.devid not in by_pdevid:
            continue
        key = (c.devid, c.eventid)
        if c.cmd == cmds.MAPD:
            gone = {k for k in mapped if k[0] == c.devid}
            mapped -= gone
            pending -= gone
            (devices.add if c.valid else devices.discard)(c.devid)
        elif c.cmd in (cmds.MAPTI, cmds.MAPI) and c.devid in devices:
            mapped.add(key)
            pending.discard(key)
        elif c.cmd == cmds.INT and key in mapped:
            pending.add(key)
        elif c.cmd == cmds.CLEAR:
            pending.discard(key)
        elif c.cmd == cmds.DISCARD:
            pending.discard(key)
            mapped.discard(key)
    return {(by_pdevid[p], e) for p, e in pending}


def resume_received(host: Host) -> None:
    """Received domains run once their vITS is what it was on the source: Xen's MAPD and
    MAPTIs for their devices (and the INTs of what had fired) have run on this host's pITS.
    Until then they stay suspended (their calls are -EBUSY, "try again"): an MSI raised
    meanwhile would be dropped by a pITS whose ITT for the device is not loaded yet, though the
    device's write was acknowledged (on the source it would have been delivered)."""
    for domid in sorted(host.resuming):
        if domid not in host.domains:
            host.resuming.discard(domid)
        elif refusal(host, domid, live=True) is None:
            host.resuming.discard(domid)
            host.suspended.discard(domid)


def save(host: Host, domid: int) -> dict[str, Any]:
    """The ``vits`` and ``in_service`` fields of the image's ``its`` (after ``write_tables``)."""
    its = host.its.domains[domid]
    out = []
    for pits, vits in sorted(its.vits.items()):
        fired = _fired(host, vits)
        lpis = [
            [v, e, i.vcpu_override, i.pending, (v, e) in fired]
            for (v, e), i in sorted(vits.ites.items())
            if i.vcpu_override is not None or i.pending is not None or (v, e) in fired
        ]
        out.append(
            {
                "pits": pits,
                "enabled": vits.enabled,
                "cbaser": vits.cbaser,
                "baser": list(vits.baser),
                # what Xen has taken has done what it does to the vITS: the queue goes on after it
                "creadr": vits.progress,
                "cwriter": vits.cwriter,
                "lpis": lpis,
            }
        )
    return {"vits": out, "in_service": sorted([v, lpi] for v, lpi in its.in_service)}


def _opt(value: Any, what: str, high: int) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < high:
        raise refuse(f"{what} out of range")
    return value


def _int(value: Any, what: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value < high:
        raise refuse(f"{what} out of range")
    return value


def check(image: Image, host: Host | None = None, domid: int | None = None) -> dict[int, Tables]:
    """Every vITS field of the image, and its tables read from the image's RAM: refused before
    anything is allocated. ``host``, ``domid``: a live migration's receiver, whose domain holds
    the pre-copy sections' pages; the last section's (``image.pages``) are read over them."""
    below = None
    if host is not None and domid is not None:
        dom = host.domain(domid)

        def below(gfn: int) -> bytes | None:
            mfn = dom.p2m.get(gfn)
            return None if mfn is None else host.frames.read(mfn, 0, PAGE_SIZE)

    return check_with(image.meta, its_tables.image_reader(image, below))


def check_with(meta: dict[str, Any], reader: Reader) -> dict[int, Tables]:
    """Every vITS field and cross-reference, and each vITS's tables as ``reader`` finds them:
    devices and events the image's devices have, vLPIs within ``PROPBASER``'s IDbits,
    collections and vCPUs the domain has, command offsets in the queue; by pITS."""
    its = meta["its"]
    vcpus, limit = its["vcpus"], lpi_limit(its["propbaser"])
    its_devices = [d["its"] for d in meta["devices"] if d["its"] is not None]
    for d in its_devices:
        if not isinstance(d, dict) or set(d) != {"devid", "events", "pits", "vdevid"}:
            raise refuse("a device's ITS side must be a map of devid, events, pits, vdevid")
        _int(d["devid"], "ITS DeviceID", 0, (1 << 16) - 1)
        _int(d["events"], "ITS events", 1, (1 << 16) + 1)
        _int(d["pits"], "pITS", 0, 256)
    if sorted(d["vdevid"] for d in its_devices) != list(range(len(its_devices))):
        raise refuse("virtual DeviceIDs are not 0, 1, ... in order of assignment")
    by_pits: dict[int, dict[int, dict[str, Any]]] = {}
    for d in its_devices:
        by_pits.setdefault(d["pits"], {})[d["vdevid"]] = d
    if not isinstance(its["vits"], list) or not isinstance(its["in_service"], list):
        raise refuse("vits and in_service must be lists")
    named = [v["pits"] if isinstance(v, dict) and isinstance(v.get("pits"), int) else -1 for v in its["vits"]]
    if sorted(named) != sorted(by_pits):
        raise refuse("one vITS per pITS its devices sit on")
    keys = {"pits", "enabled", "cbaser", "baser", "creadr", "cwriter", "lpis"}
    out: dict[int, Tables] = {}
    for v in its["vits"]:
        if set(v) != keys or not isinstance(v["enabled"], bool):
            raise refuse(f"a vITS must be a map of exactly {sorted(keys)}")
        devices = by_pits[v["pits"]]
        for name in ("cbaser", "creadr", "cwriter"):
            _int(v[name], name, 0, 1 << 64)
        if not isinstance(v["baser"], list) or len(v["baser"]) != 8:
            raise refuse("eight GITS_BASER registers")
        for b in v["baser"]:
            _int(b, "GITS_BASER", 0, 1 << 64)
        queue = ((v["cbaser"] & 0xFF) + 1) * PAGE_SIZE
        if any(v[name] % 32 or v[name] >= queue for name in ("creadr", "cwriter")):
            raise refuse("CREADR and CWRITER must be command offsets in the vITS's queue")
        tables = its_tables.read(
            v["pits"], v["baser"], {vdevid: d["events"] for vdevid, d in devices.items()}, vcpus, limit, reader
        )
        seen = set()
        for entry in v["lpis"] if isinstance(v["lpis"], list) else [None]:
            if not isinstance(entry, list) or len(entry) != 5 or not isinstance(entry[4], bool):
                raise refuse("an LPI's state is not [vdevid, event, retarget, pending, fired]")
            vdevid, event, override, pending, fired = entry
            key = (vdevid, event)
            if not isinstance(vdevid, int) or not isinstance(event, int) or key not in tables.ites or key in seen:
                raise refuse("an LPI's state names a mapping the vITS's tables do not have, or twice")
            seen.add(key)
            _opt(override, "retarget vCPU", vcpus), _opt(pending, "pending vCPU", vcpus)
            if override is None and pending is None and not fired:
                raise refuse("an LPI's state that says nothing")
            if pending is not None and [pending, tables.ites[key][0]] not in its["in_service"]:
                raise refuse("an LPI pending on a vCPU that does not have it in service")
        out[v["pits"]] = tables
    for entry in its["in_service"]:
        if not isinstance(entry, list) or len(entry) != 2:
            raise refuse("an LPI in service is not [vcpu, intid]")
        _int(entry[0], "in-service vCPU", 0, vcpus), _int(entry[1], "in-service INTID", LPI_BASE, 1 << 16)
    return out


def ram_reader(host: Host, domid: int) -> Reader:
    """Reads the domain's RAM as its CPU would."""

    def read_ram(gpa: int, length: int) -> bytes | None:
        if not host.memory.in_ram(domid, gpa, length):
            return None
        out = bytearray()
        while length > 0:
            n = min(length, PAGE_SIZE - gpa % PAGE_SIZE)
            out += host.memory.read(domid, gpa, n)
            gpa, length = gpa + n, length - n
        return bytes(out)

    return read_ram


def gic(host: Host) -> dict[str, int]:
    """Where this host puts every guest's interrupt controller frames (PROTOCOL.md 7.4)."""
    return {"window": host.its.registers.window(), "pits": len(host.its.pits)}


def check_host(host: Host, meta: dict[str, Any]) -> None:
    """The same interrupt controller frames, and the pITSs, DeviceIDs and physical LPIs this host
    must have for the image's devices."""
    if meta["gic"] != gic(host):
        raise HypercallError(
            -EINVAL,
            f"this host's interrupt controller frames are elsewhere ({gic(host)}, the image's {meta['gic']}):"
            " restore on a host with as much RAM (to the GiB) and as many pITSs",
        )
    wanted = 0
    for device in meta["devices"]:
        d = device["its"]
        if d is None:
            continue
        if d["pits"] >= host.options.its_pits:
            raise HypercallError(-EINVAL, f"pITS {d['pits']} does not exist on this host")
        host.its.check_assign(d["devid"], d["pits"], d["events"])
        wanted += d["events"]
    if wanted > host.its.state.free_lpis_count():
        raise HypercallError(-ENOSPC, "not enough physical LPIs on this host")


def restore(host: Host, domid: int, meta: dict[str, Any]) -> None:
    """Put the vITS back after its devices were assigned (each with new physical LPIs), its
    mappings read from its tables in the restored RAM (as KVM restores an ITS; checked as the
    image's copy was, so a failure here is the restore's, and it is undone)."""
    tables = check_with(meta, ram_reader(host, domid))
    s = host.its.state
    dom = s.domains[domid]
    dom.in_service = {(v, lpi) for v, lpi in meta["its"]["in_service"]}
    base = dom.propbaser & CBASER_ADDR
    for saved in meta["its"]["vits"]:
        vits: Vits = dom.vits[saved["pits"]]
        table = tables[saved["pits"]]
        state = s.pits[vits.pits]
        vits.enabled, vits.cbaser, vits.baser = saved["enabled"], saved["cbaser"], list(saved["baser"])
        vits.creadr = vits.progress = saved["creadr"]
        vits.cwriter = saved["cwriter"]
        vits.collections = {icid: vcpu for icid, vcpu in table.collections.items() if vcpu is not None}
        for vdevid, device in sorted(vits.devices.items()):
            mapped = table.devices.get(vdevid)
            if mapped is None:  # the guest unmapped it (or never mapped it): so is the device on the pITS
                state.xen_queue.append((cmds.mapd(device.info.pdevid, 0, 0, False), None, None))
            else:
                device.size, device.itt = mapped
        extra = {(v, e): (override, pending, fired) for v, e, override, pending, fired in saved["lpis"]}
        for (vdevid, event), (vlpi, icid) in sorted(table.ites.items()):
            override, pending, fired = extra.get((vdevid, event), (None, None, False))
            info = vits.devices[vdevid].info
            plpi = info.plpis[event]
            ite = vits.ites[(vdevid, event)] = Ite(vlpi, icid, plpi, override, pending)
            s.bind(vits, (vdevid, event), vlpi, plpi)
            try:
                config = s.memory.read(domid, base + vlpi - LPI_BASE, 1)[0]
            except HypercallError:
                config = 0
            s.prop[plpi - LPI_BASE] = XEN_PRIORITY | (config & ENABLED)
            vcpu = override if override is not None else vits.collections.get(icid)
            target = s.options.cpus if vcpu is None else dom.pin[vcpu]
            ite.pcoll = target
            state.xen_queue.append((cmds.mapti(info.pdevid, event, plpi, target), ite, None))
            if fired:  # pending in the old pITS: Xen raises it again on the new one
                state.xen_queue.append((cmds.event_cmd(cmds.INT, info.pdevid, event), ite, None))
        s.raised.add(vits.pits)
        if vits.enabled:  # the commands the guest had queued and Xen had not taken run now
            host.its.scheduler.schedule(vits)
