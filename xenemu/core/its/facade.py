"""``ItsHost``: the one object the rest of the core holds, composing the ITS's rooms.

It builds the shared state (state.py) and the rooms over it, boots the pITSs, and keeps the
public API the host, the actions, the shell, the bench and the tests were written against:
the trapped MMIO (``mmio_*``, ``redist_*``), ``run_passes``, ``deliver``, ``end``,
``config_written``, ``advance``, ``add_domain``, ``assign``, ``begin_teardown``, the frame layout,
and the shared state's fields as attributes (``domains``, ``pits``, ``drops``, ...). Every method
here only forwards, to the room that owns it (``advance``: to each pITS model), so a reader starts
from the room, not from here.
"""

from __future__ import annotations

from xenemu.core.its.assignment import Assignment
from xenemu.core.its.elision import ElisionPolicy
from xenemu.core.its.jobs import Jobs
from xenemu.core.its.lpis import Lpis
from xenemu.core.its.registers import Registers
from xenemu.core.its.schedule import CommandScheduler
from xenemu.core.its.state import LPI_BASE, Delivery, DomainIts, ItsDeviceInfo, ItsOptions, ItsState, PitsState
from xenemu.core.its.teardown import Teardown
from xenemu.core.its.translate import Translator
from xenemu.core.memory.guest import GuestMemory


