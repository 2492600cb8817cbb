"""Xen's own vITS work in slices: scans that a guest's command or register write starts.

A ``MAPC`` (or ``MOVALL``) retargets every mapping of a collection (of a vCPU), and an
``EnableLPIs`` 0 -> 1 reads the pending table for every mapping that targets the vCPU: work
proportional to the guest's mappings, which a guest can ask for again and again. So each is a
job that visits the mappings in slices (``Budget``: about a millisecond each), other domains
running between slices; a slice ends with every visited mapping's state updated and what the
pITS needs recorded as owed (``Vits.moves``, ``Vits.owed``, coalesced per mapping, so what Xen
keeps for a guest is bounded by the guest's own mappings). While a job of a vITS (a scan) or of
its domain (a pending-table load) runs, that vITS takes no more commands from its queue and
``CREADR`` stays before the command that started it: the guest sees a slow ITS, never a command
lost or reordered.

It is a room of its own, below translation and the registers that start jobs and above the
delivery room whose ``retarget`` a scan calls.
"""

from __future__ import annotations

from xenemu.abi import its_cmd as cmds
from xenemu.core.errors import HypercallError
from xenemu.core.its.lpis import Lpis
from xenemu.core.its.state import CBASER_ADDR, Ite, ItsState, Taken, Vits

#: Work between two pauses: about a millisecond on this machine, in units of about a quarter of
#: a microsecond (measured: a scan's visit of a mapping 2 us, a pending-table load's visit with
#: its read of guest RAM 9 us, placing one of Xen's commands 4 us, completing a slot 0.5 us).
SLICE = 4096
SCAN_COST = 8
LOAD_COST = 36
PLACE_COST = 16
COMPLETE_COST = 2


class Budget:
    """Work left in the current slice."""

    __slots__ = ("left",)

    def __init__(self, units: int = SLICE) -> None:
        self.left = units

    def spend(self, units: int) -> None:
        self.left -= units

    @property
    def spent(self) -> bool:
        return self.left <= 0


class Snapshot:
    """The keys of a vITS's mappings when a job started, and how far it has gone through them
    (a mapping made or removed meanwhile is seen as it is when its key is visited)."""

    def __init__(self, vits: Vits) -> None:
        self.vits = vits
        self.keys = list(vits.ites)
        self.at = 0


class Retarget(Snapshot):
    """A ``MAPC`` of ``icid`` (``vcpu`` None) or a ``MOVALL`` from ``vcpu``: each mapping it
    concerns routes anew (MOVALL's override set or MAPC's cleared), its pending state moves
    with it, and a ``MOVI`` of Xen's is owed in case its physical collection changes."""

    def __init__(self, vits: Vits, taken: Taken, icid: int | None = None, vcpu: int | None = None, to: int = 0):
        super().__init__(vits)
        self.taken = taken
        self.icid, self.vcpu, self.to = icid, vcpu, to

    def pits(self, state: ItsState) -> set[int]:
        """The pITSs whose passes serve what this job holds up."""
        return {self.vits.pits}

    def run(self, state: ItsState, lpis: Lpis, budget: Budget) -> bool:
        """Visit mappings until done (True) or the slice is spent."""
        while self.at < len(self.keys):
            if budget.spent:
                return False
            key = self.keys[self.at]
            self.at += 1
            budget.spend(SCAN_COST)
            ite = self.vits.ites.get(key)
            if ite is not None:
                self.visit(state, lpis, key, ite)
        return True

    def visit(self, state: ItsState, lpis: Lpis, key: tuple[int, int], ite: Ite) -> None:
        if self.vcpu is None:
            if ite.icid != self.icid:
                return
            ite.vcpu_override = None
        else:
            if self.vits.target_vcpu(ite) != self.vcpu:
                return
            ite.vcpu_override = self.to
        lpis.retarget(self.vits, ite)
        state.owe_move(self.vits, key, ite)


