"""Draft C's command-queue scheduling: passes, round-robin batches, completion, CREADR.

A ``vits_cq`` with commands waiting is put on its pITS's schedule list and a pass is raised
(``schedule``); raised passes run once, at the end of the request (``run_passes``, the softirq).
A pass (``run_pass``):

1. completes every command the pITS executed since the last pass, advancing each owner's
   ``creadr`` in order (and reporting teardown commands to teardown.py);
2. places Xen's own queued commands first, in the order queued, then what Xen owes the vITSs
   (``Vits.owed``, ``Vits.moves``: coalesced per mapping, placed round-robin while the slice
   lasts);
3. refills round-robin, starting after the ``vits_cq`` last given a batch, serving each at most
   once: one with a batch still on the pITS is skipped, the others give
   ``min(free slots, outstanding, VITS_BATCH_SIZE)`` commands, translated as they are taken;
   a vITS whose scan or whose domain's pending-table load is running (jobs.py), or that is still
   owed an ``INT``/``CLEAR``/``INV``, is held: it takes nothing until then;
4. while no Xen completion ``INT`` is outstanding keeps a slot free for it and ends by placing
   it if commands are left on the pITS, so completion never waits on a guest reading ``CREADR``.

Xen never waits for a pITS. This room owns the slot shadow (``PitsState.owner``) and each
vITS's ``taken`` list; what a command becomes is translate.py's business, and whether a SYNC
counts as "directly after" is elision.py's.
"""

from __future__ import annotations

from xenemu.abi import its_cmd as cmds
from xenemu.core.its.elision import ElisionPolicy
from xenemu.core.its.jobs import COMPLETE_COST, PLACE_COST, SLICE, Budget, Jobs
from xenemu.core.its.state import CMD_SIZE, XEN_DEVID, ItsState, PitsState, Taken, Vits
from xenemu.core.its.teardown import Teardown
from xenemu.core.its.translate import Translator

#: How many rounds of raised passes one request (or one wake of the shell's pITS task) runs:
#: the passes raised during it, once each. A queue whose batches place nothing (all elided or
#: recorded) raises a pass per batch; that pass runs next in the shell's pITS task, one round at
#: a time with every ready request in between, so no request translates a whole flooded queue
#: while another guest's request waits behind it.
MAX_ROUNDS = 1


