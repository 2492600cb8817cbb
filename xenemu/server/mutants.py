"""Deliberately broken daemons, for ``xenemu conformance --self-test`` only.

The self-test proves that the conformance suite can fail: it starts ``xenemu serve`` with
``XENEMU_MUTANT=NAME`` in the environment, and this module, asked once by ``run_daemon``
before the daemon serves anything, replaces one piece of the core or the shell with a broken
one. Nothing here is on any hot path (with the variable unset the daemon only reads the
environment once at start) and nothing is reachable by a peer: no request, option or token
selects a mutant, only the environment of the process that starts the daemon, and a mutant
announces itself in the log at warning level. Each mutation's name and what it breaks is
listed in ``xenemu.conformance.selftest.MUTANTS``; the two must name the same mutations.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Generator
from typing import Any

import structlog

from xenemu.abi import pv_iommu as pv
from xenemu.core.errors import EACCES, EINVAL, ENOSPC
from xenemu.core.grants import ops as grant_ops
from xenemu.core.grants.table import GNTST_bad_page, GNTST_general_error
from xenemu.core.host import Host
from xenemu.core.iommu import iotlb, subops, xen_changes
from xenemu.core.iommu.entries import PERM_W, Kind
from xenemu.core.ioreq import balloon
from xenemu.core.its import lpis, schedule
from xenemu.server import session

ENV = "XENEMU_MUTANT"
log = structlog.get_logger("xenemu.mutant")


def _status_swapped(handler: subops.SubopHandler, wrong: int, instead: int) -> subops.SubopHandler:
    def mutant(iommu: Any, dom: Any, op: Any) -> int | Generator[str, None, int]:
        outcome = handler(iommu, dom, op)
        if isinstance(outcome, int):
            return instead if outcome == wrong else outcome

        def driven() -> Generator[str, None, int]:
            status = yield from outcome
            return instead if status == wrong else status

        return driven()

    return mutant


def map_order_status(host: Host) -> None:
    """map_page answers -EINVAL where the order check says -ENOSPC."""
    subops.SUBOPS[pv.MAP_PAGE] = _status_swapped(subops.SUBOPS[pv.MAP_PAGE], -ENOSPC, -EINVAL)


def rmrr_status(host: Host) -> None:
    """unmap_page answers -ENOSPC for a BFN in an RMRR region instead of -EACCES."""
    subops.SUBOPS[pv.UNMAP_PAGE] = _status_swapped(subops.SUBOPS[pv.UNMAP_PAGE], -EACCES, -ENOSPC)


def missed_iotlb_flush(host: Host) -> None:
    """A modified flush no longer invalidates the IOTLB: devices keep stale translations."""
    iotlb.Iotlb.invalidate_all = lambda self: None  # type: ignore[method-assign]


def leaked_reference(host: Host) -> None:
    """unmap_page of a single page takes its frame's reference back after dropping it."""
    handler = subops.SUBOPS[pv.UNMAP_PAGE]

    def mutant(iommu: Any, dom: Any, op: Any) -> int | Generator[str, None, int]:
        ctx = iommu.contexts.get(dom.domid)
        entry = ctx.table.get(op.u.unmap_page.bfn) if ctx is not None and not op.flags else 0
        outcome = handler(iommu, dom, op)
        if outcome == 0 and entry and (entry >> 2) & 15 == int(Kind.MAP):
            iommu.frames.get(entry >> 8, bool(entry & PERM_W))
        return outcome

    subops.SUBOPS[pv.UNMAP_PAGE] = mutant


def invalidate_order(host: Host) -> None:
    """A call's invalidates go out last owed first."""
    send = balloon.Invalidations.send

    def mutant(self: balloon.Invalidations, registry: Any, notify: bool = True) -> list[tuple[int, int]]:
        self.targets.reverse()
        return send(self, registry, notify)

    balloon.Invalidations.send = mutant  # type: ignore[method-assign]


def swap_ignored(host: Host) -> None:
    """A frame mapped only with swap_mfn is announced by invalidates instead of re-pointed."""

    def mutant(self: balloon.Balloon, mfn: int, owed: balloon.Invalidations, budget: Any) -> Generator[str, None, None]:
        owed.targets.extend(sorted((entry.ioserver, entry.bfn) for entry in self.iommu.m2b.for_frame(mfn)))
        yield from ()

    balloon.Balloon.release_frame = mutant  # type: ignore[method-assign]