class ItsHost:
    """Every pITS and every domain's vITSs, redistributors and bindings."""

    def __init__(self, memory: GuestMemory, options: ItsOptions | None = None) -> None:
        self.state = ItsState(memory, options or ItsOptions())
        self.assignment = Assignment(self.state)
        self.lpis = Lpis(self.state)
        self.elision = ElisionPolicy(self.state)
        self.translator = Translator(self.state, self.lpis, self.elision)
        self.teardown = Teardown(self.state)
        self.jobs = Jobs(self.state, self.lpis)
        self.scheduler = CommandScheduler(self.state, self.translator, self.elision, self.teardown, self.jobs)
        self.registers = Registers(self.state, self.scheduler)
        self.assignment.boot()

    # -- the shared state, as attributes -----------------------------------------------------------
    @property
    def memory(self) -> GuestMemory:
        return self.state.memory

    @property
    def options(self) -> ItsOptions:
        return self.state.options

    @property
    def prop(self) -> bytearray:
        """The physical LPI configuration table (LPI - 8192)."""
        return self.state.prop

    @property
    def dirty(self) -> set[int]:
        return self.state.dirty

    @property
    def pits(self) -> list[PitsState]:
        return self.state.pits

    @property
    def domains(self) -> dict[int, DomainIts]:
        return self.state.domains

    @property
    def by_vlpi(self) -> dict[tuple[int, int], set[int]]:
        return self.state.by_vlpi

    @property
    def bindings(self) -> dict[int, tuple[int, int, tuple[int, int]]]:
        return self.state.bindings

    @property
    def raised(self) -> set[int]:
        return self.state.raised

    @property
    def tearing_down(self) -> dict[int, int]:
        return self.state.tearing_down

    @property
    def retired(self) -> set[int]:
        return self.state.retired

    @property
    def deliveries(self) -> list[Delivery]:
        """Deliveries made and not yet taken by the shell (which swaps in a new list)."""
        return self.state.deliveries

    @deliveries.setter
    def deliveries(self, value: list[Delivery]) -> None:
        self.state.deliveries = value

    @property
    def drops(self) -> list[tuple[int, int, int, str, str]]:
        """Dropped guest commands not yet logged (the shell swaps in a new list)."""
        return self.state.drops

    @drops.setter
    def drops(self, value: list[tuple[int, int, int, str, str]]) -> None:
        self.state.drops = value

    # -- assignment.py ---------------------------------------------------------------------------
    def add_domain(self, domid: int, vcpus: int = 1, pin: list[int] | None = None) -> DomainIts:
        return self.assignment.add_domain(domid, vcpus, pin)

    def check_assign(self, pdevid: int, pits: int, events: int) -> None:
        self.assignment.check(pdevid, pits, events)

    def assign(self, domid: int, pdevid: int, pits: int, events: int, vdevid: int) -> ItsDeviceInfo:
        return self.assignment.assign(domid, pdevid, pits, events, vdevid)

    # -- teardown.py -----------------------------------------------------------------------------
    def begin_teardown(self, domid: int) -> None:
        self.teardown.begin(domid)

    def teardown_done(self, domid: int) -> bool:
        return self.teardown.done(domid)

    # -- registers.py ----------------------------------------------------------------------------
    def translation_gpa(self, domid: int, pits: int) -> int:
        return self.registers.translation_gpa(domid, pits)

    def config_range(self, domid: int) -> tuple[int, int]:
        return self.registers.config_range(domid)

    def frames(self, domid: int) -> tuple[dict[int, int], int]:
        return self.registers.frames(domid)

    def mmio_write(self, domid: int, vits_pits: int, offset: int, size: int, value: int) -> None:
        self.registers.mmio_write(domid, vits_pits, offset, size, value)

    def mmio_read(self, domid: int, vits_pits: int, offset: int, size: int) -> int:
        return self.registers.mmio_read(domid, vits_pits, offset, size)

    def redist_write(self, domid: int, vcpu: int, offset: int, size: int, value: int) -> None:
        self.registers.redist_write(domid, vcpu, offset, size, value)

    def redist_read(self, domid: int, vcpu: int, offset: int, size: int) -> int:
        return self.registers.redist_read(domid, vcpu, offset, size)

    # -- schedule.py -----------------------------------------------------------------------------
    def run_passes(self) -> None:
        self.scheduler.run_passes()

    def run_pass(self, index: int) -> None:
        self.scheduler.run_pass(index)

    # -- elision.py ------------------------------------------------------------------------------
    def config_written(self, domid: int, vlpi: int, value: int) -> None:
        self.elision.config_written(domid, vlpi, value)

    def guest_wrote(self, domid: int, gpa: int, data: bytes) -> None:
        """A guest's CPU wrote its RAM at ``gpa``: the bytes that fall in its trapped LPI
        configuration table reach the vITS (the rest is plain memory)."""
        dom = self.state.domains.get(domid)
        if dom is None or not dom.propbaser:
            return
        start, end = self.config_range(domid)
        first, last = max(start, gpa), min(end, gpa + len(data))
        if first >= last:
            return
        for at in range(first, last):
            self.elision.config_written(domid, LPI_BASE + at - start, data[at - gpa])
        self.scheduler.run_passes()

    # -- the pITS hardware, for the host and the shell -------------------------------------------
    def msi(self, pits: int, pdevid: int, eventid: int) -> None:
        """A device's write of ``eventid`` to pITS ``pits``'s doorbell; the LPI is pending at
        once (translation is immediate) and delivered to its guest if it can be."""
        self.state.pits[pits].hw.msi(pdevid, eventid)
        self.lpis.deliver()

    def hardware_busy(self) -> bool:
        """Whether any pITS has commands to run or LPIs pending: the shell's ticker then runs."""
        return any(s.hw.queued() or s.hw.pending for s in self.state.pits)

    def commands_queued(self) -> bool:
        return any(s.hw.queued() for s in self.state.pits)

    def take_events(self) -> tuple[list[tuple[int, int, int, str, str]], list[Delivery]]:
        """The drops to log and the deliveries to send since the last call, handed over once."""
        drops, self.drops = self.drops, []
        deliveries, self.deliveries = self.deliveries, []
        return drops, deliveries

    # -- time (pits.py) and lpis.py --------------------------------------------------------------
    def advance(self, seconds: float, limit: int | None = None) -> None:
        """Hardware time passes: each pITS runs what its rate allows (Xen is not involved),
        at most ``limit`` commands each now (the rest of the time is kept for the next call)."""
        for state in self.state.pits:
            state.hw.advance(seconds, limit)

    def deliver(self) -> list[Delivery]:
        return self.lpis.deliver()

    def end(self, domid: int, vcpu: int, intid: int) -> Delivery | None:
        return self.lpis.end(domid, vcpu, intid)