class CommandScheduler:
    """The schedule lists of every pITS and the passes that serve them."""

    def __init__(
        self, state: ItsState, translator: Translator, elision: ElisionPolicy, teardown: Teardown, jobs: Jobs
    ) -> None:
        self.state = state
        self.translator = translator
        self.elision = elision
        self.teardown = teardown
        self.jobs = jobs

    def schedule(self, vits: Vits) -> None:
        """A trigger: an enabled vITS's queue has commands waiting (CWRITER moved, or enabled)."""
        state = self.state.pits[vits.pits]
        if vits.outstanding() and vits not in state.schedule:
            state.schedule.append(vits)
        if vits.outstanding():
            self.state.raised.add(vits.pits)

    def run_passes(self) -> None:
        """The softirq: every pass raised during the request, until none is raised again or
        ``MAX_ROUNDS`` rounds have run (what is still raised stays in ``raised``)."""
        s = self.state
        if s.jobs:
            self.jobs.run(Budget(SLICE // 2))
        for _ in range(MAX_ROUNDS):
            if not s.raised:
                break
            raised, s.raised = s.raised, set()
            for index in sorted(raised):
                self.run_pass(index)
        for job in s.jobs:  # the next slice runs in the shell's pITS task, after ready requests
            s.raised.update(job.pits(s))

    def run_pass_now(self, index: int) -> None:
        """A ``CREADR`` or ``CTLR`` read with commands outstanding: a pass now, standing for any
        pass already raised on that pITS in the same request. One this pass raises itself (its
        batch placed nothing) is another pass, and stays raised."""
        self.state.raised.discard(index)
        self.run_pass(index)

    def run_pass(self, index: int) -> None:
        s = self.state
        state = s.pits[index]
        hw = state.hw
        state.passes += 1
        budget = Budget(SLICE // 2)  # with the jobs' half: a request's passes do about a slice
        self._complete(state, budget)
        free = hw.free_slots() - (0 if state.xen_int_outstanding else 1)
        while state.xen_queue and free > 0:
            command, ite, teardown = state.xen_queue.popleft()
            if ite is not None and not s.current(ite):
                continue  # the mapping it was queued for is gone (perhaps remapped since)
            if teardown is not None:
                state.teardown_slots[state.hw.cwriter] = teardown
            state.place_xen(command)
            free -= 1
        free = self._place_owed(state, free, budget)
        schedule = state.schedule
        if schedule:
            start = (schedule.index(state.last_served) + 1) if state.last_served in schedule else 0
            order = schedule[start:] + schedule[:start]
            for vits in order:
                if free <= 0 or budget.spent:
                    break
                if vits.batch_in_flight() or not vits.enabled or s.domains[vits.domid].dying or self._held(vits):
                    continue
                count = min(free, vits.outstanding(), s.options.batch_size)
                placed = self._take_batch(state, vits, count, budget)
                free -= placed
                state.last_served = vits
                state.batches += 1
                if not placed:
                    s.raised.add(index)
            state.schedule = [v for v in schedule if v.outstanding() or v.batch_in_flight()]
            for vits in state.schedule:
                waited = state.passes - (vits.waiting_since or state.passes)
                vits.longest_wait = max(vits.longest_wait, waited)
        if hw.queued() and not state.xen_int_outstanding:
            state.place_xen(cmds.event_cmd(cmds.INT, XEN_DEVID, 0))
            state.xen_int_outstanding = True
            state.xen_ints += 1
        if state.last_creadr != hw.creadr or (state.owing and free > 0) or (budget.spent and state.schedule):
            s.raised.add(index)  # the slice ran out: the rest in the next pass (a full pITS: its INT)

    def _held(self, vits: Vits) -> bool:
        """A vITS takes no more commands while a scan of its own runs, while Xen owes commands
        that must precede them (pending state, eager INVs), or while its domain's pending table
        is being read: what those commands see is then what it would be had Xen been quick."""
        return vits.job is not None or bool(vits.owed) or self.state.domains[vits.domid].loading()

    def _place_owed(self, state: PitsState, free: int, budget: Budget) -> int:
        """Xen's owed commands, vITS after vITS in turn, while there is room and work left in the
        slice: a mapping gone meanwhile is skipped, and a MOVI whose collection is in place."""
        s = self.state
        for vits in list(state.owing):
            if free <= 0 or budget.spent:
                break
            dom = s.domains.get(vits.domid)
            if dom is None or dom.dying:  # nothing new is placed for a dying domain
                vits.owed.clear()
                vits.moves.clear()
                del state.owing[vits]
                continue
            while free > 0 and not budget.spent and (vits.owed or vits.moves):
                budget.spend(PLACE_COST)
                if vits.owed:
                    (ite, _kind), command = vits.owed.popitem()
                    if s.current(ite):
                        state.place_xen(command)
                        free -= 1
                    continue
                ite, (pdevid, event) = vits.moves.popitem()
                target = s.physical_target(vits, ite)
                if s.current(ite) and target != ite.pcoll:
                    ite.pcoll = target
                    state.place_xen(cmds.event_cmd(cmds.MOVI, pdevid, event, target))
                    free -= 1
            del state.owing[vits]
            if vits.owed or vits.moves:
                state.owing[vits] = None  # the rest after the others' turn
        return free

    def _complete(self, state: PitsState, budget: Budget) -> None:
        hw = state.hw
        slot = state.last_creadr
        while slot != hw.creadr and not budget.spent:
            budget.spend(COMPLETE_COST)
            owner = state.owner.pop(slot, None)
            teardown = state.teardown_slots.pop(slot, None)
            mapped = state.mapti_slots.pop(slot, None)
            if mapped is not None and mapped.mapti_slot == slot:
                mapped.mapti_slot = None  # from now on its physical LPI fires for this mapping
            if teardown is not None:
                self.teardown.slot_completed(teardown)
            if owner is not None:
                for taken in (*owner.taken, *owner.orphans):
                    if taken.slot == slot:
                        taken.done = True
                owner.orphans = [t for t in owner.orphans if not t.done]
            slot = (slot + 1) % hw.slots
        state.last_creadr = slot
        self.teardown.progress()
        for dom in self.state.domains.values():
            for vits in dom.vits.values():
                if vits.pits == hw.index:
                    self._advance_creadr(vits)

    @staticmethod
    def _advance_creadr(vits: Vits) -> None:
        while vits.taken and ((vits.taken[0].slot is None and not vits.taken[0].waiting) or vits.taken[0].done):
            vits.creadr = vits.taken.popleft().end

    def _take_batch(self, state: PitsState, vits: Vits, count: int, budget: Budget) -> int:
        placed = 0
        for _ in range(count):
            if budget.spent:
                break
            offset = vits.progress
            vits.progress = (offset + CMD_SIZE) % vits.queue_bytes
            physical = self.translator.translate(vits, offset)
            slot = None
            for command in physical:
                slot = state.hw.place(command)
                state.owner[slot] = vits
                state.physical[command.name] += 1
                if command.cmd == cmds.MAPTI:
                    found = self.state.mapping(command.pintid)
                    if found is not None:
                        found[2].mapti_slot = slot
                        state.mapti_slots[slot] = found[2]
                self.elision.forwarded(state, command)
                placed += 1
            budget.spend(PLACE_COST * max(1, len(physical)))
            taken = Taken(vits.progress, slot, batch=state.batches)
            vits.taken.append(taken)
            job = self.translator.take_started()
            if job is not None:  # a MAPC or MOVALL: its scan's first slice runs now
                job.taken = taken
                self.jobs.start_retarget(job, budget)
                if vits.job is not None:
                    break  # the rest of the queue waits for the scan
        self._advance_creadr(vits)
        if vits.outstanding():
            vits.waiting_since = vits.waiting_since or state.passes
        else:
            vits.waiting_since = None
        return placed