class PendingLoad:
    """``EnableLPIs`` 0 -> 1 with PTZ = 0: vCPU ``vcpu``'s pending table, read mapping by
    mapping over each of the domain's vITSs. A set bit owes Xen's ``INT`` for one mapping of
    that vLPI (the first visited), a clear bit clears Xen's pending state and owes a ``CLEAR``."""

    def __init__(self, state: ItsState, domid: int, vcpu: int) -> None:
        dom = state.domains[domid]
        self.domid, self.vcpu = domid, vcpu
        self.base = dom.redists[vcpu].pendbaser & CBASER_ADDR
        self.scans = [Snapshot(vits) for _, vits in sorted(dom.vits.items())]
        self.raised: set[int] = set()

    def pits(self, state: ItsState) -> set[int]:
        dom = state.domains.get(self.domid)
        return {v.pits for v in dom.vits.values()} if dom is not None else set()

    def run(self, state: ItsState, lpis: Lpis, budget: Budget) -> bool:
        while self.scans:
            scan = self.scans[0]
            while scan.at < len(scan.keys):
                if budget.spent:
                    return False
                key = scan.keys[scan.at]
                scan.at += 1
                budget.spend(LOAD_COST)
                ite = scan.vits.ites.get(key)
                if ite is not None and scan.vits.target_vcpu(ite) == self.vcpu:
                    self._visit(state, scan.vits, key, ite)
            self.scans.pop(0)
        return True

    def _visit(self, state: ItsState, vits: Vits, key: tuple[int, int], ite: Ite) -> None:
        try:
            byte = state.memory.read(self.domid, self.base + ite.vlpi // 8, 1)[0]
        except HypercallError:
            return
        pdevid = vits.devices[key[0]].info.pdevid
        if byte >> (ite.vlpi % 8) & 1:
            if ite.vlpi in self.raised:
                return
            self.raised.add(ite.vlpi)
            state.owe(vits, ite, "pend", cmds.event_cmd(cmds.INT, pdevid, key[1]))
        else:
            ite.pending = None
            state.owe(vits, ite, "pend", cmds.event_cmd(cmds.CLEAR, pdevid, key[1]))


class Jobs:
    """Every job in progress, run round-robin a slice at a time."""

    def __init__(self, state: ItsState, lpis: Lpis) -> None:
        self.state = state
        self.lpis = lpis

    def start_retarget(self, job: Retarget, budget: Budget) -> None:
        """A scan from a guest command: its first slice runs now, in the command's batch."""
        job.vits.job = job
        job.taken.waiting = True
        if not job.run(self.state, self.lpis, budget):
            self.state.jobs.append(job)
            return
        self._finish(job)

    def start_load(self, domid: int, vcpu: int) -> None:
        """EnableLPIs 0 -> 1: a new load (none can be running: disabling ended it); first slice now."""
        load = PendingLoad(self.state, domid, vcpu)
        self.state.domains[domid].redists[vcpu].load = load
        if not load.run(self.state, self.lpis, Budget()):
            self.state.jobs.append(load)
        else:
            self._finish(load)

    def cancel_load(self, domid: int, vcpu: int) -> None:
        """EnableLPIs cleared: the load ends where it stands (what it owed is still placed)."""
        redist = self.state.domains[domid].redists[vcpu]
        if redist.load is not None:
            if redist.load in self.state.jobs:
                self.state.jobs.remove(redist.load)
            self._finish(redist.load)

    def finish_domain(self, domid: int) -> None:
        """Run every job of the domain (its vITSs' scans, its pending-table loads) to its end
        now, as a save does at its consistent point: each visits the domain's mappings once, so
        the work is bounded by the mappings its devices' events allow."""
        s = self.state
        for job in [j for j in s.jobs if (j.vits.domid if isinstance(j, Retarget) else j.domid) == domid]:
            s.jobs.remove(job)
            job.run(s, self.lpis, Budget(1 << 62))
            self._finish(job)

    def run(self, budget: Budget) -> None:
        """Jobs in turn until the slice is spent; one left unfinished goes to the back."""
        s = self.state
        for _ in range(len(s.jobs)):
            if budget.spent:
                break
            job = s.jobs.popleft()
            domid = job.vits.domid if isinstance(job, Retarget) else job.domid
            dom = s.domains.get(domid)
            if dom is None or dom.dying:
                continue  # nothing more is done for a dying domain
            if job.run(s, self.lpis, budget):
                self._finish(job)
            else:
                s.jobs.append(job)

    def _finish(self, job: Retarget | PendingLoad) -> None:
        s = self.state
        if isinstance(job, Retarget):
            job.vits.job = None
            job.taken.waiting = False
            s.raised.add(job.vits.pits)
            return
        dom = s.domains.get(job.domid)
        if dom is not None and dom.redists[job.vcpu].load is job:
            dom.redists[job.vcpu].load = None
        s.raised.update(job.pits(s))
