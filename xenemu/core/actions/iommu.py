"""Hypercalls a guest or emulator makes: the PV IOMMU op, IOREQ servers, its memory, its devices."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from xenemu.core.actions.base import Action, Outcome, handles
from xenemu.core.errors import EINVAL, ENOENT, EPERM, HypercallError
from xenemu.core.host import Host
from xenemu.core.iommu.device import normalise_bdf
from xenemu.core.iommu.subops import do_iommu_op

MAX_DMA_BYTES = 1 << 20


@dataclass(frozen=True)
class IommuOp(Action):
    """``do_iommu_op(buf, count)``: ``buf`` is ``count`` packed ``struct pv_iommu_op``s."""

    name = "iommu_op"
    buf: bytes
    count: int


@handles(IommuOp)
def _iommu_op(host: Host, caller: int, action: IommuOp) -> Outcome:
    buf = bytearray(action.buf)
    ret = yield from do_iommu_op(host.iommu, caller, buf, action.count)
    return {"ret": ret, "buf": buf}  # packed as it is: the ops' statuses are written in place


@dataclass(frozen=True)
class CreateIoreqServer(Action):
    name = "create_ioreq_server"
    target: int


@handles(CreateIoreqServer)
def _create_ioreq_server(host: Host, caller: int, action: CreateIoreqServer) -> dict[str, Any]:
    server = host.emulators.create_server(caller, action.target)
    return {"ret": 0, "ioserver": server.id}


@dataclass(frozen=True)
class DestroyIoreqServer(Action):
    name = "destroy_ioreq_server"
    ioserver: int


@handles(DestroyIoreqServer)
def _destroy_ioreq_server(host: Host, caller: int, action: DestroyIoreqServer) -> dict[str, Any]:
    host.emulators.destroy_server(caller, action.ioserver)
    return {"ret": 0}


@dataclass(frozen=True)
class GuestWrite(Action):
    """The guest's CPU writes its own memory at a GFN (what devices later read by DMA)."""

    name = "guest_write"
    gfn: int
    offset: int
    data: bytes


@handles(GuestWrite)
def _guest_write(host: Host, caller: int, action: GuestWrite) -> dict[str, Any]:
    host.memory.access(caller, action.gfn, action.offset, action.data)
    its = host.its
    if caller in its.domains and its.domains[caller].propbaser:
        # The LPI configuration table is trapped: each byte written there reaches the vITS.
        start, end = its.config_range(caller)
        gpa = (action.gfn << 12) + action.offset
        first, last = max(start, gpa), min(end, gpa + len(action.data))  # the bytes in the table
        for at in range(first, last):
            its.config_written(caller, 8192 + at - start, action.data[at - gpa])
        its.run_passes()
    return {"ret": 0}


@dataclass(frozen=True)
class GuestRead(Action):
    name = "guest_read"
    gfn: int
    offset: int
    length: int


@handles(GuestRead)
def _guest_read(host: Host, caller: int, action: GuestRead) -> dict[str, Any]:
    return {"ret": 0, "data": host.memory.access(caller, action.gfn, action.offset, None, action.length)}


@dataclass(frozen=True)
class DeviceDma(Action):
    """One of the caller's devices reads (``data`` absent) or writes at a bus address."""

    name = "device_dma"
    bdf: str
    addr: int
    data: bytes | None = None
    length: int = 0


@handles(DeviceDma)
def _device_dma(host: Host, caller: int, action: DeviceDma) -> dict[str, Any]:
    size = len(action.data) if action.data is not None else action.length
    if size > MAX_DMA_BYTES:
        raise HypercallError(-EINVAL, f"DMA larger than {MAX_DMA_BYTES} bytes")
    try:
        device = host.devices.get(normalise_bdf(action.bdf))
    except ValueError as exc:
        raise HypercallError(-EINVAL, str(exc)) from None
    if device is None:
        raise HypercallError(-ENOENT, f"no device {action.bdf}")
    if device.domid != caller:
        raise HypercallError(-EPERM, f"{action.bdf} is not assigned to d{caller}")
    result = host.device_dma(device.bdf, action.addr, action.data, action.length)
    return {"ret": 0, "ok": result.ok, "data": result.data, "fault_bfn": result.fault_bfn, "reason": result.reason}


@dataclass(frozen=True)
class DomainInfo(Action):
    """The caller's own domain: id, kind, memory, devices, and whether it may map."""

    name = "domain_info"


@handles(DomainInfo)
def _domain_info(host: Host, caller: int, action: DomainInfo) -> dict[str, Any]:
    dom = host.domain(caller)
    its = host.its
    frames, redist = its.frames(caller)
    its_devices = [
        {"bdf": d.bdf, "vdevid": d.its.vdevid, "events": d.its.events, "pits": d.its.pits}
        for d in sorted(host.devices.values(), key=lambda d: d.bdf)
        if d.domid == caller and d.its is not None
    ]
    return {
        "ret": 0,
        "domid": dom.domid,
        "type": dom.kind,
        "pages": dom.pages,
        "devices": sorted(dom.devices),
        "target": dom.target,
        "hwdom": dom.is_hwdom,
        # what firmware (device tree / IORT) would tell the guest about its interrupt controller
        "its": {
            "frames": {str(p): gpa for p, gpa in frames.items()},
            "redist_base": redist,
            "vcpus": its.domains[caller].vcpus,
            "devices": its_devices,
        },
    }


@dataclass(frozen=True)
class Echo(Action):
    """Returns ``buf`` untouched: the transport's own cost, for the benchmark's ceiling."""

    name = "echo"
    buf: bytes
    count: int = 0


@handles(Echo)
def _echo(host: Host, caller: int, action: Echo) -> dict[str, Any]:
    return {"ret": 0, "buf": action.buf}
