"""The state every room of the ITS shares: what Xen knows of each pITS and each guest's vITS.

Nothing here decides anything. The dataclasses are the nouns of vits-semantics.md: a domain's
vITS state (``DomainIts``: vCPUs and their pinning, the shared ``GICR_PROPBASER``, one
``Redistributor`` per vCPU, one ``Vits`` per pITS its devices sit on, and what each vCPU has
in service), a vITS with its ``vits_cq`` (``creadr``/``cwriter``/``progress``), its devices and
ITEs (each carrying its LPI's pending state), and Xen's view of each pITS (``PitsState``: the
schedule list, the shadow of its slots, Xen's own queue). ``ItsState`` holds all of it, plus
the host-wide physical LPI configuration table, its dirty bitmap and the bindings from physical
LPIs to guests' mappings.

It is a room of its own so that the rooms that act on the state (registers, translation,
scheduling, elision, delivery, teardown) can share one object without importing one another:
each imports this module, and only the few neighbours it calls.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Literal

from xenemu.abi import const
from xenemu.abi import its_cmd as cmds
from xenemu.abi.its_cmd import ItsCommand
from xenemu.core.its.pits import PhysicalIts
from xenemu.core.memory.frames import PAGE_SIZE
from xenemu.core.memory.guest import GuestMemory

Elision = Literal["lazy", "eager", "off"]

LPI_BASE = const("LPI_INTID_BASE")
ENABLED = const("LPI_PROP_ENABLED")
#: Xen's own priority for every physical LPI; only the guest's enable bit reaches the table.
XEN_PRIORITY = const("LPI_XEN_PRIORITY")
CMD_SIZE = const("ITS_CMD_SIZE")
#: The address field of CBASER, and of the LPI tables' base registers (bits 51:12).
CBASER_ADDR = const("GITS_CBASER_ADDR_MASK")
#: The top DeviceID, never assigned: Xen's own device, whose event 0 is its completion LPI.
XEN_DEVID = (1 << 16) - 1


def lpi_limit(propbaser: int) -> int:
    """One past the largest vLPI a guest may map: 2^min(IDbits + 1, 16), as KVM bounds it
    (GICR_PROPBASER's IDbits field is the number of ID bits - 1; the vITS has 16)."""
    return 1 << min((propbaser & 0x1F) + 1, 16)


@dataclass(frozen=True)
class ItsOptions:
    pits: int = 1
    cpus: int = 4
    queue_slots: int = 32768
    rate: float = 2_000_000.0
    batch_size: int = 8
    elision: Elision = "lazy"
    lpis: int = 1 << 16
    #: The host's RAM in 4 KiB frames: the interrupt controller's frames go above it.
    ram_frames: int = 1 << 16


@dataclass
class ItsDeviceInfo:
    """A PCI device's ITS side: fixed at assignment."""

    pdevid: int
    pits: int
    events: int
    plpis: list[int]
    vdevid: int

    def xen_mapd(self) -> ItsCommand:
        """The physical ``MAPD`` of this device: the ITT Xen allocated for its events, whatever
        Size the guest's ``MAPD`` had (a guest may size its ITT for more events than it has)."""
        size = max(0, math.ceil(math.log2(max(self.events, 2))) - 1)
        return cmds.mapd(self.pdevid, size, 0x1000 * self.pdevid)


@dataclass(eq=False)
class Ite:
    """One mapping ``(device, event) -> vLPI``, and the state that belongs to it.

    Compared by identity: a new mapping of the same event is another ITE, so nothing left by
    the old one (its pending state, a Xen command queued for it) can act on the new one."""

    vlpi: int
    icid: int
    plpi: int
    #: MOVALL's retarget, until a MOVI or MAPC routes it again.
    vcpu_override: int | None = None
    #: The vCPU whose redistributor holds this LPI's pending state: it fired again while that
    #: vCPU had it in service (delivered, not ended). MOVI moves it, CLEAR clears it, DISCARD and
    #: MAPD remove it with the mapping; the guest's end delivers it.
    pending: int | None = None
    #: The pITS slot of this mapping's physical MAPTI until the pITS has executed it: a physical
    #: LPI delivered before then became pending under an old mapping, and is dropped.
    mapti_slot: int | None = None
    #: The physical collection the pITS has (or will have, once placed) for this mapping: a
    #: MOVI of Xen's owed for it is skipped when it is already in place.
    pcoll: int | None = None


@dataclass
class VDevice:
    info: ItsDeviceInfo
    size: int | None = None  # None until the guest's MAPD maps it
    #: The guest-physical address of the ITT its MAPD gave (where a save writes its ITEs).
    itt: int = 0


@dataclass
class Taken:
    """A guest command taken from its queue: done when its slot on the pITS has executed."""

    end: int  # queue offset after it
    slot: int | None  # pITS slot, or None if nothing was placed (elided, recorded, dropped)
    done: bool = False
    batch: int = 0  # which batch of its pITS it went with (PitsState.batches when taken)
    #: A MAPC or MOVALL whose scan (jobs.py) is still running: CREADR stays before it.
    waiting: bool = False


@dataclass(eq=False)
class Vits:
    """One vITS of a domain (one per pITS its devices sit on), with its ``vits_cq``."""

    domid: int
    pits: int
    enabled: bool = False
    cbaser: int = 0
    baser: list[int] = field(default_factory=lambda: [0] * 8)
    creadr: int = 0
    cwriter: int = 0
    progress: int = 0
    taken: deque[Taken] = field(default_factory=deque)
    #: Commands of a queue that a CBASER write replaced, still on the pITS: they complete
    #: without moving CREADR, and until they have, this queue has a batch in flight.
    orphans: list[Taken] = field(default_factory=list)
    devices: dict[int, VDevice] = field(default_factory=dict)
    ites: dict[tuple[int, int], Ite] = field(default_factory=dict)
    collections: dict[int, int] = field(default_factory=dict)
    received: Counter[str] = field(default_factory=Counter)
    forwarded: Counter[str] = field(default_factory=Counter)
    elided: Counter[str] = field(default_factory=Counter)
    dropped: Counter[str] = field(default_factory=Counter)
    longest_wait: int = 0
    waiting_since: int | None = None
    #: Xen's own commands owed to the pITS for this vITS, coalesced per mapping (so at most
    #: two per mapping: its pending state's INT or CLEAR, and an eager INV), placed before the
    #: vITS takes more commands; and the mappings whose physical collection may have to move
    #: (at most one each; placed when there is room, in no order with its commands).
    owed: dict[tuple[Ite, str], ItsCommand] = field(default_factory=dict)
    moves: dict[Ite, tuple[int, int]] = field(default_factory=dict)
    #: A MAPC/MOVALL scan in progress (jobs.Retarget): no more commands are taken meanwhile.
    job: Any = None
    #: The most Xen has owed this vITS at once (``len(owed) + len(moves)``), for its_info.
    owed_peak: int = 0

    @property
    def queue_bytes(self) -> int:
        return ((self.cbaser & 0xFF) + 1) * PAGE_SIZE

    def outstanding(self) -> int:
        return (self.cwriter - self.progress) % self.queue_bytes // CMD_SIZE if self.queue_bytes else 0

    def in_flight(self) -> list[Taken]:
        """Its commands on the pITS, not yet executed: the current queue's and orphans."""
        return [t for t in (*self.taken, *self.orphans) if t.slot is not None and not t.done]

    def batch_in_flight(self) -> bool:
        return bool(self.in_flight())

    def target_vcpu(self, ite: Ite) -> int | None:
        """The vCPU an ITE routes to: MOVALL's retarget, else its collection's (None: unmapped).

        Registers (the pending table), translation (MOVALL) and delivery all ask this, so it
        lives with the data rather than in any one of them."""
        return ite.vcpu_override if ite.vcpu_override is not None else self.collections.get(ite.icid)


@dataclass
class Redistributor:
    enable_lpis: bool = False
    pendbaser: int = 0
    #: The last PENDBASER write said the pending table is zero (PTZ), so it is not read.
    ptz: bool = False
    #: The pending-table load in progress since EnableLPIs went 0 -> 1 (jobs.PendingLoad).
    load: Any = None


@dataclass
class DomainIts:
    vcpus: int
    pin: list[int]
    propbaser: int = 0
    redists: list[Redistributor] = field(default_factory=list)
    vits: dict[int, Vits] = field(default_factory=dict)
    #: (vCPU, vLPI) delivered and not yet ended: the vCPU's state, not a mapping's (the guest
    #: ends what it was given even if the mapping has gone). Pending state is on the ITE.
    in_service: set[tuple[int, int]] = field(default_factory=set)
    dying: bool = False

    def loading(self) -> bool:
        """Whether a vCPU's pending table is still being read (its vITSs take no commands)."""
        return any(r.load is not None for r in self.redists)


@dataclass
class Delivery:
    domid: int
    vcpu: int
    intid: int


@dataclass
class PitsState:
    """Xen's side of one pITS: its schedule list and the shadow of what occupies its slots."""

    hw: PhysicalIts
    schedule: list[Vits] = field(default_factory=list)
    last_served: Vits | None = None
    last_creadr: int = 0
    #: Slot -> who placed the command there (a Vits, or None for Xen).
    owner: dict[int, Vits | None] = field(default_factory=dict)
    #: Xen's own commands, with the mapping each concerns (skipped if that mapping is gone
    #: meanwhile) and the dying domain whose teardown it is part of.
    xen_queue: deque[tuple[ItsCommand, Ite | None, int | None]] = field(default_factory=deque)
    #: Slots holding a teardown command -> the domain it tears down.
    teardown_slots: dict[int, int] = field(default_factory=dict)
    #: Slots holding a guest's translated MAPTI -> the mapping it makes (``Ite.mapti_slot``).
    mapti_slots: dict[int, Ite] = field(default_factory=dict)
    xen_int_outstanding: bool = False
    #: The last forwarded guest SYNC's physical target, for eliding SYNC; SYNC.
    last_forwarded_sync: int | None = None
    #: vITSs of this pITS that Xen owes commands (``Vits.owed``/``moves``), in turn.
    owing: dict[Vits, None] = field(default_factory=dict)
    passes: int = 0
    batches: int = 0
    xen_ints: int = 0
    physical: Counter[str] = field(default_factory=Counter)

    def place_xen(self, command: ItsCommand) -> None:
        """Place one of Xen's own commands: its slot is owned by Xen (None), and it is counted."""
        slot = self.hw.place(command)
        self.owner[slot] = None
        self.physical[command.name] += 1


class ItsState:
    """Every pITS and every domain's vITSs, redistributors and bindings: one object, shared.

    Each room holds a reference to this and reads its fields afresh on every use (the shell
    swaps ``deliveries`` and ``drops`` for new lists between requests)."""

    def __init__(self, memory: GuestMemory, options: ItsOptions) -> None:
        self.memory = memory
        self.options = opts = options
        self.prop = bytearray(opts.lpis)  # physical LPI configuration table, LPI - 8192
        self.dirty: set[int] = set()
        self.pits = [PitsState(PhysicalIts(i, opts.queue_slots, opts.rate, self.prop)) for i in range(opts.pits)]
        #: Free physical LPIs as (first, count) runs, by address: 8192 + index is each pITS's
        #: completion LPI, the rest is handed to devices at assignment and back at teardown.
        self.free_lpis: list[tuple[int, int]] = [(LPI_BASE + opts.pits, opts.lpis - opts.pits)]
        self.domains: dict[int, DomainIts] = {}
        #: (domid, vLPI) -> the physical LPIs bound to it (two events may share a vLPI), so a
        #: trapped configuration write finds them without scanning every binding.
        self.by_vlpi: dict[tuple[int, int], set[int]] = {}
        #: physical LPI -> (domid, vITS pits index, (vdevid, event)) of its current binding.
        self.bindings: dict[int, tuple[int, int, tuple[int, int]]] = {}
        #: pITSs on which a scheduling pass is raised, to run at the end of the request.
        self.raised: set[int] = set()
        self.deliveries: list[Delivery] = []
        #: Dying domains: -1 while their commands drain, then how many teardown commands remain.
        self.tearing_down: dict[int, int] = {}
        #: Physical DeviceIDs of dying domains: not assignable until their teardown completes.
        self.retired: set[int] = set()
        #: Dropped guest commands not yet logged: (domid, pITS, queue offset, command, error).
        self.drops: list[tuple[int, int, int, str, str]] = []
        #: Scans and pending-table loads still running (jobs.py), in turn.
        self.jobs: deque[Any] = deque()

    def owe(self, vits: Vits, ite: Ite, kind: str, command: ItsCommand) -> None:
        """Xen owes ``command`` for this mapping; a later one of the same kind replaces it."""
        vits.owed.pop((ite, kind), None)
        vits.owed[(ite, kind)] = command
        self._owing(vits)

    def owe_move(self, vits: Vits, key: tuple[int, int], ite: Ite) -> None:
        """The mapping's physical collection may have changed: Xen owes a MOVI if it has."""
        vits.moves[ite] = (vits.devices[key[0]].info.pdevid, key[1])
        self._owing(vits)

    def _owing(self, vits: Vits) -> None:
        self.pits[vits.pits].owing[vits] = None
        vits.owed_peak = max(vits.owed_peak, len(vits.owed) + len(vits.moves))

    def physical_target(self, vits: Vits, ite: Ite) -> int:
        """The physical collection a mapping belongs in now: its vCPU's CPU (MOVALL's
        override first), the spare while its collection is unmapped."""
        dom = self.domains[vits.domid]
        if ite.vcpu_override is not None:
            return dom.pin[ite.vcpu_override]
        vcpu = vits.collections.get(ite.icid)
        return self.options.cpus if vcpu is None else dom.pin[vcpu]

    def allocate_lpis(self, count: int) -> list[int] | None:
        """``count`` contiguous physical LPIs, the lowest run that fits (None if none does)."""
        for i, (first, free) in enumerate(self.free_lpis):
            if free >= count:
                self.free_lpis[i : i + 1] = [(first + count, free - count)] if free > count else []
                return list(range(first, first + count))
        return None

    def release_lpis(self, plpis: list[int]) -> None:
        """A device's LPIs (one run, from ``allocate_lpis``) are free again; runs coalesce."""
        if not plpis:
            return
        runs = sorted([*self.free_lpis, (plpis[0], len(plpis))])
        merged: list[tuple[int, int]] = []
        for first, count in runs:
            if merged and merged[-1][0] + merged[-1][1] == first:
                merged[-1] = (merged[-1][0], merged[-1][1] + count)
            else:
                merged.append((first, count))
        self.free_lpis = merged

    def free_lpis_count(self) -> int:
        return sum(count for _, count in self.free_lpis)

    def bind(self, vits: Vits, key: tuple[int, int], vlpi: int, plpi: int) -> None:
        """Record that physical LPI ``plpi`` now stands for ``vlpi`` of this mapping."""
        self.bindings[plpi] = (vits.domid, vits.pits, key)
        self.by_vlpi.setdefault((vits.domid, vlpi), set()).add(plpi)

    def current(self, ite: Ite) -> bool:
        """Whether ``ite`` is still the mapping its physical LPI is bound to."""
        binding = self.bindings.get(ite.plpi)
        if binding is None:
            return False
        domid, pits, key = binding
        return self.domains[domid].vits[pits].ites.get(key) is ite

    def mapping(self, plpi: int) -> tuple[Vits, tuple[int, int], Ite] | None:
        """The vITS, key and ITE that physical LPI ``plpi`` currently stands for."""
        binding = self.bindings.get(plpi)
        if binding is None:
            return None
        domid, pits, key = binding
        vits = self.domains[domid].vits[pits]
        return vits, key, vits.ites[key]

    def forget_binding(self, domid: int, ite: Ite) -> None:
        """The ITE's physical LPI stands for nothing any more (unmapped, or its domain freed)."""
        self.bindings.pop(ite.plpi, None)
        self.dirty.discard(ite.plpi)
        binding_vits = self.domains[domid].vits if domid in self.domains else {}
        for vits in binding_vits.values():  # nothing is owed for a mapping that has gone
            vits.moves.pop(ite, None)
            vits.owed.pop((ite, "pend"), None)
            vits.owed.pop((ite, "inv"), None)
        plpis = self.by_vlpi.get((domid, ite.vlpi))
        if plpis is not None:
            plpis.discard(ite.plpi)
            if not plpis:
                del self.by_vlpi[(domid, ite.vlpi)]
