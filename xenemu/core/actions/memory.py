"""A guest's memory: ballooning (decrease_reservation, populate_physmap) and its CPU's reads and writes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from xenemu.core.actions.base import Action, MaxLen, Outcome, handles
from xenemu.core.errors import E2BIG, EINVAL, HypercallError
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
    gfns: Annotated[list[int], MaxLen(MAX_EXTENTS)]


@handles(DecreaseReservation)
def _decrease_reservation(host: Host, caller: int, action: DecreaseReservation) -> Outcome:
    result = yield from host.balloon.decrease_reservation(caller, _bounded(action.gfns))
    return result


@dataclass(frozen=True)
class PopulatePhysmap(Action):
    """``XENMEM_populate_physmap``: ``ret`` = GFNs done, ``status``, and a PV guest's ``mfns``."""

    name = "populate_physmap"
    gfns: Annotated[list[int], MaxLen(MAX_EXTENTS)]


@handles(PopulatePhysmap)
def _populate_physmap(host: Host, caller: int, action: PopulatePhysmap) -> Outcome:
    result = yield from host.balloon.populate_steps(caller, _bounded(action.gfns))
    return result


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
    host.its.guest_wrote(caller, (action.gfn << 12) + action.offset, action.data)  # the trapped LPI table
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