def stalled_its_queue(host: Host) -> None:
    """The pITS completes commands but the vITS never moves CREADR on."""
    schedule.CommandScheduler._advance_creadr = staticmethod(lambda vits: None)  # type: ignore[method-assign]


def pending_lost(host: Host) -> None:
    """An LPI that fires while in service is dropped instead of left pending for its end."""
    pend = lpis.Lpis._pend

    def mutant(self: lpis.Lpis, domid: int, dom: Any, ite: Any, vcpu: int, out: list[Any]) -> None:
        if (vcpu, ite.vlpi) not in dom.in_service:
            pend(self, domid, dom, ite, vcpu, out)

    lpis.Lpis._pend = mutant  # type: ignore[method-assign]


def no_in_service(host: Host) -> None:
    """An LPI is delivered again while the guest still has it in service."""
    pend = lpis.Lpis._pend

    def mutant(self: lpis.Lpis, domid: int, dom: Any, ite: Any, vcpu: int, out: list[Any]) -> None:
        dom.in_service.discard((vcpu, ite.vlpi))
        pend(self, domid, dom, ite, vcpu, out)

    lpis.Lpis._pend = mutant  # type: ignore[method-assign]


def grant_status(host: Host) -> None:
    """A grant of an unpopulated GFN is GNTST_general_error instead of GNTST_bad_page."""
    map_one = grant_ops.Grants._map_one

    def mutant(self: grant_ops.Grants, mapper: Any, op: Any) -> int:
        status = map_one(self, mapper, op)
        return GNTST_general_error if status == GNTST_bad_page else status

    grant_ops.Grants._map_one = mutant  # type: ignore[method-assign]


def grant_readonly_writable(host: Host) -> None:
    """A read-only grant is mapped writable in the mapper's IOMMU context."""
    map_grant = xen_changes.map_grant

    def mutant(iommu: Any, mapper: Any, bfn: int, mfn: int, readonly: bool) -> None:
        map_grant(iommu, mapper, bfn, mfn, False)

    xen_changes.map_grant = mutant


def bad_token_kept(host: Host) -> None:
    """A hello with a bad token is refused but the connection stays open."""
    refuse = session.Session.refuse

    async def mutant(self: session.Session, req_id: Any, errno: int, message: str, **kw: Any) -> None:
        if errno == -EACCES:
            kw["close"] = False
        await refuse(self, req_id, errno, message, **kw)

    session.Session.refuse = mutant  # type: ignore[method-assign]


def dma_dirty_lost(host: Host) -> None:
    """DMA writes never set their IOMMU entry's dirty bit: a live migration misses them."""
    host.iommu.dirty_tracking_on = lambda: None  # type: ignore[method-assign]
    host.iommu.dirty_tracking_off = lambda: None  # type: ignore[method-assign]


MUTANTS: dict[str, Callable[[Host], None]] = {
    "map-order-status": map_order_status,
    "rmrr-status": rmrr_status,
    "missed-iotlb-flush": missed_iotlb_flush,
    "leaked-reference": leaked_reference,
    "invalidate-order": invalidate_order,
    "swap-ignored": swap_ignored,
    "stalled-its-queue": stalled_its_queue,
    "pending-lost": pending_lost,
    "no-in-service": no_in_service,
    "grant-status": grant_status,
    "grant-readonly-writable": grant_readonly_writable,
    "bad-token-kept": bad_token_kept,
    "dma-dirty-lost": dma_dirty_lost,
}


def apply_from_environment(host: Host) -> None:
    """Break the daemon as ``XENEMU_MUTANT`` says (the self-test's daemons only)."""
    name = os.environ.get(ENV)
    if not name:
        return
    if name not in MUTANTS:
        raise SystemExit(f"xenemu: unknown mutant {name!r}")
    if host.iommu.fast is not None:
        raise SystemExit("xenemu: a mutant runs with --no-fast-path (it breaks the Python handlers)")
    MUTANTS[name](host)
    log.warning("mutant", name=name, breaks=(MUTANTS[name].__doc__ or "").strip())
