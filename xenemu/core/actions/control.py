"""Toolstack requests (the control socket): domains, devices, faults, stats, audit, dumps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from xenemu.core.actions.base import ControlAction, MaxLen, Outcome, handles
from xenemu.core.audit import audit
from xenemu.core.errors import EINVAL, ENOENT, ESRCH, HypercallError
from xenemu.core.host import Host
from xenemu.core.iommu.entries import entry_kind, entry_mfn, entry_perms
from xenemu.core.iommu.preempt import PREEMPT
from xenemu.core.memory.domain import Domain
from xenemu.core.memory.frames import OWNER_NONE


@dataclass(frozen=True)
class CreateDomain(ControlAction):
    name = "create_domain"
    type: Literal["pv", "hvm"]
    memory: int
    target: int | None = None
    domain_name: str = ""
    #: Quota of mappings (default: the host's max_mappings).
    max_mappings: int | None = None
    vcpus: int = 1
    #: The physical CPU each vCPU runs on (default: vCPU i on CPU i mod CPUs).
    pin: Annotated[list[int], MaxLen(64)] | None = None
    #: The most it may populate (default: ``memory``, as xl's maxmem).
    max_pages: int | None = None


@handles(CreateDomain)
def _create_domain(host: Host, caller: int, action: CreateDomain) -> Outcome:
    dom = yield from host.creating(
        action.type,
        action.memory,
        action.target,
        action.domain_name,
        action.max_mappings,
        action.vcpus,
        action.pin,
        action.max_pages,
    )
    return {"ret": 0, "domid": dom.domid, "token": dom.token}


@dataclass(frozen=True)
class DomainToken(ControlAction):
    """The secret a program presents to speak for ``domid`` (the toolstack hands it out)."""

    name = "domain_token"
    domid: int


@handles(DomainToken)
def _domain_token(host: Host, caller: int, action: DomainToken) -> dict[str, Any]:
    return {"ret": 0, "domid": action.domid, "token": host.domain(action.domid).token}


@dataclass(frozen=True)
class DestroyDomain(ControlAction):
    name = "destroy_domain"
    domid: int


@handles(DestroyDomain)
def _destroy_domain(host: Host, caller: int, action: DestroyDomain) -> Outcome:
    yield from host.destroying(action.domid)
    return {"ret": 0}


def describe(host: Host, dom: Domain) -> dict[str, Any]:
    ctx = host.iommu.contexts.get(dom.domid)
    its = host.its.domains.get(dom.domid)
    return {
        "domid": dom.domid,
        "name": dom.name,
        "type": dom.kind,
        "hwdom": dom.is_hwdom,
        "pages": dom.pages,
        "target": dom.target,
        "devices": sorted(dom.devices),
        "map_cap": host.iommu.map_cap(dom),
        "iommu_context": ctx is not None,
        "flushes": dict(ctx.flushes) if ctx else {},
        "dma_faults": ctx.fault_count if ctx else 0,
        "m2b_entries": host.iommu.m2b.per_mapper[dom.domid],
        "mappings": host.iommu.mappings_held[dom.domid],
        "max_mappings": dom.max_mappings,
        "max_pages": dom.max_pages,
        # The daemon's own memory this domain's page tables and p2m cost (charged to it).
        "page_table_bytes": ctx.table.bytes_used() if ctx else 0,
        "p2m_bytes": dom.p2m.bytes_used(),
        "vcpus": its.vcpus if its else 1,
        "pin": list(its.pin) if its else [],
        "dying": bool(its and its.dying),
        # Stopped for a live migration's last section, or being received (PROTOCOL.md 14.1).
        "paused": dom.domid in host.suspended,
    }


@dataclass(frozen=True)
class SetMaxPages(ControlAction):
    """``xl mem-set``: the most a domain may populate (``populate_physmap`` beyond is -ENOMEM)."""

    name = "set_max_pages"
    domid: int
    max_pages: int


@handles(SetMaxPages)
def _set_max_pages(host: Host, caller: int, action: SetMaxPages) -> dict[str, Any]:
    host.set_max_pages(action.domid, action.max_pages)
    return {"ret": 0}


@dataclass(frozen=True)
class ListDomains(ControlAction):
    name = "list_domains"


@handles(ListDomains)
def _list_domains(host: Host, caller: int, action: ListDomains) -> dict[str, Any]:
    return {"ret": 0, "domains": [describe(host, d) for d in sorted(host.domains.values(), key=lambda d: d.domid)]}


@dataclass(frozen=True)
class AssignDevice(ControlAction):
    """``xl pci-attach``: ``rmrr`` lists reserved regions as [first frame, frame count]."""

    name = "assign_device"
    domid: int
    bdf: str
    rmrr: Annotated[list[tuple[int, int]], MaxLen(64)] | None = None
    #: An MSI-capable device: its ITS DeviceID, number of events, and the pITS it sits behind.
    its_devid: int | None = None
    its_events: int = 0
    pits: int = 0


@handles(AssignDevice)
def _assign_device(host: Host, caller: int, action: AssignDevice) -> dict[str, Any]:
    device = host.assign_device(
        action.domid, action.bdf, list(action.rmrr or []), action.its_devid, action.its_events, action.pits
    )
    reply: dict[str, Any] = {"ret": 0, "bdf": device.bdf}
    if device.its is not None:
        reply["vdevid"] = device.its.vdevid
    return reply


@dataclass(frozen=True)
class InjectFault(ControlAction):
    name = "inject_fault"
    domid: int
    bfn: int
    clear: bool = False


@handles(InjectFault)
def _inject_fault(host: Host, caller: int, action: InjectFault) -> dict[str, Any]:
    if action.clear:
        host.iommu.clear_fault(action.domid, action.bfn)
    else:
        host.iommu.inject_fault(action.domid, action.bfn)
    return {"ret": 0}


@dataclass(frozen=True)
class Stats(ControlAction):
    name = "stats"


@handles(Stats)
def _stats(host: Host, caller: int, action: Stats) -> dict[str, Any]:
    frames = host.frames
    contexts = list(host.iommu.contexts.values())
    return {
        "ret": 0,
        "frames": frames.nr_frames,
        "free_frames": frames.nr_free,
        "domains": len(host.domains),
        # Being built or destroyed a slice at a time: they still hold frames and their ids.
        "domains_in_limbo": len(host.memory.limbo),
        "m2b_entries": len(host.iommu.m2b),
        # A server being torn down exists until what it holds is given back.
        "ioreq_servers": len(host.ioreq.servers) + len(host.ioreq.ending),
        "flushes_added": sum(c.flushes["added"] for c in contexts),
        "flushes_modified": sum(c.flushes["modified"] for c in contexts),
        "dma_faults": sum(c.fault_count for c in contexts) + host.iommu.machine_dma_faults,
        "page_table_bytes": sum(c.table.bytes_used() for c in [*contexts, *host.iommu.retired.values()]),
    }


@dataclass(frozen=True)
class Audit(ControlAction):
    name = "audit"


@handles(Audit)
def _audit(host: Host, caller: int, action: Audit) -> dict[str, Any]:
    return {"ret": 0, "violations": audit(host)}


#: Rows in one ``dump_mappings`` reply: encoding a reply is one step of the shell (65,536 rows
#: took a quarter of a second), so a longer dump pages by ``next``.
MAX_DUMP = 1024


@dataclass(frozen=True)
class DumpMappings(ControlAction):
    """A domain's IOMMU entries from ``start``, at most ``limit`` of them, and ``next``: the
    BFN to ask from for more (None at the end).  A reply may hold fewer than ``limit`` (at most
    ``MAX_DUMP``); it is gathered a few leaves at a time, pausing between, so no dump stalls
    the host however large the context."""

    name = "dump_mappings"
    domid: int
    start: int = 0
    limit: int = 4096


@handles(DumpMappings)
def _dump_mappings(host: Host, caller: int, action: DumpMappings) -> Outcome:
    dom = host.domain(action.domid)
    if not 0 <= action.start < 1 << 64 or action.limit < 0:
        raise HypercallError(-EINVAL, "start must be a BFN and limit not negative")
    limit = min(action.limit, MAX_DUMP)
    entries: list[tuple[int, int]] = []
    resume: int | None = action.start
    while resume is not None and len(entries) < limit:  # a few leaves at a time, pausing between
        if entries:
            yield PREEMPT
            if host.memory.domains.get(dom.domid) is not dom:
                raise HypercallError(-ESRCH, f"d{dom.domid} was destroyed meanwhile")
        more, resume = host.iommu.entries_from(dom, resume, limit - len(entries))
        entries += more
    rows: list[dict[str, Any]] = []
    for bfn, entry in entries:
        perms = entry_perms(entry)
        rows.append(
            {
                "bfn": bfn,
                "mfn": entry_mfn(entry),
                "perms": ("r" if perms & 1 else "-") + ("w" if perms & 2 else "-"),
                "kind": entry_kind(entry).name.lower(),
            }
        )
    return {
        "ret": 0,
        "domid": dom.domid,
        "iommu_context": dom.domid in host.iommu.contexts,
        "mappings": rows,
        "next": resume,
    }


@dataclass(frozen=True)
class HostInfo(ControlAction):
    name = "host_info"


@handles(HostInfo)
def _host_info(host: Host, caller: int, action: HostInfo) -> dict[str, Any]:
    return {
        "ret": 0,
        "options": host.options.to_dict(),
        "fast_path": host.iommu.fast is not None,
    }


@dataclass(frozen=True)
class FrameInfo(ControlAction):
    """A frame's owner and reference counts, by MFN or by a domain's GFN (like getpageframeinfo)."""

    name = "frame_info"
    mfn: int | None = None
    domid: int | None = None
    gfn: int | None = None


@handles(FrameInfo)
def _frame_info(host: Host, caller: int, action: FrameInfo) -> dict[str, Any]:
    mfn = action.mfn
    if action.domid is not None and action.gfn is not None:
        mfn = host.memory.gfn_to_mfn(host.domain(action.domid), action.gfn)
        if mfn is None:
            raise HypercallError(-ENOENT, f"GFN {action.gfn:#x} of d{action.domid} is not populated")
    if mfn is None or not host.frames.exists(mfn):
        raise HypercallError(-EINVAL, "name a frame: mfn, or domid and gfn")
    frames = host.frames
    owner = frames.owner[mfn]
    return {
        "ret": 0,
        "mfn": mfn,
        "owner": None if owner == OWNER_NONE else owner,
        "populated": bool(frames.populated[mfn]),
        "count": frames.count[mfn],
        "type_count": frames.type_count[mfn],
        "m2b_entries": len(host.iommu.m2b.by_mfn.get(mfn, ())),
        "grant_maps": host.grants.maps_of_frame[mfn],
    }
