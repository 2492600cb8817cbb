"""A domain's vITS in a save image: read when it is quiescent, checked, and rebuilt on a restore.

What is carried is what the guest sees and what KVM saves of an ITS: the registers (``CTLR``
enable, ``CBASER``, ``BASER``s, ``CREADR``/``CWRITER``), each device's mapping (``MAPD`` Size, or
unmapped), each ITE (event -> vLPI, collection, ``MOVALL``'s retarget, and the pending state that
belongs to it), the collections, and what each vCPU has in service. Physical LPIs are not: the
restored devices get new ones at assignment, and each ITE's physical ``MAPTI`` is queued as one
of Xen's own commands, with the LPI's enable bit read from the guest's configuration table (as
KVM reads it when it restores an ITE).

A physical LPI that fired but that the pITS holds pending (disabled in its cache) is carried as
a flag on its ITE, and Xen raises it again on the new pITS with an ``INT`` after the ``MAPTI``.

A vITS is saved only between commands: with none outstanding or in flight, none of Xen's own
queued, owed or on the pITS for its devices, no scan or pending-table load of its domain still
running, and no mapping waiting for its physical ``MAPTI``;
otherwise the save is ``-EBUSY`` (try again: the pITS runs them in microseconds).
"""

from __future__ import annotations

from typing import Any

from xenemu.abi import its_cmd as cmds
from xenemu.core.errors import EBUSY, EINVAL, ENOSPC, HypercallError
from xenemu.core.host import Host
from xenemu.core.its.state import CBASER_ADDR, ENABLED, LPI_BASE, XEN_PRIORITY, Ite, Vits, lpi_limit
from xenemu.core.migration.image import refuse


def refusal(host: Host, domid: int) -> HypercallError | None:
    """Why the domain's vITS cannot be saved now (None: it can)."""
    its = host.its.domains.get(domid)
    if its is None:
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
            or vits.owed  # Xen's own commands for it, coalesced (its/jobs.py), not yet placed
            or vits.moves
            or vits.job is not None  # a MAPC/MOVALL scan still running
            or its.loading()  # a pending table still being read
        ):
            return HypercallError(-EBUSY, f"d{domid}'s vITS {vits.pits} has commands in flight: try again")
    return None


def resume_received(host: Host) -> None:
    """Received domains run once their vITS is what it was on the source: Xen's MAPD and
    MAPTIs for their devices (and the INTs of what had fired) have run on this host's pITS.
    Until then they stay suspended (their calls are -EBUSY, "try again"): an MSI raised
    meanwhile would be dropped by a pITS whose ITT for the device is not loaded yet, though the
    device's write was acknowledged (on the source it would have been delivered)."""
    for domid in sorted(host.resuming):
        if domid not in host.domains:
            host.resuming.discard(domid)
        elif refusal(host, domid) is None:
            host.resuming.discard(domid)
            host.suspended.discard(domid)


