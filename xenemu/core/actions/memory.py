"""Ballooning hypercalls, and the emulator's side of its IOREQ server (ring, requests)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from xenemu.core.actions.base import Action, Outcome, handles
from xenemu.core.errors import E2BIG, EINVAL, ENOENT, HypercallError
from xenemu.core.host import Host

#: Most GFNs one memory_op may name (Xen bounds extents per call too).
MAX_EXTENTS = 65536


def _bounded(gfns: list[int]) -> list[int]:
    if len(gfns) > MAX_EXTENTS:
        raise HypercallError(-E2BIG, f"more than {MAX_EXTENTS} GFNs in one call")
    if any(g < 0 for g in gfns):
        raise HypercallError(-EINVAL, "negative GFN")
    return gfns


@dataclass(frozen=True)
class DecreaseReservation(Action):
    """``XENMEM_decrease_reservation``: ``ret`` = GFNs done, ``status`` = why it stopped (or 0)."""

    name = "decrease_reservation"
    gfns: list[int]


@handles(DecreaseReservation)
def _decrease_reservation(host: Host, caller: int, action: DecreaseReservation) -> Outcome:
    result = yield from host.balloon.decrease_reservation(caller, _bounded(action.gfns))
    return result


@dataclass(frozen=True)
class PopulatePhysmap(Action):
    """``XENMEM_populate_physmap``: ``ret`` = GFNs done, ``status``, and a PV guest's ``mfns``."""

    name = "populate_physmap"
    gfns: list[int]


@handles(PopulatePhysmap)
def _populate_physmap(host: Host, caller: int, action: PopulatePhysmap) -> dict[str, Any]:
    return host.balloon.populate_physmap(caller, _bounded(action.gfns))


@dataclass(frozen=True)
class IoreqFetch(Action):
    """The emulator reads its shared pages: the buffered ring and the pending synchronous requests."""

    name = "ioreq_fetch"
    ioserver: int


@handles(IoreqFetch)
def _ioreq_fetch(host: Host, caller: int, action: IoreqFetch) -> dict[str, Any]:
    server = host.emulators.own_server(caller, action.ioserver)
    return {
        "ret": 0,
        "page": bytes(server.page),
        "sync": [[req_id, bytes(req)] for req_id, req in sorted(server.pending.items())],
    }


@dataclass(frozen=True)
class IoreqAck(Action):
    """The emulator consumed its buffered ring up to ``read_pointer``."""

    name = "ioreq_ack"
    ioserver: int
    read_pointer: int


@handles(IoreqAck)
def _ioreq_ack(host: Host, caller: int, action: IoreqAck) -> dict[str, Any]:
    server = host.emulators.own_server(caller, action.ioserver)
    if not server.acknowledge(action.read_pointer):
        raise HypercallError(-EINVAL, "read_pointer beyond the write pointer")
    return {"ret": 0}


@dataclass(frozen=True)
class IoreqComplete(Action):
    """The emulator answers a synchronous request (its state becomes STATE_IORESP_READY)."""

    name = "ioreq_complete"
    ioserver: int
    id: int


@handles(IoreqComplete)
def _ioreq_complete(host: Host, caller: int, action: IoreqComplete) -> dict[str, Any]:
    server = host.emulators.own_server(caller, action.ioserver)
    if not server.complete(action.id):
        raise HypercallError(-ENOENT, f"no pending request {action.id}")
    return {"ret": 0}


@dataclass(frozen=True)
class ReleaseIoreqServers(Action):
    """Raised by the shell when a domain's last connection closes: its emulator is gone."""

    name = "release_ioreq_servers"
    channel = "internal"
    domid: int


@handles(ReleaseIoreqServers)
def _release_ioreq_servers(host: Host, caller: int, action: ReleaseIoreqServers) -> dict[str, Any]:
    return {"ret": host.emulators.release_servers(action.domid)}
