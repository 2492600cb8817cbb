"""The physical ITS: a hardware model that runs the command ring at its own rate.

It knows nothing of guests. Xen writes 32-byte commands into its ring and moves ``CWRITER``;
the hardware executes them in order, at most ``rate`` per second of elapsed time (or as many
as a test steps by hand), and moves ``CREADR``. It keeps a device table with per-device ITTs,
collections, per-CPU pending LPIs, and a *cache* of LPI configuration bytes that is loaded at
``MAPTI`` and refreshed only by ``INV`` and ``INVALL``: a change to the configuration table is
not seen until then, which is what makes elision observable.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from xenemu.abi import const
from xenemu.abi.its_cmd import ItsCommand

LPI_BASE = const("LPI_INTID_BASE")
ENABLED = const("LPI_PROP_ENABLED")


@dataclass
class ItsDevice:
    size: int
    itt: int
    #: EventID -> (physical LPI, collection)
    events: dict[int, tuple[int, int]] = field(default_factory=dict)


class PhysicalIts:
    """One pITS. ``prop`` is the host-wide physical LPI configuration table (LPI - 8192)."""

    def __init__(self, index: int, slots: int, rate: float, prop: bytearray) -> None:
        self.index = index
        self.slots = slots
        self.rate = rate
        self.prop = prop
        self.ring: list[ItsCommand | None] = [None] * slots
        self.creadr = 0
        self.cwriter = 0
        self.devices: dict[int, ItsDevice] = {}
        self.collections: dict[int, int] = {}
        self.cache: dict[int, int] = {}
        #: Pending physical LPIs -> the CPU they are pending on (None: unrouted collection).
        self.pending: dict[int, int | None] = {}
        #: LPI -> (DeviceID, EventID) that maps it.
        self.lpi_map: dict[int, tuple[int, int]] = {}
        self.executed: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.dropped_msis = 0
        self._credit = 0.0

    # -- the ring, as Xen drives it ---------------------------------------------------------------
    def queued(self) -> int:
        return (self.cwriter - self.creadr) % self.slots

    def free_slots(self) -> int:
        return self.slots - 1 - self.queued()

    def place(self, command: ItsCommand) -> int:
        """Write ``command`` at ``CWRITER`` and advance it; returns the slot it took."""
        if self.free_slots() <= 0:
            raise RuntimeError("pITS command queue is full")
        slot = self.cwriter
        self.ring[slot] = command
        self.cwriter = (slot + 1) % self.slots
        return slot

    # -- the hardware -------------------------------------------------------------------------------
    def advance(self, seconds: float, limit: int | None = None) -> int:
        """Let ``seconds`` of hardware time pass; returns how many commands ran. ``limit``: run
        at most that many now (the model runs in the daemon's own time, a slice at a time);
        the time left over is kept, up to a full ring's worth, for the next call."""
        self._credit = min(self._credit + seconds * self.rate, float(self.slots))
        count = int(self._credit) if limit is None else min(int(self._credit), limit)
        done = self.step(count)
        self._credit -= done
        if not self.queued():
            self._credit = 0.0
        return done

    def step(self, count: int) -> int:
        """Execute up to ``count`` queued commands in order."""
        done = 0
        while done < count and self.creadr != self.cwriter:
            command = self.ring[self.creadr]
            self.ring[self.creadr] = None
            assert command is not None
            self._execute(command)
            self.creadr = (self.creadr + 1) % self.slots
            done += 1
        return done

    def _execute(self, c: ItsCommand) -> None:
        self.executed[c.name] += 1
        handler = getattr(self, f"_cmd_{c.name.lower()}", None)
        if handler is None:
            self.errors["UNKNOWN_COMMAND"] += 1
            return
        handler(c)

    def _event(self, c: ItsCommand, error: str) -> tuple[int, int] | None:
        device = self.devices.get(c.devid)
        entry = device.events.get(c.eventid) if device else None
        if entry is None:
            self.errors[error] += 1
        return entry

    def _cmd_mapd(self, c: ItsCommand) -> None:
        old = self.devices.pop(c.devid, None)
        if old is not None:
            for lpi, _icid in old.events.values():
                self._forget(lpi)
        if c.valid:
            self.devices[c.devid] = ItsDevice(c.size, c.itt)

    def _cmd_mapc(self, c: ItsCommand) -> None:
        if c.valid:
            self.collections[c.icid] = c.target
        else:
            self.collections.pop(c.icid, None)
        for lpi, cpu in list(self.pending.items()):
            self.pending[lpi] = self._cpu_of(lpi) if cpu is None else cpu

    def _cmd_mapti(self, c: ItsCommand, pintid: int | None = None) -> None:
        device = self.devices.get(c.devid)
        if device is None:
            self.errors["MAPTI_UNMAPPED_DEVICE"] += 1
            return
        lpi = c.pintid if pintid is None else pintid
        if c.eventid >= 1 << (device.size + 1) or lpi < LPI_BASE or lpi - LPI_BASE >= len(self.prop):
            self.errors["MAPTI_ID_OOR"] += 1
            return
        if c.eventid in device.events:
            self._forget(device.events[c.eventid][0])
        device.events[c.eventid] = (lpi, c.icid)
        self.lpi_map[lpi] = (c.devid, c.eventid)
        self.cache[lpi] = self.prop[lpi - LPI_BASE]

    def _cmd_mapi(self, c: ItsCommand) -> None:
        self._cmd_mapti(c, pintid=c.eventid)

    def _cmd_int(self, c: ItsCommand) -> None:
        entry = self._event(c, "INT_UNMAPPED_INTERRUPT")
        if entry is not None:
            self.pending[entry[0]] = self.collections.get(entry[1])

    def _cmd_clear(self, c: ItsCommand) -> None:
        entry = self._event(c, "CLEAR_UNMAPPED_INTERRUPT")
        if entry is not None:
            self.pending.pop(entry[0], None)

    def _cmd_discard(self, c: ItsCommand) -> None:
        entry = self._event(c, "DISCARD_UNMAPPED_INTERRUPT")
        if entry is not None:
            del self.devices[c.devid].events[c.eventid]
            self._forget(entry[0])

    def _cmd_inv(self, c: ItsCommand) -> None:
        entry = self._event(c, "INV_UNMAPPED_INTERRUPT")
        if entry is not None:
            self.cache[entry[0]] = self.prop[entry[0] - LPI_BASE]

    def _cmd_invall(self, c: ItsCommand) -> None:
        if c.icid not in self.collections:
            self.errors["INVALL_UNMAPPED_COLLECTION"] += 1
            return
        for lpi in self.cache:
            self.cache[lpi] = self.prop[lpi - LPI_BASE]

    def _cmd_movi(self, c: ItsCommand) -> None:
        entry = self._event(c, "MOVI_UNMAPPED_INTERRUPT")
        if entry is None:
            return
        self.devices[c.devid].events[c.eventid] = (entry[0], c.icid)
        if entry[0] in self.pending:  # a pending LPI moves with its mapping
            self.pending[entry[0]] = self.collections.get(c.icid)

    def _cmd_movall(self, c: ItsCommand) -> None:
        for lpi, cpu in self.pending.items():
            if cpu == c.target:
                self.pending[lpi] = c.target2

    def _cmd_sync(self, c: ItsCommand) -> None:
        """Everything before it has executed: in this in-order model, by construction."""

    def _forget(self, lpi: int) -> None:
        self.pending.pop(lpi, None)
        self.cache.pop(lpi, None)
        self.lpi_map.pop(lpi, None)

    def _cpu_of(self, lpi: int) -> int | None:
        devid, eventid = self.lpi_map[lpi]
        return self.collections.get(self.devices[devid].events[eventid][1])

    # -- interrupts ----------------------------------------------------------------------------------
    def msi(self, devid: int, eventid: int) -> int | None:
        """A device's write of ``eventid`` to the doorbell: the LPI made pending, or None."""
        device = self.devices.get(devid)
        entry = device.events.get(eventid) if device else None
        if entry is None:
            self.dropped_msis += 1
            return None
        self.pending[entry[0]] = self.collections.get(entry[1])
        return entry[0]

    def deliverable(self) -> list[tuple[int, int]]:
        """(CPU, LPI) pairs a CPU takes now: pending, routed, and enabled in the *cache*."""
        return sorted(
            (cpu, lpi) for lpi, cpu in self.pending.items() if cpu is not None and self.cache.get(lpi, 0) & ENABLED
        )

    def acknowledge(self, lpi: int) -> None:
        """The CPU took the LPI: it is no longer pending."""
        self.pending.pop(lpi, None)