def save(host: Host, domid: int) -> dict[str, Any]:
    """The ``vits`` and ``in_service`` fields of the image's ``its``."""
    its = host.its.domains[domid]
    out = []
    for pits, vits in sorted(its.vits.items()):
        held = host.its.pits[pits].hw.pending  # fired, not yet taken (disabled in the pITS's cache)
        out.append(
            {
                "pits": pits,
                "enabled": vits.enabled,
                "cbaser": vits.cbaser,
                "baser": list(vits.baser),
                "creadr": vits.creadr,
                "cwriter": vits.cwriter,
                "devices": [[v, d.size] for v, d in sorted(vits.devices.items())],
                "ites": [
                    [v, e, i.vlpi, i.icid, i.vcpu_override, i.pending, i.plpi in held]
                    for (v, e), i in sorted(vits.ites.items())
                ],
                "collections": sorted([icid, vcpu] for icid, vcpu in vits.collections.items()),
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


def check(meta: dict[str, Any]) -> None:
    """Every vITS field and cross-reference: devices and events the image's devices have, vLPIs
    within ``PROPBASER``'s IDbits, collections and vCPUs the domain has, a quiescent queue."""
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
    keys = {"pits", "enabled", "cbaser", "baser", "creadr", "cwriter", "devices", "ites", "collections"}
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
        queue = ((v["cbaser"] & 0xFF) + 1) * 4096
        if v["creadr"] != v["cwriter"] or v["creadr"] % 32 or v["creadr"] >= queue:
            raise refuse("a vITS is saved with no command outstanding, CREADR = CWRITER in its queue")
        sizes: dict[int, int | None] = {}
        for entry in v["devices"] if isinstance(v["devices"], list) else [None]:
            if not isinstance(entry, list) or len(entry) != 2 or entry[0] not in devices or entry[0] in sizes:
                raise refuse("a vITS device is not one of its devices, or appears twice")
            sizes[entry[0]] = _opt(entry[1], "MAPD Size", 16)
        if set(sizes) != set(devices):
            raise refuse("a vITS must list each of its devices")
        collections: list[Any] = v["collections"] if isinstance(v["collections"], list) else [None]
        for entry in collections:
            if not isinstance(entry, list) or len(entry) != 2:
                raise refuse("a collection is not [icid, vcpu]")
            _int(entry[0], "ICID", 0, vcpus + 1), _int(entry[1], "collection vCPU", 0, vcpus)
        if len({c[0] for c in collections}) != len(collections):
            raise refuse("a collection appears twice")
        seen = set()
        for entry in v["ites"] if isinstance(v["ites"], list) else [None]:
            if not isinstance(entry, list) or len(entry) != 7 or not isinstance(entry[6], bool):
                raise refuse("an ITE is not [vdevid, event, vlpi, icid, retarget, pending, fired]")
            vdevid, event, vlpi, icid, override, pending, _fired = entry
            size = sizes.get(vdevid) if isinstance(vdevid, int) else None
            if size is None or (vdevid, event) in seen:
                raise refuse("an ITE of a device that is not mapped, or twice")
            seen.add((vdevid, event))
            _int(event, "EventID", 0, min(1 << (size + 1), devices[vdevid]["events"]))
            _int(vlpi, "vLPI", LPI_BASE, limit), _int(icid, "ITE collection", 0, vcpus + 1)
            _opt(override, "retarget vCPU", vcpus), _opt(pending, "pending vCPU", vcpus)
            if pending is not None and [pending, vlpi] not in its["in_service"]:
                raise refuse("an LPI pending on a vCPU that does not have it in service")
    for entry in its["in_service"]:
        if not isinstance(entry, list) or len(entry) != 2:
            raise refuse("an LPI in service is not [vcpu, intid]")
        _int(entry[0], "in-service vCPU", 0, vcpus), _int(entry[1], "in-service INTID", LPI_BASE, 1 << 16)


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
    """Put the vITS back after its devices were assigned (each with new physical LPIs)."""
    s = host.its.state
    dom = s.domains[domid]
    dom.in_service = {(v, lpi) for v, lpi in meta["its"]["in_service"]}
    base = dom.propbaser & CBASER_ADDR
    for saved in meta["its"]["vits"]:
        vits: Vits = dom.vits[saved["pits"]]
        state = s.pits[vits.pits]
        vits.enabled, vits.cbaser, vits.baser = saved["enabled"], saved["cbaser"], list(saved["baser"])
        vits.creadr = vits.cwriter = vits.progress = saved["creadr"]
        vits.collections = {icid: vcpu for icid, vcpu in saved["collections"]}
        for vdevid, size in saved["devices"]:
            vits.devices[vdevid].size = size
            if size is None:  # the guest unmapped it: so is the device on the pITS
                state.xen_queue.append((cmds.mapd(vits.devices[vdevid].info.pdevid, 0, 0, False), None, None))
        for vdevid, event, vlpi, icid, override, pending, fired in saved["ites"]:
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
