"""Preemption by work: how much a batch may do before other domains get a turn.

Continuation points (every 1,024 ops, the page's) say where flushes are counted; within them a
batch also pauses whenever it has spent a slice of work, so that no uninterruptible step is
large whatever the ops do (an order-18 op that fails on its last page checks 262,144 pages).
Work is counted in pages: an op costs its pages plus a fixed cost for decoding and dispatch,
``OP_COST`` when the Python handlers run it and ``FAST_OP_COST`` when the compiled loop does
(each is about one page check's time there), and every page-table leaf an op writes into
being, or gives back, costs ``LEAF_COST``.  The compiled loop returns an op of more than
``LARGE_PAGES`` pages to Python, where it is cut into slices of ``LARGE_SLICE`` pages; while it is paused its
domain is marked busy (``Domain.busy_ops``), and the domain's other calls that could change
what the op relies on are refused with ``-EBUSY`` until it completes.  Statuses and per-op
atomicity are those of an unpreempted run.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import TypeVar

from xenemu.abi import pv_iommu as pv
from xenemu.core.memory.domain import Domain

T = TypeVar("T")

#: Work between two pauses: about a millisecond on this machine.
SLICE = 4096
#: Fixed cost of one op beyond its pages, run by the Python handlers, and by the compiled loop.
OP_COST = 16
FAST_OP_COST = 1
#: A page-table leaf written into being or given back (512 entries filled or scanned).
LEAF_COST = 512
#: Ops of more pages than this run in slices of their own, of this many pages.
LARGE_PAGES = 512
LARGE_SLICE = 512
#: What a batch yields at a pause (pending flushes already applied).
PREEMPT = "preempt"
#: Giving back one frame or one reference (a few table updates), and removing one M2B entry
#: with the IOMMU entry it owns (five indexes and a page-table write): what tearing down a
#: domain or an IOREQ server is counted in (measured: a slice of each is about a millisecond).
RELEASE_COST = 8
M2B_COST = 32
#: Releases between two pauses of a teardown.
RELEASES_PER_SLICE = SLICE // RELEASE_COST
M2B_PER_SLICE = SLICE // M2B_COST


class Budget:
    """Work spent since a teardown last paused."""

    __slots__ = ("spent",)

    def __init__(self) -> None:
        self.spent = 0

    def spend(self, units: int) -> bool:
        """Charge ``units``; True when a slice is used up (the caller pauses; a new one starts)."""
        self.spent += units
        if self.spent < SLICE:
            return False
        self.spent = 0
        return True


def pages(flags: int, largest_order: int) -> int:
    """The pages an op's order covers, 0 for an order the host refuses (it fails at once)."""
    order = flags >> pv.ORDER_SHIFT
    return 1 << order if order <= largest_order else 0


def cost(flags: int, largest_order: int) -> int:
    return OP_COST + pages(flags, largest_order)


def is_large(flags: int, largest_order: int) -> bool:
    return pages(flags, largest_order) > LARGE_PAGES


def first_pause(count: int) -> int:
    """The index at which a loop over ``count`` pages first pauses (never, when small)."""
    return LARGE_SLICE if count > LARGE_PAGES else -1


def pause(caller: Domain, target: Domain | None = None) -> Generator[str, None, None]:
    """One pause of a large op: its caller is busy, and a foreign op's target may not change
    its memory, until the op resumes (or is abandoned)."""
    caller.busy_ops += 1
    if target is not None:
        target.p2m_readers += 1
    try:
        yield PREEMPT
    finally:
        caller.busy_ops -= 1
        if target is not None:
            target.p2m_readers -= 1


def drain(steps: Generator[str, None, T]) -> T:
    """Run a generator of pauses to its end, ignoring them (tests, scripts, the sync wrappers): what it returns."""
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            result: T = stop.value
            return result


def finish(outcome: Generator[str, None, int]) -> int:
    """Run a handler that cannot pause (its op is small) to its status."""
    try:
        next(outcome)
    except StopIteration as stop:
        status: int = stop.value
        return status
    raise AssertionError("a small op paused")
