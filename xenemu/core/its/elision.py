"""Elision (seed 001): which invalidations and SYNCs reach a pITS, under the host's policy.

Under every policy a guest's write to its LPI configuration table is trapped
(``config_written``): its enable bit is copied into the physical table for every physical LPI
bound to that vLPI, and the LPI is marked in the host-wide dirty bitmap. The policy then decides:

- ``lazy`` (draft C): nothing at trap time; a guest ``INV`` is forwarded only if it clears its
  LPI's dirty bit, an ``INVALL`` only if a dirty LPI of this vITS is mapped to that collection;
- ``eager``: each trapped write queues Xen's own ``INV`` (once); guest ``INV``/``INVALL`` are
  eaten;
- ``off``: every guest command is forwarded as translated.

Under ``lazy`` and ``eager`` a ``SYNC`` directly after a forwarded ``SYNC`` to the same target
on the same pITS is not forwarded; ``forwarded`` keeps track of that.

Translation (translate.py) validates a command and asks this room whether to forward it, so the
three policies are read in one place and the translation of each command stays one thing.
"""

from __future__ import annotations

from xenemu.abi import its_cmd as cmds
from xenemu.abi.its_cmd import ItsCommand
from xenemu.core.its.state import ENABLED, LPI_BASE, XEN_PRIORITY, ItsState, PitsState


class ElisionPolicy:
    """The trapped configuration table and the dirty bitmap, read under the host's policy."""

    def __init__(self, state: ItsState) -> None:
        self.state = state

    def config_written(self, domid: int, vlpi: int, value: int) -> None:
        """A trapped write to the guest's configuration table: copy the enable bit (eager: queue INVs)."""
        s = self.state
        if s.domains[domid].dying:
            return  # its LPIs are being disabled for good; nothing new is placed for it
        for plpi in sorted(s.by_vlpi.get((domid, vlpi), ())):
            _owner, pits, key = s.bindings[plpi]
            vits = s.domains[domid].vits[pits]
            s.prop[plpi - LPI_BASE] = XEN_PRIORITY | (value & ENABLED)
            s.dirty.add(plpi)
            if s.options.elision == "eager":
                pdevid = vits.devices[key[0]].info.pdevid
                s.owe(vits, vits.ites[key], "inv", cmds.event_cmd(cmds.INV, pdevid, key[1]))  # once
                s.dirty.discard(plpi)
                s.raised.add(pits)

    def forward_inv(self, plpi: int) -> bool:
        """Whether a guest's (valid) ``INV`` of ``plpi`` goes to the pITS; if so it is clean now."""
        policy = self.state.options.elision
        if policy == "eager" or (policy == "lazy" and plpi not in self.state.dirty):
            return False
        self.state.dirty.discard(plpi)
        return True

    def forward_invall(self, plpis: list[int]) -> bool:
        """Whether a guest's (valid) ``INVALL`` of a collection holding ``plpis`` goes to the pITS;
        if so, those it refreshes are clean now."""
        policy = self.state.options.elision
        if policy == "eager":
            return False
        if policy == "lazy":
            dirty = [lpi for lpi in plpis if lpi in self.state.dirty]
            if not dirty:
                return False
            self.state.dirty.difference_update(dirty)
        else:
            self.state.dirty.difference_update(plpis)
        return True

    def forward_sync(self, pits: int, target: int) -> bool:
        """Whether a guest's ``SYNC`` to physical ``target`` goes to the pITS (not if it directly
        follows one to the same target there)."""
        return not (self.state.options.elision != "off" and self.state.pits[pits].last_forwarded_sync == target)

    @staticmethod
    def forwarded(state: PitsState, command: ItsCommand) -> None:
        """A guest's translated command was placed on the pITS: what "directly after" means for
        SYNC (Xen's own commands, and guest commands not forwarded, do not count as between)."""
        if command.cmd == cmds.SYNC:
            state.last_forwarded_sync = command.target
        else:
            state.last_forwarded_sync = None
