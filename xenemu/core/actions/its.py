"""The vITS over the wire: trapped MMIO, the end of an LPI, and the toolstack's view."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from xenemu.core.actions.base import Action, ControlAction, handles
from xenemu.core.errors import EINVAL, ENOENT, HypercallError
from xenemu.core.host import Host


@dataclass(frozen=True)
class ItsMmio(Action):
    """A trapped access: ``frame`` "its" (``index`` = pITS) or "redist" (``index`` = vCPU);
    a write when ``value`` is given, else a read."""

    name = "its_mmio"
    frame: Literal["its", "redist"]
    index: int
    offset: int
    size: int
    value: int | None = None


@handles(ItsMmio)
def _its_mmio(host: Host, caller: int, action: ItsMmio) -> dict[str, Any]:
    its = host.its
    if caller not in its.domains:
        raise HypercallError(-ENOENT, "no vITS for this domain")
    if action.size not in (1, 2, 4, 8) or action.offset < 0 or (action.value is not None and action.value < 0):
        raise HypercallError(-EINVAL, "bad access")
    if action.frame == "its":
        if action.value is None:
            value = its.mmio_read(caller, action.index, action.offset, action.size)
        else:
            its.mmio_write(caller, action.index, action.offset, action.size, action.value)
    elif action.value is None:
        value = its.redist_read(caller, action.index, action.offset, action.size)
    else:
        its.redist_write(caller, action.index, action.offset, action.size, action.value)
    its.run_passes()
    return {"ret": 0} if action.value is not None else {"ret": 0, "value": value}


@dataclass(frozen=True)
class ItsEnd(Action):
    """The guest is done with an LPI it was given; one pending meanwhile is delivered now."""

    name = "its_end"
    vcpu: int
    intid: int


@handles(ItsEnd)
def _its_end(host: Host, caller: int, action: ItsEnd) -> dict[str, Any]:
    if caller not in host.its.domains:
        raise HypercallError(-ENOENT, "no vITS for this domain")
    host.its.end(caller, action.vcpu, action.intid)
    return {"ret": 0}


@dataclass(frozen=True)
class ItsInfo(ControlAction):
    """Where a domain's vITSs and redistributors are, and its devices' virtual DeviceIDs."""

    name = "its_info"
    domid: int


@handles(ItsInfo)
def _its_info(host: Host, caller: int, action: ItsInfo) -> dict[str, Any]:
    host.domain(action.domid)
    its = host.its
    dom = its.domains[action.domid]
    frames, redist = its.frames(action.domid)
    devices = [
        {"bdf": d.bdf, "vdevid": d.its.vdevid, "devid": d.its.pdevid, "events": d.its.events, "pits": d.its.pits}
        for d in sorted(host.devices.values(), key=lambda d: d.bdf)
        if d.domid == action.domid and d.its is not None
    ]
    counters = {
        str(p): {
            "received": dict(v.received),
            "forwarded": dict(v.forwarded),
            "elided": dict(v.elided),
            "dropped": dict(v.dropped),
            "longest_wait_passes": v.longest_wait,
            "mappings": len(v.ites),
            "xen_owed": len(v.owed) + len(v.moves),
            "xen_owed_peak": v.owed_peak,
            "scanning": v.job is not None,
        }
        for p, v in dom.vits.items()
    }
    return {
        "ret": 0,
        "its_frames": {str(p): gpa for p, gpa in frames.items()},
        "redist_base": redist,
        "vcpus": dom.vcpus,
        "pin": dom.pin,
        "devices": devices,
        "vits": counters,
        "loading": [vcpu for vcpu, r in enumerate(dom.redists) if r.load is not None],
    }


@dataclass(frozen=True)
class ItsStats(ControlAction):
    name = "its_stats"


@handles(ItsStats)
def _its_stats(host: Host, caller: int, action: ItsStats) -> dict[str, Any]:
    return {
        "ret": 0,
        "options": {
            k: getattr(host.its.options, k) for k in ("pits", "cpus", "queue_slots", "rate", "batch_size", "elision")
        },
        "pits": [
            {
                "index": s.hw.index,
                "passes": s.passes,
                "batches": s.batches,
                "xen_ints": s.xen_ints,
                "physical": dict(s.physical),
                "queued": s.hw.queued(),
                "xen_queue": len(s.xen_queue),
                "xen_owed": sum(len(v.owed) + len(v.moves) for v in s.owing),
                "hardware_errors": dict(s.hw.errors),
            }
            for s in host.its.pits
        ],
        "tearing_down": sorted(host.its.tearing_down),
        "jobs": len(host.its.state.jobs),
    }
